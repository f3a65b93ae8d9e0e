"""Task accuracy against known answers: how many items of an evaluation file each model gets right.

An evaluation file is JSONL, one item a line (paths relative to the file):

    {"task": "arithmetic", "prompt": "What is 47 + 38?", "image": null, "answer": "85"}
    {"task": "grounding", "prompt": "Find the bounding box of \\"red circle\\".", "image": "img/3.png",
     "bbox_2d": [120, 340, 560, 780]}

An exact-match item is right when the greedy answer, stripped, equals ``answer``; a grounding item when
the answer's box (read in the family's box format, as the bbox check reads it) has IoU >= 0.5 with
``bbox_2d``.  Answers are greedy generations of the prompt in the model's chat template (image first),
decoded in batches of left-padded prompts; batching changes the arithmetic's order, not the method.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..calibration.files import CalibrationSample
from ..errors import ReapError
from ..families import BoxFormat
from .bbox import Box, check_box, iou, parse_bbox
from .runner import GENERATION_BATCH

IOU_RIGHT = 0.5


@dataclass(frozen=True)
class EvalItem:
    task: str
    prompt: str
    image: Path | None
    answer: str | None = None  # exact-match items
    box: Box | None = None  # grounding items, in the box format's coordinates

    def sample(self, index: int) -> CalibrationSample:
        if self.image is None:
            return CalibrationSample(index, "prompt", messages=[{"role": "user", "content": self.prompt}])
        content = [{"type": "image"}, {"type": "text", "text": self.prompt}]
        return CalibrationSample(index, "prompt", messages=[{"role": "user", "content": content}],
                                 images=[self.image])

    @property
    def expected(self) -> str:
        return self.answer if self.box is None else json.dumps({"bbox_2d": self.box.as_list()})


def _item(record, base: Path, where: str) -> EvalItem:
    if not isinstance(record, dict):
        raise ValueError("expected an object")
    task, prompt, image = record.get("task"), record.get("prompt"), record.get("image")
    if not isinstance(task, str) or not task:
        raise ValueError("task must be a non-empty string")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt must be a non-empty string")
    if image is not None and not isinstance(image, str):
        raise ValueError("image must be a path or null")
    path = None
    if image is not None:
        path = base / image
        if not path.is_file():
            raise ValueError(f"image {path} not found")
    if ("answer" in record) == ("bbox_2d" in record):
        raise ValueError("give exactly one of answer (exact match) and bbox_2d (grounding)")
    if "answer" in record:
        if not isinstance(record["answer"], str):
            raise ValueError("answer must be a string")
        return EvalItem(task, prompt, path, answer=record["answer"])
    return EvalItem(task, prompt, path, box=check_box(record["bbox_2d"]))


def load_eval_items(path: Path) -> list[EvalItem]:
    """Every item of the file, checked; a bad line stops with the file, the line and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ReapError(f"evaluation file {path} not found; set --eval / REAP_EVAL_PATH")
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            items.append(_item(json.loads(line), path.parent, where))
        except (ValueError, TypeError) as exc:
            raise ReapError(f"{where}: {exc}; fix the line (one JSON object: task, prompt, image, answer or "
                            "bbox_2d)") from None
    if not items:
        raise ReapError(f"{path} holds no items")
    return items


def is_right(item: EvalItem, answer: str, fmt: BoxFormat) -> bool:
    if item.box is None:
        return answer.strip() == item.answer.strip()
    parsed = parse_bbox(answer, fmt)
    return parsed.valid and iou(parsed.box, item.box) >= IOU_RIGHT


def answer_items(runner, items: list[EvalItem], max_new_tokens: int, batch_size: int = GENERATION_BATCH,
                 progress=None) -> list[str]:
    """The model's greedy answer to every item, in the items' order (``ModelRunner.generate_all``)."""
    encoded = [runner.encode(item.sample(i)) for i, item in enumerate(items)]
    return [g.text for g in runner.generate_all(encoded, max_new_tokens, batch_size, progress)]


def accuracy_by_task(items: list[EvalItem], answers: list[str], fmt: BoxFormat) -> dict[str, float]:
    right: dict[str, list[bool]] = {}
    for item, answer in zip(items, answers):
        right.setdefault(item.task, []).append(is_right(item, answer, fmt))
    return {task: sum(hits) / len(hits) for task, hits in right.items()}


# ------------------------------------------------------------------------------------------------ report

def accuracy_section(items: list[EvalItem], pruned: list[str], original: list[str] | None, fmt: BoxFormat) -> dict:
    """test_report.json's "accuracy": per task (and over all items) the share right for each model, plus a
    row per item with both answers."""
    rows, tasks = [], {}
    for item, mine, theirs in zip(items, pruned, original or [None] * len(items)):
        row = {"task": item.task, "prompt": item.prompt, "image": str(item.image) if item.image else None,
               "expected": item.expected, "pruned": mine, "pruned_right": is_right(item, mine, fmt),
               "original": theirs, "original_right": None if theirs is None else is_right(item, theirs, fmt)}
        rows.append(row)
        tasks.setdefault(item.task, []).append(row)

    def share(group: list[dict], side: str) -> float | None:
        hits = [r[f"{side}_right"] for r in group]
        return None if hits[0] is None else sum(hits) / len(hits)

    per_task = {task: {"items": len(group), "original": share(group, "original"), "pruned": share(group, "pruned")}
                for task, group in tasks.items()}
    overall = {"items": len(rows), "original": share(rows, "original"), "pruned": share(rows, "pruned")}
    return {"tasks": per_task, "overall": overall, "rows": rows}


def ratio_check(section: dict, min_ratio: float | None, has_reference: bool):
    """--min-accuracy-ratio: every task's pruned accuracy >= ratio x the original's."""
    from .report import Check, fmt

    if min_ratio is None:
        return None
    if not has_reference:
        return Check("min_accuracy_ratio", "fail", "accuracy ratio",
                     f"--min-accuracy-ratio {min_ratio:g} was asked for, but there is no original to compare with")
    short = [(task, t) for task, t in section["tasks"].items() if t["pruned"] < min_ratio * t["original"]]
    if not short:
        return Check("min_accuracy_ratio", "pass", f"every task's accuracy >= {min_ratio:g} x the original's")
    worst = ", ".join(f"{task} {fmt(t['pruned'])} vs {fmt(t['original'])}" for task, t in short[:4])
    return Check("min_accuracy_ratio", "fail", "accuracy ratio",
                 f"{len(short)} of {len(section['tasks'])} tasks below {min_ratio:g} x the original's accuracy: "
                 f"{worst}")
