"""The layer-wise check (--check-mode layerwise): the surgery check and the teacher-forced agreement for models that
fit nowhere whole, streamed one decoder layer of each model at a time.

The scoring engine's machinery (``score.layerwise``): both models are meta skeletons; each one's pre-layer part
(embeddings, vision tower) runs every prompt up to decoder layer 0 and is dropped; then for every decoder layer
the original's layer is read from disk (``LayerLoader``, one layer ahead), every prompt's hidden states pass
through it twice, unmasked and with routing restricted to the kept experts (capturing and replaying the MoE block
inputs at the traced tokens, as ``runner.ModelRunner.teacher_forced`` does), and it is dropped; then the pruned
model's layer, on its own hidden states, its MoE block replayed on the original's inputs.  The hidden states of
all prompts stay on the device.  At the end each model's head (final norm, LM head) turns them into logits.

Per prompt this is what the whole-model check computes on the prompt's own tokens, with the same batches (one
prompt each), the same modules and the same kernels, so ``job.compare_passes`` compares it unchanged.  What it
cannot do is generate (each new token would read every layer from disk again): the teacher-forced positions are
the prompt's last text tokens, and generation, boxes and --eval accuracy are skipped (the report says so).
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..calibration.encode import EncodedSample, collate, encode_sample, to_model
from ..checkpoint.loading import load_processor
from ..checkpoint.reader import Checkpoint
from ..inference import inference
from ..score.layer_loader import LayerLoader
from ..score.layerwise import BatchState, LayerwiseModel
from ..settings import Settings
from .inputs import Inputs
from .masked_routing import masked_routing
from .passes import ModelPass, log
from .prompts import EvalPrompt
from .runner import (
    MAX_COMPARED_POSITIONS,
    PROMPT_MAX_TOKENS,
    LayerTrace,
    TeacherForced,
    capture_moe_inputs,
    replay_moe,
    text_positions,
    trace_positions,
)
from .thinking import ThinkingPrompts

NO_GENERATION = ("layer-wise check: generation needs the whole model (each new token would read every layer from "
                 "disk again), so generation, boxes and --eval accuracy were not checked; checked instead: surgery "
                 "(every MoE layer replayed, final logits against the masked original) and teacher-forced top-1 "
                 "agreement / KL with the original on the prompts' own tokens")


@dataclass
class _Stream:
    """One prompt through one model: its state between layers and what is taken from it."""

    state: BatchState
    trace: LayerTrace | None = None  # MoE block inputs captured (and, on the original, replayed) at traced tokens
    logits: torch.Tensor | None = None


@dataclass
class _Prompt:
    enc: EncodedSample
    positions: list[int]  # compared positions (the last text positions)
    window: int  # logits kept: the last ``window`` positions
    traced: torch.Tensor  # positions whose MoE block inputs are captured
    unmasked: _Stream | None = None  # the original
    masked: _Stream | None = None  # the original, routing restricted to the kept experts
    pruned: _Stream | None = None


@dataclass
class LayerwiseResult:
    original: ModelPass
    pruned: ModelPass
    seconds_per_layer: list[float] = field(default_factory=list)
    thinking_note: str | None = None


def _prepare(processor, family, settings: Settings, prompts: list[EvalPrompt]) -> tuple[list[EncodedSample],
                                                                                         ThinkingPrompts]:
    thinking = ThinkingPrompts(processor, family, settings.thinking)
    return [encode_sample(processor, thinking.prepare(p.sample), PROMPT_MAX_TOKENS, settings.max_pixels, family)
            for p in prompts], thinking


def _capture(lw: LayerwiseModel, encoded: list[EncodedSample]) -> list[BatchState]:
    """Every prompt (a batch of one, as the whole-model check runs it) up to decoder layer 0."""
    lw.load_prelayer()
    try:
        return [lw.capture(to_model(collate([enc], 0), lw.device, lw.dtype)) for enc in encoded]
    finally:
        lw.release_prelayer()


def _through_layer(lw: LayerwiseModel, layer, i: int, stream: _Stream, traced: torch.Tensor,
                   keep: dict[int, list[int]] | None = None, replay_on: dict[int, torch.Tensor] | None = None) -> None:
    """``stream`` through decoder layer ``i`` (routing restricted to ``keep`` when given), its MoE block inputs at
    ``traced`` captured when it has a trace; then the MoE block replayed on the original's inputs ``replay_on``
    (the pruned model), or on its own (the masked original)."""
    family = lw.family
    restrict = masked_routing(lw.model, family, keep, layers=(i,)) if keep else nullcontext()
    capture = capture_moe_inputs(lw.model, family, traced) if stream.trace is not None else nullcontext()
    with restrict, capture as captured:
        stream.state.hidden = lw.forward_layer(layer, i, stream.state)
    if stream.trace is None or not captured:
        return
    stream.trace.inputs.update(captured)
    rows = {i: replay_on[i]} if replay_on is not None else captured
    router, outputs = replay_moe(lw.model, family, rows, keep)
    stream.trace.router.update(router)
    stream.trace.outputs.update(outputs)


def _stream_layers(models: tuple[LayerwiseModel, LayerwiseModel], loaders: tuple[LayerLoader, LayerLoader],
                   work: list[_Prompt], keep: dict[int, list[int]] | None) -> list[float]:
    """Every prompt through every decoder layer: the original's layer i, then the pruned model's; returns the
    seconds each layer took (both models)."""
    original, pruned = models
    count = len(original.layers)
    if len(pruned.layers) != count:
        raise ValueError(f"the original has {count} decoder layers, the pruned model {len(pruned.layers)}")
    seconds = []
    for loader in loaders:
        loader.request(0)
    for i in tqdm(range(count), desc="check layer-wise", unit="layer", dynamic_ncols=True, leave=False):
        start = time.perf_counter()
        for lw, loader in zip(models, loaders):
            if i + 1 < count:
                loader.request(i + 1)  # queued behind layer i's read
            layer = lw.load_layer(i, loader.take(i))
            for p in work:
                if lw is original:
                    _through_layer(lw, layer, i, p.unmasked, p.traced)
                    if p.masked is not None:
                        _through_layer(lw, layer, i, p.masked, p.traced, keep=keep)
                else:
                    replay_on = p.masked.trace.inputs if p.masked is not None else None
                    _through_layer(lw, layer, i, p.pruned, p.traced, replay_on=replay_on)
            if lw.device.type == "cuda":
                torch.cuda.current_stream(lw.device).synchronize()
            lw.release_layer(i)
        seconds.append(time.perf_counter() - start)
    return seconds


def _head(lw: LayerwiseModel, work: list[_Prompt], streams: tuple[str, ...]) -> None:
    """Each named stream's logits at its compared positions, through the model's own final norm and LM head."""
    lw.load_head()
    try:
        for p in work:
            length = p.enc.input_ids.shape[0]
            rows = torch.tensor([q - (length - p.window) for q in p.positions], dtype=torch.long)
            for name in streams:
                stream = getattr(p, name)
                if stream is not None:
                    logits = lw.family.head_logits(lw.model, stream.state.hidden, p.window)[0]
                    stream.logits = logits[rows.to(logits.device)].detach().cpu()
                    stream.state = None  # its hidden states are no longer needed
    finally:
        lw.release_head()


def _forced(stream: _Stream | None, positions: list[int]) -> TeacherForced | None:
    return None if stream is None else TeacherForced(positions, stream.logits, stream.trace)


def run_layerwise_check(inputs: Inputs, prompts: list[EvalPrompt], settings: Settings, device: str,
                        dtype: torch.dtype) -> LayerwiseResult:
    """The original's (unmasked and masked) and the pruned model's teacher-forced passes over every prompt,
    one decoder layer of each model in memory at a time; ``job.compare_passes`` reads them as it reads the
    whole-model passes."""
    start = time.perf_counter()
    keep = inputs.keep
    trace = keep is not None
    paths = (Path(inputs.reference), Path(inputs.pruned.path))
    log(f"layer-wise check: streaming {paths[0]} and {paths[1]} one decoder layer at a time")
    models = tuple(LayerwiseModel(Checkpoint(p), device, dtype) for p in paths)
    original, pruned = models
    processors = [load_processor(p) for p in paths]
    encoded, thinking = _prepare(processors[0], original.family, settings, prompts)
    theirs, _ = _prepare(processors[1], pruned.family, settings, prompts)
    visual = original.family.visual_token_ids(original.model.config)
    work = []
    for enc in encoded:
        window = min(enc.input_ids.shape[0], MAX_COMPARED_POSITIONS)
        work.append(_Prompt(enc, text_positions(enc.input_ids, window, visual), window,
                            trace_positions(enc.input_ids.shape[0])))
    with inference():
        for p, state in zip(work, _capture(original, encoded)):
            p.unmasked = _Stream(state)
            if trace:
                p.masked = _Stream(dataclasses.replace(state, hidden=state.hidden.clone()), LayerTrace())
        for p, state in zip(work, _capture(pruned, encoded)):  # the original's tokens, the pruned model's weights
            p.pruned = _Stream(state, LayerTrace() if trace else None)
        loaders = tuple(LayerLoader(lw.ckpt, lw.layer_keys, lw.device, dtype, "host") for lw in models)
        try:
            seconds = _stream_layers(models, loaders, work, keep)
        finally:
            for loader in loaders:
                loader.close()
        _head(original, work, ("unmasked", "masked"))
        _head(pruned, work, ("pruned",))
    orig_pass = ModelPass(encoded, [], [_forced(p.unmasked, p.positions) for p in work],
                          [_forced(p.masked, p.positions) for p in work])
    pruned_pass = ModelPass(encoded, [], [_forced(p.pruned, p.positions) for p in work], [],
                            same_tokens=[torch.equal(a.input_ids, b.input_ids) for a, b in zip(encoded, theirs)])
    orig_pass.seconds = pruned_pass.seconds = time.perf_counter() - start
    return LayerwiseResult(orig_pass, pruned_pass, seconds, thinking.note(None))
