"""Thinking models: a chat template that opens <think> at the generation prompt is detected; by default the block is
closed in the prompt (an empty think block); with --thinking the model thinks and boxes, degenerate detection and
--eval accuracy read the answer after </think>, the report showing both parts.

The Thinking fixture is the tiny fixture with its chat template's generation prompt ending in ``<think>\\n``, as the
Qwen3-VL-*-Thinking templates end it.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_evaluation import KEEP, _clean_environment  # noqa: F401 (an autouse fixture)

import test_pruned_model
from reap_vlm.calibration.files import CalibrationSample
from reap_vlm.check.accuracy import EvalItem, answer_items, is_right
from reap_vlm.check.bbox import check_box
from reap_vlm.check.checks import _bbox_rows
from reap_vlm.check.passes import ModelPass, _judge
from reap_vlm.check.prompts import EvalPrompt
from reap_vlm.check.runner import ModelRunner, make_generation
from reap_vlm.check.thinking import ThinkingPrompts, close_thinking, opens_thinking, split_thinking
from reap_vlm.checkpoint.loading import load_processor
from reap_vlm.cli import run_main
from reap_vlm.families import QWEN3_VL_MOE
from reap_vlm.fixtures.tiny import CHAT_TEMPLATE
from reap_vlm.prune.rewrite import prune_checkpoint

OPEN_PROMPT = "<|im_start|>assistant\n<think>\n"
CLOSED_PROMPT = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
THINKING_TEMPLATE = CHAT_TEMPLATE.replace("'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n<think>\\n'")


@pytest.fixture(scope="module")
def thinking(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """The tiny fixture with a Thinking chat template, and its pruned copy (which keeps the template)."""
    assert THINKING_TEMPLATE != CHAT_TEMPLATE
    root = tmp_path_factory.mktemp("thinking")
    original = root / "original"
    shutil.copytree(tiny_model, original)
    (original / "chat_template.json").write_text(json.dumps({"chat_template": THINKING_TEMPLATE}))
    pruned = root / "pruned"
    prune_checkpoint(original, pruned, KEEP, progress=False)
    return {"original": original, "pruned": pruned}


def _question(image: Path | None = None) -> CalibrationSample:
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": "Where is the red square?"}]
    return CalibrationSample(0, "prompt", messages=[{"role": "user", "content": content}],
                             images=[image] if image else [])


def test_markers_are_the_familys_data():
    fmt = QWEN3_VL_MOE.thinking
    assert (fmt.open, fmt.close, fmt.empty) == ("<think>", "</think>", "<think>\n\n</think>\n\n")
    assert opens_thinking("x" + OPEN_PROMPT, fmt) and not opens_thinking("x" + CLOSED_PROMPT, fmt)
    assert not opens_thinking(OPEN_PROMPT, None)
    assert close_thinking("x" + OPEN_PROMPT, fmt) == "x" + CLOSED_PROMPT


def test_a_thinking_template_is_detected_and_closed_by_default(thinking, tiny_model, calibration):
    processor = load_processor(thinking["original"])
    image = next((calibration / "images").glob("*.png"))
    for sample in (_question(), _question(image)):
        closed = ThinkingPrompts(processor, QWEN3_VL_MOE, think=False)
        prepared = closed.prepare(sample)
        assert closed.detected and prepared.text.endswith(CLOSED_PROMPT)
        assert prepared.images == sample.images and prepared.messages == sample.messages
        assert "closed in the prompt" in closed.note(64)
        open_ = ThinkingPrompts(processor, QWEN3_VL_MOE, think=True)
        assert open_.prepare(sample) is sample and open_.detected  # left open: rendered by the template itself
        assert "thinks (--thinking), up to 512 new tokens" in open_.note(512)
    plain = ThinkingPrompts(load_processor(tiny_model), QWEN3_VL_MOE, think=False)
    question = _question()
    assert plain.prepare(question) is question
    assert not plain.detected and plain.note(64) is None
    text_item = CalibrationSample(1, "text", text="free text <think>\n")  # not a templated prompt: left alone
    assert ThinkingPrompts(processor, QWEN3_VL_MOE, think=False).prepare(text_item) is text_item


def test_split_thinking():
    assert split_thinking([1, 2, 9, 8, 3, 4], [9, 8], opened=True) == ([1, 2], [3, 4])
    assert split_thinking([1, 2, 3], [9, 8], opened=True) == ([1, 2, 3], None)  # never closed: no answer
    assert split_thinking([1, 2, 3], [9, 8], opened=False) == (None, [1, 2, 3])  # no thinking at all
    assert split_thinking([9, 8, 1, 9, 8, 2], [9, 8], opened=False) == ([9, 8, 1], [2])  # the last close ends it
    assert split_thinking([1, 2], [], opened=False) == (None, [1, 2])


def test_the_runner_closes_the_block_or_thinks(thinking):
    closed = ModelRunner(thinking["original"], device="cpu", dtype=torch.float32)
    enc = closed.encode(_question())
    assert closed.tokenizer.decode(enc.input_ids.tolist()).endswith(CLOSED_PROMPT)
    assert not closed.opens_thinking(enc)
    closed.close()
    thinks = ModelRunner(thinking["original"], device="cpu", dtype=torch.float32, think=True)
    enc = thinks.encode(_question())
    assert thinks.tokenizer.decode(enc.input_ids.tolist()).endswith(OPEN_PROMPT) and thinks.opens_thinking(enc)
    gen = thinks.generate(enc, 6)  # a random model never closes its thinking in 6 tokens
    assert gen.thinking is not None and gen.unanswered and gen.text == ""
    assert gen.judged() == (gen.token_ids, gen.thinking)
    thinks.close()


def _continuation(tokenizer, thought: str, answer: str) -> list[int]:
    return tokenizer.encode(f"{thought}</think>\n\n{answer}", add_special_tokens=False)


def test_boxes_degenerate_and_accuracy_read_the_answer(thinking, calibration, tmp_path, monkeypatch):
    """The thinking holds a wrong box and loops; the answer after </think> holds the right box: every judge
    reads the answer, and the report keeps both."""
    runner = ModelRunner(thinking["original"], device="cpu", dtype=torch.float32, think=True)
    tok = runner.tokenizer
    thought = 'The box is {"bbox_2d": [0, 0, 10, 10]} ' + "red red red red red red red red red red red red "
    answer = '{"bbox_2d": [120, 340, 560, 780]}'
    ids = _continuation(tok, thought, answer) + [tok.convert_tokens_to_ids("<|im_end|>")]

    def generate(input_ids, **kwargs):  # the model's greedy output, fixed: thinking, </think>, answer
        return torch.cat([input_ids, torch.tensor([ids] * input_ids.shape[0])], dim=1)

    monkeypatch.setattr(runner.model, "generate", generate)
    image = next((calibration / "images").glob("*.png"))
    item = EvalItem("grounding", "Where is the red square?", image, box=check_box([120, 340, 560, 780]))
    assert answer_items(runner, [item], 512) == [answer]  # --eval reads the answer
    assert is_right(item, answer, QWEN3_VL_MOE.box_format)
    assert not is_right(item, tok.decode(ids, skip_special_tokens=True), QWEN3_VL_MOE.box_format)

    gen = runner.generate(runner.encode(item.sample(0)), 512)
    assert gen.text == answer and gen.thinking.strip() == thought.strip() and gen.ended
    assert _judge(runner)(gen) is None  # the looping thinking is not judged: the answer is
    looping = make_generation(tok.encode(thought, add_special_tokens=False), tok, runner.end_ids, runner.close_ids,
                              opened=True)
    assert looping.unanswered and _judge(runner)(looping) is not None  # a thinking loop that never ends is

    sample = CalibrationSample(0, "grounding", messages=item.sample(0).messages, images=[image],
                               regions=["red square"])
    passed = ModelPass([], [gen], [], [])
    rows = _bbox_rows([EvalPrompt("calibration:0", sample)], passed, None, tmp_path, QWEN3_VL_MOE.box_format)
    assert rows[0]["pruned_valid"] and rows[0]["pruned"] == "[120, 340, 560, 780]"
    runner.close()


class _FakeVLLM:
    """A stand-in ``vllm`` module (no vLLM, no GPU here): its LLM greedily "generates" fixed token ids."""

    def __init__(self, ids: list[int]):
        self.ids, self.prompts = ids, []
        fake = self

        class LLM:
            def __init__(self, **kwargs):
                pass

            def generate(self, requests, params, use_tqdm=False):
                fake.prompts += [r["prompt"] for r in requests]
                return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=list(fake.ids))]) for _ in requests]

        self.LLM, self.SamplingParams = LLM, lambda **kwargs: kwargs


@pytest.mark.parametrize("think", [True, False])
def test_vllm_generations_are_split_at_the_thinking_block(thinking, monkeypatch, think):
    """--backend vllm judges the answer after </think>, as the transformers path does: with --thinking the prompt
    opens the block and the generation is split at its close (a generation that never closes has no answer);
    without it the prompt closes the block and a generation without a close is all answer."""
    from reap_vlm.check.runner import vllm_generate

    runner = ModelRunner(thinking["original"], device="cpu", dtype=torch.float32, think=think)
    tok = runner.tokenizer
    thought, answer = "Let me look at the red square. ", '{"bbox_2d": [1, 2, 3, 4]}'
    end = [tok.convert_tokens_to_ids("<|im_end|>")]
    prompts = ThinkingPrompts(runner.processor, runner.family, think)
    sample = prompts.prepare(_question())
    closed_then_answered = (_continuation(tok, thought, answer) + end, thought, answer)
    never_closed = (tok.encode(thought, add_special_tokens=False), thought if think else None, "" if think else thought)
    for ids, want_thinking, want_text in (closed_then_answered, never_closed):
        fake = _FakeVLLM(ids)
        monkeypatch.setitem(sys.modules, "vllm", fake)
        gen, = vllm_generate(thinking["original"], [sample], max_new_tokens=64, dtype=torch.float32, max_pixels=0,
                             seed=0)
        assert fake.prompts[0].endswith(OPEN_PROMPT if think else CLOSED_PROMPT)
        assert (gen.thinking.strip() if gen.thinking is not None else None) == (
            want_thinking.strip() if want_thinking is not None else None)
        assert gen.text.strip() == want_text.strip()
        assert gen.unanswered == (think and "</think>" not in tok.decode(ids))
        # the same ids through the transformers path's own split
        assert (gen.thinking, gen.text) == (lambda g: (g.thinking, g.text))(make_generation(
            ids, tok, runner.end_ids, runner.close_ids, opened=think))
    runner.close()


def test_check_end_to_end_closed_by_default_and_with_thinking(thinking, calibration, tmp_path, capsys):
    base = ["--model", str(thinking["pruned"]), "--calibration", str(calibration / "calibration_data.json"),
            "--num-prompts", "2", "--max-new-tokens", "4", "--device", "cpu"]
    assert run_main(test_pruned_model.main, [*base, "--output", str(tmp_path / "closed")]) in (0, 1)
    report = json.loads((tmp_path / "closed" / "test_report.json").read_text())
    assert any("closed in the prompt with an empty block" in n for n in report["notes"])
    assert all(r["pruned"]["thinking"] is None for r in report["prompts"])  # answers only
    assert {c["name"]: c["status"] for c in report["checks"]}["surgery"] == "pass"

    code = run_main(test_pruned_model.main, [*base, "--output", str(tmp_path / "thinks"), "--thinking",
                                             "--thinking-max-new-tokens", "6"])
    capsys.readouterr()
    report = json.loads((tmp_path / "thinks" / "test_report.json").read_text())
    assert code in (0, 1) and report["settings"]["thinking"] is True
    assert any("the model thinks (--thinking), up to 6 new tokens" in n for n in report["notes"])
    for row in report["prompts"]:
        for side in ("pruned", "original"):
            assert row[side]["thinking"] is not None and row[side]["tokens"] <= 6
    assert {c["name"]: c["status"] for c in report["checks"]}["surgery"] == "pass"
    assert "[thinking: " in (tmp_path / "thinks" / "test_report.md").read_text()
