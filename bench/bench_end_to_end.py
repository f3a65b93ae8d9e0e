"""End-to-end REAP scoring throughput (issue 18): reap.py's phases against forwards over pre-encoded batches.

Run on the GPU machine from the repository root (one GPU, or two for the torchrun rows):

    PYTHONUNBUFFERED=1 python3 bench/bench_end_to_end.py --out $OUT            # about 9 device-minutes
    python3 bench/bench_end_to_end.py --tiny --out /tmp/e2e                     # CPU, tiny shapes, < 2 min

What it builds (in ``--workdir``, reused when present): a Qwen3-VL-30B-A3B-shaped checkpoint with ``--layers``
full-width MoE decoder layers (hidden 2048, expert intermediate 768, 128 experts top-8, 32 heads / 4 KV,
head_dim 128, random bf16 weights through the fixture builders: ``fixture_config``, ``to_checkpoint_layout``,
``write_sharded_safetensors``) and the real vision tower's size (27 blocks, hidden 1152, deepstack after 8/16/24;
``--vision reduced``: 4 blocks), the real processor sizing (images up to 16.8 MP before the sequence budget);
two calibration sets like a user's: text-heavy (90% plain texts of 100-2,000 tokens, 10% photos) and
image-heavy (every item a 1-4 MP JPEG photo plus a question).

What it times, per set:

* reap.py routed and full, a subprocess each as a user runs it (``--engine model``, defaults for encoding ahead and
  length sorting: auto's kind of worker; one GPU: ``CUDA_VISIBLE_DEVICES=0``): its phases from reap_metadata.json
  (load, scoring, reduce), the encoding time summed over the workers and the part the forward waited for, when the
  first batch was ready, the padding share; on both sets also routed with the kind of worker auto does not pick
  (``--other-kind``: threads, where /dev/shm has room for processes);
  ``--inline``: also routed with ``--encode-workers 0 --sort-window 0`` (the behaviour before issue 18);
* the baselines in this process over the same batches, encoded beforehand into pinned memory (pixels in the
  model's dtype, as reap.py's workers give them), with reap.py's attention kernels (reap_vlm/inference.py): the
  plain model forward (no hooks), the full observer (``--observer-modes``: the routed one too); warm (one batch
  first), the first batch's extra time apart; and the plain forward with PyTorch's default kernels (cuDNN's
  attention allowed) on a second pass, its plans all built;
* ``--encode-rates``: the encoding rate of 1 thread, N threads and N processes (``BatchStream``'s, start-up
  apart) on the image-heavy set, and the processor's image preprocessing on the CPU against ``device="cuda"``
  (transformers' torchvision backend); measured in round 1, off by default;
* with two GPUs visible: reap.py under ``torchrun --nproc-per-node 2`` in both modes, its speed-up over one GPU
  (one GPU's scoring + reduce over the slowest rank's scoring + the reduce's own time, from ``run.ranks``; in
  brackets over the first rank's start of scoring to the last one's end, and over rank 0's scoring + reduce, whose
  wait for the other rank also holds the ranks' start skew) and its scores against the one-GPU run's;
* ``--rank-shares N`` (where fewer than two GPUs are visible): each of N torchrun ranks' shares, formed as reap.py
  forms them (length order, batch costs, ``balanced_shares``), written as a calibration file of its own in that
  order and scored alone on one GPU (a fresh reap.py each, ``--sort-window 0``: the file's order, so the rank's
  batches). Their frequencies must add up to the whole set's, exactly (the same samples scored); the whole set's
  scoring over the slowest share's is the speed-up N GPUs would give if each rank ran as it does alone (no NCCL, no
  second process on the host). A prediction, not the two-GPU measurement; for routed mode (a full-mode share would
  tune its kernels at the largest batch only: without a sort window no lengths are estimated). The bench's sets
  hold texts and chat items, encoded alike at any index (a grounding item's region and template are drawn by its
  index, which a share file changes).

Targets (issue 18): routed scoring <= 1.1x the plain forward, full scoring <= 1.1x the full observer, on both
sets; two GPUs >= 1.9x one.  The ratio is given twice: against the warm baseline, and against the baseline with
its first batch cold (as reap.py's scoring phase runs it).  Every phase is skipped, and said so, once
``--max-minutes`` would be passed; the order is the image set's runs and baselines, the text set's, then the
2-GPU runs, then the other kind of worker, then the extras.
Writes ``RESULTS_end_to_end.md`` and ``.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reap_vlm.calibration.ahead import BatchStream, default_workers, shm_free_bytes  # noqa: E402
from reap_vlm.calibration.encode import encode_batch, open_image, to_model  # noqa: E402
from reap_vlm.calibration.files import load_calibration  # noqa: E402
from reap_vlm.calibration.order import length_order  # noqa: E402
from reap_vlm.checkpoint.loading import load_model, load_processor  # noqa: E402
from reap_vlm.checkpoint.reader import Checkpoint  # noqa: E402
from reap_vlm.fixtures.tiny import (  # noqa: E402
    FixtureSpec,
    fixture_config,
    write_processor_files,
    write_sharded_safetensors,
    write_tokenizer,
)
from reap_vlm.inference import inference  # noqa: E402
from reap_vlm.score.distributed import balanced_shares, samples_of  # noqa: E402
from reap_vlm.score.hooks import ReapObserver, TokenMasks  # noqa: E402
from reap_vlm.score.job import forward_cost  # noqa: E402
from reap_vlm.score.stats import ExpertStats  # noqa: E402

SHAPE_30B = dict(hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144, num_attention_heads=32,
                 num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8)
VISION = {  # Qwen3-VL-30B-A3B's vision tower, and a 4-block one of the same width
    "full": dict(vision_depth=27, vision_hidden_size=1152, vision_intermediate_size=4304, vision_heads=16,
                 deepstack_visual_indexes=(8, 16, 24), num_position_embeddings=2304),
    "reduced": dict(vision_depth=4, vision_hidden_size=1152, vision_intermediate_size=4304, vision_heads=16,
                    deepstack_visual_indexes=(1, 2), num_position_embeddings=2304),
}
REAL_IMAGE_SIZE = {"shortest_edge": 65536, "longest_edge": 16777216}  # Qwen3-VL's preprocessor_config.json
WORDS = ("the of and to in is was for on that with as by at from this be are an which or have it not had his "
         "but were they all one their has been more there when some would what about time who into only other "
         "image model expert router token layer picture photo street river mountain city window light shadow "
         "person table chair dog cat tree car road building sky cloud water green blue red yellow small large "
         "left right above below near far inside outside describe count find where how many colour shape").split()
QUESTIONS = ("Describe this photo in detail.", "How many people are in the picture?", "What is on the left side?",
             "Find the bounding box of the red car.", "Is it day or night? Explain.", "Read any text you can see.")

T0 = time.perf_counter()


def log(*parts) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s]", *parts, flush=True)


class Clock:
    """The run's time budget: a phase starts only when its estimate fits in what is left."""

    def __init__(self, minutes: float):
        self.end = T0 + 60 * minutes
        self.skipped: list[str] = []

    def left(self) -> float:
        return self.end - time.perf_counter()

    def allows(self, what: str, estimate_s: float) -> bool:
        if self.left() >= estimate_s:
            return True
        self.skipped.append(f"{what} (needs ~{estimate_s:.0f}s, {max(self.left(), 0):.0f}s left)")
        log("skipped:", self.skipped[-1])
        return False


# ----------------------------------------------------------------------------------------------- inputs


def spec_for(args) -> FixtureSpec:
    if args.tiny:
        return FixtureSpec(num_hidden_layers=args.layers, dtype="bfloat16", num_shards=1)
    return FixtureSpec(**SHAPE_30B, **VISION[args.vision], num_hidden_layers=args.layers, dtype="bfloat16")


def random_state(config: dict, device: str) -> dict[str, torch.Tensor]:
    """Every tensor of the model described by ``config``, random (norms 1, biases 0, router std 0.05, else
    std 0.02), bf16 on the CPU, drawn on ``device``."""
    from accelerate import init_empty_weights
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    with init_empty_weights():
        skeleton = Qwen3VLMoeForConditionalGeneration(Qwen3VLMoeConfig(**config))
    gen = torch.Generator(device).manual_seed(0)
    state = {}
    for name, meta in skeleton.state_dict().items():
        if name.endswith("bias"):
            t = torch.zeros(meta.shape, device=device)
        elif "norm" in name:
            t = torch.ones(meta.shape, device=device)
        else:
            t = torch.randn(meta.shape, device=device, generator=gen) * (0.05 if name.endswith("mlp.gate.weight")
                                                                         else 0.02)
        state[name] = t.to(torch.bfloat16).cpu()
    return state


def write_processor(folder: Path, tiny: bool) -> dict[str, int]:
    """Tokenizer and processor files (the real processor's image sizing unless ``tiny``); the tokenizer's ids."""
    token_ids = write_tokenizer(folder)
    write_processor_files(folder)
    if not tiny:  # the real processor's sizing: a 4 MP photo is ~4,000 tokens before the sequence budget
        pre = json.loads((folder / "preprocessor_config.json").read_text())
        pre["size"] = REAL_IMAGE_SIZE
        (folder / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    return token_ids


def write_model(folder: Path, spec: FixtureSpec, tiny: bool, device: str) -> Path:
    from reap_vlm.families import QWEN3_VL_MOE

    stamp = json.dumps({"spec": repr(spec), "tiny": tiny})
    if (folder / "DONE").is_file() and (folder / "DONE").read_text() == stamp:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    token_ids = write_processor(folder, tiny)
    config = fixture_config(spec, token_ids)
    if spec.head_dim == 128:
        config["text_config"]["rope_scaling"]["mrope_section"] = [24, 20, 20]  # Qwen3-VL-30B-A3B's
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": token_ids["<|im_end|>"],
                                                               "pad_token_id": token_ids["<|endoftext|>"]}))
    state = QWEN3_VL_MOE.to_checkpoint_layout(random_state(config, device), per_expert=False)
    write_sharded_safetensors(folder, state, max_shard_bytes=2 << 30)
    (folder / "DONE").write_text(stamp)
    return folder


def _photo(path: Path, megapixels: float, seed: int) -> None:
    """A JPEG that decodes like a photo: smooth colour fields, edges and grain."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = random.Random(seed)
    aspect = rng.choice((4 / 3, 3 / 2, 16 / 9, 1.0, 3 / 4))
    width = int(math.sqrt(megapixels * 1e6 * aspect))
    height = int(megapixels * 1e6 / width)
    base = Image.frombytes("RGB", (8, 6), bytes(rng.randrange(256) for _ in range(8 * 6 * 3)))
    image = base.resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(30):
        x, y = rng.randrange(width), rng.randrange(height)
        draw.ellipse([x, y, x + rng.randrange(width // 4 + 1), y + rng.randrange(height // 4 + 1)],
                     fill=tuple(rng.randrange(256) for _ in range(3)))
    image = image.filter(ImageFilter.GaussianBlur(2))
    grain = Image.effect_noise((width, height), 12).convert("RGB")
    Image.blend(image, grain, 0.08).save(path, quality=88)


def write_calibration(folder: Path, kind: str, n: int, megapixels: tuple[float, float], seed: int = 0) -> Path:
    """``kind`` "text" (90% texts of 100-2,000 tokens, 10% photos) or "image" (every item a photo + question)."""
    path = folder / f"{kind}.json"
    stamp = folder / f"{kind}.DONE"
    key = json.dumps([n, megapixels, seed])
    if stamp.is_file() and stamp.read_text() == key:
        return path
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{kind}:{seed}")
    items, photos = [], []
    for i in range(n):
        if kind == "image" or rng.random() < 0.1:
            rel = f"images/{kind}-{i:05d}.jpg"
            photos.append((folder / rel, rng.uniform(*megapixels), rng.randrange(1 << 30)))
            items.append({"messages": [{"role": "user", "content": [{"type": "image", "image": rel},
                                                                    {"type": "text", "text": rng.choice(QUESTIONS)}]}]})
        else:
            words = rng.randint(40, 800)  # the fixture tokenizer gives about 2.5 tokens per word
            items.append({"text": " ".join(rng.choice(WORDS) for _ in range(words)) + "."})
    with ThreadPoolExecutor(max(1, min(16, os.cpu_count() or 1))) as pool:  # Pillow releases the GIL
        list(pool.map(lambda p: _photo(*p), photos))
    path.write_text(json.dumps(items))
    stamp.write_text(key)
    return path


# ----------------------------------------------------------------------------------------------- reap.py runs


def reap_run(args, model: Path, calib: Path, mode: str, gpus: int, clock: Clock, extra=()) -> dict | None:
    """reap.py as a user runs it; its phases from reap_metadata.json."""
    out = Path(args.workdir) / "runs" / f"{calib.stem}-{mode}-{gpus}gpu-{time.time_ns()}"
    cmd = [str(ROOT / "reap.py"), "--model", str(model), "--calibration", str(calib), "--output", str(out),
           "--mode", mode, "--batch-size", str(args.batch_size), "--max-samples", str(args.set_samples[calib.stem]),
           "--max-seq-len", str(args.max_seq_len), "--prune-ratio", "0.5", "--engine", "model", "--no-resume",
           "--device", args.device, "--dtype", args.dtype, *extra]
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    if gpus > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={gpus}",
                    "--master-addr=127.0.0.1", "--master-port=29533"]
    else:
        launcher = [sys.executable]
        if args.device == "cuda":
            env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    t0 = time.perf_counter()
    try:
        result = subprocess.run(launcher + cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                                timeout=max(10, clock.left()))
    except subprocess.TimeoutExpired:
        clock.skipped.append(f"reap.py {mode} {calib.stem} {gpus} GPU: cut at the time limit")
        return None
    wall = time.perf_counter() - t0
    if result.returncode != 0:
        log(f"reap.py failed ({mode}, {calib.stem}, {gpus} GPU):", result.stderr[-2000:])
        return None
    meta = json.loads((out / "reap_metadata.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    run, t = meta["run"], meta["timings"]
    return {"wall_s": wall, "load_s": t["load"], "scoring_s": t["scoring"], "reduce_s": t.get("reduce", 0.0),
            "encode_cpu_s": run.get("encode_seconds"), "encode_wait_s": run.get("encode_wait_seconds"),
            "encode_first_wait_s": run.get("encode_first_wait_seconds", 0.0),
            "encode_first_ready_s": run.get("encode_first_ready_seconds", 0.0),
            "encode_workers": run.get("encode_workers"), "encode_kind": run.get("encode_kind"),
            "padding_share": run.get("padding_share"),
            "padding_file_order": run.get("padding_share_file_order_estimated"),
            "tokens": meta["num_tokens"]["total"], "image_tokens": meta["num_tokens"]["image"],
            "reap": meta["metrics"]["reap"], "frequency": meta["metrics"]["frequency"],
            "keep": meta["experts_to_keep"], "warm_up": run.get("warm_up"),
            "model_load_s": run.get("model_load_seconds"), "ranks": run.get("ranks"),
            "load_steps": run.get("load_steps"), "scoring_steps": run.get("scoring_steps"),
            "first_batch_device_s": run.get("first_batch_device_seconds")}


def share_files(args, model: Path, calib: Path, world: int) -> list[Path]:
    """Each of ``world`` torchrun ranks' samples, as reap.py forms its share (its default sort window, the batch
    costs, ``balanced_shares``), written in that order as a calibration file beside ``calib`` (the images' paths
    stay valid); ``args.set_samples`` gets each file's count."""
    ckpt, processor = Checkpoint(model), load_processor(model)
    order = reap_order(processor, calib, args.set_samples[calib.stem], args, ckpt.family)
    costs = order.batch_costs(args.batch_size, forward_cost(ckpt, processor, any(order.image_tokens)))
    items = json.loads(calib.read_text())
    files = []
    for rank, share in enumerate(balanced_shares(costs, world)):
        indices = samples_of(order.indices, args.batch_size, share)
        path = calib.with_name(f"{calib.stem}-rank{rank}of{world}.json")
        path.write_text(json.dumps([items[i] for i in indices]))
        args.set_samples[path.stem] = len(indices)
        files.append(path)
    return files


def share_name(mode: str, rank: int, world: int) -> str:
    return f"{mode} share {rank} of {world}"


def shares_added(one: dict, shares: list[dict]) -> bool:
    """The shares' per-expert frequencies add up to the whole run's, exactly: they scored the same samples (the
    batches are the rank's by construction: ``share_files`` writes them in order, reap.py keeps it)."""
    added = [[sum(column) for column in zip(*rows)] for rows in zip(*(r["frequency"] for r in shares))]
    return added == one["frequency"]


def predicted(runs: dict, modes: list[str], repeats: int, world: int) -> list[dict]:
    """Per mode and repeat: the whole set's scoring over the slowest of its ``world`` shares', each scored alone on
    one GPU, and whether their frequencies add up to the whole run's."""
    found = []
    for mode, turn in itertools.product(modes, range(repeats)):
        one = runs.get(repeat_name(mode, turn))
        shares = [runs.get(repeat_name(share_name(mode, r, world), turn)) for r in range(world)]
        if one and all(shares):
            scored = [r["scoring_s"] for r in shares]
            found.append({"run": repeat_name(mode, turn), "speed_up": round(one["scoring_s"] / max(scored), 3),
                          "shares_scoring_s": scored, "add_up": shares_added(one, shares)})
    return found


# ----------------------------------------------------------------------------------------------- baselines


def pre_encode(processor, samples, args, family, workers: int, pin: bool, model_config: dict | None,
               max_pixels: int = 0) -> tuple[list[dict], float, float]:
    """The batches as reap.py's stream gives them (with the inputs computed on the host, given the config): the
    batches, the wall seconds and the encoding seconds summed over the ``workers`` threads."""
    t0 = time.perf_counter()
    with BatchStream(processor, samples, args.batch_size, args.max_seq_len, max_pixels, family, workers=workers,
                     pin=pin, pixel_dtype=getattr(torch, args.dtype), model_config=model_config,
                     same_size_buffers=False) as stream:  # every batch kept: each pinned at its own size
        batches = list(stream)
    return batches, time.perf_counter() - t0, stream.encode_seconds


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def forward_batches(model, family, batches: list[dict], device: str, observer: ReapObserver | None = None) -> None:
    """The model's forward over ``batches`` as the engine runs it: masks from the host copy, copies from pinned
    memory without blocking (the caller attaches ``observer``)."""
    base = family.multimodal_model(model)
    for batch in batches:
        masks = TokenMasks.of(batch["attention_mask"], family.visual_token_mask(batch["input_ids"], model.config))
        batch = to_model(batch, device, model.dtype, non_blocking=True, host=family.host_side(batch, model))
        if observer is not None:
            observer.use_masks(masks.to(device))
        base(**batch, use_cache=False)


@contextmanager
def encoding_beside(stream_args: tuple, workers: int, kind: str, pixel_dtype, pin: bool, model_config: dict):
    """Within the block, ``workers`` encoding workers of ``kind`` encode ``stream_args``' samples on the side, as
    reap.py's do beside its loop, their batches thrown away; yields their ``BatchStream``."""
    stop = threading.Event()
    with BatchStream(*stream_args, workers=workers, kind=kind, pin=pin, pixel_dtype=pixel_dtype,
                     model_config=model_config) as stream:
        next(stream)  # the workers are running

        def drain() -> None:
            for _ in stream:
                if stop.is_set():
                    break

        drainer = threading.Thread(target=drain)
        drainer.start()
        try:
            yield stream
        finally:
            stop.set()
            drainer.join()


def timed_forwards(model, family, batches: list[dict], device: str) -> list[float]:
    """Seconds of each batch's forward (``forward_batches``, reap.py's kernels), synchronized one by one."""
    times = []
    with inference():
        for batch in batches:
            t0 = time.perf_counter()
            forward_batches(model, family, [batch], device)
            sync(device)
            times.append(time.perf_counter() - t0)
    return times


def forward_over(model, family, batches: list[dict], device: str, observer: ReapObserver | None,
                 passes: int = 1, kernels=inference) -> tuple[float, float]:
    """Seconds for the model's forward over ``batches`` (copied from pinned memory as the engine does), warm, and
    seconds of the warming call (the first batch, once more); ``passes`` > 1: the last of as many passes over all
    (the earlier ones warm every length); ``kernels``: reap.py's (no cuDNN attention) or PyTorch's default."""

    def timed() -> tuple[float, float]:
        t0 = time.perf_counter()
        # warm: kernels chosen and tuned once (reap.py's scoring phase holds this too)
        forward_batches(model, family, batches[:1], device, observer)
        sync(device)
        for _ in range(passes):
            t1 = time.perf_counter()
            forward_batches(model, family, batches, device, observer)
            sync(device)
        return time.perf_counter() - t1, t1 - t0

    if observer is None:
        with kernels():
            return timed()
    with observer.attached(family.moe_blocks(model)), kernels():  # as the engine nests them
        return timed()


def baselines(args, model_dir: Path, calib: Path, modes: list[str], clock: Clock) -> dict:
    ckpt = Checkpoint(model_dir)
    processor = load_processor(model_dir)
    order = reap_order(processor, calib, args.set_samples[calib.stem], args, ckpt.family)
    cuda = args.device == "cuda"
    batches, wall, cpu = pre_encode(processor, order.samples, args, ckpt.family, default_workers(), cuda,
                                    ckpt.config)
    res = {"pre_encode_wall_s": wall, "pre_encode_cpu_s": cpu, "encode_threads": default_workers(),
           "tokens": sum(int(b["attention_mask"].sum()) for b in batches), "batches": len(batches)}
    log(f"  pre-encoded {len(batches)} batches: {wall:.1f}s wall, {cpu:.1f}s summed over threads")
    model = load_model(model_dir, dtype=getattr(torch, args.dtype), device=args.device)
    res["plain_forward_s"], res["plain_warmup_s"] = forward_over(model, ckpt.family, batches, args.device, None)
    log(f"  plain forward {res['plain_forward_s']:.2f}s (+{res['plain_warmup_s']:.2f}s first batch)")
    if clock.allows(f"plain forward with PyTorch's default kernels on {calib.stem}", 3 * res["plain_forward_s"]):
        res["plain_default_kernels_s"], _ = forward_over(model, ckpt.family, batches, args.device, None, passes=2,
                                                         kernels=torch.inference_mode)
        log(f"  plain forward, PyTorch's default kernels (cuDNN attention allowed), second pass "
            f"{res['plain_default_kernels_s']:.2f}s")
    for mode in modes:
        if not clock.allows(f"{mode} observer baseline on {calib.stem}", 1.5 * res["plain_forward_s"] * (
                3 if mode == "full" else 1)):
            continue
        stats = ExpertStats.empty(ckpt.moe_layers, ckpt.num_experts, args.device)
        res[f"{mode}_observer_s"], res[f"{mode}_warmup_s"] = forward_over(
            model, ckpt.family, batches, args.device, ReapObserver(ckpt.family, stats, mode))
        log(f"  {mode} observer {res[f'{mode}_observer_s']:.2f}s (+{res[f'{mode}_warmup_s']:.2f}s first batch)")
    del model, batches
    if cuda:
        torch.cuda.empty_cache()
    return res


# ----------------------------------------------------------------------------------------------- encoding


def encode_rates(args, model_dir: Path, calib: Path, workers: int) -> dict:
    """Encoding time of the image samples on 1 thread, ``workers`` threads and ``workers`` processes (reap.py's
    BatchStream each, pixels cast as reap.py does); the processes' time to their first batch (start-up) too."""
    processor = load_processor(model_dir)
    samples = load_calibration(calib, args.encode_samples).samples
    res = {"samples": len(samples), "workers": workers}
    encode_batch(processor, samples[:1], args.max_seq_len)  # warm: the processor's first call imports and compiles
    for name, n, kind in (("serial", 0, "threads"), ("threads", workers, "threads"),
                          ("processes", workers, "processes")):
        t0 = time.perf_counter()
        with BatchStream(processor, samples, args.batch_size, args.max_seq_len, 0, None, workers=n, kind=kind,
                         pixel_dtype=getattr(torch, args.dtype)) as stream:
            for i, _ in enumerate(stream):
                if i == 0:
                    res[f"{name}_first_s"] = time.perf_counter() - t0
        res[f"{name}_s"] = time.perf_counter() - t0
    log("  encoding {samples} image samples: serial {serial_s:.1f}s, {workers} threads {threads_s:.1f}s, "
        "{workers} processes {processes_s:.1f}s ({processes_first_s:.1f}s to the first batch)".format(**res))
    return res


def gpu_preprocessing(model_dir: Path, calib: Path, n: int) -> dict:
    """The processor's image preprocessing (resize, rescale, normalize, patchify) on the CPU and with
    device="cuda" (transformers' torchvision backend), decoded images given."""
    processor = load_processor(model_dir)
    samples = load_calibration(calib, n).samples
    images = [open_image(p, 0) for s in samples for p in s.images]
    res = {"images": len(images)}
    for device in ("cpu", "cuda"):
        processor.image_processor(images=images[:1], device=device, return_tensors="pt")  # warm
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for image in images:
            out = processor.image_processor(images=[image], device=device, return_tensors="pt")
        torch.cuda.synchronize()
        res[f"{device}_s"] = time.perf_counter() - t0
        res[f"{device}_pixel_device"] = str(out["pixel_values"].device)
    log(f"  image preprocessing of {len(images)} photos: cpu {res['cpu_s']:.2f}s, cuda {res['cuda_s']:.2f}s")
    return res


# ----------------------------------------------------------------------------------------------- report


def max_rel(a: list[list[float]], b: list[list[float]]) -> float:
    worst = 0.0
    for ra, rb in zip(a, b):
        for x, y in zip(ra, rb):
            worst = max(worst, abs(x - y) / max(abs(x), 1e-30))
    return worst


def _ratios(r: dict, base: dict, ref_key: str) -> str:
    """reap.py's scoring per token over the baseline's: warm, and with the baseline's first batch cold (reap.py's
    scoring phase holds its own cold first batch)."""
    ref, extra = base.get(ref_key + "_s"), base.get(ref_key.split("_")[0] + "_warmup_s")
    if not ref:
        return ""
    per_token = r["scoring_s"] / r["tokens"]
    warm = ref / base["tokens"]
    text = f"{per_token / warm:.2f}x"
    if extra is not None:  # the warm-up call ran the first batch cold: one warm batch of it is in ``ref``
        cold = (ref + extra - ref / base["batches"]) / base["tokens"]
        text += f" ({per_token / cold:.2f}x)"
    return text


def repeat_name(name: str, turn: int) -> str:
    """A run's name in the results: the first of a kind plain, the n-th repeat with " #n"."""
    return name if turn == 0 else f"{name} #{turn + 1}"


def spread(results: dict) -> list[str]:
    """One line per set and run repeated (``--repeats``): its target ratios or speed-ups, lowest to highest."""
    lines = []
    for name, s in results["sets"].items():
        groups: dict[str, list[str]] = {}
        for run_name, r in s.get("runs", {}).items():
            if r is not None:
                groups.setdefault(run_name.split(" #")[0], []).append(run_name)
        for group, names in groups.items():
            if len(names) < 2:
                continue
            if " 2gpu" in group:
                one = s["runs"].get(group.removesuffix(" 2gpu"))
                figures = [speed_up(one, s["runs"][n]).split("x")[0].strip("*") + "x" for n in names] if one else []
            else:
                ref = "plain_forward" if group.startswith("routed") else "full_observer"
                figures = [_ratios(s["runs"][n], s.get("baselines", {}), ref).split(" ")[0] for n in names]
            figures = [f for f in figures if f not in ("", "x")]  # no baseline to compare with
            if figures:
                figures.sort(key=lambda f: float(f.rstrip("x")))
                lines.append(f"- {name}, {group}, {len(names)} runs: {', '.join(figures)}")
    return ["", "Repeated runs (target ratio or speed-up, lowest to highest):", *lines] if lines else []


def speed_up(one: dict, many: dict) -> str:
    """One GPU's (scoring + reduce) over the ranks': the slowest rank's scoring plus the reduce's own time (rank 0's
    reduce less its wait for the last rank); in brackets over the span from the first rank's start of scoring to
    the last one's end (the ranks' start skew in it) plus the reduce's own time, and over rank 0's scoring +
    reduce; then each rank's scoring seconds and start after the first."""
    single = one["scoring_s"] + one["reduce_s"]
    whole = f"{single / (many['scoring_s'] + many['reduce_s']):.2f}x"
    ranks = many.get("ranks")
    if not ranks:  # a reap.py that did not record them
        return whole
    waited = max(r["finished_after_first_s"] for r in ranks) - ranks[0]["finished_after_first_s"]
    own_reduce = max(many["reduce_s"] - waited, 0.0)
    slowest = max(r["scoring"] for r in ranks)
    span = max(r.get("started_after_first_s", 0.0) + r["scoring"] for r in ranks)
    scored = " / ".join(f"{r['scoring']:.2f}" for r in ranks)
    started = " / ".join(f"{r.get('started_after_first_s', 0.0):.2f}" for r in ranks)
    return (f"**{single / (slowest + own_reduce):.2f}x** (first start to last end {single / (span + own_reduce):.2f}x, "
            f"rank 0 {whole}), ranks scored {scored} s, started {started} s after the first")


def predictions(results: dict) -> list[str]:
    """``--rank-shares``: the speed-ups the shares scored alone predict (``predicted``)."""
    lines = [f"- {name}, {p['run']}: **{p['speed_up']:.2f}x**, shares scored "
             f"{' / '.join(f'{t:.2f}' for t in p['shares_scoring_s'])} s, frequencies add up to the whole run's: "
             f"{p['add_up']}" for name, s in results["sets"].items() for p in s.get("predicted", [])]
    return ["", f"{results['rank_shares']} ranks' shares, each scored alone on one GPU (the whole set's scoring over "
                "the slowest share's; a prediction, not a torchrun run):", *lines] if lines else []


def table(results: dict) -> str:
    lines = [f"# End-to-end REAP scoring ({results['device']}, {results['shape']})", "",
             "samples: " + ", ".join(f"{n} {kind}" for kind, n in results["samples"].items()) +
             f"; batch {results['batch_size']}, max_seq_len "
             f"{results['max_seq_len']}, reap.py --engine model, {results['dtype']}; host: {results['cpus']} CPUs, "
             f"/dev/shm {results['shm_free_gib']} GiB free. Target ratio: reap.py's scoring phase per token over "
             "the warm baseline's (routed: plain forward; full: full observer), in brackets over the baseline with "
             "its first batch cold as reap.py runs it; baselines warm, (+first batch once more), with reap.py's "
             "attention kernels (cuDNN's left out, reap_vlm/inference.py).", ""]
    lines += ["| set | run | tokens | load s | scoring s | tok/s | reduce s | encode s (workers) | waited s (1st) | "
              "padding | target ratio |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in results["sets"].items():
        base = s.get("baselines", {})
        for run_name, r in s.get("runs", {}).items():
            if r is None:
                continue
            if " 2gpu" in run_name:  # against the first one-GPU run of its mode
                one = s["runs"].get(run_name.split(" 2gpu")[0])
                ratio = "" if not one else (
                    f"{speed_up(one, r)} speed-up, rel diff {r.get('rel_diff_vs_1gpu', float('nan')):.1e}, "
                    f"same keep {r.get('same_keep')}")
            else:  # per token: the inline runs score fewer samples
                ratio = _ratios(r, base, "plain_forward" if run_name.startswith("routed") else "full_observer")
            padding = f"{r['padding_share']:.1%}" if r.get("padding_share") is not None else ""
            if r.get("padding_file_order") is not None:
                padding += f" (file order ~{r['padding_file_order']:.0%})"
            kind = {"processes": " proc", "threads": " thr"}.get(r.get("encode_kind"), "")
            lines.append(f"| {name} | {run_name} | {r['tokens']:,} ({r['image_tokens']:,} img) | {r['load_s']:.1f} | "
                         f"{r['scoring_s']:.2f} | {r['tokens'] / r['scoring_s']:,.0f} | {r['reduce_s']:.2f} | "
                         f"{r['encode_cpu_s']:.1f} ({r['encode_workers']}{kind}) | {r['encode_wait_s']:.2f} "
                         f"({r['encode_first_wait_s']:.2f}) | "
                         f"{padding} | {ratio} |")
        if base:
            timed = " / ".join(f"{what} {base[key + '_s']:.2f} (+{base[warm + '_warmup_s']:.2f})"
                               for what, key, warm in (("plain", "plain_forward", "plain"),
                                                       ("routed obs", "routed_observer", "routed"),
                                                       ("full obs", "full_observer", "full"))
                               if key + "_s" in base)
            if "plain_default_kernels_s" in base:
                timed += f" / plain, PyTorch's default kernels, 2nd pass {base['plain_default_kernels_s']:.2f}"
            encoded = (f"pre-encode {base['pre_encode_cpu_s']:.1f} cpu, {base['pre_encode_wall_s']:.1f} wall "
                       f"({base['encode_threads']} thr)")
            lines.append(f"| {name} | baselines over pre-encoded batches | | | {timed} | | | {encoded} | | | |")
    enc = results.get("encode_rates")
    if enc:
        lines += ["", f"Encoding {enc['samples']} image samples (1-4 MP): 1 thread {enc['serial_s']:.1f}s, "
                      f"{enc['workers']} threads {enc['threads_s']:.1f}s ({enc['serial_s'] / enc['threads_s']:.1f}x), "
                      f"{enc['workers']} processes {enc['processes_s']:.1f}s, of which {enc['processes_first_s']:.1f}s "
                      "to the first batch (start-up)"]
    gpu = results.get("gpu_preprocessing")
    if gpu:
        lines += ["", f"Image preprocessing of {gpu['images']} decoded photos: CPU {gpu['cpu_s']:.2f}s, "
                      f"device=cuda {gpu['cuda_s']:.2f}s (pixels on {gpu['cuda_pixel_device']})"]
    lines += predictions(results)
    lines += spread(results)
    if results["not_run"]:
        lines += ["", "Not run: " + "; ".join(results["not_run"])]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- main


def write_results(out: Path, name: str, text: str, results: dict) -> None:
    """A bench's table printed and written to ``out/name.md``, its figures to ``out/name.json``."""
    print("\n" + text)
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps(results, indent=1))
    log(f"written {out}/{name}.md and .json")


def bench_device(args) -> None:
    """``args.device`` and ``args.dtype``: bfloat16 on a GPU, float32 on the CPU (``--tiny``; bf16 matmuls on the
    CPU are slow)."""
    args.device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    args.dtype = "bfloat16" if args.device == "cuda" else "float32"


def bench_identity(args) -> dict:
    """A results file's device and checkpoint shape."""
    return {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "shape": "tiny" if args.tiny else f"30B-A3B, {args.layers} MoE layers, vision {args.vision}"}


def reap_order(processor, calib: Path, count: int, args, family):
    """The first ``count`` samples of ``calib`` in reap.py's order (its default sort window, 16; no image budget):
    a ``BatchOrder``."""
    samples = load_calibration(calib, count).samples
    return length_order(processor, samples, args.batch_size, 16, args.max_seq_len, 0, family)[0]


@dataclass
class LoadedBench:
    """What the benches built on this one's checkpoint and sets start from: the model loaded in this process."""

    args: argparse.Namespace
    workdir: Path
    out: Path
    ckpt: Checkpoint
    processor: object
    model: torch.nn.Module

    def order(self, kind: str, counts: dict[str, int]):
        """The ``kind`` set's first ``counts[kind]`` samples (written when missing) in reap.py's order."""
        calib = write_calibration(self.workdir / "calibration", kind, counts[kind], megapixels(self.args))
        return reap_order(self.processor, calib, counts[kind], self.args, self.ckpt.family)


def tiny_sizes(args) -> None:
    """``--tiny``: the sets' sizes, batch and sequence budget set small on ``args``, in a workdir of their own."""
    if args.tiny:
        args.samples, args.image_samples, args.batch_size, args.max_seq_len = 12, 8, 4, 512
        args.workdir += "-tiny"


def megapixels(args) -> tuple[float, float]:
    """The range of the sets' photo sizes: 1-4 MP, as a user's photos; tiny ones with ``--tiny``."""
    return (0.05, 0.2) if args.tiny else (1.0, 4.0)


def loaded_bench(args) -> LoadedBench:
    """``--tiny``'s sizes set on ``args``, the checkpoint written when missing, then loaded."""
    tiny_sizes(args)
    workdir, out = Path(args.workdir), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = write_model(workdir / "model", spec_for(args), args.tiny, args.device)
    model = load_model(model_dir, dtype=getattr(torch, args.dtype), device=args.device)
    return LoadedBench(args, workdir, out, Checkpoint(model_dir), load_processor(model_dir), model)


def shared_arguments(parser: argparse.ArgumentParser, minutes: str) -> None:
    """The options of the benches that build on this one's checkpoint and calibration sets (``--workdir``);
    ``minutes``: the default time budget, said in the help."""
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and images on the CPU (a minute or two)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--workdir", default="/tmp/reap_e2e")
    parser.add_argument("--max-minutes", type=float, default=None, help=f"time budget (default {minutes})")
    parser.add_argument("--layers", type=int, default=4, help="full-width MoE decoder layers")
    parser.add_argument("--vision", default="full", choices=tuple(VISION))


def set_arguments(parser: argparse.ArgumentParser, sets: str) -> None:
    """The calibration sets of the benches that time forwards over pre-encoded batches in a loaded model
    (``loaded_bench``): run 28's 512 text-heavy and 128 image-heavy samples, batches of 8 up to 2,048 tokens."""
    parser.add_argument("--sets", default=sets)
    parser.add_argument("--samples", type=int, default=512, help="text-heavy set")
    parser.add_argument("--image-samples", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=2048)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shared_arguments(parser, "8.5; --tiny 2.5")
    parser.add_argument("--sets", default="image,text")
    parser.add_argument("--modes", default="routed,full")
    parser.add_argument("--observer-modes", default="full", help="observer baselines (routed's target is the plain "
                        "forward, always run)")
    parser.add_argument("--samples", type=int, default=1024, help="calibration samples of the text-heavy set "
                        "(long enough that fixed costs weigh little: the issue's own figures used 1,024)")
    parser.add_argument("--image-samples", type=int, default=192, help="calibration samples of the image-heavy set")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--other-kind", action=argparse.BooleanOptionalAction, default=True,
                        help="also reap.py routed with the encoding workers auto does not pick (threads, where "
                             "/dev/shm has room for processes)")
    parser.add_argument("--encode-rates", action="store_true",
                        help="also the encoding rates (1 thread, N threads, N processes) and the GPU image "
                             "preprocessing (measured in round 1)")
    parser.add_argument("--encode-samples", type=int, default=48, help="image samples for the encoding rates")
    parser.add_argument("--inline", action=argparse.BooleanOptionalAction, default=False,
                        help="also run routed with --encode-workers 0 --sort-window 0 (before issue 18; round 1)")
    parser.add_argument("--inline-samples", type=int, default=96, help="samples of the inline runs")
    parser.add_argument("--gpus", default="auto", help="auto (2 when two are visible), 1 or 2")
    parser.add_argument("--skip-baselines", action="store_true")
    parser.add_argument("--repeats", type=int, default=1, help="reap.py runs per set, mode and GPU count: the "
                        "table gives each and their spread")
    parser.add_argument("--rank-shares", type=int, default=0, help="where two GPUs are not visible: each of N "
                        "torchrun ranks' shares scored alone on one GPU, and the speed-up they predict")
    args = parser.parse_args()
    bench_device(args)
    if args.tiny:
        args.samples = min(args.samples, 12)
        args.image_samples = min(args.image_samples, 12)
        args.batch_size = min(args.batch_size, 4)
        args.max_seq_len = min(args.max_seq_len, 512)
        args.encode_samples = min(args.encode_samples, 8)
        args.inline_samples = min(args.inline_samples, 8)
        args.workdir = args.workdir + "-tiny"
    gpus_visible = torch.cuda.device_count() if args.device == "cuda" else 0
    two = gpus_visible >= 2 if args.gpus == "auto" else args.gpus == "2"
    clock = Clock(args.max_minutes or (2.5 if args.tiny else 8.5))
    args.set_samples = {"text": args.samples, "image": args.image_samples}
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    modes = args.modes.split(",")
    shm = shm_free_bytes()
    results = {**bench_identity(args), "gpus_visible": gpus_visible,
               "samples": {kind: args.set_samples[kind] for kind in args.sets.split(",")},
               "batch_size": args.batch_size,
               "max_seq_len": args.max_seq_len, "dtype": args.dtype, "cpus": os.cpu_count(),
               "shm_free_gib": None if shm is None else round(shm / 2**30, 1), "sets": {}, "not_run": clock.skipped,
               "rank_shares": 0 if two else args.rank_shares}
    if not two:
        clock.skipped.append(f"torchrun on 2 GPUs ({gpus_visible} visible)")

    log("writing the checkpoint and calibration sets in", workdir)
    model = write_model(workdir / "model", spec_for(args), args.tiny, args.device)
    calibs = {kind: write_calibration(workdir / "calibration", kind, args.set_samples[kind], megapixels(args))
              for kind in args.sets.split(",")}
    log(f"inputs ready ({clock.left():.0f}s left)")

    walls: dict[str, float] = {}  # the longest reap.py run per set: the estimate of its next one

    def estimate(kind: str) -> float:
        return walls.get(kind) or max(walls.values(), default=10 if args.tiny else 25)

    def run(kind: str, calib: Path, name: str, mode: str, gpus: int, extra=()) -> dict | None:
        if not clock.allows(f"reap.py {name} on {kind}", estimate(kind)):
            return None
        log(f"reap.py {name} on the {kind} set")
        r = reap_run(args, model, calib, mode, gpus, clock, extra)
        if r:
            walls[kind] = max(walls.get(kind, 0.0), r["wall_s"])
            log(f"  load {r['load_s']:.2f}s, first batch ready {r['encode_first_ready_s']:.2f}s after the stream "
                f"started, first wait {r['encode_first_wait_s']:.2f}s")
            log(f"  scoring {r['scoring_s']:.2f}s, waited {r['encode_wait_s']:.2f}s for batches "
                f"({r['encode_workers']} {r['encode_kind']}), padding {r['padding_share']:.1%}; model load "
                f"{r['model_load_s']}s; warm-up {json.dumps(r['warm_up'])}")
            log(f"  load steps s: {json.dumps(r['load_steps'])}")
            log(f"  scoring steps s: {json.dumps(r['scoring_steps'])}, first batch done on the device "
                f"{r['first_batch_device_s']}s")
            for rank, figures in enumerate(r["ranks"] or []):
                log(f"  rank {rank}: {json.dumps(figures)}")
        results["sets"][kind]["runs"][name] = r
        return r

    for kind, calib in calibs.items():  # one GPU, then the baselines, per set
        res = results["sets"].setdefault(kind, {"runs": {}})
        for mode in modes:
            for turn in range(args.repeats):
                run(kind, calib, repeat_name(mode, turn), mode, 1)
        if not args.skip_baselines and clock.allows(f"baselines on {kind}", 1.5 * estimate(kind)):
            log(f"baselines over pre-encoded batches, {kind} set")
            res["baselines"] = baselines(args, model, calib, args.observer_modes.split(","), clock)
    for kind, calib in calibs.items() if two else ():
        for mode, turn in itertools.product(modes, range(args.repeats)):
            r = run(kind, calib, repeat_name(f"{mode} 2gpu", turn), mode, 2)
            one = results["sets"][kind]["runs"].get(mode)
            if r and one:
                r["rel_diff_vs_1gpu"] = max_rel(one["reap"], r["reap"])
                r["same_keep"] = one["keep"] == r["keep"]
    for kind, calib in calibs.items() if results["rank_shares"] > 1 else ():
        files = share_files(args, model, calib, args.rank_shares)
        for mode, turn in itertools.product(modes, range(args.repeats)):
            for rank, share in enumerate(files):
                run(kind, share, repeat_name(share_name(mode, rank, len(files)), turn), mode, 1,
                    ("--sort-window", "0"))
        results["sets"][kind]["predicted"] = predicted(results["sets"][kind]["runs"], modes, args.repeats,
                                                       len(files))
    for kind, calib in calibs.items() if args.other_kind and "routed" in modes else ():
        other = "threads"  # auto: processes where /dev/shm has room
        run(kind, calib, f"routed {other}", "routed", 1, ("--encode-workers-kind", other))
    if "image" in calibs and args.encode_rates and clock.allows("encoding rates", 40 if not args.tiny else 20):
        log("encoding rates, image set")
        results["encode_rates"] = encode_rates(args, model, calibs["image"], default_workers())
    if "image" in calibs and args.device == "cuda" and args.encode_rates and clock.allows(
            "GPU image preprocessing", 20):
        results["gpu_preprocessing"] = gpu_preprocessing(model, calibs["image"], 16)
    for kind, calib in calibs.items() if args.inline and "routed" in modes else ():
        run(kind, calib, "routed inline, file order", "routed", 1,
            ("--encode-workers", "0", "--sort-window", "0", "--max-samples", str(args.inline_samples)))

    for s in results["sets"].values():  # the per-expert scores were kept only for the 2-GPU comparison
        for r in s["runs"].values():
            if r:
                for key in ("reap", "frequency", "keep"):
                    r.pop(key, None)
    write_results(out, "RESULTS_end_to_end", table(results), results)


if __name__ == "__main__":
    main()
