"""Calibration data: the user's files turned into padded model batches.

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
import math
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

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
    raw = path.read_text(encoding="utf-8")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        data = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    data.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ReapError(f"{path}: line {lineno} is not JSON ({exc.msg}); the file must be a JSON list "
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
    return path


def _chat_sample(index: int, messages, base: Path, where: str) -> CalibrationSample:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: messages must be a non-empty list")
    images, rendered = [], []
    for m, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"{where}: message {m} needs role and content")
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
        raise ReapError(f"{path}: every drawn item was bad ({skipped[0]})")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return CalibrationSet(path, samples, len(items), skipped, digest)


# ----------------------------------------------------------------------------------------------- encoding


def open_image(path: Path, max_pixels: int):
    from PIL import Image

    try:
        with Image.open(path) as img:
            image = img.convert("RGB")
    except OSError as exc:
        raise ReapError(f"cannot read image {path} ({exc}); replace the file or pass --skip-bad-samples") from None
    if max_pixels and image.width * image.height > max_pixels:
        scale = math.sqrt(max_pixels / (image.width * image.height))
        size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
    return image


def render_text(processor, sample: CalibrationSample) -> str:
    if sample.text is not None:
        return sample.text
    return processor.apply_chat_template(sample.messages, tokenize=False,
                                         add_generation_prompt=sample.add_generation_prompt)


@dataclass
class EncodedSample:
    input_ids: torch.Tensor  # [S]
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    mm_token_type_ids: torch.Tensor | None


def _truncate(enc: EncodedSample, max_len: int, vision_start_id: int, merge: int) -> EncodedSample:
    """Cut to ``max_len`` tokens; an image the cut would split is dropped whole, with its pixels."""
    ids = enc.input_ids
    if ids.numel() <= max_len:
        return enc
    starts = (ids == vision_start_id).nonzero().flatten().tolist()
    cut, kept_images = max_len, 0
    grid = enc.image_grid_thw
    for i, start in enumerate(starts):
        length = int(grid[i].prod()) // (merge * merge) if grid is not None and i < len(grid) else 0
        end = start + length + 2  # vision_start, pads, vision_end
        if end <= max_len:
            kept_images = i + 1
        else:
            cut = min(cut, start)
            break
    pixel_values = grid_thw = None
    if grid is not None and kept_images:
        grid_thw = grid[:kept_images]
        pixel_values = enc.pixel_values[: int(grid_thw.prod(dim=1).sum())]
    mm = enc.mm_token_type_ids[:cut] if enc.mm_token_type_ids is not None else None
    return EncodedSample(ids[:cut], pixel_values, grid_thw, mm)


def _encode(processor, text: str, images: list) -> EncodedSample:
    out = processor(text=[text], images=images or None, return_tensors="pt")
    return EncodedSample(
        out["input_ids"][0],
        out.get("pixel_values"),
        out.get("image_grid_thw"),
        out["mm_token_type_ids"][0] if "mm_token_type_ids" in out else None,
    )


def _image_tokens(enc: EncodedSample, merge: int) -> int:
    return 0 if enc.image_grid_thw is None else int(enc.image_grid_thw.prod(dim=1).sum()) // (merge * merge)


def _shrink_to_fit(processor, text: str, images: list, enc: EncodedSample, max_seq_len: int) -> EncodedSample:
    """Re-encode with smaller images so the sample fits ``max_seq_len`` with its text whole: large photos
    would otherwise push the question (and the image itself) out of the sample."""
    from PIL import Image

    proc = processor.image_processor
    merge, unit = proc.merge_size, (proc.patch_size * proc.merge_size) ** 2  # pixels per image token
    text_tokens = enc.input_ids.numel() - _image_tokens(enc, merge)
    per_image = (max_seq_len - text_tokens) // len(images)
    if per_image < 1:
        return enc
    cap = per_image * unit
    for _ in range(6):  # the processor rounds sizes to whole patches: tighten until it fits
        smaller = []
        for image in images:
            if image.width * image.height > cap:
                scale = math.sqrt(cap / (image.width * image.height))
                image = image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))),
                                     Image.Resampling.BICUBIC)
            smaller.append(image)
        shrunk = _encode(processor, text, smaller)
        if shrunk.input_ids.numel() <= max_seq_len:
            return shrunk
        cap = int(cap * 0.8)
    return enc


def encode_sample(processor, sample: CalibrationSample, max_seq_len: int, max_pixels: int = 0) -> EncodedSample:
    """Token ids (and pixels) of one sample within ``max_seq_len``: images too large for the budget are
    scaled down to fit; failing that, the text is cut and an image the cut would split is dropped."""
    text = render_text(processor, sample)
    images = [open_image(p, max_pixels) for p in sample.images]
    enc = _encode(processor, text, images)
    merge = processor.image_processor.merge_size
    before = _image_tokens(enc, merge)
    if images and enc.input_ids.numel() > max_seq_len:
        enc = _shrink_to_fit(processor, text, images, enc, max_seq_len)
    start_id = getattr(processor, "vision_start_token_id", None)
    if start_id is None:
        start_id = processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    fitted = _truncate(enc, max_seq_len, start_id, merge)
    after = _image_tokens(fitted, merge)
    if after < before:
        what = "dropped" if after == 0 or (fitted.image_grid_thw is not None and
                                           len(fitted.image_grid_thw) < len(images)) else "scaled down"
        warnings.warn(f"calibration item {sample.index}: image {what} to fit REAP_MAX_SEQ_LEN={max_seq_len} "
                      f"({before} -> {after} image tokens); raise REAP_MAX_SEQ_LEN or set REAP_MAX_PIXELS",
                      stacklevel=2)
    return fitted


def collate(encoded: list[EncodedSample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; padding positions have attention_mask 0 and are never counted."""
    length = max(e.input_ids.numel() for e in encoded)
    input_ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), length), dtype=torch.long)
    mm = torch.zeros((len(encoded), length), dtype=torch.int)
    for i, e in enumerate(encoded):
        n = e.input_ids.numel()
        input_ids[i, :n] = e.input_ids
        attention[i, :n] = 1
        if e.mm_token_type_ids is not None:
            mm[i, :n] = e.mm_token_type_ids
    batch = {"input_ids": input_ids, "attention_mask": attention, "mm_token_type_ids": mm}
    with_images = [e for e in encoded if e.image_grid_thw is not None and e.image_grid_thw.numel()]
    if with_images:
        batch["pixel_values"] = torch.cat([e.pixel_values for e in with_images])
        batch["image_grid_thw"] = torch.cat([e.image_grid_thw for e in with_images])
    return batch


def batches(processor, samples: list[CalibrationSample], batch_size: int, max_seq_len: int, max_pixels: int = 0):
    """Yield padded batches in sample order."""
    pad_id = processor.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = processor.tokenizer.eos_token_id
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        yield collate([encode_sample(processor, s, max_seq_len, max_pixels) for s in chunk], pad_id)


def num_batches(samples: list, batch_size: int) -> int:
    return math.ceil(len(samples) / batch_size)
