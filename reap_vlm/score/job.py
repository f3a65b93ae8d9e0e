"""reap.py's work: calibration -> scores -> kept experts -> reap_metadata.json."""

from __future__ import annotations

import math
import time
from pathlib import Path

from ..calibration.encode import num_batches
from ..calibration.files import load_calibration
from ..checkpoint.loading import load_model, load_processor, resolve_device, resolve_dtype
from ..checkpoint.reader import Checkpoint
from ..errors import ReapError
from ..metadata import METHODOLOGY, REAP_VERSION, write_metadata
from ..selection import num_to_keep, select_experts
from ..settings import Settings
from .distributed import DistContext
from .engine import run_batches
from .hooks import ReapObserver
from .layerwise import choose_engine, run_layerwise
from .report import write_heatmap
from .resume import STATE_NAME, ResumeState, files_signature, fingerprint
from .stats import METRICS_BY_MODE, ExpertStats


def check_criterion(settings: Settings) -> None:
    if settings.scoring_mode == "router" and not settings.explicitly_set("criterion"):
        settings.criterion = "frequency"  # the default (reap) needs expert outputs router mode does not compute
    if settings.criterion not in METRICS_BY_MODE[settings.scoring_mode]:
        raise ReapError(f"--criterion {settings.criterion} needs expert outputs that --mode "
                        f"{settings.scoring_mode} does not compute; use one of "
                        f"{', '.join(METRICS_BY_MODE[settings.scoring_mode])}")


def run_reap(settings: Settings, stop_after: int | None = None) -> dict:
    """Score, select, and (on rank 0) write reap_metadata.json + heatmap; return the metadata."""
    dist = DistContext.from_env()
    device = dist.device(resolve_device(settings.device))
    dist.start(device)
    try:
        metadata = _run_reap(settings, dist, device, stop_after)
    except BaseException:
        dist.stop(ok=False)
        raise
    dist.stop()
    return metadata


def _run_reap(settings: Settings, dist: DistContext, device: str, stop_after: int | None) -> dict:
    t0 = time.perf_counter()
    check_criterion(settings)
    ckpt = Checkpoint(settings.model_path)
    family = ckpt.family
    keep = num_to_keep(ckpt.num_experts, settings.prune_ratio, settings.keep_multiple, ckpt.top_k)
    calib = load_calibration(settings.calibration_path, settings.max_samples, settings.seed,
                             settings.skip_bad_samples)
    dtype = resolve_dtype(settings.dtype, device)
    processor = load_processor(ckpt.path)
    engine = choose_engine(ckpt, device, settings.engine)
    moe_layers = ckpt.moe_layers
    stats = ExpertStats.empty(moe_layers, ckpt.num_experts, device)
    observer = ReapObserver(family, stats, settings.scoring_mode)
    resume = None
    if settings.resume:
        inputs = [p for sample in calib.samples for p in sample.images] + [
            p for p in Path(ckpt.path).iterdir() if p.suffix in (".json", ".jinja", ".txt")
            and not p.name.startswith("model.safetensors")]
        key = fingerprint(config=ckpt.config, calibration=calib.digest, files=files_signature(inputs),
                          version=REAP_VERSION, samples=[s.index for s in calib.samples], mode=settings.scoring_mode,
                          batch_size=settings.batch_size, max_seq_len=settings.max_seq_len,
                          max_pixels=settings.max_pixels, seed=settings.seed, dtype=str(dtype),
                          model=str(Path(ckpt.path).resolve()), rank=dist.rank, world_size=dist.world_size)
        name = STATE_NAME if not dist.enabled else f"reap_state.rank{dist.rank}-of-{dist.world_size}.pt"
        resume = ResumeState(Path(settings.output_path) / name, key)
    my_samples = dist.my_samples(calib.samples, settings.batch_size)
    total = num_batches(my_samples, settings.batch_size)
    t_load = time.perf_counter()
    if resume is not None and resume.load(stats) >= total:
        # scored before with these inputs (e.g. rerun for another --prune-ratio): select again, load nothing
        run = {"batches": total, "resumed_from": total, "tokens_this_run": 0, "seconds": 0.0}
    else:
        common = dict(batch_size=settings.batch_size, max_seq_len=settings.max_seq_len,
                      max_pixels=settings.max_pixels, resume=resume, checkpoint_every=settings.checkpoint_every,
                      device=device, stop_after=stop_after)
        if engine == "model":
            model = load_model(ckpt.path, dtype=dtype, device=device, spread=not dist.enabled)
            found = [layer for layer, _ in family.moe_blocks(model)]
            if found != moe_layers:
                raise ReapError(f"the model has MoE blocks at layers {found}, but config.json says {moe_layers}")
            t_load = time.perf_counter()
            run = run_batches(model, processor, my_samples, observer, **common)
        else:
            run = run_layerwise(ckpt, processor, my_samples, observer, dtype=dtype, **common)
    dist.all_reduce(stats)
    t_score = time.perf_counter()

    metrics = stats.metrics(settings.scoring_mode)
    bad = [name for name, rows in metrics.items() if not all(math.isfinite(v) for row in rows for v in row)]
    if bad:
        raise ReapError(f"non-finite scores ({', '.join(bad)}): expert outputs overflowed in {dtype}; "
                        "rerun with --dtype bfloat16 or float32")
    kept = select_experts(metrics, moe_layers, settings.criterion, keep)
    n_tokens, n_image = stats.n_tokens, stats.n_image_tokens
    metadata = {
        "reap_version": REAP_VERSION,
        "methodology": METHODOLOGY,
        "model_path": str(ckpt.path),
        "model_type": ckpt.config.get("model_type"),
        "num_experts": ckpt.num_experts,
        "top_k": ckpt.top_k,
        "moe_layers": moe_layers,
        "scoring_mode": settings.scoring_mode,
        "criterion": settings.criterion,
        "prune_ratio": settings.prune_ratio,
        "keep_multiple": settings.keep_multiple,
        "num_experts_to_keep": keep,
        "num_samples": len(calib.samples),
        "num_skipped_samples": len(calib.skipped),
        "skipped_samples": calib.skipped,
        "calibration_path": str(calib.path),
        "calibration_samples": [s.index for s in calib.samples],
        "num_tokens": {"total": n_tokens, "text": n_tokens - n_image, "image": n_image},
        "dtype": str(dtype).removeprefix("torch."),
        "experts_to_keep": {str(layer): ids for layer, ids in kept.items()},
        "mean_scores": metrics[settings.criterion],
        "metrics": metrics,
        "run": {**run, "engine": engine, "world_size": dist.world_size},
        "timings": {"load": t_load - t0, "scoring": t_score - t_load, "total": time.perf_counter() - t0},
    }
    if stop_after is not None and run["resumed_from"] + stop_after < run["batches"]:
        return metadata  # simulated kill: state saved, nothing final written
    if not dist.is_main:
        return metadata
    out = Path(settings.output_path)
    out.mkdir(parents=True, exist_ok=True)
    write_metadata(out, metadata)
    write_heatmap(out / "reap_heatmap.png", metrics[settings.criterion], moe_layers, kept, settings.criterion)
    return metadata
