"""Is a checkpoint complete and consistent, before anything loads it?  Every shard of the index present with a
valid safetensors header that covers the file and agrees with the index; every router and expert tensor of every
MoE layer present, with the expert count and shape config.json implies.  prune_model.py plans from the same
headers; reap.py and test_pruned_model.py run the same checks first."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from safetensors import safe_open

from ..errors import ReapError
from ..families import KeyRole
from .reader import INDEX_NAME, Checkpoint
from .safetensors_io import ShardHeader, SourceTensor, read_header


def expert_dim_check(tensor: SourceTensor, num_experts: int, what: str) -> None:
    if not tensor.shape or tensor.shape[0] != num_experts or tensor.nbytes % num_experts:
        raise ReapError(f"{tensor.key}: {what} tensor of shape {list(tensor.shape)} should have the "
                        f"{num_experts} experts of config.json on dim 0; the checkpoint does not match its config")


def _check_shard_against_index(path: Path, header: ShardHeader, indexed: list[str]) -> None:
    try:
        with safe_open(path, "pt") as f:  # the reference parser agrees with ours on keys and metadata
            agree = set(f.keys()) == set(header.tensors) and (f.metadata() or None) == (header.metadata or None)
    except Exception:  # noqa: BLE001 - safetensors raises its own error types
        agree = False
    if not agree:
        raise ReapError(f"{path}: safetensors header could not be read consistently; re-download the shard")
    missing, unindexed = set(indexed) - set(header.tensors), set(header.tensors) - set(indexed)
    if missing or unindexed:
        sample = sorted(missing or unindexed)[:2]
        raise ReapError(f"{path.name} and {INDEX_NAME} disagree ({len(missing)} indexed keys missing from the "
                        f"shard, {len(unindexed)} shard keys not indexed, e.g. {sample}); the download is "
                        "incomplete or the index is stale — re-download the model")


def shard_headers(ckpt: Checkpoint) -> dict[str, ShardHeader]:
    """Every shard's header, read (complete, not truncated) and checked against the index."""
    headers = {}
    for name, keys in sorted(ckpt.keys_by_shard().items()):
        header = read_header(ckpt.path / name)
        _check_shard_against_index(ckpt.path / name, header, keys)
        headers[name] = header
    return headers


def check_checkpoint(ckpt: Checkpoint, headers: dict[str, ShardHeader] | None = None) -> dict[str, ShardHeader]:
    """Raise a ReapError (one line per problem) unless every tensor the family needs is there with the shape the
    config implies; return the shard headers."""
    headers = shard_headers(ckpt) if headers is None else headers
    family, num_experts, moe_layers = ckpt.family, ckpt.num_experts, set(ckpt.moe_layers)
    plain = ckpt.quantization is None  # quantized tensors have other shapes (packed, scales)
    routers: dict[int, dict[str, SourceTensor]] = defaultdict(dict)
    fused: dict[int, dict[str, SourceTensor]] = defaultdict(dict)
    per_expert: dict[int, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
    for header in headers.values():
        for tensor in header.tensors.values():
            info = family.classify(tensor.key)
            if info.role is KeyRole.OTHER or ckpt.left_out(tensor.key):
                continue
            if info.layer not in moe_layers:
                raise ReapError(f"{tensor.key}: experts in layer {info.layer}, which config.json does not list as "
                                "a MoE layer; the checkpoint does not match its config")
            if info.role is KeyRole.PER_EXPERT:
                if not 0 <= info.expert < num_experts:
                    raise ReapError(f"{tensor.key}: expert id {info.expert} is outside the {num_experts} experts "
                                    "of config.json; the checkpoint does not match its config")
                per_expert[info.layer][info.expert].add(info.name)
                continue
            expert_dim_check(tensor, num_experts, "router" if info.role is KeyRole.ROUTER else "fused expert")
            (routers if info.role is KeyRole.ROUTER else fused)[info.layer][info.name] = tensor
    problems = [p for layer in sorted(moe_layers)
                for p in _layer_problems(ckpt, layer, routers[layer], fused[layer], per_expert[layer], plain)]
    if problems:
        raise ReapError("\n".join(problems))
    return headers


def _layer_problems(ckpt: Checkpoint, layer: int, routers: dict, fused: dict, experts: dict[int, set[str]],
                    plain: bool) -> list[str]:
    family, num_experts = ckpt.family, ckpt.num_experts
    sizes = family.sizes(ckpt.config)
    where = f"{ckpt.path}: MoE layer {layer}"
    fix = "the checkpoint is incomplete or does not match its config.json — re-download the model"
    problems = []
    router = routers.get("weight")
    if router is None:
        problems.append(f"{where} has no router weight ({family.router_weight_name()}); {fix}")
    elif plain and tuple(router.shape) != (num_experts, sizes["H"]):
        problems.append(f"{router.key}: shape {list(router.shape)}, config.json implies "
                        f"[{num_experts}, {sizes['H']}]; {fix}")
    if fused:
        for layout in family.fused:
            tensor = fused.get(layout.name)
            if tensor is None:
                problems.append(f"{where} has no {layout.name} expert tensor; {fix}")
            elif plain and tuple(tensor.shape[1:]) not in layout.shapes(sizes):
                problems.append(f"{tensor.key}: shape {list(tensor.shape)} fits neither [E, {layout.shapes(sizes)[0]}]"
                                f" nor [E, {layout.shapes(sizes)[1]}] of config.json; {fix}")
    elif experts:
        absent = sorted(set(range(num_experts)) - set(experts))
        names = set().union(*experts.values())
        incomplete = sorted(e for e, have in experts.items() if have != names)
        if absent:
            problems.append(f"{where} lacks experts {absent[:8]} of the {num_experts} config.json counts; {fix}")
        if incomplete:
            problems.append(f"{where}: experts {incomplete[:8]} lack some of {sorted(names)}; {fix}")
    else:
        problems.append(f"{where} has no expert tensors; {fix}")
    return problems


def check_checkpoint_folder(path: Path | str) -> Checkpoint:
    """The preflight of a checkpoint folder every script runs before loading a model."""
    ckpt = Checkpoint(Path(path))
    ckpt.family  # noqa: B018 - an unknown model_type is reported here, before anything loads
    check_checkpoint(ckpt)
    return ckpt
