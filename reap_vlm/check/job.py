"""test_pruned_model.py's work: is the pruned model faithful to the original, and does it still answer?

Checks (each on or off by what is available; exit 0 only when every enabled one passes):

1. surgery: the pruned model equals the original with the pruned experts' router logits at
   -inf (kept ids from pruning_record.json, else reap_metadata.json): every MoE block replayed
   on identical inputs, and the final logits, within the dtype's tolerances (``compare``);
   a failure names the layer and the part (router rows, experts, or non-expert weights).
2. generation: greedy outputs on held-out prompts are not degenerate (``degenerate``); prompts
   from --calibration skip the items reap.py scored (reap_metadata.json's calibration_samples), and
   any that had to be reused are counted in the verdict.
   With the original, an output the original also degenerates on does not count (random or
   weak models degenerate by themselves); without it, every degenerate output fails.
3. tokenizer (with the original): the pruned folder's processor encodes prompts identically.
4. optional thresholds: --min-top1-agreement (next-token top-1 agreement with the unmasked
   original) and --min-bbox-iou (mean IoU of the pruned model's boxes against the original's).

Reported either way: mean KL(original || pruned), generation exact-match rate, valid-box rates,
bbox pictures.  One model is loaded at a time: the original, then the pruned one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..checkpoint.loading import resolve_device, resolve_dtype
from ..errors import ConfigError
from ..outputs import output_lock
from ..settings import Settings
from .accuracy import accuracy_section, load_eval_items, ratio_check
from .checks import _bbox_rows, _generation_check, _surgery_check, _threshold_check, bbox_summary
from .compare import (
    Agreement,
    LayerCheck,
    LogitDiff,
    Tolerance,
    agreement,
    compare_layers,
    compare_logits,
    first_input_divergence,
    tolerance_for,
)
from .inputs import Inputs, resolve_inputs
from .layerwise import NO_GENERATION, run_layerwise_check
from .mode import CheckMode, choose_check_mode
from .options import TEST_OPTIONS, flag_of
from .passes import ModelPass, log, run_original, run_pruned
from .prompts import EvalPrompt, choose_prompts
from .report import Check, fmt, verdict, write_report
from .runner import vllm_available


def _num(value: float | None) -> float | None:
    """A float JSON can hold: NaN and inf become null (the rows say why: no positions, non-finite logits)."""
    return value if value is not None and math.isfinite(value) else None


@dataclass
class Outcome:
    passed: bool
    verdict: str  # PASS / FAIL / INCOMPLETE: ...
    checks: list[Check]
    report: dict
    report_paths: tuple[Path, Path]

    @property
    def exit_code(self) -> int:
        """0 PASS, 1 FAIL, 3 INCOMPLETE (a check that was asked for could not run)."""
        return 0 if self.passed else 3 if self.verdict.startswith("INCOMPLETE") else 1


@dataclass
class Comparison:
    """The pruned model's pass measured against the original's, per prompt and per MoE layer."""

    diffs: list[LogitDiff | None] = field(default_factory=list)  # against the masked original
    agreements: list[Agreement | None] = field(default_factory=list)  # against the unmasked original
    layers: dict[int, LayerCheck] = field(default_factory=dict)
    divergence: str | None = None


def compare_passes(inputs: Inputs, original: ModelPass | None, pruned: ModelPass, count: int, trace: bool,
                   tol: Tolerance) -> Comparison:
    result = Comparison()
    for i in range(count):
        mine = pruned.teacher_forced[i]
        if original is not None and mine is not None:
            result.agreements.append(agreement(original.teacher_forced[i].logits, mine.logits))
            masked = original.masked[i]
            result.diffs.append(compare_logits(masked.logits, mine.logits, tol) if masked is not None else None)
        else:
            result.agreements.append(None)
            result.diffs.append(None)
    if trace:
        for i in range(count):
            compare_layers(original.masked[i].trace, pruned.teacher_forced[i].trace, inputs.order,
                           inputs.pruned.top_k, tol, into=result.layers)
        failing = next((i for i, d in enumerate(result.diffs) if d is not None and (d.mismatched or d.non_finite)),
                       None)
        if failing is not None:
            result.divergence = first_input_divergence(original.masked[failing].trace,
                                                       pruned.teacher_forced[failing].trace, tol)
    return result


def _answer(gen, bad) -> dict:
    return {"text": gen.text, "raw": gen.raw, "tokens": len(gen.token_ids), "ended": gen.ended,
            "thinking": gen.thinking, "unanswered": gen.unanswered, "degenerate": str(bad) if bad else None}


def prompt_row(i: int, prompt: EvalPrompt, pruned: ModelPass, original: ModelPass | None, compared: Comparison,
               box: dict | None) -> dict:
    """One prompt's row of the report: both answers, whether they degenerate, agreement and surgery numbers
    (no answers from the layer-wise check, which generates nothing)."""
    gen = pruned.generations[i] if pruned.generations else None
    bad = pruned.degenerate(gen) if gen is not None else None
    row = {"index": i, "id": prompt.id, "kind": prompt.kind, "question": prompt.question,
           "image": str(prompt.sample.images[0]) if prompt.sample.images else None,
           "pruned": _answer(gen, bad) if gen is not None else None,
           "original": None, "degenerate_fails": bad is not None, "exact_match": None, "tokenizer_match":
           pruned.same_tokens[i], "surgery": None, "agreement": None, "bbox": box,
           "also_calibration": prompt.also_calibration}
    if original is not None:
        if gen is not None:
            theirs = original.generations[i]
            their_bad = original.degenerate(theirs)
            row["original"] = _answer(theirs, their_bad)
            row["degenerate_fails"] = bad is not None and their_bad is None
            row["exact_match"] = gen.token_ids == theirs.token_ids
        a = compared.agreements[i]
        row["agreement"] = {"top1": _num(a.top1), "kl": _num(a.kl), "positions": a.positions}
    if compared.diffs[i] is not None:
        d = compared.diffs[i]
        row["surgery"] = {"max_abs_dlogit": _num(d.max_abs), "scale": d.scale, "bound": d.bound,
                          "mismatched": d.mismatched, "positions": d.positions, "non_finite": d.non_finite}
    return row


@dataclass
class Judgement:
    checks: list[Check]
    summary: dict
    metrics: list[str]  # the verdict's measurements
    accuracy: dict | None = None  # task accuracy on --eval items


def _agreement_part(rows: list[dict], compared: Comparison, judged: Judgement, generated: bool) -> float | None:
    """The tokenizer check and the agreement numbers (with the original; ``generated``: both models answered the
    prompts, so their answers compare too); returns the top-1 agreement."""
    mismatched_tokens = [r["index"] for r in rows if r["tokenizer_match"] is False]
    if mismatched_tokens:
        judged.checks.append(Check("tokenizer", "fail", "tokenizer", f"the pruned folder's processor encodes "
                                   f"{len(mismatched_tokens)}/{len(rows)} prompts differently from the original's "
                                   f"(e.g. #{mismatched_tokens[0]}); copy the tokenizer and preprocessor files from "
                                   "the original"))
    agreements = compared.agreements
    positions = sum(a.positions for a in agreements if a)
    top1 = sum(a.top1_agree for a in agreements if a) / positions if positions else None
    kl = sum(a.kl_sum for a in agreements if a) / positions if positions else None
    judged.summary.update({"top1_agreement": top1, "mean_kl": kl, "compared_positions": positions})
    judged.metrics += [f"top-1 agreement {fmt(top1)}", f"KL {fmt(kl)}"]
    if generated:
        exact = sum(1 for r in rows if r["exact_match"])
        judged.summary.update({"exact_match": f"{exact}/{len(rows)}",
                               "original_degenerate": sum(1 for r in rows if r["original"]["degenerate"])})
        judged.metrics.append(f"exact match {exact}/{len(rows)}")
    return top1


def judge(settings: Settings, inputs: Inputs, prompts: list[EvalPrompt], rows: list[dict], boxes: list,
          compared: Comparison, has_reference: bool, generated: bool, tol: Tolerance) -> Judgement:
    """Every check's verdict, the report's summary and the verdict line's measurements (``generated``: the
    models answered the prompts; the layer-wise check does not)."""
    judged = Judgement(
        [_surgery_check(inputs, compared.diffs, compared.layers, compared.divergence, tol),
         _generation_check(rows, has_reference) if generated else
         Check("generation", "skipped", "generation not checked", NO_GENERATION)],
        {"prompts": len(rows), "with_image": sum(1 for p in prompts if p.sample.images)}, [])
    if generated:
        judged.summary["degenerate"] = sum(1 for r in rows if r["pruned"]["degenerate"])
    else:
        judged.metrics.append("generation skipped (layer-wise check)")
    top1 = _agreement_part(rows, compared, judged, generated) if has_reference else None
    box_summary, box_text, mean_iou = bbox_summary(boxes, has_reference)
    judged.summary.update(box_summary)
    judged.metrics += [box_text] if box_text else []
    no_reference = "there is no original to compare with"
    judged.checks += [c for c in (
        _threshold_check("min_top1_agreement", "top-1 agreement", top1, settings.min_top1_agreement,
                         no_reference if not has_reference else "no positions were compared"),
        _threshold_check("min_bbox_iou", "mean IoU", mean_iou, settings.min_bbox_iou,
                         no_reference if not has_reference else
                         "the layer-wise check generates no boxes" if not generated else
                         "no grounding prompt got a valid box from the original (use --calibration with image + "
                         "regions items)"),
    ) if c is not None]
    if any(c.name == "min_top1_agreement" and c.status == "pass" for c in judged.checks):
        judged.metrics = [m for m in judged.metrics if not m.startswith("top-1 agreement")]
    overlap = sum(1 for p in prompts if p.also_calibration)
    if overlap:  # not a held-out check for those prompts: the verdict must not hide it
        judged.summary["also_calibration_samples"] = f"{overlap}/{len(prompts)}"
        judged.metrics.append(f"{overlap} of {len(prompts)} prompts were also calibration samples")
    return judged


def _accuracy_part(settings: Settings, items, pruned: ModelPass, original: ModelPass | None, box_format,
                   judged: Judgement) -> None:
    """Task accuracy on the evaluation file, both models side by side, and the optional ratio check."""
    section = accuracy_section(items, pruned.answers, original.answers if original else None, box_format)
    judged.accuracy = section
    judged.summary["eval_items"] = f"{len(items)} from {settings.eval_path}"
    overall = section["overall"]
    text = f"accuracy {fmt(overall['pruned'])}"
    judged.metrics.append(text + (f" (original {fmt(overall['original'])})" if original else ""))
    check = ratio_check(section, settings.min_accuracy_ratio, original is not None)
    if check is not None:
        judged.checks.append(check)


def build_report(settings: Settings, inputs: Inputs, judged: Judgement, rows: list[dict], compared: Comparison,
                 prompts_source: str, device: str, dtype, tol: Tolerance, seconds: dict, mode: CheckMode) -> dict:
    """test_report.json's content."""
    passed = not any(c.failed or c.incomplete for c in judged.checks)
    layers = compared.layers
    router_key = inputs.pruned.family.router_weight_name()
    return {
        "passed": passed,
        "verdict": verdict(judged.checks, judged.metrics),
        "checks": judged.checks,
        "summary": judged.summary,
        "pruned": {"path": str(inputs.pruned.path), "num_experts": inputs.pruned.num_experts,
                   "moe_layers": inputs.pruned.moe_layers},
        "reference": {"path": str(inputs.reference) if inputs.reference else None,
                      "source": inputs.reference_source},
        "kept_experts_source": inputs.keep_source,
        "prompts_source": prompts_source,
        "device": device,
        "check_mode": mode.report(),
        "dtype": str(dtype).removeprefix("torch."),
        "tolerance": asdict(tol),
        "first_divergence": next((c.describe(router_key) for _, c in sorted(layers.items()) if c.failed),
                                 compared.divergence),
        "layers": [{k: _num(v) if isinstance(v, float) else v for k, v in asdict(c).items()}
                   for _, c in sorted(layers.items())],
        "notes": inputs.notes,
        "seconds": seconds,
        "settings": {name: (str(v) if isinstance(v := getattr(settings, name), Path) else v) for name in TEST_OPTIONS},
        "prompts": rows,
        "accuracy": judged.accuracy,
    }


def run_test(settings: Settings) -> Outcome:
    """Run every check, write the report, return the outcome (the caller prints the verdict)."""
    if settings.backend == "vllm" and not vllm_available():
        raise ConfigError("--backend vllm needs vLLM, which is not installed here: pip install vllm "
                          "(or use --backend transformers, the default; requirements-vllm.txt pins the vLLM whose "
                          "loader is checked, python -m reap_vlm.check.vllm_load FOLDER checks it on the CPU)")
    inputs = resolve_inputs(settings)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    tol = tolerance_for(dtype)
    mode = choose_check_mode(settings.check_mode, inputs.pruned.path, inputs.reference, device, dtype)
    log(f"check mode: {mode.mode} ({mode.why})")
    torch.manual_seed(settings.seed)
    out = Path(settings.test_output_path)
    with output_lock(out, flag_of("test_output_path")):
        return _run_checks(settings, inputs, device, dtype, tol, out, mode)


def _passes(settings: Settings, inputs: Inputs, prompts: list[EvalPrompt], device: str, dtype, mode: CheckMode,
            eval_items) -> tuple[ModelPass | None, ModelPass, dict]:
    """Both models' passes, as ``mode`` holds them; and the seconds they took."""
    if mode.mode == "layerwise":
        result = run_layerwise_check(inputs, prompts, settings, device, dtype)
        inputs.notes += [n for n in (result.thinking_note, NO_GENERATION) if n]
        if eval_items:
            inputs.notes.append(f"--eval {settings.eval_path}: not answered (the layer-wise check generates nothing)")
        layers = result.seconds_per_layer
        return result.original, result.pruned, {"layerwise": result.pruned.seconds, "layers": len(layers),
                                                "seconds_per_layer": sum(layers) / len(layers) if layers else None,
                                                "per_layer": [round(t, 4) for t in layers]}
    packed = mode.mode == "packed"
    original = run_original(inputs.reference, prompts, settings, device, dtype, inputs.keep, eval_items, packed) \
        if inputs.reference is not None else None
    trace = original is not None and inputs.keep is not None
    pruned = run_pruned(inputs.pruned.path, prompts, settings, device, dtype, original, trace, eval_items, packed)
    note = (original or pruned).thinking_note
    inputs.notes += [note] if note else []
    return original, pruned, {"original": original.seconds if original else None, "pruned": pruned.seconds}


def _run_checks(settings: Settings, inputs: Inputs, device: str, dtype, tol: Tolerance, out: Path,
                mode: CheckMode) -> Outcome:
    out.mkdir(parents=True, exist_ok=True)
    prompts, prompts_source = choose_prompts(settings, out, inputs.notes, inputs.pruned.path,
                                             images=inputs.pruned.family.has_vision)
    eval_items = load_eval_items(settings.eval_path) if settings.eval_path is not None else None
    for note in inputs.notes:
        log(f"note: {note}")

    original, pruned, seconds = _passes(settings, inputs, prompts, device, dtype, mode, eval_items)
    trace = original is not None and inputs.keep is not None
    compared = compare_passes(inputs, original, pruned, len(prompts), trace, tol)

    generated = bool(pruned.generations)
    boxes = _bbox_rows(prompts, pruned, original, out, inputs.pruned.family.box_format) if generated \
        else [None] * len(prompts)
    rows = [prompt_row(i, prompt, pruned, original, compared, boxes[i]) for i, prompt in enumerate(prompts)]
    judged = judge(settings, inputs, prompts, rows, boxes, compared, original is not None, generated, tol)
    if eval_items and generated:
        _accuracy_part(settings, eval_items, pruned, original, inputs.pruned.family.box_format, judged)
    elif eval_items and settings.min_accuracy_ratio is not None:
        judged.checks.append(Check("min_accuracy_ratio", "incomplete", "accuracy ratio not checked",
                                   "--min-accuracy-ratio needs answers, and the layer-wise check generates none"))
    report = build_report(settings, inputs, judged, rows, compared, prompts_source, device, dtype, tol, seconds,
                          mode)
    paths = write_report(out, report)
    return Outcome(report["passed"], report["verdict"], judged.checks, report, paths)
