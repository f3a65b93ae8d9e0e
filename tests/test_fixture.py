"""The offline fixture is shaped like the real releases and loads in transformers."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from reap_vlm.checkpoint.loading import load_model
from reap_vlm.checkpoint.reader import Checkpoint
from reap_vlm.families import KeyRole


def _tensor_shapes(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shapes = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(folder / shard, "pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return index, shapes


def test_config_is_spelled_like_the_official_release(tiny_model):
    config = json.loads((tiny_model / "config.json").read_text())
    text = config["text_config"]
    assert config["architectures"] == ["Qwen3VLMoeForConditionalGeneration"]
    assert "num_experts" in text and "num_local_experts" not in text
    hidden, inter, experts, top_k = (text["hidden_size"], text["moe_intermediate_size"], text["num_experts"],
                                     text["num_experts_per_tok"])
    assert hidden not in (inter, 2 * inter) and experts != 2 * top_k
    assert config["vision_config"]["deepstack_visual_indexes"]


def test_token_ids_match_the_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    config = json.loads((tiny_model / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for key, token in [("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                       ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]:
        assert tokenizer.convert_tokens_to_ids(token) == config[key]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == config["text_config"]["eos_token_id"]
    assert len(tokenizer) <= config["text_config"]["vocab_size"]


def test_sharded_official_fused_layout(tiny_model):
    config = json.loads((tiny_model / "config.json").read_text())["text_config"]
    E, H, inter = config["num_experts"], config["hidden_size"], config["moe_intermediate_size"]
    index, shapes = _tensor_shapes(tiny_model)
    assert len(set(index["weight_map"].values())) == 3
    assert index["metadata"]["total_size"] == sum(
        (tiny_model / s).stat().st_size for s in set(index["weight_map"].values())) - sum(
        _header_size(tiny_model / s) for s in set(index["weight_map"].values()))
    layer = "model.language_model.layers.0.mlp"
    assert shapes[f"{layer}.experts.gate_up_proj"] == (E, H, 2 * inter)
    assert shapes[f"{layer}.experts.down_proj"] == (E, inter, H)
    assert shapes[f"{layer}.gate.weight"] == (E, H)
    assert any(k.startswith("model.visual.deepstack_merger_list.") for k in shapes)
    assert "lm_head.weight" in shapes


def _header_size(path):
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def test_per_expert_variant_holds_the_same_weights(tiny_model, tiny_model_per_expert):
    _, shapes = _tensor_shapes(tiny_model_per_expert)
    ckpt = Checkpoint(tiny_model_per_expert)
    assert ckpt.has_per_expert_keys
    assert not any(ckpt.family.classify(k).role is KeyRole.FUSED_EXPERTS for k in shapes)
    assert shapes["model.language_model.layers.1.mlp.experts.11.down_proj.weight"] == (64, 48)
    fused = load_model(tiny_model).state_dict()
    per_expert = load_model(tiny_model_per_expert).state_dict()
    assert fused.keys() == per_expert.keys()
    for key in fused:
        assert torch.equal(fused[key], per_expert[key]), key


def test_loads_in_transformers_and_runs_image_text_forward_and_generate(tiny_model, calibration):
    from transformers import AutoProcessor, Qwen3VLMoeForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_model)
    model = Qwen3VLMoeForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.float32).eval()
    assert model.model.language_model.layers[0].mlp.experts.gate_up_proj.shape == (12, 96, 64)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Find the red square."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image = Image.open(calibration / "images" / "00001.png")
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    n_image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_image_tokens == int(inputs["image_grid_thw"].prod()) // 4 > 0
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 4


def test_routing_is_decisive_and_experts_differ(tiny_model):
    model = load_model(tiny_model)
    layer = model.model.language_model.layers[0]
    x = layer.post_attention_layernorm(torch.randn(256, 64))
    _, weights, _ = layer.mlp.gate(x)
    assert weights[:, 0].mean() > 0.35  # top-1 carries a clear share, not a near-uniform 1/k
    norms = layer.mlp.experts.down_proj.flatten(1).norm(dim=1)
    assert norms.max() / norms.min() > 4


@pytest.mark.parametrize("name", ["calibration_data.json", "chat.jsonl", "text.json"])
def test_calibration_set_files(calibration, name):
    text = (calibration / name).read_text()
    items = [json.loads(line) for line in text.splitlines()] if name.endswith(".jsonl") else json.loads(text)
    assert items
    for item in items:
        if "image" in item:
            assert (calibration / item["image"]).is_file() and item["regions"]
            assert Image.open(calibration / item["image"]).format == "PNG"


@pytest.mark.parametrize("name", ["qwen3_vl_moe", "qwen3_moe", "qwen3_5_moe", "glm4v_moe", "llama4"])
def test_no_family_fixture_weight_is_left_uninitialised(name, tmp_path, monkeypatch):
    """Every weight is drawn (a layer built alone is never initialised by transformers, its parameters are
    torch.empty's memory: another checkpoint on every build): with torch.empty handing out NaNs, none is left."""
    from safetensors.torch import load_file

    from reap_vlm.fixtures.families import FIXTURES

    empty = torch.empty

    def nan_empty(*args, **kwargs):
        tensor = empty(*args, **kwargs)
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(torch, "empty", nan_empty)
    folder = FIXTURES[name].build(tmp_path / "release")
    for shard in sorted(folder.glob("*.safetensors")):
        for key, tensor in load_file(shard).items():
            assert not tensor.is_floating_point() or torch.isfinite(tensor.float()).all(), key
