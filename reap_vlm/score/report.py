"""What reap.py shows of a run: the layers x experts heatmap and the console summary."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint.fsutil import atomic_save
from ..safeguards import safeguard_lines


def write_heatmap(path: Path, scores: list[list[float]], moe_layers: list[int], keep: dict[int, list[int]],
                  criterion: str, marked: dict | None = None) -> Path | None:
    """Layers x experts image of the criterion; kept experts get a dot, ``marked`` ones (the super experts, by
    layer) a red ring."""
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
    rings = [(moe_layers.index(int(layer)), e) for layer, ids in (marked or {}).items() for e in ids]
    if rings:
        ry, rx = zip(*rings)
        ax.scatter(rx, ry, s=40, facecolors="none", edgecolors="red", linewidths=1.2, label="super expert")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    step = max(1, len(moe_layers) // 24)
    ax.set_yticks(range(0, len(moe_layers), step), [str(moe_layers[i]) for i in range(0, len(moe_layers), step)])
    ax.set_title(f"{criterion} per expert (dots: kept" + (", red rings: super experts)" if rings else ")"))
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    try:
        return atomic_save(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


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
    lines += batching_lines(metadata.get("run", {}))
    lines += safeguard_lines(metadata)
    timings = metadata.get("timings", {})
    if timings:
        lines.append("timings          " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return lines


def batching_lines(run: dict) -> list[str]:
    """Padding and encoding of the batches this run scored (none when it scored nothing: a finished run reused)."""
    if "padding_share" not in run:
        return []
    padding = f"padding {run['padding_share']:.1%} of token positions"
    if run.get("sort_window"):
        padding += (f" (sorted by length in windows of {run['sort_window']} batches; file order would pad "
                    f"~{run['padding_share_file_order_estimated']:.0%})")
    workers = run["encode_workers"]
    kind = ("process", "processes") if run.get("encode_kind") == "processes" else ("thread", "threads")
    where = f"{workers} background {kind[workers > 1]}" if workers else "the main thread (inline)"
    encode = (f"encoding {run['encode_seconds']:.1f}s on {where}, the forward waited "
              f"{run['encode_wait_seconds']:.1f}s for batches")
    return [f"batches          {padding}", f"                 {encode}"]
