"""Streaming expert pruning of a safetensors checkpoint: read tensor by tensor, write only kept experts.

Nothing is ever loaded whole.  The plan (``prune_plan``) maps every output tensor to byte ranges of its
source shard; ``safetensors_io`` copies them file to file; ``config_edit`` rewrites config.json in place;
``prune_verify`` checks the result with ``--verify``.  This module checks the inputs and the output
location, carries the other files over and builds the output folder atomically.
"""

from __future__ import annotations

import math
import shlex
import shutil
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from ..checkpoint.fsutil import atomic_output_dir, atomic_write_bytes, atomic_write_json, read_json
from ..checkpoint.reader import INDEX_NAME, Checkpoint
from ..checkpoint.safetensors_io import read_header, write_from_spans
from ..errors import ReapError
from ..metadata import METADATA_NAME, ReapMetadata, load_metadata
from ..selection import num_to_keep, select_experts
from ..settings import OPTIONS
from .config_edit import prune_config_text
from .plan import PrunePlan, ShardPlan, new_ids, plan_pruning
from .verify import verify_pruned

__all__ = ["PRUNING_RECORD", "check_experts_to_keep", "keep_from_metadata", "prune_checkpoint", "prune_from_settings",
           "read_header", "selection_changes", "stale_partials", "verify_pruned", "write_shard"]

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


# The settings that decide the selection, as the messages name them.
SELECTION_SETTINGS = {"prune_ratio": "prune ratio", "criterion": "criterion", "keep_multiple": "keep multiple"}


def recorded_selection(raw: dict) -> dict:
    """What the metadata's experts_to_keep was made with (metadata from before keep_multiple existed: 1)."""
    return {"prune_ratio": raw.get("prune_ratio"), "criterion": raw.get("criterion"),
            "keep_multiple": raw.get("keep_multiple", 1)}


def _same_setting(name: str, value, recorded) -> bool:
    if recorded is None:
        return False
    try:
        if name == "prune_ratio":
            return math.isclose(float(value), float(recorded), rel_tol=0.0, abs_tol=1e-9)
        if name == "keep_multiple":
            return int(value) == int(recorded)
    except (TypeError, ValueError):
        return False
    return str(value) == str(recorded)


def _show(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _where_set(settings, name: str) -> str:
    option = OPTIONS[name]
    source = settings.sources.get(name, "default")
    return {"flag": option.flag, "env": f"{option.env} in the environment",
            ".env": f"{option.env} in .env"}.get(source, source)


def selection_changes(settings, raw: dict) -> tuple[dict, list[str]]:
    """The settings (flag, environment or .env; never defaults) that differ from what the metadata's selection
    was made with, and one phrase per difference naming where it was set.  Equal values keep the metadata's
    selection: a .env that repeats reap.py's settings must not silently replace it."""
    recorded = recorded_selection(raw)
    overrides: dict = {}
    changes: list[str] = []
    for name, label in SELECTION_SETTINGS.items():
        if not settings.explicitly_set(name):
            continue
        value = getattr(settings, name)
        if _same_setting(name, value, recorded[name]):
            continue
        overrides[name] = value
        was = (f"differs from the metadata's {_show(recorded[name])}" if recorded[name] is not None
               else "is not recorded in the metadata")
        changes.append(f"{label} {_show(value)} ({_where_set(settings, name)}) {was}")
    return overrides, changes


def recomputed_metadata(raw: dict, keep: dict[int, list[int]], selection: dict) -> dict:
    """reap_metadata.json as it belongs beside a checkpoint pruned with a recomputed selection: the metrics as
    measured, the selection fields describing what was really kept, and a marker saying what reap.py chose."""
    metadata = dict(raw)
    criterion = selection["criterion"]
    metadata.update({
        "experts_to_keep": {str(layer): ids for layer, ids in sorted(keep.items())},
        "num_experts_to_keep": selection["num_experts_to_keep"],
        "prune_ratio": selection["prune_ratio"],
        "criterion": criterion,
        "keep_multiple": selection["keep_multiple"],
        "selection_recomputed": {
            "by": "prune_model.py",
            "why": selection["why"],
            "reap_selection": {**recorded_selection(raw), "num_experts_to_keep": raw.get("num_experts_to_keep")},
        },
    })
    if criterion in (raw.get("metrics") or {}):  # mean_scores holds the criterion's values
        metadata["mean_scores"] = raw["metrics"][criterion]
    return metadata


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


def check_output_replaceable(output: Path, force: bool, protected: dict[str, Path | None]) -> None:
    """Refuse an output whose replacement would delete anything but an earlier pruned checkpoint.

    ``protected`` names inputs (the metadata being read, reap.py's output folder) that the output may not be
    or contain.  An existing output needs ``force``, and even then only an empty folder or one holding
    pruning_record.json (written by this module) is replaced."""
    output = Path(output)
    where = output.resolve()
    for what, path in protected.items():
        if path is None or not Path(path).exists():
            continue
        path = Path(path).resolve()
        if path == where or where in path.parents:
            raise ReapError(f"output folder {output} {'is' if path == where else 'contains'} {what} {path}; "
                            "replacing it would delete it — choose another --output")
    if not output.exists() and not output.is_symlink():
        return
    if not force:
        raise ReapError(f"output {output} already exists; pass --force to replace it or choose another folder")
    if output.is_dir() and (not any(output.iterdir()) or (output / PRUNING_RECORD).is_file()):
        return
    kind = "not a folder" if not output.is_dir() else f"a folder with no {PRUNING_RECORD}"
    raise ReapError(f"--force replaces only an empty folder or an earlier prune_model.py output, and {output} is "
                    f"{kind}; choose a new or empty --output folder, or delete {output} yourself if it is expendable")


def stale_partials(output: Path) -> list[tuple[Path, int]]:
    """Temporary folders beside ``output`` left by a killed run (fsutil.atomic_output_dir's ``.<name>.partial-*``
    and ``.<name>.old-*``), with their sizes."""
    output = Path(output).absolute()
    if not output.parent.is_dir():
        return []
    found = sorted(p for pattern in (f".{output.name}.partial-*", f".{output.name}.old-*")
                   for p in output.parent.glob(pattern) if p.is_dir() and not p.is_symlink())
    return [(p, _tree_size(p)) for p in found]


def describe_stale(output: Path, stale: list[tuple[Path, int]]) -> str:
    """'2 stale temporary folders (12.30 GB) ...; delete them with rm -rf ...' for warnings and errors."""
    output = Path(output).absolute()
    kinds = sorted({p.name[len(output.name) + 2:].split("-")[0] for p, _ in stale})  # partial / old
    patterns = " ".join(shlex.quote(str(output.parent / f".{output.name}.")) + f"{kind}-*" for kind in kinds)
    total = sum(size for _, size in stale)
    plural = "s" if len(stale) > 1 else ""
    return (f"{len(stale)} stale temporary folder{plural} ({total / 1e9:.2f} GB) beside {output}, left by an "
            f"interrupted prune_model.py run; unless another prune is writing there now, delete "
            f"{'them' if plural else 'it'} with: rm -rf {patterns}")


def check_free_space(output: Path, needed: int, stale: list[tuple[Path, int]] | None = None) -> None:
    folder = Path(output).absolute().parent
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < needed + DISK_MARGIN:
        hint = f"; {describe_stale(output, stale)}" if stale else ""
        raise ReapError(f"not enough disk space in {folder}: the pruned checkpoint needs {needed / 1e9:.2f} GB, "
                        f"{free / 1e9:.2f} GB are free; free some space or choose another --output{hint}")


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
                     reap_metadata_path: Path | None = None, verify: bool = False, progress: bool = True,
                     reap_metadata: dict | None = None, selection: dict | None = None,
                     reap_output: Path | None = None) -> dict:
    """Write ``output``: ``source`` with only ``experts_to_keep[layer]`` in every MoE layer; return the record.

    The source is only read.  The output is built in a temporary sibling folder and renamed into place when
    complete (and verified, with ``verify``); a failure leaves no output folder behind.  ``force`` replaces
    only an empty folder or an earlier output of this function; the output may not be or contain the source,
    ``reap_metadata_path`` or ``reap_output`` (reap.py's folder).  reap_metadata.json in the output is
    ``reap_metadata`` when given, else a copy of ``reap_metadata_path``; ``selection`` (how experts_to_keep was
    chosen) goes into the record.
    """
    from tqdm.auto import tqdm

    source, output = Path(source), Path(output)
    ckpt = Checkpoint(source)
    check_output_location(source, output)
    check_output_replaceable(output, force, {"the REAP metadata being read": reap_metadata_path,
                                             "the reap.py output folder": reap_output})
    stale = stale_partials(output)
    if stale:
        warnings.warn(describe_stale(output, stale), stacklevel=2)
    keep = check_experts_to_keep(experts_to_keep, ckpt.moe_layers, ckpt.num_experts, ckpt.top_k)
    num_kept = len(next(iter(keep.values())))
    id_map = new_ids(keep)
    plan = plan_pruning(ckpt, keep)
    # Bytes, not read_text(): universal newlines would turn CRLF into LF and break "every other byte as it was".
    config_text, config_keys = prune_config_text((source / "config.json").read_bytes().decode("utf-8"),
                                                 ckpt.family, num_kept, id_map)
    carried = files_to_carry(source)
    check_free_space(output, plan.shard_bytes + sum(_tree_size(p) for p in carried), stale)

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
    if selection is not None:
        record["selection"] = selection
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
        if reap_metadata is not None:
            atomic_write_json(tmp / METADATA_NAME, reap_metadata)
        elif reap_metadata_path is not None:
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
    raw = metadata.raw
    overrides, changes = selection_changes(settings, raw)
    recorded = recorded_selection(raw)
    if changes:
        why = "recomputing the selection: " + "; ".join(changes)
        print(why, flush=True)
        chosen = {**recorded, **overrides}
        chosen["criterion"] = chosen["criterion"] or "reap"
        keep = keep_from_metadata(metadata, ckpt.num_experts, ckpt.top_k, **chosen)
        selection = {"source": "recomputed", **chosen, "why": why}
    else:
        keep = keep_from_metadata(metadata, ckpt.num_experts, ckpt.top_k)
        selection = {"source": "metadata", **recorded}
    selection["num_experts_to_keep"] = len(next(iter(keep.values()))) if keep else 0
    updated = recomputed_metadata(raw, keep, selection) if changes else None
    record = prune_checkpoint(ckpt.path, settings.pruned_output_path, keep, force=settings.force,
                              reap_metadata_path=Path(metadata_path), verify=settings.verify,
                              reap_metadata=updated, selection=selection, reap_output=Path(settings.output_path))
    return record, Path(settings.pruned_output_path)
