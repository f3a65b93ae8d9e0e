"""A fresh process's first forwards (issue 18): what they cost over the same forwards warm, and how much of it a
warm-up done while the model loads takes away.

Run on the GPU machine from the repository root (one GPU):

    PYTHONUNBUFFERED=1 python3 bench/bench_first_batch.py --out $OUT        # about 2 device-minutes
    python3 bench/bench_first_batch.py --tiny --out /tmp/first              # CPU, tiny shapes, < 1 min

The checkpoint and calibration sets are bench_end_to_end.py's (same ``--workdir``, reused when present).  Per variant
a fresh process: the first ``--batches`` batches of the image set (reap.py's order) encoded into pinned memory, the
variant's warm-up started on a side thread, the model loaded, the warm-up joined, then the batches' plain forwards
(reap.py's attention kernels), timed one by one: the process's first forwards; then the same batches again, warm.
Variants:

* ``cold``: no warm-up (reap.py's first batches before its warm-up);
* ``libs``: reap.py's ``start_cuda_libraries`` (reap_vlm/score/warmup.py) on the side thread during the load: a
  matmul, a batched matmul, a Conv3d and scaled-dot-product attention in the model's dtype at its widths, so that
  cuBLAS, cuBLASLt and cuDNN start and create their handles and workspaces;
* ``reserve``: after the load, reap.py's ``reserve_memory``: one block taken into the caching allocator and given
  back, so it holds the memory the first forward would ask the driver for;
* ``libs+reserve``: both;
* ``libs+kernels+reserve``: reap.py's warm-up since runs 47-48: also ``load_forward_kernels`` on the side thread after
  the libraries (the forward's other kernels launched once on small tensors, so CUDA loads them during the load);
* ``model``: the upper bound: the last of the batches run once before the timed ones.

``--profile``: per variant, one more fresh process whose first batch runs under PyTorch's profiler, then again:
the host milliseconds of its CUDA runtime and driver calls, cold and warm, summed per kernel launched (a launch
counts as its kernel; other calls by name), the largest differences listed.  A launch that loads its kernel (CUDA
loads each at its first launch) takes milliseconds where a warm one takes microseconds.  Apart from the timed
processes, which the profiler would slow.

Writes ``RESULTS_first_batch.md`` / ``.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_end_to_end import (  # noqa: E402
    Clock,
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
    write_results,
)

from reap_vlm.calibration.ahead import default_workers  # noqa: E402
from reap_vlm.checkpoint.loading import load_model, load_processor  # noqa: E402
from reap_vlm.checkpoint.reader import Checkpoint  # noqa: E402
from reap_vlm.score.warmup import (  # noqa: E402
    load_forward_kernels,
    model_widths,
    reserve_memory,
    start_cuda_libraries,
)

VARIANTS = ("cold", "libs", "reserve", "libs+reserve", "libs+kernels+reserve", "model")


def one_variant(args) -> dict:
    """In this (fresh) process: the variant's first forwards and the same forwards warm."""
    model_dir = Path(args.workdir) / "model"
    calib = Path(args.workdir) / "calibration" / "image.json"
    ckpt = Checkpoint(model_dir)
    processor = load_processor(model_dir)
    order = reap_order(processor, calib, args.image_samples, args, ckpt.family)
    cuda = args.device == "cuda"
    dtype = getattr(torch, args.dtype)
    batches, _, _ = pre_encode(processor, order.samples[:args.batches * args.batch_size], args, ckpt.family,
                               default_workers(), cuda, ckpt.config)
    warm_s = [0.0]

    def libraries():
        t0 = time.perf_counter()
        start_cuda_libraries(args.device, dtype, **model_widths(ckpt))
        if "kernels" in args.variant:
            load_forward_kernels(args.device, dtype, **model_widths(ckpt))
        warm_s[0] = time.perf_counter() - t0

    thread = threading.Thread(target=libraries) if "libs" in args.variant and cuda else None
    t0 = time.perf_counter()
    if thread is not None:
        thread.start()
    model = load_model(model_dir, dtype=dtype, device=args.device)
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    if thread is not None:
        thread.join()
    if "reserve" in args.variant and cuda:
        reserve_memory(args.device)
    if args.variant == "model":
        timed_forwards(model, ckpt.family, batches[-1:], args.device)
    waited_s = time.perf_counter() - t1
    if args.profile:
        return {"variant": args.variant, **first_calls(lambda: timed_forwards(model, ckpt.family, batches[:1],
                                                                              args.device))}
    first = timed_forwards(model, ckpt.family, batches, args.device)
    again = timed_forwards(model, ckpt.family, batches, args.device)
    return {"variant": args.variant, "load_s": load_s, "warm_up_s": warm_s[0], "after_load_s": waited_s,
            "first_ms": [round(t * 1e3, 1) for t in first], "again_ms": [round(t * 1e3, 1) for t in again],
            "tokens": [int(b["attention_mask"].sum()) for b in batches],
            "extra_ms": round(sum(first) * 1e3 - sum(again) * 1e3, 1)}


def runtime_calls(run) -> dict[str, float]:
    """Host milliseconds of ``run()``'s CUDA runtime and driver calls, summed per kernel launched (by the
    launch's correlation with its kernel) or per call's name."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.loads(Path(f.name).read_text())["traceEvents"]
    kernels = {e["args"]["correlation"]: e["name"] for e in events
               if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "correlation" in e.get("args", {})}
    calls: dict[str, float] = {}
    for e in events:
        if e.get("cat") in ("cuda_runtime", "cuda_driver"):
            key = kernels.get(e.get("args", {}).get("correlation"), "call " + e["name"])[:200]
            calls[key] = calls.get(key, 0.0) + e.get("dur", 0) / 1e3
    if not calls:  # a profiler that names its categories otherwise: say which it used
        calls = {"categories seen: " + ", ".join(sorted({str(e.get("cat")) for e in events})): 0.0}
    return calls


def first_calls(run, top: int = 40) -> dict:
    """``run()`` profiled twice (cold, then warm): the runtime calls' host milliseconds in all and the ``top``
    kernels or calls by the difference."""
    cold, warm = runtime_calls(run), runtime_calls(run)
    rows = sorted(((k, cold[k], warm.get(k, 0.0)) for k in cold), key=lambda r: r[2] - r[1])[:top]
    return {"cold_ms": round(sum(cold.values()), 1), "warm_ms": round(sum(warm.values()), 1),
            "kernels_cold": len(cold), "top": [[k, round(c, 2), round(w, 2)] for k, c, w in rows]}


def table(results: dict) -> str:
    rows = results["variants"]
    n = max((len(r["first_ms"]) for r in rows), default=0)
    lines = [f"# A fresh process's first forwards ({results['device']}, {results['shape']})", "",
             f"image set, batches of {results['batch_size']}, tokens per batch {rows[0]['tokens'] if rows else []}; "
             "plain forward, reap.py's attention kernels; each variant a fresh process. Extra: the first forwards' "
             "sum over the same forwards run again.", "",
             "| variant | load s | warm-up s (side thread) | after the load s | "
             + " | ".join(f"batch {i} ms (again)" for i in range(n)) + " | extra ms |",
             "|---|---|---|---|" + "---|" * n + "---|"]
    for r in rows:
        cells = " | ".join(f"{a:.0f} ({b:.0f})" for a, b in zip(r["first_ms"], r["again_ms"]))
        lines.append(f"| {r['variant']} | {r['load_s']:.1f} | {r['warm_up_s']:.2f} | {r['after_load_s']:.2f} | "
                     f"{cells} | {r['extra_ms']:.0f} |")
    for prof in results.get("profiles", []):
        lines += ["", f"{prof['variant']}, profiled: the first batch's CUDA runtime and driver calls took "
                      f"{prof['cold_ms']:.0f} ms of host time, {prof['warm_ms']:.0f} ms again ({prof['kernels_cold']} "
                      "kernels or calls); the largest differences:", "", "| kernel or call | cold ms | warm ms |",
                  "|---|---|---|"]
        lines += [f"| `{k[:120]}` | {c:.2f} | {w:.2f} |" for k, c, w in prof["top"]]
    if results["not_run"]:
        lines += ["", "Not run: " + "; ".join(results["not_run"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shared_arguments(parser, "3; --tiny 1")
    parser.add_argument("--image-samples", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--batches", type=int, default=3, help="batches timed per process")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # the child process's
    parser.add_argument("--profile", action="store_true",
                        help="per variant, one more fresh process whose first batch's CUDA runtime and driver calls "
                             "are profiled, cold then warm")
    args = parser.parse_args()
    bench_device(args)
    if args.tiny:
        args.image_samples, args.batch_size, args.max_seq_len = 12, 4, 512
        args.workdir += "-tiny"
    if args.variant is not None:
        print("RESULT " + json.dumps(one_variant(args)), flush=True)
        return
    clock = Clock(args.max_minutes or (1 if args.tiny else 3))
    workdir = Path(args.workdir)
    log("writing the checkpoint and calibration sets in", workdir)
    write_model(workdir / "model", spec_for(args), args.tiny, args.device)
    write_calibration(workdir / "calibration", "image", args.image_samples, megapixels(args))
    results = {**bench_identity(args), "batch_size": args.batch_size, "variants": [], "profiles": [],
               "not_run": clock.skipped}
    passed = [f"--workdir={args.workdir.removesuffix('-tiny')}", f"--layers={args.layers}", f"--vision={args.vision}",
              f"--image-samples={args.image_samples}", f"--batch-size={args.batch_size}",
              f"--max-seq-len={args.max_seq_len}", f"--batches={args.batches}",
              *(["--tiny"] if args.tiny else [])]
    longest = 30.0
    runs = [(v, False) for v in args.variants.split(",")]
    runs += [(v, True) for v in args.variants.split(",") if args.profile]
    for variant, profiled in runs:
        name = f"{variant}{' profiled' if profiled else ''}"
        if not clock.allows(f"variant {name}", longest):
            continue
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, *passed, "--variant", variant,
                                   *(["--profile"] if profiled else [])], capture_output=True, text=True,
                                  timeout=max(clock.left(), 1))
        except subprocess.TimeoutExpired:
            clock.skipped.append(f"variant {name} (past the time budget)")
            break
        longest = max(longest, time.perf_counter() - t0)
        found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not found:
            log(f"variant {name} failed:", proc.stderr[-2000:])
            clock.skipped.append(f"variant {name} (failed, exit {proc.returncode})")
            continue
        results["profiles" if profiled else "variants"].append(json.loads(found[-1][len("RESULT "):]))
        log(name, json.dumps(results["profiles" if profiled else "variants"][-1])[:3000])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, "RESULTS_first_batch", table(results), results)


if __name__ == "__main__":
    main()
