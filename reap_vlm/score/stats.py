"""REAP saliency (arXiv 2510.13999) and the router statistics beside it.

For MoE layer l and expert j, over the valid (non-padding) calibration tokens x:

    reap_j        = sum_{x routed to j} g_j(x) * ||E_j(x)||_2  /  count_j      (0 if never routed)
    ean_j         = sum_{x routed to j}          ||E_j(x)||_2  /  count_j
    frequency_j   = count_j                        weighted_frequency_j = sum_{x routed to j} g_j(x)
    reap_dense_j  = sum_{all x} p_j(x) * ||E_j(x)||_2 / n_tokens              (full mode only)
    soft_frequency_j = sum_{all x} p_j(x)

g_j(x) is the gate weight the model applies (the family's own routing,
``ModelFamily.route``), taken from the experts' own call, p_j(x) the full softmax, and E_j(x) the
expert's output before gate weighting, computed in the model's dtype.  ``reap_image`` /
``reap_text`` restrict reap to image-placeholder / other tokens.  Sums are float64.

The maximum output activation (routed and full modes; the super-experts statistic, arXiv 2507.23279):

    max_activation_j = max_{x routed to j} max_h |E_j(x)_h|

the largest absolute element of expert j's down_proj output (before gate weighting, in the model's dtype,
then exact in float64) over the valid tokens routed to j (0 if never routed).  Only routed pairs count, in
full mode too: that is the activation the model really produces (and the paper measures in its forward).
``max_activation_image`` / ``max_activation_text`` restrict it to image / other tokens, so the modality of
the token that produced the maximum is the larger of the two.  These are maxima, not sums: batches, resumed
states and torchrun ranks combine them with max.

``reap_balanced`` is derived from reap_image / reap_text (``reap_vlm.selection.balanced_reap``).

This module is the one place that formula lives: ``LayerStats.observe`` adds a batch,
``LayerStats.metrics`` divides.
"""


from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..selection import with_derived

_SUMS = (
    "count", "weighted_frequency", "reap_sum", "ean_sum", "soft_frequency", "reap_dense_sum",
    "count_image", "reap_image_sum", "count_text", "reap_text_sum",
)
MAXIMA = ("max_image", "max_text")  # combined by max, not sum
_BY_MODALITY = {"count": ("count_text", "count_image"), "reap_sum": ("reap_text_sum", "reap_image_sum")}


METRICS_BY_MODE = {
    "router": ("frequency", "weighted_frequency", "soft_frequency", "frequency_image", "frequency_text"),
    "routed": ("reap", "ean", "frequency", "weighted_frequency", "soft_frequency", "reap_image", "reap_text",
               "frequency_image", "frequency_text", "reap_balanced", "max_activation", "max_activation_image",
               "max_activation_text"),
    "full": ("reap", "ean", "frequency", "weighted_frequency", "soft_frequency", "reap_dense", "reap_image",
             "reap_text", "frequency_image", "frequency_text", "reap_balanced", "max_activation",
             "max_activation_image", "max_activation_text"),
}


def _full_rows(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[n_valid, ...] -> [T, ...] with zeros at the invalid rows; [T, ...] unchanged."""
    if values.shape[0] == valid.shape[0]:
        return values
    out = values.new_zeros((valid.shape[0], *values.shape[1:]))
    out[valid] = values
    return out


def _ratio(num: torch.Tensor, den: torch.Tensor | float) -> torch.Tensor:
    den = torch.as_tensor(den, dtype=torch.float64, device=num.device)
    return torch.where(den > 0, num / den.clamp(min=1e-300), torch.zeros_like(num))


@dataclass
class LayerStats:
    """float64 sums for one MoE layer; ``observe`` adds a batch, ``metrics`` gives the scores."""

    num_experts: int
    device: torch.device | str = "cpu"
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    n_tokens: int = 0
    n_image_tokens: int = 0

    def __post_init__(self):
        if not self.sums:
            self.sums = {k: torch.zeros(self.num_experts, dtype=torch.float64, device=self.device)
                         for k in (*_SUMS, *MAXIMA)}

    def _slots(self, ids: torch.Tensor, image: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Each routed pair's slot among 3 x E: its expert among text tokens, among image tokens, or (a padding
        row) in the third block, which is dropped; so one scatter serves both modalities and no value is masked."""
        block = torch.where(valid, image.long(), 2)
        return (ids + self.num_experts * block[:, None]).reshape(-1)

    def _add_pairs(self, slots: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        """Per-pair float64 ``values`` summed per slot in one index_add, then added to the per-modality sums
        (``<name>_text`` / ``<name>_image``, when kept) and to the totals (``<name>``) in one foreach add.  Four
        values per pair where there were eight index_adds of masked ones: on an H200 the routed forward of a text
        batch went from 1.052x to 1.039x a plain one (bench_routed_observer.py)."""
        e = self.num_experts
        acc = torch.zeros(len(values), 3 * e, dtype=torch.float64, device=slots.device)
        acc.index_add_(1, slots, torch.stack([v.reshape(-1) for v in values.values()]))
        text, image = acc[:, :e], acc[:, e:2 * e]
        targets, sources = [], []
        for row, total in enumerate(values):
            split = _BY_MODALITY.get(total)
            if split is not None:
                targets += [self.sums[split[0]], self.sums[split[1]]]
                sources += [text[row], image[row]]
            targets.append(self.sums[total])
            sources.append(text[row] + image[row])
        torch._foreach_add_(targets, sources)

    def _max_pairs(self, slots: torch.Tensor, peaks: torch.Tensor) -> None:
        # peaks are >= 0, so the zeros a slot starts from never raise a maximum
        e = self.num_experts
        acc = torch.zeros(3 * e, dtype=peaks.dtype, device=slots.device)
        acc.scatter_reduce_(0, slots, peaks.reshape(-1), reduce="amax")
        torch._foreach_maximum_([self.sums["max_text"], self.sums["max_image"]], [acc[:e], acc[e:2 * e]])

    def observe(self, *, router_logits: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                valid: torch.Tensor, image: torch.Tensor, routed_norms: torch.Tensor | None = None,
                all_norms: torch.Tensor | None = None, n_valid: int | None = None,
                n_image: int | None = None, routed_max: torch.Tensor | None = None) -> None:
        """Add one batch.  Rows are tokens; only rows where ``valid`` is set count.

        routed_norms[t, i] = ||E_{topk_ids[t, i]}(x_t)||; all_norms[t, j] = ||E_j(x_t)|| (full mode);
        routed_max[t, i] = max_h |E_{topk_ids[t, i]}(x_t)_h|; each may hold every row or only the valid ones.
        ``n_valid`` / ``n_image`` (the counts of valid and valid image rows), when given, spare a device sync.

        Padding rows go to a slot that is dropped (``_slots``), or are masked with ``torch.where`` rather than
        selected, so no step waits on the device.
        """
        device = self.sums["count"].device
        f64 = torch.float64
        valid = valid.to(device).reshape(-1).bool()
        image = image.to(device).reshape(-1).bool() & valid
        ids = topk_ids.to(device)
        slots = self._slots(ids, image, valid)
        rows = valid[:, None]
        zero = torch.zeros((), dtype=f64, device=device)
        gates = topk_weights.to(device, f64)
        pairs = {"count": torch.ones_like(gates), "weighted_frequency": gates}
        probs = torch.softmax(router_logits.to(device).float(), dim=-1).to(f64)
        probs = torch.where(rows, probs, zero)
        self.sums["soft_frequency"] += probs.sum(dim=0)
        if all_norms is not None:
            all_norms = _full_rows(all_norms.to(device, f64), valid)
            all_norms = torch.where(rows, all_norms, zero)
            self.sums["reap_dense_sum"] += (probs * all_norms).sum(dim=0)
            if routed_norms is None:
                routed_norms = torch.gather(all_norms, 1, ids)
        if routed_norms is not None:
            norms = _full_rows(routed_norms.to(device, f64), valid)
            pairs.update(ean_sum=norms, reap_sum=gates * norms)
        self._add_pairs(slots, pairs)
        if routed_max is not None:
            self._max_pairs(slots, _full_rows(routed_max.to(device, f64), valid))
        self.n_tokens += int(valid.sum()) if n_valid is None else int(n_valid)
        self.n_image_tokens += int(image.sum()) if n_image is None else int(n_image)

    def metrics(self) -> dict[str, torch.Tensor]:
        s = self.sums
        return {
            "reap": _ratio(s["reap_sum"], s["count"]),
            "ean": _ratio(s["ean_sum"], s["count"]),
            "frequency": s["count"].clone(),
            "weighted_frequency": s["weighted_frequency"].clone(),
            "soft_frequency": s["soft_frequency"].clone(),
            "reap_dense": _ratio(s["reap_dense_sum"], float(self.n_tokens)),
            "reap_image": _ratio(s["reap_image_sum"], s["count_image"]),
            "reap_text": _ratio(s["reap_text_sum"], s["count_text"]),
            "frequency_image": s["count_image"].clone(),
            "frequency_text": s["count_text"].clone(),
            "max_activation": torch.maximum(s["max_image"], s["max_text"]),
            "max_activation_image": s["max_image"].clone(),
            "max_activation_text": s["max_text"].clone(),
        }

    def state_dict(self) -> dict:
        return {"sums": {k: v.cpu() for k, v in self.sums.items()}, "n_tokens": self.n_tokens,
                "n_image_tokens": self.n_image_tokens}

    def load_state_dict(self, state: dict) -> None:
        """Restore saved sums; a state without every sum and maximum (an older version's) raises KeyError
        before anything changes."""
        missing = set(self.sums) - set(state["sums"])
        if missing:
            raise KeyError(f"saved state lacks {sorted(missing)}")
        device = self.sums["count"].device
        self.sums = {k: v.to(device, torch.float64, copy=True) for k, v in state["sums"].items()}  # ours to add to
        self.n_tokens = int(state["n_tokens"])
        self.n_image_tokens = int(state["n_image_tokens"])


@dataclass
class ExpertStats:
    """LayerStats for every MoE layer of a model, keyed by decoder-layer index."""

    layers: dict[int, LayerStats]

    @classmethod
    def empty(cls, moe_layers: list[int], num_experts: int, device="cpu") -> ExpertStats:
        return cls({layer: LayerStats(num_experts, device) for layer in moe_layers})

    def metrics(self, mode: str) -> dict[str, list[list[float]]]:
        per_layer = [stats.metrics() for _, stats in sorted(self.layers.items())]
        measured = {name: [m[name].tolist() for m in per_layer] for name in METRICS_BY_MODE[mode]
                    if per_layer and name in per_layer[0]}
        return with_derived(measured)

    @property
    def n_tokens(self) -> int:
        return next(iter(self.layers.values())).n_tokens if self.layers else 0

    @property
    def n_image_tokens(self) -> int:
        return next(iter(self.layers.values())).n_image_tokens if self.layers else 0

    def state_dict(self) -> dict:
        return {str(k): v.state_dict() for k, v in self.layers.items()}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            self.layers[int(key)].load_state_dict(value)
