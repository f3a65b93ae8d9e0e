"""Weight-quantized checkpoints: detect the format, dequantize one Linear at a time.

Three formats are read, each written here from its definition:

* ``awq`` (AutoAWQ GEMM packing, 4 bit): per Linear ``qweight`` int32 [in, out/8], ``qzeros``
  int32 [in/group, out/8], ``scales`` fp16 [in/group, out].  Eight 4-bit values per int32,
  nibble i (bits 4i..4i+3) holding column ``AWQ_ORDER[i]`` of its group of eight output columns;
  zeros packed the same way.  ``w[in, out] = (q - z) * s`` per group of ``group_size`` input rows;
  the Linear weight [out, in] is its transpose.
* ``compressed-tensors`` with format ``pack-quantized`` (llm-compressor's int4/int8 weight-only
  output): ``weight_packed`` int32 [out, ceil(in * bits / 32)], values packed along the last dim
  from the low bits up, stored with an offset of 2**(bits-1); ``weight_scale`` [out, groups];
  ``weight_shape`` int64 [out, in]; asymmetric schemes add ``weight_zero_point``, packed the same
  way along dim 0 (the output dim); activation ordering adds ``weight_g_idx`` (group of each input
  column).  ``w = (q - zp) * scale`` per group along the input dim.
* ``fp8`` with ``weight_block_size`` [bo, bi] (block-wise FP8 releases): ``weight``
  float8_e4m3fn [out, in] and ``weight_scale_inv`` [ceil(out/bo), ceil(in/bi)];
  ``w = weight * scale_inv`` of its block (edge blocks are partial).

Detection is by config (``quantization_config`` at the top level or in the family's text section); which
modules are quantized is decided by the tensors (a module with the format's marker tensor), so
modules the release left alone (``modules_to_not_convert`` / ``ignore``: vision tower, router,
lm_head, norms, embeddings) are simply read as plain ``.weight`` tensors.

Dequantization computes in float32 (every product of a small integer and an fp16/bf16 scale is
exact there; fp8 * fp32 scale is one correctly rounded multiply) and casts once at the end.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from ..errors import ReapError

SUPPORTED = ("awq (GEMM packing, 4-bit), compressed-tensors (format pack-quantized, int 2/4/8-bit, "
             "group/channel/tensor strategy), fp8 (block-wise, weight_block_size)")

# Nibble i of an AWQ GEMM int32 holds column AWQ_ORDER[i] of its group of eight columns.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# Column j of the group sits in nibble AWQ_INVERSE[j].
AWQ_INVERSE = tuple(AWQ_ORDER.index(j) for j in range(8))


# ------------------------------------------------------------------------------------ bit packing


def unpack_int32(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Unsigned ``bits``-bit values packed 32/bits per int32 along the last dim, low bits first
    (value k of a row in word k // (32/bits) at bit (k % (32/bits)) * bits) -> int32 [..., length]."""
    if 32 % bits:
        raise ReapError(f"cannot unpack {bits}-bit values: only widths dividing 32 are supported")
    if packed.dtype != torch.int32:
        raise ReapError(f"packed weights must be int32, got {packed.dtype}")
    per_word = 32 // bits
    if packed.shape[-1] * per_word < length:
        raise ReapError(f"packed tensor {tuple(packed.shape)} holds fewer than {length} {bits}-bit values per row")
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    values = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # arithmetic shift; the mask drops sign bits
    return values.reshape(*packed.shape[:-1], packed.shape[-1] * per_word)[..., :length]


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``unpack_int32``: unsigned values in [0, 2**bits) along the last dim -> int32
    [..., ceil(n * bits / 32)], the last word zero-padded."""
    if 32 % bits:
        raise ValueError(f"cannot pack {bits}-bit values: only widths dividing 32 are supported")
    values = values.to(torch.int64)
    if values.numel() and (values.min() < 0 or values.max() >= 1 << bits):
        raise ValueError(f"values out of the unsigned {bits}-bit range")
    per_word = 32 // bits
    pad = -values.shape[-1] % per_word
    if pad:
        values = torch.nn.functional.pad(values, (0, pad))
    values = values.reshape(*values.shape[:-1], values.shape[-1] // per_word, per_word)
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=values.device)
    words = (values << shifts).sum(-1)  # < 2**32, exact in int64
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def awq_unpack(packed: torch.Tensor, columns: int) -> torch.Tensor:
    """AWQ GEMM int32 [rows, columns/8] -> unsigned 4-bit values [rows, columns] in column order."""
    if columns % 8 or packed.shape[-1] * 8 != columns:
        raise ReapError(f"AWQ tensor {tuple(packed.shape)} does not pack {columns} columns (8 per int32)")
    nibbles = unpack_int32(packed, 4, columns).reshape(*packed.shape, 8)
    order = torch.tensor(AWQ_INVERSE, device=packed.device)
    return nibbles.index_select(-1, order).reshape(*packed.shape[:-1], columns)


def awq_pack(values: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit values [rows, columns] (columns % 8 == 0) -> AWQ GEMM int32 [rows, columns/8]."""
    if values.shape[-1] % 8:
        raise ValueError("AWQ packs 8 columns per int32; the column count must be a multiple of 8")
    groups = values.reshape(*values.shape[:-1], values.shape[-1] // 8, 8)
    nibbles = groups.index_select(-1, torch.tensor(AWQ_ORDER, device=values.device))
    return pack_int32(nibbles.reshape(values.shape), 4)


def _expand_groups(groups: int, columns: int, group_size: int | None, g_idx: torch.Tensor | None,
                   device, name: str) -> torch.Tensor:
    """Group index of each of ``columns`` input columns."""
    if g_idx is not None:
        if g_idx.numel() != columns:
            raise ReapError(f"{name}: g_idx has {g_idx.numel()} entries for {columns} input columns")
        return g_idx.to(device=device, dtype=torch.long)
    if group_size is None or group_size <= 0:
        group_size = columns
    if math.ceil(columns / group_size) != groups:
        raise ReapError(f"{name}: {groups} quantization groups do not fit {columns} input columns "
                        f"in groups of {group_size}; the checkpoint does not match its quantization_config")
    return torch.arange(columns, device=device) // group_size


def _affine(q: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, group: torch.Tensor, group_size: int | None,
            dim: int) -> torch.Tensor:
    """``(q - zero[group]) * scale[group]`` in float32, ``group`` indexing ``dim`` of zero and scale (-1 or -2).
    Groups that are equal runs (``group_size`` dividing the length) are broadcast rather than expanded: the very
    same operations per element, two fewer passes over the weight."""
    length, groups = q.shape[dim], scale.shape[dim]
    if group_size and group_size > 0 and groups * group_size == length:
        runs = (*q.shape[:dim], groups, group_size, *q.shape[dim:][1:])  # dim split into (groups, group_size)
        weight = (q.reshape(runs) - zero.unsqueeze(dim)).to(torch.float32) * scale.to(torch.float32).unsqueeze(dim)
        return weight.reshape(q.shape)
    return (q - zero.index_select(dim, group)).to(torch.float32) * scale.to(torch.float32).index_select(dim, group)


# ------------------------------------------------------------------------------------ formats


@dataclass(frozen=True)
class QuantFormat:
    """A weight quantization format: which tensors of a Linear it owns and how to dequantize them.

    ``suffixes``: every tensor suffix of a quantized Linear (``<module>.<suffix>``) the format
    owns; ``required``: those that must be present; ``marker``: the one whose presence marks the
    module as quantized.  Other tensors of a module (a ``bias``) are plain.
    """

    name: str
    suffixes: tuple[str, ...]
    required: tuple[str, ...]
    marker: str
    config: Mapping = field(default_factory=dict, compare=False, repr=False)

    def dequantize(self, tensors: Mapping[str, torch.Tensor], device: str | torch.device | None = None,
                   dtype: torch.dtype | None = None, name: str = "") -> torch.Tensor:
        """{suffix: tensor} of one Linear -> its weight [out, in] on ``device`` in ``dtype``
        (default float32).  Tensors stacked along leading dims (a range of experts, each tensor [n, ...] with
        n Linears' stored tensors) give the stacked weights [n, out, in], each what its own Linear gives."""
        missing = [s for s in self.required if s not in tensors]
        if missing:
            raise ReapError(f"{name or 'module'}: {self.name} quantized Linear lacks {', '.join(missing)}")
        tensors = {k: v.to(device) if device is not None else v for k, v in tensors.items()}
        weight = self._dequantize(tensors, name or "module")
        return weight.to(dtype or torch.float32).contiguous()

    def _dequantize(self, tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        """The weight [..., out, in] in float32 (may be a view); elementwise, so a stack of Linears gives each
        Linear's weight bit for bit."""
        raise NotImplementedError

    @property
    def weight_bits(self) -> int:
        """Bits per stored weight (the fewest, where config groups differ): sizes once dequantized."""
        raise NotImplementedError

    def ignores(self, module: str) -> bool:
        """Whether the config's not-to-convert list names ``module`` (by this format's matching rule)."""
        raise NotImplementedError

    def split_keys(self, keys: Iterable[str], weight_map: Mapping[str, str]
                   ) -> tuple[list[str], dict[str, dict[str, str]]]:
        """Requested checkpoint keys -> (plain keys, {quantized module: {suffix: key}}).

        A quantized module's every owned tensor is included even when only some were asked for;
        asking for ``<module>.weight`` of a quantized module that stores no such key asks for the
        module too.
        """
        plain: list[str] = []
        modules: dict[str, dict[str, str]] = {}
        for key in keys:
            module, _, suffix = key.rpartition(".")
            quantized = f"{module}.{self.marker}" in weight_map
            if quantized and (suffix in self.suffixes or (suffix == "weight" and key not in weight_map)):
                if module not in modules:
                    owned = {s: f"{module}.{s}" for s in self.suffixes if f"{module}.{s}" in weight_map}
                    missing = [s for s in self.required if s not in owned]
                    if missing:
                        raise ReapError(f"{module}: {self.name} quantized Linear has no {', '.join(missing)} "
                                        "in the checkpoint; the download is incomplete or the index is wrong")
                    modules[module] = owned
            else:
                plain.append(key)
        return plain, modules

    def quantized_modules(self, weight_map: Iterable[str]) -> list[str]:
        suffix = "." + self.marker
        return sorted(k[: -len(suffix)] for k in weight_map if k.endswith(suffix))


@dataclass(frozen=True)
class AwqFormat(QuantFormat):
    bits: int = 4
    group_size: int = 128
    not_convert: tuple[str, ...] = ()

    @property
    def weight_bits(self):
        return self.bits

    def _dequantize(self, tensors, name):
        qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
        columns = scales.shape[-1]
        rows = qweight.shape[-2]
        if scales.ndim < 2 or qzeros.shape[:-1] != scales.shape[:-1] or qweight.shape[:-2] != scales.shape[:-2]:
            raise ReapError(f"{name}: AWQ qweight {tuple(qweight.shape)}, scales {tuple(scales.shape)} and qzeros "
                            f"{tuple(qzeros.shape)} disagree")
        q = awq_unpack(qweight, columns)  # [..., in, out]
        z = awq_unpack(qzeros, columns)  # [..., groups, out]
        group = _expand_groups(scales.shape[-2], rows, self.group_size, None, q.device, name)
        return _affine(q, z, scales, group, self.group_size, -2).transpose(-1, -2)

    def ignores(self, module):
        # AutoAWQ and vLLM skip a module when a fragment is a substring of its name.
        return any(fragment in module for fragment in self.not_convert)


@dataclass(frozen=True)
class PackQuantizedFormat(QuantFormat):
    bits: tuple[int, ...] = (4,)  # num_bits of the config groups
    group_sizes: tuple[int, ...] = ()  # group_size of the config groups with strategy "group"
    ignore: tuple[str, ...] = ()

    @property
    def weight_bits(self):
        return min(self.bits)

    def _bits_for(self, packed: torch.Tensor, columns: int, name: str) -> int:
        fits = [b for b in self.bits if packed.shape[-1] == math.ceil(columns * b / 32)]
        if not fits:
            raise ReapError(f"{name}: weight_packed {tuple(packed.shape)} fits no num_bits {list(self.bits)} "
                            f"of the config for {columns} input columns")
        return fits[0]

    def _group_size(self, groups: int, columns: int) -> int:
        # The config's group size first: 200 columns in groups of 128 make 2 groups, which 100 would too.
        fits = [g for g in self.group_sizes if math.ceil(columns / g) == groups]
        if fits:
            return fits[0]
        if groups == 1:
            return columns
        return columns // groups if columns % groups == 0 else 0  # 0: _expand_groups reports the mismatch

    def _dequantize(self, tensors, name):
        packed, scale = tensors["weight_packed"], tensors["weight_scale"]
        lead = tuple(packed.shape[:-2])  # stacked Linears (e.g. a tile of experts), each its own weight_shape
        shapes = tensors["weight_shape"].reshape(-1, 2)
        shape = [int(v) for v in shapes[0].tolist()] if shapes.numel() else []
        if len(shape) != 2 or packed.ndim < 2 or packed.shape[-2] != shape[0] or \
                (shapes.shape[0] > 1 and not bool((shapes == shapes[:1]).all())):
            raise ReapError(f"{name}: weight_shape {shapes.tolist()} does not match weight_packed "
                            f"{tuple(packed.shape)}")
        rows, columns = shape
        bits = self._bits_for(packed, columns, name)
        offset = 1 << (bits - 1)
        q = unpack_int32(packed, bits, columns) - offset  # signed [..., out, in]
        if scale.numel() == math.prod(lead):  # strategy "tensor": one scale per Linear
            scale = scale.reshape(*lead, 1, 1).expand(*lead, rows, 1)
        elif scale.ndim == len(lead) + 1:  # one scale per output row, stored [..., out]
            scale = scale.unsqueeze(-1)
        if scale.shape[:-1] != (*lead, rows):
            raise ReapError(f"{name}: weight_scale {tuple(scale.shape)} does not fit weight_shape {shape}")
        groups = scale.shape[-1]
        zero = tensors.get("weight_zero_point")
        if zero is None:
            zero = torch.zeros((*lead, rows, groups), dtype=torch.int32, device=q.device)
        elif zero.dtype == torch.int32 and zero.shape == (*lead, math.ceil(rows * bits / 32), groups) and \
                zero.shape[-2] != rows:  # packed along the output dim
            zero = unpack_int32(zero.transpose(-1, -2).contiguous(), bits, rows).transpose(-1, -2) - offset
        elif zero.numel() == math.prod(lead) * rows * groups:
            zero = zero.reshape(*lead, rows, groups)  # stored unpacked (signed)
        else:
            raise ReapError(f"{name}: weight_zero_point {tuple(zero.shape)} fits neither packed nor plain "
                            f"[{rows}, {groups}] zero points")
        g_idx = tensors.get("weight_g_idx")
        if g_idx is not None and g_idx.ndim > 1:  # stacked Linears: one ordering each
            if g_idx.shape != (*lead, columns):
                raise ReapError(f"{name}: g_idx {tuple(g_idx.shape)} does not fit {columns} input columns")
            index = g_idx.to(device=q.device, dtype=torch.long).unsqueeze(-2).expand(*lead, rows, columns)
            return (q - zero.gather(-1, index)).to(torch.float32) * scale.to(torch.float32).gather(-1, index)
        size = self._group_size(groups, columns)
        group = _expand_groups(groups, columns, size, g_idx, q.device, name)
        return _affine(q, zero, scale, group, size if g_idx is None else None, -1)

    def ignores(self, module):
        # compressed-tensors: an entry is an exact module name, or a regex after "re:" (re.match).
        return any(re.match(entry[3:], module) if entry.startswith("re:") else entry == module
                   for entry in self.ignore)


@dataclass(frozen=True)
class Fp8BlockFormat(QuantFormat):
    block: tuple[int, int] = (128, 128)
    not_convert: tuple[str, ...] = ()
    weight_bits = 8

    def _dequantize(self, tensors, name):
        weight, scale_inv = tensors["weight"], tensors["weight_scale_inv"]
        if weight.ndim < 2:
            raise ReapError(f"{name}: fp8 weight has shape {tuple(weight.shape)}, expected [out, in]")
        *lead, rows, columns = weight.shape
        block_rows, block_columns = self.block
        expected = (*lead, math.ceil(rows / block_rows), math.ceil(columns / block_columns))
        if tuple(scale_inv.shape) != expected:
            raise ReapError(f"{name}: weight_scale_inv {tuple(scale_inv.shape)} should be {list(expected)} for "
                            f"weight {[rows, columns]} in blocks of {list(self.block)}")
        scale = scale_inv.to(torch.float32)
        if rows % block_rows == 0 and columns % block_columns == 0:  # whole blocks: broadcast, the same products
            blocks = weight.to(torch.float32).reshape(*lead, expected[-2], block_rows, expected[-1], block_columns)
            return (blocks * scale[..., :, None, :, None]).reshape(weight.shape)
        scale = scale.repeat_interleave(block_rows, -2)[..., :rows, :].repeat_interleave(block_columns, -1)
        return weight.to(torch.float32) * scale[..., :columns]

    def ignores(self, module):
        # transformers' rule (should_convert_module): prefix regex match, or the name ends with the entry.
        return any(re.match(entry, module) or module.endswith(entry) for entry in self.not_convert)


# ------------------------------------------------------------------------------------ detection


def quantization_config(config: Mapping, sections: list[Mapping] | None = None) -> dict | None:
    """The first ``quantization_config`` of ``sections`` of config.json: a family's ``config_sections`` (the top
    level, then its text section); by default the top level, then each section nested in it."""
    if sections is None:
        sections = [config, *(v for v in config.values() if isinstance(v, Mapping))]
    q = next((s.get("quantization_config") for s in sections if s.get("quantization_config")), None)
    return dict(q) if q else None


def _unsupported(what: str) -> ReapError:
    return ReapError(f"{what} is not supported; supported quantizations: {SUPPORTED} "
                     "(or use an unquantized bf16 checkpoint)")


def _awq(q: dict) -> AwqFormat:
    bits = int(q.get("bits", q.get("w_bit", 4)))
    version = str(q.get("version", "gemm")).lower()
    group_size = int(q.get("group_size", q.get("q_group_size", 128)))
    if version != "gemm" or bits != 4:
        raise _unsupported(f"AWQ version {version!r} with {bits} bits")
    if q.get("zero_point") is False:
        raise _unsupported("AWQ without zero points (zero_point: false)")
    return AwqFormat("awq", ("qweight", "qzeros", "scales"), ("qweight", "qzeros", "scales"), "qweight", q,
                     bits=bits, group_size=group_size, not_convert=tuple(q.get("modules_to_not_convert") or ()))


def _compressed_tensors(q: dict) -> PackQuantizedFormat:
    groups = q.get("config_groups") or {}
    if not groups:
        raise _unsupported("compressed-tensors without config_groups")
    if q.get("transform_config"):
        raise _unsupported("compressed-tensors with a transform_config (rotated weights)")
    sparsity = q.get("sparsity_config") or {}
    if sparsity and sparsity.get("format") not in (None, "dense"):
        raise _unsupported(f"compressed-tensors sparsity format {sparsity.get('format')!r}")
    bits, group_sizes = set(), set()
    for group_name, scheme in groups.items():
        fmt = scheme.get("format") or q.get("format")
        weights = scheme.get("weights") or {}
        strategy = weights.get("strategy")
        if fmt != "pack-quantized":
            raise _unsupported(f"compressed-tensors format {fmt!r} (config group {group_name})")
        if weights.get("type", "int") != "int" or weights.get("dynamic") or strategy not in ("group", "channel",
                                                                                                "tensor"):
            raise _unsupported(f"compressed-tensors weights {weights.get('type')}/{strategy}"
                               f"{' dynamic' if weights.get('dynamic') else ''} (config group {group_name})")
        if int(weights.get("num_bits", 0)) not in (2, 4, 8):
            raise _unsupported(f"compressed-tensors {weights.get('num_bits')}-bit weights (config group {group_name})")
        bits.add(int(weights["num_bits"]))
        if strategy == "group":
            group_sizes.add(int(weights["group_size"]))
    return PackQuantizedFormat(
        "compressed-tensors",
        ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx"),
        ("weight_packed", "weight_scale", "weight_shape"), "weight_packed", q,
        bits=tuple(sorted(bits)), group_sizes=tuple(sorted(group_sizes)), ignore=tuple(q.get("ignore") or ()))


def _fp8(q: dict) -> Fp8BlockFormat:
    block = q.get("weight_block_size")
    if not block or len(block) != 2:
        raise _unsupported("fp8 without weight_block_size (per-tensor or per-channel fp8)")
    if str(q.get("fmt", "e4m3")).lower() != "e4m3":
        raise _unsupported(f"fp8 fmt {q.get('fmt')!r}")
    return Fp8BlockFormat("fp8", ("weight", "weight_scale_inv"), ("weight", "weight_scale_inv"), "weight_scale_inv",
                          q, block=(int(block[0]), int(block[1])),
                          not_convert=tuple(q.get("modules_to_not_convert") or ()))


_READERS = {"awq": _awq, "compressed-tensors": _compressed_tensors, "fp8": _fp8}


def detect_format(config: Mapping, sections: list[Mapping] | None = None) -> QuantFormat | None:
    """The checkpoint's ``QuantFormat`` from its config.json, None when it is not quantized."""
    q = quantization_config(config, sections)
    if q is None:
        return None
    method = str(q.get("quant_method", "")).lower().replace("_", "-")
    if method not in _READERS:
        raise _unsupported(f"quantization {q.get('quant_method')!r}")
    return _READERS[method](q)
