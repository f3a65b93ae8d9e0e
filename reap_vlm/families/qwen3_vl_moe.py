"""Qwen3-VL-MoE (Qwen3-VL-30B-A3B, Qwen3-VL-235B-A22B) as transformers 5.x holds it.

In memory: ``experts.gate_up_proj`` [E, 2I, H] (gate rows first), ``experts.down_proj`` [E, H, I],
router ``gate.weight`` [E, H]; softmax over all experts, top-k, renormalised.  On disk the
official bf16 release stores gate_up_proj [E, H, 2I] and down_proj [E, I, H]; FP8/AWQ releases
store ``experts.{e}.{gate,up,down}_proj.<suffix>``.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import ExpertTensorLayout, ModelFamily


class FusedGateUpFamily(ModelFamily):
    """Experts as fused gate_up_proj [E, 2I, H] + down_proj [E, H, I] (transformers 5 layout)."""

    def fused_sources(self) -> dict[str, tuple[str, ...]]:
        return {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}

    def split_fused(self, name: str, tensor: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        if name == "gate_up_proj":
            inter = tensor.shape[1] // 2
            return [{"gate_proj": t[:inter], "up_proj": t[inter:]} for t in tensor]
        return [{"down_proj": t} for t in tensor]

    def fuse_per_expert(self, name: str, per_expert: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        if name == "gate_up_proj":
            return torch.stack([torch.cat([e["gate_proj"], e["up_proj"]], dim=0) for e in per_expert])
        return torch.stack([e["down_proj"] for e in per_expert])

    def expert_outputs(self, experts: nn.Module, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        gate_up = experts.gate_up_proj[expert_ids]  # [n, 2I, H]
        h = torch.matmul(x.unsqueeze(0), gate_up.transpose(1, 2))  # [n, T, 2I]
        gate, up = h.chunk(2, dim=-1)
        return torch.matmul(experts.act_fn(gate) * up, experts.down_proj[expert_ids].transpose(1, 2))


_FUSED = (
    ExpertTensorLayout("gate_up_proj", memory=("2I", "H"), disk=("H", "2I")),
    ExpertTensorLayout("down_proj", memory=("H", "I"), disk=("I", "H")),
)

QWEN3_VL_MOE = FusedGateUpFamily(
    name="Qwen3-VL-MoE",
    model_types=("qwen3_vl_moe",),
    architectures=("Qwen3VLMoeForConditionalGeneration",),
    layer_prefix=r"model\.language_model\.layers\.(?P<layer>\d+)\.",
    fused=_FUSED,
)
