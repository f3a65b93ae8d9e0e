"""Streaming expert pruning of a safetensors checkpoint: read tensor by tensor, write only kept experts.

Nothing is ever loaded whole.  The plan (``prune_plan``) maps every output tensor to byte ranges of its
source shard; ``safetensors_io`` copies them file to file; ``config_edit`` rewrites config.json in place;
``prune_verify`` checks the result with ``--verify``.  This module checks the inputs and the output
location, carries the other files over and builds the output folder atomically.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from .checkpoint import INDEX_NAME, Checkpoint
from .config_edit import prune_config_text
from .errors import ReapError
from .fsutil import atomic_output_dir, atomic_write_bytes, atomic_write_json, read_json
from .metadata import METADATA_NAME, ReapMetadata, load_metadata
from .prune_plan import PrunePlan, ShardPlan, new_ids, plan_pruning
from .prune_verify import verify_pruned
from .safetensors_io import read_header, write_from_spans
from .selection import num_to_keep, select_experts

__all__ = ["PRUNING_RECORD", "check_experts_to_keep", "keep_from_metadata", "prune_checkpoint", "prune_from_settings",
           "read_header", "verify_pruned", "write_shard"]

PRUNING_RECORD = "pruning_record.json"
DISK_MARGIN = 64 << 20  # headers, config, filesystem slack


# ----------------------------------------------------------------------------------------------- what to keep

def check_experts_to_keep(experts_to_keep: dict, moe_layers: list[int], num_experts: int,
                          top_k: int) -> dict[int, list[int]]:
    """The kept ids per MoE layer, sorted, after checking they fit the model; a ReapError says what does not."""
    keep = {int(layer): sorted(int(e) for e in ids) for layer, ids in experts_to_keep.items()}
    if set(keep) != set(moe_layers):
        extra, missing = sorted(set(keep) - set(moe_layers)), sorted(set(moe_layers) - set(keep))
        raise ReapError(f"experts_to_keep does not fit the model: its layers differ from the model's MoE layers "
                        f"(missing {missing[:8]}, not MoE {extra[:8]}); the metadata was made for another "
                        "model — rerun reap.py on this model or pass the matching --model / --metadata")
    for layer, ids in sorted(keep.items()):
        bad = [e for e in ids if not 0 <= e < num_experts]
        if bad:
            raise ReapError(f"experts_to_keep does not fit the model: layer {layer} names expert ids {bad[:5]} "
                            f"outside 0..{num_experts - 1}; rerun reap.py on this model")
        duplicated = sorted(e for e, n in Counter(ids).items() if n > 1)
        if duplicated:
            raise ReapError(f"experts_to_keep is invalid: layer {layer} lists expert ids {duplicated[:5]} more "
                            "than once; rerun reap.py or fix the list")
    counts = sorted({len(ids) for ids in keep.values()})
    if len(counts) > 1:
        raise ReapError(f"experts_to_keep keeps uneven counts across layers ({counts}); vLLM needs one expert "
                        "count for every layer — recompute the selection with --prune-ratio")
    if counts[0] < top_k:
        raise ReapError(f"experts_to_keep keeps {counts[0]} experts per layer, fewer than the {top_k} each token "
                        "routes to; lower --prune-ratio")
    return keep


def keep_from_metadata(metadata: ReapMetadata, num_experts: int, top_k: int, *, prune_ratio: float | None = None,
                       criterion: str | None = None, keep_multiple: int | None = None) -> dict[int, list[int]]:
    """The metadata's selection, or — when any of the three is given — one recomputed from its stored metrics."""
    raw = metadata.raw
    if int(raw["num_experts"]) != num_experts:
        raise ReapError(f"{metadata.path} was computed for a model with {raw['num_experts']} experts per layer, "
                        f"but the model to prune has {num_experts}; pass the matching --model or rerun reap.py")
    if prune_ratio is None and criterion is None and keep_multiple is None:
        return metadata.experts_to_keep
    ratio = raw.get("prune_ratio") if prune_ratio is None else prune_ratio
    multiple = raw.get("keep_multiple", 1) if keep_multiple is None else keep_multiple
    criterion = raw.get("criterion", "reap") if criterion is None else criterion
    if ratio is None:
        raise ReapError(f"{metadata.path} records no prune_ratio; pass --prune-ratio")
    if not metadata.metrics:
        raise ReapError(f"{metadata.path} stores no metrics to recompute the selection from; rerun reap.py "
                        "with the new --prune-ratio / --criterion")
    keep = num_to_keep(num_experts, float(ratio), int(multiple), top_k)
    return select_experts(metadata.metrics, metadata.moe_layers, criterion, keep)


# ----------------------------------------------------------------------------------------------- other files

SKIPPED_FILES = {INDEX_NAME, METADATA_NAME, PRUNING_RECORD, "config.json"}


def files_to_carry(source: Path) -> list[Path]:
    """Everything in the source folder but weights, the index, config.json (rewritten), stale REAP files and
    hidden entries (download caches)."""
    return sorted(p for p in source.iterdir()
                  if not p.name.startswith(".") and p.name not in SKIPPED_FILES and p.suffix != ".safetensors")


def carry_files(paths: list[Path], out: Path) -> None:
    ignore = shutil.ignore_patterns("*.safetensors", ".*")  # no unpruned weights hide in subfolders
    for path in paths:
        if path.is_dir():
            shutil.copytree(path, out / path.name, ignore=ignore)
        else:
            shutil.copyfile(path, out / path.name)  # follows HF-cache symlinks: a real file in the output


def _tree_size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


# ----------------------------------------------------------------------------------------------- safety checks

def check_output_location(source: Path, output: Path) -> None:
    """Refuse outputs that would write into the source or, with --force, delete it."""
    source, output = Path(source).resolve(), Path(output).resolve()
    if output == source:
        raise ReapError(f"output folder {output} is the source folder; choose another --output "
                        "(the source is never written)")
    if source in output.parents:
        raise ReapError(f"output folder {output} is inside the source folder {source}; choose a folder outside it")
    if output in source.parents:
        raise ReapError(f"output folder {output} contains the source folder {source}; replacing it would delete "
                        "the source — choose another --output")


def check_free_space(output: Path, needed: int) -> None:
    folder = Path(output).absolute().parent
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < needed + DISK_MARGIN:
        raise ReapError(f"not enough disk space in {folder}: the pruned checkpoint needs {needed / 1e9:.2f} GB, "
                        f"{free / 1e9:.2f} GB are free; free some space or choose another --output")


# ----------------------------------------------------------------------------------------------- writing

def write_shard(source: Path, out: Path, shard: ShardPlan, advance: Callable[[int], None]) -> int:
    """Write one output shard; return its size in bytes."""
    spans = (span for tensor in shard.tensors for span in tensor.ranges)
    return write_from_spans(source, out, shard.header, spans, advance)


def write_index(source: Path, out: Path, plan: PrunePlan) -> None:
    index = read_json(source / INDEX_NAME, "safetensors index")
    metadata = dict(index.get("metadata") or {})
    metadata["total_size"] = plan.tensor_bytes
    if "total_parameters" in metadata:  # keep the source's convention, less what was removed
        metadata["total_parameters"] = int(metadata["total_parameters"]) - plan.source_numel + plan.output_numel
    weight_map = {t.key: s.name for s in plan.shards for t in s.tensors}
    atomic_write_json(out / INDEX_NAME, {**index, "metadata": metadata, "weight_map": dict(sorted(weight_map.items()))})


# ----------------------------------------------------------------------------------------------- pruning

def prune_checkpoint(source: Path, output: Path, experts_to_keep: dict[int, list[int]], *, force: bool = False,
                     reap_metadata_path: Path | None = None, verify: bool = False, progress: bool = True) -> dict:
    """Write ``output``: ``source`` with only ``experts_to_keep[layer]`` in every MoE layer; return the record.

    The source is only read.  The output is built in a temporary sibling folder and renamed into place when
    complete (and verified, with ``verify``); a failure leaves no output folder behind.
    """
    from tqdm.auto import tqdm

    source, output = Path(source), Path(output)
    ckpt = Checkpoint(source)
    check_output_location(source, output)
    if output.exists() and not force:
        raise ReapError(f"output {output} already exists; pass --force to replace it or choose another folder")
    keep = check_experts_to_keep(experts_to_keep, ckpt.moe_layers, ckpt.num_experts, ckpt.top_k)
    num_kept = len(next(iter(keep.values())))
    id_map = new_ids(keep)
    plan = plan_pruning(ckpt, keep)
    # Bytes, not read_text(): universal newlines would turn CRLF into LF and break "every other byte as it was".
    config_text, config_keys = prune_config_text((source / "config.json").read_bytes().decode("utf-8"),
                                                 ckpt.family, num_kept, id_map)
    carried = files_to_carry(source)
    check_free_space(output, plan.shard_bytes + sum(_tree_size(p) for p in carried))

    record = {
        "source_path": str(source.resolve()),
        "source_num_experts": ckpt.num_experts,
        "num_experts": num_kept,
        "moe_layers": ckpt.moe_layers,
        "experts_to_keep": {str(layer): ids for layer, ids in sorted(keep.items())},
        "id_map": {str(layer): {str(old): new for old, new in m.items()} for layer, m in sorted(id_map.items())},
        "config_keys_updated": config_keys,
        "tensors": dict(plan.counts),
        "bytes_written": 0,
    }
    with atomic_output_dir(output, force=force, source=source) as tmp:
        with tqdm(total=plan.tensor_bytes, unit="B", unit_scale=True, desc="pruning", disable=not progress) as bar:
            for shard in plan.shards:
                bar.set_postfix_str(shard.name)
                record["bytes_written"] += write_shard(source / shard.source_name, tmp / shard.name, shard,
                                                       bar.update)
        if (source / INDEX_NAME).is_file():
            write_index(source, tmp, plan)
        atomic_write_bytes(tmp / "config.json", config_text.encode("utf-8"))
        carry_files(carried, tmp)
        if reap_metadata_path is not None:
            shutil.copyfile(reap_metadata_path, tmp / METADATA_NAME)
        if verify:
            record["verify"] = verify_pruned(ckpt, tmp, keep)
        atomic_write_json(tmp / PRUNING_RECORD, record)
    return record


# ----------------------------------------------------------------------------------------------- prune_model.py

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
    explicit = {name: getattr(settings, name) if settings.explicitly_set(name) else None
                for name in ("prune_ratio", "criterion", "keep_multiple")}
    keep = keep_from_metadata(metadata, ckpt.num_experts, ckpt.top_k, **explicit)
    record = prune_checkpoint(ckpt.path, settings.pruned_output_path, keep, force=settings.force,
                              reap_metadata_path=Path(metadata_path), verify=settings.verify)
    return record, Path(settings.pruned_output_path)
