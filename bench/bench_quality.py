"""Does a pruned model still work?  Task accuracy of the trained reference model after pruning, by criterion,
prune ratio and calibration set, each through the real path.

    python bench/bench_quality.py                      # the default grid, CPU, writes bench/RESULTS_quality.*
    python bench/bench_quality.py --ratios 0.5 --criteria reap,frequency --calibrations mixed --per-task 4

For each calibration set (reference/calibration/{mixed,text,image}.json) reap.py scores the reference model
(full mode: every metric at once); for each prune ratio and criterion prune_model.py writes the pruned
checkpoint (recomputing the selection from the stored metrics, as a user's --criterion / --prune-ratio
does), and the pruned folder is loaded and answers the evaluation items (reference/eval.jsonl) with the
check's own code (reap_vlm.check.accuracy, what test_pruned_model.py --eval runs).  ``random`` keeps a
uniformly random set of experts per layer (the mean of --random-seeds seeds; no calibration involved),
written by the same pruning code.  ``NAME+protect`` (e.g. ``reap+protect``) is --criterion NAME
--protect-super-experts; ``reap_balanced`` is the modality-balanced REAP.  The unpruned model is the baseline.
Each scoring run's super-expert profile (flagged experts, thresholds, the largest max activations per layer)
and calibration coverage go into the JSON under "profiles".

Writes RESULTS_quality.json ({"baseline": {task: acc}, "runs": [{"criterion", "ratio", "calibration",
"accuracy": {task: acc}}], ...}), RESULTS_quality.md (a table per task family) and RESULTS_quality.png
(accuracy vs prune ratio, a line per criterion, a panel per task family and calibration).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CRITERIA = ("reap", "reap_dense", "ean", "frequency", "weighted_frequency", "random", "reap_balanced",
            "reap+protect")
# A criterion NAME+protect is --criterion NAME --protect-super-experts.
PROTECT = "+protect"
CALIBRATIONS = ("mixed", "text", "image")
RATIOS = (0.25, 0.5, 0.75)


def clean_environment(work: Path) -> None:
    """The grid's settings are its flags alone: no REAP_* variable or .env file of the caller's."""
    for name in [n for n in os.environ if n.startswith("REAP_")]:
        del os.environ[name]
    empty = work / "empty.env"
    empty.write_text("")
    os.environ["REAP_ENV_FILE"] = str(empty)
    os.environ["TQDM_DISABLE"] = "1"  # one line per run instead of every stage's bars


def run_script(script, argv: list[str]) -> None:
    """A top-level script's main(), as its command line runs it; its console output is dropped."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        code = script.main(argv)
    if code:
        raise SystemExit(f"{script.__name__} {' '.join(argv)} exited {code}")


class Evaluator:
    def __init__(self, eval_file: Path, per_task: int, max_new_tokens: int):
        from reap_vlm.check.accuracy import load_eval_items

        items = load_eval_items(eval_file)
        counts: dict[str, int] = {}
        self.items = []
        for item in items:  # the first per_task items of each task, in file order
            if counts.get(item.task, 0) < per_task:
                counts[item.task] = counts.get(item.task, 0) + 1
                self.items.append(item)
        self.max_new_tokens = max_new_tokens

    def __call__(self, model_path: Path) -> dict[str, float]:
        import torch

        from reap_vlm.check.accuracy import accuracy_by_task, answer_items
        from reap_vlm.check.runner import ModelRunner

        runner = ModelRunner(model_path, device="cpu", dtype=torch.float32)
        try:
            answers = answer_items(runner, self.items, self.max_new_tokens)
            return accuracy_by_task(self.items, answers, runner.family.box_format)
        finally:
            runner.close()


def random_keep(moe_layers: list[int], num_experts: int, keep: int, seed: int) -> dict[int, list[int]]:
    rng = random.Random(f"random-keep:{seed}")
    return {layer: sorted(rng.sample(range(num_experts), keep)) for layer in moe_layers}


def score(model: Path, calibration: Path, out: Path, max_samples: int) -> Path:
    import reap as reap_script

    run_script(reap_script, ["--model", str(model), "--calibration", str(calibration), "--output", str(out),
                             "--mode", "full", "--max-samples", str(max_samples), "--batch-size", "16",
                             "--device", "cpu", "--no-resume"])
    return out


def prune(reap_out: Path, pruned: Path, criterion: str, ratio: float) -> None:
    import prune_model as prune_script

    shutil.rmtree(pruned, ignore_errors=True)
    flags = ["--criterion", criterion.removesuffix(PROTECT)] + (["--protect-super-experts"]
                                                                 if criterion.endswith(PROTECT) else [])
    run_script(prune_script, ["--reap-output", str(reap_out), "--output", str(pruned), *flags,
                              "--prune-ratio", str(ratio)])


def prune_random(model: Path, reap_out: Path, pruned: Path, ratio: float, seed: int) -> None:
    from reap_vlm.checkpoint.reader import Checkpoint
    from reap_vlm.prune.rewrite import prune_checkpoint
    from reap_vlm.selection import num_to_keep

    shutil.rmtree(pruned, ignore_errors=True)
    ckpt = Checkpoint(model)
    keep = num_to_keep(ckpt.num_experts, ratio, 1, ckpt.top_k)
    kept = random_keep(ckpt.moe_layers, ckpt.num_experts, keep, seed)
    selection = {"source": "random", "criterion": "random", "prune_ratio": ratio, "seed": seed,
                 "num_experts_to_keep": keep}
    prune_checkpoint(ckpt.path, pruned, kept, force=False, reap_metadata_path=reap_out / "reap_metadata.json",
                     verify=False, selection=selection, reap_output=reap_out)


def super_expert_profile(reap_out: Path) -> dict:
    """What the scoring run measured of the super-expert criterion: the experts it flags, its thresholds, the
    coverage, and per MoE layer the largest max activations beside the 99.5th percentile over every expert."""
    metadata = json.loads((reap_out / "reap_metadata.json").read_text())
    peaks = metadata["metrics"]["max_activation"]
    return {"super_experts": metadata["super_experts"], "calibration_coverage": metadata["calibration_coverage"],
            "layers": {str(layer): sorted(((v, e) for e, v in enumerate(row)), reverse=True)[:4]
                       for layer, row in zip(metadata["moe_layers"], peaks)}}


def mean_accuracy(runs: list[dict[str, float]]) -> dict[str, float]:
    return {task: sum(r[task] for r in runs) / len(runs) for task in runs[0]}


def run_grid(args) -> dict:
    from reference.tasks import TASK_FAMILIES

    work = Path(tempfile.mkdtemp(prefix="bench-quality-", dir=args.workdir))
    saved = dict(os.environ)
    clean_environment(work)
    evaluate = Evaluator(Path(args.eval), args.per_task, args.max_new_tokens)
    model = Path(args.model)
    started = time.perf_counter()
    result = {"command": " ".join(["python", "bench/bench_quality.py", *sys.argv[1:]]), "model": str(model),
              "eval_items": len(evaluate.items), "per_task": args.per_task, "max_samples": args.max_samples,
              "families": {f: list(t) for f, t in TASK_FAMILIES.items()}, "runs": []}
    try:
        result["baseline"] = evaluate(model)
        print(f"baseline {json.dumps(result['baseline'])}", flush=True)
        pruned = work / "pruned"
        for calibration in args.calibrations:
            reap_out = score(model, Path(args.calibration_dir) / f"{calibration}.json", work / f"reap-{calibration}",
                             args.max_samples)
            result.setdefault("profiles", {})[calibration] = super_expert_profile(reap_out)
            for ratio in args.ratios:
                for criterion in [c for c in args.criteria if c != "random"]:
                    prune(reap_out, pruned, criterion, ratio)
                    accuracy = evaluate(pruned)
                    result["runs"].append({"criterion": criterion, "ratio": ratio, "calibration": calibration,
                                           "accuracy": accuracy})
                    print(f"{calibration:6} {ratio:.2f} {criterion:18} {json.dumps(accuracy)}", flush=True)
        if "random" in args.criteria:
            reap_out = work / f"reap-{args.calibrations[0]}"  # only its metadata travels along; no selection
            for ratio in args.ratios:
                seeds = []
                for seed in range(args.random_seeds):
                    prune_random(model, reap_out, pruned, ratio, seed)
                    seeds.append(evaluate(pruned))
                accuracy = mean_accuracy(seeds)
                result["runs"].append({"criterion": "random", "ratio": ratio, "calibration": "none",
                                       "accuracy": accuracy, "seeds": seeds})
                print(f"none   {ratio:.2f} random (x{args.random_seeds})   {json.dumps(accuracy)}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        os.environ.clear()
        os.environ.update(saved)  # the caller's environment as it was (tests run this in-process)
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


# ------------------------------------------------------------------------------------------------ report

def family_accuracy(accuracy: dict[str, float], tasks: list[str]) -> float:
    return sum(accuracy[t] for t in tasks) / len(tasks)


def _cell(result: dict, criterion: str, calibration: str, ratio: float, tasks: list[str]) -> str:
    for run in result["runs"]:
        if run["criterion"] == criterion and run["ratio"] == ratio and run["calibration"] in (calibration, "none"):
            return f"{100 * family_accuracy(run['accuracy'], tasks):.0f}"
    return ""


def markdown(result: dict, criteria, calibrations, ratios) -> str:
    families = {**result["families"], "all tasks": [t for ts in result["families"].values() for t in ts]}
    lines = ["# Pruning quality on the reference model", "",
             f"`{result['command']}` ({result['seconds'] / 60:.1f} min; {result['eval_items']} evaluation items, "
             f"{result['per_task']} per task; calibration: {result['max_samples']} samples of each set).", "",
             "Accuracy in % (mean over the family's tasks). Columns: calibration set / prune ratio. "
             "`random` does not use calibration: its row is the same under every set (mean of "
             f"{len(next((r['seeds'] for r in result['runs'] if 'seeds' in r), [0]))} seeds).", ""]
    header = "| criterion | " + " | ".join(f"{c} {r:g}" for c in calibrations for r in ratios) + " |"
    rule = "|---|" + "---|" * (len(calibrations) * len(ratios))
    for family, tasks in families.items():
        base = 100 * family_accuracy(result["baseline"], tasks)
        lines += [f"## {family} ({', '.join(tasks)}): unpruned {base:.0f}", "", header, rule]
        for criterion in criteria:
            cells = [_cell(result, criterion, c, r, tasks) for c in calibrations for r in ratios]
            lines.append(f"| {criterion} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Per task", "", "| calibration | ratio | criterion | " + " | ".join(result["baseline"]) + " |",
              "|---|---|---|" + "---|" * len(result["baseline"]),
              "| — | 0 | unpruned | " + " | ".join(f"{100 * v:.0f}" for v in result["baseline"].values()) + " |"]
    for run in result["runs"]:
        lines.append(f"| {run['calibration']} | {run['ratio']:g} | {run['criterion']} | "
                     + " | ".join(f"{100 * run['accuracy'][t]:.0f}" for t in result["baseline"]) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path, criteria, calibrations, ratios) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = result["families"]
    fig, axes = plt.subplots(len(calibrations), len(families), figsize=(4 * len(families), 3 * len(calibrations)),
                             squeeze=False, sharey=True)
    for row, calibration in enumerate(calibrations):
        for col, (family, tasks) in enumerate(families.items()):
            ax = axes[row][col]
            for criterion in criteria:
                points = [(0.0, family_accuracy(result["baseline"], tasks))]
                for ratio in ratios:
                    cell = _cell(result, criterion, calibration, ratio, tasks)
                    if cell:
                        points.append((ratio, float(cell) / 100))
                ax.plot(*zip(*points), marker="o", label=criterion,
                        linestyle="--" if criterion == "random" else "-")
            ax.set_title(f"{family} — calibration: {calibration}", fontsize=9)
            ax.set_xlabel("prune ratio")
            ax.set_ylim(-0.02, 1.02)
            if col == 0:
                ax.set_ylabel("accuracy")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "reference/model"))
    parser.add_argument("--eval", default=str(ROOT / "reference/eval.jsonl"))
    parser.add_argument("--calibration-dir", default=str(ROOT / "reference/calibration"))
    parser.add_argument("--ratios", default=",".join(map(str, RATIOS)))
    parser.add_argument("--criteria", default=",".join(CRITERIA))
    parser.add_argument("--calibrations", default=",".join(CALIBRATIONS))
    parser.add_argument("--per-task", type=int, default=24, help="evaluation items per task (the file's first)")
    parser.add_argument("--max-samples", type=int, default=128, help="calibration samples scored per set")
    parser.add_argument("--random-seeds", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--workdir", default=None, help="folder for scores and pruned copies (default: temp)")
    parser.add_argument("--out", default=str(ROOT / "bench"), help="folder for RESULTS_quality.{json,md,png}")
    args = parser.parse_args(argv)
    args.ratios = [float(r) for r in args.ratios.split(",")]
    args.criteria = args.criteria.split(",")
    args.calibrations = args.calibrations.split(",")
    unknown = set(args.criteria) - set(CRITERIA)
    if unknown:
        parser.error(f"unknown criteria {sorted(unknown)}; choose from {', '.join(CRITERIA)}")
    result = run_grid(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "RESULTS_quality.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "RESULTS_quality.md").write_text(markdown(result, args.criteria, args.calibrations, args.ratios))
    plot(result, out / "RESULTS_quality.png", args.criteria, args.calibrations, args.ratios)
    print(f"wrote {out}/RESULTS_quality.{{json,md,png}} in {result['seconds'] / 60:.1f} min")
    return result


if __name__ == "__main__":
    main()
