"""Calibration loading: formats, sampling, bad items, truncation that never cuts an image."""

from __future__ import annotations

import json

import pytest
import torch

from reap_vlm.calibration.encode import collate, encode_sample
from reap_vlm.calibration.files import GROUNDING_TEMPLATES, load_calibration
from reap_vlm.checkpoint.loading import load_processor
from reap_vlm.errors import ReapError


def test_user_grounding_format_builds_prompts_from_templates(calibration):
    calib = load_calibration(calibration / "calibration_data.json", 100, seed=1)
    grounding = [s for s in calib.samples if s.kind == "grounding"]
    prompts = [s for s in calib.samples if s.kind == "prompt"]
    assert len(grounding) == 6 and len(prompts) == 2
    for sample in grounding:
        text = sample.messages[0]["content"][1]["text"]
        assert any(text == t.format(region=r) for t in GROUNDING_TEMPLATES for r in sample.regions)
        assert sample.images[0].is_file()
    again = load_calibration(calibration / "calibration_data.json", 100, seed=1)
    assert [s.messages for s in again.samples] == [s.messages for s in calib.samples]


def test_max_samples_draws_with_seed(calibration):
    a = load_calibration(calibration / "text.json", 3, seed=5)
    b = load_calibration(calibration / "text.json", 3, seed=5)
    c = load_calibration(calibration / "text.json", 3, seed=6)
    assert [s.index for s in a.samples] == [s.index for s in b.samples]
    assert [s.index for s in a.samples] != [s.index for s in c.samples]
    assert len(a.samples) == 3 and a.total_items > 3


def test_chat_generation_prompt_only_when_last_turn_is_not_the_assistant(calibration):
    samples = load_calibration(calibration / "chat.jsonl", 100).samples
    assert [s.add_generation_prompt for s in samples] == [True] * 6 + [False]


@pytest.mark.parametrize("item,problem", [
    ({"image": "images/nope.png", "regions": ["a"]}, "image images/nope.png not found"),
    ({"image": "images/00000.png", "regions": []}, "regions must be a non-empty list"),
    ({"foo": 1}, "no known fields"),
    (["not", "an", "object"], "expected an object"),
    ({"messages": [{"role": "user"}]}, "needs role and content"),
    ({"text": ""}, "text must be a non-empty string"),
])
def test_bad_item_names_file_and_item_unless_skipped(calibration, tmp_path, item, problem):
    path = calibration / "bad.json"
    path.write_text(json.dumps([{"text": "fine"}, item]))
    try:
        with pytest.raises(ReapError) as err:
            load_calibration(path, 100)
        assert "bad.json item 1" in str(err.value) and problem in str(err.value)
        assert "--skip-bad-samples" in str(err.value)
        calib = load_calibration(path, 100, skip_bad=True)
        assert len(calib.samples) == 1 and len(calib.skipped) == 1 and problem in calib.skipped[0]
    finally:
        path.unlink()


def test_not_json_is_a_clear_error(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("{broken\n")
    with pytest.raises(ReapError, match="line 1 is not JSON"):
        load_calibration(path, 10)


def test_truncation_never_cuts_through_an_image(tiny_model, calibration):
    processor = load_processor(tiny_model)
    sample = load_calibration(calibration / "chat.jsonl", 100).samples[0]
    full = encode_sample(processor, sample, 4096)
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    positions = (full.input_ids == image_id).nonzero().flatten()
    first, last = int(positions[0]), int(positions[-1])
    with pytest.warns(UserWarning, match="image dropped to fit"):
        inside = encode_sample(processor, sample, last)  # the cut would split the image
    assert inside.input_ids.numel() == first - 1  # cut before <|vision_start|>
    assert inside.pixel_values is None and inside.image_grid_thw is None
    after = encode_sample(processor, sample, last + 3)
    assert int((after.input_ids == image_id).sum()) == positions.numel()
    assert torch.equal(after.pixel_values, full.pixel_values)


def test_max_pixels_caps_image_size(tiny_model, calibration):
    processor = load_processor(tiny_model)
    sample = load_calibration(calibration / "chat.jsonl", 100).samples[3]  # a 128x96 image
    big = encode_sample(processor, sample, 4096)
    small = encode_sample(processor, sample, 4096, max_pixels=64 * 64)
    assert small.image_grid_thw.prod() < big.image_grid_thw.prod()


def test_collate_pads_right_with_zero_attention(tiny_model, calibration):
    processor = load_processor(tiny_model)
    samples = load_calibration(calibration / "calibration_data.json", 100).samples[:3]
    encoded = [encode_sample(processor, s, 4096) for s in samples]
    batch = collate(encoded, pad_id=processor.tokenizer.pad_token_id)
    lengths = [e.input_ids.numel() for e in encoded]
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["image_grid_thw"].shape[0] == sum(e.image_grid_thw is not None for e in encoded)


def test_image_too_large_for_the_budget_is_scaled_down_and_the_question_kept(tiny_model, calibration):
    processor = load_processor(tiny_model)
    sample = load_calibration(calibration / "chat.jsonl", 100).samples[3]  # a 128x96 image: 12 tokens
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    full = encode_sample(processor, sample, 4096)
    n_full = int((full.input_ids == image_id).sum())
    limit = full.input_ids.numel() - 4
    with pytest.warns(UserWarning, match=r"item 3: image scaled down to fit REAP_MAX_SEQ_LEN"):
        fitted = encode_sample(processor, sample, limit)
    n_fitted = int((fitted.input_ids == image_id).sum())
    assert 0 < n_fitted <= n_full - 4 and fitted.input_ids.numel() <= limit
    tail = full.input_ids[-10:]  # the question and the generation prompt after the image survive whole
    assert torch.equal(fitted.input_ids[-10:], tail)
    assert fitted.pixel_values.shape[0] == int(fitted.image_grid_thw.prod())
