"""Thinking models: a chat template that opens a thinking block at the generation prompt.

A Thinking model (e.g. Qwen3-VL-*-Thinking, whose template ends the generation prompt with ``<think>\\n``) spends
hundreds of tokens thinking before it answers, so with a small ``--max-new-tokens`` its greedy output is all
thinking: box parsing, degenerate detection and --eval accuracy would judge the thinking, not the answer.  By
default the open block is replaced in the prompt by the family's closed, empty block (what the family's templates
write for no-thinking generation), so the model answers at once.  With ``--thinking`` the block stays open, the
budget is ``--thinking-max-new-tokens``, and the answer is what follows the closing marker.  The markers are the
family's data (``ModelFamily.thinking``).
"""

from __future__ import annotations

import dataclasses

from ..calibration.encode import render_text
from ..calibration.files import CalibrationSample
from ..families import ModelFamily
from ..families.base import ThinkingFormat
from ..settings import Settings


def opens_thinking(text: str, fmt: ThinkingFormat | None) -> bool:
    """Whether a rendered prompt ends inside an open thinking block."""
    return fmt is not None and text.rstrip().endswith(fmt.open)


def close_ids(tokenizer, fmt: ThinkingFormat | None) -> list[int]:
    """The closing marker's token ids (none without a thinking format): where a generation's answer begins."""
    return tokenizer.encode(fmt.close, add_special_tokens=False) if fmt else []


def close_thinking(text: str, fmt: ThinkingFormat) -> str:
    """The prompt with its open thinking block replaced by the family's closed, empty one."""
    return text[:text.rstrip().rfind(fmt.open)] + fmt.empty


def generation_budget(settings: Settings) -> int:
    """Tokens generated per prompt: a thinking model allowed to think needs room for its thinking and its answer."""
    return settings.thinking_max_new_tokens if settings.thinking else settings.max_new_tokens


class ThinkingPrompts:
    """A processor's prompts, thinking blocks closed (the default) or left open (``think``).  ``detected`` says
    whether any prompt opened a block, for the report."""

    def __init__(self, processor, family: ModelFamily, think: bool):
        self.processor, self.fmt, self.think = processor, family.thinking, think
        self.detected = False

    def prepare(self, sample: CalibrationSample) -> CalibrationSample:
        """``sample`` with its rendered prompt as text when the template opens a thinking block that is to be
        closed; else ``sample`` itself."""
        if self.fmt is None or sample.text is not None or not sample.add_generation_prompt:
            return sample
        text = render_text(self.processor, sample)
        if not opens_thinking(text, self.fmt):
            return sample
        self.detected = True
        return sample if self.think else dataclasses.replace(sample, text=close_thinking(text, self.fmt))

    def note(self, budget: int | None) -> str | None:
        """The report's line on what was done (``budget``: new tokens per prompt, None where nothing is
        generated), or None when no prompt opened a thinking block."""
        if not self.detected:
            return None
        if budget is None:
            return (f"the chat template opens a thinking block ({self.fmt.open}) at the generation prompt: "
                    + ("left open (--thinking)" if self.think else "closed in the prompt with an empty block")
                    + "; the teacher-forced positions are the prompt's own tokens")
        if self.think:
            return (f"the chat template opens a thinking block ({self.fmt.open}) at the generation prompt: the model "
                    f"thinks (--thinking), up to {budget} new tokens; boxes, degenerate checks and accuracy read "
                    f"the answer after {self.fmt.close}")
        return (f"the chat template opens a thinking block ({self.fmt.open}) at the generation prompt: closed in "
                f"the prompt with an empty block (no-thinking generation), so the {budget} new tokens are the "
                "answer; --thinking lets the model think (--thinking-max-new-tokens)")


def split_thinking(ids: list[int], close_ids: list[int], opened: bool) -> tuple[list[int] | None, list[int] | None]:
    """(thinking ids, answer ids) of a generation.  The thinking ends at the last ``close_ids`` run; without one,
    a generation that began inside an open block (``opened``) is all thinking, with no answer (None), and any
    other is all answer, with no thinking (None)."""
    n = len(close_ids)
    end = next((i for i in range(len(ids) - n, -1, -1) if n and ids[i:i + n] == close_ids), None)
    if end is not None:
        return ids[:end], ids[end + n:]
    return (list(ids), None) if opened else (None, list(ids))
