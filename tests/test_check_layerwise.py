"""The layer-wise check and --check-mode: streamed a decoder layer at a time, the surgery check and the teacher-forced
agreement are the whole-model check's, figure for figure; auto picks whole / packed / layer-wise from free memory.

The whole-model check teacher-forces prompt + the original's generation, the layer-wise check the prompt alone
(it generates nothing); to compare the two on the same tokens the whole-model runs here generate nothing (the
runner's ``generate`` returns an empty continuation), so both measure the prompts' own tokens.
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from test_evaluation import KEEP, _clean_environment, edit_tensor  # noqa: F401 (an autouse fixture)

import test_pruned_model
from reap_vlm.check import mode as check_mode
from reap_vlm.check import runner
from reap_vlm.check.layerwise import NO_GENERATION
from reap_vlm.check.mode import choose_check_mode, layerwise_bytes, whole_bytes
from reap_vlm.checkpoint.loading import load_model
from reap_vlm.checkpoint.packed import packed_model_bytes
from reap_vlm.checkpoint.reader import Checkpoint
from reap_vlm.cli import run_main
from reap_vlm.errors import ConfigError, ReapError
from reap_vlm.prune.rewrite import prune_checkpoint

GiB = 1 << 30


@pytest.fixture(scope="module")
def pruned(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """A correctly pruned fixture and a copy with two router rows swapped in layer 2."""
    root = tmp_path_factory.mktemp("check-lw")
    good, scrambled = root / "good", root / "scrambled"
    prune_checkpoint(tiny_model, good, KEEP, progress=False)
    shutil.copytree(good, scrambled)
    edit_tensor(scrambled, "model.language_model.layers.2.mlp.gate.weight", lambda w: w[[1, 0, *range(2, 8)]])
    return {"good": good, "scrambled": scrambled}


@pytest.fixture(scope="module")
def quantized_pair(fixture_root, tmp_path_factory) -> tuple[Path, Path]:
    """An AWQ per-expert fixture (the user's format) and its pruned copy."""
    quantized, _ = importlib.import_module("reap_vlm.fixtures.quantized").build_quantized_checkpoint(
        fixture_root / "check-lw-awq", "awq")
    out = tmp_path_factory.mktemp("check-lw-awq") / "pruned"
    prune_checkpoint(quantized, out, KEEP, progress=False)
    return quantized, out


def _check(model: Path, reference: Path, calibration: Path, out: Path, mode: str, monkeypatch) -> tuple[int, dict]:
    with monkeypatch.context() as m:
        if mode == "whole":  # the prompts' own tokens, as the layer-wise check measures them
            m.setattr(runner.ModelRunner, "generate_batch", lambda self, encs, n: [
                runner.make_generation([], self.tokenizer, self.end_ids) for _ in encs])
        code = run_main(test_pruned_model.main, [
            "--model", str(model), "--reference", str(reference), "--calibration",
            str(calibration / "calibration_data.json"), "--output", str(out), "--num-prompts", "4",
            "--max-new-tokens", "4", "--device", "cpu", "--check-mode", mode])
    return code, json.loads((out / "test_report.json").read_text())


def _figures(report: dict) -> dict:
    """Everything the surgery and agreement checks measured."""
    return {"surgery": next(c for c in report["checks"] if c["name"] == "surgery"),
            "prompts": [(r["id"], r["tokenizer_match"], r["surgery"], r["agreement"]) for r in report["prompts"]],
            "layers": report["layers"], "first_divergence": report["first_divergence"],
            **{k: report["summary"][k] for k in ("top1_agreement", "mean_kl", "compared_positions", "with_image")}}


@pytest.mark.parametrize("case", ["good", "scrambled"])
def test_layerwise_check_equals_the_whole_model_check(case, tiny_model, pruned, calibration, tmp_path, monkeypatch):
    """Same verdict, same numbers (exactly, float32 on the CPU: same batches, modules and kernels), images and
    deepstack included (2 of the 4 prompts have one)."""
    whole_code, whole = _check(pruned[case], tiny_model, calibration, tmp_path / "whole", "whole", monkeypatch)
    code, layerwise = _check(pruned[case], tiny_model, calibration, tmp_path / "lw", "layerwise", monkeypatch)
    assert _figures(layerwise) == _figures(whole)
    assert whole["summary"]["with_image"] == 2 and whole["summary"]["compared_positions"] > 0
    assert layerwise["check_mode"]["mode"] == "layerwise"
    status = {c["name"]: (c["status"], c["why"]) for c in layerwise["checks"]}
    assert status["generation"] == ("skipped", NO_GENERATION)  # said, with what was checked instead
    assert NO_GENERATION in layerwise["notes"]
    assert all(r["pruned"] is None and r["bbox"] is None for r in layerwise["prompts"])
    md = (tmp_path / "lw" / "test_report.md").read_text()
    assert "| generation | SKIPPED | layer-wise check: generation needs the whole model" in md
    if case == "good":
        assert (code, whole_code) == (0, 0) and status["surgery"][0] == "pass"
        assert layerwise["verdict"].startswith("PASS: surgery consistent") and "generation skipped" in \
            layerwise["verdict"]
    else:
        assert code == whole_code == 1
        assert layerwise["verdict"].startswith("FAIL: surgery: ")
        assert "router of layer 2 differs at 64/64 traced tokens" in layerwise["verdict"]
        assert [x["layer"] for x in layerwise["layers"] if x["router_mismatches"]] == [2]


def test_layerwise_check_of_a_quantized_pair_equals_the_whole_model_check(quantized_pair, calibration, tmp_path,
                                                                          monkeypatch):
    """AWQ per-expert: the layer-wise check dequantizes a layer at a time what the whole check dequantizes at once."""
    original, pruned_awq = quantized_pair
    whole_code, whole = _check(pruned_awq, original, calibration, tmp_path / "whole", "whole", monkeypatch)
    code, layerwise = _check(pruned_awq, original, calibration, tmp_path / "lw", "layerwise", monkeypatch)
    assert code == whole_code == 0
    assert _figures(layerwise) == _figures(whole)


def test_packed_check_of_a_quantized_pair_equals_the_whole_model_check(quantized_pair, calibration, tmp_path):
    """AWQ per-expert, --check-mode packed: generation included, every figure and every answer is the whole
    (dequantized) check's, since the packed forward is the dequantized one bit for bit (tests/test_packed.py)."""
    original, pruned_awq = quantized_pair
    reports = {}
    for mode in ("whole", "packed"):
        code = run_main(test_pruned_model.main, [
            "--model", str(pruned_awq), "--reference", str(original), "--calibration",
            str(calibration / "calibration_data.json"), "--output", str(tmp_path / mode), "--num-prompts", "4",
            "--max-new-tokens", "6", "--device", "cpu", "--check-mode", mode])
        assert code == 0
        reports[mode] = json.loads((tmp_path / mode / "test_report.json").read_text())
    whole, packed = reports["whole"], reports["packed"]
    assert packed["check_mode"]["mode"] == "packed"
    assert _figures(packed) == _figures(whole)
    answers = [(r["original"], r["pruned"]) for r in whole["prompts"]]
    assert [(r["original"], r["pruned"]) for r in packed["prompts"]] == answers
    assert any(pruned is not None for _, pruned in answers)  # generation ran
    assert packed["verdict"] == whole["verdict"]


def test_auto_picks_layerwise_in_the_check(tiny_model, pruned, calibration, tmp_path, monkeypatch):
    """Auto, with free memory faked below the model's size: the layer-wise check runs and the report says why."""
    need = whole_bytes(tiny_model, torch.float32)
    monkeypatch.setattr(check_mode, "device_free_bytes", lambda device, spread=True: need)  # 85% of it is too little
    monkeypatch.setattr(check_mode, "LAYERWISE_WORKSPACE", 0)
    code, report = _check(pruned["good"], tiny_model, calibration, tmp_path / "auto", "auto", monkeypatch)
    assert code == 0
    chosen = report["check_mode"]
    assert chosen["mode"] == "layerwise" and chosen["free_bytes"] == need
    assert chosen["why"].startswith("auto: the models fit nowhere whole")
    assert chosen["needs"]["whole"] == need
    assert f"- check mode: layerwise ({chosen['why']})" in (tmp_path / "auto" / "test_report.md").read_text()


def test_whole_bytes_is_what_the_loaded_model_takes(tiny_model):
    model = load_model(tiny_model, dtype=torch.float32)
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    assert whole_bytes(tiny_model, torch.float32) == held
    assert whole_bytes(tiny_model, torch.bfloat16) == held // 2


def test_auto_choices_and_why(tiny_model, pruned, quantized_pair, monkeypatch):
    monkeypatch.setattr(check_mode, "LAYERWISE_WORKSPACE", 0)  # 1 GiB: more than the whole tiny model
    good = pruned["good"]
    need = whole_bytes(tiny_model, torch.float32)  # the original: the larger of the two
    layer = layerwise_bytes(tiny_model, torch.float32)
    assert layer < need
    dtype = torch.float32

    chosen = choose_check_mode("auto", good, tiny_model, "cpu", dtype, free_bytes=2 * need)
    assert chosen.mode == "whole" and chosen.why.startswith("auto: the larger model takes")
    chosen = choose_check_mode("auto", good, tiny_model, "cpu", dtype, free_bytes=need)
    assert chosen.mode == "layerwise" and chosen.needs == {"whole": need, "layerwise": layer}
    with pytest.raises(ReapError, match="not even one decoder layer of the models fits"):
        choose_check_mode("auto", good, tiny_model, "cpu", dtype, free_bytes=layer)
    with pytest.raises(ReapError, match="without the original the layer-wise check has nothing to compare"):
        choose_check_mode("auto", good, None, "cpu", dtype, free_bytes=need // 2)
    assert choose_check_mode("auto", good, None, "cpu", dtype, free_bytes=2 * need).mode == "whole"
    assert choose_check_mode("whole", good, tiny_model, "cpu", dtype, free_bytes=1).mode == "whole"  # as asked

    # quantized: packed when the packed size fits and the dequantized does not (packed_model_bytes is the packed
    # loader's; its figure is faked here)
    original, pruned_awq = quantized_pair
    dequantized = whole_bytes(original, dtype)
    # the packed need is the weights as stored plus the forward's working memory, at least one layer's experts in
    # the model's dtype
    ckpt = Checkpoint(original)
    sizes, experts = ckpt.family.sizes(ckpt.config), ckpt.family.num_experts(ckpt.config)
    layer_experts = experts * 3 * sizes["H"] * sizes["I"] * torch.finfo(dtype).bits // 8
    assert check_mode.packed_bytes(original, dtype) - packed_model_bytes(original, dtype) > layer_experts
    monkeypatch.setattr(check_mode, "packed_bytes", lambda path, dtype: dequantized // 2)
    chosen = choose_check_mode("auto", pruned_awq, original, "cpu", dtype, free_bytes=dequantized)
    assert chosen.mode == "packed" and "does not fit" in chosen.why and chosen.needs["packed"] == dequantized // 2
    chosen = choose_check_mode("auto", pruned_awq, original, "cpu", dtype, free_bytes=dequantized // 2)
    assert chosen.mode == "layerwise" and "packed" in chosen.why

    with pytest.raises(ConfigError, match="neither checkpoint is quantized"):
        choose_check_mode("packed", good, tiny_model, "cpu", dtype)
    with pytest.raises(ConfigError, match="there is no original"):
        choose_check_mode("layerwise", good, None, "cpu", dtype)


def test_check_mode_option(tmp_path):
    from reap_vlm.check.options import TEST_FLAGS, TEST_OPTIONS
    from reap_vlm.settings import parse_settings

    settings = parse_settings("t", TEST_OPTIONS, [], flags=TEST_FLAGS, environ={"REAP_CHECK_MODE": "LayerWise"})
    assert settings.check_mode == "layerwise" and settings.sources["check_mode"] == "env"
    assert parse_settings("t", TEST_OPTIONS, [], flags=TEST_FLAGS, environ={}).check_mode == "auto"
    with pytest.raises(ConfigError, match="--check-mode / REAP_CHECK_MODE='fast' is not valid: expected one of auto"):
        parse_settings("t", TEST_OPTIONS, ["--check-mode", "fast"], flags=TEST_FLAGS, environ={})


def test_bench_check_layerwise_tiny(tmp_path):
    """The GPU benchmark's --tiny run: the layer-wise check passes on its generated pair, results written."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    bench = importlib.import_module("bench_check_layerwise")
    assert bench.main(["--tiny", "--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "work"),
                       "--prompts", "2"]) == 0
    res = json.loads((tmp_path / "out" / "RESULTS_check_layerwise.json").read_text())
    assert res["checkpoint"]["layers"] == 2 and len(res["check"]["timing"]["per_layer"]) == 2
    assert res["check"]["check_mode"]["mode"] == "layerwise" and res["check"]["verdict"].startswith("PASS")
    assert res["projection"]["layers"] == 94 and res["projection"]["seconds"] > 0
    assert "## Projection: 94-layer 235B-A22B in bf16" in (tmp_path / "out" / "RESULTS_check_layerwise.md").read_text()
    assert not (tmp_path / "work" / "original").exists()  # generated checkpoints removed
