"""Encoding calibration samples with the model's processor: images opened and fitted to the sequence budget,
token ids, padded batches."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint.loading import tokenizer_of
from ..errors import ReapError
from ..families import ModelFamily, family_for_processor
from .files import CalibrationSample


def open_image(path: Path, max_pixels: int):
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                image = img.convert("RGB")
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        # files.image_problem checked it when the calibration was read: it changed since, or came another way
        raise ReapError(f"cannot read image {path} ({exc}); replace the file") from None
    size = capped_size(image.width, image.height, max_pixels)
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    return image


def capped_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """(width, height) of an image once scaled down to at most ``max_pixels`` (0: no cap)."""
    if max_pixels and width * height > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
        return max(1, int(width * scale)), max(1, int(height * scale))
    return width, height


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


def text_token_count(processor, text: str) -> int:
    """Tokens of ``text`` as the processor tokenizes it, each image placeholder one token."""
    return len(tokenizer_of(processor)(text)["input_ids"])


def text_token_counts(processor, texts: list[str]) -> list[int]:
    """``text_token_count`` of each of ``texts``, in one call: the Rust tokenizer spreads them over the cores (1,024
    texts of 100-2,000 tokens: 0.64 s against 1.08 s one by one on 2 cores).  The encoding processes forked later
    turn the tokenizer's parallelism off before they use it (``ahead._process_start``).  In calls of 512 texts: the
    ids of a whole large calibration set are never held at once."""
    tokenizer = tokenizer_of(processor)
    return [len(ids) for start in range(0, len(texts), 512) for ids in tokenizer(texts[start:start + 512])["input_ids"]]


def image_token_count(processor, width: int, height: int) -> int | None:
    """Placeholder tokens the processor gives a ``width`` x ``height`` image (its own count, the one vLLM asks
    for), or None for a processor that cannot say."""
    try:
        return int(processor._get_num_multimodal_tokens(image_sizes=[[height, width]]).num_image_tokens[0])
    except (AttributeError, NotImplementedError, TypeError, KeyError, IndexError):
        return None


def _truncate(enc: EncodedSample, max_len: int, processor, family: ModelFamily) -> EncodedSample:
    """Cut to ``max_len`` tokens; an image the cut would split is dropped whole, with its pixels."""
    ids = enc.input_ids
    if ids.numel() <= max_len:
        return enc
    grid = enc.image_grid_thw
    starts = (ids == family.image_start_id(processor)).nonzero().flatten().tolist() \
        if grid is not None or enc.pixel_values is not None else []
    if grid is None and starts:  # images without a patch grid (Llama-4's tiles): no extents, all dropped
        cut = min(max_len, starts[0])
        return EncodedSample(ids[:cut], None, None, None if enc.mm_token_type_ids is None else
                             enc.mm_token_type_ids[:cut])
    cut, kept_images = max_len, 0
    for i, start in enumerate(starts):
        length = family.image_tokens(processor, grid[i:i + 1]) if grid is not None and i < len(grid) else 0
        end = start + length + family.image_frame_tokens  # start marker, placeholders, end marker
        if end <= max_len:
            kept_images = i + 1
        else:
            cut = min(cut, start)
            break
    pixel_values = grid_thw = None
    if grid is not None and kept_images:
        grid_thw = grid[:kept_images]
        # a copy, not a view: a sample handed between processes alone would carry the whole storage
        pixel_values = enc.pixel_values[: int(grid_thw.prod(dim=1).sum())].clone()
    mm = enc.mm_token_type_ids[:cut] if enc.mm_token_type_ids is not None else None
    return EncodedSample(ids[:cut], pixel_values, grid_thw, mm)


def _encode(processor, text: str, images: list) -> EncodedSample:
    # images only when there are some: a text-only family's processor is its tokenizer
    out = processor(text=[text], return_tensors="pt", **({"images": images} if images else {}))
    return EncodedSample(
        out["input_ids"][0],
        out.get("pixel_values"),
        out.get("image_grid_thw"),
        out["mm_token_type_ids"][0] if "mm_token_type_ids" in out else None,
    )


def _shrink_to_fit(processor, family: ModelFamily, text: str, images: list, text_tokens: int,
                   max_seq_len: int) -> EncodedSample | None:
    """Re-encode with smaller images so the sample fits ``max_seq_len`` with its ``text_tokens`` text tokens
    whole: large photos would otherwise push the question (and the image itself) out of the sample.  None when
    they cannot be made to fit."""
    from PIL import Image

    unit = family.pixels_per_image_token(processor)
    per_image = (max_seq_len - text_tokens) // len(images)
    if per_image < 1:
        return None
    cap = per_image * unit
    for _ in range(6):  # the processor rounds sizes to whole patches: tighten until it fits
        sizes = [_within(image.width, image.height, cap) for image in images]
        counts = [image_token_count(processor, w, h) for w, h in sizes]
        if None in counts or text_tokens + sum(counts) <= max_seq_len:  # else known too long: no encoding
            smaller = [image if size == (image.width, image.height) else image.resize(size, Image.Resampling.BICUBIC)
                       for image, size in zip(images, sizes)]
            shrunk = _encode(processor, text, smaller)
            if shrunk.input_ids.numel() <= max_seq_len:
                return shrunk
        cap = int(cap * 0.8)
    return None


def _within(width: int, height: int, cap: int) -> tuple[int, int]:
    """The size an image is scaled to so that it holds at most ``cap`` pixels (its own when it does)."""
    if width * height <= cap:
        return width, height
    scale = math.sqrt(cap / (width * height))
    return max(1, int(width * scale)), max(1, int(height * scale))


def encode_sample(processor, sample: CalibrationSample, max_seq_len: int, max_pixels: int = 0,
                  family: ModelFamily | None = None) -> EncodedSample:
    """Token ids (and pixels) of one sample within ``max_seq_len``: images too large for the budget are
    scaled down to fit; failing that, the text is cut and an image the cut would split is dropped.
    ``family`` (default: the processor's) says how images become tokens."""
    family = family or family_for_processor(processor)
    text = render_text(processor, sample)
    images = [open_image(p, max_pixels) for p in sample.images]
    counts = [image_token_count(processor, image.width, image.height) for image in images]
    text_tokens = text_token_count(processor, text) - len(images) if images and None not in counts else None
    if text_tokens is not None and text_tokens + sum(counts) > max_seq_len:
        # known too long before encoding (a 4 MP photo is ~4,000 tokens): straight to the smaller images,
        # which spares encoding the photos at full size (half an image sample's encoding time)
        before = sum(counts)
        enc = _shrink_to_fit(processor, family, text, images, text_tokens, max_seq_len) or _encode(
            processor, text, images)
    else:
        enc = _encode(processor, text, images)
        before = family.image_tokens(processor, enc.image_grid_thw)
        if images and enc.input_ids.numel() > max_seq_len:
            enc = _shrink_to_fit(processor, family, text, images, enc.input_ids.numel() - before,
                                 max_seq_len) or enc
    fitted = _truncate(enc, max_seq_len, processor, family)
    after = family.image_tokens(processor, fitted.image_grid_thw)
    lost_pixels = enc.pixel_values is not None and fitted.pixel_values is None  # also where tokens go uncounted
    if after < before or lost_pixels:
        what = "dropped" if after == 0 or (fitted.image_grid_thw is not None and
                                           len(fitted.image_grid_thw) < len(images)) else "scaled down"
        warnings.warn(f"calibration item {sample.index}: image {what} to fit REAP_MAX_SEQ_LEN={max_seq_len} "
                      f"({before} -> {after} image tokens); raise REAP_MAX_SEQ_LEN or set REAP_MAX_PIXELS",
                      stacklevel=2)
    return fitted


def collate(encoded: list[EncodedSample], pad_id: int, left: bool = False) -> dict[str, torch.Tensor]:
    """Padded batch (right-padded, or left-padded for batched generation); padding positions have
    attention_mask 0 and are never counted."""
    length = max(e.input_ids.numel() for e in encoded)
    input_ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), length), dtype=torch.long)
    mm = torch.zeros((len(encoded), length), dtype=torch.int)
    for i, e in enumerate(encoded):
        n = e.input_ids.numel()
        span = slice(length - n, length) if left else slice(0, n)
        input_ids[i, span] = e.input_ids
        attention[i, span] = 1
        if e.mm_token_type_ids is not None:
            mm[i, span] = e.mm_token_type_ids
    batch = {"input_ids": input_ids, "attention_mask": attention}
    if any(e.mm_token_type_ids is not None for e in encoded):  # a multimodal processor's; a tokenizer has none
        batch["mm_token_type_ids"] = mm
    with_pixels = [e.pixel_values for e in encoded if e.pixel_values is not None and e.pixel_values.numel()]
    if with_pixels:
        batch["pixel_values"] = torch.cat(with_pixels)
    grids = [e.image_grid_thw for e in encoded if e.image_grid_thw is not None and e.image_grid_thw.numel()]
    if grids:  # a patch grid per image where the family has one (not Llama-4's tiles)
        batch["image_grid_thw"] = torch.cat(grids)
    return batch


def pad_token_id(processor) -> int:
    tokenizer = tokenizer_of(processor)
    return tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id


def encode_batch(processor, chunk: list[CalibrationSample], max_seq_len: int, max_pixels: int = 0,
                 family: ModelFamily | None = None) -> dict[str, torch.Tensor]:
    """One padded batch of the samples of ``chunk``."""
    return collate([encode_sample(processor, s, max_seq_len, max_pixels, family) for s in chunk],
                   pad_token_id(processor))


def batch_chunks(samples: list, batch_size: int) -> list[list]:
    """The samples of each batch, in order."""
    return [samples[start:start + batch_size] for start in range(0, len(samples), batch_size)]


def to_model(batch: dict[str, torch.Tensor], device, dtype: torch.dtype, non_blocking: bool = False,
             host: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """A batch on ``device`` with its pixel values in the model's ``dtype`` (Llama-4's processor gives bfloat16,
    which its vision tower takes as they come; the Qwen/GLM towers cast them themselves, the same values), but for
    the keys in ``host`` (``ModelFamily.host_side``)."""
    return {k: v if k in host else v.to(device, dtype, non_blocking=non_blocking) if k == "pixel_values"
            else v.to(device, non_blocking=non_blocking) for k, v in batch.items()}


def batches(processor, samples: list[CalibrationSample], batch_size: int, max_seq_len: int, max_pixels: int = 0,
            family: ModelFamily | None = None):
    """Yield padded batches in sample order."""
    for chunk in batch_chunks(samples, batch_size):
        yield encode_batch(processor, chunk, max_seq_len, max_pixels, family)


def num_batches(samples: list, batch_size: int) -> int:
    return math.ceil(len(samples) / batch_size)
