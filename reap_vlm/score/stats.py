"""REAP saliency (arXiv 2510.13999) and the router statistics beside it.

For MoE layer l and expert j, over the valid (non-padding) calibration tokens x:

    reap_j        = sum_{x routed to j} g_j(x) * ||E_j(x)||_2  /  count_j      (0 if never routed)
    ean_j         = sum_{x routed to j}          ||E_j(x)||_2  /  count_j
    frequency_j   = count_j                        weighted_frequency_j = sum_{x routed to j} g_j(x)
    reap_dense_j  = sum_{all x} p_j(x) * ||E_j(x)||_2 / n_tokens              (full mode only)
    soft_frequency_j = sum_{all x} p_j(x)

g_j(x) is the gate weight the model applies (for Qwen3-VL: softmax over all experts, top-k,
renormalised), taken from the experts' own call, p_j(x) the full softmax, and E_j(x) the
expert's output before gate weighting, computed in the model's dtype.  ``reap_image`` /
``reap_text`` restrict reap to image-placeholder / other tokens.  Sums are float64.

This module is the one place that formula lives: ``LayerStats.observe`` adds a batch,
``LayerStats.metrics`` divides.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..families import ModelFamily

_SUMS = (
    "count", "weighted_frequency", "reap_sum", "ean_sum", "soft_frequency", "reap_dense_sum",
    "count_image", "reap_image_sum", "count_text", "reap_text_sum",
)

METRICS_BY_MODE = {
    "router": ("frequency", "weighted_frequency", "soft_frequency", "frequency_image", "frequency_text"),
    "routed": ("reap", "ean", "frequency", "weighted_frequency", "soft_frequency", "reap_image", "reap_text",
               "frequency_image", "frequency_text"),
    "full": ("reap", "ean", "frequency", "weighted_frequency", "soft_frequency", "reap_dense", "reap_image",
             "reap_text", "frequency_image", "frequency_text"),
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
            self.sums = {k: torch.zeros(self.num_experts, dtype=torch.float64, device=self.device) for k in _SUMS}

    def _add(self, name: str, ids: torch.Tensor, values: torch.Tensor) -> None:
        self.sums[name].index_add_(0, ids.reshape(-1), values.reshape(-1).to(torch.float64))

    def observe(self, *, router_logits: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                valid: torch.Tensor, image: torch.Tensor, routed_norms: torch.Tensor | None = None,
                all_norms: torch.Tensor | None = None, n_valid: int | None = None,
                n_image: int | None = None) -> None:
        """Add one batch.  Rows are tokens; only rows where ``valid`` is set count.

        routed_norms[t, i] = ||E_{topk_ids[t, i]}(x_t)||; all_norms[t, j] = ||E_j(x_t)|| (full mode);
        either may hold every row or only the valid ones.  ``n_valid`` / ``n_image`` (the counts of
        valid and valid image rows), when given, spare a device sync.

        Rows are masked with ``torch.where`` rather than selected, so no step waits on the device
        (adding exact zeros leaves float64 sums as they were).
        """
        device = self.sums["count"].device
        f64 = torch.float64
        valid = valid.to(device).reshape(-1).bool()
        image = image.to(device).reshape(-1).bool() & valid
        text = valid & ~image
        ids = topk_ids.to(device)
        rows = valid[:, None]
        zero = torch.zeros((), dtype=f64, device=device)
        ones = rows.expand_as(ids).to(f64)
        image_w = image[:, None].expand_as(ids).to(f64)
        text_w = text[:, None].expand_as(ids).to(f64)
        gates = torch.where(rows, topk_weights.to(device, f64), zero)
        self._add("count", ids, ones)
        self._add("weighted_frequency", ids, gates)
        self._add("count_image", ids, image_w)
        self._add("count_text", ids, text_w)
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
            norms = torch.where(rows, _full_rows(routed_norms.to(device, f64), valid), zero)
            saliency = gates * norms
            self._add("reap_sum", ids, saliency)
            self._add("ean_sum", ids, norms)
            self._add("reap_image_sum", ids, saliency * image_w)
            self._add("reap_text_sum", ids, saliency * text_w)
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
        }

    def state_dict(self) -> dict:
        return {"sums": {k: v.cpu() for k, v in self.sums.items()}, "n_tokens": self.n_tokens,
                "n_image_tokens": self.n_image_tokens}

    def load_state_dict(self, state: dict) -> None:
        device = self.sums["count"].device
        self.sums = {k: v.to(device, torch.float64) for k, v in state["sums"].items()}
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
        per_layer = {layer: stats.metrics() for layer, stats in sorted(self.layers.items())}
        return {name: [per_layer[layer][name].tolist() for layer in sorted(per_layer)]
                for name in METRICS_BY_MODE[mode]}

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


# ----------------------------------------------------------------------------------------------- expert norms

_MIN_CHUNK = 128  # tokens: below this the batched matmuls lose efficiency


def free_memory_bytes(device: torch.device | str) -> int:
    """Memory a new allocation can get: on CUDA the driver's free memory plus PyTorch's cached, unused
    blocks; on the CPU the kernel's MemAvailable (psutil if /proc is missing)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return int(psutil.virtual_memory().available)


def full_chunk_tokens(family: ModelFamily, experts: nn.Module, x: torch.Tensor,
                      chunk_budget_bytes: int | None = None) -> int:
    """Tokens per chunk of ``all_expert_norms``: the budget (default: half of the free memory on
    CUDA, capped at 16 GiB; 512 MiB on the CPU) over the working memory per token."""
    if chunk_budget_bytes is None:
        if x.device.type == "cuda":
            chunk_budget_bytes = min(free_memory_bytes(x.device) // 2, 16 << 30)
        else:
            chunk_budget_bytes = 512 << 20
    per_token = max(family.full_bytes_per_token(experts, x.dtype), 1)
    chunk = max(1, chunk_budget_bytes // per_token)
    if chunk >= 2 * _MIN_CHUNK:
        chunk -= chunk % _MIN_CHUNK
    return int(chunk)


def all_expert_norms(family: ModelFamily, experts: nn.Module, x: torch.Tensor,
                     chunk_budget_bytes: int | None = None) -> torch.Tensor:
    """||E_j(x_t)|| for every token t and expert j: [T, E] float32, E_j computed in x's dtype.

    All experts at once with batched matmuls (``family.all_expert_norms``), over token chunks
    sized from free memory (``chunk_budget_bytes`` overrides)."""
    num_experts = experts.num_experts
    out = torch.empty(x.shape[0], num_experts, dtype=torch.float32, device=x.device)
    if x.shape[0] == 0:
        return out
    chunk = full_chunk_tokens(family, experts, x, chunk_budget_bytes)
    for start in range(0, x.shape[0], chunk):
        out[start:start + chunk] = family.all_expert_norms(experts, x[start:start + chunk])
    return out



def routed_expert_norms(family: ModelFamily, experts: nn.Module, x: torch.Tensor,
                        topk_ids: torch.Tensor) -> torch.Tensor:
    """||E_j(x_t)|| for the routed pairs only: [T, k], matching ``topk_ids``.

    Through the family's routed forward where it has one (grouped or batched matmuls, as the
    experts are configured), else one expert at a time."""
    if topk_ids.numel() == 0:
        return torch.zeros(topk_ids.shape, dtype=torch.float32, device=x.device)
    weights = torch.ones(topk_ids.shape, dtype=x.dtype, device=x.device)
    result = family.routed_forward(experts, x, topk_ids, weights)
    if result is not None:
        return result[1]
    norms = torch.zeros(topk_ids.shape, dtype=torch.float32, device=x.device)
    for expert in torch.unique(topk_ids).tolist():
        token, slot = torch.where(topk_ids == expert)
        ids = torch.tensor([expert], device=x.device)
        y = family.expert_outputs(experts, x[token], ids)[0]
        norms[token, slot] = torch.linalg.vector_norm(y, dim=-1, dtype=torch.float32)
    return norms


# ----------------------------------------------------------------------------------------------- hooks


@dataclass
class TokenMasks:
    """Which rows of the flattened [B*S] token stream are counted, and which are image tokens."""

    valid: torch.Tensor
    image: torch.Tensor
    n_valid: int | None = None  # counts, when known, spare a device sync per layer
    n_image: int | None = None

    @classmethod
    def of(cls, attention_mask: torch.Tensor, image_mask: torch.Tensor) -> TokenMasks:
        valid = attention_mask.reshape(-1).bool()
        image = image_mask.reshape(-1).bool()
        return cls(valid, image, int(valid.sum()), int((image & valid).sum()))


class ReapObserver:
    """Hooks on every MoE block: the router's logits and the experts' call feed ``ExpertStats``.

    The model runs its own forward (mRoPE, deepstack, the experts' own kernels).  Modes:

    * router / full: a forward pre-hook on the experts reads (hidden, top-k ids, gate weights); full
      mode then runs every expert on the valid tokens (``all_expert_norms``).
    * routed: the experts module's forward is replaced (instance attribute, removed on detach) by
      ``family.routed_forward``, the same computation as the module's own forward (same ops, same
      result) that also returns ||E_j(x)|| of each routed pair, so REAP costs about one forward.
      Where the family cannot reproduce the module's forward, a pre-hook computes the norms apart.

    Call ``set_masks`` (or ``use_masks``) before each forward.
    """

    def __init__(self, family: ModelFamily, stats: ExpertStats, mode: str, chunk_budget_bytes: int | None = None,
                 fused_routed: bool = True):
        self.family, self.stats, self.mode = family, stats, mode
        self.chunk_budget_bytes = chunk_budget_bytes
        self.fused_routed = fused_routed
        self.masks: TokenMasks | None = None
        self._logits: dict[int, torch.Tensor] = {}
        self._handles: list = []
        self._patched: list[nn.Module] = []

    def set_masks(self, attention_mask: torch.Tensor, image_mask: torch.Tensor) -> None:
        self.masks = TokenMasks.of(attention_mask, image_mask)

    def use_masks(self, masks: TokenMasks) -> None:
        self.masks = masks

    def attach(self, blocks) -> ReapObserver:
        for layer, block in blocks:
            if layer not in self.stats.layers:
                continue
            router, experts = self.family.router_of(block), self.family.experts_of(block)
            self._handles.append(router.register_forward_hook(self._router_hook(layer)))
            if self.mode == "routed" and self.fused_routed and "forward" not in vars(experts):
                experts.forward = self._routed_forward(layer, experts)
                self._patched.append(experts)
            else:
                self._handles.append(experts.register_forward_pre_hook(self._experts_hook(layer, experts),
                                                                       with_kwargs=True))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for experts in self._patched:
            vars(experts).pop("forward", None)
        self._patched.clear()

    @contextmanager
    def attached(self, blocks):
        self.attach(blocks)
        try:
            yield self
        finally:
            self.detach()

    def _router_hook(self, layer: int):
        def hook(module, args, output):
            self._logits[layer] = self.family.router_logits(output).detach()

        return hook

    def _experts_hook(self, layer: int, experts: nn.Module):
        def hook(module, args, kwargs):
            hidden, topk_ids, topk_weights = self.family.routed_call(args, kwargs)
            self.observe(layer, experts, hidden.detach(), topk_ids, topk_weights.detach())

        return hook

    def _routed_forward(self, layer: int, experts: nn.Module):
        own_forward = type(experts).forward

        def forward(*args, **kwargs):
            hidden, topk_ids, topk_weights = self.family.routed_call(args, kwargs)
            result = self.family.routed_forward(experts, hidden, topk_ids, topk_weights)
            if result is None:  # the family cannot reproduce this forward: norms computed apart
                self.observe(layer, experts, hidden.detach(), topk_ids, topk_weights.detach())
                return own_forward(experts, *args, **kwargs)
            out, norms = result
            self.observe(layer, experts, hidden.detach(), topk_ids, topk_weights.detach(),
                         routed_norms=norms.detach())
            return out

        return forward

    @torch.no_grad()
    def observe(self, layer: int, experts: nn.Module, hidden: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor, routed_norms: torch.Tensor | None = None) -> None:
        masks = self.masks
        if masks is None or masks.valid.numel() != hidden.shape[0]:
            raise RuntimeError("ReapObserver.set_masks must be called with the batch's masks before the forward")
        logits = self._logits.pop(layer)
        valid = masks.valid.to(hidden.device)
        routed = all_norms = None
        if self.mode == "full":
            all_norms = all_expert_norms(self.family, experts, hidden[valid], self.chunk_budget_bytes)
        elif self.mode == "routed":
            routed = routed_norms
            if routed is None:
                routed = routed_expert_norms(self.family, experts, hidden[valid], topk_ids[valid])
        self.stats.layers[layer].observe(router_logits=logits, topk_ids=topk_ids, topk_weights=topk_weights,
                                         valid=valid, image=masks.image, routed_norms=routed, all_norms=all_norms,
                                         n_valid=masks.n_valid, n_image=masks.n_image)
