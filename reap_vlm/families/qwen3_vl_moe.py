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

import importlib
import warnings
from types import SimpleNamespace

import torch
from torch import nn

from ..errors import ReapError
from .base import NORMALIZED_1000, ExpertTensorLayout, ThinkingFormat
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

    # -------------------------------------------------------------- inputs computed on the host

    # The model class whose ``get_rope_index`` gives the 3-D positions (module, class); None: the model computes
    # every input itself.
    rope_index_model: tuple[str, str] | None = ("transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe",
                                                "Qwen3VLMoeModel")
    # How the vision tower resamples its learned position grid to each image (its ``interpolation_mode`` and
    # ``interpolation_align_corners``): the taps and weights computed ahead follow it, and ``host_side`` checks it.
    vision_interpolation = ("bilinear", True)

    def model_inputs(self, batch: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
        """For a batch with images: the vision tower's position-embedding taps and weights, rotary positions and
        image boundaries (transformers' ``vision_utils``, which the tower calls itself), and the decoder's 3-D
        positions (the model's own ``get_rope_index``, on a stand-in holding its config).  A batch of text alone
        needs none: its positions take no read."""
        grid = batch.get("image_grid_thw")
        if grid is None or "mm_token_type_ids" not in batch or self.rope_index_model is None:
            return {}
        try:
            return self._vision_inputs(batch, grid, config)
        # Another transformers' helpers, or a batch whose image tokens and images disagree (get_rope_index's
        # StopIteration, which would end a stream's iteration): left to the model, which says what is wrong.
        except (ImportError, AttributeError, TypeError, KeyError, ValueError, IndexError, RuntimeError,
                StopIteration) as exc:
            warnings.warn(f"{self.name}: the model computes its positions itself, they could not be computed ahead "
                          f"({type(exc).__name__}: {exc})", stacklevel=2)
            return {}

    def _vision_inputs(self, batch: dict[str, torch.Tensor], grid: torch.Tensor, config: dict) -> dict:
        from transformers import vision_utils

        vision = config["vision_config"]
        merge = vision["spatial_merge_size"]
        mode, align_corners = self.vision_interpolation
        taps, weights = vision_utils.get_vision_interpolation_indices_and_weights(
            grid, num_grid_per_side=int(vision["num_position_embeddings"] ** 0.5), mode=mode,
            align_corners=align_corners, spatial_merge_size=merge)
        positions, _ = self._rope_index(merge)(batch["input_ids"], batch["mm_token_type_ids"], image_grid_thw=grid,
                                               attention_mask=batch["attention_mask"])
        return {"image_interp_indices": taps, "image_interp_weights": weights,
                "image_position_ids": vision_utils.get_vision_position_ids(grid, merge),
                "image_cu_seqlens": vision_utils.get_vision_cu_seqlens(grid), "position_ids": positions}

    def host_side(self, batch: dict[str, torch.Tensor], model: nn.Module) -> set[str]:
        """Given the precomputed inputs, the images' sizes are read only as Python lists (the embeddings' split), so
        they stay on the host; so do their boundaries, which SDPA and eager vision attention read in each vision
        block (flash attention takes them on the device)."""
        if "image_cu_seqlens" not in batch:
            return set()
        from transformers.utils.generic import is_flash_attention_requested

        visual = self.multimodal_model(model).visual
        found = (getattr(visual, "interpolation_mode", None), getattr(visual, "interpolation_align_corners", None))
        if found != self.vision_interpolation:
            raise ReapError(f"this transformers' {self.name} vision tower resamples its positions as {found}, "
                            f"reap-vlm computes them ahead as {self.vision_interpolation}; use transformers 5.17 "
                            "(requirements.txt) or a reap-vlm that knows this version")
        if is_flash_attention_requested(visual.config):
            return {"image_grid_thw"}
        return {"image_grid_thw", "image_cu_seqlens"}

    def _rope_index(self, spatial_merge_size: int):
        module, name = self.rope_index_model
        model_class = getattr(importlib.import_module(module), name)
        stand_in = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(
            spatial_merge_size=spatial_merge_size)))
        stand_in.get_vision_position_ids = lambda *a, **k: model_class.get_vision_position_ids(stand_in, *a, **k)
        return lambda *a, **k: model_class.get_rope_index(stand_in, *a, **k)

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
    vision_per_patch=("model.visual.blocks.", "model.visual.patch_embed."),
    box_format=NORMALIZED_1000,
    auto_model_class="AutoModelForImageTextToText",
    has_vision=True,
    fused=(
        ExpertTensorLayout("gate_up_proj", memory=("2I", "H"), disk=("H", "2I")),
        ExpertTensorLayout("down_proj", memory=("H", "I"), disk=("I", "H")),
    ),
    # The Thinking releases' templates end the generation prompt with "<think>\n"; Qwen3's templates write this
    # empty block for enable_thinking=False.
    thinking=ThinkingFormat(open="<think>", close="</think>", empty="<think>\n\n</think>\n\n"),
)
