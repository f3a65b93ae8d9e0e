"""Which experts survive: the top K of each MoE layer by a criterion."""

from __future__ import annotations

import math

from .errors import ReapError

TIE_BREAKERS = ("reap_dense", "frequency")


def num_to_keep(num_experts: int, prune_ratio: float, keep_multiple: int, top_k: int) -> int:
    """K = E - floor(E * ratio), rounded up to a multiple of ``keep_multiple`` (0.40 of 128 keeps 77)."""
    keep = num_experts - math.floor(num_experts * prune_ratio + 1e-9)
    keep = min(num_experts, keep_multiple * math.ceil(keep / keep_multiple))
    if keep < top_k:
        raise ReapError(f"keeping {keep} of {num_experts} experts is fewer than the {top_k} each token routes to; "
                        "lower --prune-ratio / REAP_PRUNE_RATIO")
    if keep >= num_experts:
        raise ReapError(f"--prune-ratio {prune_ratio} (keep multiple {keep_multiple}) removes no expert of "
                        f"{num_experts}; raise REAP_PRUNE_RATIO or lower --keep-multiple")
    return keep


def select_experts(metrics: dict[str, list[list[float]]], moe_layers: list[int], criterion: str,
                   keep: int) -> dict[int, list[int]]:
    """Per MoE layer, the ``keep`` experts ranked highest by ``criterion``, ties broken by reap_dense, then
    frequency, then the lower id; returned sorted by id."""
    if criterion not in metrics:
        raise ReapError(f"criterion {criterion!r} was not computed in this run (have: {', '.join(metrics)}); "
                        "pick another --criterion or rescore with REAP_SCORING_MODE=full")
    tie_breakers = [metrics[name] for name in TIE_BREAKERS if name in metrics and name != criterion]
    selected = {}
    for position, layer in enumerate(moe_layers):
        scores = metrics[criterion][position]

        def rank(expert: int, scores=scores, position=position):
            return (-scores[expert], *(-t[position][expert] for t in tie_breakers), expert)

        selected[layer] = sorted(sorted(range(len(scores)), key=rank)[:keep])
    return selected
