"""Qwen3-MoE, text only (Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder-480B-A35B) as transformers 5.x holds it.

In memory: ``model.layers.N.mlp.experts.gate_up_proj`` [E, 2I, H] (gate rows first), ``down_proj`` [E, H, I],
router ``mlp.gate.weight`` [E, H]; softmax over all experts (float32), top-k, the k weights renormalised
when the config's ``norm_topk_prob`` says so (the released models do), expert outputs weighted and summed.
On disk the releases (bf16, FP8 block 128, AWQ) store one tensor per expert,
``mlp.experts.{e}.{gate,up,down}_proj.<suffix>``, which transformers 5 fuses on load; a folder saved by
transformers 5 holds the fused tensors in the in-memory order (no transpose).  Settings sit at the top
level of config.json; dense layers are ``mlp_only_layers`` and those off ``decoder_sparse_step``.  No vision
tower: calibration and the check are text only.  ``g_j`` for REAP is the weight the router returns and the
experts multiply their outputs by.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import NORMALIZED_1000, ExpertTensorLayout
from .fused_experts import FusedGateUpFamily


def softmax_top_k(router_logits: torch.Tensor, top_k: int, renormalise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen's routing: softmax over all experts in float32, top-k, optionally renormalised to sum to 1."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalise:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), ids


# Fused experts as transformers 5 holds them and saves them (no transpose between disk and memory).
IN_MEMORY_ORDER = (
    ExpertTensorLayout("gate_up_proj", memory=("2I", "H"), disk=("2I", "H")),
    ExpertTensorLayout("down_proj", memory=("H", "I"), disk=("H", "I")),
)


class Qwen3MoeFamily(FusedGateUpFamily):
    """What Qwen3-MoE computes its own way: routing (``norm_topk_prob``), dense layers; no images."""

    routing_description = "softmax over all experts, top-k, renormalised when norm_topk_prob"

    def moe_layers(self, config: dict) -> list[int]:
        text = self.text_section(config)
        skip = set(text.get("mlp_only_layers") or [])
        step = int(text.get("decoder_sparse_step", 1) or 1)
        if self.num_experts(config) <= 0:
            return []
        return [i for i in range(self.num_layers(config)) if i not in skip and (i + 1) % step == 0]

    def decoder_dims(self, text_config) -> dict[str, int]:
        c = text_config
        h = int(c.hidden_size)
        return {"hidden": h, "intermediate": int(getattr(c, "moe_intermediate_size", 0) or c.intermediate_size),
                "top_k": int(getattr(c, "num_experts_per_tok", 1) or 1),
                "experts": int(getattr(c, "num_experts", 1) or 1),
                "heads": int(c.num_attention_heads), "kv_heads": int(c.num_key_value_heads),
                "head_dim": int(getattr(c, "head_dim", None) or h // c.num_attention_heads)}

    def route(self, router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return softmax_top_k(router_logits, top_k, renormalise=True)

    def router_output(self, router: nn.Module, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As the router computes it, ``norm_topk_prob`` included (routers without the flag renormalise)."""
        weights, ids = softmax_top_k(logits, router.top_k, getattr(router, "norm_topk_prob", True))
        return logits, weights, ids

    # -------------------------------------------------------------- tokens and processor: none

    def visual_token_ids(self, config) -> set[int]:
        return set()

    # -------------------------------------------------------------- layer-wise

    def text_model(self, model: nn.Module) -> nn.Module:
        """The decoder stack (owner of ``layers`` and ``rotary_emb``)."""
        return getattr(model, "model", model)

    def multimodal_model(self, model: nn.Module) -> nn.Module:
        """The module the batches go through (no LM head): here the decoder stack itself."""
        return self.text_model(model)


QWEN3_MOE = Qwen3MoeFamily(
    name="Qwen3-MoE",
    model_types=("qwen3_moe",),
    processor_types=(),  # a tokenizer, shared with other Qwen models: the family is always passed explicitly
    layer_prefix=r"model\.layers\.(?P<layer>\d+)\.",
    module_layer_regex=r"(?:^|\.)layers\.(?P<layer>\d+)\.",
    moe_module="mlp",
    router_module="gate",
    experts_module="experts",
    text_section_key=None,
    expert_count_keys=("num_experts", "num_local_experts"),
    top_k_key="num_experts_per_tok",
    embedding_key="model.embed_tokens.weight",
    prelayer=("model.embed_tokens.",),
    box_format=NORMALIZED_1000,
    auto_model_class="AutoModelForCausalLM",
    has_vision=False,
    fused=IN_MEMORY_ORDER,
)
