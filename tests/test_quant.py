"""Quantized checkpoints: packing, dequantization per format, loading, REAP scoring and pruning.

Each quantized fixture comes with its dequantized reference (same keys, plain float32 weights):
reading the quantized one must give exactly the reference, and everything downstream (logits,
REAP scores, pruning) must then agree with the reference.
"""

from __future__ import annotations

import importlib
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from reap_vlm.checkpoint.loading import load_model
from reap_vlm.checkpoint.quant import (
    AWQ_ORDER,
    SUPPORTED,
    awq_pack,
    awq_unpack,
    detect_format,
    pack_int32,
    unpack_int32,
)
from reap_vlm.checkpoint.reader import Checkpoint
from reap_vlm.checkpoint.tensors import memory_state_dict
from reap_vlm.errors import ReapError
from reap_vlm.families import KeyRole
from reap_vlm.fixtures.quantized import FORMATS, quantize_awq, quantize_checkpoint, quantize_fp8_block, quantize_pack

GROUP = 16
BLOCK = (32, 32)


def _config(fmt: str, symmetric: bool = True, **extra) -> dict:
    if fmt == "awq":
        q = {"quant_method": "awq", "bits": 4, "group_size": GROUP, "version": "gemm", "zero_point": True}
    elif fmt == "fp8":
        q = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(BLOCK)}
    else:
        weights = {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group", "group_size": GROUP}
        q = {"quant_method": "compressed-tensors", "format": "pack-quantized",
             "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}
    return {"quantization_config": {**q, **extra}}


def _quantize(fmt: str, weight: torch.Tensor, symmetric: bool = True):
    if fmt == "awq":
        return quantize_awq(weight, GROUP)
    if fmt == "fp8":
        return quantize_fp8_block(weight, BLOCK)
    return quantize_pack(weight, GROUP, symmetric=symmetric)


def _weight(rows=48, columns=64, seed=0) -> torch.Tensor:
    return torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed)) * 0.1


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.fixture(scope="module")
def quant_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("quant")


@pytest.fixture(scope="module", params=FORMATS)
def quantized(request, tiny_model_per_expert, quant_root) -> tuple[str, Path, Path]:
    """(format, quantized checkpoint, its dequantized reference)."""
    fmt = request.param
    q, ref = quantize_checkpoint(tiny_model_per_expert, quant_root / fmt, fmt, quant_root / f"{fmt}-ref",
                                 group_size=GROUP, block=BLOCK)
    return fmt, q, ref


# ------------------------------------------------------------------------------------ packing


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("length", [64, 45])
def test_pack_unpack_round_trip_is_exact(bits, length):
    values = torch.randint(0, 1 << bits, (7, length), generator=torch.Generator().manual_seed(bits))
    packed = pack_int32(values, bits)
    assert packed.dtype == torch.int32 and packed.shape == (7, math.ceil(length * bits / 32))
    assert torch.equal(unpack_int32(packed, bits, length), values.to(torch.int32))


def test_pack_order_is_low_bits_first():
    assert pack_int32(torch.arange(8), 4).item() == 0x76543210
    assert pack_int32(torch.tensor([0xF] * 8), 4).item() == -1  # every bit set, as int32


def test_awq_order_from_its_definition():
    # Nibble i of an AWQ GEMM word holds column AWQ_ORDER[i] = 0, 2, 4, 6, 1, 3, 5, 7 of its eight.
    assert AWQ_ORDER == (0, 2, 4, 6, 1, 3, 5, 7)
    columns = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])  # column j holds j + 1
    word = awq_pack(columns).item() & 0xFFFFFFFF
    assert word == 0x86427531  # nibbles from bit 0: columns 0, 2, 4, 6, 1, 3, 5, 7
    values = torch.randint(0, 16, (32, 96), generator=torch.Generator().manual_seed(1))
    assert torch.equal(awq_unpack(awq_pack(values), 96), values.to(torch.int32))


# ------------------------------------------------------------------------------------ dequantization


@pytest.mark.parametrize("fmt,symmetric", [("awq", True), ("compressed-tensors", True),
                                           ("compressed-tensors", False), ("fp8", True)])
def test_dequantize_matches_the_definition(fmt, symmetric):
    weight = _weight()
    tensors, expected = _quantize(fmt, weight, symmetric)
    got = detect_format(_config(fmt, symmetric)).dequantize(tensors)
    assert got.dtype == torch.float32 and got.shape == weight.shape
    assert torch.equal(got, expected)
    # and it is the weight, up to the format's rounding
    assert (got - weight).abs().max() <= weight.abs().max() * (0.07 if fmt == "fp8" else 0.15)
    bf16 = detect_format(_config(fmt, symmetric)).dequantize(tensors, dtype=torch.bfloat16)
    assert torch.equal(bf16, expected.to(torch.bfloat16))


def test_pack_quantized_partial_last_group_uses_the_config_group_size():
    """36 columns in groups of 16 make 3 groups (16, 16, 4); 36 also divides into 3 equal groups of 12, which must
    not override the config's group size.  Tensors written from the format's definition: column c takes group
    c // 16's scale; values stored + 8, packed 8 to an int32."""
    rows, columns = 5, 2 * GROUP + 4
    gen = torch.Generator().manual_seed(3)
    q = torch.randint(-8, 8, (rows, columns), generator=gen)
    scale = torch.rand(rows, 3, generator=gen) + 0.5
    tensors = {"weight_packed": pack_int32(q + 8, 4), "weight_scale": scale,
               "weight_shape": torch.tensor([rows, columns])}
    expected = q.float() * scale[:, torch.arange(columns) // GROUP]
    assert torch.equal(detect_format(_config("compressed-tensors")).dequantize(tensors), expected)


def test_awq_layout_is_in_by_out():
    tensors, _ = quantize_awq(_weight(48, 64), GROUP)
    assert tensors["qweight"].shape == (64, 48 // 8) and tensors["qzeros"].shape == (64 // GROUP, 48 // 8)
    assert tensors["scales"].shape == (64 // GROUP, 48) and tensors["scales"].dtype == torch.float16


def test_fp8_edge_blocks_use_their_own_scale():
    weight = _weight(48, 80)  # 48 = 32 + 16 rows, 80 = 2 * 32 + 16 columns: partial edge blocks
    tensors, expected = quantize_fp8_block(weight, BLOCK)
    assert tensors["weight_scale_inv"].shape == (2, 3)
    fmt = detect_format(_config("fp8"))
    assert torch.equal(fmt.dequantize(tensors), expected)
    tensors["weight_scale_inv"] = tensors["weight_scale_inv"].clone()
    tensors["weight_scale_inv"][1, 2] *= 2
    doubled = fmt.dequantize(tensors)
    assert torch.equal(doubled[32:, 64:], expected[32:, 64:] * 2)
    doubled[32:, 64:] = expected[32:, 64:]
    assert torch.equal(doubled, expected)


def test_compressed_tensors_activation_order_g_idx():
    weight = _weight(32, 64)
    tensors, expected = quantize_pack(weight, GROUP, symmetric=False)
    fmt = detect_format(_config("compressed-tensors", symmetric=False))
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(3))
    q = unpack_int32(tensors["weight_packed"], 4, 64)[:, perm]
    shuffled = {**tensors, "weight_packed": pack_int32(q, 4), "weight_g_idx": (torch.arange(64) // GROUP)[perm]}
    assert torch.equal(fmt.dequantize(shuffled), expected[:, perm])


@pytest.mark.parametrize("fmt", FORMATS)
def test_detected_in_text_config_too(fmt):
    config = {"text_config": _config(fmt)}
    assert detect_format(config).name == fmt


@pytest.mark.parametrize("quantization", [
    {"quant_method": "gptq", "bits": 4, "group_size": 128},
    {"quant_method": "bitsandbytes", "load_in_4bit": True},
    {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"},
    {"quant_method": "fp8", "activation_scheme": "static"},
    {"quant_method": "compressed-tensors", "format": "float-quantized",
     "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float",
                                                                       "strategy": "channel"}}}},
])
def test_unsupported_formats_are_one_line_errors(quantization):
    with pytest.raises(ReapError) as err:
        detect_format({"quantization_config": quantization})
    message = str(err.value)
    assert "\n" not in message and SUPPORTED in message


def test_load_model_refuses_an_unsupported_quantization(tiny_model_per_expert, quant_root):
    folder = quant_root / "gptq"
    folder.mkdir()
    config = json.loads((tiny_model_per_expert / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ReapError, match="'gptq' is not supported"):
        load_model(folder)


# ------------------------------------------------------------------------------------ library cross-checks


def test_packing_matches_compressed_tensors():
    helpers = importlib.import_module("compressed_tensors.compressors.pack_quantized.helpers")
    generator = torch.Generator().manual_seed(0)
    for bits in (2, 4, 8):
        offset = 1 << (bits - 1)
        signed = torch.randint(-offset, offset, (48, 64), generator=generator, dtype=torch.int8)
        assert torch.equal(helpers.pack_to_int32(signed, bits), pack_int32(signed.long() + offset, bits))
        assert torch.equal(helpers.pack_to_int32(signed, bits, packed_dim=0),
                           pack_int32(signed.long().t() + offset, bits).t())
        packed = pack_int32(signed.long() + offset, bits)
        assert torch.equal(helpers.unpack_from_int32(packed, bits, torch.Size([48, 64])).long(),
                           unpack_int32(packed, bits, 64).long() - offset)


@pytest.mark.parametrize("symmetric", [True, False])
def test_pack_quantized_matches_compressed_tensors(symmetric):
    importlib.import_module("compressed_tensors.compressors.pack_quantized.base")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=GROUP)
    scheme = QuantizationScheme(targets=["Linear"], weights=args, format="pack-quantized")
    tensors, expected = quantize_pack(_weight(), GROUP, symmetric=symmetric)
    library = PackedQuantizationCompressor.decompress(dict(tensors), scheme)["weight"]  # in the scale dtype
    ours = detect_format(_config("compressed-tensors", symmetric)).dequantize(tensors)
    assert torch.equal(library, ours.to(library.dtype))
    # the library, given our dequantized weight and scales, packs the very same integers
    state = {"weight": expected, "weight_scale": tensors["weight_scale"]}
    if not symmetric:
        state["weight_zero_point"] = (unpack_int32(tensors["weight_zero_point"].t().contiguous(), 4, 48).t() - 8
                                      ).to(torch.int8)
    compressed = PackedQuantizationCompressor.compress(state, scheme)
    for name, tensor in tensors.items():
        assert torch.equal(compressed[name], tensor), name


def test_awq_matches_compressed_tensors_autoawq_converter():
    importlib.import_module("compressed_tensors.entrypoints.convert.converters.autoawq")
    from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    tensors, expected = quantize_awq(_weight(), GROUP)
    converter = AutoAWQConverter(group_size=GROUP)
    q, scale, zero = converter._convert_gemm_module(tensors["qweight"], tensors["scales"], tensors["qzeros"])
    args = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=GROUP)
    library = dequantize(q, scale.float(), zero, args)
    assert torch.equal(library, detect_format(_config("awq")).dequantize(tensors))
    assert torch.equal(library, expected)


def test_fp8_matches_compressed_tensors_block_dequantizer():
    importlib.import_module("compressed_tensors.entrypoints.convert.converters.fp8block_dequantizer")
    from compressed_tensors.entrypoints.convert.converters.fp8block_dequantizer import FP8BlockDequantizer

    tensors, expected = quantize_fp8_block(_weight(48, 80), BLOCK)
    library = FP8BlockDequantizer(weight_block_size=BLOCK, dtype=torch.float32)._create_dequantized_weight(
        tensors["weight"], tensors["weight_scale_inv"])
    assert torch.equal(library, detect_format(_config("fp8")).dequantize(tensors))
    assert torch.equal(library, expected)


def test_checkpoints_match_compressed_tensors_dequantizers(quantized):
    """The library's own whole-checkpoint converters turn our quantized fixture into our reference."""
    importlib.import_module("compressed_tensors.entrypoints.convert.converters.ct_dequantizer")
    from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
    from compressed_tensors.entrypoints.convert.converters.fp8block_dequantizer import FP8BlockDequantizer
    from compressed_tensors.quantization import QuantizationConfig

    fmt, q_path, ref_path = quantized
    tensors, reference = _tensors(q_path), _tensors(ref_path)
    qconfig = json.loads((q_path / "config.json").read_text())["quantization_config"]
    scale_dtype = {"awq": torch.float16, "compressed-tensors": torch.bfloat16, "fp8": torch.float32}[fmt]
    if fmt == "compressed-tensors":
        QuantizationConfig.model_validate(qconfig)
        library = CompressedTensorsDequantizer(q_path, dtype=torch.float32).process(tensors)
    elif fmt == "awq":
        converter = AutoAWQConverter.from_autoawq_config(qconfig)
        converted = converter.process(tensors)
        with tempfile.TemporaryDirectory() as folder:
            ct_config = converter.update_config(None).model_dump(mode="json")
            (Path(folder) / "config.json").write_text(json.dumps({"quantization_config": ct_config}))
            library = CompressedTensorsDequantizer(folder, dtype=torch.float32).process(converted)
    else:
        targets = frozenset(k.rpartition(".")[0] for k in tensors if k.endswith(".weight_scale_inv"))
        dequantizer = FP8BlockDequantizer(targets=targets, weight_block_size=tuple(qconfig["weight_block_size"]),
                                          dtype=torch.float32)
        library = dequantizer.process(tensors)
    quantized_modules = set(Checkpoint(q_path).quant_format.quantized_modules(Checkpoint(q_path).weight_map))
    assert library.keys() == reference.keys()
    for key, expected in reference.items():
        if key.rpartition(".")[0] in quantized_modules:  # the library computes in the scales' dtype
            expected = expected.to(scale_dtype).float()
        assert torch.equal(library[key].float(), expected), key


def test_asymmetric_pack_quantized_checkpoint(tiny_model_per_expert, quant_root):
    q_path, ref_path = quantize_checkpoint(tiny_model_per_expert, quant_root / "ct-asym", "compressed-tensors",
                                           quant_root / "ct-asym-ref", group_size=GROUP, symmetric=False)
    assert any(k.endswith(".weight_zero_point") for k in Checkpoint(q_path).weight_map)
    got, expected = memory_state_dict(Checkpoint(q_path)), memory_state_dict(Checkpoint(ref_path))
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    dequantizer = importlib.import_module("compressed_tensors.entrypoints.convert.converters.ct_dequantizer")
    library = dequantizer.CompressedTensorsDequantizer(q_path, dtype=torch.float32).process(_tensors(q_path))
    reference = _tensors(ref_path)
    quantized_modules = set(Checkpoint(q_path).quant_format.quantized_modules(Checkpoint(q_path).weight_map))
    assert library.keys() == reference.keys()
    for key, tensor in reference.items():
        if key.rpartition(".")[0] in quantized_modules:  # the library computes in the scales' dtype
            tensor = tensor.to(torch.bfloat16).float()
        assert torch.equal(library[key], tensor), key


# ------------------------------------------------------------------------------------ checkpoints


def test_quantized_fixture_is_shaped_like_the_releases(quantized):
    fmt, q_path, ref_path = quantized
    ckpt = Checkpoint(q_path)
    quant = ckpt.quant_format
    assert quant.name == fmt and ckpt.quantization == fmt and Checkpoint(ref_path).quant_format is None
    modules = quant.quantized_modules(ckpt.weight_map)
    spec = json.loads((q_path / "config.json").read_text())["text_config"]
    layers, experts = spec["num_hidden_layers"], spec["num_experts"]
    assert len(modules) == layers * (4 + 3 * experts)  # q/k/v/o and every expert's gate/up/down
    assert all(".self_attn." in m or ".mlp.experts." in m for m in modules)
    assert not any(quant.ignores(m) for m in modules)
    plain_linears = [k.rpartition(".")[0] for k in ckpt.weight_map
                     if k.endswith(("mlp.gate.weight", "lm_head.weight", "attn.qkv.weight", "linear_fc1.weight"))]
    assert plain_linears and all(quant.ignores(m) for m in plain_linears)
    assert ckpt.has_per_expert_keys
    # the reference has the source's keys; the quantized one the format's tensors instead of .weight
    source_keys = set(Checkpoint(ref_path).weight_map)
    for module in modules:
        assert f"{module}.weight" in source_keys
        assert all(f"{module}.{s}" in ckpt.weight_map for s in quant.required)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_memory_state_dict_equals_the_reference(quantized, dtype):
    _, q_path, ref_path = quantized
    got = memory_state_dict(Checkpoint(q_path), dtype=dtype)
    expected = memory_state_dict(Checkpoint(ref_path), dtype=dtype)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), key
    assert "model.language_model.layers.0.mlp.experts.gate_up_proj" in got
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in got


def test_memory_state_dict_reads_one_layer(quantized):
    """What the layer-wise engine does: one decoder layer's checkpoint keys at a time."""
    _, q_path, ref_path = quantized
    ckpt, ref = Checkpoint(q_path), Checkpoint(ref_path)
    prefix = "model.language_model.layers.2."
    keys = [k for k in ckpt.weight_map if k.startswith(prefix)]
    got = memory_state_dict(ckpt, keys, dtype=torch.bfloat16)
    expected = memory_state_dict(ref, [k for k in ref.weight_map if k.startswith(prefix)], dtype=torch.bfloat16)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    # the loader's "host" prefetch: the quantized tensors read ahead, dequantized later from that copy
    ahead = {k: v.clone() for k, v in ckpt.read(keys)}
    from_ahead = memory_state_dict(ckpt, keys, dtype=torch.bfloat16, source=ahead)
    assert from_ahead.keys() == expected.keys()
    assert all(torch.equal(from_ahead[k], expected[k]) for k in expected)
    # one tensor of a quantized module, or its in-memory .weight name, reads the whole module
    module = prefix + "self_attn.o_proj"
    reference = memory_state_dict(ref, [module + ".weight"])
    one = memory_state_dict(ckpt, [next(k for k in ckpt.weight_map if k.startswith(module + "."))])
    by_name = memory_state_dict(ckpt, [module + ".weight"])
    assert one.keys() == by_name.keys() == reference.keys()
    assert torch.equal(one[module + ".weight"], reference[module + ".weight"])
    assert torch.equal(by_name[module + ".weight"], reference[module + ".weight"])


def test_load_model_gives_the_reference_logits(quantized):
    _, q_path, ref_path = quantized
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = load_model(q_path)(input_ids=ids).logits
        expected = load_model(ref_path)(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_reap_scores_equal_the_reference(quantized, calibration, tmp_path):
    from reap_vlm.score.job import run_reap
    from reap_vlm.settings import Settings

    _, q_path, ref_path = quantized
    results = []
    for name, path in (("quantized", q_path), ("reference", ref_path)):
        settings = Settings(model_path=path, calibration_path=calibration / "calibration_data.json",
                            output_path=tmp_path / name, scoring_mode="full", device="cpu", dtype="float32",
                            max_samples=2, resume=False, prune_ratio=0.5)
        results.append(run_reap(settings))
    got, expected = results
    assert got["experts_to_keep"] == expected["experts_to_keep"]
    assert got["num_tokens"] == expected["num_tokens"]
    for metric, per_layer in expected["metrics"].items():
        torch.testing.assert_close(torch.tensor(got["metrics"][metric], dtype=torch.float64),
                                   torch.tensor(per_layer, dtype=torch.float64), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ pruning


def test_pruned_quantized_checkpoint_dequantizes_to_the_pruned_reference(quantized, tmp_path):
    pruning = importlib.import_module("reap_vlm.prune.rewrite")
    _, q_path, ref_path = quantized
    source = Checkpoint(q_path)
    keep = {layer: sorted({(layer * 5 + i * 7) % source.num_experts for i in range(6)})
            for layer in source.moe_layers}
    pruning.prune_checkpoint(q_path, tmp_path / "q", keep, progress=False)
    pruning.prune_checkpoint(ref_path, tmp_path / "ref", keep, progress=False)
    pruned = Checkpoint(tmp_path / "q")
    assert pruned.num_experts == 6 and pruned.quant_format.name == source.quant_format.name
    got = memory_state_dict(pruned)
    expected = memory_state_dict(Checkpoint(tmp_path / "ref"))
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    # every kept quantized tensor is the source's, byte for byte, under its new expert number
    family = source.family
    before, after = _tensors(q_path), _tensors(tmp_path / "q")
    checked = 0
    for key, tensor in after.items():
        info = family.classify(key)
        if info.role is KeyRole.ROUTER:  # one row per expert: the kept rows
            assert torch.equal(tensor, before[key][keep[info.layer]]), key
            continue
        if info.role is not KeyRole.PER_EXPERT:
            assert torch.equal(tensor.view(torch.uint8), before[key].view(torch.uint8)), key
            continue
        original = f"{info.prefix}.{keep[info.layer][info.expert]}.{info.name}"
        assert tensor.dtype == before[original].dtype
        assert torch.equal(tensor.view(torch.uint8), before[original].view(torch.uint8)), key
        checked += 1
    assert checked == len(keep) * 6 * 3 * len(source.quant_format.required)


# ------------------------------------------------------------------------------------ in-place fusion, peak memory


class _LiveTensorBytes:
    """Bytes of the tensor storages that torch ops create while active, and their peak: every op's outputs go
    through a TorchDispatchMode, each new storage is counted until the last tensor holding it is freed.  (CPU
    allocations are invisible to tracemalloc and torch keeps no CPU allocator statistics.)"""

    def __init__(self):
        import weakref

        from torch.utils import _pytree as pytree
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self
        self.live = self.peak = 0
        self.refs: dict[int, list[int]] = {}  # storage data_ptr -> [tensors alive, bytes]

        def drop(ptr: int) -> None:
            entry = tracker.refs[ptr]
            entry[0] -= 1
            if entry[0] == 0:
                del tracker.refs[ptr]
                tracker.live -= entry[1]

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr():
                        storage = t.untyped_storage()
                        entry = tracker.refs.get(storage.data_ptr())
                        if entry is None:
                            entry = tracker.refs[storage.data_ptr()] = [0, storage.nbytes()]
                            tracker.live += entry[1]
                            tracker.peak = max(tracker.peak, tracker.live)
                        entry[0] += 1
                        weakref.finalize(t, drop, storage.data_ptr())
                return out

        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def _nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


@pytest.fixture(scope="module")
def wide_quantized(quant_root) -> dict[str, tuple[Path, Path]]:
    """A moderately sized per-expert checkpoint (32 experts of 256 x 96, two layers) in AWQ and FP8, with references."""
    from reap_vlm.fixtures.quantized import build_quantized_checkpoint
    from reap_vlm.fixtures.tiny import FixtureSpec

    spec = FixtureSpec(hidden_size=256, moe_intermediate_size=96, intermediate_size=512, num_hidden_layers=2,
                       num_experts=32, num_experts_per_tok=4, vision_depth=1, deepstack_visual_indexes=(),
                       per_expert=True, num_shards=2)
    return {fmt: build_quantized_checkpoint(quant_root / f"wide-{fmt}", fmt, quant_root / f"wide-{fmt}-ref", spec,
                                            group_size=32, block=BLOCK) for fmt in ("awq", "fp8")}


@pytest.mark.parametrize("fmt", ["awq", "fp8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, None])
def test_loading_a_quantized_layer_peaks_at_one_copy_of_its_weights(wide_quantized, fmt, dtype):
    """Each expert is dequantized straight into its slot of the fused tensor: the loader's peak is the layer's
    weights plus one Linear's temporaries (measured 1.03-1.09x here), where holding the per-expert list and its
    stack peaked at 2.3x (as the 235B layer did on the H100: 11.5 GB for 5.0 GB)."""
    q_path, ref_path = wide_quantized[fmt]
    ckpt = Checkpoint(q_path)
    keys = [k for k in ckpt.weight_map if k.startswith("model.language_model.layers.1.")]
    with _LiveTensorBytes() as tracker:
        state = memory_state_dict(ckpt, keys, dtype)
    size = _nbytes(state)
    experts = _nbytes({k: v for k, v in state.items() if ".mlp.experts." in k})
    assert experts > 0.9 * size and tracker.live == size  # the tracker accounts for exactly what was returned
    assert tracker.peak <= 1.25 * size, f"peak {tracker.peak / size:.2f}x the layer"
    ref = Checkpoint(ref_path)
    expected = memory_state_dict(ref, [k for k in ref.weight_map if k.startswith("model.language_model.layers.1.")],
                                 dtype)
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_fuse_per_expert_into_equals_the_stack():
    from reap_vlm.families import QWEN3_VL_MOE as family

    generator = torch.Generator().manual_seed(0)
    experts = [{p: torch.randn(6, 4, generator=generator) for p in ("gate_proj", "up_proj")}
               | {"down_proj": torch.randn(4, 6, generator=generator)} for _ in range(5)]
    for name, sources in family.fused_sources().items():
        stacked = family.fuse_per_expert(name, experts)
        out = torch.full(family.fused_shape(name, 5, sources[-1], tuple(experts[0][sources[-1]].shape)), float("nan"))
        for expert in (3, 0, 4, 1, 2):  # any order, one projection at a time
            for proj in reversed(sources):
                family.fuse_per_expert_into(name, out, expert, {proj: experts[expert][proj]})
        assert torch.equal(out, stacked), name
        assert torch.equal(family.fused_slot(name, out, slice(1, 3), sources[0]),
                           torch.stack([e[sources[0]] for e in experts[1:3]]))
    with pytest.raises(ReapError, match="does not fit"):
        family.fuse_per_expert_into("down_proj", out, 0, {"down_proj": torch.zeros(4, 7)})


def test_an_expert_lacking_a_projection_is_a_clear_error(tiny_model_per_expert):
    ckpt = Checkpoint(tiny_model_per_expert)
    keys = [k for k in ckpt.weight_map if k.startswith("model.language_model.layers.0.")
            and not k.endswith("experts.3.up_proj.weight")]
    with pytest.raises(ReapError, match=r"experts\.3: no up_proj weight"):
        memory_state_dict(ckpt, keys)
    # only one projection asked for: no fused tensor is made of it, as before
    gate_only = [k for k in ckpt.weight_map if k.startswith("model.language_model.layers.0.mlp.experts.")
                 and k.endswith("gate_proj.weight")]
    assert memory_state_dict(ckpt, gate_only) == {}


# ------------------------------------------------------------------------------------ full-size quantizers


@pytest.mark.parametrize("fmt,symmetric", [("awq", True), ("compressed-tensors", True),
                                           ("compressed-tensors", False), ("fp8", True)])
def test_quantizers_batch_over_experts(fmt, symmetric):
    weights = torch.stack([_weight(48, 80 if fmt == "fp8" else 64, seed=e) for e in range(3)])  # [E, out, in]
    batched, dequantized = _quantize(fmt, weights, symmetric)
    for e in range(3):
        tensors, expected = _quantize(fmt, weights[e], symmetric)
        assert torch.equal(dequantized[e], expected)
        for name, tensor in tensors.items():
            got = batched[name] if name == "weight_shape" else batched[name][e]
            assert got.dtype == tensor.dtype and torch.equal(got.view(torch.uint8) if got.dtype.itemsize == 1 else got,
                                                             tensor.view(torch.uint8) if got.dtype.itemsize == 1
                                                             else tensor), name
    quantizer = {"awq": lambda w: quantize_awq(w, GROUP, reference=False),
                 "fp8": lambda w: quantize_fp8_block(w, BLOCK, reference=False),
                 "compressed-tensors": lambda w: quantize_pack(w, GROUP, symmetric=symmetric, reference=False)}[fmt]
    tensors, none = quantizer(weights)
    assert none is None and all(torch.equal(tensors[k].float(), batched[k].float()) for k in batched)


def test_quantize_checkpoint_by_layer_writes_what_quantize_checkpoint_writes(quantized, tiny_model_per_expert,
                                                                            tmp_path):
    from reap_vlm.fixtures.quantized import quantize_checkpoint_by_layer

    fmt, q_path, _ = quantized
    # small chunks: several batches of experts per fused tensor
    out = quantize_checkpoint_by_layer(tiny_model_per_expert, tmp_path / fmt, fmt, group_size=GROUP, block=BLOCK,
                                       chunk_bytes=1 << 17)
    expected, got = _tensors(q_path), _tensors(out)
    assert got.keys() == expected.keys()
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype and got[key].shape == tensor.shape, key
        assert torch.equal(got[key].view(torch.uint8), tensor.view(torch.uint8)), key
    assert json.loads((out / "config.json").read_text()) == json.loads((q_path / "config.json").read_text())
    layers = Checkpoint(out).family.keys_by_layer(Checkpoint(out).weight_map)
    assert len(Checkpoint(out).shards) == len(layers) + 1  # one shard per layer, one for the rest


def test_quantize_checkpoint_by_layer_from_a_fused_checkpoint(tiny_model, quant_root, tmp_path):
    from reap_vlm.fixtures.quantized import quantize_checkpoint_by_layer

    expected, _ = quantize_checkpoint(tiny_model, quant_root / "fused-awq", "awq", group_size=GROUP)
    out = quantize_checkpoint_by_layer(tiny_model, tmp_path / "awq", "awq", group_size=GROUP)
    a, b = _tensors(expected), _tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
