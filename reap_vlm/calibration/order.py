"""Length-aware batching: samples sorted by token length within windows of batches, so that a padded batch
holds samples of about one length and the forward spends little on padding.

Each sample's length is estimated without encoding it: its rendered text through the tokenizer, plus each
image's placeholder tokens from the size in its header (the processor's own count,
``_get_num_multimodal_tokens``, as vLLM asks it), capped at the sequence budget.  The order is a pure function of
the samples, the processor and the settings, so a resumed run (whose fingerprint holds the order) and every
torchrun rank form the same batches.  Sorting changes which samples share a batch, never which tokens are
scored: the sums are the same up to float64 summation order (tests/test_throughput.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ReapError
from ..families import ModelFamily, family_for_processor
from .encode import batch_chunks, capped_size, image_token_count, render_text, text_token_counts
from .files import CalibrationSample


def image_size(path) -> tuple[int, int]:
    """(width, height) from the image's header; the pixels are not decoded."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, ValueError, SyntaxError) as exc:  # checked when the calibration was read: changed since
        raise ReapError(f"cannot read image {path} ({exc}); replace the file") from None


def estimated_tokens(processor, sample: CalibrationSample, max_seq_len: int, max_pixels: int,
                     family: ModelFamily, text_tokens: int) -> tuple[int, int]:
    """(tokens ``encode_sample`` will give ``sample``, of which image tokens), about: exact for text, close for
    images (a sort key and a cost estimate); ``text_tokens``: its rendered text's (``text_token_counts``)."""
    total, image = text_tokens, 0
    for path in sample.images:  # each image's one placeholder in the text becomes its tokens
        width, height = capped_size(*image_size(path), max_pixels)
        count = image_token_count(processor, width, height)
        count = width * height // family.pixels_per_image_token(processor) if count is None else count
        total, image = total + count - 1, image + count
    over = max(total - max_seq_len, 0)  # a sample too long is encoded with smaller images: about this many fewer
    return total - over, max(image - over, 0)


@dataclass
class BatchOrder:
    samples: list[CalibrationSample]  # in batch order
    lengths: list[int]  # estimated tokens of each, same order (empty when not sorted)
    window: int  # batches per sorted window (0: calibration order)
    image_tokens: list[int] = field(default_factory=list)  # estimated image tokens of each, same order

    def batch_costs(self, batch_size: int, cost: ForwardCost) -> list[int]:
        """Each batch's estimated forward cost (``ForwardCost``), in batch order; empty when not estimated."""
        images = [sum(chunk) for chunk in batch_chunks(self.image_tokens, batch_size)]
        return [positions * cost.per_position + image * cost.per_image_token
                for positions, image in zip(padded_positions(self.lengths, batch_size), images)]

    @property
    def indices(self) -> list[int]:
        return [s.index for s in self.samples]

    def batch_tokens(self, samples: list[CalibrationSample], batch_size: int) -> list[int]:
        """Estimated tokens of each batch of ``samples`` (some of this order's, in this order: a rank's share);
        empty when the lengths were not estimated."""
        if not self.lengths:
            return []
        length = {s.index: n for s, n in zip(self.samples, self.lengths)}
        return [sum(length[s.index] for s in samples[i:i + batch_size]) for i in range(0, len(samples), batch_size)]


@dataclass(frozen=True)
class ForwardCost:
    """A forward's cost, about, in weights gone through (multiply-adds), in whole numbers (every torchrun rank must
    get the same sums): per token position of a padded batch (the language model's) and per image token (the
    vision tower's, over the patches merged into it).  The attention's terms in the sequence length are left out.
    Positions alone leave the vision tower out: on the bench's text set (a 4-layer language model) they gave one
    of two ranks 6% more photo tokens, ~2% more work."""

    per_position: int
    per_image_token: int = 0


def padded_positions(lengths: list[int], batch_size: int) -> list[int]:
    """Token positions of each batch of samples of ``lengths`` (in batch order), padding included: about what its
    forward costs.  Empty when the lengths were not estimated."""
    return [max(chunk) * len(chunk) for chunk in batch_chunks(lengths, batch_size)]


def padding_share(lengths: list[int], batch_size: int) -> float:
    """Share of a run's token positions that are padding, for samples of ``lengths`` batched in this order."""
    positions = sum(padded_positions(lengths, batch_size))
    return 1.0 - sum(lengths) / positions if positions else 0.0


def length_order(processor, samples: list[CalibrationSample], batch_size: int, window: int, max_seq_len: int,
                 max_pixels: int = 0, family: ModelFamily | None = None) -> tuple[BatchOrder, BatchOrder]:
    """(the order to run, the calibration order) with their estimated lengths.  Within each window of ``window``
    batches the samples go longest first (the largest batch, the memory peak, comes first, not after an hour),
    but for a last window that ends in a short batch: shortest first, so the short batch holds the longest;
    ties in calibration order.  ``window`` 0 or ``batch_size`` 1 (nothing to pad) keep the calibration order."""
    if window <= 0 or batch_size <= 1:
        given = BatchOrder(list(samples), [], 0)  # no estimate needed
        return given, given
    family = family or family_for_processor(processor)
    texts = text_token_counts(processor, [render_text(processor, s) for s in samples])
    lengths, images = zip(*(estimated_tokens(processor, s, max_seq_len, max_pixels, family, n)
                            for s, n in zip(samples, texts))) if samples else ((), ())
    given = BatchOrder(list(samples), list(lengths), 0, list(images))
    span = window * batch_size
    order: list[int] = []
    for start in range(0, len(samples), span):
        members = range(start, min(start + span, len(samples)))
        if len(members) % batch_size:  # the last, short batch is the window's last: shortest first pads least
            order += sorted(members, key=lambda i: (lengths[i], i))
        else:
            order += sorted(members, key=lambda i: (-lengths[i], i))
    return BatchOrder([samples[i] for i in order], [lengths[i] for i in order], window,
                      [images[i] for i in order]), given
