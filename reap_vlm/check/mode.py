"""How the check holds the models (--check-mode), chosen from checkpoint sizes before anything is loaded.

* whole: each model loaded whole, one after the other (quantized weights dequantized): every check runs.
* packed: the same with quantized weights kept as stored (``checkpoint.packed``): every check runs, in the packed
  size; only for quantized checkpoints.
* layerwise: the surgery check and the teacher-forced agreement streamed one decoder layer of each model at a time
  (``check.layerwise``); no generation.  For models that fit nowhere whole.

``auto`` takes the first that fits the measured free memory (GPU memory over every GPU the model would be spread
on; RAM on the CPU) with the scoring engine's headroom, and says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint.loading import AUTO_MEMORY_FRACTION, free_memory_bytes
from ..checkpoint.reader import Checkpoint, loaded_bytes
from ..errors import ConfigError, ReapError
from .options import flag_of

LAYERWISE_WORKSPACE = 1 << 30  # hidden states of the prompts and one layer's activations, beside the weights
# A packed model's working memory is counted in its need (``packed_bytes``), so it may take nearly all free memory:
# 85% would refuse a 235B-A22B AWQ model (125 GB + ~7 GB working) on a 141 GB H200, where it runs (bench_check).
PACKED_MEMORY_FRACTION = 0.97
_GiB = 1 << 30


@dataclass
class CheckMode:
    mode: str  # "whole" | "packed" | "layerwise"
    why: str
    free_bytes: int | None = None
    needs: dict[str, int] = field(default_factory=dict)  # bytes each mode considered would take

    def report(self) -> dict:
        return {"mode": self.mode, "why": self.why, "free_bytes": self.free_bytes, "needs": self.needs}


def _gib(n: int) -> str:
    return f"{n / _GiB:.1f} GiB"


def _gpu_free_bytes(index: int) -> int:
    """A GPU's free memory, within this process's cap (``torch.cuda.set_per_process_memory_fraction``)."""
    cap = torch.cuda.get_per_process_memory_fraction(index) * torch.cuda.get_device_properties(index).total_memory
    return min(free_memory_bytes(f"cuda:{index}"), int(cap) - torch.cuda.memory_allocated(index))


def device_free_bytes(device: str, spread: bool = True) -> int:
    """Free memory where a model would go: with ``cuda`` and ``spread`` every GPU (``load_model`` spreads a fused
    unquantized model over them), else the one device (``cuda``: the current GPU)."""
    if device == "cuda":
        if not spread:
            return _gpu_free_bytes(torch.cuda.current_device())
        return sum(_gpu_free_bytes(i) for i in range(torch.cuda.device_count()))
    if device.startswith("cuda:"):
        return _gpu_free_bytes(int(device.split(":")[1]))
    return free_memory_bytes(device)


def whole_bytes(path: Path, dtype: torch.dtype) -> int:
    """The model loaded whole in ``dtype``, quantized weights dequantized."""
    ckpt = Checkpoint(path)
    return loaded_bytes(ckpt, ckpt.weight_map, dtype)


def packed_bytes(path: Path, dtype: torch.dtype) -> int:
    """The model loaded with its quantized weights kept as stored, plus its forward's working memory: one MoE
    layer's experts dequantized in ``dtype`` (a prefill routes tokens to all of them), a tile of float32 temporaries,
    and the prompts' activations and KV cache."""
    from ..checkpoint.packed import TILE_BYTES, packed_model_bytes  # the packed loader's own measures

    ckpt = Checkpoint(path)
    sizes = ckpt.family.sizes(ckpt.config)
    item = torch.finfo(dtype).bits // 8
    layer_experts = ckpt.family.num_experts(ckpt.config) * 3 * sizes["H"] * sizes["I"] * item
    return packed_model_bytes(path, dtype) + layer_experts + TILE_BYTES + LAYERWISE_WORKSPACE


def layerwise_bytes(path: Path, dtype: torch.dtype) -> int:
    """What the layer-wise check holds at once: the largest of one decoder layer, the pre-layer part (embeddings,
    vision tower) and the head, plus the prompts' hidden states."""
    ckpt = Checkpoint(path)
    family = ckpt.family
    parts = [loaded_bytes(ckpt, keys, dtype) for keys in (*family.keys_by_layer(ckpt.weight_map).values(),
                                                          family.prelayer_keys(ckpt.weight_map),
                                                          family.head_keys(ckpt.weight_map))]
    return max(parts) + LAYERWISE_WORKSPACE


def choose_check_mode(requested: str, pruned: Path, reference: Path | None, device: str, dtype: torch.dtype,
                      free_bytes: int | None = None) -> CheckMode:
    """The check mode for ``requested`` (auto / whole / packed / layerwise); ``free_bytes`` overrides the
    measurement.  A mode that cannot work is refused here, before any model is loaded."""
    paths = [p for p in (reference, pruned) if p is not None]
    ckpts = [Checkpoint(p) for p in paths]
    quantized = any(c.quantization for c in ckpts)
    if requested == "packed" and not quantized:
        raise ConfigError(f"{flag_of('check_mode')}=packed keeps quantized weights packed, but neither checkpoint "
                          "is quantized; use whole, layerwise or auto")
    if requested == "layerwise" and reference is None:
        raise ConfigError(f"{flag_of('check_mode')}=layerwise compares the pruned model with the original layer by "
                          "layer, and there is no original; pass --reference, or use whole or auto")
    if requested != "auto":
        return CheckMode(requested, f"{flag_of('check_mode')}={requested}")
    spreads = not any(c.quantization or c.has_per_expert_keys for c in ckpts)  # what load_model spreads over GPUs
    free = device_free_bytes(device, spreads) if free_bytes is None else free_bytes
    one = device_free_bytes(device, spread=False) if free_bytes is None else free_bytes  # packed, layer-wise
    room = int(AUTO_MEMORY_FRACTION * free)
    where = f"{_gib(free)} free on {device} (a mode fits in {AUTO_MEMORY_FRACTION:.0%} of it)"
    needs = {"whole": max(whole_bytes(p, dtype) for p in paths)}
    if needs["whole"] <= room:
        return CheckMode("whole", f"auto: the larger model takes {_gib(needs['whole'])} whole in "
                                  f"{str(dtype).removeprefix('torch.')}; {where}", free, needs)
    if quantized:
        needs["packed"] = max(packed_bytes(p, dtype) for p in paths)
        if needs["packed"] <= int(PACKED_MEMORY_FRACTION * one):
            return CheckMode("packed", f"auto: {_gib(needs['whole'])} dequantized does not fit, "
                                       f"{_gib(needs['packed'])} packed (weights + working memory) fits in "
                                       f"{PACKED_MEMORY_FRACTION:.0%} of {_gib(one)} free on one device", one, needs)
    too_big = f"{_gib(needs['whole'])} whole" + (f", {_gib(needs['packed'])} packed" if "packed" in needs else "")
    if reference is None:
        raise ReapError(f"the pruned model does not fit ({too_big}; {where}), and without the original the "
                        "layer-wise check has nothing to compare; pass --reference, or run on a larger machine")
    needs["layerwise"] = max(layerwise_bytes(p, dtype) for p in paths)
    if needs["layerwise"] > int(AUTO_MEMORY_FRACTION * one):
        raise ReapError(f"not even one decoder layer of the models fits: the layer-wise check needs "
                        f"{_gib(needs['layerwise'])} ({too_big}); {where}; free memory or use a larger device")
    return CheckMode("layerwise", f"auto: the models fit nowhere whole ({too_big}); the layer-wise check holds "
                                  f"{_gib(needs['layerwise'])} at a time; {where}", free, needs)
