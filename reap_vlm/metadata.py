"""reap_metadata.json, the file between scoring and pruning: its schema (``build_metadata`` writes every field,
``ReapMetadata`` checks what pruning relies on), reading and writing."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .checkpoint.fsutil import atomic_write_json, read_json
from .errors import ReapError
from .schema import int_list, is_int, is_int_key, is_number, matrix, validate

if TYPE_CHECKING:
    import torch

    from .calibration.files import CalibrationSet
    from .checkpoint.reader import Checkpoint
    from .settings import Settings

REAP_VERSION = "reap-vlm-0.1"
METHODOLOGY = ("REAP_j = sum over valid tokens x routed to expert j of g_j(x) * ||E_j(x)||_2, divided by the "
               "number of such tokens; g_j = the gate weight the model applies ({routing}), E_j(x) = expert output "
               "before weighting; sums in float64 (arXiv 2510.13999)")


def methodology(routing: str) -> str:
    """The formula in words, with the family's routing (``ModelFamily.routing_description``)."""
    return METHODOLOGY.format(routing=routing)
METADATA_NAME = "reap_metadata.json"


@dataclass
class ReapMetadata:
    """The parts of reap_metadata.json that pruning relies on, checked on load."""

    raw: dict
    path: Path

    @property
    def moe_layers(self) -> list[int]:
        return [int(x) for x in self.raw["moe_layers"]]

    @property
    def experts_to_keep(self) -> dict[int, list[int]]:
        return {int(k): [int(e) for e in v] for k, v in self.raw["experts_to_keep"].items()}

    @property
    def metrics(self) -> dict[str, list[list[float]]]:
        return self.raw.get("metrics", {})


def load_metadata(path: Path) -> ReapMetadata:
    raw = read_json(path, "REAP metadata")
    return ReapMetadata(validate_metadata(raw, Path(path)), Path(path))


def validate_metadata(raw, path: Path) -> dict:
    """Types, ranges and integers of every field pruning and checking use, before any is used."""
    fix = "it was edited by hand or not written by reap.py — rerun reap.py (./run.sh reap)"
    validate(raw, path, "REAP metadata", {
        "num_experts": (lambda v: is_int(v, 1), "a positive integer", True),
        "moe_layers": (lambda v: int_list(v) and v and len(set(v)) == len(v), "a list of distinct layer numbers",
                       True),
        "experts_to_keep": (lambda v: isinstance(v, dict) and v and all(map(is_int_key, v)),
                            "an object from layer number to expert ids", True),
    }, fix)
    experts, layers = raw["num_experts"], raw["moe_layers"]
    rows = matrix(len(layers), experts)
    validate(raw, path, "REAP metadata", {
        "experts_to_keep": (lambda v: all(int_list(ids, 0, experts) and ids for ids in v.values()),
                            f"lists of expert ids in 0..{experts - 1}", True),
        "top_k": (lambda v: is_int(v, 1), "a positive integer", False),
        "num_experts_to_keep": (lambda v: is_int(v, 1), "a positive integer", False),
        "prune_ratio": (lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)", False),
        "keep_multiple": (lambda v: is_int(v, 1), "a positive integer", False),
        "criterion": (lambda v: isinstance(v, str), "a string", False),
        "scoring_mode": (lambda v: isinstance(v, str), "a string", False),
        "model_path": (lambda v: isinstance(v, str) and v, "a path string", False),
        "calibration_path": (lambda v: isinstance(v, str), "a path string", False),
        "calibration_samples": (int_list, "a list of item numbers", False),
        "metrics": (lambda v: isinstance(v, dict) and all(rows(m) for m in v.values()),
                    f"an object of {len(layers)} x {experts} number tables", False),
        "mean_scores": (rows, f"a {len(layers)} x {experts} number table", False),
    }, fix)
    return raw


def write_metadata(folder: Path, metadata: dict) -> Path:
    path = Path(folder) / METADATA_NAME
    atomic_write_json(path, metadata)
    return path


@dataclass
class RunInputs:
    """What a scoring run was: the model, the calibration set, the settings that shape the scores."""

    ckpt: Checkpoint
    calibration: CalibrationSet
    settings: Settings
    dtype: torch.dtype
    keep: int  # experts kept per MoE layer


def build_metadata(run_inputs: RunInputs, metrics: dict[str, list[list[float]]], kept: dict[int, list[int]],
                   n_tokens: int, n_image: int, run: dict, timings: dict) -> dict:
    """reap_metadata.json's content, every field in its place."""
    ckpt, calib, settings = run_inputs.ckpt, run_inputs.calibration, run_inputs.settings
    return {
        "reap_version": REAP_VERSION,
        "methodology": methodology(ckpt.family.routing_description),
        "model_path": str(ckpt.path),
        "model_type": ckpt.config.get("model_type"),
        "num_experts": ckpt.num_experts,
        "top_k": ckpt.top_k,
        "moe_layers": ckpt.moe_layers,
        "scoring_mode": settings.scoring_mode,
        "criterion": settings.criterion,
        "prune_ratio": settings.prune_ratio,
        "keep_multiple": settings.keep_multiple,
        "num_experts_to_keep": run_inputs.keep,
        "num_samples": len(calib.samples),
        "num_skipped_samples": len(calib.skipped),
        "skipped_samples": calib.skipped,
        "calibration_path": str(calib.path),
        "calibration_samples": [s.index for s in calib.samples],
        "num_tokens": {"total": n_tokens, "text": n_tokens - n_image, "image": n_image},
        "dtype": str(run_inputs.dtype).removeprefix("torch."),
        "experts_to_keep": {str(layer): ids for layer, ids in kept.items()},
        "mean_scores": metrics[settings.criterion],
        "metrics": metrics,
        "run": run,
        "timings": timings,
    }


def check_finite(metrics: dict[str, list[list[float]]], dtype) -> None:
    bad = [name for name, rows in metrics.items() if not all(math.isfinite(v) for row in rows for v in row)]
    if bad:
        name = str(dtype).removeprefix("torch.")
        if name in ("float32", "float64"):  # no overflow in these: the weights (or inputs) themselves are broken
            raise ReapError(f"non-finite scores ({', '.join(bad)}) in {name}: the checkpoint's weights hold NaN or "
                            "inf (a corrupt download or a diverged fine-tune); check and replace the model")
        raise ReapError(f"non-finite scores ({', '.join(bad)}): the expert outputs are NaN or inf — they overflowed "
                        f"in {name}, or the checkpoint's weights hold NaN/inf; rerun with --dtype float32 to tell")
