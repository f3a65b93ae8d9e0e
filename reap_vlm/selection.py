"""Which experts survive: the top K of each MoE layer by a criterion; the criteria derived from stored metrics
(``reap_balanced``); the super experts (arXiv 2507.23279) and keeping them whatever their score."""

from __future__ import annotations

import math

from .errors import ReapError

TIE_BREAKERS = ("reap_dense", "frequency")
SUPER_EXPERT_DEFAULTS = {"quantile": 99.5, "fraction": 0.1, "layers": 0.75}


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


def balanced_reap(reap_image: list[float], reap_text: list[float]) -> list[float]:
    """``reap_balanced`` of one layer: for each modality present, an expert's REAP over that modality's tokens as a
    share of the layer's total over its experts; an expert's score is the larger of its two shares.

    Why: REAP averages g * ||E(x)|| over the tokens routed to an expert, so an expert that mostly sees text is
    ranked by text, and with calibration sets that are mostly text, experts whose work is on image tokens compete
    on the text scale.  Normalising each modality by its own layer total puts image and text on one scale (a share
    of that modality's saliency), independent of how many tokens each had and of their norm scales; the max keeps
    an expert that is among the most salient for either modality (a mean would let a text-only strength or an
    image-only one be halved by the other modality's zero).  With one modality only, it ranks exactly as REAP
    over that modality.  No weight to tune."""
    shares = []
    for values in (reap_image, reap_text):
        total = sum(values)
        if total > 0:
            shares.append([v / total for v in values])
    if not shares:
        return [0.0] * len(reap_image)
    return [max(column) for column in zip(*shares)]


DERIVED = {"reap_balanced": (("reap_image", "reap_text"), balanced_reap)}


def with_derived(metrics: dict[str, list[list[float]]]) -> dict[str, list[list[float]]]:
    """``metrics`` plus every derived criterion whose inputs it holds (a stored one is kept as is)."""
    out = dict(metrics)
    for name, (inputs, fn) in DERIVED.items():
        if name not in out and all(i in metrics for i in inputs):
            out[name] = [fn(*rows) for rows in zip(*(metrics[i] for i in inputs))]
    return out


def rankings(metrics: dict[str, list[list[float]]], moe_layers: list[int], criterion: str) -> dict[int, list[int]]:
    """Per MoE layer, every expert id best first by ``criterion``, ties broken by reap_dense, then frequency, then
    the lower id."""
    metrics = with_derived(metrics)
    if criterion not in metrics:
        raise ReapError(f"criterion {criterion!r} was not computed in this run (have: {', '.join(metrics)}); "
                        "pick another --criterion or rescore with REAP_SCORING_MODE=full")
    tie_breakers = [metrics[name] for name in TIE_BREAKERS if name in metrics and name != criterion]
    ranked = {}
    for position, layer in enumerate(moe_layers):
        scores = metrics[criterion][position]

        def rank(expert: int, scores=scores, position=position):
            return (-scores[expert], *(-t[position][expert] for t in tie_breakers), expert)

        ranked[layer] = sorted(range(len(scores)), key=rank)
    return ranked


def select_experts(metrics: dict[str, list[list[float]]], moe_layers: list[int], criterion: str,
                   keep: int) -> dict[int, list[int]]:
    """Per MoE layer, the ``keep`` experts ranked highest by ``criterion`` (``rankings``); returned sorted by id."""
    return {layer: sorted(ids[:keep]) for layer, ids in rankings(metrics, moe_layers, criterion).items()}


def _percentile(values: list[float], q: float) -> float:
    """numpy's default (linear) percentile, q in [0, 100]."""
    ordered = sorted(values)
    pos = q / 100 * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def find_super_experts(metrics: dict[str, list[list[float]]], moe_layers: list[int], quantile: float = 99.5,
                       fraction: float = 0.1, layers: float = 0.75) -> dict | None:
    """The super experts (arXiv 2507.23279, the criterion of its code): expert j of MoE layer l is super when its
    max_activation exceeds max(the ``quantile``-th percentile of max_activation over every routed expert of every
    MoE layer, ``fraction`` x the largest of them), and l is among the first ``layers`` of the MoE layers
    (position < layers x their count).  None when the metrics hold no max_activation (router mode, or metadata
    from before it was measured)."""
    peaks = metrics.get("max_activation")
    if not peaks:
        return None
    routed = [v for row in peaks for v in row if v > 0]
    if not routed:
        return {"threshold": None, "percentile": None, "global_max": 0.0, "experts": {}, "details": []}
    percentile, top = _percentile(routed, quantile), max(routed)
    threshold = max(percentile, top * fraction)
    image, text = metrics.get("max_activation_image"), metrics.get("max_activation_text")
    experts: dict[int, list[int]] = {}
    details = []
    for position, layer in enumerate(moe_layers):
        if position >= layers * len(moe_layers):
            break
        for expert, value in enumerate(peaks[position]):
            if value > threshold:
                experts.setdefault(layer, []).append(expert)
                modality = None
                if image and text:
                    modality = "image" if image[position][expert] >= text[position][expert] else "text"
                details.append({"layer": layer, "expert": expert, "max_activation": value, "modality": modality})
    return {"threshold": threshold, "percentile": percentile, "global_max": top,
            "criteria": {"quantile": quantile, "fraction": fraction, "layers": layers},
            "experts": experts, "details": details}


def protect_experts(ranked: dict[int, list[int]], keep: int, protected: dict[int, list[int]]) -> \
        tuple[dict[int, list[int]], dict[int, dict[str, list[int]]]]:
    """The top ``keep`` of each layer's ranking with every protected expert kept: a protected expert outside the
    top ``keep`` displaces the lowest-ranked kept expert that is not protected, so K stays.  Returns the kept ids
    (sorted) and, per layer where anything moved, {"added": protected ids brought in, "displaced": ids removed}."""
    kept, moved = {}, {}
    for layer, order in ranked.items():
        guard = set(protected.get(layer, ()))
        if len(guard) > keep:
            raise ReapError(f"layer {layer} has {len(guard)} protected super experts, more than the {keep} kept; "
                            "lower --prune-ratio or raise --super-expert-fraction")
        top = order[:keep]
        added = [e for e in order[keep:] if e in guard]
        displaced = [e for e in reversed(top) if e not in guard][:len(added)]
        kept[layer] = sorted((set(top) - set(displaced)) | set(added))
        if added:
            moved[layer] = {"added": sorted(added), "displaced": sorted(displaced)}
    return kept, moved
