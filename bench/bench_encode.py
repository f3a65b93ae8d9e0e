"""Encoding 1-4 MP photos for a sequence budget (CPU): reap.py's encode_sample, which encodes each photo once at a
size the processor's own token count says fits, against the version before (the count skipped the full size only:
every smaller size tried was encoded until one fit) and a processor that cannot count (every size tried encoded,
full size first).  All give the same tokens and pixels (tests/test_throughput.py); the table gives processor calls
and CPU seconds.

    python3 bench/bench_encode.py                 # ~1 min on 2 cores
    python3 bench/bench_encode.py --samples 16    # quicker
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_end_to_end as e2e  # noqa: E402

import reap_vlm.calibration.encode as encode  # noqa: E402
from reap_vlm.calibration.files import load_calibration  # noqa: E402
from reap_vlm.checkpoint.loading import load_processor  # noqa: E402
from reap_vlm.families import QWEN3_VL_MOE  # noqa: E402


def processor_folder(folder: Path) -> Path:
    """Tokenizer and processor files with the real Qwen3-VL image sizing (no weights needed to encode)."""
    if not (folder / "config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        e2e.write_processor(folder, tiny=False)
        (folder / "config.json").write_text(json.dumps({"model_type": "qwen3_vl_moe"}))
    return folder


def timed(processor, samples, budgets) -> tuple[int, float]:
    calls = [0]
    real = encode._encode

    def counted(*args):
        calls[0] += 1
        return real(*args)

    encode._encode = counted
    try:
        start = time.process_time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scaled down to fit
            for budget in budgets:
                for sample in samples:
                    encode.encode_sample(processor, sample, budget, 0, QWEN3_VL_MOE)
        return calls[0], time.process_time() - start
    finally:
        encode._encode = real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/reap_encode")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--budgets", default="2048,1024")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each; the least CPU time counts")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as an encoding worker runs
    workdir = Path(args.workdir)
    processor = load_processor(processor_folder(workdir / "processor"))
    calib = e2e.write_calibration(workdir / "calibration", "image", args.samples, (1.0, 4.0))
    samples = load_calibration(calib, args.samples).samples
    budgets = [int(b) for b in args.budgets.split(",")]
    timed(processor, samples[:2], budgets)  # first calls apart
    counting, shrink = encode.image_token_count, encode._shrink_to_fit
    inside = [False]

    def shrink_by_encoding(*args):  # before 2026-11-30: every smaller size tried was encoded
        inside[0] = True
        try:
            return shrink(*args)
        finally:
            inside[0] = False

    configs = {"reap.py": (counting, shrink),
               "counting skips full size only (before)": (lambda *a: None if inside[0] else counting(*a),
                                                         shrink_by_encoding),
               "processor that cannot count": (lambda *a: None, shrink)}
    best: dict[str, tuple[int, float]] = {}
    for _ in range(args.repeats):
        for name, (count, shrink_to_fit) in configs.items():
            encode.image_token_count, encode._shrink_to_fit = count, shrink_to_fit
            calls, cpu = timed(processor, samples, budgets)
            best[name] = min(best.get(name, (calls, cpu)), (calls, cpu), key=lambda r: r[1])
    encode.image_token_count, encode._shrink_to_fit = counting, shrink
    n = len(samples) * len(budgets)
    print(f"{args.samples} photos of 1-4 MP, budgets {budgets} ({n} encodings), one thread")
    print("| encoding | processor calls | CPU s | ms per sample |")
    print("|---|---|---|---|")
    for name, (calls, cpu) in best.items():
        print(f"| {name} | {calls} | {cpu:.2f} | {cpu / n * 1e3:.0f} |")
    ours = best["reap.py"][1]
    print(f"\nreap.py takes {ours / best['counting skips full size only (before)'][1]:.2f}x the CPU time of the "
          f"version before, {ours / best['processor that cannot count'][1]:.2f}x that of encoding every size tried")


if __name__ == "__main__":
    main()
