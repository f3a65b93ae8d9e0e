"""Quantized tiny checkpoints (AWQ, compressed-tensors pack-quantized, block FP8), written offline.

Each quantizer is written from its format's definition (see ``reap_vlm.quant``).  As the real
releases do, the per-expert expert projections and the language model's attention q/k/v/o
projections are quantized; the router (``mlp.gate``), vision tower, lm_head, norms and embeddings
stay plain and are named in the config's not-to-convert list the way each format's releases
name them.  ``quantize_checkpoint`` also writes the dequantized reference: the same keys as the
per-expert source, every quantized weight replaced by exactly what its quantized form decodes to
(float32), so a correct dequantizer reproduces it bit for bit.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import INDEX_NAME, SINGLE_NAME, Checkpoint, memory_state_dict
from .families import KeyRole
from .fixtures import FixtureSpec, build_tiny_checkpoint, write_sharded_safetensors
from .fsutil import atomic_output_dir
from .quant import awq_pack, detect_format, pack_int32

FORMATS = ("awq", "compressed-tensors", "fp8")
FP8_MAX = 448.0  # largest finite float8_e4m3fn

# The Linears the real releases quantize: attention projections and every expert projection.
_QUANTIZED = re.compile(r"^model\.language_model\.layers\.\d+\."
                        r"(self_attn\.[qkvo]_proj|mlp\.experts\.\d+\.(gate|up|down)_proj)$")


# ------------------------------------------------------------------------------------ quantizers


def quantize_awq(weight: torch.Tensor, group_size: int, *, reference: bool = True
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Linear weight [out, in] -> ({qweight, qzeros, scales}, dequantized [out, in] float32).

    Asymmetric 4-bit min/max per group of ``group_size`` input rows and output column; fp16 scales
    rounded before quantizing so the integers fit the stored scale.  Leading dims (e.g. experts
    [E, out, in]) are batched: every tensor gets them in front, each slice is that Linear's.
    ``reference=False``: the dequantized weight is not computed (None)."""
    w = weight.to(torch.float32).transpose(-1, -2)  # AWQ works on [in, out]
    *lead, rows, columns = w.shape
    groups = w.reshape(*lead, rows // group_size, group_size, columns)
    low, high = groups.amin(-2).clamp(max=0), groups.amax(-2).clamp(min=0)
    scales = ((high - low).clamp(min=1e-5) / 15).to(torch.float16)
    s = scales.to(torch.float32).unsqueeze(-2)
    zeros = (-low / s.squeeze(-2)).round().clamp(0, 15)
    q = (groups / s + zeros.unsqueeze(-2)).round().clamp(0, 15)
    dequantized = None
    if reference:
        dequantized = ((q - zeros.unsqueeze(-2)) * s).reshape(*lead, rows, columns).transpose(-1, -2).contiguous()
    q = q.reshape(*lead, rows, columns).to(torch.int32)
    tensors = {"qweight": awq_pack(q), "qzeros": awq_pack(zeros.to(torch.int32)), "scales": scales.contiguous()}
    return tensors, dequantized


def quantize_pack(weight: torch.Tensor, group_size: int, bits: int = 4, symmetric: bool = True,
                  scale_dtype: torch.dtype = torch.bfloat16, *, reference: bool = True
                  ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Linear weight [out, in] -> (compressed-tensors pack-quantized tensors, dequantized float32).

    Signed integers in [-2**(b-1), 2**(b-1) - 1], stored +2**(b-1) and packed along the input dim;
    the asymmetric zero point is packed along the output dim.  Leading dims are batched as in
    ``quantize_awq`` (``weight_shape`` stays one Linear's [out, in])."""
    w = weight.to(torch.float32)
    *lead, rows, columns = w.shape
    q_min, q_max = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    groups = w.reshape(*lead, rows, columns // group_size, group_size)
    if symmetric:
        scale = (groups.abs().amax(-1) / ((q_max - q_min) / 2)).clamp(min=1e-8).to(scale_dtype)
        zero = torch.zeros_like(scale, dtype=torch.float32)
    else:
        low, high = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
        scale = ((high - low) / (q_max - q_min)).clamp(min=1e-8).to(scale_dtype)
        zero = (q_min - low / scale.to(torch.float32)).round().clamp(q_min, q_max)
    s = scale.to(torch.float32)
    q = (groups / s[..., None] + zero[..., None]).round().clamp(q_min, q_max)
    dequantized = ((q - zero[..., None]) * s[..., None]).reshape(*lead, rows, columns) if reference else None
    offset = 1 << (bits - 1)
    tensors = {
        "weight_packed": pack_int32(q.reshape(*lead, rows, columns).to(torch.int64) + offset, bits),
        "weight_scale": scale.contiguous(),
        "weight_shape": torch.tensor([rows, columns], dtype=torch.int64),
    }
    if not symmetric:
        zero_point = pack_int32(zero.to(torch.int64).transpose(-1, -2) + offset, bits)
        tensors["weight_zero_point"] = zero_point.transpose(-1, -2).contiguous()
    return tensors, dequantized


def quantize_fp8_block(weight: torch.Tensor, block: tuple[int, int], *, reference: bool = True
                       ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Linear weight [out, in] -> ({weight float8_e4m3fn, weight_scale_inv float32}, dequantized float32).

    One scale per block (edge blocks partial): amax / 448.  Leading dims are batched as in ``quantize_awq``."""
    w = weight.to(torch.float32)
    *lead, rows, columns = w.shape
    br, bc = block
    padded = torch.nn.functional.pad(w, (0, -columns % bc, 0, -rows % br))
    blocks = padded.reshape(*lead, padded.shape[-2] // br, br, padded.shape[-1] // bc, bc)
    scale_inv = (blocks.abs().amax(dim=(-3, -1)) / FP8_MAX).clamp(min=1e-12)
    del padded, blocks
    full = scale_inv.repeat_interleave(br, -2)[..., :rows, :].repeat_interleave(bc, -1)[..., :columns]
    q = (w / full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    dequantized = q.to(torch.float32) * full if reference else None
    return {"weight": q, "weight_scale_inv": scale_inv.contiguous()}, dequantized


# ------------------------------------------------------------------------------------ configs


def _linear_modules(state: dict[str, torch.Tensor]) -> list[str]:
    """Modules with a 2-D weight that are not embeddings: the model's Linears."""
    return [key[: -len(".weight")] for key, t in state.items()
            if key.endswith(".weight") and t.ndim == 2 and not re.search(r"embed_tokens|pos_embed", key)]


def quantization_config_for(fmt: str, state: dict[str, torch.Tensor], group_size: int,
                            block: tuple[int, int], symmetric: bool) -> dict:
    """A quantization_config spelled as the releases of ``fmt`` spell it."""
    modules = {key.rpartition(".")[0] for key in state}
    plain_modules = sorted(m for m in modules if not _QUANTIZED.match(m))
    if fmt == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group_size, "version": "gemm", "zero_point": True,
                "modules_to_not_convert": ["model.visual", "mlp.gate", "lm_head"]}
    if fmt == "fp8":
        # Qwen's FP8 releases list every module they left alone by full name (norms and router included).
        return {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                "weight_block_size": list(block), "modules_to_not_convert": plain_modules}
    if fmt == "compressed-tensors":
        # llm-compressor lists the Linears it skipped by full name.
        ignore = sorted(m for m in _linear_modules(state) if not _QUANTIZED.match(m))
        weights = {"actorder": None, "block_structure": None, "dynamic": False, "group_size": group_size,
                   "num_bits": 4, "observer": "minmax", "observer_kwargs": {}, "strategy": "group",
                   "symmetric": symmetric, "type": "int"}
        return {
            "config_groups": {"group_0": {"format": "pack-quantized", "input_activations": None,
                                          "output_activations": None, "targets": ["Linear"], "weights": weights}},
            "format": "pack-quantized",
            "global_compression_ratio": None,
            "ignore": ignore,
            "kv_cache_scheme": None,
            "quant_method": "compressed-tensors",
            "quantization_status": "compressed",
            "sparsity_config": {},
            "transform_config": {},
            "version": "0.11.0",
        }
    raise ValueError(f"unknown format {fmt!r}; one of {FORMATS}")


# ------------------------------------------------------------------------------------ checkpoints


def _copy_side_files(source: Path, folder: Path) -> None:
    for item in source.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and item.name not in (INDEX_NAME, "config.json"):
            shutil.copy2(item, folder / item.name)


def quantize_checkpoint(source: str | Path, output: str | Path, fmt: str, reference: str | Path | None = None, *,
                        group_size: int = 16, block: tuple[int, int] = (32, 32), symmetric: bool = True,
                        num_shards: int = 3, force: bool = False) -> tuple[Path, Path | None]:
    """Write ``fmt``'s quantized version of the (fused or per-expert) checkpoint ``source`` at
    ``output``, one tensor per expert, and its dequantized reference at ``reference``."""
    src = Checkpoint(Path(source))
    if src.quant_format is not None:
        raise ValueError(f"{source} is already quantized")
    family = src.family
    state = family.to_checkpoint_layout(memory_state_dict(src), per_expert=True)
    qconfig = quantization_config_for(fmt, state, group_size, block, symmetric)
    config = json.loads((src.path / "config.json").read_text())
    config["quantization_config"] = qconfig
    quant = detect_format(config)

    quantized: dict[str, torch.Tensor] = {}
    plain: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        module, _, suffix = key.rpartition(".")
        if suffix != "weight" or not _QUANTIZED.match(module):
            quantized[key] = plain[key] = tensor
            continue
        if quant.ignores(module):
            raise AssertionError(f"the {fmt} config would skip {module}")
        if fmt == "awq":
            tensors, dequantized = quantize_awq(tensor, group_size)
        elif fmt == "compressed-tensors":
            tensors, dequantized = quantize_pack(tensor, group_size, symmetric=symmetric)
        else:
            tensors, dequantized = quantize_fp8_block(tensor, block)
        for name, value in tensors.items():
            quantized[f"{module}.{name}"] = value
        plain[key] = dequantized.contiguous()
    unlisted = [m for m in _linear_modules(state) if not _QUANTIZED.match(m) and not quant.ignores(m)]
    if unlisted:
        raise AssertionError(f"the {fmt} config does not list the plain Linears {unlisted[:3]}")

    outputs = [(Path(output), quantized, config)]
    if reference is not None:
        ref_config = {k: v for k, v in config.items() if k != "quantization_config"}
        outputs.append((Path(reference), plain, ref_config))
    for path, tensors, cfg in outputs:
        with atomic_output_dir(path, force=force) as folder:
            _copy_side_files(src.path, folder)
            (folder / "config.json").write_text(json.dumps(cfg, indent=2))
            if num_shards > 1:
                write_sharded_safetensors(folder, tensors, num_shards)
            else:
                save_file(tensors, str(folder / SINGLE_NAME), metadata={"format": "pt"})
    return Path(output), Path(reference) if reference is not None else None


# ------------------------------------------------------------------------------------ full-size, layer by layer

_BYTES_PER_ELEMENT = 48  # the quantizers' working memory per float32 weight element, generously


def _quantize_weight(fmt: str, weight: torch.Tensor, group_size: int, block: tuple[int, int],
                     symmetric: bool) -> dict[str, torch.Tensor]:
    if fmt == "awq":
        return quantize_awq(weight, group_size, reference=False)[0]
    if fmt == "compressed-tensors":
        tensors = quantize_pack(weight, group_size, symmetric=symmetric, reference=False)[0]
        tensors["weight_shape"] = tensors["weight_shape"].expand(*weight.shape[:-2], 2)  # one per Linear
        return tensors
    if fmt == "fp8":
        return quantize_fp8_block(weight, block, reference=False)[0]
    raise ValueError(f"unknown format {fmt!r}; one of {FORMATS}")


def quantize_layer(family, state: dict[str, torch.Tensor], fmt: str, *, group_size: int = 128,
                   block: tuple[int, int] = (128, 128), symmetric: bool = True,
                   chunk_bytes: int = 1 << 30) -> dict[str, torch.Tensor]:
    """In-memory tensors (fused experts, e.g. one decoder layer's from ``memory_state_dict``) -> ``fmt``'s
    on-disk tensors as the releases store them: one quantized Linear per expert projection
    (``experts.{e}.{proj}.<suffix>``), attention q/k/v/o quantized, the rest as given.  Fused expert
    tensors are quantized a range of experts at a time (batched; ``chunk_bytes`` of working memory),
    on the tensors' device; the result is on the CPU and contiguous (one storage per tensor)."""
    out: dict[str, torch.Tensor] = {}

    def emit(module: str, tensors: dict[str, torch.Tensor], first: int | None = None) -> None:
        for suffix, value in tensors.items():
            if first is None:
                out[f"{module}.{suffix}"] = value.cpu().contiguous()
                continue
            value = value.cpu()
            for i in range(value.shape[0]):  # a fresh storage per expert (safetensors refuses shared ones)
                expert = value[i].clone(memory_format=torch.contiguous_format)
                out[module.format(expert=first + i) + f".{suffix}"] = expert

    for key, tensor in state.items():
        info = family.classify(key)
        if info.role is KeyRole.PER_EXPERT:
            raise ValueError(f"{key}: quantize_layer takes in-memory (fused) expert tensors")
        if info.role is KeyRole.FUSED_EXPERTS:
            sources = family.fused_sources()[info.name]
            num = tensor.shape[0]
            per_expert = tensor[0].numel() // len(sources)
            step = max(1, chunk_bytes // (_BYTES_PER_ELEMENT * per_expert))
            for first in range(0, num, step):
                experts = slice(first, min(num, first + step))
                for proj in sources:
                    module = f"{info.prefix}.{{expert}}.{proj}"
                    if _QUANTIZED.match(module.format(expert=first)):
                        weight = family.fused_slot(info.name, tensor, experts, proj)
                        emit(module, _quantize_weight(fmt, weight, group_size, block, symmetric), first)
                    else:
                        emit(module, {"weight": family.fused_slot(info.name, tensor, experts, proj)}, first)
            continue
        module, _, suffix = key.rpartition(".")
        if suffix == "weight" and _QUANTIZED.match(module):
            emit(module, _quantize_weight(fmt, tensor, group_size, block, symmetric))
        else:
            out[key] = tensor.cpu().contiguous()
    return out


def quantize_checkpoint_by_layer(source: str | Path, output: str | Path, fmt: str, *, group_size: int = 128,
                                 block: tuple[int, int] = (128, 128), symmetric: bool = True,
                                 device: str = "cpu", chunk_bytes: int = 1 << 30,
                                 force: bool = False) -> Path:
    """``quantize_checkpoint`` for checkpoints of any size: ``fmt``'s version of ``source`` at ``output``, read
    and quantized one decoder layer at a time on ``device`` (``quantize_layer``), one shard per layer (plus
    one for everything outside the layers).  No dequantized reference; the quantized tensors are the ones
    ``quantize_checkpoint`` writes."""
    src = Checkpoint(Path(source))
    if src.quant_format is not None:
        raise ValueError(f"{source} is already quantized")
    family = src.family
    by_layer = family.keys_by_layer(src.weight_map)
    in_layers = {k for keys in by_layer.values() for k in keys}
    groups = [keys for _, keys in sorted(by_layer.items())]
    rest = [k for k in src.weight_map if k not in in_layers]
    if rest:
        groups.append(rest)

    config = json.loads((src.path / "config.json").read_text())
    config["quantization_config"] = quantization_config_for(fmt, _disk_shapes(src), group_size, block, symmetric)
    quant = detect_format(config)
    weight_map, total = {}, 0
    with atomic_output_dir(Path(output), force=force) as folder:
        _copy_side_files(src.path, folder)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        for i, keys in enumerate(groups, 1):
            state = memory_state_dict(src, keys, device=device)
            tensors = quantize_layer(family, state, fmt, group_size=group_size, block=block, symmetric=symmetric,
                                     chunk_bytes=chunk_bytes)
            del state
            ignored = sorted({k.rpartition(".")[0] for k in tensors if k.endswith("." + quant.marker)
                              and quant.ignores(k.rpartition(".")[0])})
            if ignored:
                raise AssertionError(f"the {fmt} config would skip {ignored[:3]}")
            shard = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            save_file(tensors, str(folder / shard), metadata={"format": "pt"})
            for key, tensor in tensors.items():
                weight_map[key] = shard
                total += tensor.numel() * tensor.element_size()
            del tensors
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))
    return Path(output)


def _disk_shapes(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """Every tensor of ``ckpt`` as a meta tensor under its one-tensor-per-expert name (what
    ``quantization_config_for`` looks at: names and dims)."""
    from safetensors import safe_open

    family, sizes = ckpt.family, ckpt.family.sizes(ckpt.config)
    state = {}
    for shard, keys in ckpt.keys_by_shard().items():
        with safe_open(ckpt.path / shard, "pt") as f:
            for key in keys:
                tensor = torch.empty(f.get_slice(key).get_shape(), device="meta")
                info = family.classify(key)
                layout = family.fused_layout(info.name) if info.role is KeyRole.FUSED_EXPERTS else None
                state[key] = layout.to_memory(tensor, sizes, key) if layout else tensor
    return family.to_checkpoint_layout(state, per_expert=True)


def build_quantized_checkpoint(path: str | Path, fmt: str, reference: str | Path | None = None,
                               spec: FixtureSpec | None = None, force: bool = False,
                               **options) -> tuple[Path, Path | None]:
    """The tiny fixture (``spec``, per-expert or fused) quantized in ``fmt`` at ``path``; its dequantized
    reference at ``reference``.  ``options`` go to ``quantize_checkpoint`` (group_size, block, symmetric...)."""
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.source-", dir=path.parent) as tmp:
        source = build_tiny_checkpoint(Path(tmp) / "source", spec or FixtureSpec(per_expert=True))
        return quantize_checkpoint(source, path, fmt, reference, force=force, **options)
