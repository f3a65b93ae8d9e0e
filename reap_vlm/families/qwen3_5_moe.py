"""Qwen3.5-MoE (vision-language; Qwen3.5-35B-A3B, -122B-A10B, -397B-A17B) as transformers 5.x holds it.

Its language model differs from Qwen3-VL-MoE's in three ways that matter here:

* hybrid layers: most decoder layers mix tokens with Gated DeltaNet linear attention, every few a full
  attention layer (``layer_types``); the text model hands the two kinds different masks, which the layer-wise
  engine replays per layer (it records every layer's arguments);
* every MoE block has a shared expert (``mlp.shared_expert``, an MLP scaled by its own sigmoid gate
  ``mlp.shared_expert_gate``) that runs on every token beside the routed experts.  It is never pruned (its
  keys are copied unchanged) and its output does not count in REAP: ``g_j`` is the routed expert's softmax
  top-k weight (renormalised) and ``E_j`` the routed expert's output, as in the paper's code, which observes
  the routed experts only and leaves the shared expert alone;
* 256 and more routed experts.

Routing: softmax over all experts (float32), top-k, renormalised.  On disk the bf16 releases store the experts
fused in transformers 5's in-memory order (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I], no
transpose), the FP8 releases one tensor per expert.  Images and tokens as Qwen3-VL (no deepstack).

The releases also carry a next-token-prediction layer (``mtp.*``, vLLM's speculative-decoding draft) with a
router and experts of its own; transformers never loads it, so it cannot be scored with the calibration set.
Pruning leaves it out (``dropped_prefixes``) and sets ``mtp_num_hidden_layers`` to 0: the pruned model is
complete and consistent, without the MTP draft (a kept MTP layer with the original expert count would not
match ``num_experts``, and one pruned by another layer's choice would be a guess).
"""

from __future__ import annotations

from .qwen3_moe import IN_MEMORY_ORDER
from .qwen3_vl_moe import QWEN3_VL_MOE, Qwen3VLMoeFamily


class Qwen3_5MoeFamily(Qwen3VLMoeFamily):
    """Qwen3-VL-MoE's routing, tokens and layer-wise faces; the MTP layer left out of the pruned checkpoint."""

    rope_index_model = ("transformers.models.qwen3_5_moe.modeling_qwen3_5_moe", "Qwen3_5MoeModel")
    routing_description = ("softmax over all experts, top-k, renormalised; the sigmoid-gated shared expert runs on "
                           "every token, is never pruned and does not count")

    def config_after_pruning(self, text_section: dict) -> dict[str, int]:
        return {"mtp_num_hidden_layers": 0} if text_section.get("mtp_num_hidden_layers") else {}


# Laid out as Qwen3-VL-MoE (same prefixes, router, text_config) but for the fused experts' order and mtp.*.
QWEN3_5_MOE = QWEN3_VL_MOE.derived(
    Qwen3_5MoeFamily,
    name="Qwen3.5-MoE",
    model_types=("qwen3_5_moe",),
    processor_types=(),  # Qwen3VLProcessor, Qwen3-VL-MoE's: the family is always passed explicitly
    fused=IN_MEMORY_ORDER,
    dropped_prefixes=("mtp.",),
)
