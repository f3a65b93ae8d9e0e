"""Quantized weights kept packed on the device, dequantized on the fly in the forward.

A quantized checkpoint (``checkpoint.quant``: AWQ, compressed-tensors pack-quantized, FP8-block) loaded
with ``load_model(..., packed=True)`` keeps every quantized tensor in its stored form (int32 words, fp8,
scales, zero points) on the device, so a 235B-A22B AWQ model takes its packed size (~125 GB), not its
bf16 size (~470 GB):

* ``PackedLinear`` replaces a quantized ``nn.Linear``: its forward dequantizes the weight (the format's
  one dequantizer, ``QuantFormat.dequantize``) into the activations' dtype and calls ``F.linear``, as
  ``nn.Linear`` does; the output is bit for bit the dequantized model's.
* ``PackedExperts`` replaces a family's fused experts module whose experts are quantized one Linear per
  expert (the releases' ``experts.{e}.{proj}.<suffix>``): each projection's tensors are stacked over the
  experts ([E, ...], stored dtypes).  Its forward is the replaced class's own forward (the experts
  implementation its config names), run on the experts the current tokens are routed to: their fused weights
  dequantized a tile at a time (``TILE_BYTES`` of float32 temporaries) into a compact [n routed, ...] tensor,
  the routing ids renumbered 0..n-1 in the same order.  Experts nobody is routed to are never dequantized, so
  a decode step touches ~top_k x batch experts per layer, not 128, and the output is the dequantized model's
  bit for bit (same rows, same order, same operations).

Nothing here knows a model by name: which tensors make a fused one and where they sit is the family's
(``fused_sources``, ``fused_shape``, ``fused_slot``).  ``packed_model_bytes`` is the device memory a
packed load takes, from the shard headers alone.
"""

from __future__ import annotations

import math
import types
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from ..errors import ReapError
from ..families import KeyRole, ModelFamily
from .quant import QuantFormat
from .reader import Checkpoint

# Working memory of one tile of experts being dequantized (float32 temporaries included): bounds the
# forward's extra memory over the packed weights; a decode step dequantizes its routed experts a tile at a time.
TILE_BYTES = 1 << 30
# Bytes of working memory per dequantized weight element: the format's float32/int32 temporaries (~5 live
# at the peak of the AWQ/compressed-tensors dequantizers) plus the result.
_DEQUANT_BYTES_PER_ELEMENT = 24


class PackedLinear(nn.Module):
    """A quantized Linear kept in its stored tensors (buffers under their checkpoint suffixes); the
    weight is dequantized in the forward."""

    def __init__(self, quant: QuantFormat, tensors: dict[str, torch.Tensor], name: str,
                 in_features: int, out_features: int, bias: nn.Parameter | None):
        super().__init__()
        self.quant, self.name = quant, name
        self.in_features, self.out_features = in_features, out_features
        for suffix, tensor in tensors.items():
            self.register_buffer(suffix, tensor)
        self.bias = bias

    def packed(self) -> dict[str, torch.Tensor]:
        return dict(self.named_buffers(recurse=False))

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.quant.dequantize(self.packed(), dtype=dtype, name=self.name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"{self.quant.name}, in_features={self.in_features}, out_features={self.out_features}"


class _PackedProjection(nn.Module):
    """One projection of every expert: each stored tensor stacked over the experts, [E, ...]."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        for suffix, tensor in tensors.items():
            self.register_buffer(suffix, tensor)

    def take(self, experts: torch.Tensor) -> dict[str, torch.Tensor]:
        return {suffix: t.index_select(0, experts) for suffix, t in self.named_buffers(recurse=False)}


class PackedExperts(nn.Module):
    """A family's fused experts module whose experts are stored quantized, one Linear per expert projection.

    Called exactly as the module it replaces, ``(hidden_states, top_k_index, top_k_weights)``, and its forward
    is that module's own (whatever experts implementation its config names: eager, grouped_mm, batched_mm),
    run on the routed experts only: their fused weights (``gate_up_proj``...) dequantized into a compact
    tensor [n routed, ...] (a tile of experts at a time, ``tile_bytes`` of float32 temporaries at most) and
    the expert ids renumbered 0..n-1 in the same order.  Every implementation only ever reads the rows of
    the experts it is routed to, visits them in id order and combines them the same way, so the output is
    the dequantized model's bit for bit.  The packed tensors live in ``packed.<proj>.<suffix>`` ([E, ...])."""

    def __init__(self, original: nn.Module, family: ModelFamily, quant: QuantFormat, name: str,
                 projections: dict[str, dict[str, torch.Tensor]], expert_shapes: dict[str, tuple[int, ...]],
                 dtype: torch.dtype, tile_bytes: int = TILE_BYTES):
        super().__init__()
        self._original_class = type(original)
        for attr, value in vars(original).items():  # num_experts, act_fn, config...: what the forward reads
            if not attr.startswith("_") and attr not in expert_shapes:
                self.__dict__[attr] = value
        for child, module in original.named_children():  # activation modules; they hold no weights
            if any(True for _ in module.parameters()):
                raise ReapError(f"{name}: the experts module's {child} has weights of its own; packed loading "
                                "does not support it (load the model whole)")
            self.add_module(child, module)
        self.family, self.quant, self.name, self.dtype = family, quant, name, dtype
        self.expert_shapes, self.tile_bytes = expert_shapes, tile_bytes
        self.packed = nn.ModuleDict({proj: _PackedProjection(t) for proj, t in projections.items()})
        self.num_experts = next(iter(next(iter(projections.values())).values())).shape[0]
        self.experts_dequantized = 0  # expert weights dequantized so far (per fused tensor), for tests and benches

    @property
    def device(self) -> torch.device:
        return next(self.packed.buffers()).device

    def tile_experts(self, fused: str) -> int:
        """Experts dequantized at once: ``tile_bytes`` of working memory."""
        elements = 1
        for size in self.expert_shapes[fused]:
            elements *= size
        return max(1, self.tile_bytes // (elements * _DEQUANT_BYTES_PER_ELEMENT))

    def dequantize(self, fused: str, experts: torch.Tensor) -> torch.Tensor:
        """Fused weight ``fused`` of ``experts`` ([n, ...] in the model's dtype, the family's layout), a tile
        of experts at a time."""
        experts = experts.to(self.device, torch.long)
        out = torch.empty((len(experts), *self.expert_shapes[fused]), dtype=self.dtype, device=self.device)
        step = self.tile_experts(fused)
        for first in range(0, len(experts), step):
            tile = slice(first, first + step)
            for proj in self.family.fused_sources()[fused]:
                weight = self.quant.dequantize(self.packed[proj].take(experts[tile]), dtype=self.dtype,
                                               name=f"{self.name}.{proj}")
                self.family.fused_slot(fused, out, tile, proj).copy_(weight)
                del weight
        self.experts_dequantized += len(experts)
        return out

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                *args, **kwargs) -> torch.Tensor:
        total = self.num_experts
        routed = torch.unique(top_k_index)
        routed = routed[(routed >= 0) & (routed < total)]  # leave out expert-parallel sentinels (>= E)
        compact = torch.full((total + 1,), len(routed), dtype=top_k_index.dtype, device=top_k_index.device)
        compact[routed] = torch.arange(len(routed), dtype=top_k_index.dtype, device=top_k_index.device)
        index = compact[top_k_index.clamp(0, total)]  # routed experts renumbered in order; sentinels stay >= n
        self.__dict__.update({fused: self.dequantize(fused, routed) for fused in self.expert_shapes})
        self.num_experts = len(routed)
        try:
            return self._original_class.forward(self, hidden_states, index, top_k_weights, *args, **kwargs)
        finally:
            self.num_experts = total
            for fused in self.expert_shapes:
                self.__dict__.pop(fused, None)

    def __getattr__(self, name: str):
        # the replaced class's helpers (e.g. transformers' ``_apply_gate``), bound to this module
        try:
            return super().__getattr__(name)
        except AttributeError:
            helper = getattr(self.__dict__.get("_original_class"), name, None)
            if not callable(helper):
                raise
            return types.MethodType(helper, self)

    def extra_repr(self) -> str:
        return f"{self._original_class.__name__} packed ({self.quant.name}), num_experts={self.num_experts}"


# ------------------------------------------------------------------------------------ loading


def _expert_groups(family: ModelFamily, quant: QuantFormat, modules: dict[str, dict[str, str]]
                   ) -> tuple[dict[str, dict[str, str]], dict[str, dict[int, dict[str, dict[str, str]]]]]:
    """Quantized modules -> (plain Linears {module: {suffix: key}}, experts {experts module: {expert: {proj:
    {suffix: key}}}})."""
    linears: dict[str, dict[str, str]] = {}
    experts: dict[str, dict[int, dict[str, dict[str, str]]]] = defaultdict(lambda: defaultdict(dict))
    for module, owned in modules.items():
        info = family.classify(f"{module}.{quant.marker}")
        if info.role is KeyRole.PER_EXPERT:
            experts[info.prefix][info.expert][info.name.rpartition(".")[0]] = owned
        else:
            linears[module] = owned
    return linears, experts


def _read_packed(ckpt: Checkpoint, linears, experts, device: str) -> tuple[dict, dict]:
    """Every quantized tensor, in its stored dtype, on ``device``: Linears' as they are, experts' copied into
    their stack [E, ...] as they arrive (one expert's tensor at a time beside the stacks)."""
    where: dict[str, tuple] = {}
    for module, owned in linears.items():
        for suffix, key in owned.items():
            where[key] = (module, None, None, suffix)
    for prefix, by_expert in experts.items():
        for expert, projs in by_expert.items():
            for proj, owned in projs.items():
                for suffix, key in owned.items():
                    where[key] = (prefix, expert, proj, suffix)
    linear_tensors: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    stacks: dict[str, dict[str, dict[str, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
    for key, tensor in ckpt.read(list(where), device):
        module, expert, proj, suffix = where[key]
        if expert is None:
            linear_tensors[module][suffix] = tensor
            continue
        stack = stacks[module][proj].get(suffix)
        if stack is None:
            count = len(experts[module])
            stack = stacks[module][proj][suffix] = torch.empty((count, *tensor.shape), dtype=tensor.dtype,
                                                               device=tensor.device)
        if stack.shape[1:] != tensor.shape or stack.dtype != tensor.dtype:
            raise ReapError(f"{key}: {tuple(tensor.shape)} {tensor.dtype} differs from the other experts' "
                            f"{tuple(stack.shape[1:])} {stack.dtype}; the checkpoint is inconsistent")
        stack[expert].copy_(tensor)
        del tensor
    return linear_tensors, stacks


def _check_experts(prefix: str, by_expert: dict, family: ModelFamily, original: nn.Module,
                   plain_keys: list[str]) -> None:
    ids = sorted(by_expert)
    expected = family.fused_sources()
    projections = {p for sources in expected.values() for p in sources}
    count = getattr(original, "num_experts", None)
    if ids != list(range(len(ids))) or (count is not None and len(ids) != count):
        raise ReapError(f"{prefix}: quantized experts {ids[:3]}...{ids[-3:]} are not the model's {count} experts "
                        "numbered from 0; the checkpoint does not match its config.json")
    for expert in ids:
        have = set(by_expert[expert])
        if have != projections:
            lacking = sorted(projections - have) or sorted(have - projections)
            raise ReapError(f"{prefix}.{expert}: quantized projections {sorted(have)}, the model's experts have "
                            f"{sorted(projections)} ({', '.join(lacking)}); the checkpoint is incomplete or "
                            "mixes quantized and plain experts")
    plain = [k for k in plain_keys if k.startswith(prefix + ".")]
    if plain:
        raise ReapError(f"{plain[0]}: plain tensor among the quantized experts of {prefix}; packed loading "
                        "keeps every expert of a layer quantized (load the model whole instead)")


def _install_experts(model: nn.Module, prefix: str, family: ModelFamily, quant: QuantFormat,
                     stacks: dict[str, dict[str, torch.Tensor]], dtype: torch.dtype) -> PackedExperts:
    original = model.get_submodule(prefix)
    fused_shapes = {name: tuple(param.shape[1:]) for name, param in original.named_parameters(recurse=False)}
    unknown = sorted(set(fused_shapes) - set(family.fused_sources()))
    if unknown:
        raise ReapError(f"{prefix}: the experts module holds {', '.join(unknown)}, which the {family.name} family "
                        "does not build from per-expert projections; packed loading does not support it")
    device = next(iter(next(iter(stacks.values())).values())).device
    first = torch.zeros(1, dtype=torch.long, device=device)
    proj_shapes = {}
    for proj, tensors in stacks.items():  # dequantize expert 0 once: the stored shapes fit the config
        weight = quant.dequantize({s: t.index_select(0, first) for s, t in tensors.items()}, dtype=dtype,
                                  name=f"{prefix}.0.{proj}")
        proj_shapes[proj] = tuple(weight.shape[1:])
    for fused, sources in family.fused_sources().items():
        expected = fused_shapes.get(fused)
        got = family.fused_shape(fused, 1, sources[-1], proj_shapes[sources[-1]])[1:]
        if expected is None or tuple(expected) != tuple(got):
            raise ReapError(f"{prefix}.{fused}: the quantized experts dequantize to {list(got)} per expert, the "
                            f"model's {fused} is {list(expected or [])}; the checkpoint does not match its config")
    packed = PackedExperts(original, family, quant, prefix, stacks, fused_shapes, dtype)
    parent, _, child = prefix.rpartition(".")
    setattr(model.get_submodule(parent), child, packed)
    return packed


def _install_linear(model: nn.Module, module: str, quant: QuantFormat, tensors: dict[str, torch.Tensor],
                    dtype: torch.dtype) -> PackedLinear:
    try:
        original = model.get_submodule(module)
    except AttributeError:
        raise ReapError(f"{module}: quantized in the checkpoint but not a module of the model; the checkpoint "
                        "does not match its config.json") from None
    if not isinstance(original, nn.Linear):
        raise ReapError(f"{module}: quantized in the checkpoint but the model's {type(original).__name__} is not "
                        "a Linear; packed loading does not support it (load the model whole)")
    weight = quant.dequantize(tensors, dtype=dtype, name=module)
    if tuple(weight.shape) != (original.out_features, original.in_features):
        raise ReapError(f"{module}: the quantized weight dequantizes to {list(weight.shape)}, the model's Linear is "
                        f"[{original.out_features}, {original.in_features}]; the checkpoint does not match its config")
    del weight
    packed = PackedLinear(quant, tensors, module, original.in_features, original.out_features, original.bias)
    parent, _, child = module.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, packed)
    return packed


def install_packed(model: nn.Module, ckpt: Checkpoint, dtype: torch.dtype, device: str) -> list[str]:
    """Replace every quantized module of ``model`` (built on meta from the plain config) by its packed
    version, its stored tensors read onto ``device``; returns the checkpoint keys not consumed (the
    plain ones, for the caller's state dict)."""
    family, quant = ckpt.family, ckpt.quant_format
    plain_keys, modules = quant.split_keys(list(ckpt.weight_map), ckpt.weight_map)
    linears, experts = _expert_groups(family, quant, modules)
    for prefix, by_expert in experts.items():
        try:
            original = model.get_submodule(prefix)
        except AttributeError:
            raise ReapError(f"{prefix}: quantized experts in the checkpoint but no such module in the model; the "
                            "checkpoint does not match its config.json") from None
        _check_experts(prefix, by_expert, family, original, plain_keys)
    linear_tensors, stacks = _read_packed(ckpt, linears, experts, device)
    for prefix in experts:
        _install_experts(model, prefix, family, quant, stacks.pop(prefix), dtype)
    for module in linears:
        _install_linear(model, module, quant, linear_tensors.pop(module), dtype)
    return plain_keys


def packed_buffer_names(model: nn.Module) -> set[str]:
    """State-dict names of every packed tensor of ``model``."""
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, (PackedLinear, PackedExperts)):
            names.update(f"{prefix}.{name}" for name, _ in module.named_buffers())
    return names


def packed_model_bytes(path: Path | str, dtype: torch.dtype = torch.bfloat16) -> int:
    """Device bytes of the weights of ``load_model(path, dtype, packed=True)``, from the shard headers: the
    quantized tensors as stored, every other floating tensor in ``dtype``.  The forward adds activations,
    the KV cache and one tile of dequantized experts (``TILE_BYTES``) at a time."""
    from .integrity import shard_headers
    from .safetensors_io import SourceTensor

    ckpt = Checkpoint(Path(path))
    quant = ckpt.quant_format
    quantized = set()
    if quant is not None:
        _, modules = quant.split_keys(list(ckpt.weight_map), ckpt.weight_map)
        quantized = {key for owned in modules.values() for key in owned.values()}
    size = torch.finfo(dtype).bits // 8
    total = 0
    for header in shard_headers(ckpt).values():
        for key, tensor in header.tensors.items():
            tensor: SourceTensor
            if key not in ckpt.weight_map:  # a part the model never loads (ModelFamily.left_out)
                continue
            floating = tensor.dtype.startswith(("F", "BF")) and not tensor.dtype.startswith("F8")
            total += tensor.nbytes if key in quantized or not floating else math.prod(tensor.shape) * size
    return total
