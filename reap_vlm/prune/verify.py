"""``--verify``: reopen a pruned checkpoint and check it against its new config and its source.

The expected outputs are derived again from the source headers, and the written tensors are read back
through ``safe_open`` (the reference reader), not through our own header parser.
"""

from __future__ import annotations

import math
import os
from collections import Counter, defaultdict
from pathlib import Path

import torch
from safetensors import safe_open

from ..checkpoint.loading import free_memory_bytes, load_model
from ..checkpoint.reader import Checkpoint
from ..checkpoint.safetensors_io import read_header
from ..errors import ReapError
from ..families import KeyRole
from .plan import OutputTensor, new_ids, plan_source_tensor


def _expected_outputs(ckpt: Checkpoint, keep: dict[int, list[int]]) -> tuple[dict[str, tuple[str, OutputTensor]],
                                                                            Counter]:
    """What every source key should have become (output key -> source shard, tensor) and how many of each
    action, derived again from the source headers."""
    id_map = new_ids(keep)
    expected, accounted = {}, Counter()
    for name in ckpt.shards:
        for tensor in read_header(ckpt.path / name).tensors.values():
            action, out = plan_source_tensor(ckpt, tensor, keep, id_map)
            accounted[action] += 1
            if out is not None:
                expected[out.key] = (name, out)
    return expected, accounted


def _check_shapes(pruned: Checkpoint, key: str, shape: tuple[int, ...], per_expert: dict) -> None:
    family, num_kept = pruned.family, pruned.num_experts
    info = family.classify(key)
    if info.role is KeyRole.PER_EXPERT:
        per_expert[info.prefix].setdefault(info.expert, set()).add(info.name)
        return
    if info.role is KeyRole.OTHER:
        return
    wanted: list[tuple[int, ...]] = []
    if info.role is KeyRole.FUSED_EXPERTS and (layout := family.fused_layout(info.name)):
        wanted = [(num_kept, *dims) for dims in layout.shapes(family.sizes(pruned.config))]
    elif info.role is KeyRole.ROUTER and info.name == "weight":
        wanted = [(num_kept, family.sizes(pruned.config)["H"])]
    if (wanted and shape not in wanted) or not shape or shape[0] != num_kept:
        raise ReapError(f"verify: {key} has shape {list(shape)}, expected {[list(w) for w in wanted] or num_kept} "
                        "for the pruned config")


def _ends(fd: int, begin: int, end: int, size: int = 256) -> bytes:
    """The first and last ``size`` bytes of [begin, end)."""
    size = min(size, end - begin)
    return os.pread(fd, size, begin) + os.pread(fd, size, end - size)


def _check_contents(source: Path, out: Path, shard: str, expected: dict[str, tuple[str, OutputTensor]]) -> None:
    """The ends of every range written equal the source's: catches offset mistakes without rereading everything."""
    sources: dict[str, int] = {}
    try:
        with open(out / shard, "rb") as dst:
            for key, written in read_header(out / shard).tensors.items():
                source_shard, tensor = expected[key]
                if source_shard not in sources:
                    sources[source_shard] = os.open(source / source_shard, os.O_RDONLY)
                offset = written.begin
                for begin, end in tensor.ranges:
                    if _ends(sources[source_shard], begin, end) != _ends(dst.fileno(), offset, offset + end - begin):
                        raise ReapError(f"verify: {key} in {shard} differs from the source bytes")
                    offset += end - begin
    finally:
        for fd in sources.values():
            os.close(fd)


def _forward_check(pruned: Checkpoint, numel: int) -> str:
    if pruned.quantization:
        return f"skipped (quantized: {pruned.quantization})"
    available = free_memory_bytes("cpu")
    if numel * 4 >= available // 4:
        return f"skipped (needs ~{numel * 4 / 1e9:.1f} GB in float32, over a quarter of available memory)"
    model = load_model(pruned.path)
    vocab = pruned.family.vocab_size(pruned.config)
    input_ids = (torch.arange(8) % vocab).unsqueeze(0)
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    if logits.shape[-1] != vocab or not torch.isfinite(logits).all():
        raise ReapError(f"verify: the pruned model's forward gave logits of shape {list(logits.shape)} with "
                        "non-finite values; the pruned checkpoint is broken")
    return "ok"


def verify_pruned(source: Checkpoint, out: Path, keep: dict[int, list[int]]) -> dict:
    """Reopen every output tensor and check it against the new config and the source; a ReapError on a mismatch."""
    pruned = Checkpoint(out)
    num_kept = len(next(iter(keep.values())))
    if pruned.num_experts != num_kept or pruned.moe_layers != source.moe_layers:
        raise ReapError(f"verify: pruned config says {pruned.num_experts} experts in layers {pruned.moe_layers}, "
                        f"expected {num_kept} in {source.moe_layers}")
    expected, accounted = _expected_outputs(source, keep)
    found: dict[str, tuple[str, tuple[int, ...], str]] = {}
    per_expert: dict[str, dict[int, set[str]]] = defaultdict(dict)
    numel = 0
    for shard in pruned.shards:
        with safe_open(out / shard, "pt") as f:  # the reference reader sees what we wrote
            for key in f.keys():
                piece = f.get_slice(key)
                shape, dtype = tuple(piece.get_shape()), piece.get_dtype()
                found[key] = (shard, shape, dtype)
                numel += math.prod(shape)
                _check_shapes(pruned, key, shape, per_expert)
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ReapError(f"verify: source keys not accounted for (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for shard in pruned.shards:
        _check_contents(source.path, out, shard, expected)
    for key, (_, out_tensor) in expected.items():
        if found[key][1] != out_tensor.shape or found[key][2] != out_tensor.dtype:
            raise ReapError(f"verify: {key} is {found[key][2]} {list(found[key][1])}, expected "
                            f"{out_tensor.dtype} {list(out_tensor.shape)}")
    for prefix, experts in per_expert.items():
        names = {frozenset(n) for n in experts.values()}
        if sorted(experts) != list(range(num_kept)) or len(names) != 1:
            raise ReapError(f"verify: {prefix} has expert ids {sorted(experts)[:6]}..., expected 0..{num_kept - 1} "
                            "each with the same tensors")
    return {"tensors_checked": len(found), "source_keys": dict(accounted), "forward": _forward_check(pruned, numel)}
