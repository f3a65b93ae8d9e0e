"""Degenerate generations: empty, special tokens only, or one token / short n-gram filling the output.

The user's symptom ("a a a a a") is a short period repeated until max_new_tokens.  A generation
is degenerate when, after its end-of-sequence tokens are dropped, it is

* empty (no tokens, or only whitespace once special tokens are removed),
* special tokens only (e.g. ``<|image_pad|>`` over and over), or
* a repetition: some stretch with period p <= ``MAX_PERIOD`` (tokens, or whitespace-separated
  words, whichever is worse) repeats at least ``MIN_REPEATS`` times and covers at least
  ``MIN_COVERAGE`` of the output.  A normal answer that ends in "!!!!" or lists "1, 2, 3" is
  not: its repeated stretch is a small part of it.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

MAX_PERIOD = 8
MIN_REPEATS = 4
MIN_COVERAGE = 0.5


@dataclass(frozen=True)
class Repetition:
    period: int  # length of the repeated unit
    start: int  # where the periodic stretch starts
    length: int  # items in the stretch (a multiple of period need not hold: the last unit may be partial)

    @property
    def repeats(self) -> float:
        return self.length / self.period


@dataclass(frozen=True)
class Degeneracy:
    reason: str  # "empty" | "special tokens only" | "repetition"
    detail: str

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


def longest_periodic_run(seq: Sequence, max_period: int = MAX_PERIOD, min_repeats: float = MIN_REPEATS) -> \
        Repetition | None:
    """The longest stretch of ``seq`` with period <= ``max_period`` repeating at least ``min_repeats``
    times (seq[i] == seq[i + p] throughout); the shortest period wins a tie."""
    best = None
    n = len(seq)
    for period in range(1, min(max_period, n // 2) + 1):
        run = 0
        for i in range(n - period):
            run = run + 1 if seq[i] == seq[i + period] else 0
            length = run + period
            if length / period >= min_repeats and (best is None or length > best.length):
                best = Repetition(period, i + period - length + 1, length)
    return best


def _shown(unit: Sequence, decode) -> str:
    text = decode(list(unit)) if decode else " ".join(map(str, unit))
    return repr(text if len(text) <= 40 else text[:37] + "...")


def detect_degenerate(token_ids: Sequence[int], text: str, special_ids: Collection[int] = (),
                      end_ids: Collection[int] = (), decode=None, *, max_period: int = MAX_PERIOD,
                      min_repeats: float = MIN_REPEATS, min_coverage: float = MIN_COVERAGE) -> Degeneracy | None:
    """Why the generation (``token_ids``; ``text`` decoded without special tokens) is degenerate, or None.

    ``end_ids`` (EOS) are stripped from the end first; ``decode`` (ids -> str) only makes the
    message readable.
    """
    ids = list(token_ids)
    while ids and ids[-1] in end_ids:
        ids.pop()
    if not ids:
        return Degeneracy("empty", "no tokens before end-of-sequence")
    special = set(special_ids)
    if all(t in special for t in ids):
        return Degeneracy("special tokens only", f"{len(ids)} special tokens, e.g. {_shown(ids[:1], decode)}")
    if not text.strip():
        return Degeneracy("empty", f"{len(ids)} tokens of whitespace")
    found = []
    tokens = longest_periodic_run(ids, max_period, min_repeats)
    if tokens and tokens.length / len(ids) >= min_coverage:
        unit = ids[tokens.start:tokens.start + tokens.period]
        found.append((tokens.length / len(ids), f"{_shown(unit, decode)} x{tokens.repeats:.0f} "
                                                 f"({tokens.length}/{len(ids)} tokens)"))
    words = text.split()
    by_words = longest_periodic_run(words, max_period, min_repeats)
    if by_words and by_words.length / len(words) >= min_coverage:
        unit = words[by_words.start:by_words.start + by_words.period]
        found.append((by_words.length / len(words), f"{' '.join(unit)!r} x{by_words.repeats:.0f} "
                                                      f"({by_words.length}/{len(words)} words)"))
    if not found:
        return None
    return Degeneracy("repetition", max(found)[1])
