"""Offline tiny Qwen3-VL-MoE checkpoints and calibration sets.

The checkpoint folder is shaped like the official releases (config keys, tensor
names, fused on-disk layout gate_up_proj [E, H, 2I] / down_proj [E, I, H],
sharded safetensors with an index, tokenizer, processor configs, chat template),
only tiny.  Sizes are chosen so layout bugs cannot hide: hidden (64),
moe_intermediate (48) and 2*moe_intermediate (96) all differ, and the expert
count (12) is not 2*top_k (8).  Nothing here touches the network.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from .families.qwen3_vl_moe import QWEN3_VL_MOE
from .fsutil import atomic_output_dir

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
QWEN_ADDED_TOKENS = ["<tool_call>", "</tool_call>", "<think>", "</think>"]

# Qwen3-VL's template reduced to what the fixture needs: roles, images, text.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_CORPUS = """
The quick brown fox jumps over the lazy dog. Find the bounding box of the red square.
Locate the blue circle in the image. Where is the green triangle located? Describe the picture.
Gorselde kirmizi kareyi bul. Mavi daire nerede? Yesil ucgen nerede? Resimde ne var?
{"bbox_2d": [120, 340, 560, 780]} {"bbox_2d": [0, 0, 1000, 1000]} The answer is 42.
A small model answers questions about images and text. Experts are pruned by saliency.
user assistant system image text question answer box region object left right top bottom
0 1 2 3 4 5 6 7 8 9 10 100 1000 red green blue yellow white black square circle triangle
"""


@dataclass(frozen=True)
class FixtureSpec:
    hidden_size: int = 64
    moe_intermediate_size: int = 48
    intermediate_size: int = 112  # dense MLP layers (mlp_only_layers)
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    num_experts: int = 12
    num_experts_per_tok: int = 4
    mlp_only_layers: tuple[int, ...] = ()
    decoder_sparse_step: int = 1
    vision_depth: int = 3
    vision_hidden_size: int = 32
    vision_intermediate_size: int = 80
    vision_heads: int = 2
    deepstack_visual_indexes: tuple[int, ...] = (0, 1)
    num_position_embeddings: int = 64
    per_expert: bool = False  # one tensor per expert, as the FP8/AWQ releases store them
    dtype: str = "float32"
    num_shards: int = 3
    seed: int = 0
    router_scale: float = 0.5  # router weight std: decisive routing (logit std ~ 4)
    extra_config: dict = field(default_factory=dict)

    def __post_init__(self):
        assert self.hidden_size not in (self.moe_intermediate_size, 2 * self.moe_intermediate_size)
        assert self.num_experts != 2 * self.num_experts_per_tok


def _train_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tokenizer.train_from_iterator([line for line in _CORPUS.splitlines() if line.strip()] * 4, trainer)
    return tokenizer


def write_tokenizer(folder: Path) -> dict[str, int]:
    """A byte-level BPE trained offline, plus Qwen's special tokens; returns their ids."""
    from tokenizers import AddedToken

    tokenizer = _train_tokenizer()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_ADDED_TOKENS])
    tokenizer.save(str(folder / "tokenizer.json"))
    ids = {t: tokenizer.token_to_id(t) for t in QWEN_SPECIAL_TOKENS + QWEN_ADDED_TOKENS}
    vocab = {k: v for k, v in tokenizer.get_vocab(with_added_tokens=False).items()}
    (folder / "vocab.json").write_text(json.dumps(dict(sorted(vocab.items(), key=lambda kv: kv[1]))))
    model = json.loads((folder / "tokenizer.json").read_text())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    added = {
        str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": t in QWEN_SPECIAL_TOKENS}
        for t in QWEN_SPECIAL_TOKENS + QWEN_ADDED_TOKENS
    }
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "errors": "replace",
        "model_max_length": 262144,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return {**ids, "__size__": tokenizer.get_vocab_size(with_added_tokens=True)}


def write_processor_files(folder: Path, patch_size: int = 16, merge_size: int = 2) -> None:
    common = {
        "patch_size": patch_size,
        "temporal_patch_size": 2,
        "merge_size": merge_size,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "processor_class": "Qwen3VLProcessor",
    }
    image = {**common, "size": {"shortest_edge": 64 * 64, "longest_edge": 160 * 160},
             "image_processor_type": "Qwen2VLImageProcessorFast"}
    video = {**common, "size": {"shortest_edge": 64 * 64, "longest_edge": 160 * 160 * 4},
             "video_processor_type": "Qwen3VLVideoProcessor"}
    (folder / "preprocessor_config.json").write_text(json.dumps(image, indent=2))
    (folder / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2))


def fixture_config(spec: FixtureSpec, token_ids: dict[str, int]) -> dict:
    """config.json as the official releases spell it (num_experts, rope_scaling, vision model_type)."""
    vocab_size = 64 * math.ceil(token_ids["__size__"] / 64)
    mrope_half = spec.head_dim // 2
    mrope_section = [mrope_half - 2 * (mrope_half // 4), mrope_half // 4, mrope_half // 4]
    text = {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": token_ids["<|endoftext|>"],
        "decoder_sparse_step": spec.decoder_sparse_step,
        "dtype": spec.dtype,
        "eos_token_id": token_ids["<|im_end|>"],
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "hidden_size": spec.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": spec.intermediate_size,
        "max_position_embeddings": 4096,
        "mlp_only_layers": list(spec.mlp_only_layers),
        "model_type": "qwen3_vl_moe_text",
        "moe_intermediate_size": spec.moe_intermediate_size,
        "norm_topk_prob": True,
        "num_attention_heads": spec.num_attention_heads,
        "num_experts": spec.num_experts,
        "num_experts_per_tok": spec.num_experts_per_tok,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_key_value_heads": spec.num_key_value_heads,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": mrope_section, "rope_type": "default"},
        "rope_theta": 5000000,
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    vision = {
        "deepstack_visual_indexes": list(spec.deepstack_visual_indexes),
        "depth": spec.vision_depth,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": spec.vision_hidden_size,
        "in_channels": 3,
        "initializer_range": 0.02,
        "intermediate_size": spec.vision_intermediate_size,
        "model_type": "qwen3_vl_moe",
        "num_heads": spec.vision_heads,
        "num_position_embeddings": spec.num_position_embeddings,
        "out_hidden_size": spec.hidden_size,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    config = {
        "architectures": ["Qwen3VLMoeForConditionalGeneration"],
        "image_token_id": token_ids["<|image_pad|>"],
        "model_type": "qwen3_vl_moe",
        "text_config": text,
        "tie_word_embeddings": False,
        "transformers_version": "4.57.0.dev0",
        "video_token_id": token_ids["<|video_pad|>"],
        "vision_config": vision,
        "vision_end_token_id": token_ids["<|vision_end|>"],
        "vision_start_token_id": token_ids["<|vision_start|>"],
    }
    config.update(spec.extra_config)
    return config


def _random_state_dict(config: dict, spec: FixtureSpec) -> dict[str, torch.Tensor]:
    """Random weights in the in-memory layout, scaled so routing is decisive and experts differ."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    torch.manual_seed(spec.seed)
    model = Qwen3VLMoeForConditionalGeneration(Qwen3VLMoeConfig(**config)).float()
    generator = torch.Generator().manual_seed(spec.seed + 1)
    state = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().clone()
        if name.endswith("mlp.gate.weight"):
            tensor = torch.randn(tensor.shape, generator=generator) * spec.router_scale
        elif name.endswith("mlp.experts.down_proj"):
            # Log-uniform per-expert scale in [1/4, 4]: expert output norms differ, scores separate.
            scale = torch.exp((torch.rand(tensor.shape[0], generator=generator) * 2 - 1) * math.log(4.0))
            tensor = tensor * scale[:, None, None] * 4.0
        elif name.endswith("embed_tokens.weight"):
            tensor = torch.randn(tensor.shape, generator=generator)
        state[name] = tensor.to(getattr(torch, spec.dtype)).contiguous()
    return state


def _shard(tensors: dict[str, torch.Tensor], num_shards: int) -> list[dict[str, torch.Tensor]]:
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    target = total / num_shards
    shards, current, size = [], {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > target and len(shards) < num_shards - 1:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    shards.append(current)
    return shards


def write_sharded_safetensors(folder: Path, tensors: dict[str, torch.Tensor], num_shards: int) -> None:
    shards = _shard(tensors, num_shards)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        for key, tensor in shard.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def build_tiny_checkpoint(path: str | Path, spec: FixtureSpec | None = None, force: bool = False) -> Path:
    """Write a complete tiny Qwen3-VL-MoE checkpoint folder at ``path``."""
    spec = spec or FixtureSpec()
    path = Path(path)
    with atomic_output_dir(path, force=force) as folder:
        token_ids = write_tokenizer(folder)
        write_processor_files(folder)
        config = fixture_config(spec, token_ids)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        generation = {
            "bos_token_id": token_ids["<|endoftext|>"],
            "eos_token_id": [token_ids["<|im_end|>"], token_ids["<|endoftext|>"]],
            "pad_token_id": token_ids["<|endoftext|>"],
            "do_sample": False,
            "transformers_version": "4.57.0.dev0",
        }
        (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
        state = _random_state_dict(config, spec)
        layout = QWEN3_VL_MOE.to_checkpoint_layout(state, per_expert=spec.per_expert)
        write_sharded_safetensors(folder, layout, spec.num_shards)
        (folder / "README.md").write_text("Tiny random Qwen3-VL-MoE checkpoint built offline by reap_vlm.fixtures.\n")
        (folder / "LICENSE").write_text("Apache-2.0 (random weights, test fixture)\n")
    return path


# ----------------------------------------------------------------------------------------------- calibration

SHAPE_COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle", "triangle")
_IMAGE_SIZES = ((64, 64), (96, 64), (64, 128), (128, 96))


def draw_shapes(rng: random.Random, size: tuple[int, int], count: int = 2, background=None):
    """A picture of ``count`` coloured shapes; returns it with the shapes' names ("red circle", ...)."""
    from PIL import Image, ImageDraw

    width, height = size
    image = Image.new("RGB", size, background or (rng.randint(200, 255),) * 3)
    draw = ImageDraw.Draw(image)
    regions = []
    for _ in range(count):
        color, shape = rng.choice(list(SHAPE_COLORS)), rng.choice(SHAPES)
        x0, y0 = rng.randint(0, width // 2), rng.randint(0, height // 2)
        x1 = x0 + rng.randint(max(12, width // 6), width // 2)
        y1 = y0 + rng.randint(max(12, height // 6), height // 2)
        if shape == "square":
            draw.rectangle([x0, y0, x1, y1], fill=SHAPE_COLORS[color])
        elif shape == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=SHAPE_COLORS[color])
        else:
            draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=SHAPE_COLORS[color])
        regions.append(f"{color} {shape}")
    return image, regions


def build_calibration_set(path: str | Path, num_images: int = 6, seed: int = 0, force: bool = False) -> Path:
    """Real PNG images plus the same content in the user's, chat and plain-text formats.

    Writes ``calibration_data.json`` ({"image", "regions"} + {"prompt"} items), ``chat.jsonl``
    ({"messages"}) and ``text.json`` ({"text"}) with images under ``images/``.
    """
    rng = random.Random(seed)
    path = Path(path)
    with atomic_output_dir(path, force=force) as folder:
        (folder / "images").mkdir()
        user_items, chat_items = [], []
        for i in range(num_images):
            image, regions = draw_shapes(rng, _IMAGE_SIZES[i % len(_IMAGE_SIZES)])
            rel = f"images/{i:05d}.png"
            image.save(folder / rel)
            user_items.append({"id": i, "image": rel, "original_id": f"img-{i}", "regions": regions})
            chat_items.append({"messages": [
                {"role": "user", "content": [
                    {"type": "image", "image": rel},
                    {"type": "text", "text": f"Find the bounding box of \"{regions[0]}\"."},
                ]},
            ]})
        user_items.append({"prompt": "Describe what a bounding box is."})
        user_items.append({"prompt": "Resimde ne var?"})
        chat_items.append({"messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is 10 + 32?"},
            {"role": "assistant", "content": "The answer is 42."},
        ]})
        texts = [{"text": line.strip()} for line in _CORPUS.splitlines() if line.strip()]
        (folder / "calibration_data.json").write_text(json.dumps(user_items, indent=2, ensure_ascii=False))
        (folder / "chat.jsonl").write_text("".join(json.dumps(item) + "\n" for item in chat_items))
        (folder / "text.json").write_text(json.dumps(texts, indent=2))
    return path


def build_demo(folder: str | Path) -> tuple[Path, Path]:
    """``folder``/model and ``folder``/calibration, built once and reused (the demo's inputs)."""
    folder = Path(folder)
    model, calib = folder / "model", folder / "calibration"
    if not (model / "config.json").is_file():
        build_tiny_checkpoint(model, force=model.exists())
    if not (calib / "calibration_data.json").is_file():
        build_calibration_set(calib, force=calib.exists())
    return model, calib


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Build the tiny offline demo model and calibration set.")
    parser.add_argument("folder", nargs="?", default="demo", help="where model/ and calibration/ go (default: demo)")
    args = parser.parse_args()
    model_dir, calib_dir = build_demo(args.folder)
    print(f"model        {model_dir}\ncalibration  {calib_dir / 'calibration_data.json'}")
