"""One model at a time through every prompt: the original (unmasked and masked to the kept experts), then the
pruned model on the original's tokens."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..calibration.encode import EncodedSample
from ..checkpoint.loading import load_processor
from ..checkpoint.reader import Checkpoint
from ..settings import Settings
from .accuracy import EvalItem, answer_items
from .degenerate import Degeneracy, detect_degenerate
from .prompts import EvalPrompt
from .runner import Generation, ModelRunner, TeacherForced, vllm_generate
from .thinking import ThinkingPrompts, generation_budget


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class ModelPass:
    """What one model produced for every prompt."""

    encodings: list[EncodedSample]
    generations: list[Generation]
    teacher_forced: list[TeacherForced | None]  # unmasked, on prompt + the original's continuation
    masked: list[TeacherForced | None]  # the original with routing restricted to the kept experts
    seconds: float = 0.0
    same_tokens: list[bool | None] = field(default_factory=list)  # prompt encoded as the original's processor does
    degenerate: Callable[[Generation], Degeneracy | None] | None = None  # judged with this model's tokenizer
    answers: list[str] | None = None  # greedy answers to the evaluation items (--eval)
    thinking_note: str | None = None  # how a chat template's thinking block was handled (ThinkingPrompts.note)


def _judge(runner: ModelRunner) -> Callable[[Generation], Degeneracy | None]:
    tokenizer, special, end = runner.tokenizer, runner.special_ids, runner.end_ids
    return lambda gen: detect_degenerate(*gen.judged(), special, end, tokenizer.decode)


def _generations(path: Path, prompts: list[EvalPrompt], settings: Settings, dtype) -> list[Generation] | None:
    if settings.backend != "vllm":
        return None
    log(f"generating with vLLM: {path} (this generation path has not run in this project's CI, which has no GPU; "
        "what is tested is vLLM's loader on pruned checkpoints: python -m reap_vlm.check.vllm_load)")
    thinking = ThinkingPrompts(load_processor(path), Checkpoint(path).family, settings.thinking)
    return vllm_generate(path, [thinking.prepare(p.sample) for p in prompts],
                         max_new_tokens=generation_budget(settings), dtype=dtype, max_pixels=settings.max_pixels,
                         seed=settings.seed)


def _run_model(label: str, path: Path, prompts: list[EvalPrompt], settings: Settings, device: str, dtype,
               per_prompt, eval_items: list[EvalItem] | None = None, packed: bool = False) -> ModelPass:
    """Load one model, encode and answer every prompt, and let ``per_prompt(runner, i, enc, gen, result)``
    add what this model's side of the comparison needs; then answer the evaluation items, if any.  One model
    is in memory at a time."""
    start = time.perf_counter()
    generated = _generations(path, prompts, settings, dtype)
    budget = generation_budget(settings)
    log(f"loading the {label}: {path}")
    runner = ModelRunner(path, device=device, dtype=dtype, max_pixels=settings.max_pixels, think=settings.thinking,
                         packed=packed)
    result = ModelPass([], [], [], [], degenerate=_judge(runner))
    try:
        result.encodings = [runner.encode(prompt.sample) for prompt in prompts]
        name = label.split()[0]
        result.generations = generated or runner.generate_all(
            result.encodings, budget, progress=lambda done, total: log(f"  {name} generated {done}/{total}"))
        for i, (prompt, enc, gen) in enumerate(zip(prompts, result.encodings, result.generations)):
            per_prompt(runner, i, enc, gen, result)
            log(f"  {name} {i + 1}/{len(prompts)} {prompt.id}: {gen.text[:60]!r}")
        if eval_items:
            result.answers = answer_items(runner, eval_items, budget, progress=lambda done, total:
                                          log(f"  {name} evaluation items {done}/{total}"))
        result.thinking_note = runner.prompts.note(budget)
    finally:
        runner.close()
    result.seconds = time.perf_counter() - start
    return result


def run_original(path: Path, prompts: list[EvalPrompt], settings: Settings, device: str, dtype,
                 keep: dict[int, list[int]] | None, eval_items: list[EvalItem] | None = None,
                 packed: bool = False) -> ModelPass:
    def per_prompt(runner, i, enc, gen, result):
        result.teacher_forced.append(runner.teacher_forced(enc, gen.token_ids))
        result.masked.append(runner.teacher_forced(enc, gen.token_ids, keep=keep, trace=True) if keep else None)

    return _run_model("original", path, prompts, settings, device, dtype, per_prompt, eval_items, packed)


def run_pruned(path: Path, prompts: list[EvalPrompt], settings: Settings, device: str, dtype,
               original: ModelPass | None, trace: bool, eval_items: list[EvalItem] | None = None,
               packed: bool = False) -> ModelPass:
    def per_prompt(runner, i, enc, gen, result):
        if original is None:
            result.same_tokens.append(None)
            result.teacher_forced.append(None)
            return
        # the original's encoding and continuation: both models see exactly the same tokens
        result.same_tokens.append(torch.equal(enc.input_ids, original.encodings[i].input_ids))
        forced = runner.teacher_forced(original.encodings[i], original.generations[i].token_ids, trace=trace)
        if trace:  # this model's MoE blocks on the original's block inputs
            runner.replay(original.masked[i].trace.inputs, forced.trace)
        result.teacher_forced.append(forced)

    return _run_model("pruned model", path, prompts, settings, device, dtype, per_prompt, eval_items, packed)
