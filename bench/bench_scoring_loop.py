"""Where reap.py's scoring phase loses time against a plain forward (issue 18): its loop timed in one process over
the same batches, one thing changed at a time.

Run on the GPU machine from the repository root (one GPU):

    PYTHONUNBUFFERED=1 python3 bench/bench_scoring_loop.py --out $OUT          # about 4 device-minutes
    python3 bench/bench_scoring_loop.py --tiny --out /tmp/loop                  # CPU, tiny shapes, < 1 min

The checkpoint and calibration sets are bench_end_to_end.py's (same ``--workdir``, reused when present).  One model
load, then per set, every row over the same length-sorted batches:

* ``forward``: the model's forward over batches encoded beforehand into pinned memory (no hooks; the target's
  baseline), a first pass over these sequence lengths and a second one, then with the routed observer;
* ``forward, default kernels``: the same with PyTorch's default attention kernels (cuDNN's allowed; reap.py leaves
  it out, reap_vlm/inference.py), a first and a second pass;
* ``engine, pre-encoded``: ``engine.run_batches`` (reap.py's loop: masks, copies, hooks, progress) fed the same
  pre-encoded batches;
* ``engine, N processes`` / ``N threads``: the loop fed by ``BatchStream`` as reap.py feeds it;
* ``forward beside N processes`` / ``threads``: the plain forward over pre-encoded batches while a stream of the
  same kind encodes the set on the side (its batches thrown away): the encoding's cost to the loop, alone;
* ``forward beside N processes, main thread alone on its core``: ``--apart``: the forward beside N processes with
  the main thread pinned to one CPU whose core (its hyperthread siblings too) the processes are kept off, alternated
  twice with the same row unpinned: does sharing a core with an encoding process slow the forward's launches?  (A
  bench-only experiment: the processes' affinity is set from here, after they start.)  ``--rows beside``: only the
  forward's rows and these.
* ``switch interval``: the threads rows again with Python's thread switch interval shortened (``--switch-intervals``):
  each op the forward launches lets the GIL go and takes it back, waiting up to the interval while an encoding
  thread runs Python.

Each row: wall seconds (after the first row, every length has been seen), the main thread's CPU seconds over the
same span (a loop whose CPU time is close to its wall time is bound by its kernel launches, so anything that takes
its core or the GIL slows it), and the time it waited for batches.  Writes ``RESULTS_scoring_loop.md`` / ``.json``
to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_end_to_end import (  # noqa: E402
    VISION,
    bench_device,
    bench_identity,
    encoding_beside,
    forward_batches,
    loaded_bench,
    log,
    pre_encode,
    set_arguments,
    sync,
)

from reap_vlm.calibration.ahead import BatchStream, default_workers  # noqa: E402
from reap_vlm.checkpoint.reader import Checkpoint  # noqa: E402
from reap_vlm.inference import inference  # noqa: E402
from reap_vlm.score.engine import run_batches  # noqa: E402
from reap_vlm.score.hooks import ReapObserver  # noqa: E402
from reap_vlm.score.stats import ExpertStats  # noqa: E402


class PreEncoded:
    """Batches encoded beforehand, handed out as a ``BatchStream`` would."""

    def __init__(self, batches: list[dict]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def report(self, positions: int, tokens: int) -> dict:
        return {"encode_wait_seconds": 0.0}


def timed(device: str, fn) -> dict:
    sync(device)
    t0, c0 = time.perf_counter(), time.thread_time()
    extra = fn() or {}
    sync(device)
    return {"wall_s": time.perf_counter() - t0, "main_cpu_s": time.thread_time() - c0, **extra}


def loop_rows(args, model, ckpt: Checkpoint, processor, samples: list, batches: list[dict]) -> dict:
    family, device = ckpt.family, args.device
    workers = args.workers or default_workers()
    dtype = getattr(torch, args.dtype)
    stream_args = (processor, samples, args.batch_size, args.max_seq_len, 0, family)
    pin = device.startswith("cuda")
    rows = {}

    def observer(mode: str) -> ReapObserver:
        return ReapObserver(family, ExpertStats.empty(ckpt.moe_layers, ckpt.num_experts, device), mode)

    def engine(stream) -> dict:
        run = run_batches(model, processor, samples, observer(args.mode), batch_size=args.batch_size,
                          max_seq_len=args.max_seq_len, max_pixels=0, resume=None, checkpoint_every=10**9,
                          device=device, stream=stream)
        return {"waited_s": run.get("encode_wait_seconds", 0.0)}

    def plain(obs: ReapObserver | None = None):
        return lambda: forward_batches(model, family, batches, device, obs)

    def beside(kind: str, apart: bool = False) -> dict:
        """The plain forward (timed alone) while ``kind`` workers encode the set on the side; ``apart``: the main
        thread alone on its core (``alone_on_a_core``)."""
        with encoding_beside(stream_args, workers, kind, dtype, device.startswith("cuda"), ckpt.config) as stream:
            pids = list(stream.processes.pool._processes) if apart and stream.processes is not None else []
            with inference(), alone_on_a_core(pids) if apart else nullcontext():
                return timed(device, plain())

    with inference():
        forward_batches(model, family, batches[:1], device)  # the process's own first call apart
        rows["forward, first pass"] = timed(device, plain())
        rows["forward"] = timed(device, plain())  # every length seen once
        log(f"  forward: first pass {rows['forward, first pass']}, then {rows['forward']}")
    if args.rows == "beside":
        return beside_rows(args, rows, workers, beside)
    with inference():
        obs = observer(args.mode)
        with obs.attached(family.moe_blocks(model)):
            rows[f"forward + {args.mode} observer"] = timed(device, plain(obs))
    with torch.inference_mode():  # PyTorch's default attention kernels, cuDNN's allowed
        rows["forward, default kernels, first pass"] = timed(device, plain())
        rows["forward, default kernels"] = timed(device, plain())
        log(f"  forward, default kernels: {rows['forward, default kernels, first pass']}, then "
            f"{rows['forward, default kernels']}")
    rows["engine, pre-encoded"] = timed(device, lambda: engine(PreEncoded(batches)))
    for kind in ("processes", "threads"):
        rows[f"engine, {workers} {kind}"] = timed(device, lambda kind=kind: engine(BatchStream(
            *stream_args, workers=workers, kind=kind, pin=pin, pixel_dtype=dtype, model_config=ckpt.config)))
        log(f"  engine {kind}: {rows[f'engine, {workers} {kind}']}")
    beside_rows(args, rows, workers, beside)
    for ms in args.switch_intervals:
        with switch_interval(ms / 1e3):
            rows[f"engine, {workers} threads, switch interval {ms:g} ms"] = timed(device, lambda: engine(BatchStream(
                *stream_args, workers=workers, kind="threads", pin=pin, pixel_dtype=dtype,
                model_config=ckpt.config)))
            rows[f"forward beside {workers} threads, switch interval {ms:g} ms"] = beside("threads")
        log(f"  switch interval {ms:g} ms: {rows[f'engine, {workers} threads, switch interval {ms:g} ms']}")
    return rows


def beside_rows(args, rows: dict, workers: int, beside) -> dict:
    """The forward beside encoding workers, and with ``--apart`` the main thread alone on its core."""
    kinds = ("processes",) if args.rows == "beside" else ("processes", "threads")
    for kind in kinds:
        rows[f"forward beside {workers} {kind}"] = beside(kind)
        log(f"  forward beside {kind}: {rows[f'forward beside {workers} {kind}']}")
    if args.apart:
        cpu = max(os.sched_getaffinity(0))
        log(f"  CPU {cpu}'s core: CPUs {sorted(core_of(cpu))}")
        for turn in (1, 2):  # alternated, twice: the rows differ by a few percent
            rows[f"forward beside {workers} processes ({turn})"] = beside("processes")
            rows[f"forward beside {workers} processes, main thread alone on its core ({turn})"] = beside(
                "processes", apart=True)
            log(f"  turn {turn}: {rows[f'forward beside {workers} processes ({turn})']}, apart "
                f"{rows[f'forward beside {workers} processes, main thread alone on its core ({turn})']}")
    return rows


def core_of(cpu: int) -> set[int]:
    """``cpu`` and its hyperthread siblings (Linux's topology files; ``cpu`` alone where they are missing)."""
    path = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
    if not path.is_file():
        return {cpu}
    found: set[int] = set()
    for part in path.read_text().strip().split(","):
        low, _, high = part.partition("-")
        found.update(range(int(low), int(high or low) + 1))
    return found


@contextmanager
def alone_on_a_core(pids: list[int]):
    """The calling thread pinned to the last allowed CPU, the processes ``pids`` kept off that CPU's core; yields
    (the CPU, its core).  Restored after."""
    allowed = os.sched_getaffinity(0)
    cpu = max(allowed)
    core = core_of(cpu) & allowed
    before = {pid: os.sched_getaffinity(pid) for pid in pids}
    for pid in pids:
        os.sched_setaffinity(pid, (allowed - core) or allowed)
    os.sched_setaffinity(0, {cpu})  # 0: the calling thread
    try:
        yield cpu, sorted(core)
    finally:
        os.sched_setaffinity(0, allowed)
        for pid, mask in before.items():
            try:
                os.sched_setaffinity(pid, mask)
            except ProcessLookupError:
                pass


@contextmanager
def switch_interval(seconds: float):
    """How long a thread waiting for the GIL lets its holder run before asking it to let go (5 ms by default):
    every op the forward launches releases the GIL and takes it back."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def table(results: dict) -> str:
    lines = [f"# reap.py's scoring loop against a plain forward ({results['device']}, {results['shape']})", "",
             f"batch {results['batch_size']}, max_seq_len {results['max_seq_len']}, {results['dtype']}, "
             f"{results['mode']} mode; host {results['cpus']} CPUs. Ratio: wall over the plain forward's second "
             "pass (the first row: its first pass over these sequence lengths; every later row runs warm).", "",
             "| set | batches | loop | wall s | main thread CPU s | waited s | ratio |",
             "|---|---|---|---|---|---|---|"]
    for name, s in results["sets"].items():
        plain = s["rows"]["forward"]["wall_s"]
        for row, r in s["rows"].items():
            lines.append(f"| {name} | {s['batches']} | {row} | {r['wall_s']:.2f} | {r['main_cpu_s']:.2f} | "
                         f"{r.get('waited_s', 0.0):.2f} | {r['wall_s'] / plain:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--workdir", default="/tmp/reap_e2e")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vision", default="full", choices=tuple(VISION))
    set_arguments(parser, "text,image")
    parser.add_argument("--mode", default="routed")
    parser.add_argument("--workers", type=int, default=0, help="encoding workers (0: reap.py's auto)")
    parser.add_argument("--apart", action="store_true", help="the rows with the main thread alone on its core")
    parser.add_argument("--rows", default="all", choices=("all", "beside"),
                        help="beside: only the forward's and the forward-beside-workers rows (with --apart's)")
    parser.add_argument("--switch-intervals", type=lambda v: [float(x) for x in v.split(",") if x], default="0.1,1",
                        help="Python thread switch intervals in ms (default 5) to run the threads rows under too")
    args = parser.parse_args()
    bench_device(args)
    bench = loaded_bench(args)
    model, ckpt, processor = bench.model, bench.ckpt, bench.processor
    counts = {"text": args.samples, "image": args.image_samples}
    results = {**bench_identity(args), "batch_size": args.batch_size, "max_seq_len": args.max_seq_len,
               "dtype": args.dtype, "mode": args.mode, "cpus": len(os.sched_getaffinity(0)), "sets": {}}
    for kind in args.sets.split(","):
        # the end-to-end bench's sets are a superset: its first samples are this set
        order = bench.order(kind, counts)
        log(f"{kind}: pre-encoding {len(order.samples)} samples")
        batches, _, _ = pre_encode(processor, order.samples, args, ckpt.family, default_workers(),
                                   args.device == "cuda", ckpt.config)
        rows = loop_rows(args, model, ckpt, processor, order.samples, batches)
        results["sets"][kind] = {"batches": len(batches), "rows": rows}
        del batches
    text = table(results)
    print("\n" + text)
    (bench.out / "RESULTS_scoring_loop.md").write_text(text)
    (bench.out / "RESULTS_scoring_loop.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
