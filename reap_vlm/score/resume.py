"""Resuming a killed scoring run: the run's identity (fingerprint of every input) and the saved float64 sums."""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint.fsutil import atomic_save
from . import triton_experts
from .stats import ExpertStats

STATE_NAME = "reap_state.pt"

# The tests' kill-switch: a run stops after this many batches of its own, its state saved and nothing final
# written, as if killed there.  Set through ``stop_after``; read only by ``last_batch``.
_STOP_AFTER: int | None = None


@contextmanager
def stop_after(batches: int) -> Iterator[None]:
    """Within the block, every scoring run stops after ``batches`` batches of its own (a simulated kill)."""
    global _STOP_AFTER
    previous, _STOP_AFTER = _STOP_AFTER, batches
    try:
        yield
    finally:
        _STOP_AFTER = previous


def last_batch(done: int, total: int) -> int:
    """Where a run that starts after ``done`` of ``total`` batches ends: ``total``, unless ``stop_after``."""
    return total if _STOP_AFTER is None else min(total, done + _STOP_AFTER)


def fingerprint(**parts) -> str:
    """Identity of a scoring run: same fingerprint, same batches, same sums."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def files_signature(paths) -> list:
    """(name, size, mtime) of files whose content changes the batches (images, processor files), cheap
    enough for hundreds of images; a rewritten file under the same name changes it."""
    out = []
    for path in sorted({Path(p) for p in paths}):
        stat = path.stat() if path.is_file() else None
        out.append((str(path), stat.st_size if stat else None, stat.st_mtime_ns if stat else None))
    return out


def weights_signature(folder: Path, shards: list[str]) -> list:
    """(name, size, mtime, digest of the safetensors header) of every shard: other weights under the same names
    (a re-download, a fine-tune copied over) are another run, never a resumed one."""
    out = []
    for name in sorted(shards):
        path = Path(folder) / name
        stat = path.stat()
        with open(path, "rb") as handle:
            head = handle.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else 0
            digest = hashlib.sha256(head + handle.read(min(length, 100 << 20))).hexdigest()
        out.append((name, stat.st_size, stat.st_mtime_ns, digest))
    return out


@dataclass
class ResumeState:
    path: Path
    fingerprint: str
    # The file is read once until this run saves: reap.py's job asks before its engine does, and a state of
    # another run is said once.
    _read: bool = field(default=False, init=False, repr=False, compare=False)
    _state: dict | None = field(default=None, init=False, repr=False, compare=False)  # None: nothing to resume

    def load(self, stats: ExpertStats) -> int:
        """Restore the sums saved by a run with the same fingerprint; return how many batches they cover."""
        if not self._read:
            self._state, self._read = self._read_file(), True
        if self._state is None:
            return 0
        try:
            stats.load_state_dict(self._state["stats"])
        except KeyError:  # an older version's sums (no maxima): start over
            return 0
        return int(self._state["batches_done"])

    def _read_file(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception:  # a torn or foreign file: start over rather than trust it
            return None
        if state.get("fingerprint") != self.fingerprint:
            warnings.warn(f"{self.path} was saved by a run with other inputs, settings or reap-vlm version: "
                          "starting over (it is replaced as this run saves)", stacklevel=3)
            return None
        return state

    def saved_tuning(self) -> dict:
        """The timed kernel choices the loaded state's run made (``triton_experts.tuning``); {} when none."""
        return (self._state or {}).get("kernels", {})

    def save(self, stats: ExpertStats, batches_done: int) -> None:
        """The sums after ``batches_done`` batches, with the kernel choices timed so far: a resumed run takes them
        instead of timing again, so its norms round as the uninterrupted run's do."""
        state = {"fingerprint": self.fingerprint, "batches_done": batches_done, "stats": stats.state_dict(),
                 "kernels": triton_experts.tuning()}
        atomic_save(self.path, lambda tmp: torch.save(state, tmp))
        self._read, self._state = False, None
