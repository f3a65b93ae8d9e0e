"""Qwen3-VL-MoE (Qwen3-VL-30B-A3B, Qwen3-VL-235B-A22B) as transformers 5.x holds it.

In memory: ``experts.gate_up_proj`` [E, 2I, H] (gate rows first), ``experts.down_proj`` [E, H, I],
router ``gate.weight`` [E, H]; softmax over all experts, top-k, renormalised.  On disk the
official bf16 release stores gate_up_proj [E, H, 2I] and down_proj [E, I, H]; FP8/AWQ releases
store ``experts.{e}.{gate,up,down}_proj.<suffix>``.  The language model's settings sit under
``text_config``; dense layers are ``mlp_only_layers``.  Images are ``<|vision_start|>``, one
``<|image_pad|>`` per merged patch group, ``<|vision_end|>``; deepstack adds visual features after
the first decoder layers.  Grounding answers are ``{"bbox_2d": [x1, y1, x2, y2]}`` in 0..1000.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import NORMALIZED_1000, ExpertTensorLayout
from .qwen3_moe import Qwen3MoeFamily


class Qwen3VLMoeFamily(Qwen3MoeFamily):
    """Qwen3-MoE's language model (routing, dense layers) plus what Qwen3-VL-MoE adds: visual tokens, deepstack.
    Its router has no ``norm_topk_prob``: the k weights are always renormalised."""

    image_frame_tokens = 2  # <|vision_start|> ... <|vision_end|>
    routing_description = "softmax over all experts, top-k, renormalised"

    # -------------------------------------------------------------- tokens and processor

    def visual_token_ids(self, config) -> set[int]:
        ids = [getattr(config, "image_token_id", None), getattr(config, "video_token_id", None)]
        return {token for token in ids if token is not None}

    def vision_merge_size(self, processor) -> int:
        return processor.image_processor.merge_size

    def pixels_per_image_token(self, processor) -> int:
        proc = processor.image_processor
        return (proc.patch_size * proc.merge_size) ** 2

    def image_start_id(self, processor) -> int:
        start_id = getattr(processor, "vision_start_token_id", None)
        if start_id is None:
            start_id = processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")
        return start_id

    # -------------------------------------------------------------- layer-wise

    def text_model(self, model: nn.Module) -> nn.Module:
        """The decoder stack (owner of ``layers``, ``rotary_emb`` and ``_deepstack_process``)."""
        inner = getattr(model, "model", model)
        return getattr(inner, "language_model", inner)

    def multimodal_model(self, model: nn.Module) -> nn.Module:
        return getattr(model, "model", model)

    def after_decoder_layer(self, text_model: nn.Module, layer: int, hidden: torch.Tensor,
                            text_inputs: dict) -> torch.Tensor:
        """Deepstack: the visual features of vision layer ``deepstack_visual_indexes[layer]`` added at the
        visual positions, through the model's own ``_deepstack_process``."""
        embeds = text_inputs.get("deepstack_visual_embeds")
        if embeds is not None and layer < len(embeds):
            hidden = text_model._deepstack_process(hidden, text_inputs["visual_pos_masks"], embeds[layer])
        return hidden


QWEN3_VL_MOE = Qwen3VLMoeFamily(
    name="Qwen3-VL-MoE",
    model_types=("qwen3_vl_moe",),
    processor_types=("Qwen3VLProcessor",),
    layer_prefix=r"model\.language_model\.layers\.(?P<layer>\d+)\.",
    module_layer_regex=r"(?:^|\.)layers\.(?P<layer>\d+)\.",
    moe_module="mlp",
    router_module="gate",
    experts_module="experts",
    text_section_key="text_config",
    expert_count_keys=("num_experts", "num_local_experts"),
    top_k_key="num_experts_per_tok",
    embedding_key="model.language_model.embed_tokens.weight",
    prelayer=("model.visual.", "model.language_model.embed_tokens."),
    box_format=NORMALIZED_1000,
    auto_model_class="AutoModelForImageTextToText",
    has_vision=True,
    fused=(
        ExpertTensorLayout("gate_up_proj", memory=("2I", "H"), disk=("H", "2I")),
        ExpertTensorLayout("down_proj", memory=("H", "I"), disk=("I", "H")),
    ),
)
