"""Pruned tiny Qwen3-VL-MoE checkpoints for the vLLM loader check, built offline in vLLM's environment.

This folder is not part of the main suite (pyproject's testpaths is tests/); .ci/vllm runs it in a venv made
from requirements-vllm.txt.  The project's fixture builder and pruner run here as they are (torch and
transformers are vLLM's; the pruner's output is byte-identical to the main venv's).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from reap_vlm.fixtures.quantized import build_quantized_checkpoint  # noqa: E402
from reap_vlm.fixtures.tiny import (  # noqa: E402
    FixtureSpec,
    build_calibration_set,
    build_tiny_checkpoint,
    write_sharded_safetensors,
)
from reap_vlm.prune.rewrite import prune_checkpoint  # noqa: E402

# 7 of 12 per layer, a different non-contiguous set in every layer (as tests/test_pruning.py).
KEEP = {
    0: [0, 2, 3, 5, 7, 9, 11],
    1: [1, 2, 4, 6, 8, 10, 11],
    2: [0, 1, 4, 5, 6, 9, 10],
    3: [2, 3, 5, 6, 8, 10, 11],
}


@pytest.fixture(scope="session")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    return {"fused": build_tiny_checkpoint(root / "fused"),
            "per-expert": build_tiny_checkpoint(root / "per-expert", FixtureSpec(per_expert=True))}


@pytest.fixture(scope="session")
def calibration(tmp_path_factory) -> Path:
    return build_calibration_set(tmp_path_factory.mktemp("calibration") / "set")


def run_script(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """One of the project's scripts, as a user runs it (in this venv, away from any .env and REAP_*)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REAP_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="session")
def pruned(sources, tmp_path_factory) -> dict[str, Path]:
    """prune_model.py's output (its prune_checkpoint) for both layouts."""
    root = tmp_path_factory.mktemp("pruned")
    for layout, source in sources.items():
        prune_checkpoint(source, root / layout, KEEP, verify=False, progress=False)
    return {layout: root / layout for layout in sources}


def pruned_quantized(root: Path, fmt: str) -> Path:
    """A per-expert checkpoint quantized in ``fmt`` as its releases are (reap_vlm.fixtures.quantized), pruned.  Sizes
    in multiples of 32 (vLLM's CPU WNA16 kernel wants them), blocks and groups of 32."""
    spec = FixtureSpec(per_expert=True, moe_intermediate_size=96, vision_intermediate_size=96, intermediate_size=128)
    options = {"block": (32, 32)} if fmt == "fp8" else {"group_size": 32}
    source, _ = build_quantized_checkpoint(root / f"{fmt}-source", fmt, spec=spec, **options)
    prune_checkpoint(source, root / fmt, KEEP, verify=False, progress=False)
    return root / fmt


def read_tensors(folder: Path) -> dict:
    from safetensors import safe_open

    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for shard in sorted(set(index.values())):
        with safe_open(folder / shard, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def edited_copy(source: Path, target: Path, tensors: Callable[[dict], dict] | None = None,
                config: Callable[[dict], None] | None = None) -> Path:
    """``source`` copied to ``target`` with its tensors replaced by ``tensors(all of them)`` (written again
    in 3 shards with an index) and/or config.json edited in place by ``config``."""
    shutil.copytree(source, target)
    if tensors is not None:
        state = tensors(read_tensors(source))
        for old in [*target.glob("*.safetensors"), target / "model.safetensors.index.json"]:
            old.unlink()
        write_sharded_safetensors(target, {k: v.contiguous() for k, v in state.items()}, 3)
    if config is not None:
        data = json.loads((target / "config.json").read_text())
        config(data)
        (target / "config.json").write_text(json.dumps(data, indent=2))
    return target


def run_check(folder: Path, *args: str, expect: tuple[int, ...] = (0, 1)) -> tuple[int, str]:
    """``python -m reap_vlm.check.vllm_load FOLDER``, as a user runs it: one process per check (vLLM's
    distributed state is per process); returns the exit status and stdout."""
    done = subprocess.run([sys.executable, "-m", "reap_vlm.check.vllm_load", str(folder), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    if done.returncode not in expect:
        raise AssertionError(f"the check did not run (exit {done.returncode}):\n{done.stdout}\n{done.stderr[-3000:]}")
    return done.returncode, done.stdout
