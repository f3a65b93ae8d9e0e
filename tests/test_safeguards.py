"""Selection safeguards: super experts (found from max_activation, protected on request), the modality-balanced
criterion, and the calibration's image coverage."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from reap_vlm.errors import ReapError
from reap_vlm.score.job import run_reap
from reap_vlm.score.resume import ResumeState
from reap_vlm.score.stats import ExpertStats
from reap_vlm.selection import balanced_reap, find_super_experts, protect_experts, select_experts
from reap_vlm.settings import Settings

PLANTED = (1, None)  # layer 1; the expert is chosen from the scores (its least routed one)
SCALE = 40.0


def _settings(model, calib_file, out, **kw) -> Settings:
    base = dict(model_path=Path(model), calibration_path=Path(calib_file), output_path=Path(out), device="cpu",
                dtype="float32", prune_ratio=0.25, max_samples=100, resume=False)
    base.update(kw)
    return Settings(**base)


# ------------------------------------------------------------------------------------------------- pure parts

def test_balanced_selection_equals_a_hand_computed_one():
    # image shares: [0, .75, .25, 0] (total 4); text shares: [.5, .05, .1, .35] (total 20); max: [.5, .75, .25, .35]
    metrics = {"reap_image": [[0.0, 3.0, 1.0, 0.0]], "reap_text": [[10.0, 1.0, 2.0, 7.0]]}
    assert balanced_reap(*metrics["reap_image"], *metrics["reap_text"]) == pytest.approx([0.5, 0.75, 0.25, 0.35])
    assert select_experts(metrics, [5], "reap_balanced", 2) == {5: [0, 1]}
    assert select_experts(metrics, [5], "reap_balanced", 3) == {5: [0, 1, 3]}
    # plain REAP over the mixed tokens would have kept the text experts 0 and 3 (image expert 1 last but one)
    metrics["reap"] = [[9.0, 1.5, 1.9, 6.0]]
    assert select_experts(metrics, [5], "reap", 2) == {5: [0, 3]}
    # one modality only: its REAP ranking
    assert balanced_reap([0.0] * 4, [10.0, 1.0, 2.0, 7.0]) == pytest.approx([0.5, 0.05, 0.1, 0.35])
    assert balanced_reap([0.0] * 3, [0.0] * 3) == [0.0] * 3


def test_super_expert_criterion_follows_the_paper():
    # 2 layers x 100 experts: values 1..100 in layer 0 plus one 1000; percentile 99.5 of 200 values
    row0 = [float(v) for v in range(1, 100)] + [1000.0]
    row1 = [float(v) for v in range(1, 101)]
    found = find_super_experts({"max_activation": [row0, row1]}, [3, 7], layers=1.0)
    assert found["global_max"] == 1000.0 and found["threshold"] == max(found["percentile"], 100.0)
    assert found["experts"] == {3: [99]}
    # fraction dominates when outliers are many: 3 experts at 1000 -> percentile 1000, threshold 1000, none above
    row0[:3] = [1000.0] * 3
    assert find_super_experts({"max_activation": [row0, row1]}, [3, 7], layers=1.0)["experts"] == {}
    # only the first `layers` fraction of the MoE layers is searched
    row1[0] = 5000.0
    assert find_super_experts({"max_activation": [row0, row1]}, [3, 7], layers=0.5)["experts"] == {}
    assert find_super_experts({"max_activation": [row0, row1]}, [3, 7], layers=1.0)["experts"] == {7: [0]}
    assert find_super_experts({"reap": [row0]}, [3]) is None  # not measured (router mode, older metadata)


def test_protection_displaces_the_lowest_ranked_kept_experts():
    kept, moved = protect_experts({0: [3, 1, 0, 2, 4], 1: [0, 1, 2, 3, 4]}, 3, {0: [4, 1], 1: [2]})
    assert kept == {0: [1, 3, 4], 1: [0, 1, 2]}
    assert moved == {0: {"added": [4], "displaced": [0]}}
    with pytest.raises(ReapError, match="more than the 1 kept"):
        protect_experts({0: [0, 1, 2]}, 1, {0: [1, 2]})


def test_a_state_saved_before_maxima_existed_is_not_resumed(tmp_path):
    stats = ExpertStats.empty([0, 1], 4)
    stats.layers[0].sums["max_text"] += 2.0
    state = ResumeState(tmp_path / "reap_state.pt", "key")
    state.save(stats, 3)
    fresh = ExpertStats.empty([0, 1], 4)
    assert state.load(fresh) == 3 and fresh.layers[0].sums["max_text"].tolist() == [2.0] * 4
    old = torch.load(state.path, weights_only=True)
    for layer in old["stats"].values():
        del layer["sums"]["max_image"], layer["sums"]["max_text"]
    torch.save(old, state.path)
    fresh = ExpertStats.empty([0, 1], 4)
    later_run = ResumeState(state.path, "key")  # the file as an older version left it, read by a new run
    assert later_run.load(fresh) == 0 and float(fresh.layers[0].sums["count"].sum()) == 0.0


def test_a_state_is_read_once_and_each_load_gets_sums_of_its_own(tmp_path):
    """reap.py's job and its engine both ask: one read (the file gone after it changes nothing), and sums added
    to after the first load do not leak into the second."""
    stats = ExpertStats.empty([0, 1], 4)
    stats.layers[0].sums["count"] += 1.0
    state = ResumeState(tmp_path / "reap_state.pt", "key")
    state.save(stats, 2)
    first, second = ExpertStats.empty([0, 1], 4), ExpertStats.empty([0, 1], 4)
    assert state.load(first) == 2
    state.path.unlink()
    first.layers[0].sums["count"] += 5.0
    assert state.load(second) == 2 and second.layers[0].sums["count"].tolist() == [1.0] * 4


# ------------------------------------------------------------------------------------------ planted super expert

def plant_super_expert(source: Path, target: Path, layer: int, expert: int, channel: int = 5) -> Path:
    """A copy of ``source`` whose expert ``expert`` of ``layer`` has one output channel of down_proj scaled up
    ``SCALE`` times: a massive activation in that channel whenever it is routed (as arXiv 2507.23279 finds)."""
    shutil.copytree(source, target)
    key = f"model.language_model.layers.{layer}.mlp.experts.down_proj"
    index = json.loads((target / "model.safetensors.index.json").read_text())
    shard = target / index["weight_map"][key]
    tensors = load_file(shard)
    down = tensors[key].clone()  # on disk [E, I, H]
    down[expert, :, channel] *= SCALE
    tensors[key] = down
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return target


@pytest.fixture(scope="module")
def planted(tiny_model, calibration, tmp_path_factory):
    """(model folder, planted expert, plain metadata of the original model)."""
    root = tmp_path_factory.mktemp("planted")
    plain = run_reap(_settings(tiny_model, calibration / "calibration_data.json", root / "plain"))
    frequency = plain["metrics"]["frequency"][plain["moe_layers"].index(1)]
    expert = min((f, e) for e, f in enumerate(frequency) if f > 0)[1]  # routed, but the least
    return plant_super_expert(tiny_model, root / "model", 1, expert), expert, plain


def test_the_random_fixture_flags_at_most_its_global_maximum(planted):
    """With 48 experts the 99.5th percentile lies between the two largest maxima, so the paper's criterion flags
    the largest alone (by construction it always flags the global maximum within the searched layers)."""
    _, _, plain = planted
    found = plain["super_experts"]
    assert len(found["details"]) <= 1
    assert all(d["max_activation"] == found["global_max"] for d in found["details"])
    assert plain["protection"] == {"enabled": False, "protected": 0, "brought_in": 0, "layers": {}}


@pytest.mark.parametrize("mode", ["full", "routed"])
def test_a_planted_super_expert_is_found_and_protected(planted, calibration, tmp_path, mode):
    model, expert, plain = planted
    calib = calibration / "calibration_data.json"
    meta = run_reap(_settings(model, calib, tmp_path / "plain", criterion="frequency", scoring_mode=mode))
    found = meta["super_experts"]
    assert found["experts"] == {"1": [expert]}
    assert found["details"][0]["max_activation"] == found["global_max"] > 10 * max(
        v for row in plain["metrics"]["max_activation"] for v in row) / SCALE
    # the least routed expert is pruned by frequency unless protected; protection keeps K per layer
    assert expert not in meta["experts_to_keep"]["1"]
    protected = run_reap(_settings(model, calib, tmp_path / "protected", criterion="frequency", scoring_mode=mode,
                                   protect_super_experts=True))
    kept = protected["experts_to_keep"]["1"]
    assert expert in kept and len(kept) == meta["num_experts_to_keep"]
    lowest_kept = sorted(meta["experts_to_keep"]["1"], key=lambda e: (meta["metrics"]["frequency"][1][e], -e))[0]
    assert protected["protection"]["layers"] == {"1": {"added": [expert], "displaced": [lowest_kept]}}
    assert set(kept) == set(meta["experts_to_keep"]["1"]) - {lowest_kept} | {expert}
    for layer in ("0", "2", "3"):
        assert protected["experts_to_keep"][layer] == meta["experts_to_keep"][layer]
    assert protected["protect_super_experts"] is True and meta["protect_super_experts"] is False
    from reap_vlm.score.report import summary_lines

    text = "\n".join(summary_lines(protected))
    assert f"kept [{expert}] instead of [{lowest_kept}]" in text and "super experts    1" in text


def test_prune_model_recomputes_with_protection(planted, calibration, tmp_path, monkeypatch, capsys):
    from prune_model import main

    model, expert, _ = planted
    reap_out = tmp_path / "reap"
    run_reap(_settings(model, calibration / "calibration_data.json", reap_out, criterion="frequency"))
    monkeypatch.chdir(tmp_path)
    for name in [k for k in os.environ if k.startswith("REAP_")]:  # the caller's settings (or a test's) stay out
        monkeypatch.delenv(name)
    assert main(["--reap-output", str(reap_out), "--output", str(tmp_path / "pruned"),
                 "--protect-super-experts"]) == 0
    out = capsys.readouterr().out
    assert "recomputing the selection: super-expert protection True (--protect-super-experts)" in out
    assert "protected        1 super experts" in out
    record = json.loads((tmp_path / "pruned" / "pruning_record.json").read_text())
    assert expert in record["experts_to_keep"]["1"]
    copied = json.loads((tmp_path / "pruned" / "reap_metadata.json").read_text())
    assert copied["protect_super_experts"] is True and copied["protection"]["brought_in"] == 1
    # the balanced criterion is recomputed from the stored per-modality metrics
    assert main(["--reap-output", str(reap_out), "--output", str(tmp_path / "balanced"),
                 "--criterion", "reap_balanced"]) == 0
    record = json.loads((tmp_path / "balanced" / "pruning_record.json").read_text())
    metrics = json.loads((reap_out / "reap_metadata.json").read_text())["metrics"]
    keep = len(record["experts_to_keep"]["0"])
    assert record["experts_to_keep"] == {str(k): v for k, v in
                                         select_experts(metrics, [0, 1, 2, 3], "reap_balanced", keep).items()}


# ----------------------------------------------------------------------------------------------- coverage

def test_calibration_coverage_and_the_image_warning(tiny_model, calibration, tmp_path):
    mixed = run_reap(_settings(tiny_model, calibration / "calibration_data.json", tmp_path / "mixed",
                               scoring_mode="router", criterion="frequency"))
    coverage = mixed["calibration_coverage"]
    assert coverage["image_share"] == pytest.approx(mixed["num_tokens"]["image"] / mixed["num_tokens"]["total"])
    assert coverage["image_share"] + coverage["text_share"] == pytest.approx(1.0)
    never = [[e for e, c in enumerate(row) if c == 0] for row in mixed["metrics"]["frequency_image"]]
    assert coverage["never_routed_by_image"] == {str(layer): ids for layer, ids in zip(mixed["moe_layers"], never)}
    assert coverage["warning"] is None and mixed["super_experts"] is None  # router mode: no max activation
    with pytest.warns(UserWarning, match=r"only 0.0% of the calibration tokens are image tokens"):
        text = run_reap(_settings(tiny_model, calibration / "text.json", tmp_path / "text", scoring_mode="router",
                                  criterion="frequency"))
    assert text["calibration_coverage"]["experts_never_routed_by_image"] == 4 * 12
    from reap_vlm.score.report import summary_lines

    assert any(line.startswith("warning          only 0.0%") for line in summary_lines(text))
