"""The streaming pruner: exact equivalence with masked routing, every layout and quantization suffix, config and
index rewriting, safety (source untouched, atomic output, refusals) and prune_model.py end to end."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from reap_vlm.check.masked_routing import masked_routing
from reap_vlm.checkpoint.loading import load_model
from reap_vlm.checkpoint.reader import INDEX_NAME, Checkpoint
from reap_vlm.errors import ReapError
from reap_vlm.families import QWEN3_VL_MOE
from reap_vlm.metadata import METADATA_NAME
from reap_vlm.prune import rewrite as pruning
from reap_vlm.prune.config_edit import json_value_spans, prune_config_text, rewrite_module_names
from reap_vlm.prune.rewrite import PRUNING_RECORD, prune_checkpoint
from reap_vlm.selection import select_experts

ROOT = Path(__file__).resolve().parents[1]
# 7 of 12 per layer, a different non-contiguous set in every layer.
KEEP = {
    0: [0, 2, 3, 5, 7, 9, 11],
    1: [1, 2, 4, 6, 8, 10, 11],
    2: [0, 1, 4, 5, 6, 9, 10],
    3: [2, 3, 5, 6, 8, 10, 11],
}
K = 7
PROJS = ("gate_proj", "up_proj", "down_proj")


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Hash and mtime of every file: the source must come out of pruning exactly as it went in."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in Checkpoint(folder).shards:
        with safe_open(folder / shard, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def raw(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# ----------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def pruned_fused(tiny_model, tmp_path_factory) -> Path:
    before = snapshot(tiny_model)
    out = tmp_path_factory.mktemp("pruned") / "fused"
    prune_checkpoint(tiny_model, out, KEEP, verify=True, progress=False)
    assert snapshot(tiny_model) == before, "the source was modified"
    return out


@pytest.fixture(scope="module")
def pruned_per_expert(tiny_model_per_expert, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pruned") / "per-expert"
    prune_checkpoint(tiny_model_per_expert, out, KEEP, verify=True, progress=False)
    return out


@pytest.fixture(scope="module")
def prompts(tiny_model, calibration):
    """Processor inputs for a text prompt and an image+text prompt."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(tiny_model))

    def encode(content, images=None):
        text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
        return dict(processor(text=[text], images=images, return_tensors="pt"))

    image = Image.open(calibration / "images/00000.png").convert("RGB")
    return {
        "text": encode([{"type": "text", "text": "Find the bounding box of the red square."}]),
        "image": encode([{"type": "image"}, {"type": "text", "text": "Locate the blue circle."}], [image]),
    }


@pytest.fixture(scope="module")
def reference_logits(tiny_model, prompts):
    """The original model's logits with routing masked to KEEP (what a pruned model must reproduce), and
    unmasked (to show pruning changed something)."""
    original = load_model(tiny_model)
    with torch.no_grad():
        unmasked = {name: original(**inputs).logits for name, inputs in prompts.items()}
        with masked_routing(original, QWEN3_VL_MOE, KEEP):
            masked = {name: original(**inputs).logits for name, inputs in prompts.items()}
    return masked, unmasked


def assert_same_logits(model, prompts, reference_logits):
    masked, unmasked = reference_logits
    with torch.no_grad():
        for name, inputs in prompts.items():
            logits = model(**inputs).logits
            assert logits.dtype == torch.float32
            assert torch.allclose(logits, masked[name], atol=1e-5, rtol=0), name
            assert not torch.allclose(logits, unmasked[name], atol=1e-3), f"{name}: pruning changed nothing"


# ----------------------------------------------------------------------------------------------- (1) exactness

# The pruned model = the masked original, through reap_vlm's loader and transformers' Auto class, from the fused
# and the per-expert layout: tests/test_families.py (every family).  Here: where the bytes go.


def test_fused_tensors_hold_the_kept_experts_in_order(tiny_model, pruned_fused):
    source, pruned = read_tensors(tiny_model), read_tensors(pruned_fused)
    for layer, kept in KEEP.items():
        prefix = f"model.language_model.layers.{layer}.mlp"
        for key in (f"{prefix}.experts.gate_up_proj", f"{prefix}.experts.down_proj", f"{prefix}.gate.weight"):
            assert torch.equal(pruned[key], source[key][kept]), key
    assert set(pruned) == set(source)
    others = [k for k in source if ".mlp." not in k]
    assert others and all(torch.equal(pruned[k], source[k]) for k in others)
    record = json.loads((pruned_fused / PRUNING_RECORD).read_text())
    assert record["tensors"] == {"copied": len(source) - 12, "sliced": 12, "renumbered": 0, "dropped": 0}
    assert record["experts_to_keep"] == {str(layer): ids for layer, ids in KEEP.items()}
    assert record["id_map"]["1"] == {str(old): new for new, old in enumerate(KEEP[1])}
    assert record["source_path"] == str(tiny_model.resolve())
    assert (record["source_num_experts"], record["num_experts"], record["moe_layers"]) == (12, K, [0, 1, 2, 3])
    assert record["config_keys_updated"] == ["text_config.num_experts"]
    assert record["bytes_written"] == sum((pruned_fused / s).stat().st_size for s in Checkpoint(pruned_fused).shards)
    assert record["verify"]["forward"] == "ok"
    assert record["verify"]["source_keys"] == {"copied": len(source) - 12, "sliced": 12}


# ----------------------------------------------------------------------------------------------- (2) per-expert

def test_per_expert_ids_renumbered_and_equivalent(tiny_model_per_expert, pruned_per_expert, prompts,
                                                  reference_logits):
    source, pruned = read_tensors(tiny_model_per_expert), read_tensors(pruned_per_expert)
    for layer, kept in KEEP.items():
        prefix = f"model.language_model.layers.{layer}.mlp.experts"
        ids = {int(k[len(prefix) + 1:].split(".")[0]) for k in pruned if k.startswith(prefix + ".")}
        assert ids == set(range(K))
        for new, old in enumerate(kept):
            for proj in PROJS:
                assert torch.equal(pruned[f"{prefix}.{new}.{proj}.weight"], source[f"{prefix}.{old}.{proj}.weight"])
    record = json.loads((pruned_per_expert / PRUNING_RECORD).read_text())
    assert record["tensors"]["renumbered"] == 4 * K * 3 and record["tensors"]["dropped"] == 4 * 5 * 3
    assert_same_logits(load_model(pruned_per_expert), prompts, reference_logits)


# ----------------------------------------------------------------------------------------------- (3) quantized

QUANT_SUFFIXES = {
    "awq": {"qweight": torch.int32, "qzeros": torch.int32, "scales": torch.float16},
    "fp8": {"weight": torch.float8_e4m3fn, "weight_scale_inv": torch.float32},
    "compressed-tensors": {"weight_packed": torch.int32, "weight_scale": torch.bfloat16,
                           "weight_zero_point": torch.int8, "weight_shape": torch.int64},
}
QUANT_CONFIGS = {
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm", "zero_point": True,
            "modules_to_not_convert": ["visual", "mlp.gate", "model.language_model.layers.1.mlp.experts.6",
                                       "layers.2.mlp.experts.3.down_proj", "layers.2.mlp.experts.9.up_proj"]},
    "fp8": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
            "modules_to_not_convert": ["lm_head", "model.language_model.layers.0.mlp.gate",
                                       "model.language_model.layers.0.mlp.experts.1.gate_proj",
                                       "model.language_model.layers.0.mlp.experts.2.up_proj"]},
    "compressed-tensors": {"quant_method": "compressed-tensors", "format": "pack-quantized",
                           "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4}}},
                           "ignore": ["lm_head", "model.visual.blocks.0.attn.qkv",
                                      "model.language_model.layers.3.mlp.gate",
                                      "model.language_model.layers.3.mlp.experts.0.down_proj",
                                      "model.language_model.layers.3.mlp.experts.11.down_proj"]},
}
REWRITTEN = {
    "awq": ["visual", "mlp.gate", "model.language_model.layers.1.mlp.experts.3", "layers.2.mlp.experts.5.up_proj"],
    "fp8": ["lm_head", "model.language_model.layers.0.mlp.gate",
            "model.language_model.layers.0.mlp.experts.1.up_proj"],
    "compressed-tensors": ["lm_head", "model.visual.blocks.0.attn.qkv", "model.language_model.layers.3.mlp.gate",
                           "model.language_model.layers.3.mlp.experts.6.down_proj"],
}
QUANT_LIST = {"awq": "modules_to_not_convert", "fp8": "modules_to_not_convert", "compressed-tensors": "ignore"}


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Random bytes reinterpreted as ``dtype``: every tensor's contents are distinct."""
    nbytes = torch.empty((), dtype=dtype).element_size() * int(torch.tensor(shape).prod())
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=generator).view(dtype).reshape(shape)


def write_quantized_checkpoint(folder: Path, tiny_model: Path, method: str) -> Path:
    """A per-expert checkpoint with ``method``'s tensor suffixes, router, and a few non-expert tensors."""
    folder.mkdir()
    config = json.loads((tiny_model / "config.json").read_text())
    config["quantization_config"] = QUANT_CONFIGS[method]
    if method == "fp8":  # some exports repeat it under text_config
        config["text_config"]["quantization_config"] = QUANT_CONFIGS[method]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    generator = torch.Generator().manual_seed(7)
    shards: list[dict[str, torch.Tensor]] = [{}, {}]
    shards[0]["model.language_model.embed_tokens.weight"] = torch.randn(16, 64, generator=generator)
    shards[1]["model.visual.blocks.0.attn.qkv.weight"] = torch.randn(96, 32, generator=generator)
    for layer in range(4):
        mlp = f"model.language_model.layers.{layer}.mlp"
        shard = shards[layer // 2]
        shard[f"{mlp}.gate.weight"] = torch.randn(12, 64, generator=generator)
        for expert in range(12):
            for proj in PROJS:
                for suffix, dtype in QUANT_SUFFIXES[method].items():
                    shape = (2,) if suffix == "weight_shape" else (6, 8)
                    shard[f"{mlp}.experts.{expert}.{proj}.{suffix}"] = random_tensor(dtype, shape, generator)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-00002.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt", "producer": f"test-{method}"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))
    return folder


@pytest.mark.parametrize("method", sorted(QUANT_SUFFIXES))
def test_quantized_suffixes_follow_their_expert(tiny_model, tmp_path, method):
    source = write_quantized_checkpoint(tmp_path / "src", tiny_model, method)
    before = snapshot(source)
    record = prune_checkpoint(source, tmp_path / "out", KEEP, verify=True, progress=False)
    assert snapshot(source) == before
    src, out = read_tensors(source), read_tensors(tmp_path / "out")
    suffixes = QUANT_SUFFIXES[method]
    for layer, kept in KEEP.items():
        experts = f"model.language_model.layers.{layer}.mlp.experts"
        for new, old in enumerate(kept):
            for proj in PROJS:
                for suffix, dtype in suffixes.items():
                    tensor = out[f"{experts}.{new}.{proj}.{suffix}"]
                    assert tensor.dtype == dtype
                    assert raw(tensor) == raw(src[f"{experts}.{old}.{proj}.{suffix}"])
        assert not [k for k in out if k.startswith(f"{experts}.{K}.")]
        router = f"model.language_model.layers.{layer}.mlp.gate.weight"
        assert torch.equal(out[router], src[router][kept])
    assert len(out) == 2 + 4 + 4 * K * 3 * len(suffixes)
    assert record["tensors"]["dropped"] == 4 * 5 * 3 * len(suffixes)
    assert record["verify"]["forward"].startswith("skipped (quantized")

    config = json.loads((tmp_path / "out" / "config.json").read_text())
    list_key = QUANT_LIST[method]
    assert config["quantization_config"][list_key] == REWRITTEN[method]
    untouched = {k: v for k, v in config["quantization_config"].items() if k != list_key}
    assert untouched == {k: v for k, v in QUANT_CONFIGS[method].items() if k != list_key}
    expected_keys = ["text_config.num_experts", f"quantization_config.{list_key}"]
    if method == "fp8":
        assert config["text_config"]["quantization_config"][list_key] == REWRITTEN[method]
        expected_keys.append(f"text_config.quantization_config.{list_key}")
    assert record["config_keys_updated"] == expected_keys
    for shard in Checkpoint(tmp_path / "out").shards:
        with safe_open(tmp_path / "out" / shard, "pt") as f:
            assert f.metadata() == {"format": "pt", "producer": f"test-{method}"}


def test_module_names_without_a_layer_are_refused():
    id_map = {0: {0: 0, 3: 1}}
    assert rewrite_module_names(["lm_head", "re:.*mlp.gate$", "shared_experts.3"], QWEN3_VL_MOE, id_map) == [
        "lm_head", "re:.*mlp.gate$", "shared_experts.3"]
    for name in ("mlp.experts.3.down_proj", r"re:.*experts\.3\..*"):
        with pytest.raises(ReapError, match="an expert by index in a form this pruner cannot remap"):
            rewrite_module_names([name], QWEN3_VL_MOE, id_map)


# ----------------------------------------------------------------------------------------------- (4) files

def test_config_diff_is_only_the_expert_count(tiny_model, pruned_fused):
    source = (tiny_model / "config.json").read_text()
    assert source.count('"num_experts": 12') == 1
    assert (pruned_fused / "config.json").read_text() == source.replace('"num_experts": 12', f'"num_experts": {K}')


def test_config_edit_in_place_keeps_layout_and_other_keys():
    text = ('{\n  "vision_config": {"num_experts": 12},\n  "text_config": {\n    "num_local_experts":12,'
            '  "num_experts": 12 ,\n    "quantization_config": {"ignore": [\n        "lm_head",\n'
            '        "model.language_model.layers.0.mlp.experts.3.up_proj",\n'
            '        "model.language_model.layers.0.mlp.experts.4.up_proj"\n      ]}\n  },\n'
            '  "num_experts": 12\n}\n')
    new, keys = prune_config_text(text, QWEN3_VL_MOE, 2, {0: {0: 0, 3: 1}})
    assert keys == ["text_config.num_experts", "text_config.num_local_experts",
                    "text_config.quantization_config.ignore"]
    assert new == text.replace('"num_local_experts":12', '"num_local_experts":2').replace(
        '"num_experts": 12 ,', '"num_experts": 2 ,').replace(
        'experts.3.up_proj",\n        "model.language_model.layers.0.mlp.experts.4.up_proj"',
        'experts.1.up_proj"')
    assert json_value_spans(text, ("vision_config", "num_experts")) == [(text.index("12"), text.index("12") + 2)]


def test_index_rebuilt_and_files_carried_over(tiny_model, pruned_fused):
    index = json.loads((pruned_fused / INDEX_NAME).read_text())
    tensors = {}
    for shard in Checkpoint(pruned_fused).shards:
        with safe_open(pruned_fused / shard, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            tensors.update({k: (shard, f.get_tensor(k)) for k in f.keys()})
    assert index["weight_map"] == {k: shard for k, (shard, _) in tensors.items()}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for _, t in tensors.values())
    source_index = json.loads((tiny_model / INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == set(source_index["weight_map"].values())  # same shard names
    assert all(source_index["weight_map"][k] == s for k, s in index["weight_map"].items())  # same partition
    for path in tiny_model.iterdir():
        if path.suffix != ".safetensors" and path.name not in (INDEX_NAME, "config.json"):
            name = "SOURCE_README.md" if path.name == "README.md" else path.name  # README.md is the new card
            assert (pruned_fused / name).read_bytes() == path.read_bytes(), path.name


def test_extra_files_carried_stale_and_hidden_ones_not(tiny_model, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(tiny_model, source)
    (source / "chat_template.jinja").write_text("{{ messages }}")
    (source / "notes.txt").write_text("anything else")
    (source / "extra").mkdir()
    (source / "extra" / "info.txt").write_text("kept")
    (source / "extra" / "stray.safetensors").write_bytes(b"unpruned")
    (source / "consolidated.safetensors").write_bytes(b"unpruned, not indexed")
    (source / ".cache").mkdir()
    (source / METADATA_NAME).write_text("{}")
    index = json.loads((source / INDEX_NAME).read_text())
    index["metadata"]["total_parameters"] = 10**6
    (source / INDEX_NAME).write_text(json.dumps(index))
    config_crlf = (source / "config.json").read_bytes().replace(b"\n", b"\r\n")  # Windows-edited
    (source / "config.json").write_bytes(config_crlf)
    metadata = tmp_path / "meta.json"
    metadata.write_text('{"new": true}')

    prune_checkpoint(source, tmp_path / "out", KEEP, reap_metadata_path=metadata, progress=False)
    out = tmp_path / "out"
    assert (out / "chat_template.jinja").read_text() == "{{ messages }}"
    assert (out / "notes.txt").is_file() and (out / "extra" / "info.txt").is_file()
    assert not (out / "extra" / "stray.safetensors").exists() and not (out / "consolidated.safetensors").exists()
    assert not (out / ".cache").exists()
    assert (out / METADATA_NAME).read_text() == '{"new": true}'
    assert (out / "config.json").read_bytes() == config_crlf.replace(b'"num_experts": 12', b'"num_experts": 7')
    experts = [t for k, t in read_tensors(source).items() if k.startswith("model.language_model.") and ".mlp." in k]
    removed = sum(t.numel() for t in experts) * 5 // 12
    assert json.loads((out / INDEX_NAME).read_text())["metadata"]["total_parameters"] == 10**6 - removed
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask  # not the 0700 of a temporary folder


def test_single_file_checkpoint_without_index(tiny_model, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(tiny_model, source, ignore=shutil.ignore_patterns("*.safetensors", INDEX_NAME))
    save_file(read_tensors(tiny_model), str(source / "model.safetensors"), metadata={"format": "pt"})
    record = prune_checkpoint(source, tmp_path / "out", KEEP, verify=True, progress=False)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "out" / INDEX_NAME).exists() and record["verify"]["forward"] == "ok"


def test_shard_left_empty_is_dropped_and_names_renumbered(tiny_model_per_expert, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(tiny_model_per_expert, source, ignore=shutil.ignore_patterns("*.safetensors", INDEX_NAME))
    tensors = read_tensors(tiny_model_per_expert)
    dropped = [f"model.language_model.layers.0.mlp.experts.{e}." for e in range(12) if e not in KEEP[0]]
    middle = {k: t for k, t in tensors.items() if k.startswith(tuple(dropped))}
    rest = [k for k in tensors if k not in middle]
    shards = [{k: tensors[k] for k in rest[:100]}, middle, {k: tensors[k] for k in rest[100:]}]
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        save_file(shard, str(source / f"model-{i:05d}-of-00003.safetensors"), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, f"model-{i:05d}-of-00003.safetensors"))
    (source / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}))

    prune_checkpoint(source, tmp_path / "out", KEEP, verify=True, progress=False)
    names = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert names == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert set(json.loads((tmp_path / "out" / INDEX_NAME).read_text())["weight_map"].values()) == set(names)


# ----------------------------------------------------------------------------------------------- (5) safety

def test_existing_output_refused_unless_force(tiny_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ReapError, match="already exists; pass --force"):
        prune_checkpoint(tiny_model, out, KEEP, progress=False)
    prune_checkpoint(tiny_model, out, KEEP, force=True, progress=False)  # an empty folder may be replaced
    assert (out / PRUNING_RECORD).is_file()
    (out / "notes.txt").write_text("mine")
    prune_checkpoint(tiny_model, out, KEEP, force=True, progress=False)  # so may an earlier pruned output
    assert not (out / "notes.txt").exists() and (out / PRUNING_RECORD).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("make", ["folder", "file"])
def test_force_refuses_to_replace_what_prune_model_did_not_write(tiny_model, tmp_path, make):
    out = tmp_path / "out"
    if make == "folder":
        (out / "reap").mkdir(parents=True)
        (out / "reap" / "results.json").write_text("{}")
    else:
        out.write_text("data")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with pytest.raises(ReapError) as caught:
        prune_checkpoint(tiny_model, out, KEEP, force=True, progress=False)
    message = str(caught.value)
    assert message.startswith("--force replaces only an empty folder or an earlier prune_model.py output")
    assert str(out) in message and "choose a new or empty --output" in message and "\n" not in message
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_output_holding_reap_results_refused(tiny_model, tmp_path):
    """`prune_model.py --output output --force` must not wipe output/reap (or the metadata being read)."""
    reap_out = tmp_path / "output" / "reap"
    reap_out.mkdir(parents=True)
    metadata = reap_out / METADATA_NAME
    metadata.write_text("{}")
    (tmp_path / "output" / PRUNING_RECORD).write_text("{}")  # even beside a record: the REAP results win
    cases = [(tmp_path / "output", r"contains the REAP metadata being read"),
             (reap_out, r"is the reap.py output folder")]
    for output, message in cases:
        with pytest.raises(ReapError, match=message + ".*choose another --output"):
            prune_checkpoint(tiny_model, output, KEEP, force=True, progress=False, reap_output=reap_out,
                             reap_metadata_path=metadata if output != reap_out else None)
    with pytest.raises(ReapError, match="contains the reap.py output folder"):
        prune_checkpoint(tiny_model, tmp_path, KEEP, force=True, progress=False, reap_output=reap_out)
    assert metadata.read_text() == "{}" and (tmp_path / "output" / PRUNING_RECORD).is_file()


def make_stale(tmp_path: Path) -> list[Path]:
    """What a SIGKILLed run leaves: fsutil.atomic_output_dir's hidden temporary siblings."""
    partial, old = tmp_path / ".out.partial-k1ll3d", tmp_path / ".out.old-x9"
    (partial / "sub").mkdir(parents=True)
    (partial / "model-00001-of-00003.safetensors").write_bytes(b"\0" * 3_000_000)
    (partial / "sub" / "x").write_bytes(b"\0" * 1_000_000)
    (old / "old").mkdir(parents=True)
    (old / "old" / "model.safetensors").write_bytes(b"\0" * 2_000_000)
    (tmp_path / ".other.partial-1").mkdir()  # another output's: not counted
    return [partial, old]


def test_stale_temporary_folders_are_reported(tiny_model, tmp_path):
    stale = make_stale(tmp_path)
    with pytest.warns(UserWarning) as caught:
        prune_checkpoint(tiny_model, tmp_path / "out", KEEP, progress=False)
    messages = [str(w.message) for w in caught if "stale" in str(w.message)]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert messages[0].startswith(f"2 stale temporary folders (0.01 GB) beside {tmp_path / 'out'}, left by an "
                                  "interrupted prune_model.py run")  # 6 MB
    assert f"rm -rf {tmp_path}/.out.old-* {tmp_path}/.out.partial-*" in messages[0]
    assert all(p.is_dir() for p in stale)  # reported, never deleted behind the user's back
    assert (tmp_path / "out" / PRUNING_RECORD).is_file()


def test_not_enough_disk_space_names_stale_temporary_folders(tiny_model, tmp_path, monkeypatch):
    make_stale(tmp_path)
    monkeypatch.setattr(pruning.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12, 1000))
    with pytest.warns(UserWarning, match="2 stale temporary folders"), \
            pytest.raises(ReapError, match=r"not enough disk space .*; 2 stale temporary folders \(0.01 GB\) .*rm -rf"):
        prune_checkpoint(tiny_model, tmp_path / "out", KEEP, progress=False)
    assert not (tmp_path / "out").exists()


def test_output_overlapping_source_refused(tiny_model, tmp_path):
    for output, message in ((tiny_model, "is the source folder"), (tiny_model / "pruned", "inside the source"),
                            (tiny_model.parent, "contains the source")):
        with pytest.raises(ReapError, match=message):
            prune_checkpoint(tiny_model, output, KEEP, force=True, progress=False)


@pytest.mark.parametrize("keep, message", [
    ({0: KEEP[0], 1: KEEP[1], 2: KEEP[2]}, r"layers differ from the model's MoE layers \(missing \[3\]"),
    ({**KEEP, 4: KEEP[0]}, r"not MoE \[4\]"),
    ({**KEEP, 2: [0, 1, 2, 3, 4, 5, 12]}, r"layer 2 names expert ids \[12\] outside 0..11"),
    ({**KEEP, 1: [1, 1, 4, 6, 8, 10, 11]}, r"layer 1 lists expert ids \[1\] more than once"),
    ({**KEEP, 3: [2, 3, 5, 6, 8, 10]}, r"uneven counts across layers \(\[6, 7\]\)"),
    ({layer: ids[:3] for layer, ids in KEEP.items()}, r"keeps 3 experts per layer, fewer than the 4"),
])
def test_metadata_that_does_not_fit_is_refused(tiny_model, tmp_path, keep, message):
    with pytest.raises(ReapError, match=message):
        prune_checkpoint(tiny_model, tmp_path / "out", keep, progress=False)
    assert not list(tmp_path.iterdir())


def test_unknown_expert_indexed_key_refused(tiny_model, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(tiny_model, source)
    shard = Checkpoint(source).shards[0]
    with safe_open(source / shard, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["model.visual.blocks.0.mlp.experts.3.weight"] = torch.zeros(2)
    save_file(tensors, str(source / shard), metadata={"format": "pt"})
    index = json.loads((source / INDEX_NAME).read_text())
    index["weight_map"]["model.visual.blocks.0.mlp.experts.3.weight"] = shard
    (source / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ReapError, match="carries an expert index but matches no"):
        prune_checkpoint(source, tmp_path / "out", KEEP, progress=False)
    assert not (tmp_path / "out").exists()


def test_failure_midway_leaves_nothing(tiny_model, tmp_path, monkeypatch):
    real = pruning.write_shard
    calls = []

    def failing(source, out, shard, advance):
        calls.append(shard.name)
        if len(calls) == 2:
            raise RuntimeError("disk vanished")
        return real(source, out, shard, advance)

    monkeypatch.setattr(pruning, "write_shard", failing)
    before = snapshot(tiny_model)
    with pytest.raises(RuntimeError, match="disk vanished"):
        prune_checkpoint(tiny_model, tmp_path / "out", KEEP, progress=False)
    assert len(calls) == 2 and not list(tmp_path.iterdir())
    assert snapshot(tiny_model) == before


def test_not_enough_disk_space_refused(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(pruning.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12, 1000))
    with pytest.raises(ReapError, match="not enough disk space .* free some space or choose another --output"):
        prune_checkpoint(tiny_model, tmp_path / "out", KEEP, progress=False)
    assert not list(tmp_path.iterdir())


def test_verify_catches_wrong_counts_shapes_and_bytes(tiny_model, pruned_fused, tmp_path):
    with pytest.raises(ReapError, match="verify: pruned config says 7 experts"):
        pruning.verify_pruned(Checkpoint(tiny_model), pruned_fused, {layer: ids[:6] for layer, ids in KEEP.items()})
    broken = tmp_path / "broken"
    shutil.copytree(pruned_fused, broken)
    key = "model.language_model.layers.2.mlp.experts.down_proj"
    shard = broken / Checkpoint(broken).weight_map[key]
    tensor = pruning.read_header(shard).tensors[key]
    with open(shard, "r+b") as f:  # flip the first bytes of expert 0's slab
        f.seek(tensor.begin)
        f.write(bytes(255 - b for b in f.read(8))[::-1])
    with pytest.raises(ReapError, match=f"verify: {key} in .* differs from the source bytes"):
        pruning.verify_pruned(Checkpoint(tiny_model), broken, KEEP)
    with safe_open(shard, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[key] = torch.cat([tensors[key], tensors[key][:1]])
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(ReapError, match=f"verify: {key} has shape \\[8, "):
        pruning.verify_pruned(Checkpoint(tiny_model), broken, KEEP)


# ----------------------------------------------------------------------------------------------- (6) CLI

def clean_env() -> dict[str, str]:
    """No REAP_* from the developer's shell; the subprocesses run in tmp_path, away from any .env."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REAP_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))
    return env


def run_script(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=clean_env(),
                          capture_output=True, text=True, timeout=300)


def test_reap_then_prune_model_end_to_end(tiny_model, calibration, tmp_path):
    reap_out, out = tmp_path / "reap", tmp_path / "pruned"
    done = run_script("reap.py", "--model", str(tiny_model), "--calibration",
                      str(calibration / "calibration_data.json"), "--output", str(reap_out), "--mode", "router",
                      "--criterion", "frequency", "--prune-ratio", "0.25", "--device", "cpu", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    metadata = json.loads((reap_out / METADATA_NAME).read_text())

    # Defaults: <--reap-output>/reap_metadata.json, the model recorded there, its selection as is.
    done = run_script("prune_model.py", "--reap-output", str(reap_out), "--output", str(out), "--verify", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "kept 9 of 12" in done.stdout and "forward ok" in done.stdout
    record = json.loads((out / PRUNING_RECORD).read_text())
    assert record["experts_to_keep"] == metadata["experts_to_keep"] and record["num_experts"] == 9
    assert record["source_path"] == str(tiny_model.resolve()) and record["verify"]["forward"] == "ok"
    assert json.loads((out / METADATA_NAME).read_text()) == metadata

    done = run_script("prune_model.py", "--reap-output", str(reap_out), "--output", str(out), cwd=tmp_path)
    assert done.returncode == 1 and done.stderr.startswith("error: output") and "--force" in done.stderr
    assert done.stderr.strip().count("\n") == 0

    # An explicit ratio and criterion recompute the selection from the stored metrics.
    done = run_script("prune_model.py", "--model", str(tiny_model), "--metadata", str(reap_out / METADATA_NAME),
                      "--output", str(out), "--prune-ratio", "0.5", "--criterion", "weighted_frequency", "--force",
                      cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    record = json.loads((out / PRUNING_RECORD).read_text())
    expected = select_experts(metadata["metrics"], metadata["moe_layers"], "weighted_frequency", 6)
    assert expected != {int(k): v[:6] for k, v in metadata["experts_to_keep"].items()}
    assert record["num_experts"] == 6 and record["experts_to_keep"] == {str(k): v for k, v in expected.items()}


def test_prune_model_errors_are_one_line(tmp_path, capsys, monkeypatch):
    from prune_model import main  # conftest puts the repository root on sys.path
    from reap_vlm.cli import run_main

    monkeypatch.chdir(tmp_path)
    for name in [k for k in os.environ if k.startswith("REAP_")]:
        monkeypatch.delenv(name)
    assert run_main(main, ["--metadata", str(tmp_path / "missing.json"), "--output", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no REAP metadata at") and "--metadata" in err and err.count("\n") == 1
    assert run_main(main, ["--prune-ratio", "1.5"]) == 2
    assert capsys.readouterr().err.startswith("error: --prune-ratio / REAP_PRUNE_RATIO='1.5' is not valid")
    (tmp_path / "meta.json").write_text(json.dumps({"moe_layers": [0], "experts_to_keep": {"0": [0]},
                                                    "num_experts": 12, "model_path": str(tmp_path / "gone")}))
    assert run_main(main, ["--metadata", str(tmp_path / "meta.json")]) == 1
    assert "is not a checkpoint folder; pass --model" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- (7) selection

def hand_metadata(tiny_model: Path, folder: Path) -> tuple[Path, dict]:
    """reap_metadata.json as reap.py writes it for 0.5 by reap (6 of 12 kept), from before keep_multiple was
    recorded, and with an experts_to_keep that recomputing would not give: which selection was used shows."""
    generator = torch.Generator().manual_seed(0)
    metrics = {name: torch.rand(4, 12, generator=generator, dtype=torch.float64).tolist()
               for name in ("reap", "frequency", "weighted_frequency")}
    keep = {str(layer): ids[:6] for layer, ids in KEEP.items()}
    assert keep != {str(k): v for k, v in select_experts(metrics, [0, 1, 2, 3], "reap", 6).items()}
    metadata = {"model_path": str(tiny_model), "num_experts": 12, "top_k": 4, "moe_layers": [0, 1, 2, 3],
                "scoring_mode": "full", "criterion": "reap", "prune_ratio": 0.5, "num_experts_to_keep": 6,
                "experts_to_keep": keep, "mean_scores": metrics["reap"], "metrics": metrics,
                "calibration_samples": [0, 2]}
    folder.mkdir(parents=True)
    path = folder / METADATA_NAME
    path.write_text(json.dumps(metadata))
    return path, metadata


@pytest.fixture
def prune_cli(tmp_path, monkeypatch, capsys):
    """prune_model.py in this process, run in tmp_path with the given .env text and environment variables."""
    from prune_model import main
    from reap_vlm.cli import run_main

    monkeypatch.chdir(tmp_path)
    for name in [k for k in os.environ if k.startswith("REAP_")]:
        monkeypatch.delenv(name)

    def call(*argv: str, dotenv: str = "", **environ: str) -> tuple[int, str, str, dict, dict]:
        (tmp_path / ".env").write_text(dotenv)
        with monkeypatch.context() as m:
            for name, value in environ.items():
                m.setenv(name, value)
            code = run_main(main, list(argv))
        out, err = capsys.readouterr()
        pruned = tmp_path / "pruned"
        record = json.loads((pruned / PRUNING_RECORD).read_text()) if code == 0 else {}
        copied = json.loads((pruned / METADATA_NAME).read_text()) if code == 0 else {}
        return code, out, err, record, copied

    return call


def test_settings_that_repeat_the_metadata_keep_its_selection(tiny_model, tmp_path, prune_cli):
    path, metadata = hand_metadata(tiny_model, tmp_path / "reap")
    # A .env copied from .env.example repeats what reap.py was run with: not a request to recompute.
    code, out, err, record, copied = prune_cli("--metadata", str(path), "--output", "pruned",
                                               dotenv="REAP_PRUNE_RATIO=0.50\nREAP_CRITERION=reap\n"
                                                      "REAP_KEEP_MULTIPLE=1\n")
    assert code == 0, err
    assert "recomputing" not in out + err
    assert record["experts_to_keep"] == metadata["experts_to_keep"]
    assert record["selection"] == {"source": "metadata", "prune_ratio": 0.5, "criterion": "reap",
                                   "keep_multiple": 1, "num_experts_to_keep": 6}
    assert copied == metadata
    # Nor is a flag or a variable that equals the recorded value.
    code, out, err, record, copied = prune_cli("--metadata", str(path), "--output", "pruned", "--force",
                                               "--prune-ratio", "0.5", REAP_CRITERION="reap")
    assert code == 0, err
    assert "recomputing" not in out + err and record["selection"]["source"] == "metadata"
    assert record["experts_to_keep"] == metadata["experts_to_keep"] and copied == metadata


def test_a_different_ratio_in_env_file_recomputes_and_says_so(tiny_model, tmp_path, prune_cli):
    path, metadata = hand_metadata(tiny_model, tmp_path / "reap")
    code, out, err, record, copied = prune_cli("--metadata", str(path), "--output", "pruned",
                                               dotenv="REAP_PRUNE_RATIO=0.40\n")
    assert code == 0, err
    assert out.splitlines()[0] == ("recomputing the selection: prune ratio 0.4 (REAP_PRUNE_RATIO in .env) differs "
                                   "from the metadata's 0.5")
    expected = {str(k): v for k, v in select_experts(metadata["metrics"], [0, 1, 2, 3], "reap", 8).items()}
    assert record["experts_to_keep"] == expected and record["num_experts"] == 8
    assert record["selection"] == {"source": "recomputed", "prune_ratio": 0.4, "criterion": "reap",
                                   "keep_multiple": 1, "num_experts_to_keep": 8, "why": out.splitlines()[0]}
    # The metadata beside the checkpoint describes what was kept, keeps the measurements, and says what changed.
    assert copied["experts_to_keep"] == expected and copied["num_experts_to_keep"] == 8
    assert (copied["prune_ratio"], copied["criterion"], copied["keep_multiple"]) == (0.4, "reap", 1)
    assert copied["metrics"] == metadata["metrics"] and copied["mean_scores"] == metadata["mean_scores"]
    assert copied["calibration_samples"] == [0, 2]
    assert copied["selection_recomputed"]["reap_selection"] == {"prune_ratio": 0.5, "criterion": "reap",
                                                                "keep_multiple": 1, "num_experts_to_keep": 6}
    assert json.loads(path.read_text()) == metadata  # the input is not touched


def test_a_flag_recomputes_the_selection(tiny_model, tmp_path, prune_cli):
    path, metadata = hand_metadata(tiny_model, tmp_path / "reap")
    code, out, err, record, copied = prune_cli("--metadata", str(path), "--output", "pruned", "--criterion",
                                               "frequency", dotenv="REAP_PRUNE_RATIO=0.5\n", REAP_KEEP_MULTIPLE="4")
    assert code == 0, err
    assert out.splitlines()[0] == ("recomputing the selection: criterion frequency (--criterion) differs from the "
                                   "metadata's reap; keep multiple 4 (REAP_KEEP_MULTIPLE in the environment) "
                                   "differs from the metadata's 1")
    expected = {str(k): v for k, v in select_experts(metadata["metrics"], [0, 1, 2, 3], "frequency", 8).items()}
    assert record["experts_to_keep"] == expected and record["num_experts"] == 8  # 6 rounded up to a multiple of 4
    assert record["selection"]["source"] == "recomputed"
    assert (record["selection"]["criterion"], record["selection"]["keep_multiple"]) == ("frequency", 4)
    assert copied["experts_to_keep"] == expected and copied["criterion"] == "frequency"
    assert copied["mean_scores"] == metadata["metrics"]["frequency"]


def test_prune_model_refuses_to_wipe_reap_results(tiny_model, tmp_path, prune_cli):
    """The scenario `prune_model.py --output output --force`, with reap.py's results in output/reap."""
    path, _ = hand_metadata(tiny_model, tmp_path / "output" / "reap")
    code, out, err, _, _ = prune_cli("--output", "output", "--force", dotenv="REAP_OUTPUT_PATH=output/reap\n")
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("error: output folder output contains the REAP metadata being read")
    code, out, err, _, _ = prune_cli("--metadata", str(path), "--output", "output", "--force",
                                     REAP_OUTPUT_PATH=str(tmp_path / "output" / "reap"))
    assert code == 1 and "contains the REAP metadata being read" in err
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(path, tmp_path / "elsewhere" / METADATA_NAME)
    code, out, err, _, _ = prune_cli("--metadata", str(tmp_path / "elsewhere" / METADATA_NAME), "--output", "output",
                                     "--force", REAP_OUTPUT_PATH="output/reap")
    assert code == 1 and "contains the reap.py output folder" in err
    assert path.is_file()


def test_a_failed_swap_puts_the_old_output_back(tmp_path, monkeypatch):
    """--force replaces an output in two renames; when the second fails the old output is restored, and no
    temporary folder is left beside it."""
    import os

    from reap_vlm.checkpoint import fsutil

    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("old")
    real, calls = os.replace, []

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("no space left on device")
        real(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", flaky)
    with pytest.raises(OSError, match="no space"):
        with fsutil.atomic_output_dir(out, force=True) as tmp:
            (tmp / "a").write_text("new")
    assert (out / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
