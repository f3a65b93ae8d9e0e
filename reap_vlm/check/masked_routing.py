"""The reference a pruned model must reproduce: the original with pruned experts' router logits at -inf.

A pruned model with kept set S computes exactly what the original computes when the router
logits of the experts outside S are -inf.  ``masked_routing`` makes the original model do that,
so a pruned checkpoint can be checked logit for logit.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..families import ModelFamily


@contextmanager
def masked_routing(model: nn.Module, family: ModelFamily, experts_to_keep: dict[int, list[int]],
                   layers: Collection[int] | None = None) -> Iterator[None]:
    """Inside the block, every MoE router of ``model`` (of ``layers`` only, when given: the layer-wise check's
    model has real weights in one layer at a time) routes only among ``experts_to_keep[layer]``."""
    handles = []
    for layer, block in family.moe_blocks(model):
        if layers is not None and layer not in layers:
            continue
        router = family.router_of(block)
        bias = torch.full((family.num_router_rows(router),), float("-inf"), device=router.weight.device)
        bias[torch.as_tensor(experts_to_keep[layer], device=bias.device)] = 0.0

        def hook(module, args, output, bias=bias):
            return family.router_forward(module, args[0], logit_bias=bias)

        handles.append(router.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
