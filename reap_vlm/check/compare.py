"""Comparing the pruned model with the original: surgery tolerances, layer replays, agreement.

Surgery consistency.  A correctly pruned model with kept set S computes what the original
computes with the router logits outside S at -inf (``masked_routing``): the same
weights and the same arithmetic, up to floating-point reduction order (the router GEMM has E'
instead of E outputs, so a kernel may block it differently).  Two tests, both must pass:

* Layer replay (the sensitive one).  Every MoE block of the masked original and of the pruned
  model is run on the *same* input rows (the original's own block inputs at a few tokens per
  prompt).  Per layer and token, the router logits of the kept experts (in the pruned model's
  order) and the block outputs must agree within ``layer_rel`` of that layer's largest value.
  Identical inputs leave only kernel rounding, so the bound can be tight in every dtype, while
  swapped router rows change the logits by O(1) of their scale and misnumbered experts the
  output.  The one legitimate difference: where two kept experts' router logits nearly tie at
  the top-k boundary, a last-bit difference can pick the other expert; a token whose routers
  agree but whose top-k margin is below twice their difference is excused, not failed.
* Final logits.  Two full forwards on identical tokens; per compared position
  ``max_v |dlogit| <= rel * max(1, max |logit|)`` (logits are O(10) in real models and a bound
  relative to their scale is dtype-meaningful), over at most ``max_mismatch_fraction`` of the
  positions.  This catches what the replay cannot see: embeddings, attention, norms, lm_head.

Per dtype (measured on an H100 with random fixtures of the supported family; a 12-layer, 32-expert one with
logits of scale ~70 is the "mid" model below):

* float32: rel 1e-4, no position over it; layers 1e-4.  float32 rounds at 6e-8 relative;
  reduction-order differences stay near 1e-6 of scale (measured: 2.3e-5 on logits of 70, layer
  replays 2.4e-7), ~100x headroom, while surgery bugs move logits by 1e-2 of their scale or more
  (a two-row router swap in one layer: 4.2 on logits of 70, at every compared position).
* bfloat16: rel 5e-2 over at most 2 % of positions; layers 2e-2.  bf16 rounds at 3.9e-3
  relative (one step of a logit of 70 is 0.5), and in a deep model a last-bit router difference
  can flip a near-tied expert choice upstream and move a whole token, so the final-logit bound
  only guards against gross corruption (measured: correct pruning 0.25 on logits of 70; the
  router swap 4.1, over the bound at only 2 positions: the final logits alone would miss it).
  The layer replay, on identical inputs, is what catches surgery bugs in bf16 (measured: correct
  pruning worst 2.1e-3 of a layer's scale, 10x under the bound; the router swap 1.4, at 92/96
  traced tokens of the swapped layer; two swapped experts 0.33 at 61/96).
* float16: rel 1e-2 over at most 2 %; layers 5e-3 (10-bit mantissa, rounding 4.9e-4).

Agreement with the unmasked original is reported as next-token top-1 agreement and mean
KL(original || pruned) over the same positions (thresholds are the user's choice: pruning
changes the model on purpose).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    dtype: str
    rel: float  # final logits: per-position bound on max |dlogit|, times max(1, max |reference logit|)
    max_mismatch_fraction: float  # share of compared positions allowed over that bound
    layer_rel: float  # layer replay: router logits / block outputs, relative to the layer's largest value
    why: str


TOLERANCES = {
    "float32": Tolerance("float32", 1e-4, 0.0, 1e-4,
                         "float32 rounding ~6e-8; reduction-order differences stay ~1e-6; bugs move logits >=1e-2"),
    "bfloat16": Tolerance("bfloat16", 5e-2, 0.02, 2e-2,
                          "bf16 rounding ~3.9e-3 (0.125 on a logit of 30); upstream top-k flips at router near-ties; "
                          "layers replayed on identical inputs keep ~5 bf16 steps"),
    "float16": Tolerance("float16", 1e-2, 0.02, 5e-3,
                         "fp16 rounding ~4.9e-4; upstream top-k flips at router near-ties"),
}


def tolerance_for(dtype: torch.dtype) -> Tolerance:
    return TOLERANCES[str(dtype).removeprefix("torch.")]


@dataclass
class LogitDiff:
    """Masked original vs pruned on one prompt."""

    max_abs: float  # max |dlogit| over positions and vocabulary (inf when the pruned logits are not finite)
    scale: float  # max |reference logit|
    bound: float  # the per-position bound
    mismatched: int  # positions over the bound
    positions: int
    non_finite: bool = False


def compare_logits(reference: torch.Tensor, pruned: torch.Tensor, tol: Tolerance) -> LogitDiff:
    ref, out = reference.float(), pruned.float()
    if ref.shape != out.shape:
        raise ValueError(f"logit shapes differ: {list(ref.shape)} vs {list(out.shape)}")
    non_finite = not bool(torch.isfinite(out).all())
    per_position = (ref - out).abs().amax(dim=-1)
    per_position = torch.where(torch.isfinite(per_position), per_position, torch.full_like(per_position, math.inf))
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    bound = tol.rel * max(1.0, scale)
    return LogitDiff(float(per_position.max()) if per_position.numel() else 0.0, scale, bound,
                     int((per_position > bound).sum()), int(per_position.numel()), non_finite)


@dataclass
class Agreement:
    """Unmasked original vs pruned on one prompt's teacher-forced positions."""

    top1_agree: int
    kl_sum: float  # sum over positions of KL(original || pruned), nats
    positions: int

    @property
    def top1(self) -> float:
        return self.top1_agree / self.positions if self.positions else math.nan

    @property
    def kl(self) -> float:
        return self.kl_sum / self.positions if self.positions else math.nan


def agreement(reference: torch.Tensor, pruned: torch.Tensor, chunk: int = 32) -> Agreement:
    agree, kl = 0, 0.0
    for start in range(0, reference.shape[0], chunk):  # [chunk, V] float32 at a time: V may be 152k
        ref, out = reference[start:start + chunk].float(), pruned[start:start + chunk].float()
        agree += int((ref.argmax(-1) == out.argmax(-1)).sum())
        log_p, log_q = torch.log_softmax(ref, -1), torch.log_softmax(out, -1)
        kl += float((log_p.exp() * (log_p - log_q)).sum())
    return Agreement(agree, kl, int(reference.shape[0]))


@dataclass
class LayerCheck:
    """One MoE layer's replay over every traced token of every prompt."""

    layer: int
    tokens: int = 0
    router_mismatches: int = 0  # tokens whose kept-expert router logits differ
    expert_mismatches: int = 0  # tokens whose routers agree but whose block outputs differ
    excused: int = 0  # output differences at a top-k near-tie (a legitimate flip)
    worst_router: float = 0.0  # largest router difference, relative to the layer's router scale
    worst_output: float = 0.0  # largest output difference, relative to the layer's output scale

    @property
    def failed(self) -> bool:
        return bool(self.router_mismatches or self.expert_mismatches)

    def describe(self, router_key: str = "router weight") -> str:
        """What failed; ``router_key`` names the router weight (``ModelFamily.router_weight_name``)."""
        if self.router_mismatches:
            return (f"router of layer {self.layer} differs at {self.router_mismatches}/{self.tokens} traced tokens "
                    f"(by up to {self.worst_router:.2g} of its scale): {router_key} rows scrambled, misnumbered "
                    "or corrupted")
        return (f"experts of layer {self.layer} differ at {self.expert_mismatches}/{self.tokens} traced tokens whose "
                f"routing agrees (output off by up to {self.worst_output:.2g} of its scale): expert tensors "
                "misnumbered, mis-sliced or corrupted")


def _relative(diff: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-row max |diff| over the largest |reference| of the whole layer (inf where not finite)."""
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    per_row = diff.abs().amax(dim=-1) / (scale if scale > 0 else 1.0)
    return torch.where(torch.isfinite(per_row), per_row, torch.full_like(per_row, math.inf))


def compare_layers(reference, pruned, order: dict[int, list[int]], top_k: int, tol: Tolerance,
                   into: dict[int, LayerCheck] | None = None) -> dict[int, LayerCheck]:
    """Accumulate one prompt's layer replays (two ``LayerTrace``s) into per-layer results;
    ``order[layer][new id]`` is the original id of the pruned model's expert ``new id``."""
    into = {} if into is None else into
    for layer in sorted(reference.outputs):
        check = into.setdefault(layer, LayerCheck(layer))
        ref_router = reference.router[layer][:, order[layer]]
        ref_out = reference.outputs[layer]
        if layer not in pruned.outputs or pruned.outputs[layer].shape != ref_out.shape \
                or pruned.router[layer].shape != ref_router.shape:
            check.tokens += ref_out.shape[0]
            check.router_mismatches += ref_out.shape[0]
            check.worst_router = math.inf
            continue
        router_diff = pruned.router[layer] - ref_router
        router_rel = _relative(router_diff, ref_router)
        output_rel = _relative(pruned.outputs[layer] - ref_out, ref_out)
        top = ref_router.topk(min(top_k + 1, ref_router.shape[1]), dim=-1).values
        margin = top[:, top_k - 1] - top[:, top_k] if top.shape[1] > top_k else torch.full_like(top[:, 0], math.inf)
        near_tie = margin <= 2 * router_diff.abs().amax(dim=-1) + 1e-12
        router_bad = router_rel > tol.layer_rel
        output_bad = (output_rel > tol.layer_rel) & ~router_bad
        check.tokens += int(ref_out.shape[0])
        check.router_mismatches += int(router_bad.sum())
        check.expert_mismatches += int((output_bad & ~near_tie).sum())
        check.excused += int((output_bad & near_tie).sum())
        check.worst_router = max(check.worst_router, float(router_rel.max()) if router_rel.numel() else 0.0)
        check.worst_output = max(check.worst_output, float(output_rel.max()) if output_rel.numel() else 0.0)
    return into


def first_input_divergence(reference, pruned, tol: Tolerance) -> str:
    """Where two full forwards first part, when every MoE layer replays correctly: the first MoE
    block whose own input differs, else the head."""
    for layer in sorted(reference.inputs):
        ref, mine = reference.inputs[layer].float(), pruned.inputs.get(layer)
        if mine is None or mine.shape != ref.shape:
            return f"before the MoE block of layer {layer} (the pruned model has no matching block there)"
        rel = float(_relative(mine.float() - ref, ref).max()) if ref.numel() else 0.0
        if rel > tol.layer_rel:
            return (f"before the MoE block of layer {layer} (every MoE layer replays correctly, but its input "
                    f"differs by {rel:.2g} of scale: attention, norm or embedding weights, or a dense layer)")
    return ("after the last MoE block (every MoE layer replays correctly and receives the same input: "
            "final norm or lm_head weights differ)")
