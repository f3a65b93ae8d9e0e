"""A checkpoint's tensors under their in-memory names and layouts: fused expert tensors transposed or assembled
from per-expert keys, quantized Linears dequantized."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch

from ..errors import ReapError
from ..families import KeyRole, ModelFamily
from .reader import Checkpoint


def memory_state_dict(ckpt: Checkpoint, keys: Iterable[str] | None = None,
                      dtype: torch.dtype | None = None, device: str = "cpu",
                      source: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Tensors under their in-memory names and layouts: fused tensors transposed where the disk
    layout differs, per-expert tensors fused.  Quantized Linears (see ``reap_vlm.checkpoint.quant``) are
    dequantized on ``device`` and returned as ``<module>.weight`` (float32 when ``dtype`` is None);
    asking for any of a quantized module's tensors (or for its ``.weight``) reads all of them.

    Per-expert tensors are copied into their fused tensor as they arrive (dequantized one Linear at a
    time), so the peak is the fused tensors plus one Linear's temporaries, not twice the experts.
    ``source``: the checkpoint tensors already read (on-disk names, e.g. in pinned host memory), moved
    to ``device`` one at a time instead of reading the shards."""
    family = ckpt.family
    sizes = family.sizes(ckpt.config)
    quant = ckpt.quant_format
    keys = [k for k in (keys if keys is not None else ckpt.weight_map) if not ckpt.left_out(k)]  # never loaded
    modules: dict[str, dict[str, str]] = {}
    if quant is not None:
        keys, modules = quant.split_keys(keys, ckpt.weight_map)
    owner = {key: (module, suffix) for module, owned in modules.items() for suffix, key in owned.items()}
    pending: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    out: dict[str, torch.Tensor] = {}
    fusion = _Fusion(family, [*keys, *(f"{module}.weight" for module in modules)])

    def place(key: str, tensor: torch.Tensor) -> None:
        info = family.classify(key)
        if info.role is KeyRole.FUSED_EXPERTS:
            layout = family.fused_layout(info.name)
            out[key] = layout.to_memory(tensor, sizes, key) if layout else tensor
        elif info.role is KeyRole.PER_EXPERT:
            proj, _, suffix = info.name.rpartition(".")
            if suffix != "weight":
                raise ReapError(f"{key}: quantized per-expert tensors need dequantization, which this loader "
                                f"does not do for quantization {ckpt.quantization!r}")
            fusion.add(info.prefix, info.expert, proj, tensor)
        else:
            out[key] = tensor

    wanted = [*keys, *owner]
    tensors = ckpt.read(wanted, device) if source is None else \
        ((key, source[key].to(device, non_blocking=True)) for key in wanted)
    for key, tensor in tensors:
        if key in owner:  # a quantized Linear's tensor: dequantize once the module is complete
            module, suffix = owner[key]
            pending[module][suffix] = tensor
            if len(pending[module]) == len(modules[module]):
                place(f"{module}.weight", quant.dequantize(pending.pop(module), device, dtype, module))
            continue
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        place(key, tensor)
        del tensor
    out.update(fusion.result())
    return out


class _Fusion:
    """The fused expert tensors of the per-expert keys ``names``, filled in place: each fused tensor is
    allocated when its first projection arrives (dtype and device of that tensor) and every expert's
    projection is copied into its slot (``ModelFamily.fuse_per_expert_into``).  The same tensors, in the
    same order, as stacking the per-expert tensors (``ModelFamily.fuse_per_expert``) would give."""

    def __init__(self, family: ModelFamily, names: Iterable[str]):
        self.family = family
        projections: dict[str, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
        for name in names:
            info = family.classify(name)
            if info.role is KeyRole.PER_EXPERT and info.name.endswith(".weight"):
                projections[info.prefix][info.expert].add(info.name.rpartition(".")[0])
        self.counts: dict[str, int] = {}
        self.target: dict[tuple[str, str], str] = {}  # (prefix, proj) -> fused name
        for prefix, experts in projections.items():
            if sorted(experts) != list(range(len(experts))):
                raise ReapError(f"{prefix}: expert ids {sorted(experts)[:5]}... are not contiguous from 0")
            self.counts[prefix] = len(experts)
            for fused_name, sources in family.fused_sources().items():
                if not all(p in experts[0] for p in sources):
                    continue
                lacking = next(((e, p) for e in sorted(experts) for p in sources if p not in experts[e]), None)
                if lacking:
                    raise ReapError(f"{prefix}.{lacking[0]}: no {lacking[1]} weight, which every expert needs "
                                    f"for {fused_name}; the checkpoint is incomplete")
                self.target.update({(prefix, p): fused_name for p in sources})
        self.fused: dict[str, dict[str, torch.Tensor]] = {}  # prefix -> {fused name: tensor}, in arrival order
        self.filled: dict[tuple[str, str], int] = defaultdict(int)

    def add(self, prefix: str, expert: int, proj: str, tensor: torch.Tensor) -> None:
        fused_name = self.target.get((prefix, proj))
        built = self.fused.setdefault(prefix, {})
        if fused_name is None:  # a projection no fused tensor is made of: not kept, as before
            return
        fused = built.get(fused_name)
        if fused is None:
            shape = self.family.fused_shape(fused_name, self.counts[prefix], proj, tuple(tensor.shape))
            fused = built[fused_name] = torch.empty(shape, dtype=tensor.dtype, device=tensor.device)
        elif fused.dtype != tensor.dtype:  # torch.stack's type promotion
            promoted = torch.promote_types(fused.dtype, tensor.dtype)
            if promoted != fused.dtype:
                fused = built[fused_name] = fused.to(promoted)
        self.family.fuse_per_expert_into(fused_name, fused, expert, {proj: tensor})
        self.filled[(prefix, fused_name)] += 1

    def result(self) -> dict[str, torch.Tensor]:
        out = {}
        for prefix, built in self.fused.items():
            for fused_name, sources in self.family.fused_sources().items():
                if fused_name not in built:
                    continue
                expected = self.counts[prefix] * len(sources)
                if self.filled[(prefix, fused_name)] != expected:
                    raise ReapError(f"{prefix}.{fused_name}: {self.filled[(prefix, fused_name)]} of {expected} "
                                    "expert projections were read")
                out[f"{prefix}.{fused_name}"] = built[fused_name]
        return out
