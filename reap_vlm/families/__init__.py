"""Model families by ``model_type``; see ``base.ModelFamily``."""

from __future__ import annotations

from ..errors import ReapError
from .base import ExpertTensorLayout, KeyInfo, KeyRole, ModelFamily
from .qwen3_vl_moe import QWEN3_VL_MOE

FAMILIES: tuple[ModelFamily, ...] = (QWEN3_VL_MOE,)


def family_for_config(config: dict) -> ModelFamily:
    model_type = config.get("model_type")
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise ReapError(f"model_type {model_type!r} is not supported (supported: {supported}); "
                    "check REAP_MODEL_PATH points at a Qwen3-VL-MoE checkpoint")


__all__ = ["ExpertTensorLayout", "FAMILIES", "KeyInfo", "KeyRole", "ModelFamily", "QWEN3_VL_MOE",
           "family_for_config"]
