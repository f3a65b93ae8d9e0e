"""torchrun data parallel on the gloo backend (CPU): 2 ranks give the 1-rank result."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import astuple
from pathlib import Path

import numpy as np
import pytest

from reap_vlm.calibration.order import padded_positions
from reap_vlm.checkpoint.reader import Checkpoint, forward_weights
from reap_vlm.errors import ReapError
from reap_vlm.score.distributed import DistContext, balanced_shares
from reap_vlm.score.job import _check_plans, forward_cost

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reap(args: list[str], nproc: int, out: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("REAP_")}
    env.update(OMP_NUM_THREADS="1", REAP_DEVICE="cpu", REAP_DTYPE="float32")
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                "--master-addr=127.0.0.1", f"--master-port={_free_port()}"] if nproc > 1 else [sys.executable]
    result = subprocess.run([*launcher, str(ROOT / "reap.py"), *args, "--output", str(out)], capture_output=True,
                            text=True, env=env, cwd=out.parent, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "reap_metadata.json").read_text()), result


def test_batches_are_shared_round_robin_and_disjoint():
    samples = list(range(11))
    shares = [DistContext(r, 3).my_samples(samples, 2) for r in range(3)]
    assert shares == [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10]]
    assert sorted(sum(shares, [])) == samples
    assert [DistContext(r, 3).my_batches(6, costs=[]) for r in range(3)] == [[0, 3], [1, 4], [2, 5]]  # no costs


def test_balanced_shares_give_the_costliest_batch_first_to_the_least_loaded_rank():
    costs = [16, 16, 16, 12, 9, 4, 16, 14, 2]
    # by decreasing cost: 0->r0 16 | 1->r1 16 | 2->r0 (tie, lowest) 32 | 6->r1 32 | 7->r0 46 | 3->r1 44 | 4->r1 53
    # | 5->r0 50 | 8->r0 52
    assert balanced_shares(costs, 2) == [[0, 2, 5, 7, 8], [1, 3, 4, 6]]
    # 3 ranks end at 34 / 34 / 37; in batch order (the rule before) they ended at 30 / 39 / 36
    assert balanced_shares(costs, 3) == [[0, 6, 8], [1, 5, 7], [2, 3, 4]]
    shares = [DistContext(r, 3).my_batches(len(costs), costs) for r in range(3)]
    assert shares == balanced_shares(costs, 3)
    assert sorted(sum(shares, [])) == list(range(len(costs)))  # disjoint and complete
    assert all(share == sorted(share) for share in shares)
    assert balanced_shares([5] * 7, 3) == [[0, 3, 6], [1, 4], [2, 5]]  # equal costs: round-robin
    with pytest.raises(ValueError, match="3 batch costs for 4 batches"):
        DistContext(0, 2).my_batches(4, [1, 2, 3])


def test_balanced_samples_keep_the_single_process_batches():
    samples = list(range(11))  # batches of 2: [0, 1] ... [8, 9], [10]; the short batch stays its owner's last
    lengths = [9, 8, 7, 7, 6, 2, 5, 5, 4, 1, 3]
    costs = padded_positions(lengths, 2)
    assert costs == [18, 14, 12, 10, 8, 3]
    shares = [DistContext(r, 2).my_samples(samples, 2, costs) for r in range(2)]
    # batches 0, 3, 5 (18 + 10 + 3 = 31 positions) and 1, 2, 4 (14 + 12 + 8 = 34)
    assert shares == [[0, 1, 6, 7, 10], [2, 3, 4, 5, 8, 9]]
    assert padded_positions([], 2) == []


def test_every_rank_computes_the_same_forward_cost_whatever_its_hash_seed(tiny_model):
    """The shares are balanced by each batch's cost, computed on every rank: set iteration differs from process to
    process (PYTHONHASHSEED), and a float sum over it would too (the fixture's 12 experts make top_k / num_experts
    inexact), so the cost is summed in whole numbers."""
    code = ("import sys; from reap_vlm.checkpoint.reader import Checkpoint; from reap_vlm.score.job import "
            "forward_cost; print(forward_cost(Checkpoint(sys.argv[1]), None, False))")
    costs = {subprocess.run([sys.executable, "-c", code, str(tiny_model)], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONHASHSEED": seed}, cwd=ROOT).stdout for seed in ("1", "2", "3")}
    assert len(costs) == 1 and "per_position=" in costs.pop()
    ckpt = Checkpoint(tiny_model)
    weights, cost = forward_weights(ckpt), forward_cost(ckpt, None, False)
    assert all(type(n) is int for n in (*weights, *astuple(cost)))  # exact, in any order
    assert cost.per_position == weights.dense * ckpt.num_experts + weights.routed * ckpt.top_k


def test_ranks_that_formed_different_shares_stop_before_anything_is_scored():
    _check_plans(["ab12", "ab12"])
    _check_plans(["ab12"])
    with pytest.raises(ReapError, match="formed different batches or shares"):
        _check_plans(["ab12", "cd34"])
    assert DistContext(0, 1).agree("plan", "ab12") == ["ab12"]  # alone: nothing handed over


@pytest.mark.parametrize("mode", ["full"])
def test_two_gloo_ranks_equal_one_rank(tiny_model, calibration, tmp_path, mode):
    args = ["--model", str(tiny_model), "--calibration", str(calibration / "calibration_data.json"),
            "--batch-size", "2", "--mode", mode, "--prune-ratio", "0.25", "--checkpoint-every", "1"]
    single, _ = _reap(args, 1, tmp_path / "one")
    double, run = _reap(args, 2, tmp_path / "two")
    assert double["run"]["world_size"] == 2
    assert double["num_tokens"] == single["num_tokens"]
    ranks = double["run"]["ranks"]  # each rank's share and times, handed to rank 0 at the reduce
    assert "ranks" not in single["run"] and len(ranks) == 2
    assert sum(r["batches"] for r in ranks) == single["run"]["batches"] and all(r["batches"] for r in ranks)
    assert sum(r["tokens"] for r in ranks) == single["num_tokens"]["total"]
    assert all(r["load"] > 0 and r["scoring"] > 0 for r in ranks)
    for end in ("started", "finished"):  # a late start tells a slow load from a slow share
        assert min(r[f"{end}_after_first_s"] for r in ranks) == 0.0 <= max(r[f"{end}_after_first_s"] for r in ranks)
    assert not {"scoring_started", "scoring_ended"} & {key for r in ranks for key in r}  # the clock readings left out
    for r in ranks:  # each rank's load and scoring, step by step: why one started or ended after another
        assert sum(r["load_steps"].values()) == pytest.approx(r["load"], abs=0.01)
        assert list(r["scoring_steps"]) == ["first batch", "other batches", "stream closed"]
        assert sum(r["scoring_steps"].values()) <= r["scoring"] + 0.003  # each rounded to the millisecond
    assert ranks[0]["load_steps"].keys() == ranks[1]["load_steps"].keys() == double["run"]["load_steps"].keys()
    assert {"max_activation", "max_activation_image", "max_activation_text"} <= set(single["metrics"])
    for name, values in single["metrics"].items():  # the maxima reduced with max (a sum would exceed them)
        np.testing.assert_allclose(np.array(double["metrics"][name]), np.array(values), rtol=1e-12, err_msg=name)
    assert double["experts_to_keep"] == single["experts_to_keep"]
    # every rank kept its own resume file
    assert sorted(p.name for p in (tmp_path / "two").glob("reap_state.rank*")) == [
        "reap_state.rank0-of-2.pt", "reap_state.rank1-of-2.pt"]
    # a rerun resumes on every rank and reproduces the result
    again, _ = _reap(args, 2, tmp_path / "two")
    assert again["run"]["resumed_from"] == again["run"]["batches"]
    assert again["metrics"] == double["metrics"]
