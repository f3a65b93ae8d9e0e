"""The reference model's folder (config, tokenizer, processor, chat template) and its fast encoder.

The folder is spelled like an official Qwen3-VL-MoE release (the project's fixture writer makes the
config, processor and template files); only the tokenizer differs: a byte-level BPE trained here on
the tasks' text, with Qwen's pre-tokenizer (digits one by one) and special tokens.

``Encoder`` turns a task item into the exact tensors the processor and chat template would give
(token ids, pixel patches, 3-D rotary positions), without Jinja or the image processor, so that
training can encode thousands of items a second; tests check it against the processor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reap_vlm.fixtures.tiny import FixtureSpec, fixture_config, save_qwen_tokenizer, write_processor_files

from .tasks import IMAGE_SIZE, Item, corpus_lines

# The shipped model's shape: 32 experts x 6 MoE layers, top-4; hidden != moe_intermediate (x2).
REFERENCE_SPEC = FixtureSpec(
    hidden_size=256,
    moe_intermediate_size=112,
    intermediate_size=448,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    num_experts=32,
    num_experts_per_tok=4,
    vision_depth=4,
    vision_hidden_size=256,
    vision_intermediate_size=512,
    vision_heads=4,
    deepstack_visual_indexes=(1, 2),
    num_position_embeddings=64,
    dtype="bfloat16",
)
PATCH, MERGE, TEMPORAL = 16, 2, 2
GRID = IMAGE_SIZE // PATCH  # patches per side
IMAGE_TOKENS = (GRID // MERGE) ** 2


def write_tokenizer(folder: Path, vocab_size: int = 640) -> dict[str, int]:
    """A BPE trained on the tasks' text with Qwen2's own normalizer and pre-tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(corpus_lines(), trainer)
    return save_qwen_tokenizer(tokenizer, folder)


def write_model_files(folder: Path) -> dict:
    """Everything of the model folder but the weights; returns config.json's content."""
    folder.mkdir(parents=True, exist_ok=True)
    token_ids = write_tokenizer(folder)
    write_processor_files(folder, patch_size=PATCH, merge_size=MERGE)
    config = fixture_config(REFERENCE_SPEC, token_ids)
    config["text_config"]["router_aux_loss_coef"] = 0.001  # as the official configs; training sets its own
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": token_ids["<|endoftext|>"],
                  "eos_token_id": [token_ids["<|im_end|>"], token_ids["<|endoftext|>"]],
                  "pad_token_id": token_ids["<|endoftext|>"], "do_sample": False,
                  "transformers_version": "4.57.0.dev0"}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return config


# --------------------------------------------------------------------------------------------- encoding

def patchify(image) -> np.ndarray:
    """Pixel patches as Qwen2-VL's image processor makes them for an IMAGE_SIZE square RGB image:
    scaled to [-1, 1] (mean = std = 0.5), the frame repeated over the temporal patch, patches in
    2x2 merge order, each flattened as (channel, time, row, column)."""
    pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
    pixels = (pixels - 0.5) / 0.5
    frames = np.broadcast_to(pixels[None], (TEMPORAL, 3, IMAGE_SIZE, IMAGE_SIZE))
    g = GRID // MERGE
    patches = frames.reshape(1, TEMPORAL, 3, g, MERGE, PATCH, g, MERGE, PATCH)
    patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(patches.reshape(GRID * GRID, 3 * TEMPORAL * PATCH * PATCH))


def _positions(prefix_len: int, has_image: bool, total_len: int) -> np.ndarray:
    """3-D rotary positions (temporal, height, width) as Qwen3-VL's get_rope_index gives them: text
    counts on, the image's merged tokens sit on a grid offset by the position where the image starts,
    and text after the image resumes at that start + the grid side."""
    if not has_image:
        return np.broadcast_to(np.arange(total_len), (3, total_len)).copy()
    g = GRID // MERGE
    start = prefix_len
    rows, cols = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
    image = np.stack([np.full(g * g, start), rows.reshape(-1) + start, cols.reshape(-1) + start])
    after = total_len - prefix_len - g * g
    text_after = np.broadcast_to(np.arange(after) + start + g, (3, after))
    before = np.broadcast_to(np.arange(prefix_len), (3, prefix_len))
    return np.concatenate([before, image, text_after], axis=1)


@dataclass
class Encoded:
    input_ids: np.ndarray  # [L] int64
    labels: np.ndarray  # [L] int64, -100 outside the answer
    positions: np.ndarray  # [3, L]
    pixels: np.ndarray | None  # [GRID*GRID, 1536] float32


class Encoder:
    """Item -> the tensors the processor and the chat template would give, without them."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.image_block = "<|vision_start|>" + "<|image_pad|>" * IMAGE_TOKENS + "<|vision_end|>"
        self.vision_start_len = len(tokenizer("<|im_start|>user\n", add_special_tokens=False)["input_ids"])

    def prompt_text(self, item: Item) -> str:
        image = self.image_block if item.image is not None else ""
        return f"<|im_start|>user\n{image}{item.prompt}<|im_end|>\n<|im_start|>assistant\n"

    def encode(self, item: Item, with_answer: bool = True) -> Encoded:
        prompt = self.tokenizer(self.prompt_text(item), add_special_tokens=False)["input_ids"]
        answer = self.tokenizer(item.answer + "<|im_end|>", add_special_tokens=False)["input_ids"] \
            if with_answer else []
        ids = np.asarray(prompt + answer, dtype=np.int64)
        labels = np.full(len(ids), -100, dtype=np.int64)
        labels[len(prompt):] = answer
        has_image = item.image is not None
        # The image's grid begins after "<|im_start|>user\n<|vision_start|>".
        positions = _positions(self.vision_start_len + 1, has_image, len(ids))
        pixels = patchify(item.image) if has_image else None
        return Encoded(ids, labels, positions, pixels)


def collate(encoded: list[Encoded], pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded batch; padding is never attended to by real tokens (causal) nor scored."""
    length = max(len(e.input_ids) for e in encoded)
    batch = len(encoded)
    input_ids = np.full((batch, length), pad_id, dtype=np.int64)
    labels = np.full((batch, length), -100, dtype=np.int64)
    positions = np.zeros((3, batch, length), dtype=np.int64)
    for i, e in enumerate(encoded):
        n = len(e.input_ids)
        input_ids[i, :n], labels[i, :n], positions[:, i, :n] = e.input_ids, e.labels, e.positions
        positions[:, i, n:] = e.positions[:, -1:] + 1 + np.arange(length - n)
    out = {"input_ids": input_ids, "labels": labels, "position_ids": positions}
    images = [e.pixels for e in encoded if e.pixels is not None]
    if images:
        out["pixel_values"] = np.concatenate(images)
        out["image_grid_thw"] = np.tile(np.array([[1, GRID, GRID]], dtype=np.int64), (len(images), 1))
    return out

