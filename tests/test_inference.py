"""Every forward of ours runs without autograd and without cuDNN attention (a plan per new shape: see
reap_vlm/inference.py), in both scoring engines and the check's runner; the flags are PyTorch's again afterwards,
and a run's resume state records the choice."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import reap_vlm.score.job as score_job
from reap_vlm.check.prompts import calibration_prompts
from reap_vlm.check.runner import ModelRunner
from reap_vlm.score.job import run_reap
from reap_vlm.score.resume import stop_after
from reap_vlm.settings import Settings

ALLOWED = (False, True, True, True, True)  # cuDNN off; flash, memory-efficient, math on; inference mode


@pytest.fixture
def attention_calls(monkeypatch) -> list[tuple[bool, ...]]:
    """(cuDNN, flash, memory-efficient, math attention allowed, inference mode) at each scaled_dot_product_attention
    call."""
    calls: list[tuple[bool, ...]] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    cuda = torch.backends.cuda

    def recorded(*args, **kwargs):
        calls.append((cuda.cudnn_sdp_enabled(), cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(),
                      cuda.math_sdp_enabled(), torch.is_inference_mode_enabled()))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recorded)
    assert torch.backends.cuda.cudnn_sdp_enabled()  # PyTorch's default, before
    yield calls
    assert torch.backends.cuda.cudnn_sdp_enabled()  # and after


def _settings(model, calib: Path, out: Path, **kw) -> Settings:
    return Settings(model_path=Path(model), calibration_path=calib, output_path=out, device="cpu",
                    dtype="float32", prune_ratio=0.25, max_samples=100, resume=False, **kw)


@pytest.mark.parametrize("engine", ["model", "layerwise"])
def test_scoring_forwards_leave_cudnn_attention_out(engine, tiny_model, calibration, tmp_path, attention_calls):
    run_reap(_settings(tiny_model, calibration / "calibration_data.json", tmp_path, engine=engine))
    assert len(attention_calls) >= 4  # text and vision attention, every batch
    assert set(attention_calls) == {ALLOWED}


def test_check_forwards_leave_cudnn_attention_out(tiny_model, calibration, attention_calls):
    runner = ModelRunner(tiny_model, device="cpu", dtype=torch.float32)
    enc = runner.encode(calibration_prompts(calibration / "calibration_data.json", 1, seed=0)[0][0].sample)
    runner.generate(enc, 3)
    runner.generate_batch([enc, enc], 2)
    runner.teacher_forced(enc, [5, 6], keep={layer: list(range(8)) for layer in range(4)}, trace=True)
    assert len(attention_calls) >= 3 * 4
    assert set(attention_calls) == {ALLOWED}


@pytest.mark.parametrize("engine", ["model", "layerwise"])
def test_a_state_saved_under_other_attention_kernels_is_not_resumed(tiny_model, calibration, tmp_path, monkeypatch,
                                                                    engine):
    """Kernels round differently: a run resumes only sums of the attention it runs, and says so once."""
    settings = _settings(tiny_model, calibration / "calibration_data.json", tmp_path, batch_size=2,
                         checkpoint_every=1, engine=engine)
    settings.resume = True
    with stop_after(2):
        run_reap(settings)
    monkeypatch.setattr(score_job, "ATTENTION", "sdpa: cudnn_attention, flash_attention")
    with stop_after(3), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_reap(settings)["run"]["resumed_from"] == 0
    said = [w for w in caught if "saved by a run with other inputs, settings or reap-vlm" in str(w.message)]
    assert len(said) == 1
    assert run_reap(settings)["run"]["resumed_from"] == 3  # the same kernels resume
