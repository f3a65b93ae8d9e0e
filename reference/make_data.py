"""Write the reference model's held-out evaluation file and its three calibration sets.

    python -m reference.make_data            # reference/eval.jsonl, reference/calibration/{mixed,text,image}.json

Both come from the training distribution (reference.tasks) with seeds training never uses
(training draws with seeds >= reference.train.TRAIN_SEED_BASE):

- ``eval.jsonl``: ``EVAL_PER_TASK`` items of every task, one JSON object a line:
  ``{"task", "prompt", "image", "answer"}`` (exact match) or ``{"task", "prompt", "image", "bbox_2d"}``
  (grounding: right when IoU >= 0.5); images under ``eval_images/``, paths relative to the file.
- ``calibration/``: the project's calibration format (chat items: the question with its image, and the
  answer as the assistant's turn), 128 items each: ``mixed.json`` every task, ``text.json`` the text tasks
  only, ``image.json`` the image tasks only; and ``heldout.json``, 16 more items of every task for
  test_pruned_model.py's prompts (never scored); images under ``images/``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from .tasks import IMAGE_TASKS, TASK_FAMILIES, TASKS, draw_items

EVAL_SEED = 1
EVAL_PER_TASK = 64
DEMO_PER_TASK = 8  # draw_items interleaves tasks, so the first 8 x 8 lines hold 8 of each
CALIBRATION_SEEDS = {"mixed": 2, "text": 3, "image": 4, "heldout": 5}
CALIBRATION_TASKS = {"mixed": TASKS, "text": TASK_FAMILIES["text"], "image": IMAGE_TASKS, "heldout": TASKS}
CALIBRATION_ITEMS = {"mixed": 128, "text": 128, "image": 128, "heldout": 16}

HERE = Path(__file__).resolve().parent


def write_eval(path: Path, per_task: int = EVAL_PER_TASK, seed: int = EVAL_SEED) -> None:
    """The evaluation file, and beside it ``eval_small.jsonl``: its first DEMO_PER_TASK items of each task
    (the demo's quick check)."""
    images = path.parent / "eval_images"
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir(parents=True)
    lines = []
    for i, item in enumerate(draw_items(seed, per_task)):
        rel = None
        if item.image is not None:
            rel = f"eval_images/{i:04d}.png"
            item.image.save(path.parent / rel)
        lines.append(json.dumps(item.record(rel), ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n")
    (path.parent / "eval_small.jsonl").write_text("\n".join(lines[:DEMO_PER_TASK * len(TASKS)]) + "\n")


def write_calibration(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "images").mkdir(parents=True)
    for name, tasks in CALIBRATION_TASKS.items():
        count = CALIBRATION_ITEMS[name]
        items = draw_items(CALIBRATION_SEEDS[name], -(-count // len(tasks)), tasks)[:count]
        records = []
        for i, item in enumerate(items):
            rel = None
            if item.image is not None:
                rel = f"images/{name}-{i:04d}.png"
                item.image.save(folder / rel)
            records.append({"messages": item.messages(rel)})
        (folder / f"{name}.json").write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(HERE), help="folder for eval.jsonl and calibration/")
    args = parser.parse_args(argv)
    out = Path(args.out)
    write_eval(out / "eval.jsonl")
    write_calibration(out / "calibration")
    print(f"wrote {out / 'eval.jsonl'} and {out / 'calibration'}")


if __name__ == "__main__":
    main()
