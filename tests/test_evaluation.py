"""test_pruned_model.py: faithful pruned models pass; scrambled routers and degenerate heads fail, saying why.

Unit tests cover the pieces (degenerate detection, tolerances, agreement, the layer diagnosis,
finding the original and the kept experts, prompts, the report); the end-to-end tests prune the
tiny fixture with the real pruner and corrupt copies of the result.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import test_pruned_model
from reap_vlm.check.checks import _bbox_rows, _generation_check, _threshold_check, bbox_summary
from reap_vlm.check.compare import (
    TOLERANCES,
    agreement,
    compare_layers,
    compare_logits,
    first_input_divergence,
    tolerance_for,
)
from reap_vlm.check.degenerate import detect_degenerate, longest_periodic_run
from reap_vlm.check.inputs import find_reference, resolve_inputs
from reap_vlm.check.job import ModelPass
from reap_vlm.check.options import TEST_FLAGS, TEST_OPTIONS
from reap_vlm.check.prompts import builtin_prompts, calibration_prompts, choose_prompts
from reap_vlm.check.report import Check, markdown, verdict
from reap_vlm.check.runner import Generation, LayerTrace, ModelRunner
from reap_vlm.checkpoint.reader import Checkpoint
from reap_vlm.cli import run_main
from reap_vlm.metadata import METADATA_NAME
from reap_vlm.prune.rewrite import PRUNING_RECORD, prune_checkpoint
from reap_vlm.settings import OPTIONS, parse_settings

ROOT = Path(__file__).resolve().parents[1]
# 8 of 12 experts per layer, a different non-contiguous set in every layer.
KEEP = {layer: sorted(random.Random(layer).sample(range(12), 8)) for layer in range(4)}
FAST = ["--num-prompts", "2", "--max-new-tokens", "8"]


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch, tmp_path):
    """No REAP_* variable or .env file of the developer's leaks into a test."""
    for option in OPTIONS.values():
        monkeypatch.delenv(option.env, raising=False)
    monkeypatch.delenv("REAP_ENV_FILE", raising=False)
    monkeypatch.chdir(tmp_path)


def settings_for(argv: list[str]):
    return parse_settings("t", TEST_OPTIONS, argv, flags=TEST_FLAGS, environ={})


# ----------------------------------------------------------------------------------------------- degenerate

class Tok:
    """A toy tokenizer: ids are characters' code points."""

    @staticmethod
    def ids(text: str) -> list[int]:
        return [ord(c) for c in text]


def test_the_users_symptom_is_degenerate():
    ids = [97] + [1000] * 30  # "a" then " a" x30, as a BPE tokenizer splits "a a a a ..."
    bad = detect_degenerate(ids, "a" + " a" * 30)
    assert bad and bad.reason == "repetition"
    assert "x30" in bad.detail or "x31" in bad.detail


@pytest.mark.parametrize(("ids", "text", "reason"), [
    ([], "", "empty"),
    ([7, 7], "", "empty"),  # only end-of-sequence tokens
    ([32, 32, 10], "  \n", "empty"),
    ([500, 501, 500], "", "special tokens only"),
    (Tok.ids("abcabcabcabcabc"), "abcabcabcabcabc", "repetition"),  # a short n-gram
    (Tok.ids("!!!!!!!!"), "!!!!!!!!", "repetition"),
    (Tok.ids("The answer is 42.xyxyxyxyxyxyxyxyxyxyxy"), "The answer is 42.xyxyxyxyxyxyxyxyxyxyxy", "repetition"),
])
def test_degenerate_outputs(ids, text, reason):
    bad = detect_degenerate(ids, text, special_ids={500, 501}, end_ids={7})
    assert bad is not None and bad.reason == reason, bad


def test_end_tokens_are_stripped_before_judging():
    ids = Tok.ids("A fine answer.") + [7, 7, 7, 7, 7, 7]
    assert detect_degenerate(ids, "A fine answer.", end_ids={7}) is None


@pytest.mark.parametrize("text", [
    "The red square is at the top left of the image.",
    '{"bbox_2d": [120, 340, 560, 780]}',
    "Count: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10.",
    "A long answer that ends with some emphasis!!!!",
    "ha ha",  # too few repeats
    "Resimde kirmizi bir kare ve mavi bir daire var.",
])
def test_normal_outputs_are_not_degenerate(text):
    assert detect_degenerate(Tok.ids(text), text) is None


def test_word_level_repetition_catches_irregular_tokenization():
    text = "a a a a a a a a a a"
    ids = list(range(100, 110))  # every token different (a tokenizer merging spaces unevenly)
    bad = detect_degenerate(ids, text)
    assert bad and "words" in bad.detail


def test_longest_periodic_run():
    run = longest_periodic_run([1, 2, 3, 3, 3, 3, 3, 9])
    assert (run.period, run.start, run.length) == (1, 2, 5)
    run = longest_periodic_run([5, 1, 2, 1, 2, 1, 2, 1, 2, 6])
    assert (run.period, run.start, run.length) == (2, 1, 8)
    assert longest_periodic_run([1, 2, 3, 4, 5, 6]) is None
    assert longest_periodic_run([1, 1, 1]) is None  # 3 repeats < 4


def test_degenerate_message_uses_decode():
    bad = detect_degenerate([5] * 10, "zzzzzzzzzz", decode=lambda ids: "z" * len(ids))
    assert "'z' x10" in bad.detail


# ----------------------------------------------------------------------------------------------- comparisons

def test_tolerance_per_dtype():
    assert tolerance_for(torch.float32).rel == 1e-4 and tolerance_for(torch.float32).max_mismatch_fraction == 0
    assert tolerance_for(torch.bfloat16).rel > tolerance_for(torch.float16).rel > tolerance_for(torch.float32).rel
    assert set(TOLERANCES) == {"float32", "bfloat16", "float16"}


def test_compare_logits_scales_with_the_logits():
    tol = TOLERANCES["float32"]
    ref = torch.randn(5, 50) * 30
    scale = float(ref.abs().max())
    ok = compare_logits(ref, ref + 0.5e-4 * scale, tol)
    assert ok.mismatched == 0 and ok.max_abs == pytest.approx(0.5e-4 * scale, rel=1e-3)
    bad = ref.clone()
    bad[2, 7] += 2e-4 * scale
    diff = compare_logits(ref, bad, tol)
    assert diff.mismatched == 1 and diff.positions == 5
    small = torch.randn(3, 10) * 0.5  # logits under 1: the bound does not shrink below rel * 1
    assert compare_logits(small, small + 0.9e-4, tol).mismatched == 0


def test_compare_logits_flags_non_finite():
    ref = torch.zeros(2, 4)
    out = ref.clone()
    out[1, 2] = math.nan
    diff = compare_logits(ref, out, TOLERANCES["float32"])
    assert diff.non_finite and diff.mismatched == 1 and math.isinf(diff.max_abs)


def test_agreement():
    ref = torch.randn(6, 20)
    same = agreement(ref, ref.clone(), chunk=4)
    assert same.top1 == 1 and same.kl == pytest.approx(0, abs=1e-6)
    flipped = agreement(ref, -ref)
    assert flipped.top1 == 0 and flipped.kl > 0.1


ORDER = {layer: [0, 2, 4, 6, 8, 10] for layer in range(3)}  # pruned id -> original id


def _replays(seed: int = 0, tokens: int = 5) -> tuple[LayerTrace, LayerTrace]:
    """A masked original's layer replays and a faithful pruned model's (the kept columns, renumbered)."""
    g = torch.Generator().manual_seed(seed)
    ref = LayerTrace()
    for layer in range(3):
        ref.inputs[layer] = torch.randn(tokens, 8, generator=g)
        ref.router[layer] = torch.randn(tokens, 12, generator=g) * 3
        ref.outputs[layer] = torch.randn(tokens, 8, generator=g)
    pruned = LayerTrace({k: v.clone() for k, v in ref.inputs.items()},
                        {k: v[:, ORDER[k]].clone() for k, v in ref.router.items()},
                        {k: v.clone() for k, v in ref.outputs.items()})
    return ref, pruned


def test_layer_replay_passes_a_faithful_model():
    ref, pruned = _replays()
    layers = compare_layers(ref, pruned, ORDER, top_k=2, tol=TOLERANCES["float32"])
    assert sorted(layers) == [0, 1, 2] and not any(c.failed for c in layers.values())
    assert all(c.tokens == 5 for c in layers.values())
    compare_layers(ref, pruned, ORDER, top_k=2, tol=TOLERANCES["float32"], into=layers)  # accumulates prompts
    assert all(c.tokens == 10 for c in layers.values())


def test_layer_replay_names_scrambled_router_rows():
    ref, pruned = _replays()
    pruned.router[1] = pruned.router[1][:, [1, 0, 2, 3, 4, 5]]
    pruned.outputs[1] += 1  # wrong routing changes the output too: blamed on the router, not the experts
    layers = compare_layers(ref, pruned, ORDER, top_k=2, tol=TOLERANCES["bfloat16"])
    assert [c.layer for c in layers.values() if c.failed] == [1]
    assert layers[1].router_mismatches == 5 and layers[1].expert_mismatches == 0
    assert layers[1].describe().startswith("router of layer 1 differs at 5/5 traced tokens")


def test_layer_replay_names_misnumbered_experts():
    ref, pruned = _replays()
    pruned.outputs[2][3] += 0.5  # one token routed to a wrong expert
    layers = compare_layers(ref, pruned, ORDER, top_k=2, tol=TOLERANCES["float32"])
    assert layers[2].expert_mismatches == 1 and layers[2].router_mismatches == 0
    assert layers[2].describe().startswith("experts of layer 2 differ at 1/5 traced tokens")


def test_layer_replay_excuses_a_flip_at_a_near_tie():
    ref, pruned = _replays()
    kept = torch.tensor([5.0, 1e-4, 0.0, -3, -5, -7])  # the 2nd and 3rd kept experts tie at the top-2 boundary
    ref.router[0][0, ORDER[0]] = kept
    pruned.router[0][0] = kept + torch.tensor([0, 0, 1e-4, 0, 0, 0])  # a last-bit difference...
    pruned.outputs[0][0] += 1  # ...that picked the other expert
    layers = compare_layers(ref, pruned, ORDER, top_k=2, tol=TOLERANCES["float32"])
    assert not layers[0].failed and layers[0].excused == 1


def test_first_input_divergence():
    ref, pruned = _replays()
    tol = TOLERANCES["float32"]
    assert first_input_divergence(ref, pruned, tol).startswith("after the last MoE block")
    pruned.inputs[1] = pruned.inputs[1] + 1
    assert first_input_divergence(ref, pruned, tol).startswith("before the MoE block of layer 1")


# ----------------------------------------------------------------------------------------------- checks, report

def _row(i, degenerate, fails):
    return {"index": i, "pruned": {"degenerate": degenerate}, "degenerate_fails": fails}


def test_generation_check_excuses_what_the_original_also_does():
    rows = [_row(0, None, False), _row(1, "repetition: 'a' x8", False)]
    check = _generation_check(rows, has_reference=True)
    assert check.status == "pass" and "1/2 degenerate (1 also from the original)" in check.summary
    check = _generation_check([_row(0, "empty", True)], has_reference=False)
    assert check.failed and "no original to compare with" in check.why and "#0 empty" in check.why


def test_threshold_checks():
    assert _threshold_check("min_top1_agreement", "top-1 agreement", 0.9, None, "x") is None
    assert _threshold_check("min_top1_agreement", "top-1 agreement", 0.9, 0.8, "x").status == "pass"
    low = _threshold_check("min_top1_agreement", "top-1 agreement", 0.5, 0.8, "x")
    assert low.failed and "below --min-top1-agreement 0.8" in low.why
    missing = _threshold_check("min_bbox_iou", "mean IoU", None, 0.5, "no boxes")
    assert missing.failed and "no boxes" in missing.why


def _pass_with(texts: list[str]) -> ModelPass:
    gens = [Generation([1], True, text, text) for text in texts]
    return ModelPass([], gens, [], [])


def test_bbox_rows_pictures_and_summary(calibration, tmp_path):
    prompts, _ = calibration_prompts(calibration / "calibration_data.json", 4, seed=1)  # image, text, image, text
    pruned = _pass_with(['{"bbox_2d": [100, 100, 500, 500]}', "hello", "no idea", "hi"])
    original = _pass_with(['```json\n{"bbox_2d": [100, 100, 500, 300]}\n```', "hello", "[0, 0, 1000, 1000]", "x"])
    rows = _bbox_rows(prompts, pruned, original, tmp_path)
    assert rows[1] is None and rows[3] is None  # text prompts have no box
    assert rows[0]["iou"] == pytest.approx(0.5) and rows[0]["pruned"] == "[100, 100, 500, 500]"
    assert rows[2]["iou"] == 0.0 and rows[2]["pruned"] == "invalid (no box found)"  # no box where one was due
    for row in (rows[0], rows[2]):
        with Image.open(tmp_path / row["picture"]) as picture:
            assert picture.format == "PNG"
    summary, text, mean_iou = bbox_summary(rows, has_reference=True)
    assert mean_iou == pytest.approx(0.25) and summary["boxes_valid"] == "1/2"
    assert summary["original_boxes_valid"] == "2/2" and text == "boxes valid 1/2 (original 2/2), mean IoU 0.25"
    alone = _bbox_rows(prompts, pruned, None, tmp_path)
    assert bbox_summary(alone, has_reference=False) == ({"boxes_valid": "1/2"}, "boxes valid 1/2", None)
    assert alone[0]["iou"] is None and alone[2]["picture"] is None  # nothing to draw without any box
    assert sorted(p.name for p in (tmp_path / "bbox").iterdir()) == ["000-" + prompts[0].id.replace(":", "-")
                                                                   + ".png"]  # the folder is replaced whole


def test_verdict_line():
    ok = [Check("surgery", "pass", "surgery exact"), Check("generation", "pass", "0/8 degenerate")]
    assert verdict(ok, ["KL 0.01"]) == "PASS: surgery exact, 0/8 degenerate, KL 0.01"
    bad = [Check("surgery", "fail", "surgery", "max |dlogit| 2"), ok[1]]
    line = verdict(bad, ["KL 0.01"])
    assert line.startswith("FAIL: surgery: max |dlogit| 2 | 0/8 degenerate") and "\n" not in line


# ----------------------------------------------------------------------------------------------- prompts

def test_calibration_prompts_mix_images_and_text(calibration):
    prompts, skipped = calibration_prompts(calibration / "calibration_data.json", 4, seed=1)
    assert not skipped and len(prompts) == 4
    assert [p.sample.has_image for p in prompts] == [True, False, True, False]
    assert prompts[0].kind == "grounding" and prompts[0].sample.regions and prompts[0].question
    again, _ = calibration_prompts(calibration / "calibration_data.json", 4, seed=1)
    assert [p.id for p in again] == [p.id for p in prompts]  # the seed decides
    many, _ = calibration_prompts(calibration / "calibration_data.json", 50, seed=1)
    assert len(many) == 8  # every item, when fewer than asked


def test_calibration_prompts_avoid_scored_items(calibration):
    """Items 0-5 carry images, 6-7 are text; 0-3 and 6 were scored."""
    path = calibration / "calibration_data.json"
    scored = {0, 1, 2, 3, 6}
    prompts, _ = calibration_prompts(path, 3, seed=1, scored=scored)
    assert sorted(p.sample.index for p in prompts) == [4, 5, 7] and not any(p.also_calibration for p in prompts)
    assert [p.sample.has_image for p in prompts] == [True, False, True]
    prompts, _ = calibration_prompts(path, 5, seed=1, scored=scored)  # only 3 held out: 2 scored ones fill in
    assert sorted(p.sample.index for p in prompts[:3]) == [4, 5, 7]
    assert [p.also_calibration for p in prompts] == [False, False, False, True, True]
    assert all(p.sample.index in scored for p in prompts[3:])
    plain, _ = calibration_prompts(path, 4, seed=1)
    assert [p.id for p in plain] == [p.id for p in calibration_prompts(path, 4, seed=1, scored=())[0]]


def write_reap_metadata(folder: Path, **fields) -> Path:
    """A pruned folder's reap_metadata.json, written by hand (what reap.py records, as prune_model.py copies it)."""
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {"moe_layers": [0, 1, 2, 3], "num_experts": 12, "prune_ratio": 0.33, "criterion": "reap",
                "experts_to_keep": {str(layer): ids for layer, ids in KEEP.items()}, **fields}
    (folder / METADATA_NAME).write_text(json.dumps(metadata))
    return folder


def test_prompts_are_held_out_from_the_scored_calibration_samples(calibration, tmp_path):
    path = calibration / "calibration_data.json"
    relative = os.path.relpath(path, tmp_path)  # the same file, spelled differently than reap.py recorded it
    settings = settings_for(["--calibration", relative, "--num-prompts", "4"])

    def choose(**fields):
        notes: list[str] = []
        pruned = write_reap_metadata(tmp_path / "pruned", **fields) if fields else tmp_path / "bare"
        prompts, source = choose_prompts(settings, tmp_path / "report", notes, pruned)
        return prompts, source, notes

    # 6 of 8 items scored: the 2 others first, then 2 scored ones, said so.
    prompts, source, notes = choose(calibration_path=str(path), calibration_samples=[0, 1, 2, 3, 4, 5])
    assert sorted(p.sample.index for p in prompts if not p.also_calibration) == [6, 7]
    assert sum(p.also_calibration for p in prompts) == 2
    assert len(notes) == 1 and notes[0].startswith("2 of 4 prompts were also calibration samples")
    assert "avoiding the 6 items scored by reap.py (2 of 4 also calibration samples)" in source
    # Enough unscored items: none of the prompts was scored.
    prompts, source, notes = choose(calibration_path=str(path), calibration_samples=[0, 2, 6])
    assert not notes and not {p.sample.index for p in prompts} & {0, 2, 6} and len(prompts) == 4
    assert not any(p.also_calibration for p in prompts)
    # Scored on another file: every item of this one is held out.
    prompts, source, notes = choose(calibration_path=str(tmp_path / "other.json"), calibration_samples=[0, 1])
    assert not notes and not any(p.also_calibration for p in prompts) and "not the file" in source
    # The same file, but which items were scored is not recorded (older metadata), or no metadata at all.
    for fields, says in (({"calibration_path": str(path)}, "does not list which of its items"),
                         ({}, f"has no {METADATA_NAME}")):
        prompts, source, notes = choose(**fields)
        assert len(prompts) == 4 and len(notes) == 1 and says in notes[0] and "unknown" in source


def test_builtin_prompts_draw_their_images(tmp_path):
    prompts = builtin_prompts(5, seed=0, image_dir=tmp_path / "imgs")
    assert [p.kind for p in prompts] == ["grounding", "text", "grounding", "text", "grounding"]
    assert all(p.sample.images[0].is_file() for p in prompts if p.sample.has_image)
    assert all(p.question for p in prompts)


def test_teacher_forcing_cuts_generated_image_placeholders(tiny_model, calibration):
    """A broken model may generate <|image_pad|>; fed back, it would ask for image features that do not exist."""
    runner = ModelRunner(tiny_model, device="cpu", dtype=torch.float32)
    prompt = calibration_prompts(calibration / "calibration_data.json", 1, seed=0)[0][0]
    assert prompt.sample.has_image
    enc = runner.encode(prompt.sample)
    image_pad = runner.model.config.image_token_id
    forced = runner.teacher_forced(enc, [5, 6, image_pad, 7], keep={layer: list(range(8)) for layer in range(4)},
                                   trace=True)
    clean = runner.teacher_forced(enc, [5, 6], keep={layer: list(range(8)) for layer in range(4)}, trace=True)
    assert forced.positions == clean.positions and torch.equal(forced.logits, clean.logits)
    assert sorted(forced.trace.outputs) == [0, 1, 2, 3] and forced.trace.router[0].shape[1] == 12
    assert torch.isinf(forced.trace.router[0][:, 8:]).all()  # the masked experts' router logits


# ----------------------------------------------------------------------------------------------- inputs

def _fake_checkpoint(folder: Path, num_experts: int = 12) -> Path:
    folder.mkdir(parents=True)
    config = {"model_type": "qwen3_vl_moe", "text_config": {"num_experts": num_experts, "num_hidden_layers": 4,
                                                            "num_experts_per_tok": 2}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_reference_precedence(tmp_path):
    original, other, third = (_fake_checkpoint(tmp_path / n) for n in ("orig", "other", "third"))
    record = {"source_path": str(original)}
    notes: list[str] = []
    assert find_reference(settings_for(["--reference", str(other)]), record, notes)[0] == other
    assert find_reference(settings_for(["--original", str(other)]), record, notes)[0] == other
    assert find_reference(settings_for([]), record, notes) == (original, PRUNING_RECORD)
    env = parse_settings("t", TEST_OPTIONS, [], flags=TEST_FLAGS, environ={"REAP_MODEL_PATH": str(third)})
    assert find_reference(env, record, notes)[0] == original  # the record knows better than a .env default
    assert find_reference(env, None, notes)[0] == third
    assert find_reference(settings_for(["--reference", "none"]), record, notes)[0] is None
    assert not notes
    gone = {"source_path": str(tmp_path / "moved-away")}
    assert find_reference(settings_for([]), gone, notes) == (None, "not found")
    assert "moved-away" in notes[0] and "--reference" in notes[0]


def test_kept_experts_from_record_metadata_or_nowhere(tmp_path, tiny_model):
    pruned = tmp_path / "pruned"
    prune_checkpoint(tiny_model, pruned, KEEP, progress=False)
    inputs = resolve_inputs(settings_for(["--model", str(pruned)]))
    assert inputs.reference == tiny_model.resolve() and inputs.keep == KEEP
    assert inputs.order == KEEP and inputs.keep_source == PRUNING_RECORD
    record = json.loads((pruned / PRUNING_RECORD).read_text())
    (pruned / PRUNING_RECORD).unlink()
    (pruned / METADATA_NAME).write_text(json.dumps({"moe_layers": [0, 1, 2, 3], "num_experts": 12,
                                                    "experts_to_keep": record["experts_to_keep"]}))
    inputs = resolve_inputs(settings_for(["--model", str(pruned), "--reference", str(tiny_model)]))
    assert inputs.keep == KEEP and inputs.keep_source.startswith(METADATA_NAME)
    (pruned / METADATA_NAME).unlink()
    inputs = resolve_inputs(settings_for(["--model", str(pruned), "--reference", str(tiny_model)]))
    assert inputs.keep is None and "neither" in inputs.notes[0]
    record["experts_to_keep"]["2"] = record["experts_to_keep"]["2"][:-1]  # contradicts config.json
    (pruned / PRUNING_RECORD).write_text(json.dumps(record))
    inputs = resolve_inputs(settings_for(["--model", str(pruned)]))
    assert inputs.keep is None and "layer 2 keeps 7" in inputs.keep_problem


def test_refuses_the_pruned_model_as_its_own_original(tmp_path, tiny_model):
    from reap_vlm.errors import ConfigError, ReapError

    pruned = tmp_path / "pruned"
    prune_checkpoint(tiny_model, pruned, KEEP, progress=False)
    with pytest.raises(ConfigError, match="pruned model itself"):
        resolve_inputs(settings_for(["--model", str(pruned), "--reference", str(pruned)]))
    with pytest.raises(ConfigError, match="is the original model folder"):
        resolve_inputs(settings_for(["--model", str(pruned), "--output", str(tiny_model)]))
    other = _fake_checkpoint(tmp_path / "other", num_experts=16)
    with pytest.raises(ReapError, match="cut from one with 12"):
        resolve_inputs(settings_for(["--model", str(pruned), "--reference", str(other)]))
    with pytest.raises(ConfigError, match="no such folder"):
        resolve_inputs(settings_for(["--model", str(tmp_path / "missing")]))


# ----------------------------------------------------------------------------------------------- end to end

def edit_tensor(folder: Path, key: str, change) -> None:
    """Rewrite one tensor of a checkpoint folder in place (the shard keeps its other tensors)."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"][key]
    tensors = load_file(shard)
    tensors[key] = change(tensors[key]).contiguous()
    save_file(tensors, str(shard), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def pruned_models(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """A correctly pruned fixture and two broken copies of it."""
    root = tmp_path_factory.mktemp("eval")
    good = root / "good"
    prune_checkpoint(tiny_model, good, KEEP, progress=False)
    scrambled, head = root / "scrambled-router", root / "one-token-head"
    for folder in (scrambled, head):
        shutil.copytree(good, folder)
    # (a) two router rows swapped in layer 2: the right experts, routed to by the wrong rows
    edit_tensor(scrambled, "model.language_model.layers.2.mlp.gate.weight", lambda w: w[[1, 0, *range(2, 8)]])
    # (b) an lm_head whose logits are all equal: greedy decoding emits the same token forever ("a a a a")
    edit_tensor(head, "lm_head.weight", torch.zeros_like)
    return {"good": good, "scrambled": scrambled, "head": head}


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = run_main(test_pruned_model.main, argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_a_correctly_pruned_model_passes(pruned_models, calibration, tmp_path, capsys):
    report_dir = tmp_path / "report"
    code, out, err = run(["--model", str(pruned_models["good"]), "--calibration",
                          str(calibration / "calibration_data.json"), "--output", str(report_dir),
                          "--num-prompts", "4", "--max-new-tokens", "8", "--min-top1-agreement", "0.5"], capsys)
    assert code == 0, out + err
    assert out.count("\n") == 1 and out.startswith("PASS: surgery ")
    assert "0/4 degenerate" in out and "top-1 agreement" in out
    report = json.loads((report_dir / "test_report.json").read_text())
    assert report["passed"] and report["reference"]["source"] == PRUNING_RECORD
    assert {c["name"]: c["status"] for c in report["checks"]} == {
        "surgery": "pass", "generation": "pass", "min_top1_agreement": "pass"}
    rows = report["prompts"]
    assert len(rows) == 4 and sum(r["image"] is not None for r in rows) == 2
    for row in rows:  # float32: the masked original and the pruned model agree to rounding
        assert row["surgery"]["max_abs_dlogit"] <= 1e-5 and row["surgery"]["positions"] > 0
        assert row["original"]["degenerate"] is None and row["tokenizer_match"]
    assert report["summary"]["compared_positions"] == sum(r["surgery"]["positions"] for r in rows)
    md = (report_dir / "test_report.md").read_text()
    assert "| surgery | PASS |" in md and md.count("| calibration:") == 4
    assert not list(report_dir.glob(".*"))  # atomic writes leave no temporary files


def test_reused_calibration_samples_are_named_in_the_verdict(pruned_models, calibration, tmp_path, capsys):
    pruned = tmp_path / "pruned"
    shutil.copytree(pruned_models["good"], pruned)
    path = calibration / "calibration_data.json"
    write_reap_metadata(pruned, calibration_path=str(path), calibration_samples=[0, 1, 2, 3, 4, 5, 6])
    code, out, err = run(["--model", str(pruned), "--calibration", str(path), "--output", str(tmp_path / "r"),
                          *FAST], capsys)
    assert code == 0, out + err
    assert out.startswith("PASS: ") and out.rstrip().endswith("1 of 2 prompts were also calibration samples")
    report = json.loads((tmp_path / "r" / "test_report.json").read_text())
    assert [(r["id"], r["also_calibration"]) for r in report["prompts"]][0] == ("calibration:7", False)
    assert report["prompts"][1]["also_calibration"] and report["summary"]["also_calibration_samples"] == "1/2"
    assert any(n.startswith("1 of 2 prompts were also calibration samples") for n in report["notes"])
    assert "- also calibration samples: 1/2" in (tmp_path / "r" / "test_report.md").read_text()


def test_scrambled_router_rows_fail_the_surgery_check(pruned_models, calibration, tmp_path, capsys):
    code, out, err = run(["--model", str(pruned_models["scrambled"]), "--calibration",
                          str(calibration / "calibration_data.json"), "--output", str(tmp_path / "r"), *FAST], capsys)
    assert code == 1
    assert out.startswith("FAIL: surgery: ") and out.count("\n") == 1
    assert "router of layer 2 differs at 32/32 traced tokens" in out
    report = json.loads((tmp_path / "r" / "test_report.json").read_text())
    assert not report["passed"] and report["first_divergence"].startswith("router of layer 2")
    failed = [layer["layer"] for layer in report["layers"] if layer["router_mismatches"] or layer["expert_mismatches"]]
    assert failed == [2]  # layers 0, 1 and 3 replay correctly: the diagnosis points at the broken one


def test_a_one_token_head_fails_as_degenerate(pruned_models, calibration, tmp_path, capsys):
    code, out, err = run(["--model", str(pruned_models["head"]), "--calibration",
                          str(calibration / "calibration_data.json"), "--output", str(tmp_path / "r"), *FAST], capsys)
    assert code == 1
    assert "generation: 2/2 outputs degenerate where the original's are not" in out
    assert "repetition" in out
    report = json.loads((tmp_path / "r" / "test_report.json").read_text())
    for row in report["prompts"]:  # the original answers differently and is not degenerate itself
        assert row["original"]["degenerate"] is None and row["pruned"]["degenerate"].startswith("repetition")
        assert not row["exact_match"]
    assert report["summary"]["top1_agreement"] < 0.5
    assert "after the last MoE block" in report["first_divergence"]


def test_misnumbered_experts_fail_and_are_located(tiny_model_per_expert, calibration, tmp_path, capsys):
    """The per-expert layout (FP8/AWQ releases) is renumbered key by key: two experts trading places in one
    layer, their router rows not, is the renumbering bug the layer replay must name."""
    pruned = tmp_path / "pruned"
    prune_checkpoint(tiny_model_per_expert, pruned, KEEP, progress=False)
    prefix = "model.language_model.layers.1.mlp.experts"
    for proj in ("gate_proj", "up_proj", "down_proj"):
        first, second = f"{prefix}.0.{proj}.weight", f"{prefix}.1.{proj}.weight"
        tensors = dict(Checkpoint(pruned).read([first, second]))
        edit_tensor(pruned, first, lambda _, t=tensors[second]: t)
        edit_tensor(pruned, second, lambda _, t=tensors[first]: t)
    code, out, err = run(["--model", str(pruned), "--calibration", str(calibration / "calibration_data.json"),
                          "--output", str(tmp_path / "r"), *FAST], capsys)
    assert code == 1 and out.startswith("FAIL: surgery: ")
    assert "experts of layer 1 differ at" in out and "routing agrees" in out


# ----------------------------------------------------------------------------------------------- command line

def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REAP_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, str(ROOT / "test_pruned_model.py"), *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


def test_cli_exit_codes_verdict_and_report_files(pruned_models, tmp_path):
    good = cli("--model", str(pruned_models["good"]), "--reference", "none", "--output", "out-good", *FAST,
               cwd=tmp_path)
    assert good.returncode == 0, good.stderr
    assert good.stdout.startswith("PASS: ") and good.stdout.count("\n") == 1
    assert "surgery not checked" not in good.stdout  # a skipped check is not claimed as passed
    report = json.loads((tmp_path / "out-good" / "test_report.json").read_text())
    assert report["reference"]["path"] is None
    assert {c["name"]: c["status"] for c in report["checks"]} == {"surgery": "skipped", "generation": "pass"}
    assert (tmp_path / "out-good" / "test_report.md").is_file()
    assert any((tmp_path / "out-good" / "prompt-images").glob("*.png"))  # built-in prompts drew their images

    bad = cli("--model", str(pruned_models["head"]), "--reference", "none", "--output", "out-bad", *FAST,
              cwd=tmp_path)
    assert bad.returncode == 1
    assert bad.stdout.startswith("FAIL: generation: 2/2 outputs degenerate (no original to compare with)")
    assert not json.loads((tmp_path / "out-bad" / "test_report.json").read_text())["passed"]


def test_cli_configuration_errors_exit_2(tmp_path, pruned_models):
    result = cli("--num-prompts", "0", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: --num-prompts")
    result = cli("--model", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert result.returncode == 2 and "--model / REAP_PRUNED_OUTPUT_PATH" in result.stderr
    result = cli("--model", str(pruned_models["good"]), "--backend", "vllm", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "pip install vllm" in result.stderr
    assert result.stdout == ""


def test_markdown_escapes_model_output():
    report = {
        "passed": False, "verdict": "FAIL: x", "pruned": {"path": "p", "num_experts": 8},
        "reference": {"path": None, "source": "none"}, "kept_experts_source": None, "prompts_source": "built-in",
        "settings": {"backend": "transformers", "max_new_tokens": 8}, "dtype": "float32", "device": "cpu",
        "notes": [],
        "tolerance": {"dtype": "float32", "rel": 1e-4, "max_mismatch_fraction": 0.0, "layer_rel": 1e-4, "why": "w"},
        "checks": [{"name": "generation", "status": "fail", "summary": "s", "why": "a | b"}], "summary": {"x": None},
        "prompts": [{"index": 0, "id": "builtin:text-0", "kind": "text", "question": "q?", "pruned": {
            "text": "a|b\nc\x12", "degenerate": None}, "original": None, "degenerate_fails": False,
            "exact_match": None, "agreement": None, "surgery": None, "bbox": None}],
    }
    md = markdown(report)
    assert "a\\|b\u23cec\\x12" in md and "| generation | FAIL | a \\| b |" in md and "- x: n/a" in md
