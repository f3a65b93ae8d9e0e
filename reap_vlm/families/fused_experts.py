"""Experts fused the transformers 5 way, for any family that holds them so: ``experts.gate_up_proj`` [E, 2I, H]
(gate rows first) and ``experts.down_proj`` [E, H, I], called as ``experts(hidden_states, top_k_index,
top_k_weights)`` after a router that returns (logits, ...).

Splitting and fusing per-expert tensors, expert outputs, and the fast scoring paths: all experts at
once (batched matmuls or the Triton kernels), and the routed forward that keeps each routed pair's
norm on the way.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import ModelFamily, float32_norm, output_stats


class FusedGateUpFamily(ModelFamily):
    """Experts as fused gate_up_proj [E, 2I, H] + down_proj [E, H, I] (transformers 5 layout)."""

    def fused_sources(self) -> dict[str, tuple[str, ...]]:
        return {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}

    def split_fused(self, name: str, tensor: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        if name == "gate_up_proj":
            inter = tensor.shape[1] // 2
            return [{"gate_proj": t[:inter], "up_proj": t[inter:]} for t in tensor]
        return [{"down_proj": t} for t in tensor]

    def fuse_per_expert(self, name: str, per_expert: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        if name == "gate_up_proj":
            return torch.stack([torch.cat([e["gate_proj"], e["up_proj"]], dim=0) for e in per_expert])
        return torch.stack([e["down_proj"] for e in per_expert])

    def fused_shape(self, name: str, num_experts: int, proj: str, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
        rows, columns = weight_shape
        return (num_experts, 2 * rows, columns) if name == "gate_up_proj" else (num_experts, rows, columns)

    def fused_slot(self, name: str, fused: torch.Tensor, expert: int | slice, proj: str) -> torch.Tensor:
        if proj not in self.fused_sources()[name]:
            raise KeyError(f"{proj} is not a part of {name}")
        if name == "gate_up_proj":  # gate rows first, as fuse_per_expert concatenates them
            inter = fused.shape[1] // 2
            return fused[expert, :inter] if proj == "gate_proj" else fused[expert, inter:]
        return fused[expert]

    # -------------------------------------------------------------- how transformers 5 calls them

    def router_logits(self, router_output) -> torch.Tensor:
        return router_output[0]

    def routed_call(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        names = ("hidden_states", "top_k_index", "top_k_weights")
        values = list(args) + [kwargs[n] for n in names[len(args):]]
        return values[0], values[1], values[2]

    def expert_outputs(self, experts: nn.Module, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        gate_up = experts.gate_up_proj[expert_ids]  # [n, 2I, H]
        h = torch.matmul(x.unsqueeze(0), gate_up.transpose(1, 2))  # [n, T, 2I]
        return torch.matmul(_gate(experts, h), experts.down_proj[expert_ids].transpose(1, 2))

    # -------------------------------------------------------------- fast scoring (reap_vlm.score.norms)

    def all_expert_norms(self, experts: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Every expert on every row, [T, E] float32: two batched matmuls over all experts (no weight
        gather), or on CUDA in 16-bit the fused Triton kernels (``reap_vlm.score.triton_experts``: the
        [E, T, 2I] and [E, T, H] intermediates never reach memory) where they time faster."""
        from ..score import triton_experts

        if triton_experts.available(experts, x):
            return triton_experts.fastest(experts, x, self._all_expert_norms_bmm,
                                          self.full_bytes_per_token(experts, x.dtype))
        return self._all_expert_norms_bmm(experts, x)

    def _all_expert_norms_bmm(self, experts: nn.Module, x: torch.Tensor) -> torch.Tensor:
        gate_up, down = experts.gate_up_proj, experts.down_proj  # [E, 2I, H], [E, H, I]
        num = gate_up.shape[0]
        h = torch.bmm(x.unsqueeze(0).expand(num, -1, -1), gate_up.transpose(1, 2))  # [E, T, 2I]
        act = _gate(experts, h)
        del h
        y = torch.bmm(act, down.transpose(1, 2))  # [E, T, H]
        del act
        return float32_norm(y).T

    def full_bytes_per_token(self, experts: nn.Module, dtype: torch.dtype) -> int:
        return _bmm_bytes_per_token(tuple(experts.gate_up_proj.shape), dtype)

    def full_scoring_warm_up(self, config: dict, dtype: torch.dtype, devices: list[torch.device]):
        """The fused Triton kernels' compilation and autotuning (``triton_experts.KernelWarmUp``) where the full
        mode will use them: most of a fresh process's first batch (14 s on a fresh H200)."""
        from ..score import triton_experts

        if not devices or not triton_experts.can_run(dtype, devices[0].type,
                                                     self.text_section(config).get("hidden_act")):
            return None
        sizes = self.sizes(config)
        shape = (self.num_experts(config), sizes["2I"], sizes["H"])
        return triton_experts.KernelWarmUp(shape, dtype, devices, self._all_expert_norms_bmm,
                                           _bmm_bytes_per_token(shape, dtype))

    def routed_forward(self, experts: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                       top_k_weights: torch.Tensor):
        """The experts' own forward (the implementation its config names) plus the routed pairs' norms and
        maximum absolute output elements."""
        impl = getattr(getattr(experts, "config", None), "_experts_implementation", None) or "eager"
        if getattr(experts, "has_bias", False) or not getattr(experts, "has_gate", True):
            return None
        if getattr(experts, "is_transposed", False) or not getattr(experts, "is_concatenated", True):
            return None
        if impl == "grouped_mm":
            return _routed_grouped(experts, hidden, top_k_index, top_k_weights)
        if impl == "batched_mm":
            return _routed_batched(experts, hidden, top_k_index, top_k_weights)
        if impl == "eager":
            return _routed_eager(experts, hidden, top_k_index, top_k_weights)
        return None


# For reap_vlm.score's fast paths.  ``_routed_*`` reproduce transformers 5's experts forwards
# (integrations/moe.py: eager, batched_mm, grouped_mm) op for op, so the output is the model's own, and
# keep the per-pair expert outputs' norms and peaks on the way (||E_j(x)||, max_h |E_j(x)_h|, before gate
# weighting).


def _bmm_bytes_per_token(shape: tuple[int, int, int], dtype: torch.dtype) -> int:
    num, two_i, hidden = shape
    # gate_up output + activation (+ its temporary) or activation + down output, plus the float32 norms
    width = max(two_i + two_i // 2 * 2, two_i // 2 + hidden)
    return num * (width * torch.finfo(dtype).bits // 8 + 8)


def _gate(experts: nn.Module, proj: torch.Tensor) -> torch.Tensor:
    if hasattr(experts, "_apply_gate"):
        return experts._apply_gate(proj)
    gate, up = proj.chunk(2, dim=-1)
    return experts.act_fn(gate) * up


def _routed_grouped(experts, hidden_states, top_k_index, top_k_weights):
    from transformers.integrations.moe import _grouped_linear

    device = hidden_states.device
    num_experts = experts.num_experts
    num_top_k = top_k_index.size(-1)
    num_tokens = hidden_states.size(0)
    hidden_dim = hidden_states.size(-1)
    sample_weights = top_k_weights.reshape(-1)
    expert_ids = top_k_index.reshape(-1)
    expert_ids_g, perm = torch.sort(expert_ids)
    selected_hidden_states_g = hidden_states[perm // num_top_k]
    sample_weights_g = sample_weights[perm]
    histc_input = expert_ids_g.float() if device.type in ("cpu", "mps") else expert_ids_g.int()
    tokens_per_expert = torch.histc(histc_input, bins=num_experts, min=0, max=num_experts - 1)
    offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
    sentinel_mask = (expert_ids_g >= num_experts).unsqueeze(-1)
    expert_ids_g.clamp_(max=num_experts - 1)
    selected_hidden_states_g.masked_fill_(sentinel_mask, 0.0)
    proj_out = _grouped_linear(selected_hidden_states_g, experts.gate_up_proj, offsets, bias=None,
                               is_transposed=False)
    proj_out = proj_out.masked_fill(sentinel_mask, 0.0)
    proj_out = _gate(experts, proj_out)
    proj_out = _grouped_linear(proj_out, experts.down_proj, offsets, bias=None, is_transposed=False)
    proj_out = proj_out.masked_fill(sentinel_mask, 0.0)
    norms_g, peaks_g = output_stats(proj_out)  # the one addition
    weighted_out = proj_out * sample_weights_g.unsqueeze(-1)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.size(0), device=device)
    weighted_out = weighted_out[inv_perm]
    final_hidden_states = weighted_out.view(num_tokens, num_top_k, hidden_dim).sum(dim=1)
    return (final_hidden_states.to(hidden_states.dtype), norms_g[inv_perm].view(num_tokens, num_top_k),
            peaks_g[inv_perm].view(num_tokens, num_top_k))


def _routed_batched(experts, hidden_states, top_k_index, top_k_weights):
    from transformers.integrations.moe import _batched_linear

    num_top_k = top_k_index.size(-1)
    num_tokens = hidden_states.size(0)
    hidden_dim = hidden_states.size(-1)
    selected_hidden_states = hidden_states.repeat_interleave(num_top_k, dim=0)
    sample_weights = top_k_weights.reshape(-1)
    expert_ids = top_k_index.reshape(-1).clamp(0, experts.num_experts - 1)
    proj_out = _batched_linear(selected_hidden_states, experts.gate_up_proj[expert_ids], bias=None,
                               is_transposed=False)
    proj_out = _gate(experts, proj_out)
    proj_out = _batched_linear(proj_out, experts.down_proj[expert_ids], bias=None, is_transposed=False)
    norms, peaks = output_stats(proj_out)
    weighted_out = proj_out * sample_weights.unsqueeze(-1)
    final_hidden_states = weighted_out.view(num_tokens, num_top_k, hidden_dim).sum(dim=1)
    return (final_hidden_states.to(hidden_states.dtype), norms.view(num_tokens, num_top_k),
            peaks.view(num_tokens, num_top_k))


def _routed_eager(experts, hidden_states, top_k_index, top_k_weights):
    final_hidden_states = torch.zeros_like(hidden_states)
    norms = torch.zeros(top_k_index.shape, dtype=torch.float32, device=hidden_states.device)
    peaks = torch.zeros_like(norms)
    with torch.no_grad():
        expert_mask = torch.nn.functional.one_hot(top_k_index, num_classes=experts.num_experts)
        expert_mask = expert_mask.permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert_idx in expert_hit:
        expert_idx = expert_idx[0]
        if expert_idx == experts.num_experts:
            continue
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        current_state = hidden_states[token_idx]
        gate, up = nn.functional.linear(current_state, experts.gate_up_proj[expert_idx]).chunk(2, dim=-1)
        current_hidden_states = experts.act_fn(gate) * up
        current_hidden_states = nn.functional.linear(current_hidden_states, experts.down_proj[expert_idx])
        norms[token_idx, top_k_pos], peaks[token_idx, top_k_pos] = output_stats(current_hidden_states)
        current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
        final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))
    return final_hidden_states, norms, peaks
