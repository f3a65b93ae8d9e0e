"""REAP scoring speed at the real Qwen3-VL-MoE layer shapes, and layer-wise streaming from disk.

Run on the GPU machine from the repository root:

    PYTHONUNBUFFERED=1 python3 bench/bench_scoring.py --out $OUT

(``--small`` / ``--tiny`` runs tiny shapes on the CPU, to debug the script.)  It prints a table and writes the
numbers to ``<out>/bench_scoring.json``.

Per layer shape (30B-A3B: hidden 2048, 128 experts top-8, moe_intermediate 768; 235B-A22B: hidden 4096,
64 heads / 4 KV, moe_intermediate 1536), one transformers ``Qwen3VLMoeTextDecoderLayer`` with random
bf16 weights on the GPU, batches of [B, S] tokens:

* plain forward (experts "grouped_mm", transformers' default) and with eager experts: tokens/s;
* REAP routed and full: the same forward with ``ReapObserver`` attached (LayerStats included);
* the full mode's all-experts computation alone (``all_expert_norms``), its matmuls alone, and the
  paper-style observer (Python loop over experts on all tokens into an fp32 [E, T, H] buffer), the
  paper's hook as published (that loop plus its per-expert statistics loop), and the paper's pipeline
  per layer (``PaperPipeline``: the eager-experts layer forward with that hook, its gc.collect() after
  every call included, and without it); achieved TFLOP/s against a large bf16 matmul timed in the same run;
* peak GPU memory of each;
* checks on the GPU: the routed forward's output is bitwise the experts' own; the norms match a
  float64 brute force.

Layer-wise streaming: a synthetic checkpoint of a few full-width layers (official disk layout,
gate_up_proj [E, H, 2I]) is written to ``--workdir``, evicted from the page cache, and run through
``LayerwiseModel.run_layers`` (the engine's own loop: background reads, pinned host prefetch, one
layer on the GPU): per-layer wall time, disk read GB/s, host->device GB/s, peak GPU memory against one
layer's weights + activations, host RSS after each layer.  Finally a projection for Qwen3-VL-235B,
300 samples x 2048 tokens on this GPU.

``--quant awq,fp8`` (any of awq, fp8, compressed-tensors): the same layers are also written as that
quantized checkpoint (``reap_vlm.fixtures.quantized.quantize_checkpoint_by_layer`` on the GPU: per-expert
quantized Linears plus attention q/k/v/o, router and norms bf16; AWQ group 128, FP8 blocks 128x128) and
streamed the same way (``--quant-modes``, default routed; the loader dequantizes on the GPU: with prefetch
host from the quantized tensors read ahead into pinned memory, once the previous layer is freed, with
``@device`` ahead on a side stream), with the same inputs: seconds per layer, GB/s of quantized bytes, peak
GPU memory against one bf16 layer + activations, the peak of loading one quantized layer alone, how far the
REAP scores are from the bf16 run's, and whether the two prefetch modes give identical scores.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reap_vlm.checkpoint.reader import Checkpoint  # noqa: E402
from reap_vlm.families import QWEN3_VL_MOE  # noqa: E402
from reap_vlm.score import triton_experts  # noqa: E402
from reap_vlm.score.hooks import ReapObserver, TokenMasks  # noqa: E402
from reap_vlm.score.layer_loader import LayerLoader  # noqa: E402
from reap_vlm.score.layerwise import BatchState, LayerwiseModel  # noqa: E402
from reap_vlm.score.norms import all_expert_norms  # noqa: E402
from reap_vlm.score.stats import ExpertStats  # noqa: E402

QUANT_FORMATS = ("awq", "fp8", "compressed-tensors")
QUANT_DISK_SHARE = {"awq": 0.3, "fp8": 0.55, "compressed-tensors": 0.3}  # of the bf16 bytes, generously

SHAPES = {
    "30b": dict(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768),
    "235b": dict(hidden_size=4096, num_hidden_layers=94, num_attention_heads=64, num_key_value_heads=4, head_dim=128,
                 num_experts=128, num_experts_per_tok=8, moe_intermediate_size=1536),
    "tiny": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 num_experts=12, num_experts_per_tok=4, moe_intermediate_size=48),
}
GiB = 1 << 30


def log(*args):
    print(*args, flush=True)


# ----------------------------------------------------------------------------------------------- timing


class Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn, reps: int = 5, warmup: int = 2) -> float:
        """Median seconds of ``fn()``."""
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(reps):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)


def peak_of(device, fn) -> int:
    """Peak memory allocated while ``fn`` runs, above what was allocated before."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


class kernel_path:
    """Within: the full mode's kernels forced ("torch": the PyTorch bmm path, "triton": the fused kernels)."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.saved = os.environ.get("REAP_FULL_KERNEL")
        os.environ["REAP_FULL_KERNEL"] = self.name

    def __exit__(self, *exc):
        if self.saved is None:
            os.environ.pop("REAP_FULL_KERNEL", None)
        else:
            os.environ["REAP_FULL_KERNEL"] = self.saved


def matmul_peak(device, dtype, timer) -> float:
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = timer(lambda: a @ b, reps=10, warmup=3)
    return 2 * n ** 3 / t / 1e12


# ----------------------------------------------------------------------------------------------- one layer


def text_config(shape: dict, layers: int | None = None):
    from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeTextConfig

    half = shape["head_dim"] // 2
    section = [24, 20, 20] if shape["head_dim"] == 128 else [half - 2 * (half // 4), half // 4, half // 4]
    cfg = Qwen3VLMoeTextConfig(**{**shape, "num_hidden_layers": layers or shape["num_hidden_layers"]},
                               vocab_size=1024, intermediate_size=4 * shape["hidden_size"], hidden_act="silu",
                               rms_norm_eps=1e-6, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
                               rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": section,
                                                "mrope_interleaved": True})
    cfg._attn_implementation = "sdpa"
    cfg._experts_implementation = "grouped_mm"
    return cfg


def init_layer_(layer, gen_scale: float = 0.02, router_scale: float = 0.05):
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0, router_scale)
            else:
                p.normal_(0, gen_scale)


def make_inputs(cfg, batch: int, seq: int, device, dtype):
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextRotaryEmbedding

    hidden = torch.randn(batch, seq, cfg.hidden_size, device=device, dtype=dtype)
    rotary = Qwen3VLMoeTextRotaryEmbedding(cfg).to(device)
    pos = torch.arange(seq, device=device)[None, None].expand(3, batch, seq)
    cos, sin = rotary(hidden, pos)
    kwargs = {"attention_mask": None, "position_ids": None, "past_key_values": None, "position_embeddings": (cos, sin)}
    return hidden, kwargs


def expert_flops(cfg, tokens: int, experts: int | None = None) -> float:
    e = cfg.num_experts if experts is None else experts
    return 2.0 * 3 * cfg.hidden_size * cfg.moe_intermediate_size * e * tokens


def paper_style_norms(experts, x):
    """The paper's observer: a Python loop over experts on all tokens into an fp32 [E, T, H] buffer."""
    buf = torch.empty(experts.num_experts, x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    for e in range(experts.num_experts):
        gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
        buf[e] = torch.nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[e]).float()
    return torch.linalg.vector_norm(buf, dim=-1).T


def paper_observer(experts, x, router_logits, topk_ids):
    """The paper's observer hook as published (pruning metrics only): the loop into the fp32 buffer,
    then per expert the routed rows' norms, router weights and max activation, as its code does."""
    num = experts.num_experts
    activations = paper_style_buffer(experts, x)
    routing_weights = torch.softmax(router_logits, dim=1, dtype=torch.float)
    ean_sum = torch.zeros(num, device=x.device, dtype=torch.float64)
    reap = torch.zeros(num, device=x.device, dtype=torch.float32)
    max_act = torch.zeros(num, dtype=torch.float32)
    for i in range(num):
        active = (topk_ids == i).any(dim=-1)
        if not active.any():
            continue
        weights = routing_weights[active, i]
        norms = torch.linalg.norm(activations[i, active, :], dim=-1)
        ean_sum[i] = norms.sum()
        reap[i] = (norms * weights).mean()
        top = activations[i, active, :].max().to("cpu")
        if top > max_act[i]:
            max_act[i] = top
    return reap


class PaperPipeline:
    """The paper's scoring as its pruning script runs it, on one layer: the MoE block's forward with eager
    experts (the per-expert loop of the transformers release it targets) and its observer as a forward hook
    on the block, in the pruning-metrics-only setting that script passes.  Written from the published
    observer's behaviour (CerebrasResearch/reap, src/reap/observer.py): the experts are per-expert MLP
    modules (separate gate / up / down Linears; views of the fused weights here), every expert runs on all
    tokens into a zeroed float32 [E, T, H] buffer, the router logits are re-ranked with topk, then one
    Python loop over experts takes each one's routed rows (norms, router weights, maximum, with the host
    syncs that implies), the sums go to CPU state, and every call ends with gc.collect()."""

    def __init__(self, layer, collect: bool = True):
        self.block, self.top_k, self.collect = layer.mlp, layer.mlp.gate.top_k, collect
        self.experts = [self._expert(layer.mlp.experts, e) for e in range(layer.mlp.experts.num_experts)]
        self.state: dict = {}
        self.logits = None

    @staticmethod
    def _expert(fused, e: int) -> torch.nn.Module:
        inter = fused.gate_up_proj.shape[1] // 2
        mlp = torch.nn.Module()
        for name, weight in (("gate_proj", fused.gate_up_proj[e, :inter]), ("up_proj", fused.gate_up_proj[e, inter:]),
                             ("down_proj", fused.down_proj[e])):
            linear = torch.nn.Linear(1, 1, bias=False, device="meta")
            linear.weight = torch.nn.Parameter(weight, requires_grad=False)
            setattr(mlp, name, linear)
        act = fused.act_fn
        mlp.forward = lambda x: mlp.down_proj(act(mlp.gate_proj(x)) * mlp.up_proj(x))
        return mlp

    def attached(self):
        import contextlib

        @contextlib.contextmanager
        def hooks():
            handles = [self.block.gate.register_forward_hook(lambda m, a, out: setattr(self, "logits", out[0])),
                       self.block.register_forward_hook(self._observe)]
            try:
                yield self
            finally:
                for h in handles:
                    h.remove()
        return hooks()

    def _observe(self, module, args, output):
        flat = args[0].reshape(-1, args[0].shape[-1])
        num = len(self.experts)
        buf = torch.zeros(num, *flat.shape, device=flat.device)
        for e, expert in enumerate(self.experts):
            buf[e] = expert(flat)
        ids = torch.topk(self.logits, self.top_k, dim=-1).indices
        freq = torch.bincount(ids.reshape(-1), minlength=num)
        probs = torch.softmax(self.logits, dim=1, dtype=torch.float)
        ean = torch.zeros(num, dtype=torch.float64, device=flat.device)
        weighted = torch.zeros_like(ean)
        reap = torch.zeros(num, dtype=torch.float32, device=flat.device)
        top = self.state.setdefault("max", torch.zeros(num))
        for e in range(num):
            rows = (ids == e).any(dim=-1)
            if not rows.any():
                continue
            norms = torch.linalg.norm(buf[e, rows], dim=-1)
            ean[e] = norms.sum()
            weighted[e] = (norms * probs[rows, e]).sum()
            reap[e] = (norms * probs[rows, e]).mean()
            peak = buf[e, rows].max().cpu()
            if peak > top[e]:
                top[e] = peak
        for name, value in (("freq", freq), ("ean", ean), ("weighted", weighted), ("reap", reap)):
            self.state[name] = self.state.get(name, 0) + value.cpu()
        del buf
        if self.collect:
            gc.collect()


def paper_style_buffer(experts, x):
    buf = torch.zeros(experts.num_experts, x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    for e in range(experts.num_experts):
        gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
        buf[e] = torch.nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[e])
    return buf


def mm_variant_norms(experts, x):
    """Alternative full-mode formulation: one [T, H] x [H, E*2I] matmul, then a strided bmm."""
    gate_up, down = experts.gate_up_proj, experts.down_proj
    e, two_i, h = gate_up.shape
    hh = torch.mm(x, gate_up.reshape(e * two_i, h).t()).view(x.shape[0], e, two_i)
    act = experts._apply_gate(hh).transpose(0, 1)  # [E, T, I] strided
    del hh
    y = torch.bmm(act, down.transpose(1, 2))
    return torch.linalg.vector_norm(y, dim=-1, dtype=torch.float32).T


def bench_layer(name: str, shape: dict, args, device, dtype, timer, peak_tflops) -> dict:
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextDecoderLayer

    cfg = text_config(shape)
    with torch.device(device):
        layer = Qwen3VLMoeTextDecoderLayer(cfg, 0).to(dtype).eval().requires_grad_(False)
    init_layer_(layer)
    weights = sum(p.numel() * p.element_size() for p in layer.parameters())
    batch, seq = max(1, args.tokens // args.seq), args.seq
    tokens = batch * seq
    hidden, kwargs = make_inputs(cfg, batch, seq, device, dtype)
    experts = layer.mlp.experts
    family = QWEN3_VL_MOE
    res = {"shape": name, "tokens": tokens, "batch": [batch, seq], "layer_weight_bytes": weights}
    log(f"\n== {name}: layer weights {weights / GiB:.2f} GiB, {batch} x {seq} tokens")

    masks = TokenMasks.of(torch.ones(batch, seq, device=device), torch.zeros(batch, seq, device=device))

    def run_plain():
        return layer(hidden, **kwargs)

    with torch.inference_mode():
        # checks first: a wrong fast path is worth nothing
        x = torch.nn.functional.rms_norm(hidden.reshape(-1, cfg.hidden_size)[:2048], (cfg.hidden_size,))
        _, w, ids = layer.mlp.gate(x)
        own = experts(x, ids, w)
        out, norms, _ = family.routed_forward(experts, x, ids, w)
        res["check_routed_output_bitwise"] = bool(torch.equal(out, own))
        probe = x[:256]
        ref = torch.stack([torch.linalg.vector_norm(
            family.expert_outputs(experts, probe, torch.tensor([e], device=device))[0].double(), dim=-1)
            for e in range(experts.num_experts)], dim=1)
        res["triton_available"] = triton_experts.available(experts, probe)
        full = all_expert_norms(family, experts, probe)
        res["triton_used"] = res["triton_available"] and not triton_experts._state["broken"]
        res["triton_broken"] = triton_experts._state["broken"]
        res["check_full_norms_max_rel_err"] = float(((full.double() - ref).abs() / ref).max())
        with kernel_path("torch"):
            full_t = all_expert_norms(family, experts, probe)
        res["check_full_norms_torch_max_rel_err"] = float(((full_t.double() - ref).abs() / ref).max())
        res["check_full_norms_mean_rel_err"] = float(((full.double() - ref).abs() / ref).mean())
        res["check_full_norms_torch_mean_rel_err"] = float(((full_t.double() - ref).abs() / ref).mean())
        del full_t
        res["check_routed_norms_max_rel_err"] = float(((norms[:64].double() - ref.gather(1, ids[:64])).abs()
                                                       / ref.gather(1, ids[:64])).max())
        log(f"checks: routed output bitwise {res['check_routed_output_bitwise']}, full norms rel err "
            f"{res['check_full_norms_max_rel_err']:.2e} (triton used {res['triton_used']}, "
            f"{res['triton_broken']}; torch path {res['check_full_norms_torch_max_rel_err']:.2e}), "
            f"routed norms rel err {res['check_routed_norms_max_rel_err']:.2e}")
        del own, out, norms, full, ref

        t = timer(run_plain, reps=args.reps)
        res["plain_tok_s"] = tokens / t
        res["plain_peak_bytes"] = peak_of(device, run_plain)
        cfg._experts_implementation = "eager"
        res["plain_eager_tok_s"] = tokens / timer(run_plain, reps=max(2, args.reps // 2), warmup=1)
        cfg._experts_implementation = "grouped_mm"
        log(f"plain forward: {res['plain_tok_s']:,.0f} tok/s (eager experts {res['plain_eager_tok_s']:,.0f})")

        for mode in ("routed", "full"):
            stats = ExpertStats.empty([0], cfg.num_experts, device)
            observer = ReapObserver(family, stats, mode)
            with observer.attached([(0, layer.mlp)]):
                observer.use_masks(masks)
                t = timer(run_plain, reps=args.reps)
                res[f"{mode}_tok_s"] = tokens / t
                res[f"{mode}_vs_plain"] = res[f"{mode}_tok_s"] / res["plain_tok_s"]
                res[f"{mode}_peak_bytes"] = peak_of(device, run_plain)
            log(f"REAP {mode}: {res[f'{mode}_tok_s']:,.0f} tok/s = {res[f'{mode}_vs_plain']:.2f} x plain, "
                f"peak {res[f'{mode}_peak_bytes'] / GiB:.2f} GiB above the layer and inputs")

        # the full mode's extra work alone, on the MoE input of every token
        x = torch.nn.functional.rms_norm(hidden.reshape(-1, cfg.hidden_size), (cfg.hidden_size,))
        flops = expert_flops(cfg, tokens)
        t = timer(lambda: all_expert_norms(family, experts, x), reps=args.reps)
        res["full_norms_tok_s"] = tokens / t
        res["full_norms_tflops"] = flops / t / 1e12
        t = timer(lambda: mm_variant_norms(experts, x), reps=args.reps)
        res["full_norms_mm_variant_tflops"] = flops / t / 1e12
        if res["triton_available"]:
            with kernel_path("triton"):
                t = timer(lambda: all_expert_norms(family, experts, x), reps=args.reps)
                res["full_norms_triton_tflops"] = flops / t / 1e12
        res["full_path_chosen"] = triton_experts._choice.get(
            (tuple(experts.gate_up_proj.shape), x.dtype, str(x.device)), "bmm")
        with kernel_path("torch"):
            t = timer(lambda: all_expert_norms(family, experts, x), reps=args.reps)
            res["full_norms_torch_tok_s"] = tokens / t
            res["full_norms_torch_tflops"] = flops / t / 1e12
            res["full_norms_torch_peak_bytes"] = peak_of(device, lambda: all_expert_norms(family, experts, x))
            stats = ExpertStats.empty([0], cfg.num_experts, device)
            observer = ReapObserver(family, stats, "full")
            with observer.attached([(0, layer.mlp)]):
                observer.use_masks(masks)
                res["full_torch_tok_s"] = tokens / timer(run_plain, reps=args.reps)
        # the two matmuls alone (no activation, no norm): the cuBLAS ceiling of this formulation
        chunk = min(tokens, 4096)
        res["full_matmuls_only_tflops"] = expert_flops(cfg, chunk) / timer(
            _two_matmuls(experts, x[:chunk]), reps=args.reps) / 1e12
        res["full_norms_peak_bytes"] = peak_of(device, lambda: all_expert_norms(family, experts, x))
        if not args.skip_baseline:
            bt = min(tokens, args.baseline_tokens)
            t = timer(lambda: paper_style_norms(experts, x[:bt]), reps=2, warmup=1)
            res["paper_style_tok_s"] = bt / t
            res["paper_style_tflops"] = expert_flops(cfg, bt) / t / 1e12
            res["full_vs_paper_style"] = res["full_norms_tok_s"] / res["paper_style_tok_s"]
            logits, _, ids = layer.mlp.gate(x[:bt])
            t = timer(lambda: paper_observer(experts, x[:bt], logits, ids), reps=2, warmup=1)
            res["paper_observer_tok_s"] = bt / t
            res["full_vs_paper_observer"] = res["full_norms_tok_s"] / res["paper_observer_tok_s"]
            # what 5x the loop would take: the loop's achieved rate times five, against the measured peak
            res["paper_style_5x_needs_peak_share"] = 5 * res["paper_style_tflops"] / peak_tflops
            cfg._experts_implementation = "eager"
            with PaperPipeline(layer).attached():
                res["paper_pipeline_tok_s"] = tokens / timer(run_plain, reps=2, warmup=1)
                t0 = time.perf_counter()
                gc.collect()
                res["gc_collect_ms"] = (time.perf_counter() - t0) * 1e3
            with PaperPipeline(layer, collect=False).attached():
                res["paper_pipeline_nogc_tok_s"] = tokens / timer(run_plain, reps=2, warmup=1)
            cfg._experts_implementation = "grouped_mm"
            res["full_vs_paper_pipeline"] = res["full_tok_s"] / res["paper_pipeline_tok_s"]
            res["full_vs_paper_pipeline_nogc"] = res["full_tok_s"] / res["paper_pipeline_nogc_tok_s"]
        log(f"all-experts norms, torch bmm path: {res['full_norms_torch_tok_s']:,.0f} tok/s, "
            f"{res['full_norms_torch_tflops']:.0f} TFLOP/s; REAP full with it {res['full_torch_tok_s']:,.0f} tok/s")
        log(f"all-experts norms: {res['full_norms_tok_s']:,.0f} tok/s, {res['full_norms_tflops']:.0f} TFLOP/s "
            f"({res['full_norms_tflops'] / peak_tflops:.0%} of peak; matmuls alone "
            f"{res['full_matmuls_only_tflops']:.0f}; mm variant {res['full_norms_mm_variant_tflops']:.0f}); "
            f"paper-style loop {res.get('paper_style_tok_s', float('nan')):,.0f} tok/s, "
            f"paper observer hook {res.get('paper_observer_tok_s', float('nan')):,.0f} tok/s")
        res["activations_bytes"] = hidden.numel() * hidden.element_size()
    return res


def _two_matmuls(experts, x):
    xe = x.unsqueeze(0).expand(experts.num_experts, -1, -1)
    act = torch.randn(experts.num_experts, x.shape[0], experts.down_proj.shape[-1], device=x.device, dtype=x.dtype)

    def run():
        torch.bmm(xe, experts.gate_up_proj.transpose(1, 2))
        torch.bmm(act, experts.down_proj.transpose(1, 2))

    return run


# ----------------------------------------------------------------------------------------------- layer-wise


def write_checkpoint(folder: Path, shape: dict, layers: int, device, dtype) -> int:
    """A Qwen3-VL-MoE checkpoint folder holding ``layers`` full-width decoder layers (official disk layout,
    one shard per layer), random bf16 weights; returns the bytes written."""
    from safetensors.torch import save_file
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextDecoderLayer

    from reap_vlm.fixtures.tiny import FixtureSpec, fixture_config

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    spec = FixtureSpec(hidden_size=shape["hidden_size"], moe_intermediate_size=shape["moe_intermediate_size"],
                       intermediate_size=4 * shape["hidden_size"], num_hidden_layers=layers,
                       num_attention_heads=shape["num_attention_heads"],
                       num_key_value_heads=shape["num_key_value_heads"], head_dim=shape["head_dim"],
                       num_experts=shape["num_experts"], num_experts_per_tok=shape["num_experts_per_tok"],
                       vision_depth=1, deepstack_visual_indexes=(), dtype="bfloat16")
    ids = {"<|endoftext|>": 0, "<|im_end|>": 1, "<|image_pad|>": 2, "<|video_pad|>": 3, "<|vision_start|>": 4,
           "<|vision_end|>": 5, "__size__": 1000}
    config = fixture_config(spec, ids)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    cfg = text_config(shape, layers)
    weight_map, total = {}, 0
    for i in range(layers):
        with torch.device(device):
            layer = Qwen3VLMoeTextDecoderLayer(cfg, i).to(dtype).requires_grad_(False)
        init_layer_(layer)
        state = {f"model.language_model.layers.{i}.{k}": v for k, v in layer.state_dict().items()}
        state = QWEN3_VL_MOE.to_checkpoint_layout(state, per_expert=False)
        state = {k: v.contiguous().cpu() for k, v in state.items()}
        shard = f"model-{i + 1:05d}-of-{layers:05d}.safetensors"
        save_file(state, str(folder / shard), metadata={"format": "pt"})
        for key, tensor in state.items():
            weight_map[key] = shard
            total += tensor.numel() * tensor.element_size()
        del layer, state
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def evict(folder: Path) -> None:
    """Drop the folder's files from the page cache, so reads come from the disk."""
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read_gbps(folder: Path) -> float:
    evict(folder)
    files = sorted(folder.glob("*.safetensors"))
    t0, n = time.perf_counter(), 0
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(64 << 20):
                n += len(chunk)
    return n / (time.perf_counter() - t0) / 1e9


class _Probe:
    """``on_layer`` callback: wall time per layer, host RSS after each, and each layer's peak GPU memory
    (the first layer's includes the one-time choices: kernel autotuning, the full mode's path)."""

    def __init__(self, device):
        self.device = device
        self.mark, self.times, self.rss, self.peaks = time.perf_counter(), [], [], []

    def __call__(self, layer: int) -> None:
        now = time.perf_counter()
        self.times.append(now - self.mark)
        self.mark = now
        self.rss.append(rss_bytes())
        if self.device.type == "cuda":
            self.peaks.append(torch.cuda.max_memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def bench_layerwise(name: str, shape: dict, layers: int, modes, args, device, dtype, layer_res: dict) -> dict:
    folder = Path(args.workdir) / f"synthetic-{name}"
    t0 = time.perf_counter()
    written = write_checkpoint(folder, shape, layers, device, dtype)
    write_s = time.perf_counter() - t0
    res = {"shape": name, "layers": layers, "bytes_on_disk": written, "write_gbps": written / write_s / 1e9}
    res["raw_read_gbps"] = raw_read_gbps(folder)
    log(f"\n== layer-wise {name}: {layers} layers, {written / 1e9:.1f} GB written at {res['write_gbps']:.2f} GB/s; "
        f"raw read {res['raw_read_gbps']:.2f} GB/s")
    ckpt = Checkpoint(folder)
    quant_modes = [m for m in args.quant_modes.split("+") if m] if args.quant else []
    modes = list(modes) + [m for m in quant_modes if m not in modes]  # the bf16 run each quantized one is held to
    stats_of = {}
    for entry in modes:
        r, stats_of[entry] = stream_layers(ckpt, folder, name, entry, layers, shape, args, device, dtype, layer_res)
        res[entry] = r
    bf16_layer_bytes = res[modes[0]]["layer_bytes"]
    res["quant"] = {}
    for fmt in args.quant:
        res["quant"][fmt] = bench_quantized(name, fmt, folder, layers, shape, quant_modes, res, stats_of,
                                            bf16_layer_bytes, args, device, dtype, layer_res)
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return res


def stream_layers(ckpt: Checkpoint, folder: Path, name: str, entry: str, layers: int, shape: dict, args, device,
                  dtype, layer_res: dict, label: str | None = None) -> tuple[dict, ExpertStats]:
    """One layer-wise pass of the group over every layer of ``ckpt`` (``entry``: mode[@prefetch]); every pass
    gets the same inputs (seeded), so the scores of two checkpoints can be compared."""
    mode, _, prefetch = entry.partition("@")
    prefetch = prefetch or args.prefetch
    cfg_shape = text_config(shape, layers)
    batch, seq = max(1, args.lw_tokens // args.seq // args.lw_batches), args.seq
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    lw = LayerwiseModel(ckpt, device, dtype)
    group = []
    torch.manual_seed(1234)
    with torch.inference_mode():
        for _ in range(args.lw_batches):
            hidden, kwargs = make_inputs(cfg_shape, batch, seq, device, dtype)
            masks = TokenMasks.of(torch.ones(batch, seq, device=device), torch.zeros(batch, seq, device=device))
            group.append(BatchState(hidden, [kwargs] * layers, {}, masks, batch * seq))  # one per layer
    group_bytes = sum(b.nbytes() for b in group)
    stats = ExpertStats.empty(list(range(layers)), shape["num_experts"], device)
    observer = ReapObserver(QWEN3_VL_MOE, stats, mode)
    loader = LayerLoader(ckpt, lw.layer_keys, lw.device, dtype, prefetch)
    evict(folder)
    probe = _Probe(device)
    triton_experts._choice.clear()  # decided inside the run, as in a real one (the first full-mode chunk)

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = probe.mark = time.perf_counter()
    with observer.attached(QWEN3_VL_MOE.moe_blocks(lw.model)), torch.inference_mode():
        loader.request(0)
        lw.run_layers(group, observer, loader, layers - 1, on_host=False, desc=f"{name} {label or entry}",
                      on_layer=probe)
    layer_times, rss = probe.times, probe.rss
    wall = time.perf_counter() - t0
    loader.close()
    peaks = [p - base + group_bytes for p in probe.peaks]
    peak = max(peaks, default=0)
    layer_bytes = lw.layer_bytes(0)
    transient = layer_res.get(f"{mode}_peak_bytes", 0) * (batch * seq) / max(layer_res.get("tokens", 1), 1)
    allowance = layer_bytes + group_bytes + transient
    tokens = args.lw_batches * batch * seq
    s = loader.stats
    r = {
        "tokens": tokens, "wall_s": wall, "per_layer_s": statistics.median(layer_times),
        "layer_times_s": layer_times, "tok_s_per_layer": tokens * layers / wall,
        # safetensors maps lazily: the disk is read while pinning, so both stages count
        "read_gbps": s.bytes / max(s.read_seconds + s.pin_seconds, 1e-9) / 1e9,
        "stream_gbps": layer_bytes / statistics.median(layer_times) / 1e9,
        # with prefetch "device" the copy runs on a side stream, off this clock: no rate to report
        "h2d_gbps": s.bytes / max(s.copy_seconds, 1e-9) / 1e9 if loader.prefetch == "host" else float("nan"),
        "read_seconds": s.read_seconds, "copy_seconds": s.copy_seconds, "wait_seconds": s.wait_seconds,
        "pin_seconds": s.pin_seconds,
        "layer_bytes": layer_bytes, "group_bytes": group_bytes, "peak_gpu_bytes": peak,
        "one_layer_plus_activations_bytes": allowance, "peak_over_allowance": peak / max(allowance, 1),
        "peak_gpu_bytes_per_layer": peaks,
        "peak_over_allowance_later_layers": max(peaks[1:], default=0) / max(allowance, 1),
        "rss_after_layer": rss, "rss_growth_bytes": (rss[-1] - rss[0]) if rss else 0,
        "prefetch": loader.prefetch,
    }
    log(f"{label or entry} (prefetch {loader.prefetch}): {wall:.2f} s for {layers} layers x {tokens} tokens; "
        f"per layer {r['per_layer_s']:.3f} s; "
        f"streamed {r['stream_gbps']:.2f} GB/s (loader {r['read_gbps']:.2f}), h2d {r['h2d_gbps']:.1f} GB/s, "
        f"waited {s.wait_seconds:.2f} s; "
        f"peak GPU {peak / GiB:.2f} GiB vs layer+activations {allowance / GiB:.2f} GiB "
        f"({r['peak_over_allowance']:.2f}x; per layer {[round(x / GiB, 2) for x in peaks]}); "
        f"RSS per layer {[round(x / GiB, 2) for x in rss]} GiB")
    del group, lw, observer
    return r, stats


def score_difference(got: ExpertStats, ref: ExpertStats, keep: float = 0.5) -> dict:
    """How far ``got``'s REAP scores are from ``ref``'s: the largest difference over each layer's largest
    score, the median per-expert relative difference, and the share of the experts that the top-``keep``
    selections of the two share."""
    worst, rel, shared, total = 0.0, [], 0, 0
    for layer, r in ref.layers.items():
        a = got.layers[layer].metrics()["reap"].double().cpu()
        b = r.metrics()["reap"].double().cpu()
        worst = max(worst, float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)))
        seen = b > 0
        rel.append((a - b).abs()[seen] / b[seen])
        k = max(1, round(len(b) * keep))
        shared += len(set(a.topk(k).indices.tolist()) & set(b.topk(k).indices.tolist()))
        total += k
    rel = torch.cat(rel) if rel else torch.zeros(1, dtype=torch.float64)
    return {"reap_max_rel_diff": worst, "reap_median_rel_diff": float(rel.median()),
            "reap_max_rel_diff_per_expert": float(rel.max()), "keep_set_agreement": shared / max(total, 1)}


def quant_options(args) -> dict:
    return {"group_size": args.quant_group_size, "block": (args.quant_block, args.quant_block)}


def bench_quantized(name: str, fmt: str, folder: Path, layers: int, shape: dict, modes: list[str], res: dict,
                    stats_of: dict, bf16_layer_bytes: int, args, device, dtype, layer_res: dict) -> dict:
    """The same layers written as a ``fmt`` checkpoint (reap_vlm.fixtures.quantized: per-expert quantized Linears
    and attention q/k/v/o, the rest bf16, as the releases are), then streamed and scored like the bf16 ones."""
    from reap_vlm.checkpoint.tensors import memory_state_dict
    from reap_vlm.fixtures.quantized import quantize_checkpoint_by_layer

    qfolder = Path(args.workdir) / f"synthetic-{name}-{fmt}"
    if qfolder.exists():
        shutil.rmtree(qfolder)
    t0 = time.perf_counter()
    quantize_checkpoint_by_layer(folder, qfolder, fmt, device=str(device),
                                 chunk_bytes=(4 if device.type == "cuda" else 1) * GiB, **quant_options(args))
    quantize_s = time.perf_counter() - t0
    qckpt = Checkpoint(qfolder)
    shard_bytes = {s: (qfolder / s).stat().st_size for s in qckpt.shards}
    per_layer = [sum(shard_bytes[s] for s in {qckpt.weight_map[k] for k in keys})
                 for _, keys in sorted(qckpt.family.keys_by_layer(qckpt.weight_map).items())]
    q = {"format": fmt, **{k: list(v) if isinstance(v, tuple) else v for k, v in quant_options(args).items()},
         "quantize_write_s": quantize_s, "quantize_write_s_per_layer": quantize_s / layers,
         "quantized_layer_bytes": statistics.median(per_layer), "bf16_layer_bytes": bf16_layer_bytes,
         "raw_read_gbps": raw_read_gbps(qfolder)}
    log(f"\n== layer-wise {name} {fmt}: quantized and written in {quantize_s:.1f} s "
        f"({q['quantize_write_s_per_layer']:.2f} s/layer on {device.type}); "
        f"{q['quantized_layer_bytes'] / 1e9:.3f} GB per layer on disk "
        f"({q['quantized_layer_bytes'] / max(res[modes[0]]['layer_bytes'], 1):.2f} x bf16); "
        f"raw read {q['raw_read_gbps']:.2f} GB/s")

    # Loading one quantized layer alone (memory_state_dict on the device: dequantized straight into the fused
    # expert tensors): its peak against the bf16 layer it makes.
    layer0 = qckpt.family.keys_by_layer(qckpt.weight_map)[0]
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        holder = {}
        q["load_one_layer_peak_bytes"] = peak_of(
            device, lambda: holder.update(memory_state_dict(qckpt, layer0, dtype, str(device))))
        q["load_one_layer_state_bytes"] = sum(t.numel() * t.element_size() for t in holder.values())
        q["load_one_layer_peak_over_layer"] = q["load_one_layer_peak_bytes"] / max(bf16_layer_bytes, 1)
        del holder
        log(f"loading one layer on the GPU: peak {q['load_one_layer_peak_bytes'] / GiB:.2f} GiB for a "
            f"{bf16_layer_bytes / GiB:.2f} GiB bf16 layer ({q['load_one_layer_peak_over_layer']:.2f}x)")

    quant_stats = {}
    for entry in modes:
        r, stats = stream_layers(qckpt, qfolder, name, entry, layers, shape, args, device, dtype, layer_res,
                                 label=f"{fmt} {entry}")
        ref = res[entry]
        r["stream_gbps_quantized"] = q["quantized_layer_bytes"] / r["per_layer_s"] / 1e9
        r["bf16_layer_plus_activations_bytes"] = ref["one_layer_plus_activations_bytes"]
        r["peak_over_bf16_allowance"] = r["peak_gpu_bytes"] / max(ref["one_layer_plus_activations_bytes"], 1)
        r["per_layer_s_bf16"] = ref["per_layer_s"]
        r.update(score_difference(stats, stats_of[entry]))
        log(f"{fmt} {entry}: {r['per_layer_s']:.3f} s/layer (bf16 {ref['per_layer_s']:.3f}), streamed "
            f"{r['stream_gbps_quantized']:.2f} GB/s of quantized bytes; peak GPU {r['peak_gpu_bytes'] / GiB:.2f} GiB "
            f"= {r['peak_over_bf16_allowance']:.2f} x one bf16 layer + activations; REAP vs bf16: max rel diff "
            f"{r['reap_max_rel_diff']:.2e} (of the layer's largest), "
            f"median per expert {r['reap_median_rel_diff']:.2e}, "
            f"keep-set agreement {r['keep_set_agreement']:.1%}")
        q[entry] = r
        quant_stats[entry] = stats
    # the two ways of loading (dequantized in take() from pinned host memory, or ahead on a side stream)
    # must give the same scores: the same dequantization on the same device
    for entry in modes:
        mode, _, prefetch = entry.partition("@")
        other = f"{mode}@device" if prefetch != "device" else None
        if other in quant_stats:
            same = score_difference(quant_stats[entry], quant_stats[other])["reap_max_rel_diff"] == 0.0
            q[f"{mode}_host_equals_device_prefetch"] = same
            log(f"{fmt} {mode}: prefetch host and device give identical scores: {same}")
    del quant_stats
    if not args.keep:
        shutil.rmtree(qfolder, ignore_errors=True)
    return q


# ----------------------------------------------------------------------------------------------- projection


def project(layer_res: dict, lw_res: dict | None, shape: dict, samples: int, seq: int) -> dict:
    """Qwen3-VL-235B over ``samples`` x ``seq`` tokens on this GPU, one group (hidden states on the GPU)."""
    tokens = samples * seq
    layers = shape["num_hidden_layers"]
    h, i, e = shape["hidden_size"], shape["moe_intermediate_size"], shape["num_experts"]
    heads, kv, hd = shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"]
    layer_bytes = 2 * (3 * e * h * i + e * h + (heads + 2 * kv) * hd * h + heads * hd * h + 2 * h + 2 * hd)
    out = {"tokens": tokens, "layers": layers, "layer_bytes": layer_bytes, "model_bytes": layer_bytes * layers,
           "hidden_states_bytes": tokens * h * 2}
    # Streaming rate: what the engine's own loop achieved in its disk-bound routed run (layer bytes over
    # median seconds per layer), else the raw disk read.
    routed = (lw_res or {}).get("routed", {})
    rate = routed["layer_bytes"] / routed["per_layer_s"] / 1e9 if routed else (lw_res or {}).get("raw_read_gbps", 0)
    out["stream_gbps"] = rate
    h2d = routed.get("h2d_gbps", 20.0)
    disk_s = layer_bytes / (rate * 1e9) if rate else float("nan")
    copy_s = layer_bytes / (h2d * 1e9)
    for mode in ("routed", "full"):
        compute_s = tokens / layer_res[f"{mode}_tok_s"]
        per_layer = max(compute_s + copy_s, disk_s)  # reads run on while the GPU copies and computes
        out[mode] = {"compute_s_per_layer": compute_s, "disk_s_per_layer": disk_s, "h2d_s_per_layer": copy_s,
                     "wall_s": per_layer * layers, "wall_min": per_layer * layers / 60,
                     "bound": "disk" if disk_s > compute_s + copy_s else "compute"}
    return out


# ----------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="30b,235b", help='per-layer section shapes ("": skip that section)')
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per timed layer call")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--baseline-tokens", type=int, default=8192)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--disk-layers", default="30b:6,235b:3", help="layer-wise streaming: shape:layers,...")
    parser.add_argument("--lw-modes", default="30b:routed+full+routed@device,235b:routed",
                        help="shape:mode[@prefetch]+...,...")
    parser.add_argument("--lw-tokens", type=int, default=16384, help="tokens in the layer-wise group")
    parser.add_argument("--lw-batches", type=int, default=4)
    parser.add_argument("--prefetch", default="host", choices=("host", "device"))
    parser.add_argument("--workdir", default="/tmp/reap_bench")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--quant", action="append", default=[],
                        help="also write the layer-wise layers as a quantized checkpoint and stream + score it: "
                             f"{', '.join(QUANT_FORMATS)} (comma list or repeated)")
    parser.add_argument("--quant-modes", default="routed", help="modes run on the quantized checkpoints: mode+...")
    parser.add_argument("--quant-group-size", type=int, default=128, help="AWQ / compressed-tensors group size")
    parser.add_argument("--quant-block", type=int, default=128, help="fp8 weight_block_size (square)")
    parser.add_argument("--small", "--tiny", action="store_true", help="tiny shapes on the CPU (debugging)")
    args = parser.parse_args()
    args.quant = [f for item in args.quant for f in item.split(",") if f]
    unknown = [f for f in args.quant if f not in QUANT_FORMATS]
    if unknown:
        parser.error(f"--quant {unknown[0]!r} is not one of {', '.join(QUANT_FORMATS)}")

    if args.small:
        args.shapes, args.tokens, args.seq, args.reps = "tiny" if args.shapes else "", 256, 64, 2
        args.disk_layers, args.lw_modes = "tiny:3", "tiny:routed+full+routed@device"
        args.lw_tokens, args.baseline_tokens = 512, 256
        args.quant_group_size, args.quant_block = 16, 32
    device = torch.device("cuda" if torch.cuda.is_available() and not args.small else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    timer = Timer(device)
    torch.manual_seed(0)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "dtype": str(dtype)}
    import transformers

    info["transformers"] = transformers.__version__
    peak = matmul_peak(device, dtype, timer)
    info["matmul_peak_tflops"] = peak
    log(f"{info}\nlarge bf16 matmul: {peak:.0f} TFLOP/s")

    results = {"info": info, "layers": {}, "layerwise": {}, "projection": {}}
    shapes = [x for x in args.shapes.split(",") if x]  # "": no per-layer section (layer-wise only)
    for name in shapes:
        results["layers"][name] = bench_layer(name, SHAPES[name], args, device, dtype, timer, peak)
        json_dump(results, args.out)
    lw_modes = dict(x.split(":") for x in args.lw_modes.split(",") if x)
    for item in args.disk_layers.split(","):
        if not item:
            continue
        name, n = item.split(":")
        shape = SHAPES[name]
        need = int(n) * 2 * 3 * shape["num_experts"] * shape["hidden_size"] * shape["moe_intermediate_size"] * 1.1
        need *= 1 + sum(QUANT_DISK_SHARE[f] for f in args.quant)  # the quantized copies sit beside the bf16 one
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(args.workdir).free
        if need > free * 0.8:
            n = max(1, int(free * 0.8 / (need / int(n))))
            log(f"disk: {free / 1e9:.0f} GB free, cutting {name} to {n} layers")
        results["layerwise"][name] = bench_layerwise(name, shape, int(n), lw_modes.get(name, "routed").split("+"),
                                                     args, device, dtype, results["layers"].get(name, {}))
        json_dump(results, args.out)
    big = "235b" if "235b" in results["layers"] else (shapes or [None])[-1]
    if big is not None:
        # the disk rate of this shape's streaming run, else of whichever shape streamed (the same disk)
        streamed = big if big in results["layerwise"] else next(iter(results["layerwise"]), None)
        results["projection"] = project(results["layers"][big], results["layerwise"].get(streamed),
                                        SHAPES[big], args.samples, args.seq)
        results["projection"]["stream_measured_on"] = streamed
    json_dump(results, args.out)
    print_table(results, peak)


def json_dump(results: dict, out: str) -> None:
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "bench_scoring.json").write_text(json.dumps(results, indent=1, default=float))


def print_table(results: dict, peak: float) -> None:
    log("\n" + "=" * 100)
    log(f"REAP scoring benchmark  ({results['info']['device']}, {results['info']['dtype']}, "
        f"large matmul peak {peak:.0f} TFLOP/s)")
    rows = [("tokens per call", "tokens", "{:,.0f}"),
            ("plain forward, grouped_mm experts [tok/s/layer]", "plain_tok_s", "{:,.0f}"),
            ("plain forward, eager experts [tok/s/layer]", "plain_eager_tok_s", "{:,.0f}"),
            ("REAP routed [tok/s/layer]", "routed_tok_s", "{:,.0f}"),
            ("  routed / plain", "routed_vs_plain", "{:.2f}x"),
            ("REAP full [tok/s/layer]", "full_tok_s", "{:,.0f}"),
            ("  full / plain", "full_vs_plain", "{:.2f}x"),
            ("all-experts norms alone [tok/s]", "full_norms_tok_s", "{:,.0f}"),
            ("  achieved TFLOP/s (expert matmul FLOPs / time)", "full_norms_tflops", "{:.0f}"),
            ("  share of bf16 peak", "full_norms_tflops", "pct"),
            ("  path chosen (timed once per shape)", "full_path_chosen", "{}"),
            ("fused Triton kernels forced [TFLOP/s]", "full_norms_triton_tflops", "{:.0f}"),
            ("  share of bf16 peak", "full_norms_triton_tflops", "pct"),
            ("all-experts norms, PyTorch bmm path [tok/s]", "full_norms_torch_tok_s", "{:,.0f}"),
            ("  achieved TFLOP/s", "full_norms_torch_tflops", "{:.0f}"),
            ("  share of bf16 peak", "full_norms_torch_tflops", "pct"),
            ("REAP full with the bmm path [tok/s/layer]", "full_torch_tok_s", "{:,.0f}"),
            ("  the two bmm alone [TFLOP/s]", "full_matmuls_only_tflops", "{:.0f}"),
            ("  mm variant [TFLOP/s]", "full_norms_mm_variant_tflops", "{:.0f}"),
            ("paper-style loop into fp32 [E,T,H] [tok/s]", "paper_style_tok_s", "{:,.0f}"),
            ("  all-experts norms / paper-style loop", "full_vs_paper_style", "{:.1f}x"),
            ("paper's observer hook as published [tok/s]", "paper_observer_tok_s", "{:,.0f}"),
            ("  all-experts norms / paper's hook", "full_vs_paper_observer", "{:.1f}x"),
            ("  5x the loop would need, of the bf16 peak", "paper_style_5x_needs_peak_share", "{:.0%}"),
            ("paper's pipeline per layer: eager MoE + its hook [tok/s]", "paper_pipeline_tok_s", "{:,.0f}"),
            ("  REAP full per layer / paper's pipeline", "full_vs_paper_pipeline", "{:.1f}x"),
            ("  its gc.collect() in this process [ms]", "gc_collect_ms", "{:.0f}"),
            ("  the same without gc.collect() [tok/s]", "paper_pipeline_nogc_tok_s", "{:,.0f}"),
            ("  REAP full per layer / that", "full_vs_paper_pipeline_nogc", "{:.1f}x"),
            ("peak GPU above layer+inputs: plain [GiB]", "plain_peak_bytes", "gib"),
            ("  routed [GiB]", "routed_peak_bytes", "gib"),
            ("  full [GiB]", "full_peak_bytes", "gib"),
            ("layer weights [GiB]", "layer_weight_bytes", "gib"),
            ("check: routed output bitwise == experts forward", "check_routed_output_bitwise", "{}"),
            ("check: full norms max rel err vs float64", "check_full_norms_max_rel_err", "{:.1e}"),
            ("  mean rel err", "check_full_norms_mean_rel_err", "{:.1e}"),
            ("check: bmm-path norms max rel err vs float64", "check_full_norms_torch_max_rel_err", "{:.1e}"),
            ("  mean rel err", "check_full_norms_torch_mean_rel_err", "{:.1e}"),
            ("check: routed norms max rel err vs float64", "check_routed_norms_max_rel_err", "{:.1e}")]
    names = list(results["layers"])
    if names:
        log(f"{'per layer':<52}" + "".join(f"{n:>16}" for n in names))
    for label, key, fmt in rows if names else []:
        cells = []
        for n in names:
            v = results["layers"][n].get(key)
            if v is None:
                cells.append("-")
            elif fmt == "pct":
                cells.append(f"{v / peak:.0%}")
            elif fmt == "gib":
                cells.append(f"{v / GiB:.2f}")
            else:
                cells.append(fmt.format(v))
        log(f"{label:<52}" + "".join(f"{c:>16}" for c in cells))
    for name, lw in results["layerwise"].items():
        log(f"\nlayer-wise streaming, {name}: {lw['layers']} layers from disk, {lw['bytes_on_disk'] / 1e9:.1f} GB; "
            f"raw disk read {lw['raw_read_gbps']:.2f} GB/s")
        for mode, r in lw.items():
            if not isinstance(r, dict) or mode == "quant":
                continue
            log(f"  {mode} (prefetch {r['prefetch']}) {r['tokens']:,} tokens: {r['per_layer_s']:.3f} s/layer (median), "
                f"{r['tok_s_per_layer']:,.0f} tok/s/layer; streamed {r['stream_gbps']:.2f} GB/s, "
                f"h2d {r['h2d_gbps']:.1f} GB/s; peak GPU {r['peak_gpu_bytes'] / GiB:.2f} GiB = "
                f"{r['peak_over_allowance']:.2f} x (one layer {r['layer_bytes'] / GiB:.2f} + activations "
                f"{(r['one_layer_plus_activations_bytes'] - r['layer_bytes']) / GiB:.2f} GiB; layers after the "
                f"first {r['peak_over_allowance_later_layers']:.2f} x); "
                f"RSS growth first->last layer {r['rss_growth_bytes'] / GiB:+.2f} GiB")
        for fmt, q in lw.get("quant", {}).items():
            log(f"  {fmt} checkpoint of the same layers ({q['quantized_layer_bytes'] / 1e9:.3f} GB/layer on disk = "
                f"{q['quantized_layer_bytes'] / max(q['bf16_layer_bytes'], 1):.2f} x bf16; quantized + written in "
                f"{q['quantize_write_s_per_layer']:.2f} s/layer; raw disk read {q['raw_read_gbps']:.2f} GB/s)")
            if "load_one_layer_peak_bytes" in q:
                log(f"    loading one layer (dequantized into the fused tensors on the GPU): peak "
                    f"{q['load_one_layer_peak_bytes'] / GiB:.2f} GiB = {q['load_one_layer_peak_over_layer']:.2f} x "
                    f"the bf16 layer ({q['bf16_layer_bytes'] / GiB:.2f} GiB)")
            for key, same in q.items():
                if key.endswith("_host_equals_device_prefetch"):
                    log(f"    {key.split('_')[0]}: scores with prefetch host == prefetch device: {same}")
            for mode, r in q.items():
                if not isinstance(r, dict):
                    continue
                log(f"    {mode} (prefetch {r['prefetch']}): {r['per_layer_s']:.3f} s/layer (bf16 "
                    f"{r['per_layer_s_bf16']:.3f}); streamed {r['stream_gbps_quantized']:.2f} GB/s of quantized "
                    f"bytes; peak GPU {r['peak_gpu_bytes'] / GiB:.2f} GiB = {r['peak_over_bf16_allowance']:.2f} x "
                    f"one bf16 layer + activations ({r['bf16_layer_plus_activations_bytes'] / GiB:.2f} GiB); "
                    f"REAP vs bf16: max rel diff {r['reap_max_rel_diff']:.1e} (of the layer's largest score), "
                    f"per expert median {r['reap_median_rel_diff']:.1e} / max {r['reap_max_rel_diff_per_expert']:.1e}, "
                    f"50% keep-set agreement {r['keep_set_agreement']:.0%}")
    p = results.get("projection")
    if p:
        log(f"\nprojection: {p['layers']} layers x {p['tokens']:,} tokens (300 x 2048) at "
            f"{p['stream_gbps']:.2f} GB/s streamed ({p.get('stream_measured_on')} layers), model "
            f"{p['model_bytes'] / 1e9:.0f} GB, hidden states {p['hidden_states_bytes'] / 1e9:.1f} GB "
            "(one group, on GPU; embeddings + vision tower not included)")
        for mode in ("routed", "full"):
            m = p[mode]
            log(f"  {mode:<7} compute {m['compute_s_per_layer']:.2f} s/layer, "
                f"disk {m['disk_s_per_layer']:.2f} s/layer, h2d {m['h2d_s_per_layer']:.2f} s/layer "
                f"-> {m['wall_min']:.1f} min ({m['bound']}-bound)")


if __name__ == "__main__":
    main()
