"""Llama-4 (``llama4``: Llama-4 Scout 17B-16E, Maverick 17B-128E) as transformers 5.x holds it.

The MoE block (``feed_forward``, ``Llama4TextMoe``): the router (``feed_forward.router``, a Linear [E, H])
takes the top-k logits (top-1 in the releases) and turns each into a score sigmoid(logit) (0 for the
others); every expert then runs on its *input scaled by its score*, E_j(s_j x), and the outputs are summed
with the shared expert's (``feed_forward.shared_expert``, on every token, never pruned).  Dense and MoE
layers interleave (``moe_layers``, or every ``interleave_moe_layer_step``-th layer).  Experts are fused in
memory and on disk alike: ``experts.gate_up_proj`` [E, H, 2I] (gate columns first) and
``experts.down_proj`` [E, I, H], with I = ``intermediate_size`` (the dense layers use
``intermediate_size_mlp``).

REAP's g_j and E_j for a gate that scales the input.  The paper's code (CerebrasResearch/reap, its Llama-4
observer) records every expert's output on the *unscaled* input ("we do not apply router_scores") and
weights it by a router probability.  We follow it for E_j: E_j(x) is the expert on the unscaled token,
as for every other family; and take for g_j the gate the model really applies, sigmoid(logit_j) of the
chosen expert (the paper's code uses a softmax over all logits for every family, a quantity Llama-4 never
computes).  So REAP_j = mean over tokens routed to j of sigmoid(l_j(x)) * ||E_j(x)||: the gate times the
expert's output magnitude, the paper's definition.  (The expert's actual contribution, E_j(s x), is not
s * E_j(x) for a SwiGLU expert; with s in (0, 1) it is smaller.)  The shared expert's output is no part of
any routed expert's E_j.

The experts' call (``experts(routed_in)``, every expert on every token, input already scaled) carries no
routing: the observer takes the hidden states from the router's input and the gate weights and expert ids
from the router's logits (``routing_in_experts_call = False``, ``routing_from_router``).

Masked routing: experts outside the kept set get logit -inf, so they are never in the top-k and their
score is sigmoid(-inf) = 0; the MoE block then runs them on a zero input, E_j(0) = 0 (no biases): exactly
what a pruned model, which lacks them, computes.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import NORMALIZED_1000, ExpertTensorLayout, ModelFamily, float32_norm


class Llama4Family(ModelFamily):
    """Llama-4: sigmoid top-k routing that scales the expert input, fused [E, H, 2I] experts."""

    image_frame_tokens = 2  # <|image_start|> ... <|image_end|>
    routing_description = ("top-k of the router logits (top-1), gate = sigmoid(logit), applied to the expert's "
                           "input; REAP uses that gate times ||E_j(x)|| of the unscaled input x")
    routing_in_experts_call = False

    # -------------------------------------------------------------- config

    def moe_layers(self, config: dict) -> list[int]:
        text = self.text_section(config)
        if self.num_experts(config) <= 0:
            return []
        if text.get("moe_layers") is not None:
            return sorted(int(i) for i in text["moe_layers"])
        step = int(text.get("interleave_moe_layer_step", 1) or 1)
        return list(range(step - 1, self.num_layers(config), step))

    def sizes(self, config: dict) -> dict[str, int]:
        text = self.text_section(config)
        inter = int(text["intermediate_size"])
        return {"H": int(text["hidden_size"]), "I": inter, "2I": 2 * inter}

    def decoder_dims(self, text_config) -> dict[str, int]:
        c = text_config
        h = int(c.hidden_size)
        return {"hidden": h, "intermediate": int(c.intermediate_size), "top_k": int(c.num_experts_per_tok),
                "experts": int(c.num_local_experts), "heads": int(c.num_attention_heads),
                "kv_heads": int(c.num_key_value_heads),
                "head_dim": int(getattr(c, "head_dim", None) or h // c.num_attention_heads)}

    # -------------------------------------------------------------- experts [E, H, 2I] / [E, I, H]

    def fused_sources(self) -> dict[str, tuple[str, ...]]:
        return {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}

    def split_fused(self, name: str, tensor: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        if name == "gate_up_proj":
            inter = tensor.shape[2] // 2
            return [{"gate_proj": t[:, :inter].T, "up_proj": t[:, inter:].T} for t in tensor]
        return [{"down_proj": t.T} for t in tensor]

    def fuse_per_expert(self, name: str, per_expert: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        if name == "gate_up_proj":
            return torch.stack([torch.cat([e["gate_proj"].T, e["up_proj"].T], dim=1) for e in per_expert])
        return torch.stack([e["down_proj"].T for e in per_expert])

    def fused_shape(self, name: str, num_experts: int, proj: str, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
        rows, columns = weight_shape  # a Linear weight [out, in]
        return (num_experts, columns, 2 * rows) if name == "gate_up_proj" else (num_experts, columns, rows)

    def fused_slot(self, name: str, fused: torch.Tensor, expert: int | slice, proj: str) -> torch.Tensor:
        if proj not in self.fused_sources()[name]:
            raise KeyError(f"{proj} is not a part of {name}")
        if name == "gate_up_proj":  # gate columns first
            inter = fused.shape[-1] // 2
            part = fused[expert, :, :inter] if proj == "gate_proj" else fused[expert, :, inter:]
            return part.transpose(-1, -2)
        return fused[expert].transpose(-1, -2)

    def expert_outputs(self, experts: nn.Module, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        return _swiglu(experts, x.unsqueeze(0), _rows(experts.gate_up_proj, expert_ids),
                       _rows(experts.down_proj, expert_ids))

    def all_expert_norms(self, experts: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Every expert on every row, [T, E] float32: two batched matmuls over the weights as they lie (the
        module's own computation, without its input scaling)."""
        num = experts.gate_up_proj.shape[0]
        y = _swiglu(experts, x.unsqueeze(0).expand(num, -1, -1), experts.gate_up_proj, experts.down_proj)
        return float32_norm(y).T

    # -------------------------------------------------------------- routing

    def router_logits(self, router_output) -> torch.Tensor:
        return router_output[1]  # (scores [T, E], logits [T, E])

    def route(self, router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        top, ids = torch.topk(router_logits, top_k, dim=1)
        return torch.sigmoid(top.float()).to(router_logits.dtype), ids

    def router_output(self, router: nn.Module, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What ``Llama4Router`` returns: (scores [T, E], logits [T, E])."""
        weights, ids = self.route(logits, router.top_k)
        scores = torch.zeros_like(logits).scatter_(1, ids, weights)  # sigmoid(-inf) = 0 for the others
        return scores, logits

    # -------------------------------------------------------------- tokens and processor

    def visual_token_ids(self, config) -> set[int]:
        token = getattr(config, "image_token_id", None)
        return set() if token is None else {token}

    def image_start_id(self, processor) -> int:
        return processor.tokenizer.convert_tokens_to_ids("<|image_start|>")

    def vision_merge_size(self, processor) -> int:
        """Patches merged into one image token, per side: the pixel shuffle's (ratio 0.5: 2)."""
        return int(round(processor.downsample_ratio ** 0.5))

    def pixels_per_image_token(self, processor) -> int:
        return (processor.patch_size * self.vision_merge_size(processor)) ** 2

    def image_tokens(self, processor, grid_thw: torch.Tensor | None) -> int:
        """0: Llama-4's processor gives tiles, no patch grid to count image tokens from (the calibration then
        keeps an image only while its sample fits the sequence length whole)."""
        return 0

    # -------------------------------------------------------------- layer-wise

    def text_model(self, model: nn.Module) -> nn.Module:
        inner = getattr(model, "language_model", model)
        return getattr(inner, "model", inner)

    def multimodal_model(self, model: nn.Module) -> nn.Module:
        return model


def _rows(weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """``weights[expert_ids]``; one expert as a view (no copy of its [H, 2I] weights per call)."""
    return weights[int(expert_ids[0])].unsqueeze(0) if expert_ids.numel() == 1 else weights[expert_ids]


def _swiglu(experts: nn.Module, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Llama4TextExperts' computation: [n, T, H] rows through experts [n, H, 2I] / [n, I, H] -> [n, T, H]."""
    gate, up = torch.matmul(x, gate_up).chunk(2, dim=-1)
    return torch.matmul(up * experts.act_fn(gate), down)


LLAMA4 = Llama4Family(
    name="Llama-4",
    model_types=("llama4",),
    processor_types=("Llama4Processor",),
    layer_prefix=r"language_model\.model\.layers\.(?P<layer>\d+)\.",
    module_layer_regex=r"(?:^|\.)layers\.(?P<layer>\d+)\.",
    moe_module="feed_forward",
    router_module="router",
    experts_module="experts",
    text_section_key="text_config",
    expert_count_keys=("num_local_experts",),
    top_k_key="num_experts_per_tok",
    embedding_key="language_model.model.embed_tokens.weight",
    prelayer=("vision_model.", "multi_modal_projector.", "language_model.model.embed_tokens."),
    vision_per_patch=("vision_model.model.layers.", "vision_model.patch_embedding."),
    box_format=NORMALIZED_1000,
    auto_model_class="AutoModelForImageTextToText",
    has_vision=True,
    fused=(
        ExpertTensorLayout("gate_up_proj", memory=("H", "2I"), disk=("H", "2I")),
        ExpertTensorLayout("down_proj", memory=("I", "H"), disk=("I", "H")),
    ),
)
