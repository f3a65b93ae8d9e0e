"""Driving calibration batches through a whole model with the scoring hooks on, resumably."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..calibration.files import batches, num_batches
from .stats import ExpertStats, ReapObserver

STATE_NAME = "reap_state.pt"


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


@dataclass
class ResumeState:
    path: Path
    fingerprint: str

    def load(self, stats: ExpertStats) -> int:
        """Restore the sums saved by a run with the same fingerprint; return how many batches they cover."""
        if not self.path.is_file():
            return 0
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception:  # a torn or foreign file: start over rather than trust it
            return 0
        if state.get("fingerprint") != self.fingerprint:
            return 0
        stats.load_state_dict(state["stats"])
        return int(state["batches_done"])

    def save(self, stats: ExpertStats, batches_done: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        torch.save({"fingerprint": self.fingerprint, "batches_done": batches_done, "stats": stats.state_dict()},
                   tmp)
        os.replace(tmp, self.path)


def visual_token_mask(input_ids: torch.Tensor, config) -> torch.Tensor:
    ids = [getattr(config, "image_token_id", None), getattr(config, "video_token_id", None)]
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for token in ids:
        if token is not None:
            mask |= input_ids == token
    return mask


def run_batches(model, processor, samples, observer: ReapObserver, *, batch_size: int, max_seq_len: int,
                max_pixels: int, resume: ResumeState | None, checkpoint_every: int, device: str,
                stop_after: int | None = None) -> dict:
    """Run every batch through the model's own forward (no LM head); return counts for the summary.

    ``stop_after`` ends the run early after that many batches (tests use it to simulate a kill).
    """
    total = num_batches(samples, batch_size)
    done = resume.load(observer.stats) if resume else 0
    base = observer.family.multimodal_model(model)
    tokens = 0
    start = time.perf_counter()
    bar = tqdm(total=total, initial=done, desc="REAP scoring", unit="batch", dynamic_ncols=True)
    with observer.attached(observer.family.moe_blocks(model)), torch.inference_mode():
        remaining = samples[done * batch_size:]  # batches already summed are not even encoded again
        for i, batch in enumerate(batches(processor, remaining, batch_size, max_seq_len, max_pixels), start=done):
            batch = {k: v.to(device) for k, v in batch.items()}
            observer.set_masks(batch["attention_mask"], visual_token_mask(batch["input_ids"], model.config))
            base(**batch, use_cache=False)
            tokens += int(batch["attention_mask"].sum())
            bar.update(1)
            bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - start, 1e-9):.0f}")
            completed = i + 1
            if resume and (completed % checkpoint_every == 0 or completed == total):
                resume.save(observer.stats, completed)
            if stop_after is not None and completed - done >= stop_after:
                break
    bar.close()
    return {"batches": total, "resumed_from": done, "tokens_this_run": tokens,
            "seconds": time.perf_counter() - start}
