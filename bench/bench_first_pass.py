"""Why a model's first pass over new sequence lengths is slow (issue 18): per-batch seconds of the text decoder
(Qwen3-VL-30B-A3B's layer shape, random weights, built in memory) over batches of distinct padded lengths, first
pass then second pass, with PyTorch's default SDPA backends and with cuDNN attention off.

    python3 bench/bench_first_pass.py            # GPU, estimated ~40 s (written 2026-11-30, not yet run there)
    python3 bench/bench_first_pass.py --tiny     # CPU check
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (a check that it runs)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the 30B-A3B text model's shape")
    parser.add_argument("--batches", type=int, default=12, help="batches of distinct lengths per pass")
    args = parser.parse_args()
    from transformers import Qwen3VLMoeTextConfig
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextModel

    cuda = torch.cuda.is_available() and not args.tiny
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    shape = (dict(hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144, num_attention_heads=32,
                  num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8) if cuda else
             dict(hidden_size=64, moe_intermediate_size=48, intermediate_size=96, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2))
    config = Qwen3VLMoeTextConfig(**shape, num_hidden_layers=args.layers, vocab_size=4096,
                                  rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20] if cuda
                                                else [2, 3, 3], "mrope_interleaved": True})
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = Qwen3VLMoeTextModel(config).to(dtype).eval()
    gen = torch.Generator().manual_seed(0)
    top = 2000 if cuda else 200

    def batch(length: int) -> dict:
        ids = torch.randint(0, 4096, (8, length), generator=gen)
        mask = torch.ones(8, length, dtype=torch.long)
        for row in range(1, 8):  # length-sorted batches: rows a little shorter than the longest
            mask[row, length - row * 7:] = 0
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}

    def run(lengths: list[int]) -> list[float]:
        out = []
        for length in lengths:
            b = batch(length)
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.inference_mode():
                model(**b, use_cache=False)
            if cuda:
                torch.cuda.synchronize()
            out.append(time.perf_counter() - t0)
        return out

    run([top // 3])  # the process's own first call apart
    print("| attention | lengths | first pass s (per batch) | second pass s (per batch) |")
    print("|---|---|---|---|")
    for label, lo in (("default SDPA", 0), ("cuDNN SDPA off", 1), ("default SDPA, multiples of 128", 2)):
        if label.startswith("cuDNN") and cuda:
            torch.backends.cuda.enable_cudnn_sdp(False)
        if label.startswith("default SDPA, multiples") and cuda:
            torch.backends.cuda.enable_cudnn_sdp(True)
        span = top // 2
        lengths = [top // 2 + (i * span) // args.batches + 3 * lo + 1 for i in range(args.batches)]
        if "multiples" in label:  # as many distinct lengths, each a multiple of 128 (none seen before)
            lengths = [128 * (max(1, top // 256) + i) for i in range(args.batches)]
        first, second = run(lengths), run(lengths)
        per = [f"{sum(t):.2f} ({sum(t) / len(t) * 1e3:.0f} ms)" for t in (first, second)]
        print(f"| {label} | {len(set(lengths))} distinct, {min(lengths)}-{max(lengths)} | {per[0]} | {per[1]} |",
              flush=True)


if __name__ == "__main__":
    main()
