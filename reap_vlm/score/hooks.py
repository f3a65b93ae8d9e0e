"""The hooks that feed the REAP sums: router logits and the experts' call of every MoE block, the token masks."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..families import ModelFamily
from .norms import all_expert_norms, routed_expert_norms
from .stats import ExpertStats


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

    def to(self, device: str | torch.device) -> TokenMasks:
        """The masks on ``device``; to a GPU through page-locked memory: a copy from pageable memory first waits
        for all the work queued on the stream, and the GPU then idles while the next forward starts."""
        pin = torch.device(device).type == "cuda"

        def moved(mask: torch.Tensor) -> torch.Tensor:
            if pin and mask.device.type == "cpu" and not mask.is_pinned():
                mask = mask.pin_memory()
            return mask.to(device, non_blocking=True)

        return TokenMasks(moved(self.valid), moved(self.image), self.n_valid, self.n_image)


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
        self._routing: dict[int, tuple] = {}  # (hidden, ids, weights) from the router, where the experts lack them
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
            if not self.family.routing_in_experts_call:
                self._routing[layer] = self.family.routing_from_router(module, args, output)

        return hook

    def _routing_of(self, layer: int, args: tuple, kwargs: dict):
        """(hidden, top-k ids, gate weights) of this experts' call: from the call, or from the router's."""
        if self.family.routing_in_experts_call:
            return self.family.routed_call(args, kwargs)
        return self._routing.pop(layer)

    def _experts_hook(self, layer: int, experts: nn.Module):
        def hook(module, args, kwargs):
            hidden, topk_ids, topk_weights = self._routing_of(layer, args, kwargs)
            self.observe(layer, experts, hidden.detach(), topk_ids, topk_weights.detach())

        return hook

    def _routed_forward(self, layer: int, experts: nn.Module):
        own_forward = type(experts).forward

        def forward(*args, **kwargs):
            hidden, topk_ids, topk_weights = self._routing_of(layer, args, kwargs)
            result = self.family.routed_forward(experts, hidden, topk_ids, topk_weights)
            if result is None:  # the family cannot reproduce this forward: norms computed apart
                self.observe(layer, experts, hidden.detach(), topk_ids, topk_weights.detach())
                return own_forward(experts, *args, **kwargs)
            out, norms, peaks = result
            self.observe(layer, experts, hidden.detach(), topk_ids, topk_weights.detach(),
                         routed=(norms.detach(), peaks.detach()))
            return out

        return forward

    @torch.no_grad()
    def observe(self, layer: int, experts: nn.Module, hidden: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor, routed: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Feed one layer's batch to its stats; ``routed`` = (norms, peaks) of the routed pairs where the forward
        computed them.  The peaks (max |E_j(x)|) always come from the routed pairs, in full mode too (a routed
        pass of the family's own forward, about top_k / num_experts of the all-experts work), so the all-experts
        path (bmm or the Triton kernels, which give norms only) is unchanged."""
        masks = self.masks
        if masks is None or masks.valid.numel() != hidden.shape[0]:
            raise RuntimeError("ReapObserver.set_masks must be called with the batch's masks before the forward")
        logits = self._logits.pop(layer)
        valid = masks.valid.to(hidden.device)
        all_norms = routed_norms = peaks = None
        if self.mode in ("full", "routed") and routed is None:
            routed = routed_expert_norms(self.family, experts, hidden[valid], topk_ids[valid])
        if routed is not None:
            routed_norms, peaks = routed
        if self.mode == "full":
            all_norms = all_expert_norms(self.family, experts, hidden[valid], self.chunk_budget_bytes)
            routed_norms = None  # REAP's norms gathered from all_norms, as before
        self.stats.layers[layer].observe(router_logits=logits, topk_ids=topk_ids, topk_weights=topk_weights,
                                         valid=valid, image=masks.image, routed_norms=routed_norms,
                                         all_norms=all_norms, n_valid=masks.n_valid, n_image=masks.n_image,
                                         routed_max=peaks)
