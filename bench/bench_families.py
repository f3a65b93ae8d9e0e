"""REAP scoring cost per model family: one MoE layer at its real released shape, plain forward vs REAP.

Run on the GPU machine from the repository root (about a minute for every family on one H200):

    PYTHONUNBUFFERED=1 python3 bench/bench_families.py --out $OUT

``--tiny`` runs tiny shapes on the CPU (under a minute), to check the script.  Per family in ``FAMILY_SHAPES``:
the family's own transformers MoE block (router, experts, and a shared expert where the family has one),
built from its config class at the release's sizes with random weights (bf16 on the GPU), fed [1, T] tokens:

* plain: the block's forward (transformers' default experts kernel, grouped_mm);
* routed: the same forward with ``ReapObserver`` in routed mode attached (the family's ``routed_forward``,
  which keeps each routed pair's ||E_j(x)|| on the way, plus the float64 sums): the target is >= 0.75x plain;
* full: with the observer in full mode (every expert on every token);
* checks: the observed forward's output is bitwise the plain one, and the routed sums counted every token.

It prints a table and writes ``RESULTS_families.md`` and ``RESULTS_families.json`` to ``--out``.  Each phase
is bounded by ``--max-minutes`` (what is left is reported as skipped).  To add a family: one ``FamilyShape``
in ``FAMILY_SHAPES`` (its family value, the release it stands for, and a builder of the block).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scoring import Timer  # noqa: E402

from reap_vlm.families import GLM4V_MOE, LLAMA4, QWEN3_5_MOE, QWEN3_MOE, ModelFamily  # noqa: E402
from reap_vlm.score.hooks import ReapObserver, TokenMasks  # noqa: E402
from reap_vlm.score.stats import ExpertStats  # noqa: E402

TARGET = 0.75  # routed / plain
TINY = dict(hidden_size=64, moe_intermediate_size=48, num_experts=12, num_experts_per_tok=4)


def log(*args) -> None:
    print(*args, flush=True)


# ----------------------------------------------------------------------------------------------- the families


def qwen3_moe_block(tiny: bool) -> nn.Module:
    """Qwen3-30B-A3B: hidden 2048, 128 experts, top-8, expert width 768, renormalised top-k."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    sizes = TINY if tiny else dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8)
    return Qwen3MoeSparseMoeBlock(_experts_config(Qwen3MoeConfig(**sizes, norm_topk_prob=True, hidden_act="silu")))


def qwen3_5_moe_block(tiny: bool) -> nn.Module:
    """Qwen3.5-35B-A3B (transformers' defaults): hidden 2048, 256 experts, top-8, expert width 512, a shared
    expert of width 512 with its sigmoid gate."""
    from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeTextConfig
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeSparseMoeBlock

    sizes = (dict(TINY, shared_expert_intermediate_size=40) if tiny else
             dict(hidden_size=2048, moe_intermediate_size=512, shared_expert_intermediate_size=512, num_experts=256,
                  num_experts_per_tok=8))
    return Qwen3_5MoeSparseMoeBlock(_experts_config(Qwen3_5MoeTextConfig(**sizes, hidden_act="silu")))


def glm4v_moe_block(tiny: bool) -> nn.Module:
    """GLM-4.5V / 4.6V: hidden 4096, 128 experts, top-8, expert width 1408, one group (n_group 1, topk_group 1),
    routed_scaling_factor 1, renormalised; a shared expert of width 1408."""
    from transformers.models.glm4v_moe.configuration_glm4v_moe import Glm4vMoeTextConfig
    from transformers.models.glm4v_moe.modeling_glm4v_moe import Glm4vMoeTextMoE

    sizes = (dict(hidden_size=TINY["hidden_size"], moe_intermediate_size=TINY["moe_intermediate_size"],
                  n_routed_experts=TINY["num_experts"], num_experts_per_tok=TINY["num_experts_per_tok"]) if tiny else
             dict(hidden_size=4096, moe_intermediate_size=1408, n_routed_experts=128, num_experts_per_tok=8))
    return Glm4vMoeTextMoE(_experts_config(Glm4vMoeTextConfig(**sizes, n_shared_experts=1, n_group=1, topk_group=1,
                                                              routed_scaling_factor=1.0, norm_topk_prob=True,
                                                              hidden_act="silu")))


def llama4_block(tiny: bool) -> nn.Module:
    """Llama-4 Scout 17B-16E: hidden 5120, 16 experts, top-1, expert width 8192 (fused [E, H, 2I], every expert
    on every token with its gate-scaled input, as transformers runs it), a shared expert of width 8192."""
    from transformers.models.llama4.configuration_llama4 import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    sizes = (dict(hidden_size=TINY["hidden_size"], intermediate_size=TINY["moe_intermediate_size"],
                  num_local_experts=TINY["num_experts"] - 2, num_experts_per_tok=1) if tiny else
             dict(hidden_size=5120, intermediate_size=8192, num_local_experts=16, num_experts_per_tok=1))
    return Llama4TextMoe(Llama4TextConfig(**sizes, hidden_act="silu"))


def _experts_config(config):
    config._experts_implementation = "grouped_mm"  # transformers' default for a loaded model
    return config


@dataclass(frozen=True)
class FamilyShape:
    family: ModelFamily
    release: str  # the released model whose layer shape this is
    block: Callable[[bool], nn.Module]  # tiny -> the family's MoE block (built on the current default device)


FAMILY_SHAPES: dict[str, FamilyShape] = {
    "qwen3_moe": FamilyShape(QWEN3_MOE, "Qwen3-30B-A3B", qwen3_moe_block),
    "qwen3_5_moe": FamilyShape(QWEN3_5_MOE, "Qwen3.5-35B-A3B", qwen3_5_moe_block),
    "glm4v_moe": FamilyShape(GLM4V_MOE, "GLM-4.5V", glm4v_moe_block),
    "llama4": FamilyShape(LLAMA4, "Llama-4-Scout-17B-16E", llama4_block),
}


# ----------------------------------------------------------------------------------------------- timing


def init_block_(block: nn.Module, router_scale: float, router_weight: str = "gate.weight") -> None:
    """Random weights: the router (``router_weight``) at ``router_scale`` (routing spread over the experts as in
    trained models), every other weight at 0.02."""
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.normal_(0, router_scale if name == router_weight else 0.02)


def _output(result) -> torch.Tensor:
    """The block's hidden states (Llama-4's block also returns its router logits)."""
    return result[0] if isinstance(result, tuple) else result


def bench_family(name: str, shape: FamilyShape, args, device: torch.device, dtype: torch.dtype,
                 deadline: float) -> dict:
    torch.manual_seed(0)
    with torch.device(device):
        block = shape.block(args.tiny).to(dtype).eval().requires_grad_(False)
    init_block_(block, args.router_scale, f"{shape.family.router_module}.weight")
    timer = Timer(device)  # median of ``reps`` after 2 warm-up forwards
    family = shape.family
    experts = family.experts_of(block)
    num = experts.num_experts
    hidden_size = getattr(experts, "hidden_dim", None) or experts.hidden_size
    tokens = args.tokens
    x = torch.randn(1, tokens, hidden_size, device=device, dtype=dtype)
    masks = TokenMasks.of(torch.ones(1, tokens, device=device), torch.zeros(1, tokens, device=device))
    res = {"family": name, "release": shape.release, "experts": num, "hidden": hidden_size, "tokens": tokens,
           "weight_bytes": sum(p.numel() * p.element_size() for p in block.parameters())}
    log(f"\n== {name} ({shape.release}): {num} experts, hidden {hidden_size}, {tokens} tokens, "
        f"{res['weight_bytes'] / 2**30:.2f} GiB of weights")
    with torch.inference_mode():
        plain_out = _output(block(x))
        res["plain_s"] = timer(lambda: block(x), reps=args.reps)
        log(f"plain   {tokens / res['plain_s']:>12,.0f} tok/s")
        for mode in ("routed", "full"):
            if time.monotonic() > deadline:
                res[f"{mode}_skipped"] = "time"
                log(f"{mode:7s} skipped (--max-minutes)")
                continue
            stats = ExpertStats.empty([0], num, device)
            observer = ReapObserver(family, stats, mode)
            with observer.attached([(0, block)]):
                observer.use_masks(masks)
                out = block(x)
                res[f"{mode}_bitwise"] = bool(torch.equal(_output(out), plain_out))
                res[f"{mode}_s"] = timer(lambda: block(x), reps=args.reps)
            forwards = 1 + 2 + args.reps  # the check's, the warmup's, the timed ones
            res[f"{mode}_counted_every_token"] = int(stats.layers[0].n_tokens) == tokens * forwards
            res[f"{mode}_vs_plain"] = res["plain_s"] / res[f"{mode}_s"]
            log(f"{mode:7s} {tokens / res[f'{mode}_s']:>12,.0f} tok/s = {res[f'{mode}_vs_plain']:.2f} x plain "
                f"(output bitwise {res[f'{mode}_bitwise']})")
    res["routed_meets_target"] = res.get("routed_vs_plain", 0.0) >= TARGET
    return res


# ----------------------------------------------------------------------------------------------- report


def _tok(r: dict, mode: str) -> str:
    return f"{r['tokens'] / r[f'{mode}_s']:,.0f}" if f"{mode}_s" in r else "skipped"


def _ratio(r: dict, mode: str) -> str:
    return f"{r[f'{mode}_vs_plain']:.2f}" if f"{mode}_vs_plain" in r else "-"


def table(results: list[dict], device_name: str) -> str:
    lines = [f"# REAP cost per family, one MoE layer at the release's shape ({device_name})", "",
             f"routed / plain target: >= {TARGET}", "",
             "| family | release | experts | tokens | plain tok/s | routed tok/s | routed / plain | full tok/s | "
             "full / plain | bitwise, all counted | target |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r or "skipped" in r:
            lines.append(f"| {r['family']} | {r.get('release', '')} | | | {r.get('error') or r.get('skipped')} "
                         "| | | | | | |")
            continue

        bitwise = all(r.get(f"{m}_bitwise", True) and r.get(f"{m}_counted_every_token", True)
                      for m in ("routed", "full"))
        lines.append(f"| {r['family']} | {r['release']} | {r['experts']} | {r['tokens']} | {_tok(r, 'plain')} | "
                     f"{_tok(r, 'routed')} | {_ratio(r, 'routed')} | {_tok(r, 'full')} | {_ratio(r, 'full')} | "
                     f"{bitwise} | "
                     f"{'met' if r['routed_meets_target'] else 'MISSED'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-out", help="folder for RESULTS_families.md / .json")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (checks the script)")
    parser.add_argument("--families", default=",".join(FAMILY_SHAPES), help="comma-separated FAMILY_SHAPES keys")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per forward (8192 on the GPU)")
    parser.add_argument("--reps", type=int, default=None, help="timed forwards per figure (median)")
    parser.add_argument("--router-scale", type=float, default=0.05, help="router weight std")
    parser.add_argument("--max-minutes", type=float, default=3.0, help="stop starting new phases after this")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.tokens = args.tokens or (256 if args.tiny else 8192)
    args.reps = args.reps or (3 if args.tiny else 10)
    deadline = time.monotonic() + args.max_minutes * 60
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    log(f"device {device_name}, {dtype}, {args.tokens} tokens, {args.reps} reps")
    results = []
    for name in [n for n in args.families.split(",") if n]:
        if name not in FAMILY_SHAPES:
            parser.error(f"--families: unknown {name!r} (known: {', '.join(FAMILY_SHAPES)})")
        if time.monotonic() > deadline:
            results.append({"family": name, "release": FAMILY_SHAPES[name].release, "skipped": "time"})
            continue
        try:
            results.append(bench_family(name, FAMILY_SHAPES[name], args, device, dtype, deadline))
        except torch.OutOfMemoryError as exc:
            results.append({"family": name, "release": FAMILY_SHAPES[name].release,
                            "error": f"out of memory ({str(exc).splitlines()[0][:80]})"})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = table(results, device_name)
    (out / "RESULTS_families.md").write_text(text)
    (out / "RESULTS_families.json").write_text(json.dumps({"device": device_name, "dtype": str(dtype),
                                                           "target": TARGET, "results": results}, indent=2))
    log("\n" + text)
    log(f"written {out / 'RESULTS_families.md'} and .json")
    return results


if __name__ == "__main__":
    main()
