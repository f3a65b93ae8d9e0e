"""test_pruned_model.py's work: is the pruned model faithful to the original, and does it still answer?

Checks (each on or off by what is available; exit 0 only when every enabled one passes):

1. surgery: the pruned model equals the original with the pruned experts' router logits at
   -inf (kept ids from pruning_record.json, else reap_metadata.json): every MoE block replayed
   on identical inputs, and the final logits, within the dtype's tolerances (``eval_compare``);
   a failure names the layer and the part (router rows, experts, or non-expert weights).
2. generation: greedy outputs on held-out prompts are not degenerate (``eval_degenerate``); prompts
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
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .bbox import ORIGINAL_COLOR, PRUNED_COLOR, draw_boxes, iou, parse_bbox
from .calibration import EncodedSample
from .checkpoint import Checkpoint, resolve_device, resolve_dtype
from .errors import ConfigError, ReapError
from .eval_compare import (
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
from .eval_degenerate import Degeneracy, detect_degenerate
from .eval_options import NO_REFERENCE, TEST_FLAGS, TEST_OPTIONS, flag_of
from .eval_prompts import EvalPrompt, builtin_prompts, calibration_prompts
from .eval_report import Check, fmt, verdict, write_report
from .eval_runner import Generation, ModelRunner, TeacherForced, vllm_available, vllm_generate
from .fsutil import atomic_output_dir, read_json
from .metadata import METADATA_NAME, load_metadata
from .pruning import PRUNING_RECORD
from .settings import OPTIONS, Settings

BBOX_DIR = "bbox"
PROMPT_IMAGE_DIR = "prompt-images"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _num(value: float | None) -> float | None:
    """A float JSON can hold: NaN and inf become null (the rows say why: no positions, non-finite logits)."""
    return value if value is not None and math.isfinite(value) else None


# ----------------------------------------------------------------------------------------------- inputs

@dataclass
class Inputs:
    pruned: Checkpoint
    record: dict | None
    reference: Path | None
    reference_source: str
    keep: dict[int, list[int]] | None = None  # original ids kept per MoE layer
    order: dict[int, list[int]] | None = None  # order[layer][new id] = original id
    keep_source: str | None = None
    keep_problem: str | None = None  # the record contradicts the pruned checkpoint (a failure)
    notes: list[str] = field(default_factory=list)


def _is_checkpoint(path: Path | None) -> bool:
    return path is not None and (Path(path) / "config.json").is_file()


def _require_checkpoint(settings: Settings, name: str) -> Path:
    path = getattr(settings, name)
    if path is None:
        raise ConfigError(f"{flag_of(name)} is required: {OPTIONS[name].help}")
    if not Path(path).is_dir():
        raise ConfigError(f"{flag_of(name)}={path}: no such folder")
    if not _is_checkpoint(path):
        raise ConfigError(f"{flag_of(name)}={path}: folder has no config.json (not a checkpoint folder)")
    return Path(path)


def _same(a: Path, b: Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def find_reference(settings: Settings, record: dict | None, notes: list[str]) -> tuple[Path | None, str]:
    """The original to compare with: --reference, else --original, else the pruning record's source
    (when that folder is here), else REAP_MODEL_PATH; ``--reference none`` checks the pruned model alone."""
    raw = settings.reference_path
    if raw is not None and str(raw).strip().lower() == NO_REFERENCE:
        return None, f"none ({flag_of('reference_path')}={NO_REFERENCE})"
    if raw is not None:
        return _require_checkpoint(settings, "reference_path"), flag_of("reference_path")
    if settings.model_path is not None and settings.sources.get("model_path") == "flag":
        return _require_checkpoint(settings, "model_path"), TEST_FLAGS["model_path"]
    source = (record or {}).get("source_path")
    if source:
        if _is_checkpoint(Path(source)):
            return Path(source), PRUNING_RECORD
        notes.append(f"{PRUNING_RECORD} names the original {source}, which is not here; "
                     f"pass it with {flag_of('reference_path')}")
    if settings.model_path is not None:
        if _is_checkpoint(settings.model_path):
            return Path(settings.model_path), OPTIONS["model_path"].env
        notes.append(f"{OPTIONS['model_path'].env}={settings.model_path} is not a checkpoint folder")
    return None, "not found"


def _kept_experts(inputs: Inputs) -> None:
    """Which original experts the pruned model holds, from the pruning record, else reap_metadata.json."""
    pruned = inputs.pruned
    layers, count = pruned.moe_layers, pruned.num_experts
    record = inputs.record
    id_map = None
    if record is not None and "experts_to_keep" in record:
        where = PRUNING_RECORD
        keep = {int(k): [int(e) for e in v] for k, v in record["experts_to_keep"].items()}
        id_map = record.get("id_map")
    elif (pruned.path / METADATA_NAME).is_file():
        where = f"{METADATA_NAME} (no {PRUNING_RECORD}; assumes kept experts were renumbered in ascending order)"
        keep = load_metadata(pruned.path / METADATA_NAME).experts_to_keep
        sizes = sorted({len(v) for v in keep.values()})
        if sizes != [count] or sorted(keep) != layers:
            inputs.notes.append(f"{METADATA_NAME} keeps {sizes} experts in layers {sorted(keep)[:4]}..., but the "
                                f"pruned model has {count} in layers {layers[:4]}...; it was not the selection used "
                                "(no surgery check)")
            return
    else:
        inputs.notes.append(f"the pruned folder has neither {PRUNING_RECORD} nor {METADATA_NAME}: which experts were "
                            "kept is unknown (no surgery check)")
        return
    if sorted(keep) != layers:
        inputs.keep_problem = (f"{where} lists MoE layers {sorted(keep)[:6]}, the pruned config.json has "
                               f"{layers[:6]}")
        return
    for layer, ids in keep.items():
        if len(ids) != count or len(set(ids)) != len(ids):
            inputs.keep_problem = (f"{where}: layer {layer} keeps {len(set(ids))} distinct experts, but the pruned "
                                   f"config.json says {count}")
            return
    order = {layer: sorted(ids) for layer, ids in keep.items()}
    if id_map:
        for layer in keep:
            mapping = {int(old): int(new) for old, new in id_map.get(str(layer), {}).items()}
            if sorted(mapping.values()) != list(range(count)) or sorted(mapping) != sorted(keep[layer]):
                inputs.keep_problem = f"{PRUNING_RECORD}: id_map of layer {layer} is not a renumbering of its kept ids"
                return
            order[layer] = sorted(mapping, key=mapping.get)
    inputs.keep, inputs.order, inputs.keep_source = keep, order, where


def resolve_inputs(settings: Settings) -> Inputs:
    pruned_path = _require_checkpoint(settings, "pruned_output_path")
    pruned = Checkpoint(pruned_path)
    record_path = pruned_path / PRUNING_RECORD
    record = read_json(record_path, PRUNING_RECORD) if record_path.is_file() else None
    notes: list[str] = []
    reference, reference_source = find_reference(settings, record, notes)
    if reference is not None and _same(reference, pruned_path):
        raise ConfigError(f"the original ({reference_source}) is the pruned model itself ({pruned_path}); point "
                          f"{flag_of('reference_path')} at the unpruned checkpoint")
    inputs = Inputs(pruned, record, reference, reference_source, notes=notes)
    _kept_experts(inputs)
    if reference is not None:
        original = Checkpoint(reference)
        if original.family is not pruned.family or original.moe_layers != pruned.moe_layers:
            raise ReapError(f"the original {reference} ({original.family.name}, MoE layers {original.moe_layers[:4]}"
                            f"...) does not match the pruned model ({pruned.family.name}, {pruned.moe_layers[:4]}"
                            "...); pass the checkpoint it was pruned from")
        expected = (record or {}).get("source_num_experts")
        if expected is not None and int(expected) != original.num_experts:
            raise ReapError(f"the original {reference} has {original.num_experts} experts per layer, but the pruned "
                            f"model was cut from one with {expected}; pass the checkpoint it was pruned from")
        if inputs.keep and max(max(v) for v in inputs.keep.values()) >= original.num_experts:
            raise ReapError(f"the kept expert ids ({inputs.keep_source}) go beyond the {original.num_experts} "
                            f"experts of {reference}; pass the checkpoint it was pruned from")
        if original.num_experts < pruned.num_experts:
            raise ReapError(f"the original {reference} has fewer experts ({original.num_experts}) than the pruned "
                            f"model ({pruned.num_experts}); are --model and --reference swapped?")
    output = Path(settings.test_output_path)
    for folder in (pruned_path, reference):
        if folder is not None and output.exists() and _same(output, folder):
            raise ConfigError(f"{flag_of('test_output_path')}={output} is a model folder; choose a report folder")
    return inputs


# ----------------------------------------------------------------------------------------------- running

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


def _judge(runner: ModelRunner) -> Callable[[Generation], Degeneracy | None]:
    tokenizer, special, end = runner.tokenizer, runner.special_ids, runner.end_ids
    return lambda gen: detect_degenerate(gen.token_ids, gen.text, special, end, tokenizer.decode)


def _generations(path: Path, prompts: list[EvalPrompt], settings: Settings, dtype) -> list[Generation] | None:
    if settings.backend != "vllm":
        return None
    _log(f"generating with vLLM: {path} (this generation path has not run in this project's CI, which has no GPU; "
         "what is tested is vLLM's loader on pruned checkpoints: python -m reap_vlm.vllm_load_check)")
    return vllm_generate(path, [p.sample for p in prompts], max_new_tokens=settings.max_new_tokens, dtype=dtype,
                         max_pixels=settings.max_pixels, seed=settings.seed)


def _run_model(label: str, path: Path, prompts: list[EvalPrompt], settings: Settings, device: str, dtype,
               per_prompt) -> ModelPass:
    """Load one model, encode and answer every prompt, and let ``per_prompt(runner, i, enc, gen, result)``
    add what this model's side of the comparison needs; one model is in memory at a time."""
    start = time.perf_counter()
    generated = _generations(path, prompts, settings, dtype)
    _log(f"loading the {label}: {path}")
    runner = ModelRunner(path, device=device, dtype=dtype, max_pixels=settings.max_pixels)
    result = ModelPass([], [], [], [], degenerate=_judge(runner))
    try:
        for i, prompt in enumerate(prompts):
            enc = runner.encode(prompt.sample)
            gen = generated[i] if generated else runner.generate(enc, settings.max_new_tokens)
            result.encodings.append(enc)
            result.generations.append(gen)
            per_prompt(runner, i, enc, gen, result)
            _log(f"  {label.split()[0]} {i + 1}/{len(prompts)} {prompt.id}: {gen.text[:60]!r}")
    finally:
        runner.close()
    result.seconds = time.perf_counter() - start
    return result


def run_original(path: Path, prompts: list[EvalPrompt], settings: Settings, device: str, dtype,
                 keep: dict[int, list[int]] | None) -> ModelPass:
    def per_prompt(runner, i, enc, gen, result):
        result.teacher_forced.append(runner.teacher_forced(enc, gen.token_ids))
        result.masked.append(runner.teacher_forced(enc, gen.token_ids, keep=keep, trace=True) if keep else None)

    return _run_model("original", path, prompts, settings, device, dtype, per_prompt)


def run_pruned(path: Path, prompts: list[EvalPrompt], settings: Settings, device: str, dtype,
               original: ModelPass | None, trace: bool) -> ModelPass:
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

    return _run_model("pruned model", path, prompts, settings, device, dtype, per_prompt)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them is not here: compare the paths
        return Path(a).resolve() == Path(b).resolve()


def scored_calibration(pruned_path: Path | None, calibration: Path) -> tuple[set[int] | None, str | None]:
    """Which items of ``calibration`` the experts were scored on, from the pruned folder's reap_metadata.json
    (copied there by prune_model.py): a set (empty when reap.py read another file), or None with the reason
    when that cannot be told."""
    path = None if pruned_path is None else Path(pruned_path) / METADATA_NAME
    if path is None or not path.is_file():
        return None, (f"the pruned folder has no {METADATA_NAME}, so whether prompts from {calibration} were "
                      "among the scored calibration samples is unknown")
    try:
        raw = read_json(path, METADATA_NAME)
    except ReapError as exc:
        return None, f"{exc}; whether the prompts were among the scored calibration samples is unknown"
    recorded = raw.get("calibration_path") if isinstance(raw, dict) else None
    if not recorded:
        return None, (f"{METADATA_NAME} does not name the calibration file it was scored on; prompts from "
                      f"{calibration} may repeat scored samples")
    if not _same_file(Path(recorded), Path(calibration)):
        return set(), None
    samples = raw.get("calibration_samples")
    if not isinstance(samples, list):
        return None, (f"{calibration} is the file the experts were scored on, and {METADATA_NAME} does not list "
                      "which of its items were used (calibration_samples; rerun reap.py to record it): prompts may "
                      "repeat scored samples")
    return {int(i) for i in samples}, None


def choose_prompts(settings: Settings, output: Path, notes: list[str],
                   pruned_path: Path | None = None) -> tuple[list[EvalPrompt], str]:
    """The prompts of the check and a phrase saying where they came from.  Prompts from --calibration
    avoid the items the experts were scored on (named in the pruned folder's reap_metadata.json); when too
    few others remain, scored ones fill in, marked ``also_calibration`` and said so in ``notes``."""
    if settings.calibration_path is not None:
        calibration = settings.calibration_path
        scored, unknown = scored_calibration(pruned_path, calibration)
        prompts, skipped = calibration_prompts(calibration, settings.num_prompts, settings.seed, scored or ())
        if skipped:
            notes.append(f"{len(skipped)} calibration items skipped (e.g. {skipped[0]})")
        source = f"{len(prompts)} drawn from {calibration} (seed {settings.seed})"
        overlap = sum(1 for p in prompts if p.also_calibration)
        if unknown:
            notes.append(unknown)
            source += ", held out from scoring: unknown"
        elif scored:
            source += f", avoiding the {len(scored)} items scored by reap.py"
            if overlap:
                notes.append(f"{overlap} of {len(prompts)} prompts were also calibration samples: {calibration} has "
                             f"only {len(prompts) - overlap} usable items reap.py did not score; for a held-out "
                             "check, pass a --calibration file (or more items) the experts were not scored on")
                source += f" ({overlap} of {len(prompts)} also calibration samples)"
        else:
            source += ", not the file the experts were scored on"
    else:
        prompts = builtin_prompts(settings.num_prompts, settings.seed, output / PROMPT_IMAGE_DIR)
        source = f"{len(prompts)} built-in (text, and shapes drawn into {PROMPT_IMAGE_DIR}/)"
    return prompts, source


# ----------------------------------------------------------------------------------------------- judging

@dataclass
class Outcome:
    passed: bool
    verdict: str
    checks: list[Check]
    report: dict
    report_paths: tuple[Path, Path]

    @property
    def failures(self) -> list[str]:
        return [f"{c.name}: {c.why}" for c in self.checks if c.failed]


def _bbox_rows(prompts, pruned: ModelPass, original: ModelPass | None, out: Path) -> list[dict | None]:
    """Parse boxes for grounding prompts, draw pictures into out/bbox (swapped in whole)."""
    rows: list[dict | None] = []
    with atomic_output_dir(out / BBOX_DIR, force=True) as folder:
        for i, prompt in enumerate(prompts):
            if not prompt.sample.regions:
                rows.append(None)
                continue
            mine = parse_bbox(pruned.generations[i].text)
            theirs = parse_bbox(original.generations[i].text) if original else None
            row = {"pruned": mine.describe(), "pruned_valid": mine.valid,
                   "original": theirs.describe() if theirs else None,
                   "original_valid": theirs.valid if theirs else None, "iou": None, "picture": None}
            if theirs is not None and theirs.valid:
                row["iou"] = iou(mine.box, theirs.box) if mine.valid else 0.0
            if prompt.sample.images and (mine.valid or (theirs is not None and theirs.valid)):
                name = f"{i:03d}-{prompt.id.replace(':', '-')}.png"
                boxes = [("pruned", mine.box, PRUNED_COLOR)]
                if theirs is not None:
                    boxes.insert(0, ("original", theirs.box, ORIGINAL_COLOR))
                draw_boxes(prompt.sample.images[0], boxes, folder / name, title=prompt.question)
                row["picture"] = f"{BBOX_DIR}/{name}"
            rows.append(row)
    return rows


def bbox_summary(rows: list[dict | None], has_reference: bool) -> tuple[dict, str, float | None]:
    """(summary entries, verdict text, mean IoU) over the grounding prompts' box rows.  The mean IoU is
    over prompts where the original gave a valid box; a missing or invalid pruned box there counts 0."""
    rows = [r for r in rows if r is not None]
    if not rows:
        return {}, "", None
    valid = sum(1 for r in rows if r["pruned_valid"])
    summary: dict = {"boxes_valid": f"{valid}/{len(rows)}"}
    text = f"boxes valid {valid}/{len(rows)}"
    if not has_reference:
        return summary, text, None
    theirs = sum(1 for r in rows if r["original_valid"])
    ious = [r["iou"] for r in rows if r["iou"] is not None]
    mean_iou = sum(ious) / len(ious) if ious else None
    summary.update({"original_boxes_valid": f"{theirs}/{len(rows)}", "mean_iou": mean_iou, "iou_prompts": len(ious)})
    return summary, text + f" (original {theirs}/{len(rows)}), mean IoU {fmt(mean_iou)}", mean_iou


def _surgery_check(inputs: Inputs, diffs: list[LogitDiff | None], layers: dict[int, LayerCheck],
                   divergence: str | None, tol: Tolerance) -> Check:
    if inputs.reference is None:
        return Check("surgery", "skipped", "surgery not checked", "no original model to compare with")
    if inputs.keep_problem:
        return Check("surgery", "fail", "surgery", inputs.keep_problem)
    if inputs.keep is None:
        return Check("surgery", "skipped", "surgery not checked", "which experts were kept is unknown")
    diffs = [d for d in diffs if d is not None]
    total = sum(d.positions for d in diffs)
    mismatched = sum(d.mismatched for d in diffs)
    worst = max(diffs, key=lambda d: d.max_abs / max(1.0, d.scale))
    allowed = math.floor(tol.max_mismatch_fraction * total)
    non_finite = any(d.non_finite for d in diffs)
    bad_layers = [c for _, c in sorted(layers.items()) if c.failed]
    logits_ok = not non_finite and mismatched <= allowed
    tokens = sum(c.tokens for c in layers.values())
    if logits_ok and not bad_layers:
        kind = "exact" if worst.max_abs == 0 else "consistent"
        return Check("surgery", "pass", f"surgery {kind} (max |dlogit| {fmt(worst.max_abs)} <= "
                                        f"{fmt(worst.bound)} on {total} positions, {len(layers)} MoE layers "
                                        f"replayed on {tokens // max(1, len(layers))} tokens)")
    parts = []
    if bad_layers:
        more = f" (and {len(bad_layers) - 1} more layers)" if len(bad_layers) > 1 else ""
        parts.append(f"the pruned model's MoE blocks do not reproduce the original's with pruned experts masked: "
                     f"{bad_layers[0].describe()}{more}")
    if not logits_ok:
        bad_prompts = sum(1 for d in diffs if d.mismatched)
        parts.append(f"final logits differ from the masked original's: max |dlogit| {fmt(worst.max_abs)} (logit "
                     f"scale {fmt(worst.scale)}), over the {tol.dtype} bound {tol.rel:g} x max(1, scale) at "
                     f"{mismatched}/{total} positions on {bad_prompts}/{len(diffs)} prompts"
                     + ("; the pruned model produced NaN/inf logits" if non_finite else ""))
        if not bad_layers and divergence:
            parts.append(f"first divergence: {divergence}")
    return Check("surgery", "fail", "surgery", "; ".join(parts))


def _generation_check(rows: list[dict], has_reference: bool) -> Check:
    degenerate = [r for r in rows if r["pruned"]["degenerate"]]
    failing = [r for r in degenerate if r["degenerate_fails"]]
    excused = len(degenerate) - len(failing)
    summary = f"{len(degenerate)}/{len(rows)} degenerate" + (f" ({excused} also from the original)" if excused else "")
    if not failing:
        return Check("generation", "pass", summary)
    examples = "; ".join(f"#{r['index']} {r['pruned']['degenerate']}" for r in failing[:3])
    where = "where the original's are not" if has_reference else "(no original to compare with)"
    return Check("generation", "fail", summary, f"{len(failing)}/{len(rows)} outputs degenerate {where}: {examples}")


def _threshold_check(name: str, label: str, value: float | None, threshold: float | None, missing: str) -> \
        Check | None:
    if threshold is None:
        return None
    if value is None:
        return Check(name, "fail", label, f"--{name.replace('_', '-')} {threshold:g} was asked for, but {missing}")
    if value >= threshold:
        return Check(name, "pass", f"{label} {fmt(value)} >= {threshold:g}")
    return Check(name, "fail", f"{label} {fmt(value)}", f"{label} {fmt(value)} is below --{name.replace('_', '-')} "
                                                         f"{threshold:g}")


def run_test(settings: Settings) -> Outcome:
    """Run every check, write the report, return the outcome (the caller prints the verdict)."""
    if settings.backend == "vllm" and not vllm_available():
        raise ConfigError("--backend vllm needs vLLM, which is not installed here: pip install vllm "
                          "(or use --backend transformers, the default; requirements-vllm.txt pins the vLLM whose "
                          "loader is checked, python -m reap_vlm.vllm_load_check FOLDER checks it on the CPU)")
    inputs = resolve_inputs(settings)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    tol = tolerance_for(dtype)
    torch.manual_seed(settings.seed)
    out = Path(settings.test_output_path)
    out.mkdir(parents=True, exist_ok=True)
    prompts, prompts_source = choose_prompts(settings, out, inputs.notes, inputs.pruned.path)
    for note in inputs.notes:
        _log(f"note: {note}")

    original = run_original(inputs.reference, prompts, settings, device, dtype, inputs.keep) \
        if inputs.reference is not None else None
    trace = original is not None and inputs.keep is not None
    pruned = run_pruned(inputs.pruned.path, prompts, settings, device, dtype, original, trace)

    diffs: list[LogitDiff | None] = []
    agreements: list[Agreement | None] = []
    for i in range(len(prompts)):
        mine = pruned.teacher_forced[i]
        if original is not None and mine is not None:
            agreements.append(agreement(original.teacher_forced[i].logits, mine.logits))
            masked = original.masked[i]
            diffs.append(compare_logits(masked.logits, mine.logits, tol) if masked is not None else None)
        else:
            agreements.append(None)
            diffs.append(None)
    layers: dict[int, LayerCheck] = {}
    divergence = None
    if trace:
        for i in range(len(prompts)):
            compare_layers(original.masked[i].trace, pruned.teacher_forced[i].trace, inputs.order,
                           inputs.pruned.top_k, tol, into=layers)
        failing = next((i for i, d in enumerate(diffs) if d is not None and (d.mismatched or d.non_finite)), None)
        if failing is not None:
            divergence = first_input_divergence(original.masked[failing].trace, pruned.teacher_forced[failing].trace,
                                                tol)

    boxes = _bbox_rows(prompts, pruned, original, out)
    rows = []
    for i, prompt in enumerate(prompts):
        gen = pruned.generations[i]
        bad = pruned.degenerate(gen)
        row = {"index": i, "id": prompt.id, "kind": prompt.kind, "question": prompt.question,
               "image": str(prompt.sample.images[0]) if prompt.sample.images else None,
               "pruned": {"text": gen.text, "raw": gen.raw, "tokens": len(gen.token_ids), "ended": gen.ended,
                          "degenerate": str(bad) if bad else None},
               "original": None, "degenerate_fails": bad is not None, "exact_match": None, "tokenizer_match":
               pruned.same_tokens[i], "surgery": None, "agreement": None, "bbox": boxes[i],
               "also_calibration": prompt.also_calibration}
        if original is not None:
            theirs = original.generations[i]
            their_bad = original.degenerate(theirs)
            row["original"] = {"text": theirs.text, "raw": theirs.raw, "tokens": len(theirs.token_ids),
                               "ended": theirs.ended, "degenerate": str(their_bad) if their_bad else None}
            row["degenerate_fails"] = bad is not None and their_bad is None
            row["exact_match"] = gen.token_ids == theirs.token_ids
            a = agreements[i]
            row["agreement"] = {"top1": _num(a.top1), "kl": _num(a.kl), "positions": a.positions}
        if diffs[i] is not None:
            d = diffs[i]
            row["surgery"] = {"max_abs_dlogit": _num(d.max_abs), "scale": d.scale, "bound": d.bound,
                              "mismatched": d.mismatched, "positions": d.positions, "non_finite": d.non_finite}
        rows.append(row)

    checks = [_surgery_check(inputs, diffs, layers, divergence, tol), _generation_check(rows, original is not None)]
    metrics: list[str] = []
    summary: dict = {"prompts": len(rows), "with_image": sum(1 for p in prompts if p.sample.images),
                     "degenerate": sum(1 for r in rows if r["pruned"]["degenerate"])}
    top1 = None
    if original is not None:
        mismatched_tokens = [r["index"] for r in rows if r["tokenizer_match"] is False]
        if mismatched_tokens:
            checks.append(Check("tokenizer", "fail", "tokenizer", f"the pruned folder's processor encodes "
                                f"{len(mismatched_tokens)}/{len(rows)} prompts differently from the original's "
                                f"(e.g. #{mismatched_tokens[0]}); copy the tokenizer and preprocessor files from the "
                                "original"))
        positions = sum(a.positions for a in agreements if a)
        top1 = sum(a.top1_agree for a in agreements if a) / positions if positions else None
        kl = sum(a.kl_sum for a in agreements if a) / positions if positions else None
        exact = sum(1 for r in rows if r["exact_match"])
        summary.update({"top1_agreement": top1, "mean_kl": kl, "compared_positions": positions,
                        "exact_match": f"{exact}/{len(rows)}",
                        "original_degenerate": sum(1 for r in rows if r["original"]["degenerate"])})
        metrics += [f"top-1 agreement {fmt(top1)}", f"KL {fmt(kl)}", f"exact match {exact}/{len(rows)}"]
    box_summary, box_text, mean_iou = bbox_summary(boxes, original is not None)
    summary.update(box_summary)
    metrics += [box_text] if box_text else []
    no_reference = "there is no original to compare with"
    checks += [c for c in (
        _threshold_check("min_top1_agreement", "top-1 agreement", top1, settings.min_top1_agreement,
                         no_reference if original is None else "no positions were compared"),
        _threshold_check("min_bbox_iou", "mean IoU", mean_iou, settings.min_bbox_iou,
                         no_reference if original is None else
                         "no grounding prompt got a valid box from the original (use --calibration with image + "
                         "regions items)"),
    ) if c is not None]
    if any(c.name == "min_top1_agreement" and c.status == "pass" for c in checks):
        metrics = [m for m in metrics if not m.startswith("top-1 agreement")]
    overlap = sum(1 for p in prompts if p.also_calibration)
    if overlap:  # not a held-out check for those prompts: the verdict must not hide it
        summary["also_calibration_samples"] = f"{overlap}/{len(prompts)}"
        metrics.append(f"{overlap} of {len(prompts)} prompts were also calibration samples")

    passed = not any(c.failed for c in checks)
    line = verdict(checks, metrics)
    report = {
        "passed": passed,
        "verdict": line,
        "checks": checks,
        "summary": summary,
        "pruned": {"path": str(inputs.pruned.path), "num_experts": inputs.pruned.num_experts,
                   "moe_layers": inputs.pruned.moe_layers},
        "reference": {"path": str(inputs.reference) if inputs.reference else None,
                      "source": inputs.reference_source},
        "kept_experts_source": inputs.keep_source,
        "prompts_source": prompts_source,
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "tolerance": asdict(tol),
        "first_divergence": next((c.describe() for _, c in sorted(layers.items()) if c.failed), divergence),
        "layers": [{k: _num(v) if isinstance(v, float) else v for k, v in asdict(c).items()}
                   for _, c in sorted(layers.items())],
        "notes": inputs.notes,
        "seconds": {"original": original.seconds if original else None, "pruned": pruned.seconds},
        "settings": {name: (str(v) if isinstance(v := getattr(settings, name), Path) else v) for name in TEST_OPTIONS},
        "prompts": rows,
    }
    paths = write_report(out, report)
    return Outcome(passed, line, checks, report, paths)
