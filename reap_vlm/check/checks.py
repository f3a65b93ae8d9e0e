"""The checks' verdicts, each from what the passes measured: surgery, generation, thresholds; and the box rows."""

from __future__ import annotations

import math
from pathlib import Path

from ..checkpoint.fsutil import atomic_output_dir
from ..families import BoxFormat
from ..families.base import NORMALIZED_1000
from .bbox import ORIGINAL_COLOR, PRUNED_COLOR, draw_boxes, iou, parse_bbox
from .compare import LayerCheck, LogitDiff, Tolerance
from .inputs import Inputs
from .passes import ModelPass
from .report import Check, fmt

BBOX_DIR = "bbox"


def _bbox_rows(prompts, pruned: ModelPass, original: ModelPass | None, out: Path,
               fmt: BoxFormat = NORMALIZED_1000) -> list[dict | None]:
    """Parse boxes (the family's ``fmt``) for grounding prompts, draw pictures into out/bbox (swapped in whole)."""
    rows: list[dict | None] = []
    with atomic_output_dir(out / BBOX_DIR, force=True) as folder:
        for i, prompt in enumerate(prompts):
            if not prompt.sample.regions:
                rows.append(None)
                continue
            mine = parse_bbox(pruned.generations[i].text, fmt)
            theirs = parse_bbox(original.generations[i].text, fmt) if original else None
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
                draw_boxes(prompt.sample.images[0], boxes, folder / name, title=prompt.question,
                           coord_max=fmt.coord_max)
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
    if inputs.reference is None and inputs.reference_declined:
        return Check("surgery", "skipped", "surgery not checked", f"not asked for ({inputs.reference_source})")
    if inputs.reference is None:  # asked for (the default) but impossible: never a PASS
        return Check("surgery", "incomplete", "surgery not checked",
                     "no original model found to compare with; pass --reference <the original's folder>, or "
                     "--reference none to check the pruned model alone")
    if inputs.keep_problem:
        return Check("surgery", "fail", "surgery", inputs.keep_problem)
    if inputs.keep is None:
        return Check("surgery", "incomplete", "surgery not checked",
                     "which experts were kept is unknown (the pruned folder has no pruning_record.json or "
                     "reap_metadata.json that fits it); pass --reference none to check the pruned model alone")
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
                     f"{bad_layers[0].describe(inputs.pruned.family.router_weight_name())}{more}")
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
