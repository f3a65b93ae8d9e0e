#!/usr/bin/env python3
"""Throughput and memory of the streaming pruner against a plain file copy, on a generated checkpoint.

Generates a Qwen3-VL-MoE-shaped checkpoint (every parameter of the real model class, fused bf16 experts in the
official on-disk layout, shards of --shard-mb; about 3 GB with the defaults) under --workdir; times
shutil.copyfile (+ fsync, as the pruner syncs too) of its shards, the pruner in a child process, and a copy of
the pruned shards (the same bytes the pruner wrote); prints a table and removes everything it generated.

    .venv/bin/python bench/bench_prune.py --workdir /tmp
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAUNCHER = """
import json, resource, subprocess, sys
code = subprocess.run(sys.argv[1:]).returncode
print(json.dumps({"ru_maxrss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))  # KiB on Linux
sys.exit(code)
"""
# Runs in the child: prune, then report its own high-water mark (VmHWM) and the RSS it started from.
CHILD = """
import json, sys, time
from pathlib import Path
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
from reap_vlm.prune.rewrite import prune_checkpoint
baseline = status("VmRSS")
args = json.loads(sys.argv[1])
start = time.perf_counter()
record = prune_checkpoint(Path(args["source"]), Path(args["output"]), {int(k): v for k, v in args["keep"].items()},
                          progress=False, verify=args["verify"])
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "baseline_rss": baseline, "vm_hwm": status("VmHWM"), "record": record}))
"""


def bench_config(layers: int, experts: int, hidden: int, inter: int) -> dict:
    from reap_vlm.fixtures.tiny import FixtureSpec, fixture_config

    spec = FixtureSpec(hidden_size=hidden, moe_intermediate_size=inter, intermediate_size=4 * inter,
                       num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=4, head_dim=64,
                       num_experts=experts, num_experts_per_tok=8, dtype="bfloat16")
    ids = {name: i for i, name in enumerate(("<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>",
                                               "<|vision_start|>", "<|vision_end|>"), start=151643)}
    return fixture_config(spec, {**ids, "__size__": 151936})


def disk_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every parameter of the real model class, as the official checkpoint names and lays it out on disk."""
    from accelerate import init_empty_weights
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    from reap_vlm.families import QWEN3_VL_MOE, KeyRole

    with init_empty_weights():
        model = Qwen3VLMoeForConditionalGeneration(Qwen3VLMoeConfig(**config))
    shapes = {}
    for key, tensor in model.state_dict().items():
        info = QWEN3_VL_MOE.classify(key)
        layout = QWEN3_VL_MOE.fused_layout(info.name) if info.role is KeyRole.FUSED_EXPERTS else None
        shape = tuple(tensor.shape)
        shapes[key] = (shape[0], shape[2], shape[1]) if layout and layout.memory != layout.disk else shape
    return shapes


def write_checkpoint(folder: Path, config: dict, shard_bytes: int) -> tuple[int, int]:
    """Random bf16 weights in shards of about ``shard_bytes``; returns (total tensor bytes, largest tensor)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shapes = disk_shapes(config)
    groups, current, size = [], [], 0
    for key, shape in shapes.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        if current and size + nbytes > shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    groups.append(current)
    weight_map, total, largest = {}, 0, 0
    generator = torch.Generator().manual_seed(0)
    for i, keys in enumerate(groups, 1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: torch.empty(shapes[k], dtype=torch.bfloat16).normal_(std=0.02, generator=generator)
                   for k in keys}
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        for key, tensor in tensors.items():
            weight_map[key] = name
            total += tensor.numel() * 2
            largest = max(largest, tensor.numel() * 2)
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total, largest


def plain_copy(source: Path, target: Path) -> tuple[int, float]:
    target.mkdir()
    shards = sorted(source.glob("*.safetensors"))
    start = time.perf_counter()
    for shard in shards:
        shutil.copyfile(shard, target / shard.name)
        with open(target / shard.name, "rb") as handle:
            os.fsync(handle.fileno())
    return sum(s.stat().st_size for s in shards), time.perf_counter() - start


def prune_in_child(source: Path, output: Path, keep: dict[int, list[int]], verify: bool) -> dict:
    """Prune in a child started by a small launcher: a child forked from this (large) process would count our
    pages in its ru_maxrss until it execs."""
    args = json.dumps({"source": str(source), "output": str(output), "keep": keep, "verify": verify})
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", LAUNCHER, sys.executable, "-c", CHILD, args], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"pruning failed:\n{done.stderr}")
    *_, child, launcher = done.stdout.strip().splitlines()
    return {**json.loads(child), **json.loads(launcher), "wall": wall}


def import_only_rss() -> int:
    """ru_maxrss of a child that imports the pruner and exits: the constant every run pays (torch's import and
    interpreter shutdown), to set the pruning child's figure against."""
    done = subprocess.run([sys.executable, "-c", LAUNCHER, sys.executable, "-c", "import reap_vlm.prune.rewrite"],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(done.stdout.strip().splitlines()[-1])["ru_maxrss"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp"), help="where the checkpoints go (default /tmp)")
    parser.add_argument("--layers", type=int, default=8, help="MoE decoder layers (default 8)")
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--moe-intermediate", type=int, default=384)
    parser.add_argument("--shard-mb", type=int, default=600, help="target shard size (default 600 MB)")
    parser.add_argument("--prune-ratio", type=float, default=0.4)
    parser.add_argument("--verify", action="store_true", help="also time a separate pruning run with --verify")
    parser.add_argument("--keep", action="store_true", help="leave the generated files in place")
    args = parser.parse_args()

    config = bench_config(args.layers, args.experts, args.hidden, args.moe_intermediate)
    kept = args.experts - int(args.experts * args.prune_ratio)
    rng = random.Random(0)
    keep = {layer: sorted(rng.sample(range(args.experts), kept)) for layer in range(args.layers)}
    work = Path(tempfile.mkdtemp(prefix="reap-bench-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        total, largest = write_checkpoint(work / "source", config, args.shard_mb << 20)
        shards = sorted((work / "source").glob("*.safetensors"))
        print(f"generated {total / 1e9:.2f} GB in {len(shards)} shards "
              f"({min(s.stat().st_size for s in shards) / 1e6:.0f}-{max(s.stat().st_size for s in shards) / 1e6:.0f}"
              f" MB) in {time.perf_counter() - t0:.0f}s; keeping {kept} of {args.experts} experts "
              f"in {args.layers} layers", flush=True)
        os.sync()  # the generated shards' writeback must not slow down the first measurement
        copied, copy_s = plain_copy(work / "source", work / "copy")
        shutil.rmtree(work / "copy")
        os.sync()
        pruned = prune_in_child(work / "source", work / "pruned", keep, verify=False)
        written = pruned["record"]["bytes_written"]
        os.sync()
        # Writing less is most of the pruner's gain; copying the same bytes it wrote isolates the mechanism.
        same, same_s = plain_copy(work / "pruned", work / "copy-pruned")
        shutil.rmtree(work / "copy-pruned")
        rows = [("plain copy of the source shards", copied, copy_s),
                ("pruner (sendfile+fsync)", written, pruned["seconds"]),
                ("plain copy of the pruned shards", same, same_s)]
        if args.verify:
            verified = prune_in_child(work / "source", work / "verified", keep, verify=True)
            rows.append((f"pruner --verify (forward {verified['record']['verify']['forward'][:7]})", written,
                         verified["seconds"]))
        print(f"\n{'':34} {'bytes written':>15} {'seconds':>9} {'MB/s':>9}")
        for label, nbytes, seconds in rows:
            print(f"{label:34} {nbytes:>15,} {seconds:>9.2f} {nbytes / seconds / 1e6:>9.0f}")
        mbps = written / pruned["seconds"]
        print(f"{'pruner / copy, MB/s, same bytes':34} {'':>15} {'':>9} {mbps / (same / same_s):>9.2f}")
        print(f"{'pruner / copy, MB/s, whole job':34} {'':>15} {'':>9} {mbps / (copied / copy_s):>9.2f}")
        print(f"{'pruner / copy, seconds, whole job':34} {'':>15} {pruned['seconds'] / copy_s:>9.2f}")
        print(f"{'pruner incl. process start':34} {'':>15} {pruned['wall']:>9.2f}")
        print(f"\nsource read by the pruner     {total / 1e9:.2f} GB of tensors ({pruned['record']['tensors']})")
        print(f"largest tensor                {largest / 2**20:>8.0f} MiB")
        mib = 2**20
        print(f"pruning process peak RSS      {pruned['vm_hwm'] / mib:>8.0f} MiB VmHWM after pruning, "
              f"{pruned['ru_maxrss'] / mib:.0f} MiB ru_maxrss (RUSAGE_CHILDREN, includes interpreter shutdown)")
        print(f"  RSS before pruning          {pruned['baseline_rss'] / mib:>8.0f} MiB (Python + torch imports)")
        print(f"  growth while pruning        {(pruned['vm_hwm'] - pruned['baseline_rss']) / mib:>8.0f} MiB")
        print(f"  import-only child           {import_only_rss() / mib:>8.0f} MiB ru_maxrss (same launcher)")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
