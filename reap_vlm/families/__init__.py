"""Model families: everything the pipeline knows about a model family, asked of a ``base.ModelFamily``.

To add a family: one module here with its ``ModelFamily`` value (``fused_experts`` for transformers 5's fused
experts), listed in ``FAMILIES``."""

from __future__ import annotations

from ..errors import ReapError
from .base import BoxFormat, ExpertTensorLayout, KeyInfo, KeyRole, ModelFamily, ThinkingFormat
from .glm4v_moe import GLM4V_MOE
from .llama4 import LLAMA4
from .qwen3_5_moe import QWEN3_5_MOE
from .qwen3_moe import QWEN3_MOE
from .qwen3_vl_moe import QWEN3_VL_MOE

FAMILIES: tuple[ModelFamily, ...] = (QWEN3_VL_MOE, QWEN3_MOE, QWEN3_5_MOE, GLM4V_MOE, LLAMA4)


def family_for_config(config: dict) -> ModelFamily:
    model_type = config.get("model_type")
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = ", ".join(t for f in FAMILIES for t in f.model_types)
    names = ", ".join(f.name for f in FAMILIES)
    raise ReapError(f"model_type {model_type!r} is not supported (supported: {supported}); "
                    f"check REAP_MODEL_PATH points at a checkpoint of one of {names}")


def family_for_processor(processor) -> ModelFamily:
    """The family whose processor ``processor`` is (by class name)."""
    kind = type(processor).__name__
    for family in FAMILIES:
        if kind in family.processor_types:
            return family
    supported = ", ".join(t for f in FAMILIES for t in f.processor_types)
    raise ReapError(f"processor {kind} belongs to no supported model family (supported: {supported})")


__all__ = ["BoxFormat", "ExpertTensorLayout", "FAMILIES", "GLM4V_MOE", "KeyInfo", "KeyRole", "LLAMA4", "ModelFamily",
           "QWEN3_5_MOE", "QWEN3_MOE", "QWEN3_VL_MOE", "ThinkingFormat",
           "family_for_config", "family_for_processor"]
