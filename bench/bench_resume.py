"""A killed full-mode run on a GPU, resumed: bitwise the uninterrupted run's scores?

On a GPU the full mode times its paths once per process (the fused Triton kernels against cuBLAS's batched
matmuls, and each kernel's autotuning configs), and the choice decides how the expert norms are rounded.  A resumed
run takes the choices saved with its sums (``ResumeState.save``, ``triton_experts.use_tuning``).  Each reap.py here
is bitwise the run it continues, and two fresh processes time the paths and configs again (and may round
otherwise).  So the uninterrupted run and the killed one share a Triton cache (the configs timed once, read back
from disk), and the resumed runs each get a fresh one, where everything would be timed again:

* ``whole``: uninterrupted (Triton cache A);
* ``killed``: the same (cache A), killed (SIGKILL) once its saved state covers ``--kill-after`` batches; the bench
  checks from the two saved states that both timed the same choices;
* ``resumed``: the killed run's command again (a fresh cache);
* ``resumed, choices dropped``: the same from a copy of the killed state with the saved choices taken out (what a
  resumed run did before they were saved; a fresh cache).

Run on the GPU machine from the repository root (one GPU; the checkpoint and calibration sets are
bench_end_to_end.py's, same ``--workdir``, written when missing):

    PYTHONUNBUFFERED=1 python3 bench/bench_resume.py --out $OUT         # about 4 device-minutes
    python3 bench/bench_resume.py --tiny --out /tmp/resume              # CPU, tiny shapes (no Triton there)

Writes ``RESULTS_resume.md`` / ``.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_end_to_end import (  # noqa: E402
    Clock,
    bench_device,
    bench_identity,
    log,
    max_rel,
    megapixels,
    shared_arguments,
    spec_for,
    write_calibration,
    write_model,
)

from reap_vlm.score.resume import STATE_NAME  # noqa: E402


def reap_command(args, model: Path, calib: Path, out: Path) -> list[str]:
    return [sys.executable, str(ROOT / "reap.py"), "--model", str(model), "--calibration", str(calib),
            "--output", str(out), "--mode", "full", "--batch-size", str(args.batch_size), "--max-samples",
            str(args.samples), "--max-seq-len", str(args.max_seq_len), "--prune-ratio", "0.5", "--engine", "model",
            "--checkpoint-every", str(args.checkpoint_every), "--device", args.device, "--dtype", args.dtype]


def environment(args, cache_name: str) -> dict:
    """reap.py's environment, with the Triton cache ``cache_name`` (the bench's own, emptied at its start)."""
    cache = Path(args.workdir) / "resume_runs" / "triton" / cache_name
    return {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
            "TRITON_CACHE_DIR": str(cache)}


def saved_batches(out: Path) -> int:
    path = out / STATE_NAME
    if not path.is_file():
        return 0
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["batches_done"])
    except Exception:  # being replaced: the next look reads it
        return 0


def run_to_end(args, cmd: list[str], name: str, cache_name: str, clock: Clock) -> dict | None:
    t0 = time.perf_counter()
    result = subprocess.run(cmd, env=environment(args, cache_name), cwd=ROOT, capture_output=True, text=True,
                            timeout=max(10, clock.left()))
    if result.returncode != 0:
        log(f"{name} failed:", result.stderr[-2000:])
        return None
    meta = json.loads((Path(cmd[cmd.index("--output") + 1]) / "reap_metadata.json").read_text())
    log(f"{name}: {time.perf_counter() - t0:.1f}s, resumed from {meta['run']['resumed_from']}, kernel choices "
        f"taken {meta['run'].get('kernel_choices_resumed')}, warm-up {json.dumps(meta['run'].get('warm_up'))}")
    return meta


def run_killed(args, cmd: list[str], clock: Clock) -> int:
    """Start ``cmd``, SIGKILL it once its saved state covers ``--kill-after`` batches; the batches it covers."""
    out = Path(cmd[cmd.index("--output") + 1])
    log_file = out.parent / "killed.log"  # not a pipe: one nobody reads while it runs would fill and block it
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as sink:
        proc = subprocess.Popen(cmd, env=environment(args, "shared"), cwd=ROOT, stdout=sink, stderr=sink)
    while proc.poll() is None and saved_batches(out) < args.kill_after and clock.left() > 5:
        time.sleep(0.05)
    if proc.poll() is not None:
        log("the run ended before it could be killed:", log_file.read_text()[-2000:])
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = saved_batches(out)
    log(f"killed: its state covers {done} batches")
    return done


def saved_choices(out: Path) -> dict:
    """The kernel choices a run's state was saved with, by what they are for: {("path", shape, dtype, device): path,
    (kernel, key): config}."""
    record = torch.load(out / STATE_NAME, map_location="cpu", weights_only=True).get("kernels", {})
    choices = {("path", str(shape), dtype, device): path for shape, dtype, device, path in record.get("paths", [])}
    for kernel, entries in record.get("configs", {}).items():
        choices.update({(kernel, str(key)): json.dumps(kwargs, sort_keys=True) for key, kwargs in entries})
    return choices


def same_choices(a: dict, b: dict) -> str:
    """Whether two processes timed the same choices where both timed one."""
    common = set(a) & set(b)
    return f"{'yes' if all(a[k] == b[k] for k in common) else 'no'} ({len(common)} compared)"


def compare(a: dict, b: dict) -> dict:
    names = sorted(set(a["metrics"]) & set(b["metrics"]))
    return {"bitwise": all(a["metrics"][n] == b["metrics"][n] for n in names),
            "max_rel_diff": max(max_rel(a["metrics"][n], b["metrics"][n]) for n in names),
            "same_keep": a["experts_to_keep"] == b["experts_to_keep"]}


def table(results: dict) -> str:
    lines = [f"# A killed full-mode run, resumed ({results['device']}, {results['shape']})", "",
             f"text set, {results['samples']} samples, batch {results['batch_size']}, state saved every "
             f"{results['checkpoint_every']} batches, killed once it covered {results['killed_at']}; the uninterrupted "
             "and the killed run share a Triton cache, each resumed run has a fresh one. The two timed the same kernel "
             f"choices: {results.get('same_choices_whole_and_killed')}. Compared with the uninterrupted run, every "
             "metric:", "",
             "| run | resumed from | kernel choices taken | bitwise | max rel diff | same keep |",
             "|---|---|---|---|---|---|"]
    for name, row in results["rows"].items():
        lines.append(f"| {name} | {row['resumed_from']} | {row['taken']} | {row['bitwise']} | "
                     f"{row['max_rel_diff']:.1e} | {row['same_keep']} |")
    if results["not_run"]:
        lines += ["", "Not run: " + "; ".join(results["not_run"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shared_arguments(parser, "5; --tiny 2")
    parser.add_argument("--samples", type=int, default=256, help="text-heavy samples")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--checkpoint-every", type=int, default=4)
    parser.add_argument("--kill-after", type=int, default=12, help="batches the killed run's state covers")
    args = parser.parse_args()
    bench_device(args)
    if args.tiny:
        args.samples, args.batch_size, args.max_seq_len = 24, 2, 256
        args.checkpoint_every, args.kill_after = 2, 4
        args.workdir += "-tiny"
    clock = Clock(args.max_minutes or (2 if args.tiny else 5))
    workdir = Path(args.workdir)
    log("writing the checkpoint and the text set in", workdir)
    model = write_model(workdir / "model", spec_for(args), args.tiny, args.device)
    calib = write_calibration(workdir / "calibration", "text", args.samples, megapixels(args))
    runs = workdir / "resume_runs"
    shutil.rmtree(runs, ignore_errors=True)
    results = {**bench_identity(args), "samples": args.samples, "batch_size": args.batch_size,
               "checkpoint_every": args.checkpoint_every, "killed_at": None, "rows": {}, "not_run": clock.skipped}
    whole = run_to_end(args, reap_command(args, model, calib, runs / "whole"), "whole", "shared", clock)
    killed_cmd = reap_command(args, model, calib, runs / "killed")
    if whole and clock.allows("killed and resumed runs", 3 * 30):
        results["killed_at"] = run_killed(args, killed_cmd, clock)
        results["same_choices_whole_and_killed"] = same_choices(saved_choices(runs / "whole"),
                                                                saved_choices(runs / "killed"))
        dropped = runs / "dropped"
        shutil.copytree(runs / "killed", dropped)
        state = torch.load(dropped / STATE_NAME, map_location="cpu", weights_only=True)
        state.pop("kernels", None)
        torch.save(state, dropped / STATE_NAME)
        for name, cmd in (("resumed", killed_cmd),
                          ("resumed, choices dropped", reap_command(args, model, calib, dropped))):
            meta = run_to_end(args, cmd, name, name, clock)
            if meta:
                results["rows"][name] = {"resumed_from": meta["run"]["resumed_from"],
                                         "taken": meta["run"].get("kernel_choices_resumed"), **compare(whole, meta)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "RESULTS_resume.json").write_text(json.dumps(results, indent=2))
    (out / "RESULTS_resume.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
