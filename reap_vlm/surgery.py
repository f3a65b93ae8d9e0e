"""The reference a pruned model must reproduce: the original with pruned experts' router logits at -inf.

A pruned model with kept set S computes exactly what the original computes when the router
logits of the experts outside S are -inf.  ``masked_routing`` makes the original model do that,
so a pruned checkpoint can be checked logit for logit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .families import ModelFamily


@contextmanager
def masked_routing(model: nn.Module, family: ModelFamily, experts_to_keep: dict[int, list[int]]) -> Iterator[None]:
    """Inside the block, every MoE router of ``model`` routes only among ``experts_to_keep[layer]``."""
    handles = []
    for layer, block in family.moe_blocks(model):
        router = family.router_of(block)
        mask = torch.full((router.weight.shape[0],), float("-inf"), device=router.weight.device)
        mask[torch.as_tensor(experts_to_keep[layer], device=mask.device)] = 0.0

        def hook(module, args, output, mask=mask):
            hidden = args[0].reshape(-1, module.weight.shape[1])
            logits = F.linear(hidden, module.weight) + mask.to(module.weight.dtype)
            weights, ids = family.route(logits, module.top_k)
            return logits, weights, ids

        handles.append(router.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
