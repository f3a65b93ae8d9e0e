"""Bounding-box answers: the formats models really write, and everything that must be rejected."""

from __future__ import annotations

import math

import pytest
from PIL import Image

from reap_vlm.check.bbox import Box, check_box, draw_boxes, iou, parse_bbox

WELL_FORMED = [
    ('{"bbox_2d": [120, 340, 560, 780]}', [120, 340, 560, 780]),
    ('{"bbox_2d": [0, 0, 1000, 1000]}', [0, 0, 1000, 1000]),
    ('{"bbox_2d": [12.5, 3.25, 99.75, 100]}', [12.5, 3.25, 99.75, 100]),
    # surrounding prose, as chat models answer
    ('The red square is at {"bbox_2d": [10, 20, 30, 40]} in the image.', [10, 20, 30, 40]),
    # code fences, with and without a language tag
    ('```json\n{"bbox_2d": [10, 20, 30, 40]}\n```', [10, 20, 30, 40]),
    ('```\n[{"bbox_2d": [10, 20, 30, 40], "label": "red square"}]\n```', [10, 20, 30, 40]),
    # single quotes (Python-style dicts)
    ("{'bbox_2d': [10, 20, 30, 40]}", [10, 20, 30, 40]),
    ("Here's the answer: {'bbox_2d': [10, 20, 30, 40], 'label': 'car'}", [10, 20, 30, 40]),
    # key variants
    ('{"bbox": [10, 20, 30, 40]}', [10, 20, 30, 40]),
    ('{"box": [10, 20, 30, 40]}', [10, 20, 30, 40]),
    ('{"bounding_box": [10, 20, 30, 40]}', [10, 20, 30, 40]),
    ('{"BBox_2D": [10, 20, 30, 40]}', [10, 20, 30, 40]),
    ('{"bbox-2d": [10, 20, 30, 40]}', [10, 20, 30, 40]),
    # lists of boxes: the first decides
    ('[{"bbox_2d": [10, 20, 30, 40], "label": "a"}, {"bbox_2d": [50, 60, 70, 80], "label": "b"}]',
     [10, 20, 30, 40]),
    ('{"bbox_2d": [[10, 20, 30, 40], [50, 60, 70, 80]]}', [10, 20, 30, 40]),
    ('[[10, 20, 30, 40], [50, 60, 70, 80]]', [10, 20, 30, 40]),
    # nested under another key
    ('{"objects": [{"name": "cat", "bbox_2d": [10, 20, 30, 40]}]}', [10, 20, 30, 40]),
    # bare list, with or without prose
    ("[10, 20, 30, 40]", [10, 20, 30, 40]),
    ("The box is [10, 20, 30, 40].", [10, 20, 30, 40]),
    # trailing comma (not JSON, but Python literal syntax accepts it)
    ('{"bbox_2d": [10, 20, 30, 40],}', [10, 20, 30, 40]),
    # coordinates as an object
    ('{"bbox_2d": {"x1": 10, "y1": 20, "x2": 30, "y2": 40}}', [10, 20, 30, 40]),
    # Qwen2-VL style
    ("<|box_start|>(10,20),(30,40)<|box_end|>", [10, 20, 30, 40]),
    # an answer cut off by max_new_tokens still holds its box
    ('{"bbox_2d": [10, 20, 30, 40], "label": "red sq', [10, 20, 30, 40]),
    # brackets in prose before the answer do not get in the way
    ('I looked [carefully] at it: {"bbox_2d": [10, 20, 30, 40]}', [10, 20, 30, 40]),
]


@pytest.mark.parametrize(("text", "expected"), WELL_FORMED)
def test_accepts_the_formats_models_write(text, expected):
    parsed = parse_bbox(text)
    assert parsed.valid, parsed.error
    assert parsed.box.as_list() == expected


def test_list_of_boxes_keeps_every_valid_box():
    parsed = parse_bbox('[{"bbox_2d": [10, 20, 30, 40]}, {"bbox_2d": [50, 60, 70, 80]}]')
    assert [b.as_list() for b in parsed.boxes] == [[10, 20, 30, 40], [50, 60, 70, 80]]


REJECTED = [
    ("", "empty"),
    ("   \n", "empty"),
    ("a a a a a a a a", "no box"),
    ("I cannot see that object.", "no box"),
    ('{"label": "car"}', "no box"),
    ('{"bbox_2d": [x1, y1, x2, y2]}', "no box"),  # the template echoed back, not a literal
    ('{"bbox_2d": ["x1", "y1", "x2", "y2"]}', "non-numeric"),
    ('{"bbox_2d": ["10", "20", "30", "40"]}', "non-numeric"),
    ('{"bbox_2d": [10, 20, 30, true]}', "non-numeric"),
    ('{"bbox_2d": [10, 20, 30, null]}', "non-numeric"),
    ('{"bbox_2d": [NaN, 20, 30, 40]}', "non-finite"),
    ('{"bbox_2d": [10, 20, Infinity, 40]}', "non-finite"),
    ('{"bbox_2d": [10, 20, 30]}', "expected 4 numbers"),
    ('{"bbox_2d": [10, 20, 30, 40, 50]}', "expected 4 numbers"),
    ('{"bbox_2d": 42}', "expected a list"),
    ('{"bbox_2d": [-5, 20, 30, 40]}', "outside 0..1000"),
    ('{"bbox_2d": [10, 20, 1200, 40]}', "outside 0..1000"),
    ('{"bbox_2d": [10, 20, 30, 1000.5]}', "outside 0..1000"),
    ('{"bbox_2d": [30, 20, 10, 40]}', "x2 10 <= x1 30"),
    ('{"bbox_2d": [10, 20, 10, 40]}', "x2 10 <= x1 10"),
    ('{"bbox_2d": [10, 40, 30, 20]}', "y2 20 <= y1 40"),
    ("(10,20),(5,40)", "x2 5 <= x1 10"),
    # the first box decides: a bad first box is not rescued by a good second one
    ('[{"bbox_2d": [10, 20, 2000, 40]}, {"bbox_2d": [10, 20, 30, 40]}]', "outside 0..1000"),
]


@pytest.mark.parametrize(("text", "why"), REJECTED)
def test_rejects_malformed_and_out_of_range(text, why):
    parsed = parse_bbox(text)
    assert not parsed.valid
    assert why in parsed.error
    assert "invalid" in parsed.describe()


def test_check_box_messages():
    assert check_box([0, 0, 1, 1]) == Box(0, 0, 1, 1)
    with pytest.raises(ValueError, match="non-finite"):
        check_box([math.nan, 0, 1, 1])


def test_iou():
    a = Box(0, 0, 100, 100)
    assert iou(a, a) == 1.0
    assert iou(a, Box(200, 200, 300, 300)) == 0.0
    assert iou(a, Box(100, 0, 200, 100)) == 0.0  # touching edges
    assert iou(a, Box(50, 0, 150, 100)) == pytest.approx(50 * 100 / (2 * 100 * 100 - 50 * 100))
    assert iou(a, Box(0, 0, 50, 50)) == pytest.approx(0.25)


def test_to_pixels_scales_from_0_1000():
    assert Box(0, 0, 1000, 1000).to_pixels(64, 128) == (0, 0, 64, 128)
    assert Box(250, 500, 500, 750).to_pixels(200, 100) == (50, 50, 100, 75)


def test_draw_boxes_writes_a_png_with_both_boxes(tmp_path):
    src = tmp_path / "img.png"
    Image.new("RGB", (64, 32), (255, 255, 255)).save(src)
    boxes = [("original", Box(0, 0, 500, 500), (0, 255, 0)), ("pruned", Box(500, 500, 1000, 1000), (255, 0, 0)),
             ("other", None, (0, 0, 255))]
    out = draw_boxes(src, boxes, tmp_path / "pics" / "0.png", title="red square")
    with Image.open(out) as img:
        assert img.format == "PNG"
        assert img.width >= 320  # enlarged for readability
        pixels = img.convert("RGB")
        colors = {pixels.getpixel((x, y)) for x in range(img.width) for y in range(img.height)}
    assert (0, 255, 0) in colors and (255, 0, 0) in colors
    assert not list((tmp_path / "pics").glob(".*"))  # no temporary file left behind
