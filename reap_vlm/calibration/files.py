"""Calibration files: the user's items parsed and checked into samples (``encode`` turns them into batches).

Three item formats, freely mixed in one JSON list or JSONL file:

* the user's grounding format ``{"image": "images/1.png", "regions": ["red car", ...]}``
  (plus text-only ``{"prompt": "..."}``): a grounding prompt is made from a template,
  English or Turkish, chosen with the seed;
* chat ``{"messages": [{"role": ..., "content": str | [{"type": "image", "image": path},
  {"type": "text", "text": ...}]}]}``, rendered with the model's own chat template;
* plain ``{"text": "..."}``.

Image paths are relative to the calibration file.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint.fsutil import json_type, read_text
from ..errors import ReapError

GROUNDING_TEMPLATES = (
    'Find the bounding box of "{region}".',
    'Locate "{region}" in the image.',
    'Where is "{region}" located?',
    'Output the bounding box of "{region}" as {{"bbox_2d": [x1, y1, x2, y2]}}.',
    'Görselde "{region}" nesnesini bul.',
    '"{region}" nerede?',
)


@dataclass
class CalibrationSample:
    index: int  # position of the item in the file
    kind: str  # "grounding" | "prompt" | "chat" | "text"
    messages: list[dict] | None = None
    text: str | None = None
    images: list[Path] = field(default_factory=list)
    regions: list[str] = field(default_factory=list)
    add_generation_prompt: bool = True

    @property
    def has_image(self) -> bool:
        return bool(self.images)


@dataclass
class CalibrationSet:
    path: Path
    samples: list[CalibrationSample]
    total_items: int
    skipped: list[str]  # one reason per skipped item
    digest: str  # content hash of the file, for resume

    def summary(self) -> str:
        images = sum(s.has_image for s in self.samples)
        line = f"{len(self.samples)} samples ({images} with images) of {self.total_items} items in {self.path}"
        return line + (f", {len(self.skipped)} skipped" if self.skipped else "")


def _read_items(path: Path) -> list:
    raw = read_text(path, "calibration file")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        data = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    data.append(json.loads(line))
                except (json.JSONDecodeError, RecursionError) as exc:
                    raise ReapError(f"{path}: line {lineno} is not JSON ({getattr(exc, 'msg', exc)}, column "
                                    f"{getattr(exc, 'colno', '?')}); the file must be a JSON list "
                                    "or JSONL with one item per line") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise ReapError(f"{path}: expected a JSON list of items, got {type(data).__name__}")
    return data


def _image(base: Path, value, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: image must be a path string")
    path = (base / value) if not Path(value).is_absolute() else Path(value)
    if not path.is_file():
        raise ValueError(f"{where}: image {value} not found (looked at {path})")
    problem = image_problem(path)
    if problem:
        raise ValueError(f"{where}: image {value} {problem}")
    return path


def image_problem(path: Path) -> str | None:
    """Why an image file cannot be used (unreadable, not an image, too many pixels to decode safely), or None.
    Reads the header and checks the data, without decoding the pixels."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                img.verify()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return f"is too large to decode safely ({str(exc).split('could be')[0].strip()})"
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # PIL's ways of saying "not a readable image"
        return f"cannot be read ({str(exc) or type(exc).__name__})"
    if width * height > Image.MAX_IMAGE_PIXELS:
        return f"is too large to decode safely ({width} x {height} pixels)"
    return None


def _chat_sample(index: int, messages, base: Path, where: str) -> CalibrationSample:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: messages must be a non-empty list")
    images, rendered = [], []
    for m, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"{where}: message {m} needs role and content")
        if not isinstance(message["role"], str) or not message["role"].strip():
            raise ValueError(f"{where}: message {m} role must be a non-empty string (user, assistant, system), "
                             f"not {json_type(message['role'])}")
        content = message["content"]
        if isinstance(content, str):
            rendered.append({"role": message["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise ValueError(f"{where}: message {m} content must be a string or a list of parts")
        parts = []
        for part in content:
            if not isinstance(part, dict):
                raise ValueError(f"{where}: message {m} has a part that is not an object")
            if part.get("type") == "image" or "image" in part:
                images.append(_image(base, part.get("image"), where))
                parts.append({"type": "image"})
            elif part.get("type") == "text" or "text" in part:
                parts.append({"type": "text", "text": str(part.get("text", ""))})
            else:
                raise ValueError(f"{where}: message {m} has a part of unknown type {part.get('type')!r}")
        rendered.append({"role": message["role"], "content": parts})
    last_is_assistant = rendered[-1]["role"] == "assistant"
    return CalibrationSample(index, "chat", messages=rendered, images=images,
                             add_generation_prompt=not last_is_assistant)


def _parse_item(index: int, item, base: Path, rng: random.Random, where: str) -> CalibrationSample:
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected an object, got {type(item).__name__}")
    if "messages" in item:
        return _chat_sample(index, item["messages"], base, where)
    if "image" in item:
        regions = item.get("regions")
        if not isinstance(regions, list) or not regions or not all(isinstance(r, str) and r for r in regions):
            raise ValueError(f"{where}: regions must be a non-empty list of phrases")
        image = _image(base, item["image"], where)
        region = rng.choice(regions)
        prompt = rng.choice(GROUNDING_TEMPLATES).format(region=region)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return CalibrationSample(index, "grounding", messages=messages, images=[image], regions=list(regions))
    if "prompt" in item:
        if not isinstance(item["prompt"], str) or not item["prompt"].strip():
            raise ValueError(f"{where}: prompt must be a non-empty string")
        return CalibrationSample(index, "prompt", messages=[{"role": "user", "content": item["prompt"]}])
    if "text" in item:
        if not isinstance(item["text"], str) or not item["text"].strip():
            raise ValueError(f"{where}: text must be a non-empty string")
        return CalibrationSample(index, "text", text=item["text"], add_generation_prompt=False)
    raise ValueError(f"{where}: no known fields (expected image+regions, prompt, messages or text)")


def load_calibration(path: Path, max_samples: int, seed: int = 42, skip_bad: bool = False) -> CalibrationSet:
    """Parse and check every item; draw ``max_samples`` of them with ``seed`` when there are more."""
    path = Path(path)
    if not path.is_file():
        raise ReapError(f"calibration file {path} not found; set REAP_CALIBRATION_PATH / --calibration")
    items = _read_items(path)
    if not items:
        raise ReapError(f"{path} holds no items; add calibration samples")
    chosen = range(len(items))
    if len(items) > max_samples:
        chosen = sorted(random.Random(seed).sample(range(len(items)), max_samples))
    samples, skipped = [], []
    for index in chosen:
        rng = random.Random(f"{seed}:{index}")  # a sample's prompt does not depend on which others were drawn
        try:
            samples.append(_parse_item(index, items[index], path.parent, rng, f"{path.name} item {index}"))
        except ValueError as exc:
            if not skip_bad:
                raise ReapError(f"{exc}; fix the item or pass --skip-bad-samples") from None
            skipped.append(str(exc))
    if not samples:
        raise ReapError(f"{path}: every drawn item was bad, nothing left to score (the first: {skipped[0]}); "
                        "fix the items")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return CalibrationSet(path, samples, len(items), skipped, digest)


def require_text_only(calib: CalibrationSet, family_name: str) -> None:
    """A text-only model cannot be calibrated on images: refuse before anything loads, naming the items."""
    with_images = [s.index for s in calib.samples if s.has_image]
    if with_images:
        more = f" and {len(with_images) - 5} more" if len(with_images) > 5 else ""
        raise ReapError(f"{calib.path}: item(s) {', '.join(map(str, with_images[:5]))}{more} carry images, but "
                        f"{family_name} is a text-only model; calibrate it on text items ({{\"prompt\"}}, "
                        "{\"text\"} or chat without images)")
