"""Why a model's first pass over new sequence lengths is slow (issue 18): per-batch seconds of the text decoder
(Qwen3-VL-30B-A3B's layer shape, random weights, built in memory) over batches of distinct padded lengths, first
pass then second pass, each setting in a fresh process (no plan or allocator cache carried over): PyTorch's default
SDPA backends, cuDNN attention off, lengths longest first, the allocator's expandable segments, lengths rounded to
multiples of 128; then a profile of one first-pass batch against the same batch again, the ops that differ most.

    python3 bench/bench_first_pass.py            # GPU, ~2 min
    python3 bench/bench_first_pass.py --tiny     # CPU check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

SETTINGS = {  # name: (cuDNN SDPA on, order, allocator conf, lengths)
    "default SDPA": (True, "ascending", "", "distinct"),
    "cuDNN SDPA off": (False, "ascending", "", "distinct"),
    "longest first": (True, "descending", "", "distinct"),
    "expandable segments": (True, "ascending", "expandable_segments:True", "distinct"),
    "multiples of 128": (True, "ascending", "", "x128"),
}


def build(tiny: bool, layers: int):
    from transformers import Qwen3VLMoeTextConfig
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextModel

    cuda = torch.cuda.is_available() and not tiny
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    shape = (dict(hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144, num_attention_heads=32,
                  num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8) if cuda else
             dict(hidden_size=64, moe_intermediate_size=48, intermediate_size=96, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2))
    config = Qwen3VLMoeTextConfig(**shape, num_hidden_layers=layers, vocab_size=4096,
                                  rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20] if cuda
                                                else [2, 3, 3], "mrope_interleaved": True})
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = Qwen3VLMoeTextModel(config).to(dtype).eval()
    return model, device, cuda


def lengths_for(kind: str, order: str, top: int, count: int) -> list[int]:
    if kind == "x128":  # as many distinct lengths, each a multiple of 128
        lengths = [128 * (max(1, top // 256) + i) for i in range(count)]
    else:
        lengths = [top // 2 + (i * (top // 2)) // count + 1 for i in range(count)]
    return sorted(lengths, reverse=order == "descending")


def child(args, name: str) -> dict:
    cudnn, order, _, kind = SETTINGS.get(name, SETTINGS["default SDPA"])
    model, device, cuda = build(args.tiny, args.layers)
    if cuda:
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
    gen = torch.Generator().manual_seed(0)
    top = 2000 if cuda else 200

    def batch(length: int) -> dict:
        ids = torch.randint(0, 4096, (8, length), generator=gen)
        mask = torch.ones(8, length, dtype=torch.long)
        for row in range(1, 8):  # length-sorted batches: rows a little shorter than the longest
            mask[row, length - row * 7:] = 0
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}

    def forward(length: int) -> None:
        b = batch(length)
        with torch.inference_mode():
            model(**b, use_cache=False)
        if cuda:
            torch.cuda.synchronize()

    def run(lengths: list[int]) -> tuple[float, float]:
        if cuda:
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.thread_time()
        for length in lengths:
            forward(length)
        return time.perf_counter() - t0, time.thread_time() - c0

    forward(top // 3 - 5)  # the process's own first call apart
    lengths = lengths_for(kind, order, top, args.batches)
    mallocs = (lambda: torch.cuda.memory_stats().get("num_device_alloc", -1)) if cuda else (lambda: -1)
    m0 = mallocs()
    first = run(lengths)
    m1 = mallocs()
    second = run(lengths)
    out = {"name": name, "lengths": f"{len(set(lengths))} distinct, {min(lengths)}-{max(lengths)}",
           "first": first, "second": second, "mallocs": (m1 - m0, mallocs() - m1), "batches": len(lengths)}
    if name == "profile":
        out["profile"] = profile(forward, top // 2 - 11, cuda)
    return out


def profile(forward, length: int, cuda: bool) -> list[tuple[str, float, float]]:
    """(op, self CPU ms on the first call at a new length, on the second call) for the ops that differ most."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    def self_cpu() -> dict[str, float]:
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            forward(length)
        return {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}

    first, second = self_cpu(), self_cpu()
    rows = [(k, v, second.get(k, 0.0)) for k, v in first.items()]
    return sorted(rows, key=lambda r: r[2] - r[1])[:15]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (a check that it runs)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the 30B-A3B text model's shape")
    parser.add_argument("--batches", type=int, default=12, help="batches of distinct lengths per pass")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args, args.child)))
        return
    print("| setting | lengths | first pass s (ms/batch) | main-thread CPU s | second pass s (ms/batch) "
          "| cudaMallocs first / second |")
    print("|---|---|---|---|---|---|")
    for name in [*SETTINGS, "profile"]:
        conf = SETTINGS.get(name, (0, 0, "", 0))[2]
        env = {**os.environ, **({"PYTORCH_CUDA_ALLOC_CONF": conf} if conf else {})}
        argv = [sys.executable, __file__, "--child", name, "--layers", str(args.layers),
                "--batches", str(args.batches), *(["--tiny"] if args.tiny else [])]
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
        if done.returncode:
            print(f"| {name} | failed: {done.stderr.strip().splitlines()[-1:]} |", flush=True)
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        (f, fc), (s, _), n = r["first"], r["second"], r["batches"]
        if name != "profile":
            print(f"| {name} | {r['lengths']} | {f:.2f} ({f / n * 1e3:.0f}) | {fc:.2f} | {s:.2f} ({s / n * 1e3:.0f}) "
                  f"| {r['mallocs'][0]} / {r['mallocs'][1]} |", flush=True)
            continue
        print("\nOne batch at a new length, then again: the ops whose self CPU time differs most\n")
        print("| op | first call ms | second call ms |")
        print("|---|---|---|")
        for op, a, b in r["profile"]:
            print(f"| {op} | {a:.2f} | {b:.2f} |")


if __name__ == "__main__":
    main()
