"""The model's device-to-host reads in a forward, and what computing their inputs on the host saves (issue 18).

Qwen3-VL's forward derives position tables, image boundaries and the decoder's 3-D positions from the batch on
the GPU, and reads some of them back (``tolist``, ``item``, boolean indexing): each read stops the host until the
GPU has caught up, so the GPU then idles while the host launches the next kernels, for longer when encoding
workers share the host's cores.  ``ModelFamily.model_inputs`` computes them on the host instead (the encoding
workers do it in reap.py) and the model takes them as keyword arguments.

Run on the GPU machine from the repository root (one GPU):

    PYTHONUNBUFFERED=1 python3 bench/bench_host_inputs.py --out $OUT            # about 5 device-minutes
    python3 bench/bench_host_inputs.py --tiny --out /tmp/host                   # CPU, tiny shapes, < 1 min

The checkpoint and calibration sets are bench_end_to_end.py's (same ``--workdir``, reused when present).  Per set,
over the same length-sorted batches encoded beforehand into pinned memory, warm (one pass of each variant first):

* ``reads per batch``: the device-to-host synchronizations of one forward (``torch.cuda.set_sync_debug_mode``),
  as the model computes its inputs and given them from the host;
* ``forward`` / ``forward, inputs from the host``: the plain forward, alternated ``--turns`` times;
* ``beside N processes``: the same while N encoding processes encode the set on the side (as in reap.py's loop);
* ``routed observer``: the same with reap.py's routed observer attached;
* whether both variants give the same last hidden state bitwise, and the host's time to compute the inputs.

Writes ``RESULTS_host_inputs.md`` / ``.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_end_to_end import (  # noqa: E402
    Clock,
    bench_device,
    bench_identity,
    encoding_beside,
    forward_batches,
    loaded_bench,
    log,
    pre_encode,
    set_arguments,
    shared_arguments,
    sync,
)

from reap_vlm.calibration.ahead import default_workers  # noqa: E402
from reap_vlm.calibration.encode import to_model  # noqa: E402
from reap_vlm.checkpoint.reader import Checkpoint  # noqa: E402
from reap_vlm.inference import inference  # noqa: E402
from reap_vlm.score.hooks import ReapObserver  # noqa: E402
from reap_vlm.score.stats import ExpertStats  # noqa: E402

VARIANTS = ("forward", "forward, inputs from the host")


def timed_pass(model, family, batches: list[dict], device: str, observer=None) -> float:
    sync(device)
    t0 = time.perf_counter()
    forward_batches(model, family, batches, device, observer)
    sync(device)
    return time.perf_counter() - t0


def reads_per_batch(model, family, batches: list[dict], device: str) -> tuple[float, dict[str, int]]:
    """Device-to-host synchronizations of one forward, averaged over ``batches``, and the lines making them."""
    if not device.startswith("cuda"):
        return float("nan"), {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            forward_batches(model, family, batches, device)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    reads = [w for w in caught if "synchroniz" in str(w.message)]
    where = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in reads)
    return len(reads) / len(batches), dict(where.most_common(12))


def last_hidden(model, family, batch: dict, device: str) -> torch.Tensor:
    base = family.multimodal_model(model)
    moved = to_model(batch, device, model.dtype, host=family.host_side(batch, model))
    return base(**moved, use_cache=False).last_hidden_state.float().cpu()


def set_rows(args, model, ckpt: Checkpoint, processor, samples: list, clock: Clock) -> dict:
    family, device, dtype = ckpt.family, args.device, getattr(torch, args.dtype)
    pin = device.startswith("cuda")
    plain, _, _ = pre_encode(processor, samples, args, family, default_workers(), pin, None)  # model computes
    t0 = time.process_time()
    extra = [family.model_inputs(b, ckpt.config) for b in plain]
    host_cpu_s = time.process_time() - t0
    given = [{**b, **{k: v.pin_memory() if pin else v for k, v in e.items()}} for b, e in zip(plain, extra)]
    variants = dict(zip(VARIANTS, (plain, given)))
    out = {"batches": len(plain), "batches_with_images": sum("image_grid_thw" in b for b in plain),
           "host_inputs_cpu_s": host_cpu_s, "rows": {}}
    with inference():
        same = torch.equal(last_hidden(model, family, plain[0], device), last_hidden(model, family, given[0], device))
        out["bitwise_equal"] = same
        for name, batches in variants.items():  # warm: every length seen by both
            timed_pass(model, family, batches, device)
            row = out["rows"].setdefault(name, {})
            row["reads_per_batch"], row["read_lines"] = reads_per_batch(model, family, batches[:3], device)
            log(f"  {name}: reads at {row['read_lines']}")
        log(f"  bitwise equal: {same}; reads per batch: "
            f"{[out['rows'][n]['reads_per_batch'] for n in VARIANTS]}; host inputs {host_cpu_s:.2f} CPU s")
        one = timed_pass(model, family, plain, device)
        for turn in range(args.turns):
            for name, batches in variants.items():
                if not clock.allows(f"{name} turn {turn}", 3 * one):
                    return out
                out["rows"][name].setdefault("alone_s", []).append(timed_pass(model, family, batches, device))
            log(f"  turn {turn} alone: {[out['rows'][n]['alone_s'][-1] for n in VARIANTS]}")
        workers = args.workers or default_workers()
        out["workers"] = workers
        stream_args = (processor, samples, args.batch_size, args.max_seq_len, 0, family)
        for turn in range(args.turns):
            for name, batches in variants.items():
                if not clock.allows(f"{name} beside turn {turn}", 3 * one + 10):
                    return out
                with encoding_beside(stream_args, workers, "processes", dtype, pin, ckpt.config):  # as reap.py's
                    seconds = timed_pass(model, family, batches, device)
                out["rows"][name].setdefault("beside_s", []).append(seconds)
            log(f"  turn {turn} beside {workers} processes: {[out['rows'][n]['beside_s'][-1] for n in VARIANTS]}")
        for name, batches in variants.items():
            if not clock.allows(f"{name} routed observer", 3 * one):
                return out
            observer = ReapObserver(family, ExpertStats.empty(ckpt.moe_layers, ckpt.num_experts, device), "routed")
            with observer.attached(family.moe_blocks(model)):
                timed_pass(model, family, batches[:1], device, observer)
                out["rows"][name]["routed_observer_s"] = timed_pass(model, family, batches, device, observer)
        log(f"  routed observer: {[out['rows'][n]['routed_observer_s'] for n in VARIANTS]}")
    return out


def table(results: dict) -> str:
    lines = [f"# Inputs from the host ({results['device']}, {results['shape']}, batch {results['batch_size']})", ""]
    for kind, res in results["sets"].items():
        lines += [f"## {kind} set: {res['batches']} batches ({res['batches_with_images']} with images), "
                  f"bitwise equal: {res.get('bitwise_equal')}, host inputs {res['host_inputs_cpu_s']:.2f} CPU s",
                  "", "| variant | reads per batch | alone s | beside encoding processes s | routed observer s |",
                  "|---|---|---|---|---|"]
        for name in VARIANTS:
            row = res["rows"].get(name, {})
            cells = [", ".join(f"{x:.3f}" for x in row.get(key, [])) for key in ("alone_s", "beside_s")]
            observed = row.get("routed_observer_s")
            lines.append(f"| {name} | {row.get('reads_per_batch', float('nan')):.1f} | {cells[0]} | {cells[1]} | "
                         f"{'' if observed is None else f'{observed:.3f}'} |")
        rows = res["rows"]
        for key in ("alone_s", "beside_s"):
            a, b = (rows.get(n, {}).get(key) for n in VARIANTS)
            if a and b:
                lines.append(f"\n{key}: inputs from the host / as the model computes them = "
                             f"{min(b) / min(a):.3f}x (best of each)")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shared_arguments(parser, "6")
    set_arguments(parser, "image,text")
    parser.add_argument("--workers", type=int, default=0, help="encoding processes beside (0: reap.py's auto)")
    parser.add_argument("--turns", type=int, default=2)
    args = parser.parse_args()
    bench_device(args)
    clock = Clock(args.max_minutes or 6.0)
    bench = loaded_bench(args)
    counts = {"text": args.samples, "image": args.image_samples}
    results = {**bench_identity(args), "batch_size": args.batch_size, "cpus": len(os.sched_getaffinity(0)),
               "sets": {}}
    for kind in args.sets.split(","):
        order = bench.order(kind, counts)
        log(f"{kind}: {len(order.samples)} samples")
        results["sets"][kind] = set_rows(args, bench.model, bench.ckpt, bench.processor, order.samples, clock)
    results["skipped"] = clock.skipped
    text = table(results)
    print("\n" + text)
    (bench.out / "RESULTS_host_inputs.md").write_text(text)
    (bench.out / "RESULTS_host_inputs.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
