"""Running one model for the check: encode prompts, greedy generation, teacher-forced logits, MoE replays.

One model is in memory at a time (the original first, then the pruned one), so checking a
235B model needs no more memory than running it.  What the comparisons need is kept on the
CPU: logits at the last ``MAX_COMPARED_POSITIONS`` text positions of each prompt, and, at
``TRACE_POSITIONS`` positions spread over each prompt (image tokens included), the input of
every MoE block.  Those inputs are then *replayed*: each MoE block of the original (routing
restricted to the kept experts) and of the pruned model is run on the very same input rows,
so every layer is checked on its own, free of the rounding that two full forwards accumulate.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..calibration.encode import EncodedSample, collate, encode_sample, to_model
from ..calibration.files import CalibrationSample
from ..checkpoint.fsutil import read_json
from ..checkpoint.loading import load_model, load_processor, tokenizer_of
from ..checkpoint.reader import Checkpoint
from ..inference import inference
from .masked_routing import masked_routing
from .thinking import ThinkingPrompts, close_ids, opens_thinking, split_thinking

PROMPT_MAX_TOKENS = 8192  # prompts longer than this are cut (an image is never split; see calibration)
MAX_COMPARED_POSITIONS = 256  # logits kept per prompt: the last text positions of prompt + continuation
GENERATION_BATCH = 32  # prompts decoded together (left-padded): a 235B AWQ decode step costs ~ the same for 1 or 8
TRACE_POSITIONS = 16  # tokens per prompt whose MoE block inputs are captured and replayed


@dataclass
class Generation:
    """A greedy continuation, cut at the first end-of-sequence token."""

    token_ids: list[int]
    ended: bool  # stopped at an end-of-sequence token (else max_new_tokens was reached)
    text: str  # the answer (after the thinking block, if any), decoded without special tokens
    raw: str  # everything, decoded with special tokens (for the report)
    thinking: str | None = None  # the thinking block's text; None: the model did not think
    answer_ids: list[int] | None = None  # the answer's tokens; None: all of token_ids

    @property
    def unanswered(self) -> bool:
        """The model thought and gave no answer (the thinking never closed, or nothing followed it)."""
        return self.thinking is not None and not self.answer_ids

    def judged(self) -> tuple[list[int], str]:
        """What degenerate detection reads: the answer, or the thinking when no answer came (a thinking loop
        that never closes is the failure to catch there)."""
        if self.unanswered:
            return self.token_ids, self.thinking
        return (self.token_ids if self.answer_ids is None else self.answer_ids), self.text


@dataclass
class LayerTrace:
    """Per MoE layer at the traced tokens: the block input the model itself computed [P, H], and the
    router logits [P, E] and block output [P, H] when the block is replayed on ``replayed_on`` inputs."""

    inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    router: dict[int, torch.Tensor] = field(default_factory=dict)
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class TeacherForced:
    positions: list[int]  # absolute positions in prompt + continuation (text tokens only)
    logits: torch.Tensor  # [P, V] on the CPU, as the model computed them (its dtype)
    trace: LayerTrace | None = None


def special_token_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids.update(int(i) for i, tok in decoder.items() if getattr(tok, "special", False))
    return ids


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def make_generation(ids: list[int], tokenizer, end_ids: set[int], close_ids: list[int] | None = None,
                    opened: bool = False) -> Generation:
    """The continuation cut at the first end token, split at the thinking block's ``close_ids`` (``opened``: the
    prompt left a thinking block open, so the continuation starts inside it)."""
    cut = next((i for i, t in enumerate(ids) if t in end_ids), None)
    kept = ids if cut is None else ids[:cut]
    raw = tokenizer.decode(kept, skip_special_tokens=False)
    thought, answer = split_thinking(kept, close_ids or [], opened)
    if thought is None:
        return Generation(kept, cut is not None, tokenizer.decode(kept, skip_special_tokens=True), raw)
    answer = answer or []  # its text without the newlines after the close marker (as the templates strip them)
    return Generation(kept, cut is not None, tokenizer.decode(answer, skip_special_tokens=True).lstrip("\n"), raw,
                      thinking=tokenizer.decode(thought, skip_special_tokens=True), answer_ids=answer)


def text_positions(input_ids: torch.Tensor, limit: int, visual_ids: set[int]) -> list[int]:
    """The last ``limit`` positions whose token is not an image/video placeholder."""
    ids = input_ids.tolist()
    start = max(0, len(ids) - limit)
    return [i for i in range(start, len(ids)) if ids[i] not in visual_ids]


def trace_positions(length: int, count: int = TRACE_POSITIONS) -> torch.Tensor:
    """``count`` positions spread evenly over a sequence of ``length`` (first and last included)."""
    return torch.linspace(0, length - 1, min(count, length)).round().long().unique()


@contextmanager
def capture_moe_inputs(model, family, positions: torch.Tensor) -> Iterator[dict[int, torch.Tensor]]:
    """Every MoE block's input rows at ``positions`` (batch of one), on the CPU in the model's dtype."""
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for layer, block in family.moe_blocks(model):
        def hook(module, args, kwargs, layer=layer):
            hidden = args[0] if args else kwargs["hidden_states"]
            flat = hidden.reshape(-1, hidden.shape[-1])
            captured[layer] = flat[positions.to(flat.device)].detach().cpu()

        handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def replay_moe(model, family, inputs: dict[int, torch.Tensor], keep: dict[int, list[int]] | None = None) -> \
        tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Run each MoE block (routing restricted to ``keep`` when given) on ``inputs[layer]`` rows alone:
    (router logits [P, E], block output [P, H]) per layer, float32 on the CPU."""
    router_logits: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    with inference(), (masked_routing(model, family, keep, layers=inputs) if keep else _nothing()):
        for layer, block in family.moe_blocks(model):
            if layer not in inputs:
                continue
            param = next(block.parameters())  # a model spread over GPUs keeps each block on its own
            seen = {}

            def hook(module, args, output, seen=seen):
                seen["logits"] = family.router_logits(output)

            handle = family.router_of(block).register_forward_hook(hook)
            try:
                out = block(inputs[layer].to(device=param.device, dtype=param.dtype).unsqueeze(0))
            finally:
                handle.remove()
            out = out[0] if isinstance(out, tuple) else out
            outputs[layer] = out.reshape(-1, out.shape[-1]).float().cpu()
            router_logits[layer] = seen["logits"].reshape(-1, seen["logits"].shape[-1]).float().cpu()
    return router_logits, outputs


class ModelRunner:
    """A checkpoint loaded for the check, with its own processor."""

    def __init__(self, path: Path, *, device: str, dtype: torch.dtype, max_pixels: int = 0, think: bool = False,
                 packed: bool = False):
        self.path = Path(path)
        self.ckpt = Checkpoint(self.path)
        self.family = self.ckpt.family
        self.device, self.dtype, self.max_pixels = device, dtype, max_pixels
        self.processor = load_processor(self.path)
        self.tokenizer = tokenizer_of(self.processor)
        self.prompts = ThinkingPrompts(self.processor, self.family, think)
        self.close_ids = close_ids(self.tokenizer, self.family.thinking)
        # spread: over all GPUs; packed: quantized weights kept as stored (--check-mode packed)
        self.model = load_model(self.path, dtype=dtype, device=device, spread=True, packed=packed)
        config = self.model.config
        self.visual_ids = self.family.visual_token_ids(config)
        self.end_ids = set(_as_list(getattr(self.model.generation_config, "eos_token_id", None)))
        self.end_ids.update(_as_list(self.tokenizer.eos_token_id))
        self.special_ids = special_token_ids(self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else next(iter(sorted(self.end_ids)), 0))

    def close(self) -> None:
        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def encode(self, sample: CalibrationSample) -> EncodedSample:
        return encode_sample(self.processor, self.prompts.prepare(sample), PROMPT_MAX_TOKENS, self.max_pixels,
                             self.family)

    def opens_thinking(self, enc: EncodedSample) -> bool:
        """Whether the encoded prompt ends inside an open thinking block (a Thinking template, --thinking)."""
        return opens_thinking(self.tokenizer.decode(enc.input_ids[-8:].tolist()), self.family.thinking)

    def _generation(self, ids: list[int], enc: EncodedSample) -> Generation:
        return make_generation(ids, self.tokenizer, self.end_ids, self.close_ids, self.opens_thinking(enc))

    def _batch(self, enc: EncodedSample, continuation: list[int] | None = None) -> dict[str, torch.Tensor]:
        """One padded batch of prompt + ``continuation``.  A continuation is cut before any image/video
        placeholder token a (broken) model generated: fed back, it would ask for image features that
        do not exist."""
        cut = next((i for i, t in enumerate(continuation or []) if t in self.visual_ids), None)
        if cut is not None:
            continuation = continuation[:cut]
        if continuation:
            extra = torch.tensor(continuation, dtype=enc.input_ids.dtype)
            mm = enc.mm_token_type_ids
            enc = EncodedSample(torch.cat([enc.input_ids, extra]), enc.pixel_values, enc.image_grid_thw,
                                None if mm is None else torch.cat([mm, torch.zeros(len(continuation), dtype=mm.dtype)]))
        batch = collate([enc], self.pad_id)
        return to_model(batch, self.device, self.dtype)

    def generate(self, enc: EncodedSample, max_new_tokens: int) -> Generation:
        """Greedy decoding with no sampling, penalties or length tricks, whatever generation_config.json says."""
        from transformers import GenerationConfig

        config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                  eos_token_id=sorted(self.end_ids) or None, pad_token_id=self.pad_id)
        batch = self._batch(enc)
        with inference():
            out = self.model.generate(**batch, generation_config=config)
        return self._generation(out[0, batch["input_ids"].shape[1]:].tolist(), enc)

    def generate_batch(self, encoded: list[EncodedSample], max_new_tokens: int) -> list[Generation]:
        """Greedy decoding of several prompts at once (left-padded), as ``generate`` does for one."""
        from transformers import GenerationConfig

        config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                  eos_token_id=sorted(self.end_ids) or None, pad_token_id=self.pad_id)
        batch = to_model(collate(encoded, self.pad_id, left=True), self.device, self.dtype)
        with inference():
            out = self.model.generate(**batch, generation_config=config)
        width = batch["input_ids"].shape[1]
        return [self._generation(row[width:].tolist(), enc) for row, enc in zip(out, encoded)]

    def generate_all(self, encoded: list[EncodedSample], max_new_tokens: int, batch_size: int = GENERATION_BATCH,
                     progress=None) -> list[Generation]:
        """Greedy answers to every prompt, in the prompts' order; prompts of similar length (images apart) are
        decoded together so that little padding is decoded.  Batching changes the arithmetic's order, not the
        method (a test shows the answers equal one-at-a-time ``generate``'s)."""
        order = sorted(range(len(encoded)), key=lambda i: (encoded[i].pixel_values is not None,
                                                           encoded[i].input_ids.numel()))
        answers: list[Generation | None] = [None] * len(encoded)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            for i, generation in zip(chunk, self.generate_batch([encoded[i] for i in chunk], max_new_tokens)):
                answers[i] = generation
            if progress is not None:
                progress(min(start + batch_size, len(order)), len(order))
        return answers

    def teacher_forced(self, enc: EncodedSample, continuation: list[int], *,
                       keep: dict[int, list[int]] | None = None, trace: bool = False) -> TeacherForced:
        """Logits at the last text positions of prompt + ``continuation``, with routing restricted to
        ``keep`` when given.  With ``trace``, the MoE blocks' inputs at ``trace_positions`` are captured
        and replayed (under the same routing restriction)."""
        batch = self._batch(enc, continuation)
        length = batch["input_ids"].shape[1]
        window = min(length, MAX_COMPARED_POSITIONS)
        positions = text_positions(batch["input_ids"][0].cpu(), window, self.visual_ids)
        traced = trace_positions(length)
        with inference(), (masked_routing(self.model, self.family, keep) if keep else _nothing()), \
                (capture_moe_inputs(self.model, self.family, traced) if trace else _nothing()) as captured:
            logits = self.model(**batch, use_cache=False, logits_to_keep=window).logits[0]
        rows = torch.tensor([p - (length - window) for p in positions], dtype=torch.long, device=logits.device)
        result = TeacherForced(positions, logits[rows].detach().cpu())
        if trace:
            result.trace = LayerTrace(captured)
            if keep is not None:  # the original: replay on its own inputs, as the reference for every layer
                result.trace.router, result.trace.outputs = replay_moe(self.model, self.family, captured, keep)
        return result

    def replay(self, inputs: dict[int, torch.Tensor], trace: LayerTrace | None = None) -> LayerTrace:
        """This model's MoE blocks run on ``inputs`` (the original's block inputs); ``trace`` keeps the
        inputs this model computed itself, for the diagnosis."""
        trace = trace or LayerTrace()
        trace.router, trace.outputs = replay_moe(self.model, self.family, inputs)
        return trace


@contextmanager
def _nothing():
    yield None


# ----------------------------------------------------------------------------------------------- vLLM

def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def vllm_generate(path: Path, samples: list[CalibrationSample], *, max_new_tokens: int, dtype: torch.dtype,
                  max_pixels: int, seed: int) -> list[Generation]:
    """Greedy generations from vLLM (the engine is torn down before returning, to free the GPU for the
    transformers pass that computes logits), split at the thinking block as the transformers path splits them.
    Only used with --backend vllm."""
    from vllm import LLM, SamplingParams

    from ..calibration.encode import open_image, render_text

    processor = load_processor(path)
    tokenizer = tokenizer_of(processor)
    thinking = Checkpoint(path).family.thinking
    end_ids = set(_as_list(tokenizer.eos_token_id))
    generation_config = Path(path) / "generation_config.json"
    if generation_config.is_file():
        end_ids.update(_as_list(read_json(generation_config, "generation config", expect=dict).get("eos_token_id")))
    requests = []
    for sample in samples:
        request = {"prompt": render_text(processor, sample)}
        if sample.images:
            request["multi_modal_data"] = {"image": [open_image(p, max_pixels) for p in sample.images]}
        requests.append(request)
    most_images = max([len(s.images) for s in samples] + [1])
    llm = LLM(model=str(path), dtype=str(dtype).removeprefix("torch."), seed=seed, enforce_eager=True,
              limit_mm_per_prompt={"image": most_images})
    try:
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=sorted(end_ids))
        outputs = llm.generate(requests, params, use_tqdm=False)
        ids = [list(out.outputs[0].token_ids) for out in outputs]
    finally:
        del llm
        try:
            from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

            destroy_model_parallel()
            destroy_distributed_environment()
        except Exception:  # noqa: BLE001 - best effort: the names moved between vLLM releases
            pass
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    close = close_ids(tokenizer, thinking)
    return [make_generation(i, tokenizer, end_ids, close, opens_thinking(r["prompt"], thinking))
            for i, r in zip(ids, requests)]
