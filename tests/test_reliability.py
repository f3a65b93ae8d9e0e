"""A hostile user's inputs and faults: each ends in one clear line and its exit code, never a traceback or a wrong
result with exit 0; nothing is left half-written and the source is never touched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from reap_vlm.checkpoint.loading import load_model
from reap_vlm.checkpoint.reader import INDEX_NAME
from reap_vlm.errors import ReapError
from reap_vlm.score.job import run_reap
from reap_vlm.settings import Settings

ROUTER = "model.language_model.layers.1.mlp.gate.weight"


def settings(model, calib_file, out, **kw) -> Settings:
    base = dict(model_path=Path(model), calibration_path=Path(calib_file), output_path=Path(out), device="cpu",
                dtype="float32", prune_ratio=0.25, max_samples=100, resume=False)
    base.update(kw)
    return Settings(**base)


def copy_model(tiny_model: Path, folder: Path) -> Path:
    return Path(shutil.copytree(tiny_model, folder))


def shard_of(folder: Path, key: str) -> Path:
    return folder / json.loads((folder / INDEX_NAME).read_text())["weight_map"][key]


def rewrite_shard(folder: Path, key: str, change) -> None:
    """Apply ``change(tensors)`` to the shard holding ``key`` and keep the index in step."""
    shard = shard_of(folder, key)
    with safe_open(shard, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index = json.loads((folder / INDEX_NAME).read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name or k in tensors}
    index["weight_map"].update({k: shard.name for k in tensors})
    (folder / INDEX_NAME).write_text(json.dumps(index))


# ----------------------------------------------------------------------------------------------- (1) the checkpoint

def test_other_weights_under_the_same_names_are_not_resumed(tiny_model, calibration, tmp_path):
    model = copy_model(tiny_model, tmp_path / "model")
    calib = calibration / "calibration_data.json"
    first = run_reap(settings(model, calib, tmp_path / "out", resume=True))
    generator = torch.Generator().manual_seed(1)
    rewrite_shard(model, ROUTER, lambda t: t.update({k: torch.randn(v.shape, generator=generator)
                                                     for k, v in t.items() if v.is_floating_point()}))
    again = run_reap(settings(model, calib, tmp_path / "out", resume=True))
    assert again["run"]["resumed_from"] == 0
    assert again["metrics"]["reap"] != first["metrics"]["reap"]


def test_a_missing_weight_is_never_initialised_at_random(tiny_model, tmp_path):
    model = copy_model(tiny_model, tmp_path / "model")
    rewrite_shard(model, ROUTER, lambda t: t.pop(ROUTER))
    with pytest.raises(ReapError, match=f"missing from the checkpoint .*{ROUTER}"):
        load_model(model)
