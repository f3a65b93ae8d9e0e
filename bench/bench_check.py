#!/usr/bin/env python3
"""The check with quantized weights kept packed on the GPU (``load_model(..., packed=True)``): memory and speed
on a Qwen3-VL-235B-A22B-shaped checkpoint, and the projection for the full 94-layer model on one H200.

For each format (AWQ GEMM 4-bit group 128; FP8 block 128x128) it writes, under --workdir, a checkpoint with
the 235B-A22B decoder shapes (hidden 4096, 64 heads / 4 KV heads, head_dim 128, 128 experts of intermediate
1536, top-8) and --layers decoder layers, the packed tensors random but well formed, written directly (no bf16
weights are made or quantized), one tensor per expert as the releases store them; a small vocabulary
(--vocab, default 16384: the 151,936-token embeddings are added back analytically in the projection) and a
1-block vision tower (not run: the prompts are text).  Its pruned copy (--prune-ratio of the experts removed in
every layer) is written by prune_model's own code (``prune.rewrite.prune_checkpoint``).  Then, the original
and the pruned model one after the other, as the check does:

* load packed (seconds; GPU bytes after loading vs ``packed_model_bytes`` vs the shards on disk),
* greedy generation of --new-tokens for --prompts prompts at once, and for one prompt alone (the check's
  current loop generates prompt by prompt): prefill seconds, seconds per decode step, peak GPU memory, experts
  dequantized per layer and step;
* the surgery: teacher-forced logits on the original's continuations, the original with routing masked to the
  kept experts vs the pruned model (max |logit difference|, top-1 agreement).

Projection for 94 layers: the weights from the per-layer packed bytes measured here plus the real embeddings,
lm_head and vision tower; the working memory over the weights as measured (one layer's routed experts
dequantized, activations), the KV cache scaled to 94 layers; time per step scaled by 94 / --layers (an upper
bound: embeddings and lm_head do not grow with depth).  Every phase is bounded by --max-minutes.

    python bench/bench_check.py --out $OUT                 # GPU, ~5 minutes
    python bench/bench_check.py --tiny --out /tmp/bench    # CPU, tiny shapes, < 1 minute

Writes RESULTS_check_packed.md and .json to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import math
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

H200_BYTES = 143771 * 2**20  # nvidia-smi's 143,771 MiB ("141 GB")
REAL_VOCAB = 151936
REAL_LAYERS = 94
CUDA_RESERVE = 2 * 2**30  # CUDA context, allocator fragmentation: kept free in the fit verdict


@dataclass
class Shape:
    hidden: int = 4096
    inter: int = 1536
    experts: int = 128
    top_k: int = 8
    heads: int = 64
    kv_heads: int = 4
    head_dim: int = 128
    group: int = 128
    block: int = 128
    vocab: int = 16384


TINY = Shape(hidden=64, inter=48, experts=16, top_k=4, heads=4, kv_heads=2, head_dim=16, group=16, block=32,
             vocab=512)


class Clock:
    def __init__(self, minutes: float):
        self.start, self.limit = time.perf_counter(), minutes * 60

    def left(self) -> float:
        return self.limit - (time.perf_counter() - self.start)


def log(message: str) -> None:
    print(message, flush=True)


# ------------------------------------------------------------------------------------ the checkpoint


def bench_config(shape: Shape, layers: int, vision: bool = False) -> dict:
    """config.json of a 235B-A22B-shaped Qwen3-VL-MoE (``vision``: the real vision tower, else one tiny block)."""
    from reap_vlm.fixtures.tiny import FixtureSpec, fixture_config

    visual = dict(vision_depth=27, vision_hidden_size=1152, vision_intermediate_size=4304, vision_heads=16,
                  deepstack_visual_indexes=(8, 16, 24), num_position_embeddings=2304) if vision else \
        dict(vision_depth=1, vision_hidden_size=32, vision_intermediate_size=64, vision_heads=2,
             deepstack_visual_indexes=())
    spec = FixtureSpec(hidden_size=shape.hidden, moe_intermediate_size=shape.inter, intermediate_size=4 * shape.inter,
                       num_hidden_layers=layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                       head_dim=shape.head_dim, num_experts=shape.experts, num_experts_per_tok=shape.top_k,
                       dtype="bfloat16", **visual)
    ids = {name: shape.vocab - 8 + i for i, name in enumerate(
        ("<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"))}
    return fixture_config(spec, {**ids, "__size__": shape.vocab})


def memory_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model class (in-memory names and layouts), from a model built on meta."""
    from accelerate import init_empty_weights
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    with init_empty_weights():
        model = Qwen3VLMoeForConditionalGeneration(Qwen3VLMoeConfig(**config))
    return {key: tuple(t.shape) for key, t in model.state_dict().items()}


def random_quantized(fmt: str, rows: int, columns: int, shape: Shape, device: str) -> dict[str, torch.Tensor]:
    """One Linear [rows, columns] in ``fmt``'s stored tensors, random but decoding to weights of std ~0.02."""
    if fmt == "awq":
        groups = columns // shape.group
        return {"qweight": torch.randint(-2**31, 2**31 - 1, (columns, rows // 8), dtype=torch.int32, device=device),
                "qzeros": torch.full((groups, rows // 8), -2004318072, dtype=torch.int32, device=device),  # all 8
                "scales": torch.full((groups, rows), 0.0043, dtype=torch.float16, device=device)}
    blocks = (math.ceil(rows / shape.block), math.ceil(columns / shape.block))
    return {"weight": torch.randn(rows, columns, device=device).mul_(64).to(torch.float8_e4m3fn),
            "weight_scale_inv": torch.full(blocks, 0.02 / 64, dtype=torch.float32, device=device)}


def write_checkpoint(folder: Path, fmt: str, shape: Shape, layers: int, device: str, clock: Clock,
                     minutes: float) -> int:
    """The packed checkpoint, one shard per decoder layer plus one for the rest; writes layers until
    ``layers`` or ``minutes`` is reached (config.json is written last, with the count written).  Returns it."""
    from safetensors.torch import save_file

    from reap_vlm.families import QWEN3_VL_MOE as family
    from reap_vlm.families import KeyRole
    from reap_vlm.fixtures.quantized import quantization_config_for

    folder.mkdir(parents=True)
    shapes = memory_shapes(bench_config(shape, layers))
    generator = torch.Generator(device=device).manual_seed(0)
    torch.manual_seed(0)  # random_quantized draws from the default generators
    started = time.perf_counter()
    weight_map, total, written = {}, 0, 0

    def save(name: str, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total
        tensors = {k: v.cpu().contiguous() for k, v in tensors.items()}
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        for key, tensor in tensors.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()

    def plain(key: str, dims: tuple[int, ...]) -> torch.Tensor:
        if key.endswith("norm.weight"):
            return torch.ones(dims, dtype=torch.bfloat16)
        std = 1.0 if "embed_tokens" in key else 2.0 / math.sqrt(dims[-1]) if key.endswith("mlp.gate.weight") else 0.02
        return torch.randn(dims, generator=generator, device=device).mul_(std).to(torch.bfloat16)

    per_layer = family.keys_by_layer(shapes)
    for layer in range(layers):
        if written and (time.perf_counter() - started > minutes * 60 or clock.left() < 0):
            log(f"  stopped writing at {written} layers (time)")
            break
        tensors = {}
        for key in per_layer[layer]:
            info = family.classify(key)
            module = key.rpartition(".")[0]
            if info.role is KeyRole.FUSED_EXPERTS:
                for expert in range(shape.experts):
                    for proj in family.fused_sources()[info.name]:
                        rows, columns = (shape.hidden, shape.inter) if proj == "down_proj" else \
                            (shape.inter, shape.hidden)
                        for suffix, t in random_quantized(fmt, rows, columns, shape, device).items():
                            tensors[f"{info.prefix}.{expert}.{proj}.{suffix}"] = t
            elif key.endswith("_proj.weight") and ".self_attn." in key:
                for suffix, t in random_quantized(fmt, *shapes[key], shape, device).items():
                    tensors[f"{module}.{suffix}"] = t
            else:
                tensors[key] = plain(key, shapes[key])
        save(f"layer-{layer:03d}.safetensors", tensors)
        written += 1
        log(f"  wrote layer {written}/{layers} ({total / 1e9:.1f} GB, {time.perf_counter() - started:.0f}s)")
    rest = [k for k in shapes if family.layer_of_key(k) is None]
    save("rest.safetensors", {k: plain(k, shapes[k]) for k in rest})
    config = bench_config(shape, written)
    # the releases' not-to-convert lists, from the names alone
    kept = {k: torch.empty(dims, device="meta") for k, dims in shapes.items()
            if (family.layer_of_key(k) or 0) < written}
    config["quantization_config"] = quantization_config_for(family, fmt, kept, shape.group, (shape.block,) * 2, True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return written


# ------------------------------------------------------------------------------------ measuring


@dataclass
class Run:
    label: str
    fmt: str
    layers: int
    experts: int
    disk_bytes: int = 0
    packed_model_bytes: int = 0
    loaded_bytes: int = 0
    load_s: float = 0.0
    batch: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    step_s: float = 0.0
    peak_bytes: int = 0
    one_prompt_prefill_s: float = 0.0
    one_prompt_step_s: float = 0.0
    experts_per_layer_step: float = 0.0
    surgery: dict = field(default_factory=dict)
    exactness: dict = field(default_factory=dict)  # packed vs the dequantized model loaded whole
    notes: list = field(default_factory=list)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def memory(device: str, peak: bool = False) -> int:
    if not device.startswith("cuda"):
        return 0
    return torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()


def packed_experts(model):
    from reap_vlm.checkpoint.packed import PackedExperts

    return [m for m in model.modules() if isinstance(m, PackedExperts)]


def generate(model, ids: torch.Tensor, new_tokens: int, seconds: float) -> tuple[torch.Tensor, float, float, float]:
    """Greedy continuation of ``ids`` (every row the same length): (continuations, prefill s, s per decode step,
    experts dequantized per MoE layer per decode step)."""
    from transformers import GenerationConfig

    device = str(ids.device)
    blocks = packed_experts(model)

    def run(count):
        config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=count, min_new_tokens=count,
                                  pad_token_id=0, max_time=max(1.0, seconds))
        before = sum(b.experts_dequantized for b in blocks)
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        sync(device)
        return out[:, ids.shape[1]:], time.perf_counter() - start, sum(b.experts_dequantized for b in blocks) - before

    _, prefill, prefill_count = run(1)
    out, total, count = run(new_tokens)
    steps = max(1, out.shape[1] - 1)
    fused = 2 * max(1, len(blocks))  # gate_up_proj and down_proj of every MoE layer
    return out, prefill, max(0.0, total - prefill) / steps, (count - prefill_count) / steps / fused


def teacher_forced(model, ids: torch.Tensor, window: int, keep=None) -> torch.Tensor:
    from reap_vlm.check.masked_routing import masked_routing
    from reap_vlm.families import QWEN3_VL_MOE as family

    with torch.inference_mode(), masked_routing(model, family, keep) if keep else contextlib.nullcontext():
        return model(input_ids=ids, use_cache=False, logits_to_keep=window).logits.float().cpu()


def measure(path: Path, label: str, fmt: str, args, clock: Clock, prompts: torch.Tensor, *,
            keep: dict | None = None, forced: torch.Tensor | None = None,
            reference: torch.Tensor | None = None) -> tuple[Run, dict]:
    """Load ``path`` packed, generate, then the surgery's side: the original (``keep``) computes its masked
    teacher-forced logits on its own continuations (returned as ``forced``, ``masked``); the pruned model
    computes its logits on ``forced`` and is compared with ``reference``."""
    from reap_vlm.checkpoint.loading import load_model
    from reap_vlm.checkpoint.packed import packed_model_bytes
    from reap_vlm.checkpoint.reader import Checkpoint

    ckpt = Checkpoint(path)
    run = Run(label, fmt, len(ckpt.moe_layers), ckpt.num_experts,
              disk_bytes=sum(p.stat().st_size for p in path.glob("*.safetensors")),
              packed_model_bytes=packed_model_bytes(path, args.dtype))
    out: dict = {}
    device = args.device
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    model = load_model(path, dtype=args.dtype, device=device, packed=True)
    sync(device)
    run.load_s, run.loaded_bytes = time.perf_counter() - start, memory(device)
    log(f"  {label}: loaded in {run.load_s:.1f}s, {run.loaded_bytes / 1e9:.2f} GB on the GPU "
        f"(packed_model_bytes {run.packed_model_bytes / 1e9:.2f} GB, shards {run.disk_bytes / 1e9:.2f} GB)")
    try:
        run.batch, run.prompt_tokens = prompts.shape
        if clock.left() > 0:  # warm-up: kernels, cuBLAS handles, the allocator's first blocks
            generate(model, prompts[:1, :8].to(device), 2, clock.left())
        # generation's share of what is left: this model's two runs, and the pruned model's after the original's
        share = clock.left() / (4 if keep is not None else 2)
        if clock.left() > 0:
            continuation, run.prefill_s, run.step_s, run.experts_per_layer_step = generate(
                model, prompts.to(device), args.new_tokens, share)
            run.peak_bytes, run.new_tokens = memory(device, peak=True), continuation.shape[1]
            log(f"  {label}: {run.batch} prompts x {run.new_tokens} tokens: prefill {run.prefill_s:.2f}s, "
                f"{run.step_s * 1000:.0f} ms per step, {run.experts_per_layer_step:.1f} experts dequantized per "
                f"layer and step, peak {run.peak_bytes / 1e9:.2f} GB")
            if keep is not None:
                out["forced"] = torch.cat([prompts, continuation.cpu()], dim=1)
        else:
            run.notes.append("generation skipped: --max-minutes reached")
        if clock.left() > 0:
            _, run.one_prompt_prefill_s, run.one_prompt_step_s, _ = generate(
                model, prompts[:1].to(device), args.new_tokens, share)
            log(f"  {label}: one prompt: prefill {run.one_prompt_prefill_s:.2f}s, "
                f"{run.one_prompt_step_s * 1000:.0f} ms per step")
        if keep is not None and "forced" in out and clock.left() > 0:
            out["masked"] = teacher_forced(model, out["forced"].to(device), args.new_tokens, keep)
            out["logits"] = teacher_forced(model, out["forced"].to(device), args.new_tokens)
        if reference is not None and clock.left() > 0:
            logits = teacher_forced(model, forced.to(device), args.new_tokens)
            diff = (logits - reference).abs()
            agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
            run.surgery = {"max_abs_logit_diff": diff.max().item(), "mean_abs_logit_diff": diff.mean().item(),
                           "top1_agreement": agree, "positions": int(reference.shape[0] * reference.shape[1])}
            log(f"  surgery: max |logit diff| {run.surgery['max_abs_logit_diff']:.3g}, top-1 agreement "
                f"{agree:.4f} over {run.surgery['positions']} positions")
        elif reference is None and keep is None:
            run.notes.append("surgery skipped: no masked original logits (time)")
    finally:
        del model
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return run, out


def exactness(path: Path, run: Run, args, clock: Clock, forced: torch.Tensor, packed_logits: torch.Tensor) -> None:
    """The original loaded whole (every quantized weight dequantized at load) on the same tokens: the packed
    model's logits must be the same bits (``run.exactness``)."""
    from reap_vlm.checkpoint.loading import load_model

    if clock.left() < min(60.0, 0.15 * clock.limit):  # a whole load takes about as long as a packed one
        run.notes.append("exactness against the whole dequantized model skipped: --max-minutes nearly reached")
        return
    model = load_model(path, dtype=args.dtype, device=args.device)
    try:
        logits = teacher_forced(model, forced.to(args.device), args.new_tokens)
    finally:
        del model
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    run.exactness = {"bitwise": bool(torch.equal(logits, packed_logits)),
                     "max_abs_logit_diff": (logits - packed_logits).abs().max().item(),
                     "top1_agreement": (logits.argmax(-1) == packed_logits.argmax(-1)).float().mean().item()}
    log(f"  exactness: packed vs whole dequantized: bitwise {run.exactness['bitwise']}, max |logit diff| "
        f"{run.exactness['max_abs_logit_diff']:.3g}")


# ------------------------------------------------------------------------------------ projection


@functools.lru_cache(maxsize=1)
def real_outside_layers_bytes(dtype_bytes: int = 2) -> int:
    """Embeddings, lm_head (not tied in the 235B release), final norm and the real vision tower, in bf16."""
    shapes = memory_shapes(bench_config(Shape(vocab=REAL_VOCAB), 1, vision=True))
    return sum(math.prod(s) for k, s in shapes.items() if ".layers." not in k or k.startswith("model.visual.")) \
        * dtype_bytes


def layer_bytes(path: Path) -> int:
    """Bytes of one decoder layer as stored, which is as loaded packed (every layer is shaped alike)."""
    from reap_vlm.checkpoint.integrity import shard_headers
    from reap_vlm.checkpoint.reader import Checkpoint

    ckpt = Checkpoint(path)
    total = sum(t.nbytes for header in shard_headers(ckpt).values() for key, t in header.tensors.items()
                if ckpt.family.layer_of_key(key) is not None)
    return total // max(1, len(ckpt.moe_layers))


def project(run: Run, per_layer: int, shape: Shape, capacity: int, new_tokens: int) -> dict:
    """The 94-layer model: weights, peak, fit, time for the prompts x ``new_tokens``."""
    kv_per_token_layer = 2 * shape.kv_heads * shape.head_dim * 2
    tokens = run.batch * (run.prompt_tokens + new_tokens)
    kv_measured = kv_per_token_layer * tokens * run.layers
    weights = real_outside_layers_bytes() + REAL_LAYERS * per_layer
    working = max(0, run.peak_bytes - run.loaded_bytes - kv_measured) if run.peak_bytes else 0
    peak = weights + working + kv_per_token_layer * tokens * REAL_LAYERS
    scale = REAL_LAYERS / max(1, run.layers)
    step, prefill = run.step_s * scale, run.prefill_s * scale
    one_step, one_prefill = run.one_prompt_step_s * scale, run.one_prompt_prefill_s * scale
    steps = max(0, new_tokens - 1)
    return {"label": run.label, "fmt": run.fmt, "experts": run.experts, "weights_bytes": weights,
            "working_bytes": working, "peak_bytes": peak, "capacity_bytes": capacity,
            "fits": peak + CUDA_RESERVE <= capacity,
            "load_s": run.load_s * weights / max(1, run.loaded_bytes or run.packed_model_bytes),
            "batched_s": prefill + steps * step, "sequential_s": run.batch * (one_prefill + steps * one_step)}


# ------------------------------------------------------------------------------------ report


def gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def exact_cell(exact: dict) -> str:
    if not exact:
        return ""
    return f"{'bitwise' if exact['bitwise'] else 'NO'} ({exact['max_abs_logit_diff']:.3g})"


def report(runs: list[Run], projections: list[dict], args, shape: Shape, capacity: int, wall: float) -> str:
    lines = ["# The check with packed quantized weights (bench/bench_check.py)", "",
             f"Command: `python bench/bench_check.py {' '.join(args.argv)}`; device {args.device_name}, "
             f"{args.dtype}, wall {wall:.0f}s.", "",
             f"Checkpoint: Qwen3-VL-235B-A22B decoder shapes (hidden {shape.hidden}, {shape.heads}/{shape.kv_heads} "
             f"heads, head_dim {shape.head_dim}, {shape.experts} experts x {shape.inter}, top-{shape.top_k}), "
             f"random packed tensors, vocab {shape.vocab} (small: the real embeddings are added in the projection), "
             "1-block vision tower (text prompts). Prompts: "
             f"{args.prompts} x {args.prompt_tokens} tokens, {args.new_tokens} new tokens, greedy.", "",
             "| format | model | layers | experts | shards GB | packed_model_bytes GB | on GPU after load GB | "
             "load s | peak (load + generate) GB | prefill s | s/step (batch) | s/step (1 prompt) | "
             "experts deq./layer/step | surgery max abs dlogit | top-1 agree | packed == whole (max abs dlogit) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        s = r.surgery
        lines.append(f"| {r.fmt} | {r.label} | {r.layers} | {r.experts} | {gb(r.disk_bytes)} | "
                     f"{gb(r.packed_model_bytes)} | {gb(r.loaded_bytes)} | {r.load_s:.1f} | {gb(r.peak_bytes)} | "
                     f"{r.prefill_s:.2f} | {r.step_s:.3f} | {r.one_prompt_step_s:.3f} | "
                     f"{r.experts_per_layer_step:.1f} | {s.get('max_abs_logit_diff', float('nan')):.3g} | "
                     f"{s.get('top1_agreement', float('nan')):.4f} | {exact_cell(r.exactness)} |")
    lines += ["", f"## Projection: {REAL_LAYERS} layers, vocab {REAL_VOCAB}, real vision tower, on "
              f"{gb(capacity)} GB ({'this GPU' if args.device.startswith('cuda') else 'an H200, 143,771 MiB'}; "
              f"{gb(CUDA_RESERVE)} GB kept free)", "",
              f"| format | model | experts | weights GB | working GB | peak GB | fits | load s | "
              f"{args.prompts} x {args.new_tokens} batched s | {args.prompts} x {args.new_tokens} one by one s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for p in projections:
        lines.append(f"| {p['fmt']} | {p['label']} | {p['experts']} | {gb(p['weights_bytes'])} | "
                     f"{gb(p['working_bytes'])} | {gb(p['peak_bytes'])} | {'yes' if p['fits'] else 'NO'} | "
                     f"{p['load_s']:.0f} | {p['batched_s']:.0f} | {p['sequential_s']:.0f} |")
    lines += ["", "Working memory: the measured peak of generation over the loaded weights (one layer's routed "
              "experts dequantized at a time, activations), the KV cache scaled to 94 layers. Times scale the "
              f"measured per-step seconds by {REAL_LAYERS}/layers (an upper bound: embeddings, lm_head and the "
              "sampling loop do not grow with depth)."]
    notes = [f"- {r.fmt} {r.label}: {n}" for r in runs for n in r.notes]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for RESULTS_check_packed.md/.json")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where the checkpoints are written (removed at the end; default the temp folder)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (< 1 minute)")
    parser.add_argument("--formats", default="awq,fp8", help="comma-separated: awq, fp8 (default both)")
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers written (default 8, fewer when disk or --write-minutes run out)")
    parser.add_argument("--write-minutes", type=float, default=None,
                        help="time cap for writing each checkpoint (default 1.0; 0.3 with --tiny)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts generated together (default 8)")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="tokens per prompt (default 128)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens generated per prompt (default 64)")
    parser.add_argument("--prune-ratio", type=float, default=0.4)
    parser.add_argument("--no-exactness", action="store_true",
                        help="skip loading the original whole (dequantized) to compare logits with the packed one")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="activations and dequantized weights (default bfloat16)")
    parser.add_argument("--max-minutes", type=float, default=None, help="bound on the whole run (default 6; 1 tiny)")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)

    from reap_vlm.checkpoint.loading import resolve_device
    from reap_vlm.prune.rewrite import prune_checkpoint

    tiny = args.tiny
    shape = TINY if tiny else Shape()
    args.layers = args.layers or (2 if tiny else 8)
    args.write_minutes = args.write_minutes if args.write_minutes is not None else (0.3 if tiny else 1.0)
    args.prompts = args.prompts or (2 if tiny else 8)
    args.prompt_tokens = args.prompt_tokens or (8 if tiny else 128)
    args.new_tokens = args.new_tokens or (4 if tiny else 64)
    args.max_minutes = args.max_minutes or (1.0 if tiny else 6.0)
    args.device = resolve_device(args.device)
    args.dtype = getattr(torch, args.dtype)
    args.device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if bad := [f for f in formats if f not in ("awq", "fp8")]:
        sys.exit(f"--formats: {bad} not supported here; use awq and/or fp8")
    if not 0 < args.prune_ratio < 1:
        sys.exit("--prune-ratio must be between 0 and 1 (the fraction of experts removed)")
    args.out.mkdir(parents=True, exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    capacity = torch.cuda.mem_get_info()[1] if args.device.startswith("cuda") else H200_BYTES
    clock = Clock(args.max_minutes)
    gen_device = args.device if args.device.startswith("cuda") else "cpu"
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, shape.vocab - 8, (args.prompts, args.prompt_tokens), generator=generator)
    runs, projections = [], []
    for done, fmt in enumerate(formats):
        if clock.left() < 0:
            log(f"{fmt}: skipped (--max-minutes reached)")
            continue
        whole = clock
        clock = Clock(whole.left() / (len(formats) - done) / 60)  # this format's share of the time left
        work = Path(tempfile.mkdtemp(prefix=f"bench-check-{fmt}-", dir=args.workdir))
        try:
            per_layer_disk = (3 * shape.experts * shape.hidden * shape.inter) * (0.53 if fmt == "awq" else 1.0)
            free = shutil.disk_usage(work).free
            layers = max(1, min(args.layers, int(0.8 * free / (1.7 * per_layer_disk))))
            log(f"{fmt}: writing {layers} layers under {work} (free disk {free / 1e9:.0f} GB)")
            layers = write_checkpoint(work / "original", fmt, shape, layers, gen_device, clock, args.write_minutes)
            from reap_vlm.checkpoint.reader import Checkpoint

            kept = shape.experts - int(round(shape.experts * args.prune_ratio))
            rng = random.Random(0)
            keep = {layer: sorted(rng.sample(range(shape.experts), kept))
                    for layer in Checkpoint(work / "original").moe_layers}
            start = time.perf_counter()
            prune_checkpoint(work / "original", work / "pruned", keep, progress=False)
            log(f"{fmt}: pruned copy ({kept} of {shape.experts} experts) in {time.perf_counter() - start:.1f}s")
            original, out = measure(work / "original", "original", fmt, args, clock, prompts, keep=keep)
            pruned, _ = measure(work / "pruned", "pruned", fmt, args, clock, prompts, forced=out.get("forced"),
                                reference=out.get("masked"))
            if "logits" in out and not args.no_exactness:
                exactness(work / "original", original, args, clock, out["forced"], out["logits"])
            runs += [original, pruned]
            for run, folder in ((original, work / "original"), (pruned, work / "pruned")):
                projections.append(project(run, layer_bytes(folder), shape, capacity, args.new_tokens))
        finally:
            shutil.rmtree(work, ignore_errors=True)
            clock = whole
    wall = clock.limit - clock.left()
    text = report(runs, projections, args, shape, capacity, wall)
    print("\n" + text)
    (args.out / "RESULTS_check_packed.md").write_text(text)
    payload = {"shape": asdict(shape), "device": args.device_name, "wall_s": wall, "argv": args.argv,
               "runs": [asdict(r) for r in runs], "projections": projections}
    (args.out / "RESULTS_check_packed.json").write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
