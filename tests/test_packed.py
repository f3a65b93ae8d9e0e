"""Quantized weights kept packed (``checkpoint.packed``): the forward of a packed model is the dequantized
model's, bit for bit, while only the routed experts are ever dequantized.

The reference is the fixture's dequantized checkpoint (every quantized weight replaced by exactly what it
decodes to) loaded whole: the same weights in the same dtype, so Linears, MoE blocks and logits must be
equal, not close.  Every experts implementation transformers offers (eager, grouped_mm, batched_mm) is run on
both models.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from reap_vlm.checkpoint.loading import load_model
from reap_vlm.checkpoint.packed import PackedExperts, PackedLinear, packed_model_bytes
from reap_vlm.checkpoint.quant import detect_format
from reap_vlm.checkpoint.reader import INDEX_NAME, Checkpoint
from reap_vlm.errors import ReapError
from reap_vlm.fixtures.quantized import quantize_awq, quantize_checkpoint, quantize_fp8_block, quantize_pack

GROUP = 16
BLOCK = (32, 32)
# (format, symmetric): compressed-tensors both ways, the others as their releases are
VARIANTS = [("awq", True), ("compressed-tensors", True), ("compressed-tensors", False), ("fp8", True)]
IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")


def _variant_id(variant) -> str:
    fmt, symmetric = variant
    return fmt if fmt != "compressed-tensors" else f"ct-{'sym' if symmetric else 'asym'}"


@pytest.fixture(scope="module")
def packed_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("packed")


@pytest.fixture(scope="module", params=VARIANTS, ids=_variant_id)
def quantized(request, tiny_model_per_expert, packed_root) -> tuple[Path, Path]:
    """(quantized checkpoint, its dequantized reference), from the per-expert tiny fixture."""
    fmt, symmetric = request.param
    name = _variant_id(request.param)
    return quantize_checkpoint(tiny_model_per_expert, packed_root / name, fmt, packed_root / f"{name}-ref",
                               group_size=GROUP, block=BLOCK, symmetric=symmetric)


@pytest.fixture(scope="module")
def awq_from_fused(tiny_model, packed_root) -> tuple[Path, Path]:
    """AWQ of the fused-layout tiny fixture (the quantized files hold one tensor per expert, as releases do)."""
    return quantize_checkpoint(tiny_model, packed_root / "fused-awq", "awq", packed_root / "fused-awq-ref",
                               group_size=GROUP)


def _set_experts_implementation(model, name: str) -> None:
    model.config.get_text_config()._experts_implementation = name
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_experts_implementation"):
            config._experts_implementation = name


def _ids(batch=2, length=12, seed=0) -> torch.Tensor:
    return torch.randint(0, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ dequantizer


@pytest.mark.parametrize("rows,columns", [(48, 64), (64, 96)])  # FP8 blocks of 32: partial edge blocks, whole
@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_stacked_linears_dequantize_each_as_alone(variant, rows, columns):
    """The packed experts dequantize a tile of experts at once: each expert's weight is what its own
    Linear gives (the dequantizers are elementwise over the stack), and what the format's definition gives
    (the quantizer's reference: groups and blocks expanded, where the dequantizer broadcasts whole ones)."""
    fmt, symmetric = variant
    weights = torch.randn(3, rows, columns, generator=torch.Generator().manual_seed(1)) * 0.1
    if fmt == "awq":
        tensors, expected = quantize_awq(weights, GROUP)
        config = {"quant_method": "awq", "bits": 4, "group_size": GROUP, "version": "gemm"}
    elif fmt == "fp8":
        tensors, expected = quantize_fp8_block(weights, BLOCK)
        config = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(BLOCK)}
    else:
        tensors, expected = quantize_pack(weights, GROUP, symmetric=symmetric)
        tensors["weight_shape"] = tensors["weight_shape"].expand(3, 2)
        config = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {
            "weights": {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group",
                        "group_size": GROUP}}}}
    quant = detect_format({"quantization_config": config})
    assert torch.equal(quant.dequantize(tensors), expected)
    stacked = quant.dequantize(tensors, dtype=torch.bfloat16)
    assert stacked.shape == (3, rows, columns) and torch.equal(stacked, expected.to(torch.bfloat16))
    for e in range(3):
        alone = quant.dequantize({k: v[e] for k, v in tensors.items()}, dtype=torch.bfloat16)
        assert torch.equal(stacked[e], alone)


# ------------------------------------------------------------------------------------ exactness


def test_packed_model_is_the_dequantized_model_bit_for_bit(quantized):
    q_path, ref_path = quantized
    packed, reference = load_model(q_path, packed=True), load_model(ref_path)
    attention = packed.get_submodule("model.language_model.layers.1.self_attn.q_proj")
    experts = packed.get_submodule("model.language_model.layers.1.mlp.experts")
    assert isinstance(attention, PackedLinear) and isinstance(experts, PackedExperts)
    assert not any(p.is_meta for p in packed.parameters()) and not any(b.is_meta for b in packed.buffers())
    x = torch.randn(2, 5, attention.in_features, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(attention(x), reference.get_submodule(attention.name)(x))
        for implementation in IMPLEMENTATIONS:  # one MoE block: router + packed experts
            _set_experts_implementation(packed, implementation)
            _set_experts_implementation(reference, implementation)
            block = "model.language_model.layers.2.mlp"
            assert torch.equal(packed.get_submodule(block)(x), reference.get_submodule(block)(x)), implementation
            assert torch.equal(packed(input_ids=_ids()).logits, reference(input_ids=_ids()).logits), implementation


def test_packed_model_in_bfloat16_and_from_the_fused_fixture(awq_from_fused):
    q_path, ref_path = awq_from_fused
    packed = load_model(q_path, dtype=torch.bfloat16, packed=True)
    reference = load_model(ref_path, dtype=torch.bfloat16)
    assert packed.get_submodule("model.language_model.layers.0.mlp.experts").packed["gate_proj"].scales.dtype \
        == torch.float16  # the stored tensors keep their stored dtype
    with torch.no_grad():
        got, expected = packed(input_ids=_ids()).logits, reference(input_ids=_ids()).logits
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)


def test_tiles_of_experts_change_nothing(quantized):
    """A tile budget of one expert at a time (the 235B setting dequantizes a few per tile) gives the same
    bits as all routed experts at once."""
    q_path, _ = quantized
    packed = load_model(q_path, packed=True)
    with torch.no_grad():
        expected = packed(input_ids=_ids()).logits
        blocks = [m for m in packed.modules() if isinstance(m, PackedExperts)]
        for module in blocks:
            module.tile_bytes = 1
            assert module.tile_experts("gate_up_proj") == 1
        assert torch.equal(packed(input_ids=_ids()).logits, expected)


def test_a_decode_step_dequantizes_only_the_routed_experts(quantized):
    q_path, _ = quantized
    model = load_model(q_path, packed=True)
    family = Checkpoint(q_path).family
    routed: dict[int, set[int]] = {}
    handles = []
    for layer, block in family.moe_blocks(model):
        def hook(module, args, output, layer=layer):
            routed[layer] = set(output[2].reshape(-1).tolist())  # (logits, weights, top-k ids)

        handles.append(family.router_of(block).register_forward_hook(hook))
    experts = dict(family.moe_blocks(model))
    with torch.no_grad():
        prefill = model(input_ids=_ids(batch=1, length=10), use_cache=True)
        before = {layer: experts[layer].experts.experts_dequantized for layer in experts}
        step = torch.tensor([[int(prefill.logits[0, -1].argmax())]])
        model(input_ids=step, past_key_values=prefill.past_key_values, use_cache=True)
    for handle in handles:
        handle.remove()
    num_experts, top_k = Checkpoint(q_path).num_experts, Checkpoint(q_path).top_k
    for layer, block in experts.items():
        touched = block.experts.experts_dequantized - before[layer]
        fused = len(block.experts.expert_shapes)  # gate_up_proj and down_proj
        assert len(routed[layer]) == top_k < num_experts
        assert touched == fused * top_k, (layer, touched)


def test_unquantized_checkpoint_loads_as_without_packed(tiny_model_per_expert):
    packed, whole = load_model(tiny_model_per_expert, packed=True), load_model(tiny_model_per_expert)
    assert not any(isinstance(m, (PackedLinear, PackedExperts)) for m in packed.modules())
    with torch.no_grad():
        assert torch.equal(packed(input_ids=_ids()).logits, whole(input_ids=_ids()).logits)


def test_packed_model_bytes_is_what_the_load_takes(quantized):
    q_path, ref_path = quantized
    for path, dtype in ((q_path, torch.float32), (q_path, torch.bfloat16), (ref_path, torch.bfloat16)):
        model = load_model(path, dtype=dtype, packed=True)
        storages = {}  # tied weights counted once
        for tensor in model.state_dict().values():
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        assert packed_model_bytes(path, dtype) == sum(storages.values()), (path.name, dtype)


# ------------------------------------------------------------------------------------ refusals


def _edited_copy(source: Path, folder: Path, edit) -> Path:
    """A copy of ``source`` whose tensors ``edit(tensors)`` changed, written back shard by shard."""
    shutil.copytree(source, folder)
    index = json.loads((folder / INDEX_NAME).read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update({k: (v, shard) for k, v in load_file(folder / shard).items()})
    edited = edit({k: v for k, (v, _) in tensors.items()})
    first = sorted(set(index["weight_map"].values()))[0]
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in edited.items():
        shards.setdefault(tensors[key][1] if key in tensors else first, {})[key] = value
    for shard in set(index["weight_map"].values()):
        save_file(shards.get(shard, {}), str(folder / shard), metadata={"format": "pt"})
    index["weight_map"] = {k: s for s, keys in shards.items() for k in keys}
    (folder / INDEX_NAME).write_text(json.dumps(index))
    return folder


EXPERT = "model.language_model.layers.1.mlp.experts"


@pytest.mark.parametrize("edit,message", [
    (lambda t: {k: v for k, v in t.items() if not k.startswith(f"{EXPERT}.3.up_proj.")},
     r"experts\.3: quantized projections .*up_proj"),
    (lambda t: {k: v for k, v in t.items() if k != f"{EXPERT}.3.up_proj.qzeros"},
     r"experts\.3\.up_proj: awq quantized Linear has no qzeros"),
    (lambda t: {k: v for k, v in t.items() if not k.startswith("model.language_model.layers.0.self_attn.o_proj.")},
     r"missing from the checkpoint.*o_proj"),
    (lambda t: {**t, **{k.replace(".experts.11.", ".experts.12."): v for k, v in t.items() if ".experts.11." in k}},
     r"are not the model's 12 experts"),
    (lambda t: {**t, "model.language_model.layers.0.self_attn.q_proj.g_idx": torch.zeros(64, dtype=torch.int32)},
     r"in the checkpoint but not in the model.*q_proj\.g_idx"),
], ids=["missing-projection", "missing-tensor", "missing-linear", "extra-expert", "extra-tensor"])
def test_a_missing_or_extra_quantized_tensor_is_one_clear_line(awq_from_fused, tmp_path, edit, message):
    folder = _edited_copy(awq_from_fused[0], tmp_path / "broken", edit)
    with pytest.raises(ReapError, match=message) as err:
        load_model(folder, packed=True)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------ the GPU benchmark, tiny


def test_bench_check_runs_tiny_on_the_cpu(tmp_path):
    """bench/bench_check.py --tiny: both formats written, pruned by prune_model's code, generated with packed
    weights; the pruned model reproduces the masked original (float32: up to the router's softmax over 16 vs
    10 logits, summed in another order)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import bench_check

    assert bench_check.main(["--tiny", "--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "work"),
                             "--dtype", "float32"]) == 0
    result = json.loads((tmp_path / "out" / "RESULTS_check_packed.json").read_text())
    assert (tmp_path / "out" / "RESULTS_check_packed.md").is_file()
    assert [(r["fmt"], r["label"]) for r in result["runs"]] == [("awq", "original"), ("awq", "pruned"),
                                                                 ("fp8", "original"), ("fp8", "pruned")]
    shape = result["shape"]
    for run in result["runs"]:
        assert run["new_tokens"] == 4 and run["packed_model_bytes"] > 0
        assert 0 < run["experts_per_layer_step"] <= 2 * shape["top_k"]  # 2 prompts: at most 8 routed experts
        assert run["experts"] == (shape["experts"] if run["label"] == "original" else 10)
        if run["label"] == "pruned":
            assert run["surgery"]["max_abs_logit_diff"] < 1e-4 and run["surgery"]["top1_agreement"] == 1
        else:  # the packed original against itself loaded whole, dequantized
            assert run["exactness"]["bitwise"] is True
    assert len(result["projections"]) == 4 and all(p["weights_bytes"] > 0 for p in result["projections"])
    assert list((tmp_path / "work").iterdir()) == []  # the checkpoints are removed
