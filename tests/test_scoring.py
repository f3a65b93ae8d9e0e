"""REAP runs: selection, criteria per mode, calibration formats, resume (the scores themselves against a brute force:
tests/test_families.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from reap_vlm.errors import ReapError
from reap_vlm.score import triton_experts
from reap_vlm.score.job import run_reap
from reap_vlm.score.resume import stop_after
from reap_vlm.selection import num_to_keep, select_experts
from reap_vlm.settings import Settings


def _settings(model, calib_file, out, **kw) -> Settings:
    base = dict(model_path=Path(model), calibration_path=Path(calib_file), output_path=Path(out), device="cpu",
                dtype="float32", prune_ratio=0.25, max_samples=100, resume=False)
    base.update(kw)
    return Settings(**base)


# REAP against a float64 brute force (every metric, every mode, both engines, batches with padding) is
# tests/test_families.py, for every family, Qwen3-VL-MoE included.


def test_router_mode_refuses_a_criterion_it_cannot_compute(tiny_model, calibration, tmp_path):
    settings = _settings(tiny_model, calibration / "calibration_data.json", tmp_path, scoring_mode="router",
                         sources={"criterion": "flag"})
    with pytest.raises(ReapError, match="--criterion reap needs expert outputs"):
        run_reap(settings)
    defaulted = run_reap(_settings(tiny_model, calibration / "calibration_data.json", tmp_path / "d",
                                   scoring_mode="router"))
    assert defaulted["criterion"] == "frequency"


def test_kept_experts_are_top_k_by_criterion_and_metadata_is_complete(tiny_model, calibration, tmp_path):
    run_reap(_settings(tiny_model, calibration / "calibration_data.json", tmp_path, criterion="ean",
                       prune_ratio=0.4))
    meta = json.loads((tmp_path / "reap_metadata.json").read_text())
    ean = np.array(meta["metrics"]["ean"])  # equal to the brute force's (tests/test_families.py)
    keep = 12 - int(12 * 0.4)
    assert meta["num_experts_to_keep"] == keep == 8
    for position, layer in enumerate(meta["moe_layers"]):
        expected = sorted(np.argsort(-ean[position], kind="stable")[:keep].tolist())
        assert meta["experts_to_keep"][str(layer)] == expected
    for key in ("reap_version", "methodology", "model_path", "model_type", "num_experts", "top_k", "moe_layers",
                "scoring_mode", "criterion", "prune_ratio", "num_experts_to_keep", "num_samples", "num_tokens",
                "experts_to_keep", "mean_scores", "metrics", "timings"):
        assert key in meta, key
    assert meta["mean_scores"] == meta["metrics"]["ean"]
    assert (tmp_path / "reap_heatmap.png").stat().st_size > 1000
    # the load phase's steps, in order, add up to its seconds (each from the end of the one before)
    steps = meta["run"]["load_steps"]
    assert list(steps) == ["checks", "calibration", "processor", "sums on the device", "batch order",
                           "resume identity", "saved sums", "encoding started", "model"]
    assert all(v >= 0 for v in steps.values()) and steps["model"] == meta["run"]["model_load_seconds"]
    assert sum(steps.values()) == pytest.approx(meta["timings"]["load"], abs=0.01)
    # and the scoring phase's: the loop's steps, within the phase (each lap rounded to the millisecond); on the CPU
    # no device event
    scoring = meta["run"]["scoring_steps"]
    assert list(scoring) == ["first batch", "other batches", "stream closed"] and scoring["first batch"] > 0
    assert sum(scoring.values()) == pytest.approx(meta["run"]["seconds"], abs=0.002)
    assert sum(scoring.values()) <= meta["timings"]["scoring"] + 0.002
    assert "first_batch_device_seconds" not in meta["run"]


def test_text_only_calibration_counts_no_image_tokens(tiny_model, calibration, tmp_path):
    meta = run_reap(_settings(tiny_model, calibration / "text.json", tmp_path, batch_size=3))
    assert meta["num_tokens"]["image"] == 0 and meta["num_tokens"]["text"] == meta["num_tokens"]["total"] > 0
    assert sum(map(sum, meta["metrics"]["frequency_image"])) == 0
    assert meta["metrics"]["reap_text"] == meta["metrics"]["reap"]


def test_chat_format_runs(tiny_model, calibration, tmp_path):
    meta = run_reap(_settings(tiny_model, calibration / "chat.jsonl", tmp_path, batch_size=2, scoring_mode="routed"))
    assert meta["num_samples"] == 7 and meta["num_tokens"]["image"] > 0


def test_killed_run_resumes_to_the_uninterrupted_result(tiny_model, calibration, tmp_path):
    calib = calibration / "calibration_data.json"
    whole = run_reap(_settings(tiny_model, calib, tmp_path / "whole", batch_size=2))
    resumable = _settings(tiny_model, calib, tmp_path / "killed", batch_size=2, resume=True, checkpoint_every=1)
    with stop_after(2):
        partial = run_reap(resumable)
    assert partial["run"]["resumed_from"] == 0 and not (tmp_path / "killed" / "reap_metadata.json").exists()
    resumed = run_reap(resumable)
    assert resumed["run"]["resumed_from"] == 2
    assert resumed["run"]["scoring_steps"]["first batch"] > 0  # the first batch of this run: the third
    assert resumed["metrics"] == whole["metrics"]  # bitwise: same batches, same float64 sums
    assert resumed["experts_to_keep"] == whole["experts_to_keep"]
    # A different input (another batch size) must not reuse the state.
    other = run_reap(_settings(tiny_model, calib, tmp_path / "killed", batch_size=3, resume=True))
    assert other["run"]["resumed_from"] == 0


@pytest.mark.parametrize("engine", ["model", "layerwise"])
def test_a_finished_run_selects_again_without_loading_the_model(tiny_model, calibration, tmp_path, monkeypatch,
                                                                  engine):
    """Rerunning a finished, resumable run for another prune ratio reuses the saved sums: the selection is the one a
    fresh run at that ratio makes, and no engine loads the model (a 235B model takes minutes to load)."""
    import reap_vlm.score.job as score_job

    calib = calibration / "calibration_data.json"
    first = _settings(tiny_model, calib, tmp_path / "out", resume=True, engine=engine)
    run_reap(first)
    fresh = run_reap(_settings(tiny_model, calib, tmp_path / "fresh", prune_ratio=0.5, engine=engine))

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded for a finished run")

    monkeypatch.setattr(score_job, "load_model", refuse)
    monkeypatch.setattr(score_job, "run_layerwise", refuse)
    again = run_reap(_settings(tiny_model, calib, tmp_path / "out", resume=True, engine=engine, prune_ratio=0.5))
    assert again["run"]["resumed_from"] == again["run"]["batches"]
    assert again["metrics"] == fresh["metrics"] and again["experts_to_keep"] == fresh["experts_to_keep"]
    assert again["num_experts_to_keep"] != run_reap(first)["num_experts_to_keep"]


@pytest.fixture
def kernel_choices():
    """The fused kernels' timed choices, emptied for the test and put back after it."""
    kernels = (triton_experts._gate_up_act, triton_experts._down_sq)
    saved = dict(triton_experts._choice), [dict(k.cache) for k in kernels]
    triton_experts._choice.clear()
    for kernel in kernels:
        kernel.cache.clear()
    yield kernels
    triton_experts._choice.clear()
    triton_experts._choice.update(saved[0])
    for kernel, cache in zip(kernels, saved[1]):
        kernel.cache.clear()
        kernel.cache.update(cache)


def test_a_resumed_run_takes_the_kernel_choices_its_sums_were_made_with(tiny_model, calibration, tmp_path,
                                                                        kernel_choices):
    """On a GPU the full mode times the fused kernels against bmm, and each kernel's configs, once per process; a
    resumed process that timed again could round the norms otherwise.  The saved state holds the choices, and the
    resumed run takes them over those its own warm-up made, where they were timed on the same GPUs and Triton."""
    up, down = kernel_choices
    path_key = ((12, 64, 48), torch.bfloat16, "cuda:0")
    # the autotuner's keys: H, INTER, the token bucket, then every tensor argument's dtype
    up_key = (48, 32, 7, "torch.bfloat16", "torch.bfloat16", "torch.bfloat16")
    down_key = (48, 32, 11, "torch.bfloat16", "torch.bfloat16", "torch.float32")
    triton_experts._choice[path_key] = "triton"  # as the killed run's first batch decided
    up.cache[up_key], down.cache[down_key] = up.configs[1], down.configs[2]
    record = triton_experts.tuning()
    resumable = _settings(tiny_model, calibration / "calibration_data.json", tmp_path, batch_size=2, resume=True,
                          checkpoint_every=1)
    with stop_after(2):
        run_reap(resumable)
    triton_experts._choice[path_key] = "bmm"  # the resumed process's own warm-up timed otherwise
    up.cache.clear()
    down.cache[down_key] = down.configs[0]
    resumed = run_reap(resumable)
    assert resumed["run"]["resumed_from"] == 2 and resumed["run"]["kernel_choices_resumed"] == 3
    assert triton_experts._choice[path_key] == "triton"
    assert up.cache[up_key] is up.configs[1] and down.cache[down_key] is down.configs[2]
    assert triton_experts.tuning() == record
    assert "kernel_choices_resumed" not in run_reap(_settings(tiny_model, calibration / "calibration_data.json",
                                                              tmp_path / "fresh", batch_size=2))["run"]


def test_kernel_choices_timed_elsewhere_are_timed_again(kernel_choices, monkeypatch, caplog):
    up, _ = kernel_choices
    up.cache[(48, 32, 7, "torch.bfloat16", "torch.bfloat16", "torch.bfloat16")] = up.configs[1]
    triton_experts._choice[((12, 64, 48), torch.bfloat16, "cuda:0")] = "triton"
    monkeypatch.setattr(triton_experts, "gpu_identity", lambda device: "NVIDIA H200 (sm_90)")
    record = triton_experts.tuning()  # the GPUs the paths were timed on
    assert record["gpus"] == {"cuda:0": "NVIDIA H200 (sm_90)"} and record["triton"] == triton_experts.triton.__version__

    def taken(changed: dict) -> int:
        triton_experts._choice.clear()
        up.cache.clear()
        return triton_experts.use_tuning({**record, **changed})

    assert taken({}) == 2
    monkeypatch.setattr(triton_experts, "gpu_identity", lambda device: "NVIDIA H100 80GB HBM3 (sm_90)")
    assert taken({}) == 0 and not triton_experts._choice and not up.cache  # another GPU: none
    monkeypatch.setattr(triton_experts, "gpu_identity", lambda device: "NVIDIA H200 (sm_90)")
    assert taken({"triton": "0.0.1"}) == 1 and not up.cache  # another Triton: the path only
    other = {"_gate_up_act": [[[48, 32, 7], {**up.configs[1].all_kwargs(), "BK": 3}]]}
    assert taken({"configs": other}) == 1 and not up.cache  # a config the kernel does not have: timed again
    assert taken({"gpus": {"garbage": "x"}}) == 0  # no such GPU here
    assert taken({"gpus": None}) == 0 and "timed on other GPUs" in caplog.text
    # a damaged record: nothing of it is taken, not even the entries before the damage
    good = [list(path) for path in record["paths"]]
    with caplog.at_level("WARNING"):
        assert taken({"paths": [*good, [1, 2]]}) == 0 and taken({"paths": [[[1], "torch.nope", "cuda:0", "bmm"]]}) == 0
    assert "cannot be read" in caplog.text and not triton_experts._choice and not up.cache
    assert triton_experts.use_tuning({}) == 0  # a state saved before the choices were


def test_num_to_keep():
    assert num_to_keep(128, 0.40, 1, 8) == 77
    assert num_to_keep(128, 0.40, 8, 8) == 80
    assert num_to_keep(12, 0.25, 1, 4) == 9
    with pytest.raises(ReapError, match="fewer than the 8"):
        num_to_keep(128, 0.95, 1, 8)
    with pytest.raises(ReapError, match="removes no expert"):
        num_to_keep(128, 0.0, 1, 8)
    with pytest.raises(ReapError, match="removes no expert"):
        num_to_keep(12, 0.25, 12, 4)


def test_ties_broken_by_reap_dense_then_frequency_then_id():
    metrics = {"reap": [[1.0, 1.0, 1.0, 0.5]], "reap_dense": [[0.1, 0.2, 0.2, 0.9]], "frequency": [[5, 3, 4, 9]]}
    assert select_experts(metrics, [0], "reap", 2) == {0: [1, 2]}
    metrics["frequency"] = [[5, 4, 4, 9]]
    assert select_experts(metrics, [0], "reap", 2) == {0: [1, 2]}
    assert select_experts(metrics, [0], "reap", 1) == {0: [1]}


def test_resume_state_is_not_reused_when_an_image_changes(tiny_model, calibration, tmp_path):
    import shutil

    from PIL import Image

    calib = shutil.copytree(calibration, tmp_path / "calib")
    settings = _settings(tiny_model, calib / "calibration_data.json", tmp_path / "out", resume=True)
    first = run_reap(settings)
    assert first["calibration_samples"] == list(range(8))
    assert run_reap(settings)["run"]["resumed_from"] == first["run"]["batches"]  # same inputs: reused
    Image.new("RGB", (96, 64), (10, 200, 10)).save(calib / "images" / "00001.png")  # same name, new pixels
    again = run_reap(settings)
    assert again["run"]["resumed_from"] == 0
    assert again["metrics"]["reap"] != first["metrics"]["reap"]
