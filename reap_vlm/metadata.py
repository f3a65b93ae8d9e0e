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


def write_heatmap(path: Path, scores: list[list[float]], moe_layers: list[int], keep: dict[int, list[int]],
                  criterion: str) -> Path | None:
    """Layers x experts image of the criterion; kept experts get a dot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        return None
    data = np.asarray(scores, dtype=float)
    fig, ax = plt.subplots(figsize=(min(24, 4 + data.shape[1] * 0.12), min(18, 2 + data.shape[0] * 0.25)))
    image = ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest")
    kept = [(row, e) for row, layer in enumerate(moe_layers) for e in keep.get(layer, [])]
    ys, xs = zip(*kept) if kept else ((), ())
    ax.scatter(xs, ys, s=4, c="white", marker=".", linewidths=0, label="kept")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    step = max(1, len(moe_layers) // 24)
    ax.set_yticks(range(0, len(moe_layers), step), [str(moe_layers[i]) for i in range(0, len(moe_layers), step)])
    ax.set_title(f"{criterion} per expert (dots: kept)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def summary_lines(metadata: dict) -> list[str]:
    """A one-screen summary of a REAP run."""
    keep = metadata["num_experts_to_keep"]
    tokens = metadata["num_tokens"]
    scores = metadata["mean_scores"]
    lines = [
        f"model            {metadata['model_path']} ({metadata['model_type']})",
        f"mode/criterion   {metadata['scoring_mode']} / {metadata['criterion']}",
        f"samples/tokens   {metadata['num_samples']} samples, {tokens['total']} tokens "
        f"({tokens['image']} image, {tokens['text']} text)",
        f"experts          keep {keep} of {metadata['num_experts']} in each of {len(metadata['moe_layers'])} "
        f"MoE layers (prune ratio {metadata['prune_ratio']})",
    ]
    if "frequency" in metadata["metrics"]:
        zero = [sum(1 for c in row if c == 0) for row in metadata["metrics"]["frequency"]]
        lines.append(f"never routed     {sum(zero)} expert-layer pairs (max {max(zero)} in one layer)")
    worst = []
    for row, layer in zip(scores, metadata["moe_layers"]):
        kept = set(metadata["experts_to_keep"][str(layer)])
        dropped = [s for e, s in enumerate(row) if e not in kept]
        total = sum(row) or 1.0
        worst.append((sum(dropped) / total, layer))
    share, layer = max(worst)
    lines.append(f"pruned share     at most {share:.1%} of a layer's total {metadata['criterion']} "
                 f"(layer {layer})")
    timings = metadata.get("timings", {})
    if timings:
        lines.append("timings          " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return lines
