"""Layer-wise engine == whole-model engine (deepstack included), engine choice, and the fast scoring paths."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from reap_vlm.calibration.files import load_calibration
from reap_vlm.checkpoint.loading import load_model, load_processor
from reap_vlm.checkpoint.reader import Checkpoint
from reap_vlm.errors import ReapError
from reap_vlm.score.engine import choose_engine, model_bytes, run_batches
from reap_vlm.score.hooks import ReapObserver
from reap_vlm.score.layerwise import LayerwiseModel, run_layerwise
from reap_vlm.score.norms import all_expert_norms, routed_expert_norms
from reap_vlm.score.resume import ResumeState, stop_after
from reap_vlm.score.stats import ExpertStats, LayerStats

RUN = dict(batch_size=3, max_seq_len=256, max_pixels=0, checkpoint_every=1, device="cpu")


def _calib(calibration):
    return load_calibration(calibration / "calibration_data.json", 100)


def _whole(path, calibration, mode: str) -> ExpertStats:
    ckpt = Checkpoint(path)
    stats = ExpertStats.empty(ckpt.moe_layers, ckpt.num_experts)
    model = load_model(path, dtype=torch.float32)
    run_batches(model, load_processor(path), _calib(calibration).samples, ReapObserver(ckpt.family, stats, mode),
                resume=None, **RUN)
    return stats


def _layerwise(path, calibration, mode: str, resume=None, **kw) -> tuple[ExpertStats, dict]:
    ckpt = Checkpoint(path)
    stats = ExpertStats.empty(ckpt.moe_layers, ckpt.num_experts)
    out = run_layerwise(ckpt, load_processor(path), _calib(calibration).samples, ReapObserver(ckpt.family, stats, mode),
                        resume=resume, dtype=torch.float32, **RUN, **kw)
    return stats, out


def _max_rel(a: ExpertStats, b: ExpertStats, layers=None) -> float:
    worst = 0.0
    for layer in layers if layers is not None else a.layers:
        x, y = a.layers[layer], b.layers[layer]
        assert (x.n_tokens, x.n_image_tokens) == (y.n_tokens, y.n_image_tokens)
        for name in x.sums:
            scale = x.sums[name].abs().max().clamp(min=1e-30)
            worst = max(worst, float((x.sums[name] - y.sums[name]).abs().max() / scale))
    return worst


@pytest.fixture(scope="module")
def whole(tiny_model, calibration):
    return {mode: _whole(tiny_model, calibration, mode) for mode in ("full", "routed")}


@pytest.mark.parametrize("mode", ["full", "routed"])
def test_layerwise_equals_whole_model(tiny_model, calibration, whole, mode):
    ref = whole[mode]
    assert ref.n_image_tokens > 0, "the fixture must carry images, or deepstack is not exercised"
    assert Checkpoint(tiny_model).config["vision_config"]["deepstack_visual_indexes"]
    stats, out = _layerwise(tiny_model, calibration, mode)
    assert out["batches"] == 3 and out["resumed_from"] == 0 and out["groups"] == 1
    assert out["tokens_this_run"] == ref.n_tokens
    assert _max_rel(ref, stats) <= 1e-5
    for name, values in stats.metrics(mode).items():
        assert torch.allclose(torch.tensor(values), torch.tensor(ref.metrics(mode)[name]), rtol=1e-5, atol=1e-8)


def test_skipping_deepstack_changes_scores(tiny_model, calibration, whole, monkeypatch):
    """Without the deepstack step every image token is wrong from layer 1 on: the comparison above can fail."""
    monkeypatch.setattr(LayerwiseModel, "__init__", _no_deepstack_init(LayerwiseModel.__init__))
    stats, _ = _layerwise(tiny_model, calibration, "routed")
    assert _max_rel(whole["routed"], stats, layers=[0]) <= 1e-5  # deepstack enters after layer 0
    assert _max_rel(whole["routed"], stats, layers=[1]) > 1e-3


def _no_deepstack_init(init):
    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.after_layer = lambda text, layer, hidden, inputs: hidden

    return patched


def test_layerwise_small_groups_and_resume(tiny_model, calibration, whole, tmp_path):
    """One batch per group (a tiny group budget), killed after one batch and resumed: same sums."""
    resume = ResumeState(tmp_path / "state.pt", "fp")
    with stop_after(1):
        first, out = _layerwise(tiny_model, calibration, "full", resume=resume, max_group_bytes=1)
    assert out["groups"] == 1 and out["resumed_from"] == 0
    assert torch.load(tmp_path / "state.pt", weights_only=True)["batches_done"] == 1
    assert first.n_tokens < whole["full"].n_tokens
    stats, out = _layerwise(tiny_model, calibration, "full", resume=resume, max_group_bytes=1)
    assert out["resumed_from"] == 1 and out["groups"] == 2
    assert _max_rel(whole["full"], stats) <= 1e-5


def test_layerwise_per_expert_checkpoint(tiny_model_per_expert, calibration):
    ref = _whole(tiny_model_per_expert, calibration, "routed")
    stats, _ = _layerwise(tiny_model_per_expert, calibration, "routed")
    assert _max_rel(ref, stats) <= 1e-5


def test_choose_engine(tiny_model):
    ckpt = Checkpoint(tiny_model)
    size = model_bytes(ckpt)
    assert size > 0
    assert choose_engine(ckpt, "cpu", "auto", free_bytes=size) == "layerwise"  # needs > 85% of free memory
    assert choose_engine(ckpt, "cuda", "auto", free_bytes=size // 2) == "layerwise"
    assert choose_engine(ckpt, "cpu", "auto", free_bytes=4 * size) == "model"
    assert choose_engine(ckpt, "cpu", "model", free_bytes=1) == "model"
    assert choose_engine(ckpt, "cpu", "layerwise", free_bytes=1 << 50) == "layerwise"
    with pytest.raises(ReapError):
        choose_engine(ckpt, "cpu", "fastest")


@pytest.mark.parametrize("fmt", ["awq", "fp8", "compressed-tensors"])
def test_layer_bytes_of_a_quantized_checkpoint_count_its_weights_dequantized(fixture_root, fmt):
    """The layer-wise budget sizes a quantized layer as the bf16 layer it becomes (plus its scales and zero points,
    a few percent at the fixture's group size of 16)."""
    quant_fixtures = importlib.import_module("reap_vlm.fixtures.quantized")
    quantized, reference = quant_fixtures.build_quantized_checkpoint(
        fixture_root / f"lw-bytes-{fmt}", fmt, fixture_root / f"lw-bytes-{fmt}-reference")
    got, ref = (LayerwiseModel(Checkpoint(p), "cpu", torch.bfloat16) for p in (quantized, reference))
    for layer in ref.layer_keys:
        assert 1.0 <= got.layer_bytes(layer) / ref.layer_bytes(layer) <= 1.15


# ----------------------------------------------------------------------------------------------- fast paths


@pytest.fixture(scope="module")
def experts_case(tiny_model):
    model = load_model(tiny_model, dtype=torch.float32).requires_grad_(False)
    block = model.model.language_model.layers[1].mlp
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(57, block.experts.hidden_dim, generator=gen)
    _, weights, ids = block.gate(hidden)
    return Checkpoint(tiny_model).family, block, hidden, ids, weights


def _brute_norms(family, experts, hidden, ids):
    out = torch.zeros(ids.shape, dtype=torch.float64)
    for t in range(ids.shape[0]):
        for s in range(ids.shape[1]):
            y = family.expert_outputs(experts, hidden[t:t + 1], ids[t, s:s + 1])[0, 0]
            out[t, s] = torch.linalg.vector_norm(y.double())
    return out


def _brute_peaks(family, experts, hidden, ids) -> torch.Tensor:
    """max_h |E_j(x)_h| of each routed pair, in float64 from float64 weights."""
    out = torch.zeros(ids.shape, dtype=torch.float64)
    gate_up, down = experts.gate_up_proj.double(), experts.down_proj.double()
    for t in range(ids.shape[0]):
        for s in range(ids.shape[1]):
            j = int(ids[t, s])
            g, u = (gate_up[j] @ hidden[t].double()).chunk(2)
            out[t, s] = (down[j] @ (torch.nn.functional.silu(g) * u)).abs().max()
    return out


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm", "eager"])
def test_routed_forward_is_the_model_forward(experts_case, impl):
    family, block, hidden, ids, weights = experts_case
    experts = block.experts
    saved = experts.config._experts_implementation
    experts.config._experts_implementation = impl
    try:
        own = experts(hidden, ids, weights)
        out, norms, peaks = family.routed_forward(experts, hidden, ids, weights)
    finally:
        experts.config._experts_implementation = saved
    assert torch.equal(out, own)  # bitwise: same ops as transformers' own forward
    assert torch.allclose(norms.double(), _brute_norms(family, experts, hidden, ids), rtol=1e-5)
    assert torch.allclose(peaks.double(), _brute_peaks(family, experts, hidden, ids), rtol=1e-5)


def test_observer_routed_swaps_forward_and_restores(experts_case):
    family, block, hidden, ids, weights = experts_case
    own = block(hidden[None])
    stats = ExpertStats.empty([1], block.experts.num_experts)
    observer = ReapObserver(family, stats, "routed")
    with observer.attached([(1, block)]):
        assert "forward" in vars(block.experts)
        observer.set_masks(torch.ones(1, hidden.shape[0]), torch.zeros(1, hidden.shape[0]))
        assert torch.equal(block(hidden[None]), own)
    assert "forward" not in vars(block.experts)
    ref = LayerStats(block.experts.num_experts)
    rows = hidden.shape[0]
    ref.observe(router_logits=block.gate(hidden)[0], topk_ids=ids, topk_weights=weights,
                valid=torch.ones(rows, dtype=torch.bool), image=torch.zeros(rows, dtype=torch.bool),
                routed_norms=_brute_norms(family, block.experts, hidden, ids))
    for name in ("reap_sum", "ean_sum", "count", "weighted_frequency"):
        assert torch.allclose(stats.layers[1].sums[name], ref.sums[name], rtol=1e-5)


@pytest.mark.parametrize("budget", [None, 1])
def test_all_expert_norms_brute_force(experts_case, budget):
    family, block, hidden, _, _ = experts_case
    experts = block.experts
    all_ids = torch.arange(experts.num_experts).expand(hidden.shape[0], -1)
    norms = all_expert_norms(family, experts, hidden, chunk_budget_bytes=budget)  # budget 1: one token a chunk
    assert norms.shape == (hidden.shape[0], experts.num_experts)
    assert torch.allclose(norms.double(), _brute_norms(family, experts, hidden, all_ids), rtol=1e-5)
    routed_norms, routed_peaks = routed_expert_norms(family, experts, hidden, all_ids[:, :3])
    assert torch.allclose(routed_norms, norms[:, :3], rtol=1e-5)
    assert torch.allclose(routed_peaks.double(), _brute_peaks(family, experts, hidden, all_ids[:, :3]), rtol=1e-5)


def test_choosing_the_full_mode_path_times_within_the_scoring_memory():
    """The one-time race between the fused kernels and the bmm path runs on as many rows as keep the bmm
    path's working memory (the chunk-sizing estimate, exact on the H100: 6.00 GiB at 8192 tokens of the
    30B-A3B shape) within the kernels' on the whole call, so it adds nothing to the peak; a 4096-token
    layer-wise batch of that shape is still decided (>= 1024 rows)."""
    from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeTextConfig
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextExperts

    from reap_vlm.families import QWEN3_VL_MOE
    from reap_vlm.score import triton_experts

    cfg = Qwen3VLMoeTextConfig(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                               hidden_act="silu")
    with torch.device("meta"):
        experts = Qwen3VLMoeTextExperts(cfg).to(torch.bfloat16)
    bmm = QWEN3_VL_MOE.full_bytes_per_token(experts, torch.bfloat16)
    fused = triton_experts.bytes_per_row(experts, torch.bfloat16)
    assert fused == 128 * (768 * 2 + 2048 // 64 * 4)  # act [E, T, I] bf16 + float32 partial sums [E, H / 64, T]
    assert abs(bmm * 8192 / 2**30 - 6.004) < 0.01  # measured on the H100 (bench_scoring.json)
    for rows in (1, 1000, 4096, 16384):
        n = triton_experts.timed_rows(experts, rows, torch.bfloat16, bmm)
        assert n * bmm <= rows * fused < (n + 1) * bmm
    assert triton_experts.timed_rows(experts, 4096, torch.bfloat16, bmm) >= triton_experts._MIN_TIMED_ROWS


def test_layerwise_reads_quantized_checkpoints(fixture_root, calibration):
    """Quantized per-expert checkpoints (which the layer-wise engine dequantizes one layer at a time through
    ``memory_state_dict``) score like the whole model on their dequantized reference."""
    quant_fixtures = importlib.import_module("reap_vlm.fixtures.quantized")
    quantized, reference = quant_fixtures.build_quantized_checkpoint(
        fixture_root / "lw-fp8", "fp8", fixture_root / "lw-fp8-reference")
    assert choose_engine(Checkpoint(quantized), "cpu", "auto", free_bytes=1 << 50) == "model"
    ref = _whole(reference, calibration, "routed")
    stats, _ = _layerwise(quantized, calibration, "routed")
    assert _max_rel(ref, stats) <= 1e-5


def test_layer_loader_dequantizes_in_take_like_ahead(fixture_root):
    """The two ways the loader handles a quantized layer (on CUDA with prefetch "host" the quantized tensors are
    read ahead as stored and dequantized in take(), once the previous layer is gone; otherwise dequantized ahead)
    give the same tensors, bitwise."""
    from reap_vlm.score.layer_loader import LayerLoader

    quant_fixtures = importlib.import_module("reap_vlm.fixtures.quantized")
    quantized, _ = quant_fixtures.build_quantized_checkpoint(
        fixture_root / "lw-awq-take", "awq", fixture_root / "lw-awq-take-reference")
    ckpt = Checkpoint(quantized)
    lw = LayerwiseModel(ckpt, "cpu", torch.bfloat16)
    loaders = [LayerLoader(ckpt, lw.layer_keys, torch.device("cpu"), torch.bfloat16, dequantize_in_take=flag)
               for flag in (False, True)]
    try:
        assert [loader.raw for loader in loaders] == [False, True]
        for layer in lw.layer_keys:
            ahead, in_take = (loader.take(layer) for loader in loaders)
            assert ahead.keys() == in_take.keys() and any(k.endswith("experts.gate_up_proj") for k in ahead)
            assert all(torch.equal(ahead[k], in_take[k]) for k in ahead)
    finally:
        for loader in loaders:
            loader.close()


def test_reap_cli_layerwise_engine_equals_model_engine(tiny_model, calibration, tmp_path):
    from reap_vlm.score.job import run_reap
    from reap_vlm.settings import Settings

    common = dict(model_path=tiny_model, calibration_path=calibration / "calibration_data.json", device="cpu",
                  dtype="float32", prune_ratio=0.25, resume=False, batch_size=2)
    whole = run_reap(Settings(output_path=tmp_path / "m", engine="model", **common))
    streamed = run_reap(Settings(output_path=tmp_path / "l", engine="layerwise", **common))
    assert (whole["run"]["engine"], streamed["run"]["engine"]) == ("model", "layerwise")
    for name, values in whole["metrics"].items():
        np.testing.assert_allclose(np.array(streamed["metrics"][name]), np.array(values), rtol=1e-5, atol=1e-9)
    assert streamed["experts_to_keep"] == whole["experts_to_keep"]
