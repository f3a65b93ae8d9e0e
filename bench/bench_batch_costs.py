"""Each calibration batch's measured forward time against reap.py's estimate of its cost (issue 18): torchrun ranks
get their batches by estimated cost (``ForwardCost``, ``balanced_shares``), so the slowest rank is the estimate's
error.  What balance would N ranks get on the bench's sets, with reap.py's estimate and with the measured times?

Run on the GPU machine from the repository root (one GPU):

    PYTHONUNBUFFERED=1 python3 bench/bench_batch_costs.py --out $OUT                    # about 3 device-minutes
    python3 bench/bench_batch_costs.py --tiny --out /tmp/costs                          # CPU, tiny shapes, < 1 min
    python3 bench/bench_batch_costs.py --measured bench/RESULTS_batch_costs.json --out /tmp/costs   # CPU, no forward

The checkpoint and calibration sets are bench_end_to_end.py's (same ``--workdir``, reused when present).  Per set,
its batches in reap.py's order, pre-encoded into pinned memory: one pass so that every shape has been seen, then
``--passes`` passes of plain forwards (reap.py's kernels), each batch synchronized; a batch's time is its least.
Per batch it keeps its samples, rows, padded length, valid and image tokens, each image's patches and its seconds,
and reap.py's estimates of its length and image tokens.

Then per set and rank count (``--worlds``): each rank's batches as reap.py gives them (``balanced_shares`` over
``BatchOrder.batch_costs``), their measured seconds summed, the slowest rank over the mean rank (1.000: perfect) and
the speed-up N ranks would give over one (the whole set's seconds over the slowest rank's; the per-process costs
apart).  Against the same rule over the measured times themselves (what a perfect estimate would give) and over
padded positions alone.  ``--measured FILE``: the forwards' seconds from an earlier run's
JSON, the shares from this code's estimate (the processor, checkpoint and sets are rebuilt here, ~2 minutes and 6 GB
of disk at full size; the batches' samples are checked to be the same).
A set is timed only while ``--max-minutes`` leaves it ~90 s (skipped ones are said so).
Writes ``RESULTS_batch_costs.md`` / ``.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
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
    set_arguments,
    shared_arguments,
    spec_for,
    timed_forwards,
    tiny_sizes,
    write_calibration,
    write_model,
    write_results,
)

from reap_vlm.calibration.ahead import default_workers  # noqa: E402
from reap_vlm.calibration.encode import batch_chunks  # noqa: E402
from reap_vlm.calibration.order import ForwardCost  # noqa: E402
from reap_vlm.checkpoint.loading import load_model, load_processor  # noqa: E402
from reap_vlm.checkpoint.reader import Checkpoint  # noqa: E402
from reap_vlm.score.distributed import balanced_shares  # noqa: E402
from reap_vlm.score.job import forward_cost  # noqa: E402


def batch_record(batch: dict, samples: list, family, config) -> dict:
    """What a batch holds: its calibration indices, rows, padded length, valid and image tokens, each image's
    patches."""
    valid = batch["attention_mask"].bool()
    image = family.visual_token_mask(batch["input_ids"], config).bool() & valid
    grids = batch.get("image_grid_thw")
    return {"samples": [s.index for s in samples], "rows": int(valid.shape[0]), "length": int(valid.shape[1]),
            "valid": int(valid.sum()), "image_tokens": int(image.sum()),
            "patches": [] if grids is None else [int(g.prod()) for g in grids]}


def measure(args, model, ckpt: Checkpoint, processor, order) -> list[dict]:
    """Each batch of ``order`` (``batch_record``) with ``seconds``: the least of ``--passes`` synchronized forwards,
    after a pass that saw every shape."""
    batches, _, _ = pre_encode(processor, order.samples, args, ckpt.family, default_workers(), args.device == "cuda",
                               ckpt.config)
    records = [batch_record(b, chunk, ckpt.family, model.config)
               for b, chunk in zip(batches, batch_chunks(order.samples, args.batch_size))]
    for record, lengths, images in zip(records, batch_chunks(order.lengths, args.batch_size),
                                       batch_chunks(order.image_tokens, args.batch_size)):
        record.update(estimated_length=max(lengths), estimated_image_tokens=sum(images))
    off = [abs(r["estimated_image_tokens"] - r["image_tokens"]) for r in records]
    log(f"  image tokens estimated {sum(r['estimated_image_tokens'] for r in records):,}, encoded "
        f"{sum(r['image_tokens'] for r in records):,}; batches off: {sum(map(bool, off))}, at most {max(off)}")
    timed_forwards(model, ckpt.family, batches, args.device)  # every shape seen once
    passes = [timed_forwards(model, ckpt.family, batches, args.device) for _ in range(args.passes)]
    for i, record in enumerate(records):
        record["seconds"] = min(p[i] for p in passes)
    log(f"  {len(records)} batches: {sum(r['seconds'] for r in records):.2f}s, passes "
        + ", ".join(f"{sum(p):.2f}s" for p in passes))
    return records


def balance(seconds: list[float], costs: list, world: int) -> dict:
    """Each of ``world`` ranks' measured seconds when the batches are shared by ``costs``; the slowest over the mean
    and the speed-up over one rank."""
    ranks = [sum(seconds[b] for b in share) for share in balanced_shares(costs, world)]
    slowest = max(ranks)
    return {"ranks_s": [round(r, 3) for r in ranks], "slowest_over_mean": round(slowest * world / sum(ranks), 4),
            "speed_up": round(sum(ranks) / slowest, 3)}


def shares_by(records: list[dict], order, batch_size: int, cost: ForwardCost, worlds: list[int]) -> dict:
    seconds = [r["seconds"] for r in records]
    estimates = {"reap.py's estimate": order.batch_costs(batch_size, cost),
                 "padded positions alone": [r["rows"] * r["length"] for r in records],
                 "measured times": [round(s * 1e6) for s in seconds]}
    return {name: {world: balance(seconds, costs, world) for world in worlds} for name, costs in estimates.items()}


def table(results: dict) -> str:
    worlds = results["worlds"]
    lines = [f"# Batch costs: measured forwards against reap.py's estimate ({results['device']}, {results['shape']})",
             "", f"Batch {results['batch_size']}, max_seq_len {results['max_seq_len']}; seconds: the least of "
             f"{results['passes']} synchronized plain forwards per batch; shares by `balanced_shares`. Per cell: the "
             "slowest rank over the mean rank, and the speed-up N ranks would give (per-process costs apart).", "",
             "| set | batches | measured s | shares by | " + " | ".join(f"{w} ranks" for w in worlds) + " |",
             "|---|---|---|---|" + "---|" * len(worlds)]
    for kind, s in results["sets"].items():
        total = sum(r["seconds"] for r in s["batches"])
        for name, by_world in s["shares"].items():
            cells = [f"{by_world[w]['slowest_over_mean']:.3f} ({by_world[w]['speed_up']:.2f}x)" for w in worlds]
            lines.append(f"| {kind} | {len(s['batches'])} | {total:.2f} | {name} | " + " | ".join(cells) + " |")
    if results["not_run"]:
        lines += ["", "Not run: " + "; ".join(results["not_run"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shared_arguments(parser, "6 minutes")
    set_arguments(parser, "text,image")
    parser.set_defaults(samples=1024, image_samples=192)  # bench_end_to_end.py's sets
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--worlds", default="2,4,8")
    parser.add_argument("--measured", default=None, help="an earlier run's JSON: its seconds, no forwards here")
    args = parser.parse_args()
    bench_device(args)
    tiny_sizes(args)
    earlier = json.loads(Path(args.measured).read_text()) if args.measured else None
    if earlier:
        args.batch_size, args.max_seq_len = earlier["batch_size"], earlier["max_seq_len"]
    worlds = [int(w) for w in args.worlds.split(",")]
    clock = Clock(args.max_minutes or (1 if args.tiny else 6))
    workdir, out = Path(args.workdir), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log("writing the checkpoint and calibration sets in", workdir)
    model_dir = write_model(workdir / "model", spec_for(args), args.tiny, "cpu" if earlier else args.device)
    ckpt, processor = Checkpoint(model_dir), load_processor(model_dir)
    model = None if earlier else load_model(model_dir, dtype=getattr(torch, args.dtype), device=args.device)
    counts = {"text": args.samples, "image": args.image_samples}
    results = {**(earlier or bench_identity(args)), "batch_size": args.batch_size, "max_seq_len": args.max_seq_len,
               "passes": earlier["passes"] if earlier else args.passes, "worlds": worlds, "sets": {},
               "not_run": clock.skipped}
    for kind in (earlier["sets"] if earlier else args.sets.split(",")):
        count = sum(len(r["samples"]) for r in earlier["sets"][kind]["batches"]) if earlier else counts[kind]
        calib = write_calibration(workdir / "calibration", kind, count, megapixels(args))
        order = reap_order(processor, calib, count, args, ckpt.family)
        if earlier:
            records = earlier["sets"][kind]["batches"]
            if [r["samples"] for r in records] != [[s.index for s in c] for c in batch_chunks(order.samples,
                                                                                            args.batch_size)]:
                raise SystemExit(f"the {kind} set's batches differ from the measured run's: rebuild its workdir")
        elif not clock.allows(f"the {kind} set", 10 if args.tiny else 90):  # encoding and 1 + passes passes
            continue
        else:
            log(f"{kind} set: {count} samples")
            records = measure(args, model, ckpt, processor, order)
        cost = forward_cost(ckpt, processor, any(order.image_tokens))
        results["sets"][kind] = {"batches": records, "shares": shares_by(records, order, args.batch_size, cost,
                                                                         worlds)}
    write_results(out, "RESULTS_batch_costs", table(results), results)


if __name__ == "__main__":
    main()
