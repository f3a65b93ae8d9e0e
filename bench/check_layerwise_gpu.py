"""Layer-wise engine == whole-model engine on a GPU (the CUDA paths: pinned host prefetch, side-stream
device prefetch, chunked transposing copies, hidden states in pinned host memory).

    python3 bench/check_layerwise_gpu.py [--dtype float32|bfloat16]

Builds the tiny offline fixture (images, deepstack on), scores it with ``reap_vlm.score.engine.run_batches`` on the
whole model and with ``run_layerwise`` in several configurations, and prints the largest relative
difference of any sum.  Exit status 1 when float32 differs by more than 1e-5.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reap_vlm.calibration.files import load_calibration  # noqa: E402
from reap_vlm.checkpoint.loading import load_model, load_processor  # noqa: E402
from reap_vlm.checkpoint.reader import Checkpoint  # noqa: E402
from reap_vlm.fixtures.tiny import build_calibration_set, build_tiny_checkpoint  # noqa: E402
from reap_vlm.score.engine import run_batches  # noqa: E402
from reap_vlm.score.hooks import ReapObserver  # noqa: E402
from reap_vlm.score.layerwise import run_layerwise  # noqa: E402
from reap_vlm.score.stats import ExpertStats  # noqa: E402


def max_rel(a: ExpertStats, b: ExpertStats) -> float:
    worst = 0.0
    for layer in a.layers:
        x, y = a.layers[layer], b.layers[layer]
        if (x.n_tokens, x.n_image_tokens) != (y.n_tokens, y.n_image_tokens):
            return float("inf")
        for name in x.sums:
            scale = x.sums[name].abs().max().clamp(min=1e-30)
            worst = max(worst, float((x.sums[name] - y.sums[name]).abs().max() / scale))
    return worst


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    device = "cuda"
    root = Path(tempfile.mkdtemp(prefix="reap-check-"))
    model_path = build_tiny_checkpoint(root / "model")
    calib = load_calibration(build_calibration_set(root / "calib") / "calibration_data.json", 100)
    ckpt = Checkpoint(model_path)
    processor = load_processor(model_path)
    run = dict(batch_size=3, max_seq_len=256, max_pixels=0, resume=None, checkpoint_every=1, device=device)
    model = load_model(model_path, dtype=dtype, device=device)
    failed = False
    for mode in ("routed", "full"):
        ref = ExpertStats.empty(ckpt.moe_layers, ckpt.num_experts, device)
        run_batches(model, processor, calib.samples, ReapObserver(ckpt.family, ref, mode), **run)
        for label, kw in (("prefetch host, hidden on GPU", {}),
                          ("prefetch device", {"prefetch": "device"}),
                          ("hidden in pinned host memory", {"storage": "host"}),
                          ("one batch a group", {"max_group_bytes": 1})):
            stats = ExpertStats.empty(ckpt.moe_layers, ckpt.num_experts, device)
            out = run_layerwise(ckpt, processor, calib.samples, ReapObserver(ckpt.family, stats, mode), dtype=dtype,
                                **run, **kw)
            err = max_rel(ref, stats)
            bad = dtype == torch.float32 and not err <= 1e-5
            failed |= bad
            print(f"{mode:<7} {label:<32} groups {out['groups']}  image tokens {stats.n_image_tokens:>4}  "
                  f"max rel diff {err:.2e}  {'FAIL' if bad else 'ok'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
