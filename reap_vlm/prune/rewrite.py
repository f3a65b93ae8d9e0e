"""Streaming expert pruning of a safetensors checkpoint: read tensor by tensor, write only kept experts.

Nothing is ever loaded whole.  The plan (``plan``) maps every output tensor to byte ranges of its
source shard; ``checkpoint.safetensors_io`` copies them file to file; ``config_edit`` rewrites config.json in place;
``verify`` checks the result with ``--verify``.  This module writes the output folder atomically
(``output`` checks where it goes, ``keep`` which experts stay).
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

from ..checkpoint.fsutil import atomic_output_dir, atomic_write_bytes, atomic_write_json, read_json
from ..checkpoint.reader import INDEX_NAME, Checkpoint
from ..checkpoint.safetensors_io import read_header, write_from_spans
from ..metadata import METADATA_NAME
from ..outputs import check_writable, output_lock
from .card import CARD_NAME, SOURCE_CARD_NAME, model_card
from .config_edit import prune_config_text
from .keep import check_experts_to_keep
from .output import (
    PRUNING_RECORD,
    carry_files,
    check_free_space,
    check_output_location,
    check_output_replaceable,
    describe_stale,
    files_to_carry,
    stale_partials,
    tree_size,
)
from .plan import PrunePlan, ShardPlan, new_ids, plan_pruning
from .verify import verify_pruned

__all__ = ["PRUNING_RECORD", "prune_checkpoint", "read_header", "verify_pruned", "write_index", "write_shard"]


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


def pruning_record(source: Path, ckpt: Checkpoint, keep: dict[int, list[int]], id_map: dict[int, dict[int, int]],
                   config_keys: list[str], plan: PrunePlan, selection: dict | None) -> dict:
    """pruning_record.json's content (``bytes_written`` is counted while writing)."""
    record = {
        "source_path": str(source.resolve()),
        "source_num_experts": ckpt.num_experts,
        "num_experts": len(next(iter(keep.values()))),
        "moe_layers": ckpt.moe_layers,
        "experts_to_keep": {str(layer): ids for layer, ids in sorted(keep.items())},
        "id_map": {str(layer): {str(old): new for old, new in m.items()} for layer, m in sorted(id_map.items())},
        "config_keys_updated": config_keys,
        "tensors": dict(plan.counts),
        "bytes_written": 0,
    }
    left_out = sorted({ckpt.family.layer_of_key(k) for k in ckpt.stored_weight_map if ckpt.left_out(k)} - {None})
    if left_out:  # next-token-prediction layers past the stack (ModelFamily.left_out): never loaded nor scored
        record["layers_left_out"] = left_out
    if selection is not None:
        record["selection"] = selection
    return record


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
    check_writable(output.absolute().parent, "--output")  # the output is made beside it, then renamed
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
    check_free_space(output, plan.shard_bytes + sum(tree_size(p) for p in carried), stale)

    record = pruning_record(source, ckpt, keep, id_map, config_keys, plan, selection)
    with output_lock(output, "--output"), atomic_output_dir(output, force=force, source=source) as tmp:
        with tqdm(total=plan.tensor_bytes, unit="B", unit_scale=True, desc="pruning", disable=not progress) as bar:
            for shard in plan.shards:
                bar.set_postfix_str(shard.name)
                record["bytes_written"] += write_shard(source / shard.source_name, tmp / shard.name, shard,
                                                       bar.update)
        if (source / INDEX_NAME).is_file():
            write_index(source, tmp, plan)
        atomic_write_bytes(tmp / "config.json", config_text.encode("utf-8"))
        carry_files(carried, tmp)
        if (tmp / CARD_NAME).is_file():  # the source's card describes the source: kept, under another name
            os.replace(tmp / CARD_NAME, tmp / SOURCE_CARD_NAME)
        if reap_metadata is not None:
            atomic_write_json(tmp / METADATA_NAME, reap_metadata)
        elif reap_metadata_path is not None:
            shutil.copyfile(reap_metadata_path, tmp / METADATA_NAME)
        card_metadata = reap_metadata if reap_metadata is not None else \
            read_json(tmp / METADATA_NAME, "REAP metadata") if (tmp / METADATA_NAME).is_file() else None
        atomic_write_bytes(tmp / CARD_NAME, model_card(source, ckpt.config, record, card_metadata).encode())
        if verify:
            record["verify"] = verify_pruned(ckpt, tmp, keep)
        atomic_write_json(tmp / PRUNING_RECORD, record)
    return record
