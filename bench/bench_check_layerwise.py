#!/usr/bin/env python3
"""The layer-wise check on a bf16 checkpoint larger than the GPU memory it may use: seconds per layer, peak memory,
the verdict, and the projection for the 94-layer 235B-A22B in bf16 (~470 GB, on no single GPU).

Writes a Qwen3-VL-MoE checkpoint with 235B-A22B-shaped decoder layers (hidden 4096, 64 heads / 4 KV of 128,
128 experts top-8 of intermediate 1536: ~5 GB a layer in bf16, the official fused layout, one shard per layer)
plus embeddings, a one-block vision tower (images exercise deepstack) and the LM head, as many layers as
--build-minutes allow (at most --max-layers, within the free disk); prunes it with the real pruner (--prune-ratio
0.4 keeps 77 of 128); drops both from the page cache (reads come from the disk); caps this process's GPU memory
(``torch.cuda.set_per_process_memory_fraction``) below the checkpoint's size; and runs test_pruned_model's check
with --check-mode auto, which must pick the layer-wise check and says why.  --num-prompts held-out prompts from a
generated calibration set (half with an image).

    python bench/bench_check_layerwise.py --out $OUT                  # GPU: about 3-4 minutes, ~40 GB of disk
    python bench/bench_check_layerwise.py --tiny --out /tmp/lw        # CPU, tiny shapes: under a minute

Writes RESULTS_check_layerwise.md and .json to --out; removes what it generated (unless --keep-files).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reap_vlm.check.job import run_test  # noqa: E402
from reap_vlm.check.options import TEST_FLAGS, TEST_OPTIONS  # noqa: E402
from reap_vlm.families import QWEN3_VL_MOE  # noqa: E402
from reap_vlm.fixtures.tiny import (  # noqa: E402
    FixtureSpec,
    build_calibration_set,
    fixture_config,
    write_processor_files,
    write_tokenizer,
)
from reap_vlm.prune.rewrite import prune_checkpoint  # noqa: E402
from reap_vlm.settings import parse_settings  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_check import memory_shapes  # noqa: E402  (the model's in-memory names and shapes, built on meta)
from bench_scoring import evict  # noqa: E402  (drops a folder's files from the page cache)

GiB = 1 << 30
REAL_LAYERS = 94  # Qwen3-VL-235B-A22B
H200_BYTES = 141 * 10**9
SHAPE_235B = dict(hidden_size=4096, num_attention_heads=64, num_key_value_heads=4, head_dim=128, num_experts=128,
                  num_experts_per_tok=8, moe_intermediate_size=1536, intermediate_size=12288, vision_depth=1,
                  vision_hidden_size=256, vision_intermediate_size=1024, vision_heads=4, deepstack_visual_indexes=(0,),
                  dtype="bfloat16")
SHAPE_TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=12,
                  num_experts_per_tok=4, moe_intermediate_size=48, intermediate_size=112, vision_depth=1,
                  deepstack_visual_indexes=(0,), dtype="bfloat16")


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def random_tensors(shapes: dict[str, tuple[int, ...]], device: str,
                   generator: torch.Generator) -> dict[str, torch.Tensor]:
    """bf16 weights: norms 1, everything else N(0, 0.02) (routing then spreads over the experts)."""
    out = {}
    for key, shape in shapes.items():
        if "norm" in key.rsplit(".", 2)[-2]:
            out[key] = torch.ones(shape, dtype=torch.bfloat16, device=device)
        else:
            out[key] = torch.empty(shape, dtype=torch.bfloat16, device=device).normal_(std=0.02, generator=generator)
    return out


def write_part(folder: Path, name: str, tensors: dict[str, torch.Tensor], weight_map: dict[str, str]) -> int:
    from safetensors.torch import save_file

    disk = {k: v.contiguous().cpu() for k, v in QWEN3_VL_MOE.to_checkpoint_layout(tensors, per_expert=False).items()}
    save_file(disk, str(folder / name), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(disk, name))
    return sum(t.numel() * t.element_size() for t in disk.values())


def build_checkpoint(folder: Path, shape: dict, vocab: int | None, max_layers: int, min_layers: int,
                     seconds: float, device: str, keep: float) -> dict:
    """The checkpoint, a shard per decoder layer, as many layers as ``seconds`` and the disk allow (with room for
    the pruned copy, ``keep`` of each layer)."""
    folder.mkdir(parents=True)
    token_ids = write_tokenizer(folder)
    write_processor_files(folder)
    config = fixture_config(FixtureSpec(num_hidden_layers=1, **shape), token_ids)
    if vocab:
        config["text_config"]["vocab_size"] = vocab
    shapes = memory_shapes(config)
    layer0 = {k: s for k, s in shapes.items() if ".layers.0." in k and ".language_model." in k}
    rest = {k: s for k, s in shapes.items() if k not in layer0}
    generator = torch.Generator(device).manual_seed(0)
    weight_map: dict[str, str] = {}
    start = time.perf_counter()
    bytes_rest = write_part(folder, "model-rest.safetensors", random_tensors(rest, device, generator), weight_map)
    layer_bytes, layers = 0, 0
    while layers < max_layers:
        free = shutil.disk_usage(folder).free
        pruned_copy = bytes_rest + (layers + 1) * layer_bytes * keep
        if layer_bytes and free < layer_bytes + pruned_copy + 4 * GiB:  # this layer, then the pruned copy of all
            log(f"  disk: {free / GiB:.0f} GiB free, stopping at {layers} layers")
            break
        if layers >= min_layers and time.perf_counter() - start > seconds:
            break
        tensors = {k.replace(".layers.0.", f".layers.{layers}."): t
                   for k, t in random_tensors(layer0, device, generator).items()}
        layer_bytes = write_part(folder, f"model-layer-{layers:03d}.safetensors", tensors, weight_map)
        del tensors
        layers += 1
        log(f"  layer {layers}: {layer_bytes / GiB:.2f} GiB, {time.perf_counter() - start:.0f} s")
    config["text_config"]["num_hidden_layers"] = layers
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    total = bytes_rest + layers * layer_bytes
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    evict(folder)
    return {"layers": layers, "layer_bytes": layer_bytes, "rest_bytes": bytes_rest, "bytes": total,
            "seconds": time.perf_counter() - start}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def run_check(original: Path, pruned: Path, calibration: Path, out: Path, args, device: str) -> dict:
    argv = ["--model", str(pruned), "--reference", str(original), "--calibration", str(calibration),
            "--output", str(out), "--num-prompts", str(args.prompts), "--device", device,
            "--dtype", "bfloat16" if device == "cuda" else "float32",
            "--check-mode", "layerwise" if args.tiny else "auto"]
    settings = parse_settings("bench", TEST_OPTIONS, argv, flags=TEST_FLAGS, environ={})
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    outcome = run_test(settings)
    seconds = time.perf_counter() - start
    report = outcome.report
    return {"seconds": seconds, "verdict": report["verdict"], "check_mode": report["check_mode"],
            "timing": report["seconds"], "summary": report["summary"],
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None}


def project(res: dict) -> dict:
    """The 94-layer 235B-A22B bf16: the measured per-layer time and the measured overhead (pre-layer parts, head,
    setup), which does not grow with depth; the memory is one layer's, as measured."""
    built, check = res["checkpoint"], res["check"]
    per_layer = check["timing"]["seconds_per_layer"]
    overhead = check["seconds"] - sum(check["timing"]["per_layer"])
    pruned_layer = (res["pruned_bytes"] - built["rest_bytes"]) / built["layers"]
    return {"layers": REAL_LAYERS, "seconds_per_layer": per_layer,
            "seconds": overhead + REAL_LAYERS * per_layer, "overhead_seconds": overhead,
            "original_bytes": built["rest_bytes"] + REAL_LAYERS * built["layer_bytes"],
            "pruned_bytes": int(built["rest_bytes"] + REAL_LAYERS * pruned_layer),
            "peak_gpu_bytes": check["peak_gpu_bytes"]}


def markdown(res: dict) -> str:
    built, check, proj = res["checkpoint"], res["check"], res["projection"]
    gb = lambda n: "n/a" if n is None else f"{n / GiB:.1f} GiB"  # noqa: E731
    peak = proj["peak_gpu_bytes"]
    fits = "" if peak is None else f": {'within' if peak < H200_BYTES else 'over'} one 141 GB H200's memory"
    lines = ["# The layer-wise check on a checkpoint larger than the GPU memory cap", "",
             f"`{res['command']}` on {res['device']}", "",
             "| what | value |", "|---|---|",
             f"| decoder layers written (235B-A22B-shaped) | {built['layers']} x {gb(built['layer_bytes'])} |",
             f"| original / pruned checkpoint | {gb(built['bytes'])} / {gb(res['pruned_bytes'])} |",
             f"| GPU memory cap (set_per_process_memory_fraction) | {gb(res['cap_bytes'])} |",
             f"| build / prune | {built['seconds']:.0f} s / {res['prune_seconds']:.0f} s |",
             f"| check mode chosen | {check['check_mode']['mode']}: {check['check_mode']['why']} |",
             f"| seconds per layer (original + pruned layer, {res['prompts']} prompts) | "
             f"{check['timing']['seconds_per_layer']:.2f} |",
             f"| read throughput while checking (both models, from disk) | {res['read_gbps']:.2f} GB/s |",
             f"| whole check | {check['seconds']:.1f} s |",
             f"| peak GPU memory | {gb(check['peak_gpu_bytes'])} |",
             f"| peak host memory (RSS, building included) | {gb(res['peak_rss_bytes'])} |",
             f"| verdict | {check['verdict'].replace('|', '/')} |", "",
             f"## Projection: {proj['layers']}-layer 235B-A22B in bf16", "",
             f"- original {gb(proj['original_bytes'])}, pruned {gb(proj['pruned_bytes'])} on disk: neither "
             "fits whole on one GPU; the layer-wise check holds one layer at a time",
             f"- check time: {proj['overhead_seconds']:.0f} s + {proj['layers']} x "
             f"{proj['seconds_per_layer']:.2f} s = {proj['seconds'] / 60:.1f} min for {res['prompts']} prompts "
             "(a layer's time is reading one original and one pruned layer and running the prompts through both)",
             f"- peak GPU memory {gb(proj['peak_gpu_bytes'])}, as measured (one layer at a time, whatever the "
             f"depth){fits}", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for RESULTS_check_layerwise.md / .json")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (a minute)")
    parser.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temporary folder)")
    parser.add_argument("--max-layers", type=int, default=5, help="235B-shaped layers: ~5 GB each, 3 GB pruned")
    parser.add_argument("--build-minutes", type=float, default=1.5, help="stop adding layers after this long")
    parser.add_argument("--max-minutes", type=float, default=9.0, help="skip the check if building took this long")
    parser.add_argument("--cap-gib", type=float, default=None,
                        help="GPU memory cap (default: 1.5 layers + 3 GiB, below the checkpoint's size)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prune-ratio", type=float, default=0.4)
    parser.add_argument("--keep-files", action="store_true")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    shape = SHAPE_TINY if args.tiny else SHAPE_235B
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-check-lw-"))
    work.mkdir(parents=True, exist_ok=True)
    original, pruned = work / "original", work / "pruned"
    for folder in (original, pruned, work / "report"):
        shutil.rmtree(folder, ignore_errors=True)
    try:
        log(f"writing the checkpoint ({'tiny' if args.tiny else '235B-A22B-shaped layers'}) under {work}")
        log(f"{shutil.disk_usage(work).free / GiB:.0f} GiB free on disk")
        built = build_checkpoint(original, shape, None if args.tiny else 151936, 2 if args.tiny else args.max_layers,
                                 2 if args.tiny else 3, 0 if args.tiny else args.build_minutes * 60, device,
                                 1 - args.prune_ratio)
        experts = shape["num_experts"]
        kept = round(experts * (1 - args.prune_ratio))
        keep = {i: sorted(random.Random(i).sample(range(experts), kept)) for i in range(built["layers"])}
        start = time.perf_counter()
        prune_checkpoint(original, pruned, keep, progress=False)
        prune_seconds = time.perf_counter() - start
        evict(pruned)
        log(f"pruned to {kept}/{experts} experts in {prune_seconds:.0f} s")
        calibration = build_calibration_set(work / "calibration") / "calibration_data.json"
        cap = None
        if device == "cuda":
            layer_cap = int(1.5 * built["layer_bytes"] + 3 * GiB)
            cap = int(args.cap_gib * GiB) if args.cap_gib else layer_cap
            if cap >= built["bytes"]:
                raise SystemExit(f"the checkpoint ({built['bytes'] / GiB:.1f} GiB) is not larger than the cap "
                                 f"({cap / GiB:.1f} GiB): raise --max-layers / --build-minutes or lower --cap-gib")
            torch.cuda.empty_cache()  # the build's cached blocks would count against the cap
            torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory, 0)
        if (time.perf_counter() - t0) / 60 > args.max_minutes:
            raise SystemExit(f"building took more than --max-minutes {args.max_minutes}: the check was not run")
        log(f"checking (cap {'none' if cap is None else f'{cap / GiB:.1f} GiB'})")
        check = run_check(original, pruned, calibration, work / "report", args, device)
        per_layer = check["timing"]["per_layer"]
        both = folder_bytes(original) + folder_bytes(pruned) - built["rest_bytes"] * 2
        res = {"command": "python bench/bench_check_layerwise.py " + " ".join(argv if argv is not None else
                                                                              sys.argv[1:]),
               "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "prompts": args.prompts,
               "checkpoint": built, "pruned_bytes": folder_bytes(pruned), "experts": experts, "kept_experts": kept,
               "prune_seconds": prune_seconds, "cap_bytes": cap, "check": check,
               "read_gbps": both / max(sum(per_layer), 1e-9) / 1e9,
               "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        res["projection"] = project(res)
    finally:
        if not args.keep_files:
            shutil.rmtree(work, ignore_errors=True)
    text = markdown(res)
    (out / "RESULTS_check_layerwise.md").write_text(text)
    (out / "RESULTS_check_layerwise.json").write_text(json.dumps(res, indent=2, default=str))
    print(text)
    return 0 if check["verdict"].startswith("PASS") and check["check_mode"]["mode"] == "layerwise" else 1


if __name__ == "__main__":
    sys.exit(main())
