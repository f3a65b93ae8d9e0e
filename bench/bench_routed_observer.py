"""What the routed observer costs a forward, part by part, and candidates for its two heaviest parts (issue 18).

reap.py's routed mode runs the experts' own forward (``FusedGateUpFamily.routed_forward``), keeping each routed
pair's output norm and peak (``output_stats``), and adds them to float64 sums per expert (``LayerStats.observe``).
Run 28 measured the whole at ~5% of a text-heavy forward: the last per-batch gap between reap.py routed and the
plain forward.

Run on the GPU machine from the repository root (one GPU):

    PYTHONUNBUFFERED=1 python3 bench/bench_routed_observer.py --out $OUT          # about 4 device-minutes
    python3 bench/bench_routed_observer.py --tiny --out /tmp/observer             # CPU, tiny shapes, < 1 min

1. Parts alone, on synthetic inputs of a text batch's size (``--rows`` tokens, the checkpoint's experts and top-k),
   CUDA-event timed: ``LayerStats.observe`` (its sums checked against a float64 reference on the CPU), its sums and
   maxima alone as reap.py adds them (one slot per expert and modality: one index_add, one scatter) and as they
   were added until run 35 (one index_add per sum), and the peaks of ``output_stats`` (abs then amax, or
   aminmax).  Run 35 also timed a stacked index_add (0.761 ms a call of observe against 0.812), a float64 one-hot
   matmul (0.877) and sorted segment sums (1.335), none of them worth it.
2. In the model (bench_end_to_end.py's checkpoint and sets, ``--workdir``), over the same pre-encoded batches,
   warm, alternated ``--turns`` times: the plain forward; routed as reap.py runs it; routed with the sums not added
   (``LayerStats.observe`` skipped); routed with the peaks taken by abs then amax (before this bench).
3. ``torch.profiler`` over a few batches, plain and routed: the kernels by device time, the added ones first.

Writes ``RESULTS_routed_observer.md`` / ``.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
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
    loaded_bench,
    log,
    pre_encode,
    set_arguments,
    shared_arguments,
    sync,
)
from bench_host_inputs import timed_pass  # noqa: E402
from bench_scoring import Timer  # noqa: E402

from reap_vlm.calibration.ahead import default_workers  # noqa: E402
from reap_vlm.families import fused_experts  # noqa: E402
from reap_vlm.families.base import float32_norm, peaks_by_abs, peaks_by_aminmax  # noqa: E402
from reap_vlm.inference import inference  # noqa: E402
from reap_vlm.score.hooks import ReapObserver  # noqa: E402
from reap_vlm.score.stats import ExpertStats, LayerStats  # noqa: E402

F64 = torch.float64


# ----------------------------------------------------------------------------------------------- part 1


def masked_columns(batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The routed pairs' experts, and each sum's and maximum's per-pair float64 values with padding rows (and the
    other modality's, where split) masked to zero: LayerStats' sums the plain way, as they were added until run 35."""
    valid = batch["valid"]
    image = batch["image"] & valid
    masks = {k: v[:, None].expand_as(batch["topk_ids"]).reshape(-1).to(F64)
             for k, v in {"valid": valid, "image": image, "text": valid & ~image}.items()}
    gates = batch["topk_weights"].to(F64).reshape(-1) * masks["valid"]
    norms = batch["routed_norms"].to(F64).reshape(-1) * masks["valid"]
    peaks = batch["routed_max"].to(F64).reshape(-1)
    sums = {"count": masks["valid"], "weighted_frequency": gates, "count_image": masks["image"],
            "count_text": masks["text"], "ean_sum": norms, "reap_sum": gates * norms,
            "reap_image_sum": gates * norms * masks["image"], "reap_text_sum": gates * norms * masks["text"]}
    return batch["topk_ids"].reshape(-1), sums, {"max_image": peaks * masks["image"], "max_text": peaks * masks["text"]}


def add_masked(sums: dict[str, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
    """``masked_columns`` added to ``sums``: one index_add per sum, one scatter per maximum."""
    ids, columns, maxima = masked_columns(batch)
    for name, values in columns.items():
        sums[name].index_add_(0, ids, values)
    for name, values in maxima.items():
        sums[name].scatter_reduce_(0, ids, values, reduce="amax")
    return sums


def reference_sums(batch: dict, experts: int) -> dict[str, torch.Tensor]:
    """LayerStats' routed sums and maxima of one batch the plain way, on the CPU."""
    batch = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    _, columns, maxima = masked_columns(batch)
    return add_masked({name: torch.zeros(experts, dtype=F64) for name in (*columns, *maxima)}, batch)


@contextmanager
def patched(owner, name: str, value):
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def timed_call(fn: Callable, device: str, reps: int) -> float:
    """Median milliseconds of ``fn`` (CUDA events on a GPU), after two warm calls."""
    return 1e3 * Timer(torch.device(device))(fn, reps=reps)


def synthetic_batch(rows: int, experts: int, top_k: int, hidden: int, dtype, device: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, experts, generator=gen)
    weights, ids = torch.softmax(logits, -1).topk(top_k, dim=-1)
    valid = torch.rand(rows, generator=gen) > 0.05
    return {"router_logits": logits.to(device, dtype), "topk_ids": ids.to(device),
            "topk_weights": (weights / weights.sum(-1, keepdim=True)).to(device, dtype),
            "valid": valid.to(device), "image": (torch.rand(rows, generator=gen) > 0.8).to(device),
            "routed_norms": torch.rand(rows, top_k, generator=gen).to(device),
            "routed_max": torch.rand(rows, top_k, generator=gen).to(device),
            "n_valid": int(valid.sum()), "n_image": 0, "y": torch.randn(rows * top_k, hidden, generator=gen).to(
                device, dtype)}


def parts_alone(args, experts: int, top_k: int, hidden: int) -> dict:
    dtype = getattr(torch, args.dtype)
    batch = synthetic_batch(args.rows, experts, top_k, hidden, dtype, args.device)
    y = batch.pop("y")
    stats = LayerStats(experts, args.device)
    stats.observe(**batch)
    reference = reference_sums(batch, experts)
    out = {"rows": args.rows, "pairs": args.rows * top_k, "max_rel_diff": max(
        float(((stats.sums[k].cpu() - v).abs() / v.abs().clamp(min=1e-300)).max()) for k, v in reference.items())}
    out["observe_ms"] = {
        "LayerStats.observe (reap.py)": timed_call(lambda: stats.observe(**batch), args.device, args.reps),
        "its sums and maxima alone: slots, one index_add and one scatter (reap.py)": timed_call(
            lambda: added_by_slots(stats, batch), args.device, args.reps),
        "the same, one index_add per sum (until run 35)": timed_call(
            lambda: add_masked(stats.sums, batch), args.device, args.reps)}
    out["output_stats_ms"] = {
        "norm alone": timed_call(lambda: float32_norm(y), args.device, args.reps),
        "peaks: abs, amax (until run 35)": timed_call(lambda: peaks_by_abs(y), args.device, args.reps),
        "peaks: aminmax (reap.py)": timed_call(lambda: peaks_by_aminmax(y), args.device, args.reps),
    }
    out["peaks_equal"] = torch.equal(peaks_by_abs(y), peaks_by_aminmax(y))
    log(f"  parts alone: {out}")
    return out


def added_by_slots(stats: LayerStats, batch: dict) -> None:
    slots = stats._slots(batch["topk_ids"], batch["image"] & batch["valid"], batch["valid"])
    gates, norms = batch["topk_weights"].to(F64), batch["routed_norms"].to(F64)
    stats._add_pairs(slots, {"count": torch.ones_like(gates), "weighted_frequency": gates, "ean_sum": norms,
                             "reap_sum": gates * norms})
    stats._max_pairs(slots, batch["routed_max"].to(F64))


# ----------------------------------------------------------------------------------------------- parts 2, 3


@contextmanager
def routed_observer(ckpt, model, device: str, *patches):
    """reap.py's routed observer attached, with ``patches`` ((owner, attribute, value)) in place meanwhile."""
    observer = ReapObserver(ckpt.family, ExpertStats.empty(ckpt.moe_layers, ckpt.num_experts, device), "routed")
    with ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patched(*patch))
        stack.enter_context(observer.attached(ckpt.family.moe_blocks(model)))
        yield observer


@contextmanager
def no_observer():
    yield None


def skip_observe(self, **kwargs) -> None:
    return None


def stats_before(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return float32_norm(y), peaks_by_abs(y)


def variants(ckpt, model, device: str) -> dict[str, Callable]:
    """Variant name -> a context manager factory yielding its observer (None: the plain forward)."""
    return {"plain forward": no_observer,
            "routed (reap.py)": lambda: routed_observer(ckpt, model, device),
            "routed, sums not added": lambda: routed_observer(ckpt, model, device,
                                                              (LayerStats, "observe", skip_observe)),
            "routed, peaks by abs then amax": lambda: routed_observer(ckpt, model, device,
                                                                      (fused_experts, "output_stats", stats_before))}


def in_model(args, bench, kind: str, samples: list, clock: Clock) -> dict:
    model, ckpt = bench.model, bench.ckpt
    family, device = ckpt.family, args.device
    batches, wall, _ = pre_encode(bench.processor, samples, args, family, default_workers(),
                                  device.startswith("cuda"), ckpt.config)
    log(f"  {kind}: {len(batches)} batches pre-encoded in {wall:.1f}s")
    rows: dict[str, list[float]] = {}
    found = variants(ckpt, model, device)
    with inference():
        one = timed_pass(model, family, batches, device)  # every length warm
        for turn in range(args.turns):
            for name, make in found.items():
                if not clock.allows(f"{kind} {name} turn {turn}", 1.3 * one + 2):
                    return {"batches": len(batches), "seconds": rows}
                with make() as observer:
                    timed_pass(model, family, batches[:1], device, observer)
                    rows.setdefault(name, []).append(timed_pass(model, family, batches, device, observer))
            log(f"  {kind} turn {turn}: " + ", ".join(f"{n} {v[-1]:.3f}s" for n, v in rows.items()))
        profile = profiled(model, family, batches[:args.profile_batches], device, found) if clock.allows(
            f"{kind} profile", 3 * one * args.profile_batches / len(batches) + 5) else {}
    return {"batches": len(batches), "seconds": rows, "profile": profile}


def profiled(model, family, batches: list[dict], device: str, found: dict) -> dict:
    """Device milliseconds per kernel over ``batches``, plain and routed (top 25 of each, by device time)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    out = {}
    for name in ("plain forward", "routed (reap.py)"):
        with found[name]() as observer:
            forward_batches(model, family, batches[:1], device, observer)
            sync(device)
            with profile(activities=activities) as prof:
                forward_batches(model, family, batches, device, observer)
                sync(device)
        events = [e for e in prof.key_averages() if e.self_device_time_total > 0] if device.startswith(
            "cuda") else []
        events.sort(key=lambda e: -e.self_device_time_total)
        out[name] = {"total_ms": sum(e.self_device_time_total for e in events) / 1e3,
                     "kernels": {e.key[:90]: [round(e.self_device_time_total / 1e3, 3), e.count] for e in events[:25]}}
    return out


# ----------------------------------------------------------------------------------------------- report


def table(results: dict) -> str:
    alone = results["parts_alone"]
    lines = [f"# The routed observer's cost ({results['device']}, {results['shape']})", "",
             f"## Parts alone: one MoE layer's batch of {alone['rows']:,} tokens ({alone['pairs']:,} routed pairs)",
             "", f"LayerStats.observe's sums against a float64 reference on the CPU: max rel diff "
             f"{alone['max_rel_diff']:.1e}", "", "| part | ms |", "|---|---|"]
    lines += [f"| {name} | {ms:.3f} |" for name, ms in alone["observe_ms"].items()]
    lines += ["", "| output_stats part | ms |", "|---|---|"]
    lines += [f"| {name} | {ms:.3f} |" for name, ms in alone["output_stats_ms"].items()]
    lines.append(f"\npeaks bitwise equal: {alone['peaks_equal']}")
    for kind, res in results["sets"].items():
        lines += ["", f"## In the model: {kind} set, {res['batches']} batches (warm, seconds per pass)", "",
                  "| variant | seconds | best over the plain forward's best |", "|---|---|---|"]
        plain = min(res["seconds"].get("plain forward", [float("nan")]))
        for name, secs in res["seconds"].items():
            lines.append(f"| {name} | {', '.join(f'{s:.3f}' for s in secs)} | {min(secs) / plain:.3f}x |")
        prof = res.get("profile") or {}
        if prof and prof["routed (reap.py)"]["kernels"]:  # device kernels: none on the CPU
            base = prof["plain forward"]["kernels"]
            lines += ["", f"Profile over {results['profile_batches']} batches: device ms, plain "
                      f"{prof['plain forward']['total_ms']:.1f}, routed {prof['routed (reap.py)']['total_ms']:.1f}. "
                      "Routed's kernels (ms, calls; the plain forward's ms):", "",
                      "| kernel | routed ms | calls | plain ms |", "|---|---|---|---|"]
            for key, (ms, calls) in prof["routed (reap.py)"]["kernels"].items():
                lines.append(f"| `{key}` | {ms:.2f} | {calls} | {base.get(key, [0.0])[0]:.2f} |")
    if results.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(results["skipped"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shared_arguments(parser, "4")
    set_arguments(parser, "text,image")
    parser.add_argument("--rows", type=int, default=12288, help="tokens of the synthetic batch (part 1)")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--profile-batches", type=int, default=4)
    args = parser.parse_args()
    bench_device(args)
    if args.tiny:
        args.rows, args.reps = 512, 3
    clock = Clock(args.max_minutes or 4.0)
    bench = loaded_bench(args)
    text = bench.ckpt.family.text_section(bench.ckpt.config)
    results = {**bench_identity(args), "cpus": len(os.sched_getaffinity(0)), "profile_batches": args.profile_batches,
               "parts_alone": parts_alone(args, bench.ckpt.num_experts, bench.ckpt.top_k, text["hidden_size"]),
               "sets": {}}
    counts = {"text": args.samples, "image": args.image_samples}
    for kind in args.sets.split(","):
        results["sets"][kind] = in_model(args, bench, kind, bench.order(kind, counts).samples, clock)
    results["skipped"] = clock.skipped
    report = table(results)
    print("\n" + report)
    (bench.out / "RESULTS_routed_observer.md").write_text(report)
    (bench.out / "RESULTS_routed_observer.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
