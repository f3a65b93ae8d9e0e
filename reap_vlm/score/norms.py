"""Expert output norms ||E_j(x)||: every expert on every token (full mode, in chunks sized from free memory),
or only the routed pairs (routed mode)."""

from __future__ import annotations

import torch
from torch import nn

from ..checkpoint.loading import free_memory_bytes
from ..families import ModelFamily
from ..families.base import output_stats

_MIN_CHUNK = 128  # tokens: below this the batched matmuls lose efficiency
CUDA_CHUNK_CAP = 16 << 30  # bytes: a chunk's working memory on CUDA, at most


def full_chunk_tokens(family: ModelFamily, experts: nn.Module, x: torch.Tensor,
                      chunk_budget_bytes: int | None = None) -> int:
    """Tokens per chunk of ``all_expert_norms``: the budget (default: half of the free memory on
    CUDA, capped at ``CUDA_CHUNK_CAP``; 512 MiB on the CPU) over the working memory per token."""
    if chunk_budget_bytes is None:
        if x.device.type == "cuda":
            chunk_budget_bytes = min(free_memory_bytes(x.device) // 2, CUDA_CHUNK_CAP)
        else:
            chunk_budget_bytes = 512 << 20
    return tokens_per_chunk(chunk_budget_bytes, family.full_bytes_per_token(experts, x.dtype))


def tokens_per_chunk(budget_bytes: int, per_token: int) -> int:
    """Tokens a chunk of ``budget_bytes`` holds at ``per_token`` bytes, rounded down to a multiple of 128."""
    chunk = max(1, budget_bytes // max(per_token, 1))
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
                        topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(||E_j(x_t)||, max_h |E_j(x_t)_h|) for the routed pairs only: two [T, k] float32, matching ``topk_ids``.

    Through the family's routed forward where it has one (grouped or batched matmuls, as the
    experts are configured), else one expert at a time."""
    norms = torch.zeros(topk_ids.shape, dtype=torch.float32, device=x.device)
    peaks = torch.zeros_like(norms)
    if topk_ids.numel() == 0:
        return norms, peaks
    weights = torch.ones(topk_ids.shape, dtype=x.dtype, device=x.device)
    result = family.routed_forward(experts, x, topk_ids, weights)
    if result is not None:
        return result[1], result[2]
    for expert in torch.unique(topk_ids).tolist():
        token, slot = torch.where(topk_ids == expert)
        ids = torch.tensor([expert], device=x.device)
        y = family.expert_outputs(experts, x[token], ids)[0]
        norms[token, slot], peaks[token, slot] = output_stats(y)
    return norms, peaks
