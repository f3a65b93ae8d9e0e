"""reap.py's work: calibration -> scores -> kept experts -> reap_metadata.json."""

from __future__ import annotations

import os
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

from ..calibration.ahead import BatchStream, default_workers, shm_problem, worker_kind
from ..calibration.encode import num_batches
from ..calibration.files import CalibrationSet, load_calibration, require_text_only
from ..calibration.order import BatchOrder, ForwardCost, length_order, padding_share
from ..checkpoint.integrity import check_checkpoint_folder
from ..checkpoint.loading import load_model, load_processor, resolve_device, resolve_dtype
from ..checkpoint.reader import Checkpoint, forward_weights
from ..errors import ReapError
from ..inference import ATTENTION
from ..metadata import REAP_VERSION, RunInputs, build_metadata, check_finite, write_metadata
from ..outputs import check_output_folder, output_lock
from ..safeguards import select_for_run
from ..selection import num_to_keep
from ..settings import Settings
from . import triton_experts
from .distributed import DistContext, samples_of
from .engine import choose_engine, run_batches
from .hooks import ReapObserver
from .laps import Laps
from .layerwise import run_layerwise
from .report import write_heatmap
from .resume import STATE_NAME, ResumeState, files_signature, fingerprint, last_batch, weights_signature
from .stats import METRICS_BY_MODE, ExpertStats
from .warmup import ScoringWarmUp


def check_criterion(settings: Settings) -> None:
    if settings.scoring_mode == "router" and not settings.explicitly_set("criterion"):
        settings.criterion = "frequency"  # the default (reap) needs expert outputs router mode does not compute
    if settings.criterion not in METRICS_BY_MODE[settings.scoring_mode]:
        raise ReapError(f"--criterion {settings.criterion} needs expert outputs that --mode "
                        f"{settings.scoring_mode} does not compute; use one of "
                        f"{', '.join(METRICS_BY_MODE[settings.scoring_mode])}")


def run_reap(settings: Settings) -> dict:
    """Score, select, and (on rank 0) write reap_metadata.json + heatmap; return the metadata."""
    dist = DistContext.from_env()
    device = dist.device(resolve_device(settings.device))
    dist.start(device)
    try:
        metadata = _run_reap(settings, dist, device)
    except BaseException:
        dist.stop(ok=False)
        raise
    dist.stop()
    return metadata


def _resume_state(settings: Settings, ckpt: Checkpoint, calib: CalibrationSet, order: BatchOrder, dtype,
                  dist: DistContext, share: list[int]) -> ResumeState | None:
    """Where this run's sums are saved, under the fingerprint of every input that shapes them (the batch order
    and this rank's ``share`` of the batches too: a resumed run must form the same batches)."""
    if not settings.resume:
        return None
    inputs = [p for sample in calib.samples for p in sample.images] + [
        p for p in Path(ckpt.path).iterdir() if p.suffix in (".json", ".jinja", ".txt")]
    key = fingerprint(config=ckpt.config, calibration=calib.digest, files=files_signature(inputs),
                      weights=weights_signature(ckpt.path, ckpt.shards),
                      version=REAP_VERSION, samples=order.indices, sort_window=order.window,
                      mode=settings.scoring_mode,
                      batch_size=settings.batch_size, max_seq_len=settings.max_seq_len,
                      max_pixels=settings.max_pixels, seed=settings.seed, dtype=str(dtype), attention=ATTENTION,
                      model=str(Path(ckpt.path).resolve()), rank=dist.rank, world_size=dist.world_size,
                      **({"share": share} if dist.enabled else {}))
    name = STATE_NAME if not dist.enabled else f"reap_state.rank{dist.rank}-of-{dist.world_size}.pt"
    return ResumeState(Path(settings.output_path) / name, key)


def encode_workers(settings: Settings, processor, family, pixel_dtype) -> tuple[int, str]:
    """Workers encoding ahead and their kind: ``--encode-workers``, auto sharing the host's cores among its
    torchrun ranks; ``--encode-workers-kind`` (auto: processes where /dev/shm has room for batches with pixels in
    ``pixel_dtype``, the stream's, else threads; processes asked for check shared memory before starting)."""
    workers = (default_workers(int(os.environ.get("LOCAL_WORLD_SIZE", 1))) if settings.encode_workers == "auto"
               else int(settings.encode_workers))
    short = settings.encode_workers_kind == "auto" and workers > 0 and shm_problem(
        processor, family, workers, settings.batch_size, settings.max_seq_len, pixel_dtype) is not None
    return workers, worker_kind(settings.encode_workers_kind, short)


def _score(settings: Settings, ckpt: Checkpoint, processor, observer: ReapObserver, samples: list,
           resume: ResumeState | None, engine: str, dtype, device: str, dist: DistContext,
           encoding: tuple[int, str], warm: ScoringWarmUp, steps: Laps) -> tuple[dict, float]:
    """Run the engine over this rank's samples; returns its counts and when loading ended."""
    total = num_batches(samples, settings.batch_size)
    done = resume.load(observer.stats) if resume is not None else 0
    t_load = steps.lap("saved sums")
    if done >= total:
        # scored before with these inputs (e.g. rerun for another --prune-ratio): select again, load nothing
        warm.abandon()
        return {"batches": total, "resumed_from": total, "tokens_this_run": 0, "seconds": 0.0}, t_load
    common = dict(batch_size=settings.batch_size, max_seq_len=settings.max_seq_len,
                  max_pixels=settings.max_pixels, resume=resume, checkpoint_every=settings.checkpoint_every,
                  device=device)
    workers, kind = encoding
    if engine != "model":
        warm.steps.wait()  # compiled; no scratch to tune on (the engine plans its memory from what is free)
        taken = _resumed_tuning(resume, done)
        run = run_layerwise(ckpt, processor, samples, observer, dtype=dtype, encode_workers=workers,
                            encode_kind=kind, **common)
        return {**run, **warm.report(), **taken}, t_load
    # the first batches are encoded while the model loads
    with warm.steps.quiet() if kind == "processes" else nullcontext():  # forked between two warm-up steps
        stream = BatchStream(processor, samples[done * settings.batch_size:], settings.batch_size,
                             settings.max_seq_len, settings.max_pixels, ckpt.family, workers=workers,
                             pin=device.startswith("cuda"), kind=kind, pixel_dtype=dtype, model_config=ckpt.config)
    warm.tune(done)
    with stream:
        steps.lap("encoding started")
        model = load_model(ckpt.path, dtype=dtype, device=device, spread=warm.spread)
        found = [layer for layer, _ in ckpt.family.moe_blocks(model)]
        if found != ckpt.moe_layers:
            raise ReapError(f"the model has MoE blocks at layers {found}, but config.json says {ckpt.moe_layers}")
        t_load = steps.lap("model")
        warm.loaded()
        taken = _resumed_tuning(resume, done)
        run = run_batches(model, processor, samples, observer, stream=stream, **common)
        return {**run, "model_load_seconds": steps.seconds["model"], **warm.report(), **taken}, t_load


def _resumed_tuning(resume: ResumeState | None, done: int) -> dict:
    """A resumed run takes the kernel choices its saved sums were made with (over any the warm-up timed), so that
    its norms round as the uninterrupted run's; for ``run``: how many it took."""
    if resume is None or not done:
        return {}
    return {"kernel_choices_resumed": triton_experts.use_tuning(resume.saved_tuning())}


def _run_reap(settings: Settings, dist: DistContext, device: str) -> dict:
    steps = Laps()
    check_criterion(settings)
    ckpt = check_checkpoint_folder(settings.model_path)  # before the calibration is read or a model loaded
    check_output_folder(settings.output_path, "--output", {"model folder": ckpt.path},
                        needed=_output_bytes(ckpt, dist), what="reap.py's output")
    with output_lock(settings.output_path, "--output") if dist.is_main else nullcontext():
        steps.lap("checks")
        return _score_and_write(settings, dist, device, ckpt, steps)


def forward_cost(ckpt: Checkpoint, processor, images: bool) -> ForwardCost:
    """The checkpoint's forward cost per token position and, where the batches hold ``images``, per image token
    (``forward_weights``), times num_experts: a token goes through top_k of the routed experts' weights."""
    weights, experts = forward_weights(ckpt), ckpt.num_experts
    per_position = weights.dense * experts + weights.routed * ckpt.top_k
    if not images:
        return ForwardCost(per_position)
    patches = ckpt.family.vision_merge_size(processor) ** 2
    return ForwardCost(per_position, (weights.vision_patch * patches + weights.vision_token) * experts)


def _order_record(order: BatchOrder, given: BatchOrder, batch_size: int) -> dict:
    """How the batches were formed, for reap_metadata.json's "run": the sort window, the order (calibration
    indices) when sorted, and the padding the estimated lengths give in this order and in the file's."""
    if not order.window:
        return {"sort_window": 0}
    return {"sort_window": order.window, "sample_order": order.indices,
            "padding_share_estimated": round(padding_share(order.lengths, batch_size), 4),
            "padding_share_file_order_estimated": round(padding_share(given.lengths, batch_size), 4)}


def _plan(order: BatchOrder, costs: list[int] | None, settings: Settings, ckpt: Checkpoint,
          dist: DistContext) -> str:
    """A digest of what every torchrun rank's share and sums are formed from: the batch order, the batch size, the
    batches' costs, the world, and the layout of the sums (MoE layers, experts, mode)."""
    return fingerprint(samples=order.indices, batch_size=settings.batch_size, costs=costs, world=dist.world_size,
                       layers=ckpt.moe_layers, experts=ckpt.num_experts, mode=settings.scoring_mode)[:16]


def _check_plans(plans: list[str]) -> None:
    """Every rank formed the same batches and shares, or their sums would count some batches twice and others not
    at all (or not even add up): an error on every rank before anything is scored."""
    if len(set(plans)) > 1:
        raise ReapError(f"the torchrun ranks formed different batches or shares (digests {', '.join(plans)}), so "
                        "their sums cannot be added; give every rank the same settings, calibration file, images and "
                        "model folder, then rerun")


def _rank_record(ranks: list[dict]) -> list[dict]:
    """reap_metadata.json's ``run.ranks``: each rank's load and scoring seconds, batches and tokens, and how long
    after the first rank to start (or finish) scoring it started (finished): a late start is a slow load, a late
    finish without one a slow share; the other ranks wait for the last to finish before the reduce."""
    first = {end: min(r[f"scoring_{end}"] for r in ranks) for end in ("started", "ended")}
    return [{**{k: v for k, v in r.items() if k not in ("scoring_started", "scoring_ended")},
             "started_after_first_s": round(r["scoring_started"] - first["started"], 3),
             "finished_after_first_s": round(r["scoring_ended"] - first["ended"], 3)} for r in ranks]


def _output_bytes(ckpt: Checkpoint, dist: DistContext) -> int:
    """What reap.py writes: metadata (a few numbers per expert), heatmap, saved sums (one set per rank)."""
    cells = len(ckpt.moe_layers) * ckpt.num_experts
    return cells * (400 + 200 * dist.world_size) + (4 << 20)


def _score_and_write(settings: Settings, dist: DistContext, device: str, ckpt: Checkpoint, steps: Laps) -> dict:
    keep = num_to_keep(ckpt.num_experts, settings.prune_ratio, settings.keep_multiple, ckpt.top_k)
    dtype = resolve_dtype(settings.dtype, device)
    engine = choose_engine(ckpt, device, settings.engine)
    with ScoringWarmUp(settings, ckpt, engine, dtype, device, dist) as warm:  # meanwhile, on a side thread
        calib = load_calibration(settings.calibration_path, settings.max_samples, settings.seed,
                                 settings.skip_bad_samples)
        if not ckpt.family.has_vision:
            require_text_only(calib, ckpt.family.name)
        steps.lap("calibration")
        processor = load_processor(ckpt.path)
        encoding = encode_workers(settings, processor, ckpt.family, dtype)
        steps.lap("processor")
        return _score_calibration(settings, dist, device, ckpt, steps, calib, processor, engine, dtype, keep,
                                  encoding, warm)


def _score_calibration(settings: Settings, dist: DistContext, device: str, ckpt: Checkpoint, steps: Laps,
                       calib: CalibrationSet, processor, engine: str, dtype, keep: int,
                       encoding: tuple[int, str], warm: ScoringWarmUp) -> dict:
    stats = ExpertStats.empty(ckpt.moe_layers, ckpt.num_experts, device)
    observer = ReapObserver(ckpt.family, stats, settings.scoring_mode)
    steps.lap("sums on the device")  # on a GPU, after CUDA's start (the warm-up thread's first step)
    order, given = length_order(processor, calib.samples, settings.batch_size, settings.sort_window,
                                settings.max_seq_len, settings.max_pixels, ckpt.family)
    costs = (order.batch_costs(settings.batch_size, forward_cost(ckpt, processor, any(order.image_tokens)))
             if dist.enabled else None)
    share = dist.my_batches(num_batches(order.samples, settings.batch_size), costs)  # balanced by their costs
    samples = samples_of(order.samples, settings.batch_size, share)
    warm.batches(order.batch_tokens(samples, settings.batch_size))
    steps.lap("batch order")
    _check_plans(dist.agree("plan", _plan(order, costs, settings, ckpt, dist)))  # before anything is scored
    resume = _resume_state(settings, ckpt, calib, order, dtype, dist, share)
    steps.lap("resume identity")  # the shards' headers hashed
    run, t_load = _score(settings, ckpt, processor, observer, samples, resume, engine, dtype, device, dist,
                         encoding, warm, steps)
    t0 = steps.start
    t_score = time.perf_counter()
    ended = time.time()
    ranks = dist.all_reduce(stats, {"load": round(t_load - t0, 3), "scoring": round(t_score - t_load, 3),
                                    "scoring_started": ended - (t_score - t_load), "scoring_ended": ended,
                                    "batches": len(share), "load_steps": steps.seconds,
                                    "scoring_steps": run.get("scoring_steps", {}),
                                    "tokens": run.get("tokens_this_run", 0)})
    run.update(_order_record(order, given, settings.batch_size), load_steps=steps.seconds)
    if ranks:
        run["ranks"] = _rank_record(ranks)

    metrics = stats.metrics(settings.scoring_mode)
    check_finite(metrics, dtype)
    kept, safeguards = select_for_run(settings, metrics, ckpt.moe_layers, keep, stats.n_tokens, stats.n_image_tokens,
                                      ckpt.config)
    metadata = build_metadata(RunInputs(ckpt, calib, settings, dtype, keep), metrics, kept, stats.n_tokens,
                              stats.n_image_tokens, {**run, "engine": engine, "world_size": dist.world_size,
                                                     **({"first_collective": dist.first_collective}
                                                        if dist.enabled else {})},
                              {"load": t_load - t0, "scoring": t_score - t_load,
                               "reduce": time.perf_counter() - t_score, "total": time.perf_counter() - t0})
    metadata.update(safeguards)
    if last_batch(run["resumed_from"], run["batches"]) < run["batches"]:
        return metadata  # simulated kill: state saved, nothing final written
    if not dist.is_main:
        return metadata
    out = Path(settings.output_path)
    out.mkdir(parents=True, exist_ok=True)
    write_metadata(out, metadata)
    if metadata["calibration_coverage"]["warning"]:
        warnings.warn(metadata["calibration_coverage"]["warning"], stacklevel=2)
    write_heatmap(out / "reap_heatmap.png", metrics[settings.criterion], ckpt.moe_layers, kept, settings.criterion,
                  marked=(metadata["super_experts"] or {}).get("experts"))
    return metadata
