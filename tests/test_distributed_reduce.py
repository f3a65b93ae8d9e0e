"""The final reduce on 2 gloo ranks (CPU, spawned processes): the ranks meet in the store with no timeout, the first
collective's thread, and the one-collective reduce bitwise equal to the layer-by-layer one it replaced."""

from __future__ import annotations

import copy
import json
import os
import socket
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from reap_vlm.errors import ReapError
from reap_vlm.score.distributed import DistContext
from reap_vlm.score.stats import MAXIMA, ExpertStats

TIMEOUT_S = 2  # the groups' timeout: any collective waiting longer fails
LATE_S = 4  # how much later rank 1 reaches the reduce


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _random_stats(rank: int, layers=(1, 3, 4, 7), experts: int = 16) -> ExpertStats:
    """Sums of very different magnitudes (float64 rounding shows in every sum) and token counts, per rank."""
    gen = torch.Generator().manual_seed(rank)
    stats = ExpertStats.empty(list(layers), experts)
    for i, layer in enumerate(stats.layers.values()):
        for name in layer.sums:
            layer.sums[name] = torch.rand(experts, dtype=torch.float64, generator=gen) * 10.0 ** (i - 3 + rank)
        layer.n_tokens, layer.n_image_tokens = 1_000_003 * (rank + 1) + i, 7_001 * (rank + 2) + i
    return stats


def _reduce_layer_by_layer(stats: ExpertStats) -> None:
    """The reduce before it became one collective (two per layer), for reference."""
    for layer in sorted(stats.layers):
        layer_stats = stats.layers[layer]
        names = sorted(n for n in layer_stats.sums if n not in MAXIMA)
        flat = torch.cat([layer_stats.sums[n] for n in names] + [
            torch.tensor([layer_stats.n_tokens, layer_stats.n_image_tokens], dtype=torch.float64,
                         device=layer_stats.sums[names[0]].device)])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        size = layer_stats.num_experts
        for i, name in enumerate(names):
            layer_stats.sums[name] = flat[i * size:(i + 1) * size].clone()
        layer_stats.n_tokens, layer_stats.n_image_tokens = (int(v) for v in flat[-2:].tolist())
        peaks = torch.cat([layer_stats.sums[n] for n in MAXIMA])
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
        for i, name in enumerate(MAXIMA):
            layer_stats.sums[name] = peaks[i * size:(i + 1) * size].clone()


def _late_rank(ctx: DistContext) -> dict:
    """Rank 1 reaches the reduce LATE_S after rank 0, under a TIMEOUT_S group timeout.  Meanwhile, on a thread, rank
    0 proves that the timeout bites: a collective on a side group of the same timeout, never joined by rank 1."""
    side = dist.new_group([0, 1], timeout=timedelta(seconds=TIMEOUT_S))
    dist.distributed_c10d._set_pg_timeout(timedelta(seconds=TIMEOUT_S))
    out: dict = {}

    def wait_alone() -> None:
        t0 = time.perf_counter()
        try:
            dist.all_reduce(torch.ones(1), group=side)
            out["side"] = "completed"
        except RuntimeError as exc:
            out["side"] = f"failed after {time.perf_counter() - t0:.1f}s: {exc}"

    alone = threading.Thread(target=wait_alone)
    if ctx.rank == 0:
        alone.start()
    else:
        time.sleep(LATE_S)
    stats = _random_stats(ctx.rank)
    t1 = time.perf_counter()
    ctx.all_reduce(stats)
    out["waited_s"] = time.perf_counter() - t1
    out["n_tokens"] = stats.n_tokens
    if ctx.rank == 0:
        alone.join()
    return out


def _bitwise(ctx: DistContext) -> dict:
    stats = _random_stats(ctx.rank)
    reference = copy.deepcopy(stats)
    ctx.settle()  # the first collective's thread done first: the reference's collectives would race it (gloo fails)
    _reduce_layer_by_layer(reference)
    ctx.all_reduce(stats)
    same = [layer == other and all(torch.equal(stats.layers[layer].sums[n], reference.layers[other].sums[n])
                                   for n in reference.layers[other].sums)
            for layer, other in zip(stats.layers, reference.layers)]
    counts = [(s.n_tokens, s.n_image_tokens) for s in stats.layers.values()]
    return {"same": same, "counts": counts,
            "reference_counts": [(s.n_tokens, s.n_image_tokens) for s in reference.layers.values()],
            "names": sorted(stats.layers[1].sums) == sorted(reference.layers[1].sums)}


def _failed_rank(ctx: DistContext) -> dict:
    """Rank 1 fails before the reduce; rank 0, waiting in the store, hears of it instead of waiting forever."""
    if ctx.rank == 1:
        ctx.stop(ok=False)
        return {}
    try:
        ctx.all_reduce(_random_stats(0))
    except ReapError as exc:
        return {"raised": str(exc)}
    return {"raised": None}


def _agree(ctx: DistContext) -> dict:
    """Each rank hands over its value; rank 1 comes later, and the second exchange has keys of its own."""
    if ctx.rank == 1:
        time.sleep(0.5)
    out = {"differ": ctx.agree("plan", f"digest-{ctx.rank}"), "same": ctx.agree("plan", "digest")}
    ctx.settle()
    dist.barrier()  # rank 0 holds this test's store: it must not exit while rank 1 still reads from it
    return out


CASES = {"late_rank": _late_rank, "bitwise": _bitwise, "failed_rank": _failed_rank, "agree": _agree}


def _worker(rank: int, port: int, case: str, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    ctx = DistContext.from_env()
    try:
        ctx.start("cpu")
        ctx.connect("cpu")  # the first collective's thread, as on CUDA; the reduce joins it
        out = CASES[case](ctx)
        out["first_collective"] = ctx.first_collective
    except BaseException:
        out = {"error": traceback.format_exc()}
    Path(folder, f"rank{rank}.json").write_text(json.dumps(out))
    os._exit(0)  # the side group's broken collective must not stall gloo's teardown


def _spawn(case: str, tmp_path: Path) -> list[dict]:
    mp.spawn(_worker, args=(_free_port(), case, str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert "error" not in r, r["error"]
        assert r["first_collective"]["error"] is None and r["first_collective"]["seconds"] is not None
    return results


def test_an_early_rank_waits_past_the_timeout_without_a_collective(tmp_path):
    early, late = _spawn("late_rank", tmp_path)
    assert early["side"].startswith("failed after"), early["side"]  # a waiting collective does time out
    assert early["waited_s"] > LATE_S - 0.5 > TIMEOUT_S, early  # waited in the store, past the timeout
    assert late["waited_s"] < TIMEOUT_S
    assert early["n_tokens"] == late["n_tokens"] == 1_000_003 * 3


def test_one_collective_reduce_is_bitwise_the_layer_by_layer_one(tmp_path):
    for rank in _spawn("bitwise", tmp_path):
        assert rank["names"] and rank["same"] == [True] * 4, rank
        assert rank["counts"] == rank["reference_counts"]
        assert rank["counts"][0] == [1_000_003 * 3, 7_001 * 5]


def test_every_rank_gets_every_ranks_value_in_rank_order(tmp_path):
    """What reap.py compares before scoring (each rank's batch order and shares, ``job._check_plans``): every rank
    sees the same list, so every rank stops, or none."""
    for rank in _spawn("agree", tmp_path):
        assert rank["differ"] == ["digest-0", "digest-1"] and rank["same"] == ["digest", "digest"]


def test_a_failed_rank_ends_the_wait(tmp_path):
    waiting, _ = _spawn("failed_rank", tmp_path)
    assert waiting["raised"] == "rank 1 of 2 failed (its own error says why); this rank stops too"



def test_a_restarted_job_meets_afresh(monkeypatch):
    """torchrun's store outlives a restart (``--max-restarts``): what the first attempt left there (an arrival, a
    failure) neither lets the second attempt's ranks through early nor fails them.  (A real torchrun restart on gloo
    is left out: torch's own gloo setup reads the first attempt's addresses from the store and fails at times.)"""
    from reap_vlm.score import distributed

    store = dist.HashStore()
    monkeypatch.setattr(dist.distributed_c10d, "_get_default_store", lambda: store)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    monkeypatch.setattr(distributed, "_ARRIVALS", iter([0, 0, 1]))  # each attempt's first meeting: the same count
    rank0 = DistContext(0, 2)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    store.add(distributed._key("arrived/reduce/0"), 1)  # attempt 0: rank 1 arrived, then failed
    distributed._announce_failure(1)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    done = threading.Event()
    waiting = threading.Thread(target=lambda: (rank0.arrive("reduce"), done.set()))
    waiting.start()
    time.sleep(0.3)
    assert waiting.is_alive() and not done.is_set()  # neither through on attempt 0's arrival nor failed by its failure
    store.add(distributed._key("arrived/reduce/0"), 1)  # rank 1 of attempt 1 arrives
    waiting.join(5)
    assert done.is_set()
    distributed._announce_failure(0)
    distributed._announce_failure(1)  # a rank that stops on hearing of rank 0's failure does not take the blame
    assert store.get(distributed._key("failed")) == b"0"


def test_a_rank_whose_first_collective_failed_refuses_to_reduce():
    """The other ranks' first collectives may have gone through: one of them would be matched with this rank's
    reduce, so the rank stops with the reason before any collective."""
    ctx = DistContext(1, 2)
    ctx._link.error = "DistBackendError: NCCL error"
    with pytest.raises(ReapError, match=r"rank 1: NCCL's first collective failed \(DistBackendError: NCCL error\)"):
        ctx.all_reduce(_random_stats(1))
