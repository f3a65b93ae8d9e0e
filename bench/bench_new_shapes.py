"""What a warm process still pays for each new batch shape (issue 18): reap.py's loop runs ~7% slower per batch
than its baseline on the image-heavy set, and the baseline has seen every shape before.  Plain forwards of the
whole model over the image set's batches (each batch a new padded length and a new count of image patches), in
one warm process: per setting, a group of batches not seen before, a first pass then a second; then a profile of
one new batch against the same batch again, the ops whose main-thread time differs most.

Run on the GPU machine from the repository root (one GPU):

    PYTHONUNBUFFERED=1 python3 bench/bench_new_shapes.py --out $OUT      # about 1.5 device-minutes
    python3 bench/bench_new_shapes.py --tiny --out /tmp/shapes           # CPU, tiny shapes, < 1 min

The checkpoint and calibration set are bench_end_to_end.py's (same ``--workdir``, reused when present).  Settings
(``--settings``):

* ``reap.py's kernels``: ``reap_vlm.inference.inference()`` as reap.py runs every forward;
* ``cuDNN off``: the same with cuDNN disabled altogether (the vision tower's patch embedding is a Conv3d, which
  cuDNN plans per input shape).  Not run by default: on an H200 PyTorch's own Conv3d took minutes for ten batches
  (run 26, bench/RESULTS_scoring.md), so cuDNN stays.

Writes ``RESULTS_new_shapes.md`` / ``.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_end_to_end import (  # noqa: E402
    bench_device,
    bench_identity,
    log,
    megapixels,
    pre_encode,
    reap_order,
    shared_arguments,
    spec_for,
    timed_forwards,
    write_calibration,
    write_model,
)
from bench_first_pass import profile  # noqa: E402

from reap_vlm.calibration.ahead import default_workers  # noqa: E402
from reap_vlm.checkpoint.loading import load_model, load_processor  # noqa: E402
from reap_vlm.checkpoint.reader import Checkpoint  # noqa: E402

SETTINGS = {"reap.py's kernels": nullcontext, "cuDNN off": lambda: torch.backends.cudnn.flags(enabled=False)}


def timed(model, family, batches: list[dict], device: str, setting) -> list[float]:
    with setting():
        return timed_forwards(model, family, batches, device)


def table(results: dict) -> str:
    lines = [f"# New batch shapes in a warm process ({results['device']}, {results['shape']})", "",
             f"image set, batches of {results['batch_size']}, plain forwards; per setting {results['per_group']} "
             "batches of shapes not seen before in the process, a first pass then a second.", "",
             "| setting | first pass ms/batch | second pass ms/batch | first over second |", "|---|---|---|---|"]
    for name, r in results["settings"].items():
        a, b = sum(r["first_ms"]) / len(r["first_ms"]), sum(r["second_ms"]) / len(r["second_ms"])
        lines.append(f"| {name} | {a:.0f} | {b:.0f} | {a / b:.3f}x |")
    if results.get("profile"):
        lines += ["", "One new batch, then again: the ops whose self CPU time differs most (reap.py's kernels)", "",
                  "| op | first ms | again ms |", "|---|---|---|"]
        lines += [f"| {op} | {a:.2f} | {b:.2f} |" for op, a, b in results["profile"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shared_arguments(parser, "2; --tiny 1")
    parser.add_argument("--image-samples", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--per-group", type=int, default=10, help="new batches per setting")
    parser.add_argument("--settings", default="reap.py's kernels", help=f"of: {', '.join(SETTINGS)}")
    args = parser.parse_args()
    bench_device(args)
    if args.tiny:
        args.image_samples, args.batch_size, args.max_seq_len, args.per_group = 24, 2, 512, 3
        args.workdir += "-tiny"
    workdir = Path(args.workdir)
    log("writing the checkpoint and calibration set in", workdir)
    write_model(workdir / "model", spec_for(args), args.tiny, args.device)
    calib = write_calibration(workdir / "calibration", "image", args.image_samples, megapixels(args))
    ckpt = Checkpoint(workdir / "model")
    processor = load_processor(ckpt.path)
    order = reap_order(processor, calib, args.image_samples, args, ckpt.family)
    batches, _, _ = pre_encode(processor, order.samples, args, ckpt.family, default_workers(),
                               args.device == "cuda", ckpt.config)
    model = load_model(ckpt.path, dtype=getattr(torch, args.dtype), device=args.device)
    log(f"{len(batches)} batches encoded, model loaded")
    timed(model, ckpt.family, batches[:2], args.device, nullcontext)  # the process's first forwards apart
    results = {**bench_identity(args), "batch_size": args.batch_size, "per_group": args.per_group, "settings": {}}
    start = 2
    for name in args.settings.split(","):
        setting = SETTINGS[name]
        group = batches[start:start + args.per_group]
        start += args.per_group
        first = timed(model, ckpt.family, group, args.device, setting)
        second = timed(model, ckpt.family, group, args.device, setting)
        results["settings"][name] = {"first_ms": [round(t * 1e3, 1) for t in first],
                                     "second_ms": [round(t * 1e3, 1) for t in second],
                                     "tokens": [int(b["attention_mask"].sum()) for b in group]}
        log(name, results["settings"][name])
    if start < len(batches):
        forward = partial(timed_forwards, model, ckpt.family, device=args.device)
        results["profile"] = profile(forward, batches[start:start + 1], args.device == "cuda")[:12]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "RESULTS_new_shapes.json").write_text(json.dumps(results, indent=2))
    (out / "RESULTS_new_shapes.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
