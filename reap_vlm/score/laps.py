"""Seconds of a phase's steps, each from the end of the one before: reap_metadata.json's ``run.load_steps`` and
``run.scoring_steps`` (and each torchrun rank's in ``run.ranks``), where a phase's time goes."""

from __future__ import annotations

import time


class Laps:
    """``lap(name)`` at the end of each step; ``seconds`` by step, ``start`` when the phase began."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, name: str) -> float:
        """The step ``name`` ended now; returns the time."""
        now = time.perf_counter()
        self.seconds[name] = round(now - self.last, 3)
        self.last = now
        return now
