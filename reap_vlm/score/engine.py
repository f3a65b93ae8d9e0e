"""Driving calibration batches through a whole model with the scoring hooks on, resumably."""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from ..calibration.encode import batches, num_batches
from .hooks import ReapObserver
from .resume import ResumeState


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
