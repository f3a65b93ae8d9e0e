"""The whole-model engine: calibration batches through the loaded model with the scoring hooks on, resumably; and
the choice between it and the layer-wise engine."""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from ..calibration.ahead import BatchStream
from ..calibration.encode import num_batches, to_model
from ..checkpoint.loading import AUTO_MEMORY_FRACTION, free_memory_bytes
from ..checkpoint.reader import Checkpoint
from ..errors import ReapError
from ..inference import inference
from ..settings import ENGINES
from .hooks import ReapObserver, TokenMasks
from .laps import Laps
from .resume import ResumeState, last_batch


def model_bytes(ckpt: Checkpoint) -> int:
    """Memory the whole model takes once loaded: the shards' size, scaled up for quantized weights
    (dequantized to 16 bits; an upper bound, since norms and the vision tower stay as stored)."""
    total = sum((ckpt.path / shard).stat().st_size for shard in ckpt.shards)
    if ckpt.quantization:
        total = total * 16 // ckpt.quant_format.weight_bits
    return int(total)


def choose_engine(ckpt: Checkpoint, device: str, requested: str, *, free_bytes: int | None = None) -> str:
    """"model" (whole model in memory, ``engine.run_batches``) or "layerwise" (``layerwise.run_layerwise``).

    ``requested`` "model" / "layerwise" is returned as is; "auto" picks layer-wise when the model's
    bytes exceed 85% of the free memory of ``device`` (GPU memory on cuda, available RAM on cpu;
    ``free_bytes`` overrides the measurement)."""
    if requested not in ENGINES:
        raise ReapError(f"--engine {requested!r} is not one of {', '.join(ENGINES)}")
    if requested != "auto":
        return requested
    if free_bytes is None:
        free_bytes = free_memory_bytes(device)
    return "layerwise" if model_bytes(ckpt) > AUTO_MEMORY_FRACTION * free_bytes else "model"


def run_batches(model, processor, samples, observer: ReapObserver, *, batch_size: int, max_seq_len: int,
                max_pixels: int, resume: ResumeState | None, checkpoint_every: int, device: str,
                encode_workers: int = 0, stream: BatchStream | None = None) -> dict:
    """Run every batch through the model's own forward (no LM head); return counts for the summary.

    Batches come from ``stream`` (one started before the model loaded, over the samples not yet summed) or
    are encoded ahead here by ``encode_workers`` threads; on cuda in pinned memory, copied without blocking."""
    total = num_batches(samples, batch_size)
    done = resume.load(observer.stats) if resume else 0
    end = last_batch(done, total)
    family = observer.family
    base = family.multimodal_model(model)
    if stream is None:
        remaining = samples[done * batch_size:]  # batches already summed are not even encoded again
        stream = BatchStream(processor, remaining, batch_size, max_seq_len, max_pixels, family,
                             workers=encode_workers, pin=torch.device(device).type == "cuda",
                             pixel_dtype=model.dtype, model_config=model.config.to_dict())
    if len(stream) != total - done:
        raise ValueError(f"the batch stream holds {len(stream)} batches, {total - done} remain")
    tokens = positions = 0
    steps, first = Laps(), FirstBatch(device, model)
    start = steps.start
    with stream, tqdm(total=total, initial=done, desc="REAP scoring", unit="batch", dynamic_ncols=True) as bar, \
            observer.attached(family.moe_blocks(model)), inference():
        for i, batch in enumerate(stream, start=done):
            # masks and counts from the host copy: no device sync between batches
            masks = TokenMasks.of(batch["attention_mask"], family.visual_token_mask(batch["input_ids"], model.config))
            batch = to_model(batch, device, model.dtype, non_blocking=True, host=family.host_side(batch, model))
            observer.use_masks(masks.to(device))
            base(**batch, use_cache=False)
            if i == done:
                steps.lap("first batch")  # taken from the stream and its kernels launched (each loaded at its first)
                first.ended()
            tokens += masks.n_valid
            positions += batch["attention_mask"].numel()
            bar.update(1)
            bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - start, 1e-9):.0f}")
            completed = i + 1
            if resume and (completed % checkpoint_every == 0 or completed == total):
                resume.save(observer.stats, completed)
            if completed >= end:
                break
        steps.lap("other batches")
    steps.lap("stream closed")  # the encoding workers ended, the hooks off
    return {"batches": total, "resumed_from": done, "tokens_this_run": tokens,
            "seconds": time.perf_counter() - start, **stream.report(positions, tokens),
            "scoring_steps": steps.seconds, **first.report()}


class FirstBatch:
    """On one GPU, when the first batch's work ended on the device, from the loop's start
    (``run.first_batch_device_seconds``): with ``run.scoring_steps``' host figure, whether a fresh process's first
    batch waits for the host (kernels loaded at their first launch) or for the device.  Read after the loop, when
    its events have long completed: no sync between batches.  Left out for a model spread over GPUs (its first
    layers' GPU would not say when the batch ended)."""

    def __init__(self, device: str, model):
        spread = len(set((getattr(model, "hf_device_map", None) or {0: 0}).values())) > 1
        self.stream = torch.cuda.current_stream(device) if torch.device(device).type == "cuda" and not spread else None
        self.events, self.recorded = [], False
        if self.stream is not None:
            self.events = [torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)]
            self.events[0].record(self.stream)

    def ended(self) -> None:
        if self.events:
            self.events[1].record(self.stream)
            self.recorded = True

    def report(self) -> dict:
        if not self.recorded:
            return {}
        self.events[1].synchronize()
        return {"first_batch_device_seconds": round(self.events[0].elapsed_time(self.events[1]) / 1e3, 3)}
