"""GLM-4.5V / GLM-4.6V (``glm4v_moe``) as transformers 5.x holds it.

Routing (``Glm4vMoeTextTopkRouter``): logits in float32, sigmoid scores; the experts are chosen by
score + ``e_score_correction_bias`` (a per-expert buffer, one row per expert: sliced with the router),
within the best ``topk_group`` of ``n_group`` groups; the gate weights are the chosen experts' scores
*without* the bias, renormalised when ``norm_topk_prob`` and times ``routed_scaling_factor``.  That
applied weight is REAP's g_j.  A shared expert (``mlp.shared_experts``) runs on every token: it is never
pruned and its output is not part of any routed expert's E_j(x) (the paper's code scores routed experts
only).  The first ``first_k_dense_replace`` layers are dense MLPs.

Masked routing, in this family's sense: a pruned expert can never be *chosen* (its score + bias is -inf
in the choice); the other experts' scores, and so their weights, are unchanged.  A pruned model computes
exactly that, since its router keeps the kept rows of the weight and of the bias.  With ``n_group`` > 1
the groups of a pruned model are not the original's (the expert count per group changes unless every
group keeps as many experts), so only ``n_group`` = 1 (GLM-4.5V, GLM-4.6V) is accepted.

On disk the releases store one tensor per expert (``mlp.experts.{e}.{gate,up,down}_proj.weight``, fused
on load by transformers' conversion mapping); transformers 5 fuses them as ``gate_up_proj`` [E, 2I, H]
and ``down_proj`` [E, H, I] and writes that order when it saves fused.  The releases also carry one
next-token-prediction (MTP / nextn) layer after the decoder stack (layer ``num_hidden_layers``, e.g. 46)
with 128 experts of its own; transformers never builds it, so it cannot be scored: the pruned checkpoint
leaves it out and sets ``num_nextn_predict_layers`` to 0 (``ModelFamily.left_out``).

Images: ``<|begin_of_image|>``, one ``<|image|>`` per merged 2x2 patch group, ``<|end_of_image|>`` (the
Qwen2-VL processor lineage: ``image_grid_thw``, ``merge_size``).  Grounding answers:
``<|begin_of_box|>[x1,y1,x2,y2]<|end_of_box|>`` with coordinates in 0..1000.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ReapError
from .base import BoxFormat
from .qwen3_moe import IN_MEMORY_ORDER
from .qwen3_vl_moe import QWEN3_VL_MOE, Qwen3VLMoeFamily

# A bare [x1, y1, x2, y2] list between <|begin_of_box|> and <|end_of_box|>, 0..1000 (GLM-4.5V's model card).
GLM_BOX = BoxFormat(1000.0, frozenset({"bbox2d", "bbox", "box"}))


class Glm4vMoeFamily(Qwen3VLMoeFamily):
    """GLM-4.5V: what differs from Qwen3-VL-MoE, whose image handling (grid_thw, merge size) it shares."""

    rope_index_model = None  # its vision tower and positions are GLM's own: computed by the model
    routing_description = ("sigmoid scores; experts chosen by score + e_score_correction_bias (grouped top-k); "
                           "weights = the chosen scores without the bias, renormalised, times routed_scaling_factor")

    def moe_layers(self, config: dict) -> list[int]:
        text = self.text_section(config)
        groups = int(text.get("n_group", 1) or 1)
        if groups != 1:
            raise ReapError(f"config.json has n_group {groups}: with grouped routing a pruned model's expert groups "
                            "differ from the original's, so only n_group 1 (GLM-4.5V, GLM-4.6V) can be pruned")
        if self.num_experts(config) <= 0:
            return []
        first = int(text.get("first_k_dense_replace", 0) or 0)
        return list(range(first, self.num_layers(config)))

    def config_after_pruning(self, text_section: dict) -> dict[str, int]:
        """The next-token-prediction layer is left out: none remain."""
        return {"num_nextn_predict_layers": 0} if text_section.get("num_nextn_predict_layers") else {}

    def decoder_dims(self, text_config) -> dict[str, int]:
        dims = super().decoder_dims(text_config)
        dims["experts"] = int(text_config.n_routed_experts)
        return dims

    # -------------------------------------------------------------- routing

    def router_logits(self, router_output) -> torch.Tensor:
        return router_output[0]

    def route_with(self, router: nn.Module, logits: torch.Tensor,
                   chosen_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate weights [T, k], ids [T, k]) as ``router`` computes them from float32 ``logits``; experts where
        ``chosen_mask`` is False can never be chosen."""
        scores = logits.float().sigmoid()
        choice = scores + router.e_score_correction_bias.float()
        if chosen_mask is not None:
            choice = choice.masked_fill(~chosen_mask, float("-inf"))
        # one expert group (``moe_layers`` refuses n_group > 1): the model's group choice keeps every expert
        ids = torch.topk(choice, k=router.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
        if router.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * router.routed_scaling_factor, ids

    def route(self, router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise ReapError("GLM-4.5V routing needs its router (bias, groups, scaling): use router_forward")

    def router_output(self, router: nn.Module, logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise ReapError("GLM-4.5V masks pruned experts in its choice, not by a logit bias: use router_forward")

    def router_forward(self, router: nn.Module, hidden: torch.Tensor,
                       logit_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The router's (logits, weights, ids); experts whose ``logit_bias`` is -inf are never chosen (masked in
        the choice) and the weights of the others are the unmasked model's."""
        logits = torch.nn.functional.linear(hidden.reshape(-1, router.weight.shape[1]).float(), router.weight.float())
        mask = None if logit_bias is None else torch.isfinite(logit_bias).to(logits.device).expand_as(logits)
        weights, ids = self.route_with(router, logits, mask)
        return logits, weights, ids

    # -------------------------------------------------------------- tokens

    def image_start_id(self, processor) -> int:
        return processor.tokenizer.convert_tokens_to_ids("<|begin_of_image|>")


GLM4V_MOE = QWEN3_VL_MOE.derived(  # checkpoint keys and module names laid out as Qwen3-VL-MoE's
    Glm4vMoeFamily,
    name="GLM-4.5V",
    model_types=("glm4v_moe",),
    processor_types=("Glm4vProcessor", "Glm46VProcessor"),
    expert_count_keys=("n_routed_experts", "num_local_experts"),
    box_format=GLM_BOX,
    fused=IN_MEMORY_ORDER,
)
