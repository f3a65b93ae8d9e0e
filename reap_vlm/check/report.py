"""The check's verdict and its report files: test_report.json, test_report.md (a row per prompt)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from ..checkpoint.fsutil import atomic_write_bytes, atomic_write_json

REPORT_JSON = "test_report.json"
REPORT_MD = "test_report.md"


@dataclass
class Check:
    """One enabled (or skipped) check and how it went."""

    name: str
    status: str  # "pass" | "fail" | "skipped" (not asked for) | "incomplete" (asked for, could not run)
    summary: str  # short, for the verdict line
    why: str = ""  # why it failed or was skipped

    @property
    def failed(self) -> bool:
        return self.status == "fail"

    @property
    def incomplete(self) -> bool:
        return self.status == "incomplete"


def fmt(value: float | None, digits: int = 3) -> str:
    """Numbers for humans: '0', '3e-06', '0.912', 'n/a'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if value == 0:
        return "0"
    if math.isinf(value):
        return "inf"
    if abs(value) < 10 ** -digits or abs(value) >= 10 ** 4:
        return f"{value:.1e}"
    return f"{value:.{digits}g}" if abs(value) >= 1 else f"{value:.{digits}f}".rstrip("0").rstrip(".")


def verdict(checks: list[Check], metrics: list[str]) -> str:
    """One line: PASS with the headline numbers, FAIL naming each failed check and why, or INCOMPLETE naming each
    check that was asked for but could not run (and why)."""
    failed = [c for c in checks if c.failed] or [c for c in checks if c.incomplete]
    passed = [c.summary for c in checks if c.status == "pass"]
    if not failed:
        return "PASS: " + ", ".join(passed + metrics)
    head = ("FAIL: " if failed[0].failed else "INCOMPLETE: ") + "; ".join(f"{c.name}: {c.why}" for c in failed)
    tail = passed + metrics
    return head + (" | " + ", ".join(tail) if tail else "")


def _cell(text, limit: int = 90) -> str:
    """Text safe inside a Markdown table cell: pipes escaped, newlines shown as a symbol, control
    characters (random or broken models emit them) as \\xNN."""
    text = "" if text is None else str(text)
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("\r\n", "\n").replace("\n", "\u23ce")
    text = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in text)
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


def markdown(report: dict) -> str:
    lines = [f"# Pruned model check: {report['verdict'].split(':')[0]}", "", f"`{report['verdict']}`", ""]
    lines += [f"- pruned model: `{report['pruned']['path']}` ({report['pruned']['num_experts']} experts per MoE "
              "layer)",
              f"- original: `{report['reference']['path']}` ({report['reference']['source']})"
              if report["reference"]["path"] else f"- original: none ({report['reference']['source']})",
              f"- kept experts from: {report['kept_experts_source'] or 'unknown'}",
              f"- prompts: {report['prompts_source']}; backend {report['settings']['backend']}, "
              f"dtype {report['dtype']}, device {report['device']}, max_new_tokens "
              f"{report['settings']['max_new_tokens']}"]
    mode = report.get("check_mode")
    if mode:
        lines.append(f"- check mode: {mode['mode']} ({mode['why']})")
    tol = report["tolerance"]
    lines.append(f"- surgery tolerance ({tol['dtype']}): final logits max |dlogit| <= {tol['rel']:g} x max(1, max "
                 f"|logit|) at all but {tol['max_mismatch_fraction']:.0%} of positions; MoE layers replayed on "
                 f"identical inputs within {tol['layer_rel']:g} of the layer's scale ({tol['why']})")
    for note in report["notes"]:
        lines.append(f"- note: {note}")
    lines += ["", "## Checks", "", "| check | status | result |", "|---|---|---|"]
    for check in report["checks"]:
        result = _cell(check["why"] or check["summary"], 400)
        lines.append(f"| {check['name']} | {check['status'].upper()} | {result} |")
    lines += ["", "## Summary", ""]
    for key, value in report["summary"].items():
        shown = fmt(value) if value is None or isinstance(value, float) else value
        lines.append(f"- {key.replace('_', ' ')}: {shown}")
    lines += _accuracy_lines(report.get("accuracy"))
    if report.get("layers"):
        lines += ["", "## MoE layers replayed on identical inputs", "",
                  "| layer | tokens | router mismatches | expert mismatches | near-tie flips (excused) | "
                  "worst router diff | worst output diff |", "|---|---|---|---|---|---|---|"]
        for layer in report["layers"]:
            lines.append(f"| {layer['layer']} | {layer['tokens']} | {layer['router_mismatches']} | "
                         f"{layer['expert_mismatches']} | {layer['excused']} | {fmt(layer['worst_router'])} | "
                         f"{fmt(layer['worst_output'])} |")
    lines += ["", "## Prompts", "",
              "| # | id | kind | prompt | pruned output | original output | degenerate | same | top-1 | KL | "
              "max \\|dlogit\\| | box pruned / original | IoU |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["prompts"]:
        original, pruned = row["original"] or {}, row["pruned"] or {}
        degenerate = pruned.get("degenerate") or ""
        if degenerate and not row["degenerate_fails"]:
            degenerate += " (original too)"
        agreement, surgery, box = row["agreement"] or {}, row["surgery"] or {}, row["bbox"] or {}
        boxes = f"{box.get('pruned', '')} / {box.get('original', '')}" if box else ""
        if box.get("picture"):
            boxes += f" [picture]({box['picture']})"
        same = "" if row["exact_match"] is None else ("yes" if row["exact_match"] else "no")
        lines.append("| " + " | ".join([
            str(row["index"]), _cell(row["id"], 30), row["kind"], _cell(row["question"], 60),
            _cell(_shown_answer(pruned)), _cell(_shown_answer(original)), _cell(degenerate, 60), same,
            fmt(agreement.get("top1")), fmt(agreement.get("kl")), fmt(surgery.get("max_abs_dlogit")),
            _cell(boxes, 160), fmt(box.get("iou")),
        ]) + " |")
    return "\n".join(lines) + "\n"


def _shown_answer(answer: dict) -> str | None:
    """A report row's output: the answer, after the start of the thinking that came before it (if any)."""
    if not answer:
        return None
    thinking = answer.get("thinking")
    if thinking is None:
        return answer["text"]
    head = thinking.strip()[:40] + ("\u2026" if len(thinking.strip()) > 40 else "")
    return f"[thinking: {head}] " + (answer["text"] if not answer.get("unanswered") else "(no answer: thinking "
                                                                                         "did not end)")


def _accuracy_lines(accuracy: dict | None) -> list[str]:
    """The task-accuracy table (--eval): each model's share of right answers per task."""
    if not accuracy:
        return []
    lines = ["", "## Task accuracy (evaluation items with known answers)", "",
             "| task | items | original | pruned | pruned / original |", "|---|---|---|---|---|"]
    for task, row in [*accuracy["tasks"].items(), ("all", accuracy["overall"])]:
        ratio = row["pruned"] / row["original"] if row["original"] else None
        lines.append(f"| {task} | {row['items']} | {fmt(row['original'])} | {fmt(row['pruned'])} | {fmt(ratio)} |")
    return lines


def write_report(folder: Path, report: dict) -> tuple[Path, Path]:
    """test_report.json and test_report.md, each written to a temporary file and renamed into place."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    report = {**report, "checks": [asdict(c) if isinstance(c, Check) else c for c in report["checks"]]}
    json_path, md_path = folder / REPORT_JSON, folder / REPORT_MD
    atomic_write_json(json_path, report)
    atomic_write_bytes(md_path, markdown(report).encode())
    return json_path, md_path
