"""reap_metadata.json: what reap.py found and which experts to keep; plus its heatmap and summary."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .checkpoint.fsutil import atomic_write_json, read_json
from .errors import ReapError

REAP_VERSION = "reap-vlm-0.1"
METHODOLOGY = ("REAP_j = sum over valid tokens x routed to expert j of g_j(x) * ||E_j(x)||_2, divided by the "
               "number of such tokens; g_j = the gate weight the model applies (softmax over all experts, top-k, "
               "renormalised), E_j(x) = expert output before weighting; sums in float64 (arXiv 2510.13999)")
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
    if not isinstance(raw, dict):
        raise ReapError(f"{path} is not a reap_metadata.json object; rerun reap.py")
    missing = [k for k in ("moe_layers", "experts_to_keep", "num_experts") if k not in raw]
    if missing:
        raise ReapError(f"{path} lacks {', '.join(missing)}; it was not written by reap.py (rerun ./run.sh reap)")
    return ReapMetadata(raw, Path(path))


def write_metadata(folder: Path, metadata: dict) -> Path:
    path = Path(folder) / METADATA_NAME
    atomic_write_json(path, metadata)
    return path
