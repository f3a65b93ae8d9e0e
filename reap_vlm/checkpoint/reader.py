"""Reading a checkpoint folder without building the model: config, keys, tensors, and model loading."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import ReapError
from ..families import KeyRole, ModelFamily, family_for_config
from .fsutil import read_json
from .quant import QuantFormat, detect_format, quantization_config

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass
class Checkpoint:
    """A checkpoint folder: config.json plus safetensors shards (indexed or single)."""

    path: Path

    def __post_init__(self):
        self.path = Path(self.path)
        if not (self.path / "config.json").is_file():
            raise ReapError(f"{self.path} is not a checkpoint folder (no config.json); "
                            "point REAP_MODEL_PATH / --model at the model's folder")

    @cached_property
    def config(self) -> dict:
        return read_json(self.path / "config.json", "config.json")

    @cached_property
    def family(self) -> ModelFamily:
        return family_for_config(self.config)

    @cached_property
    def weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_NAME
        if index.is_file():
            weight_map = read_json(index, "safetensors index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ReapError(f"{index} has no weight_map; regenerate the index or re-download the model")
            missing = sorted({s for s in weight_map.values() if not (self.path / s).is_file()})
            if missing:
                raise ReapError(f"{self.path}: shard(s) {', '.join(missing[:3])} named in {INDEX_NAME} are missing; "
                                "the download is incomplete")
            return weight_map
        if (self.path / SINGLE_NAME).is_file():
            with safe_open(self.path / SINGLE_NAME, "pt") as f:
                return {k: SINGLE_NAME for k in f.keys()}
        raise ReapError(f"{self.path} has no {INDEX_NAME} or {SINGLE_NAME}; only safetensors checkpoints are supported")

    @property
    def shards(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    @property
    def quantization(self) -> str | None:
        q = quantization_config(self.config)
        return None if not q else str(q.get("quant_method", "unknown"))

    @cached_property
    def quant_format(self) -> QuantFormat | None:
        """How the weights are quantized (None: plain); a ReapError for formats we cannot read."""
        return detect_format(self.config)

    @property
    def num_experts(self) -> int:
        return self.family.num_experts(self.config)

    @property
    def top_k(self) -> int:
        return self.family.top_k(self.config)

    @property
    def moe_layers(self) -> list[int]:
        return self.family.moe_layers(self.config)

    @cached_property
    def has_per_expert_keys(self) -> bool:
        return any(self.family.classify(k).role is KeyRole.PER_EXPERT for k in self.weight_map)

    def keys_by_shard(self) -> dict[str, list[str]]:
        by_shard: dict[str, list[str]] = defaultdict(list)
        for key, shard in self.weight_map.items():
            by_shard[shard].append(key)
        return by_shard

    def read(self, keys: Iterable[str], device: str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (key, tensor) for ``keys``, opening each shard once."""
        wanted: dict[str, list[str]] = defaultdict(list)
        for key in keys:
            wanted[self.weight_map[key]].append(key)
        for shard, shard_keys in wanted.items():
            with safe_open(self.path / shard, "pt", device=device) as f:
                for key in shard_keys:
                    yield key, f.get_tensor(key)


def memory_state_dict(ckpt: Checkpoint, keys: Iterable[str] | None = None,
                      dtype: torch.dtype | None = None, device: str = "cpu",
                      source: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Tensors under their in-memory names and layouts: fused tensors transposed where the disk
    layout differs, per-expert tensors fused.  Quantized Linears (see ``reap_vlm.quant``) are
    dequantized on ``device`` and returned as ``<module>.weight`` (float32 when ``dtype`` is None);
    asking for any of a quantized module's tensors (or for its ``.weight``) reads all of them.

    Per-expert tensors are copied into their fused tensor as they arrive (dequantized one Linear at a
    time), so the peak is the fused tensors plus one Linear's temporaries, not twice the experts.
    ``source``: the checkpoint tensors already read (on-disk names, e.g. in pinned host memory), moved
    to ``device`` one at a time instead of reading the shards."""
    family = ckpt.family
    sizes = family.sizes(ckpt.config)
    quant = ckpt.quant_format
    keys = list(keys if keys is not None else ckpt.weight_map)
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


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ReapError(f"--device {name} was asked for but no CUDA GPU is visible; use --device cpu or auto")
    return name


def load_model(path: Path | str, dtype: torch.dtype = torch.float32, device: str = "cpu", spread: bool = False):
    """The whole model in eval mode: transformers' own loader for the standard fused layout, our
    assembling loader (per-expert keys fused, quantized weights dequantized) otherwise, since
    transformers 5 cannot load those.
    ``spread``: on ``cuda`` with several GPUs, spread the layers over them (accelerate device_map)."""
    from transformers import AutoModelForImageTextToText

    ckpt = Checkpoint(Path(path))
    family = ckpt.family
    quant = ckpt.quant_format  # a ReapError here for quantizations we cannot dequantize
    if not ckpt.has_per_expert_keys and quant is None:
        device_map = "auto" if spread and device == "cuda" and torch.cuda.device_count() > 1 else device
        model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype, device_map=device_map)
        return model.eval()
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    if quant is not None:  # the weights are dequantized below: build the plain model
        for cfg in (config, getattr(config, "text_config", None)):
            if cfg is not None and hasattr(cfg, "quantization_config"):
                delattr(cfg, "quantization_config")
    with init_empty_weights(include_buffers=False):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    state = memory_state_dict(ckpt, dtype=dtype, device=device)
    if config.tie_word_embeddings and "lm_head.weight" not in state:
        state["lm_head.weight"] = state[family.embedding_key]
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ReapError(f"{path}: checkpoint does not match {family.name} "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device).eval()


def load_processor(path: Path | str):
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise ReapError(f"cannot load the processor/tokenizer from {path} ({str(exc).splitlines()[0]}); "
                        "the folder needs tokenizer and preprocessor files") from None


