"""Where reap.py's scoring phase loses time against its baseline (issue 18), batch by batch: reap.py's own
``run_reap`` called in this process, its loop timed from outside, then the baseline over the same batches.

Run on the GPU machine from the repository root (one GPU):

    PYTHONUNBUFFERED=1 python3 bench/bench_scoring_phase.py --out $OUT         # about 4 device-minutes
    python3 bench/bench_scoring_phase.py --tiny --out /tmp/phase              # CPU, tiny shapes, < 1 min

The checkpoint and calibration sets are bench_end_to_end.py's (same ``--workdir``, reused when present).  Per
scoring mode (``--modes``), rows:

* ``reap.py, cold``: ``run_reap`` as reap.py calls it (``--engine model --no-resume``, defaults otherwise), the first
  forward of this process, as in a user's run (for the first of ``--modes``; a later mode's runs after it, warm);
* ``reap.py, again``: the same call once more in this process: CUDA's modules, the allocators' caches warm (a
  difference from the cold row is the process's start, not the loop);
* ``reap.py, again, pinned cache emptied``: as ``again`` after emptying PyTorch's cache of page-locked host memory
  (the batches' pinned buffers allocated anew, as in a cold run);
* ``reap.py, again, <kind>``: ``--kinds``, the other kinds of encoding worker (the ``again`` rows only with
  ``--again``, the default);
* ``baseline``: the target's baseline (routed: the plain forward; full: the full observer) over the same batches
  (reap.py's order and image budget) encoded beforehand into pinned memory, copied as the engine copies them, warm
  (its first batch once before).

Each row: the scoring phase (reap_metadata.json's, or the baseline's wall), the main thread's CPU seconds in the
loop, the time the loop waited for batches, PyTorch's page-locked allocations in the loop (count and seconds), and
per batch the loop's own time (from handing out one batch to asking for the next: copies, hooks, the forward's
launches and its syncs).  ``--profile``: also the ops that take the main thread's time in ``again`` and in the
baseline (torch.profiler, CPU), to compare.  Writes ``RESULTS_scoring_phase.md`` / ``.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_end_to_end import (  # noqa: E402
    Clock,
    bench_device,
    bench_identity,
    forward_batches,
    log,
    megapixels,
    pre_encode,
    shared_arguments,
    spec_for,
    sync,
    write_calibration,
    write_model,
)

import reap  # noqa: E402
import reap_vlm.score.job as job  # noqa: E402
from reap_vlm.calibration.ahead import default_workers  # noqa: E402
from reap_vlm.calibration.files import load_calibration  # noqa: E402
from reap_vlm.checkpoint.loading import load_model, load_processor  # noqa: E402
from reap_vlm.checkpoint.reader import Checkpoint  # noqa: E402
from reap_vlm.inference import inference  # noqa: E402
from reap_vlm.score.hooks import ReapObserver  # noqa: E402
from reap_vlm.score.stats import ExpertStats  # noqa: E402
from reap_vlm.settings import parse_settings  # noqa: E402


def host_allocs() -> tuple[int, float]:
    """PyTorch's page-locked allocations so far: how many, and seconds spent in them."""
    if not torch.cuda.is_available():
        return 0, 0.0
    stats = torch.cuda.host_memory_stats()
    return int(stats.get("num_host_alloc", 0)), stats.get("host_alloc_time.total", 0) / 1e6


class TimedStream:
    """A ``BatchStream`` handed to reap.py's loop, stamping when each batch is asked for and handed out."""

    def __init__(self, stream):
        self.stream, self.asked, self.given = stream, [], []

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self):
        return self

    def __next__(self):
        self.asked.append(time.perf_counter())
        batch = next(self.stream)
        self.given.append(time.perf_counter())
        return batch

    def __enter__(self):
        self.stream.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.stream.__exit__(*exc)

    def report(self, positions: int, tokens: int) -> dict:
        return self.stream.report(positions, tokens)

    def loop_seconds(self, end: float) -> list[float]:
        """Per batch: from its hand-out to the next request (the last: to ``end``)."""
        return [b - a for a, b in zip(self.given, self.asked[1:] + [end])]


@contextmanager
def instrumented(found: dict, device: str, profile: bool = False):
    """reap.py's run with its scoring loop timed from outside: ``found`` gets the loop's figures."""
    inner = job.run_batches

    def run_batches(*args, stream, **kwargs):
        timed = TimedStream(stream)
        allocs0, alloc_s0 = host_allocs()
        c0 = time.thread_time()
        with _profiler(profile) as prof:
            run = inner(*args, stream=timed, **kwargs)
            sync(device)
        end = time.perf_counter()
        allocs, alloc_s = host_allocs()
        found.update(main_cpu_s=time.thread_time() - c0, loop_s=timed.loop_seconds(end),
                     host_allocs=allocs - allocs0, host_alloc_s=alloc_s - alloc_s0, waited_s=run["encode_wait_seconds"],
                     profile=_top_ops(prof) if profile else None)
        return run

    job.run_batches = run_batches
    try:
        yield
    finally:
        job.run_batches = inner


def _profiler(on: bool):
    return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if on else nullcontext()


def _top_ops(prof, n: int = 25) -> list[dict]:
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    return [{"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3} for e in ops]


def reap_row(args, mode: str, model: Path, calib: Path, runs: Path, extra=(), profile: bool = False) -> dict:
    out = runs / f"run-{time.time_ns()}"
    argv = ["--model", str(model), "--calibration", str(calib), "--output", str(out), "--mode", mode,
            "--batch-size", str(args.batch_size), "--max-samples", str(args.samples), "--max-seq-len",
            str(args.max_seq_len), "--prune-ratio", "0.5", "--engine", "model", "--no-resume", "--device",
            args.device, "--dtype", args.dtype, *extra]
    settings = parse_settings(reap.__doc__, reap.OPTIONS, argv)
    found: dict = {}
    with instrumented(found, args.device, profile):
        meta = job.run_reap(settings)
    shutil.rmtree(out, ignore_errors=True)
    return {"scoring_s": meta["timings"]["scoring"], "load_s": meta["timings"]["load"],
            "tokens": meta["num_tokens"]["total"], "order": meta["run"].get("sample_order"),
            "max_pixels": settings.max_pixels, "kind": meta["run"].get("encode_kind"),
            "warm_up": meta["run"].get("warm_up"), "kernels_after": _kernels(), **found}


def _kernels() -> int | None:
    """The fused kernels' compiled variants in this process (None without Triton)."""
    from reap_vlm.score import triton_experts

    return triton_experts.compiled_kernels() if triton_experts.triton is not None else None


def baseline_row(args, mode: str, model_dir: Path, calib: Path, order: list[int] | None, max_pixels: int,
                 profile: bool = False) -> dict:
    """The target's baseline over reap.py's batches (routed: the plain forward; else the mode's observer), encoded
    beforehand into pinned memory, timed batch by batch."""
    ckpt = Checkpoint(model_dir)
    family = ckpt.family
    processor = load_processor(model_dir)
    samples = load_calibration(calib, args.samples).samples
    if order is not None:
        samples = [samples[i] for i in order]
    batches, _, _ = pre_encode(processor, samples, args, family, default_workers(), args.device.startswith("cuda"),
                               ckpt.config, max_pixels)
    model = load_model(model_dir, dtype=getattr(torch, args.dtype), device=args.device)
    observer = None if mode == "routed" else ReapObserver(
        family, ExpertStats.empty(ckpt.moe_layers, ckpt.num_experts, args.device), mode)
    with observer.attached(family.moe_blocks(model)) if observer else nullcontext(), inference():
        forward_batches(model, family, batches[:1], args.device, observer)  # warm, as bench_end_to_end's baselines
        sync(args.device)
        with _profiler(profile) as prof:
            c0, stamps = time.thread_time(), [time.perf_counter()]
            for batch in batches:
                forward_batches(model, family, [batch], args.device, observer)
                stamps.append(time.perf_counter())
            sync(args.device)
            stamps[-1] = time.perf_counter()
    row = {"scoring_s": stamps[-1] - stamps[0], "main_cpu_s": time.thread_time() - c0, "waited_s": 0.0,
           "loop_s": [b - a for a, b in zip(stamps, stamps[1:])], "host_allocs": 0, "host_alloc_s": 0.0,
           "tokens": sum(int(b["attention_mask"].sum()) for b in batches),
           "batch_tokens": [int(b["attention_mask"].sum()) for b in batches],
           "profile": _top_ops(prof) if profile else None}
    return row  # the model goes with this frame


def table(results: dict) -> str:
    lines = [f"# reap.py's scoring phase against its baseline, batch by batch ({results['device']}, "
             f"{results['shape']})", "",
             f"{results['set']} set, {results['samples']} samples, batch {results['batch_size']}, max_seq_len "
             f"{results['max_seq_len']}, {results['dtype']}; host {results['cpus']} CPUs. Baseline: routed, the plain "
             "forward; full, the full observer. Ratio: scoring seconds per token over the baseline's."]
    for mode, rows in results["modes"].items():
        lines += ["", f"## {mode}", ""] + _mode_table(rows)
    if results["not_run"]:
        lines += ["", "Not run: " + "; ".join(results["not_run"])]
    return "\n".join(lines) + "\n"


def _mode_table(rows: dict) -> list[str]:
    base = rows.get("baseline")
    lines = ["| row | scoring s | main thread CPU s | waited s | loop s (sum) | pinned allocs (s) | ratio |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        ratio = (f"{r['scoring_s'] / r['tokens'] / (base['scoring_s'] / base['tokens']):.2f}x" if base else "")
        lines.append(f"| {name} | {r['scoring_s']:.2f} | {r['main_cpu_s']:.2f} | {r['waited_s']:.2f} | "
                     f"{sum(r['loop_s']):.2f} | {r['host_allocs']} ({r['host_alloc_s']:.2f}) | {ratio} |")
    for name, r in rows.items():
        if r.get("warm_up"):
            lines += ["", f"{name}: warm-up (reap_metadata.json's run.warm_up) {json.dumps(r['warm_up'])}; the fused "
                      f"kernels' compiled variants after the run: {r.get('kernels_after')}, load phase "
                      f"{r['load_s']:.2f}s"]
    names = [n for n in rows if rows[n].get("loop_s")]
    lines += ["", "Per batch, the loop's own ms (hand-out to the next request):", "",
              "| batch | tokens | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    tokens = base["batch_tokens"] if base else []
    for i in range(max(len(rows[n]["loop_s"]) for n in names)):
        cells = [f"{rows[n]['loop_s'][i] * 1e3:.0f}" if i < len(rows[n]["loop_s"]) else "" for n in names]
        lines.append(f"| {i} | {tokens[i] if i < len(tokens) else ''} | " + " | ".join(cells) + " |")
    for name, r in rows.items():
        if r.get("profile"):
            lines += ["", f"Main thread's ops, {name} (torch.profiler, self CPU ms):", "", "| op | calls | ms |",
                      "|---|---|---|"]
            lines += [f"| {p['op']} | {p['calls']} | {p['self_cpu_ms']:.1f} |" for p in r["profile"]]
    return lines


def mode_rows(args, mode: str, model: Path, calib: Path, run_dir: Path, clock: Clock) -> dict:
    rows: dict = {}
    plan = [("reap.py, cold", {})]
    if args.again:
        plan.append(("reap.py, again", {}))
        if args.device == "cuda":
            plan.append(("reap.py, again, pinned cache emptied", {"empty": True}))
        plan += [(f"reap.py, again, {kind}", {"extra": ("--encode-workers-kind", kind)})
                 for kind in filter(None, args.kinds.split(","))]
    estimate = 60.0
    for name, how in plan:
        if not clock.allows(f"{mode}: {name}", estimate):
            continue
        if how.get("empty"):
            torch._C._host_emptyCache()
        t0 = time.perf_counter()
        rows[name] = reap_row(args, mode, model, calib, run_dir, how.get("extra", ()))
        estimate = time.perf_counter() - t0 + 5
        log(f"{mode}, {name}: scoring {rows[name]['scoring_s']:.2f}s, main CPU {rows[name]['main_cpu_s']:.2f}s, "
            f"waited {rows[name]['waited_s']:.2f}s, pinned allocs {rows[name]['host_allocs']}, first batch "
            f"{rows[name]['loop_s'][0]:.2f}s")
    first = next(iter(rows.values()), None)
    if first and clock.allows(f"{mode}: baseline", estimate):
        rows["baseline"] = baseline_row(args, mode, model, calib, first["order"], first["max_pixels"])
        log(f"{mode}, baseline: {rows['baseline']['scoring_s']:.2f}s, main CPU {rows['baseline']['main_cpu_s']:.2f}s")
    if args.profile and first and clock.allows(f"{mode}: profiles", 3 * estimate):
        rows["reap.py, again, profiled"] = reap_row(args, mode, model, calib, run_dir, profile=True)
        rows["baseline, profiled"] = baseline_row(args, mode, model, calib, first["order"], first["max_pixels"],
                                                  True)
    for r in rows.values():
        r.pop("order", None)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shared_arguments(parser, "5; --tiny 1.5")
    parser.add_argument("--set", default="image", choices=("image", "text"))
    parser.add_argument("--samples", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--modes", default="routed")
    parser.add_argument("--again", action=argparse.BooleanOptionalAction, default=True,
                        help="the rows run again in this process (warm, pinned cache emptied, other kinds)")
    parser.add_argument("--kinds", default="processes", help="other kinds of encoding worker, again ('' for none)")
    parser.add_argument("--profile", action="store_true", help="the main thread's ops, again and baseline")
    args = parser.parse_args()
    bench_device(args)
    if args.tiny:
        args.samples, args.batch_size, args.max_seq_len = min(args.samples, 12), min(args.batch_size, 4), 512
        args.workdir += "-tiny"
    clock = Clock(args.max_minutes or (1.5 if args.tiny else 5))
    workdir, out = Path(args.workdir), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = write_model(workdir / "model", spec_for(args), args.tiny, args.device)
    calib = write_calibration(workdir / "calibration", args.set, args.samples, megapixels(args))
    results = {**bench_identity(args), "set": args.set, "samples": args.samples, "batch_size": args.batch_size,
               "max_seq_len": args.max_seq_len, "dtype": args.dtype, "cpus": os.cpu_count(),
               "modes": {}, "not_run": clock.skipped}
    log("inputs ready")
    for mode in args.modes.split(","):
        results["modes"][mode] = mode_rows(args, mode, model, calib, workdir / "phase-run", clock)
    (out / "RESULTS_scoring_phase.json").write_text(json.dumps(results, indent=1))
    text = table(results)
    (out / "RESULTS_scoring_phase.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
