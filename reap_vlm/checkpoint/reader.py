"""Reading a checkpoint folder without building the model: config.json, the family, keys by shard, tensors."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open

from ..errors import ReapError
from ..families import KeyRole, ModelFamily, family_for_config
from .fsutil import json_type, read_json
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
        config = read_json(self.path / "config.json", "config.json", expect=dict)
        text = family_for_config(config).text_section(config)
        if not isinstance(text, dict):
            raise ReapError(f"config.json {self.path / 'config.json'}: the text section should be an object, found "
                            f"{json_type(text)}; fix config.json or re-download the model")
        return config

    @cached_property
    def family(self) -> ModelFamily:
        return family_for_config(self.config)

    @cached_property
    def weight_map(self) -> dict[str, str]:
        """Key -> shard of every tensor of the model transformers builds: the stored tensors less those of
        parts the model never loads (next-token-prediction layers, ``ModelFamily.left_out``)."""
        return {k: v for k, v in self.stored_weight_map.items() if not self.left_out(k)}

    def left_out(self, key: str) -> bool:
        return self.family.left_out(key, self.config)

    @cached_property
    def stored_weight_map(self) -> dict[str, str]:
        """Key -> shard of every tensor in the folder."""
        index = self.path / INDEX_NAME
        if index.is_file():
            weight_map = read_json(index, "safetensors index", expect=dict).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map or \
                    not all(isinstance(v, str) and v and "/" not in v for v in weight_map.values()):
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
        q = quantization_config(self.config, self.family.config_sections(self.config))
        return None if not q else str(q.get("quant_method", "unknown"))

    @cached_property
    def quant_format(self) -> QuantFormat | None:
        """How the weights are quantized (None: plain); a ReapError for formats we cannot read."""
        return detect_format(self.config, self.family.config_sections(self.config))

    def _from_config(self, read, what: str):
        """A value the family reads from config.json; a missing key or a wrong type is one line."""
        try:
            return read(self.config)
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise ReapError(f"config.json {self.path / 'config.json'}: {what} is missing or of the wrong type "
                            f"({type(exc).__name__}: {exc}); fix config.json or re-download the model") from None

    @property
    def num_experts(self) -> int:
        return self._check_count(self._from_config(self.family.num_experts, "the expert count"), "expert count")

    @property
    def top_k(self) -> int:
        return self._check_count(self._from_config(self.family.top_k, "the experts per token (top-k)"), "top-k")

    @property
    def moe_layers(self) -> list[int]:
        return self._from_config(self.family.moe_layers, "the MoE layers (num_hidden_layers, decoder_sparse_step)")

    def _check_count(self, value: int, what: str) -> int:
        if value < 1:
            raise ReapError(f"config.json {self.path / 'config.json'}: {what} {value} is not a positive integer; "
                            "fix config.json or re-download the model")
        return value

    @cached_property
    def has_per_expert_keys(self) -> bool:
        return any(self.family.classify(k).role is KeyRole.PER_EXPERT for k in self.weight_map)

    def keys_by_shard(self) -> dict[str, list[str]]:
        """Every stored key, by shard."""
        by_shard: dict[str, list[str]] = defaultdict(list)
        for key, shard in self.stored_weight_map.items():
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


def weight_counts(ckpt: Checkpoint, keys) -> Iterator[tuple[str, int]]:
    """(key, weights the tensor holds) for ``keys``, from the safetensors headers: a quantized checkpoint's packed
    integer tensors count each packed weight."""
    by_shard: dict[str, list[str]] = {}
    for key in keys:
        by_shard.setdefault(ckpt.weight_map[key], []).append(key)
    bits = ckpt.quant_format.weight_bits if ckpt.quantization else 8
    packed = {"I32": 32 // bits, "U32": 32 // bits, "I8": 8 // bits, "U8": 8 // bits} if ckpt.quantization else {}
    for shard, names in by_shard.items():
        with safe_open(ckpt.path / shard, "pt") as f:
            for key in names:
                view = f.get_slice(key)
                yield key, math.prod(view.get_shape()) * packed.get(view.get_dtype(), 1)


def loaded_bytes(ckpt: Checkpoint, keys, dtype: torch.dtype) -> int:
    """Bytes that tensors ``keys`` take in memory in ``dtype`` (from the safetensors headers; quantized weights
    counted dequantized)."""
    item = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    return sum(count for _, count in weight_counts(ckpt, keys)) * item


class ForwardWeights(NamedTuple):
    """Weights a forward goes through, by how often (``forward_weights``): the multiply-adds per token, about."""

    dense: int  # per token position, in the decoder layers but the routed experts
    routed: int  # the decoder layers' routed experts, all of them (a token goes through top_k of num_experts)
    vision_patch: int  # per vision patch: the vision tower's blocks and patch embedding
    vision_token: int  # per image token: the rest of the vision part (mergers, projectors), embeddings left out


def forward_weights(ckpt: Checkpoint) -> ForwardWeights:
    """The checkpoint's ``ForwardWeights``, from the safetensors headers.  Whole numbers, so that every torchrun
    rank, whatever order its set of keys comes in, gets the same."""
    family = ckpt.family
    embeddings = family.embedding_key.rsplit(".", 1)[0] + "."
    in_layers = sorted(k for keys in family.keys_by_layer(ckpt.weight_map).values() for k in keys)
    vision = sorted(k for k in family.prelayer_keys(ckpt.weight_map) if not k.startswith(embeddings))
    dense = routed = patch = token = 0
    for key, count in weight_counts(ckpt, in_layers):
        role = family.classify(key).role
        if role in (KeyRole.PER_EXPERT, KeyRole.FUSED_EXPERTS):
            routed += count
        elif role is not KeyRole.DROPPED:
            dense += count
    for key, count in weight_counts(ckpt, vision):
        if key.startswith(family.vision_per_patch):
            patch += count
        else:
            token += count
    return ForwardWeights(dense, routed, patch, token)
