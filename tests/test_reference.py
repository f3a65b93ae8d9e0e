"""The trained reference model (reference/): its data is what its scripts build, training's fast encoder and
forwards compute what the processor and transformers compute, the shipped model meets its accuracy targets,
and the check's ground-truth mode and the quality benchmark run end to end on it."""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reap_vlm.check.accuracy import (
    EvalItem,
    accuracy_by_task,
    accuracy_section,
    answer_items,
    is_right,
    load_eval_items,
    ratio_check,
)
from reap_vlm.check.bbox import Box
from reap_vlm.errors import ReapError
from reap_vlm.families import QWEN3_VL_MOE
from reference import make_data
from reference.model_files import Encoder, collate, write_tokenizer
from reference.tasks import TASK_FAMILIES, TASKS, draw_items
from reference.train import install_fast_forwards

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "reference"
MODEL = REFERENCE / "model"
BOX_FORMAT = QWEN3_VL_MOE.box_format


@pytest.fixture(scope="module")
def processor():
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def runner():
    from reap_vlm.check.runner import ModelRunner

    runner = ModelRunner(MODEL, device="cpu", dtype=torch.float32)
    yield runner
    runner.close()


# ------------------------------------------------------------------------------------- data and recipe

def test_shipped_data_is_what_make_data_builds(tmp_path):
    make_data.main(["--out", str(tmp_path)])
    assert (tmp_path / "eval.jsonl").read_text() == (REFERENCE / "eval.jsonl").read_text()
    assert (tmp_path / "eval_small.jsonl").read_text() == (REFERENCE / "eval_small.jsonl").read_text()
    for name in make_data.CALIBRATION_TASKS:
        assert (tmp_path / "calibration" / f"{name}.json").read_text() == \
            (REFERENCE / "calibration" / f"{name}.json").read_text()
    shipped = sorted(p.relative_to(REFERENCE) for p in REFERENCE.glob("*/**/*.png"))
    built = sorted(p.relative_to(tmp_path) for p in tmp_path.glob("*/**/*.png"))
    assert shipped == built and len(shipped) == 256 + 3 * 64 + 8
    for rel in shipped[::7]:
        assert np.array_equal(np.asarray(Image.open(REFERENCE / rel)), np.asarray(Image.open(tmp_path / rel)))


def test_eval_file_covers_every_task_and_the_calibration_sets_their_families():
    items = load_eval_items(REFERENCE / "eval.jsonl")
    counts = {task: sum(i.task == task for i in items) for task in TASKS}
    assert counts == dict.fromkeys(TASKS, make_data.EVAL_PER_TASK)
    assert all((i.box is not None) == (i.task == "grounding") for i in items)
    assert all((i.image is not None) == (i.task in TASK_FAMILIES["grounding"] + TASK_FAMILIES["visual"])
               for i in items)
    text = json.loads((REFERENCE / "calibration/text.json").read_text())
    image = json.loads((REFERENCE / "calibration/image.json").read_text())
    assert all(isinstance(item["messages"][0]["content"], str) for item in text)
    assert all(item["messages"][0]["content"][0]["type"] == "image" for item in image)


def test_shipped_tokenizer_is_what_the_recipe_builds(tmp_path):
    write_tokenizer(tmp_path)
    assert json.loads((tmp_path / "tokenizer.json").read_text()) == json.loads((MODEL / "tokenizer.json").read_text())


def test_the_model_card_states_the_recipe_and_accuracy():
    card = (MODEL / "README.md").read_text()
    for phrase in ("reference.train", "before any pruning result", "eval.jsonl", "grounding"):
        assert phrase in card
    log = json.loads((MODEL / "training_log.json").read_text())
    assert log["steps_done"] > 0 and not log["skipped_steps"]


# ------------------------------------------------------------------- training's encoder and forwards

def test_encoder_gives_the_processor_and_rope_index_results(processor):
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    with torch.device("meta"):
        model = Qwen3VLMoeForConditionalGeneration(Qwen3VLMoeConfig.from_pretrained(MODEL))
    encoder = Encoder(processor.tokenizer)
    for item in draw_items(seed=11, count_per_task=2):
        encoded = encoder.encode(item)
        text = processor.apply_chat_template(item.messages(), tokenize=False)
        out = processor(text=[text], images=[item.image] if item.image else None, return_tensors="pt")
        ids = out["input_ids"][0].numpy()
        assert np.array_equal(ids[:len(encoded.input_ids)], encoded.input_ids), item.task
        answer = encoded.input_ids[encoded.labels != -100]
        assert processor.tokenizer.decode(answer) == item.answer + "<|im_end|>"
        if item.image is None:
            continue
        assert np.allclose(out["pixel_values"].numpy(), encoded.pixels, atol=1e-6)
        positions, _ = model.model.get_rope_index(out["input_ids"], image_grid_thw=out["image_grid_thw"],
                                                  mm_token_type_ids=out["mm_token_type_ids"])
        assert np.array_equal(positions[:, 0, :len(encoded.input_ids)].numpy(), encoded.positions)


def test_fast_forwards_compute_what_transformers_computes(processor):
    from transformers import Qwen3VLMoeForConditionalGeneration

    model = Qwen3VLMoeForConditionalGeneration.from_pretrained(MODEL, dtype=torch.float32).eval()
    fast = copy.deepcopy(model)
    install_fast_forwards(fast)
    encoder = Encoder(processor.tokenizer)
    batch = collate([encoder.encode(i) for i in draw_items(seed=12, count_per_task=2)],
                    processor.tokenizer.pad_token_id)
    batch = {k: torch.from_numpy(v) for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        expected, got = model(**batch).logits, fast(**batch).logits
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    swapped = {type(m).__name__ for m in fast.modules() if "forward" in vars(m)}
    assert swapped == {"Qwen3VLMoeTextExperts", "Qwen3VLMoeVisionAttention"}


# ------------------------------------------------------------------------------------ ground truth

def test_the_shipped_model_meets_its_targets(runner):
    items = load_eval_items(REFERENCE / "eval_small.jsonl")
    accuracy = accuracy_by_task(items, answer_items(runner, items, 48), BOX_FORMAT)
    assert set(accuracy) == set(TASKS)
    assert all(accuracy[t] >= (0.9 if t == "grounding" else 0.95) for t in TASKS), accuracy


def test_batched_answers_equal_one_at_a_time(runner):
    items = [i for i in load_eval_items(REFERENCE / "eval_small.jsonl")][:12]
    batched = answer_items(runner, items, 40, batch_size=12)
    single = [runner.generate(runner.encode(item.sample(i)), 40).text for i, item in enumerate(items)]
    assert batched == single


def test_eval_items_are_checked_line_by_line(tmp_path):
    good = {"task": "t", "prompt": "p", "image": None, "answer": "a"}
    cases = [({**good, "answer": 3}, "answer must be a string"),
             ({k: v for k, v in good.items() if k != "answer"}, "exactly one of answer"),
             ({**good, "bbox_2d": [1, 2, 3, 4]}, "exactly one of answer"),
             ({**good, "image": "missing.png"}, "not found"),
             ({**good, "task": ""}, "task must be"),
             ("[1, 2]", "expected an object")]
    for record, message in cases:
        path = tmp_path / "eval.jsonl"
        line = record if isinstance(record, str) else json.dumps(record)
        path.write_text(json.dumps(good) + "\n" + line + "\n")
        with pytest.raises(ReapError, match=rf"eval.jsonl:2: .*{message}"):
            load_eval_items(path)
    path.write_text(json.dumps(good) + "\n{broken\n")
    with pytest.raises(ReapError, match="eval.jsonl:2"):
        load_eval_items(path)
    with pytest.raises(ReapError, match="not found"):
        load_eval_items(tmp_path / "none.jsonl")


def test_answers_are_judged_by_exact_match_or_iou():
    exact = EvalItem("arithmetic", "What is 1 + 2?", None, answer="3")
    assert is_right(exact, " 3 ", BOX_FORMAT) and not is_right(exact, "3.", BOX_FORMAT)
    box = EvalItem("grounding", "Find it", None, box=Box(100, 100, 300, 300))
    assert is_right(box, '{"bbox_2d": [100, 100, 300, 300]}', BOX_FORMAT)
    assert is_right(box, '{"bbox_2d": [120, 120, 320, 320]}', BOX_FORMAT)  # IoU 0.68
    assert not is_right(box, '{"bbox_2d": [200, 200, 400, 400]}', BOX_FORMAT)  # IoU 0.14
    assert not is_right(box, "somewhere", BOX_FORMAT)


def test_accuracy_section_and_ratio_check():
    items = [EvalItem("a", "p", None, answer="x"), EvalItem("a", "p", None, answer="y"),
             EvalItem("b", "p", None, answer="z")]
    section = accuracy_section(items, pruned=["x", "n", "z"], original=["x", "y", "z"], fmt=BOX_FORMAT)
    assert section["tasks"] == {"a": {"items": 2, "original": 1.0, "pruned": 0.5},
                                "b": {"items": 1, "original": 1.0, "pruned": 1.0}}
    assert section["overall"] == {"items": 3, "original": 1.0, "pruned": 2 / 3}
    assert ratio_check(section, None, True) is None
    assert ratio_check(section, 0.5, True).status == "pass"
    failed = ratio_check(section, 0.6, True)
    assert failed.status == "fail" and "1 of 2 tasks" in failed.why and "a 0.5 vs 1" in failed.why
    assert ratio_check(section, 0.5, False).status == "fail"
    alone = accuracy_section(items, pruned=["x", "y", "n"], original=None, fmt=BOX_FORMAT)
    assert alone["tasks"]["b"] == {"items": 1, "original": None, "pruned": 0.0}


def test_check_reports_task_accuracy_of_both_models(tmp_path):
    """test_pruned_model.py --eval on a copy of the reference model pruned to 24 of 32 experts."""
    import test_pruned_model
    from reap_vlm.cli import run_main
    from reap_vlm.prune.rewrite import prune_checkpoint

    pruned = tmp_path / "pruned"
    keep = {layer: list(range(24)) for layer in range(6)}
    prune_checkpoint(MODEL, pruned, keep, progress=False)
    eval_file = tmp_path / "eval.jsonl"
    lines = (REFERENCE / "eval_small.jsonl").read_text().splitlines()[:16]  # 2 of each task
    eval_file.write_text("\n".join(lines) + "\n")
    (tmp_path / "eval_images").symlink_to(REFERENCE / "eval_images")
    code = run_main(test_pruned_model.main, [
        "--model", str(pruned), "--eval", str(eval_file), "--output", str(tmp_path / "report"),
        "--calibration", str(REFERENCE / "calibration/heldout.json"), "--num-prompts", "2",
        "--max-new-tokens", "40", "--min-accuracy-ratio", "0.0"])
    report = json.loads((tmp_path / "report/test_report.json").read_text())
    assert code == 0, report["verdict"]
    accuracy = report["accuracy"]
    assert set(accuracy["tasks"]) == set(TASKS) and len(accuracy["rows"]) == 16
    assert accuracy["overall"]["original"] == 1.0  # the shipped model answers these
    assert 0.0 <= accuracy["overall"]["pruned"] <= 1.0
    assert {c["name"]: c["status"] for c in report["checks"]}["min_accuracy_ratio"] == "pass"
    assert "accuracy" in report["verdict"] and "(original 1)" in report["verdict"]
    md = (tmp_path / "report/test_report.md").read_text()
    assert "## Task accuracy" in md and "| all | 16 | 1 |" in md


# ------------------------------------------------------------------------------------------ benchmark

def test_quality_benchmark_small_grid(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_quality

    environment = dict(os.environ)
    result = bench_quality.main(["--ratios", "0.5", "--criteria", "reap,reap+protect,random", "--calibrations",
                                 "mixed", "--per-task", "1", "--max-samples", "16", "--random-seeds", "2",
                                 "--out", str(tmp_path), "--workdir", str(tmp_path)])
    assert result["baseline"] == dict.fromkeys(TASKS, 1.0)
    assert [(r["criterion"], r["ratio"], r["calibration"]) for r in result["runs"]] == [
        ("reap", 0.5, "mixed"), ("reap+protect", 0.5, "mixed"), ("random", 0.5, "none")]
    profile = result["profiles"]["mixed"]
    assert profile["super_experts"]["criteria"] == {"quantile": 99.5, "fraction": 0.1, "layers": 0.75}
    assert len(profile["layers"]) == 6 and profile["calibration_coverage"]["image_share"] > 0
    assert len(result["runs"][-1]["seeds"]) == 2
    saved = json.loads((tmp_path / "RESULTS_quality.json").read_text())
    assert saved["runs"] == result["runs"]
    md = (tmp_path / "RESULTS_quality.md").read_text()
    assert "## grounding (grounding): unpruned 100" in md and "| reap |" in md
    assert (tmp_path / "RESULTS_quality.png").stat().st_size > 10_000
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("bench-quality-")] == []  # cleaned up
    assert dict(os.environ) == environment  # the grid's own settings do not leak into the caller's
