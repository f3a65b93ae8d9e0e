"""Bounding-box answers: parse what a grounding model wrote, compare two boxes, draw them.

A family's ``BoxFormat`` says how its grounding answers write a box: e.g. ``{"bbox_2d": [x1, y1, x2, y2]}``
in 0..1000 coordinates relative to the image (x to the right, y down).  Real outputs wrap that in
prose or code fences, use single quotes or other key names (``bbox``, ``box``, ``bounding_box``),
give a list of boxes, a bare ``[x1, y1, x2, y2]`` list, or the pair ``(x1,y1),(x2,y2)``.
:func:`parse_bbox` accepts all of these; the *first* box the text offers decides: it must be four
finite numbers in [0, coord_max] with x2 > x1 and y2 > y1, or the answer counts as invalid (with
the reason).
"""

from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint.fsutil import atomic_save
from ..families import BoxFormat
from ..families.base import NORMALIZED_1000

COORD_MAX = NORMALIZED_1000.coord_max  # the defaults below: the common convention
BOX_KEYS = NORMALIZED_1000.keys
_FENCE = re.compile(r"```[A-Za-z0-9_-]*")
_PAIRS = re.compile(r"\(\s*([-+0-9.eE]+)\s*,\s*([-+0-9.eE]+)\s*\)\s*,?\s*\(\s*([-+0-9.eE]+)\s*,\s*([-+0-9.eE]+)\s*\)")
_CLOSE = {"{": "}", "[": "]"}


@dataclass(frozen=True)
class Box:
    """A box in 0..coord_max coordinates (the answer's own)."""

    x1: float
    y1: float
    x2: float
    y2: float

    @property
    def area(self) -> float:
        return max(0.0, self.x2 - self.x1) * max(0.0, self.y2 - self.y1)

    def to_pixels(self, width: int, height: int, coord_max: float = COORD_MAX) -> tuple[float, float, float, float]:
        sx, sy = width / coord_max, height / coord_max
        return self.x1 * sx, self.y1 * sy, self.x2 * sx, self.y2 * sy

    def as_list(self) -> list[float]:
        return [_plain(v) for v in (self.x1, self.y1, self.x2, self.y2)]


def _plain(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)


@dataclass
class ParsedBox:
    """What an answer held: its deciding box (or why there is none) and every valid box found."""

    box: Box | None
    error: str | None = None
    boxes: list[Box] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return self.box is not None

    def describe(self) -> str:
        return str(self.box.as_list()) if self.box else f"invalid ({self.error})"


def check_box(values, coord_max: float = COORD_MAX) -> Box:
    """``values`` as a Box, or ValueError saying what is wrong with it."""
    if isinstance(values, dict):  # {"x1": .., "y1": .., "x2": .., "y2": ..} or xmin/ymin/xmax/ymax
        keys = {str(k).lower(): v for k, v in values.items()}
        names = next((n for n in (("x1", "y1", "x2", "y2"), ("xmin", "ymin", "xmax", "ymax")) if set(n) <= set(keys)),
                     None)
        if names is None:
            raise ValueError(f"box object without x1/y1/x2/y2 keys: {sorted(keys)[:4]}")
        values = [keys[n] for n in names]
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"expected a list of 4 numbers, got {type(values).__name__}")
    if len(values) != 4:
        raise ValueError(f"expected 4 numbers, got {len(values)}")
    numbers = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"non-numeric coordinate {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"non-finite coordinate {value!r}")
        if not 0 <= value <= coord_max:
            raise ValueError(f"coordinate {_plain(value)} outside 0..{int(coord_max)}")
        numbers.append(float(value))
    x1, y1, x2, y2 = numbers
    if x2 <= x1:
        raise ValueError(f"x2 {_plain(x2)} <= x1 {_plain(x1)}")
    if y2 <= y1:
        raise ValueError(f"y2 {_plain(y2)} <= y1 {_plain(y1)}")
    return Box(x1, y1, x2, y2)


def _is_scalar(value) -> bool:
    return not isinstance(value, (list, tuple, dict))


def _candidates(obj, keys: frozenset[str] = BOX_KEYS) -> list:
    """Box candidates (raw 4-lists or anything under a box key) in reading order."""
    if isinstance(obj, dict):
        found = []
        for key, value in obj.items():
            if re.sub(r"[^a-z0-9]", "", str(key).lower()) in keys:
                if isinstance(value, (list, tuple)) and value and not all(map(_is_scalar, value)):
                    found.extend(_candidates(value, keys))  # a list of boxes under one key
                else:
                    found.append(value)
            elif isinstance(value, (dict, list, tuple)):
                found.extend(_candidates(value, keys))
        return found
    if isinstance(obj, (list, tuple)):
        if len(obj) == 4 and all(map(_is_scalar, obj)):
            return [obj]
        found = []
        for item in obj:
            if isinstance(item, (dict, list, tuple)):
                found.extend(_candidates(item, keys))
        return found
    return []


def _span_end(text: str, start: int) -> int | None:
    """Index just past the bracket that closes ``text[start]``, skipping quoted strings."""
    stack, quote, escaped = [], None, False
    for i in range(start, len(text)):
        ch = text[i]
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = None
            continue
        if ch in "\"'":
            quote = ch
        elif ch in _CLOSE:
            stack.append(_CLOSE[ch])
        elif ch in "]}":
            if not stack or stack.pop() != ch:
                return None
            if not stack:
                return i + 1
    return None


def _load(fragment: str):
    try:
        return json.loads(fragment)  # note: accepts NaN / Infinity, which check_box rejects
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(fragment)  # single quotes, tuples, Python literals; nothing is executed
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def _structures(text: str) -> list:
    """Every parseable {...} / [...] in ``text``, outermost first, left to right.  An unparseable
    span (e.g. cut off by max_new_tokens) is searched again from the next character."""
    found, i = [], 0
    while i < len(text):
        if text[i] in _CLOSE:
            end = _span_end(text, i)
            obj = _load(text[i:end]) if end else None
            if obj is not None and isinstance(obj, (dict, list, tuple)):
                found.append(obj)
                i = end
                continue
        i += 1
    return found


def parse_bbox(text: str | None, fmt: BoxFormat = NORMALIZED_1000) -> ParsedBox:
    """The box an answer gives in the family's ``fmt``; see the module docstring for what is accepted."""
    if not text or not text.strip():
        return ParsedBox(None, "empty answer")
    cleaned = _FENCE.sub(" ", text)
    candidates = [c for obj in _structures(cleaned) for c in _candidates(obj, fmt.keys)]
    if not candidates and fmt.pairs:
        candidates = [[_number(v) for v in m.groups()] for m in _PAIRS.finditer(cleaned)]
    if not candidates:
        return ParsedBox(None, "no box found")
    boxes, first_error = [], None
    for i, candidate in enumerate(candidates):
        try:
            boxes.append(check_box(candidate, fmt.coord_max))
        except ValueError as exc:
            if i == 0:
                first_error = str(exc)
    if first_error is not None:
        return ParsedBox(None, first_error, boxes)
    return ParsedBox(boxes[0], None, boxes)


def _number(raw: str):
    try:
        return float(raw)
    except ValueError:
        return raw


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (0 when they do not overlap)."""
    ix = max(0.0, min(a.x2, b.x2) - max(a.x1, b.x1))
    iy = max(0.0, min(a.y2, b.y2) - max(a.y1, b.y1))
    inter = ix * iy
    union = a.area + b.area - inter
    return inter / union if union > 0 else 0.0


# ----------------------------------------------------------------------------------------------- pictures

ORIGINAL_COLOR = (30, 170, 60)
PRUNED_COLOR = (220, 40, 40)
_MIN_SIDE = 320  # small images are enlarged so the boxes and the legend stay readable


def draw_boxes(image_path: Path, boxes: list[tuple[str, Box | None, tuple[int, int, int]]], out_path: Path,
               title: str = "", coord_max: float = COORD_MAX) -> Path:
    """Save ``image_path`` with each (label, box, colour) drawn, boxes scaled from 0..coord_max to pixels."""
    from PIL import Image, ImageDraw

    with Image.open(image_path) as img:
        image = img.convert("RGB")
    scale = max(1, math.ceil(_MIN_SIDE / max(1, min(image.size))))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    legend_height = 14 * (len(boxes) + (1 if title else 0)) + 6
    canvas = Image.new("RGB", (image.width, image.height + legend_height), (255, 255, 255))
    canvas.paste(image, (0, legend_height))
    draw = ImageDraw.Draw(canvas)
    y = 3
    if title:
        draw.text((4, y), title[:120], fill=(0, 0, 0))
        y += 14
    width = max(2, image.width // 160)
    for label, box, color in boxes:
        draw.text((4, y), f"{label}: {box.as_list() if box else 'no valid box'}", fill=color)
        y += 14
        if box is not None:
            x1, y1, x2, y2 = box.to_pixels(image.width, image.height, coord_max)
            draw.rectangle([x1, y1 + legend_height, x2, y2 + legend_height], outline=color, width=width)
    return atomic_save(Path(out_path), lambda tmp: canvas.save(tmp, format="PNG"))
