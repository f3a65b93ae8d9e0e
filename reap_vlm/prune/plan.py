"""The pruning plan: for every source tensor, what it becomes in the output, as byte ranges of its source shard.

An output tensor is the whole source tensor, or one slab per kept expert on dim 0.  Byte ranges make the
plan dtype-agnostic (bf16, fp8, packed int4 in int32, scales...): a fused tensor [E, ...] is E equal
slabs, whatever its element type.  Only headers are read to make the plan, checked first
(``checkpoint.integrity``: complete, consistent with the index and config.json).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from ..checkpoint.integrity import check_checkpoint, expert_dim_check
from ..checkpoint.reader import Checkpoint
from ..checkpoint.safetensors_io import SourceTensor, header_bytes
from ..errors import ReapError
from ..families import KeyRole, ModelFamily


@dataclass(frozen=True)
class OutputTensor:
    key: str
    dtype: str
    shape: tuple[int, ...]
    ranges: tuple[tuple[int, int], ...]  # absolute byte spans in the source shard, written in order

    @property
    def nbytes(self) -> int:
        return sum(end - begin for begin, end in self.ranges)


@dataclass
class ShardPlan:
    source_name: str
    name: str
    metadata: dict[str, str] | None
    tensors: list[OutputTensor] = field(default_factory=list)

    @property
    def header(self) -> bytes:
        return header_bytes(self.metadata, [(t.key, t.dtype, t.shape, t.nbytes) for t in self.tensors])

    @property
    def nbytes(self) -> int:
        return len(self.header) + sum(t.nbytes for t in self.tensors)


@dataclass
class PrunePlan:
    shards: list[ShardPlan]
    counts: Counter  # copied / sliced / renumbered / dropped
    source_numel: int
    output_numel: int

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for s in self.shards for t in s.tensors)

    @property
    def shard_bytes(self) -> int:
        return sum(s.nbytes for s in self.shards)


def new_ids(keep: dict[int, list[int]]) -> dict[int, dict[int, int]]:
    """Per layer, old expert id -> new id: kept experts renumbered 0..K-1 in ascending order."""
    return {layer: {old: new for new, old in enumerate(sorted(ids))} for layer, ids in keep.items()}


def plan_tensor(family: ModelFamily, tensor: SourceTensor, num_experts: int, keep: dict[int, list[int]],
                id_map: dict[int, dict[int, int]]) -> tuple[str, OutputTensor | None]:
    """What happens to one source tensor: (action, output tensor or None when dropped)."""
    info = family.classify(tensor.key)
    if info.role is KeyRole.OTHER:
        return "copied", OutputTensor(tensor.key, tensor.dtype, tensor.shape, ((tensor.begin, tensor.end),))
    if info.role is KeyRole.DROPPED:
        return "dropped", None
    if info.layer not in keep:
        raise ReapError(f"{tensor.key}: experts in layer {info.layer}, which config.json does not list as a MoE "
                        "layer; the checkpoint does not match its config")
    kept = keep[info.layer]
    if info.role is KeyRole.PER_EXPERT:
        if not 0 <= info.expert < num_experts:
            raise ReapError(f"{tensor.key}: expert id {info.expert} is outside the {num_experts} experts of "
                            "config.json; the checkpoint does not match its config")
        new_id = id_map[info.layer].get(info.expert)
        if new_id is None:
            return "dropped", None
        new_key = f"{info.prefix}.{new_id}.{info.name}"
        return "renumbered", OutputTensor(new_key, tensor.dtype, tensor.shape, ((tensor.begin, tensor.end),))
    what = "fused expert" if info.role is KeyRole.FUSED_EXPERTS else "router"
    expert_dim_check(tensor, num_experts, what)
    slabs = tensor.slabs(num_experts)
    shape = (len(kept), *tensor.shape[1:])
    return "sliced", OutputTensor(tensor.key, tensor.dtype, shape, _merge_adjacent([slabs[e] for e in kept]))


def plan_source_tensor(ckpt: Checkpoint, tensor: SourceTensor, keep: dict[int, list[int]],
                       id_map: dict[int, dict[int, int]]) -> tuple[str, OutputTensor | None]:
    """``plan_tensor`` for a tensor of ``ckpt``; those of a part the model never loads (a next-token-prediction
    layer past the decoder stack, ``ModelFamily.left_out``) are dropped."""
    if ckpt.left_out(tensor.key):
        return "dropped", None
    return plan_tensor(ckpt.family, tensor, ckpt.num_experts, keep, id_map)


def _merge_adjacent(spans: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Runs of neighbouring kept experts become one span: fewer, larger copies."""
    merged: list[tuple[int, int]] = []
    for begin, end in spans:
        if merged and merged[-1][1] == begin:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((begin, end))
    return tuple(merged)


def plan_pruning(ckpt: Checkpoint, keep: dict[int, list[int]]) -> PrunePlan:
    """Read every shard's header and decide, tensor by tensor, what goes where."""
    id_map = new_ids(keep)
    counts: Counter = Counter(copied=0, sliced=0, renumbered=0, dropped=0)
    shards, source_numel, output_numel = [], 0, 0
    for name, header in check_checkpoint(ckpt).items():
        shard = ShardPlan(name, name, header.metadata)
        for tensor in header.tensors.values():
            action, out = plan_source_tensor(ckpt, tensor, keep, id_map)
            counts[action] += 1
            source_numel += math.prod(tensor.shape)
            if out is not None:
                shard.tensors.append(out)
                output_numel += math.prod(out.shape)
        shards.append(shard)
    if any(not s.tensors for s in shards):
        _rename_shards(shards)
    return PrunePlan(shards, counts, source_numel, output_numel)


def _rename_shards(shards: list[ShardPlan]) -> None:
    """Drop shards left empty and renumber the rest, so the names still say ``-of-<count>``."""
    shards[:] = [s for s in shards if s.tensors]
    for i, shard in enumerate(shards, 1):
        shard.name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
