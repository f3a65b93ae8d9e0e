"""prune_model.py's work: reap_metadata.json -> kept experts -> pruned checkpoint."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint.reader import Checkpoint
from ..errors import ReapError
from ..metadata import METADATA_NAME, load_metadata
from .keep import (
    keep_from_metadata,
    recomputed_metadata,
    recorded_selection,
    selection_changes,
    selection_from_metadata,
)
from .rewrite import prune_checkpoint


def prune_from_settings(settings) -> tuple[dict, Path]:
    """prune_model.py's work: metadata -> kept experts -> pruned checkpoint; returns (record, output folder)."""
    metadata_path = settings.metadata_path or Path(settings.output_path) / METADATA_NAME
    if not Path(metadata_path).is_file():
        raise ReapError(f"no REAP metadata at {metadata_path}; run reap.py first or pass --metadata "
                        "(REAP_METADATA_PATH)")
    metadata = load_metadata(metadata_path)
    source = settings.model_path or metadata.raw.get("model_path")
    if source is None or not (Path(source) / "config.json").is_file():
        raise ReapError(f"source model {source} (from {'--model' if settings.model_path else metadata_path}) is not "
                        "a checkpoint folder; pass --model / REAP_MODEL_PATH")
    ckpt = Checkpoint(Path(source))
    raw = metadata.raw
    overrides, changes = selection_changes(settings, raw)
    recorded = recorded_selection(raw)
    if changes:
        why = "recomputing the selection: " + "; ".join(changes)
        print(why, flush=True)
        chosen = {**recorded, **overrides}
        chosen["criterion"] = chosen["criterion"] or "reap"
        keep, safeguards = selection_from_metadata(metadata, ckpt.num_experts, ckpt.top_k, **chosen)
        selection = {"source": "recomputed", **chosen, "why": why}
        if safeguards:
            selection["safeguards"] = safeguards
    else:
        keep = keep_from_metadata(metadata, ckpt.num_experts, ckpt.top_k)
        selection = {"source": "metadata", **recorded}
    selection["num_experts_to_keep"] = len(next(iter(keep.values()))) if keep else 0
    updated = recomputed_metadata(raw, keep, selection) if changes else None
    record = prune_checkpoint(ckpt.path, settings.pruned_output_path, keep, force=settings.force,
                              reap_metadata_path=Path(metadata_path), verify=settings.verify,
                              reap_metadata=updated, selection=selection, reap_output=Path(settings.output_path))
    return record, Path(settings.pruned_output_path)
