"""Train the reference Qwen3-VL-MoE on the procedural tasks and write it as a release-shaped folder.

    python -m reference.train --out reference/model            # the recipe below, on a GPU
    python -m reference.train --out /tmp/m --steps 3 --batch 8 --device cpu   # a smoke run

The model is transformers' own ``Qwen3VLMoeForConditionalGeneration``; training swaps in two
faster forwards that compute the same function (tests check them against the originals): the
experts as two batched matmuls over expert-sorted tokens, and the vision attention over equal-length
images as one batched call.  Items are drawn and encoded on worker processes (reference.tasks,
reference.model_files.Encoder), so the GPU does not wait.

The recipe is fixed before any pruning result is seen and is not tuned for any pruning criterion:
AdamW (0.9, 0.95, weight decay 0.1 on matrices), peak learning rate 1e-3 with 100 warm-up steps and
a cosine decay to 10%, bf16 autocast over fp32 weights, gradient clipping at 1.0, the loss on the
answer tokens only plus 0.01 x the Switch load-balancing loss of every MoE layer (every expert gets
trained), task mix 30% grounding, 30% visual questions, 40% text.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from reap_vlm.check.accuracy import EvalItem, is_right
from reap_vlm.check.bbox import check_box
from reap_vlm.families.qwen3_vl_moe import QWEN3_VL_MOE

from .model_files import Encoder, collate, write_model_files
from .tasks import draw_items, make_item

TASK_WEIGHTS = {"grounding": 0.3, "color": 0.1, "count": 0.1, "position": 0.1,
                "arithmetic": 0.1, "translate": 0.1, "reverse": 0.1, "sort": 0.1}
BALANCE_COEF = 0.01
TRAIN_SEED_BASE = 1_000_000  # evaluation and calibration sets use seeds below this


# ------------------------------------------------------------------------------------- fast forwards

def experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """Qwen3VLMoeTextExperts.forward as two bmm over a [experts, capacity, hidden] buffer."""
    tokens, hidden = hidden_states.shape
    k = top_k_index.shape[1]
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=self.num_experts)
    capacity = int(counts.max())
    sorted_expert = flat[order]
    slot = torch.arange(flat.numel(), device=flat.device) - (torch.cumsum(counts, 0) - counts)[sorted_expert]
    token = order // k
    buffer = hidden_states.new_zeros(self.num_experts, capacity, hidden)
    buffer[sorted_expert, slot] = hidden_states[token]
    gate, up = torch.bmm(buffer, self.gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)
    out = torch.bmm(self.act_fn(gate) * up, self.down_proj.transpose(1, 2))
    weighted = out[sorted_expert, slot] * top_k_weights.reshape(-1)[order, None]
    final = torch.zeros_like(hidden_states)
    final.index_add_(0, token, weighted.to(final.dtype))
    return final


def vision_attention_forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None,
                             **kwargs):
    """Qwen3VLMoeVisionAttention.forward for images of one size: one batched attention call."""
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import apply_rotary_pos_emb_vision

    seq = hidden_states.shape[0]
    images = cu_seqlens.numel() - 1
    length = seq // images
    q, k, v = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    q, k, v = (t.reshape(images, length, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=self.scaling)
    return self.proj(out.transpose(1, 2).reshape(seq, -1))


def install_fast_forwards(model) -> None:
    import types

    for module in model.modules():
        name = type(module).__name__
        if name == "Qwen3VLMoeTextExperts":
            module.forward = types.MethodType(experts_forward, module)
        elif name == "Qwen3VLMoeVisionAttention":
            module.forward = types.MethodType(vision_attention_forward, module)


class RouterLogits:
    """Collects every MoE router's logits of a forward (for the load-balancing loss)."""

    def __init__(self, model):
        self.logits = []
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules()
                        if type(m).__name__ == "Qwen3VLMoeTextTopKRouter"]

    def _hook(self, module, args, output):
        self.logits.append(output[0])

    def balance_loss(self, keep: torch.Tensor, top_k: int) -> torch.Tensor:
        """Switch loss, E * sum_j f_j P_j, over the real tokens (``keep``), averaged over layers."""
        losses = []
        for logits in self.logits:
            logits = logits[keep]
            probs = logits.float().softmax(-1)
            chosen = torch.zeros_like(probs).scatter_(1, probs.topk(top_k, dim=-1).indices, 1.0)
            fraction = chosen.mean(0) / top_k
            losses.append(probs.shape[1] * (fraction * probs.mean(0)).sum())
        self.logits = []
        return torch.stack(losses).mean()


# ----------------------------------------------------------------------------------------------- data

class Batches(torch.utils.data.IterableDataset):
    """Endless encoded training batches; worker w of step s draws with seed (base, w, s)."""

    def __init__(self, folder: Path, batch: int, seed: int):
        self.folder, self.batch, self.seed = folder, batch, seed

    def __iter__(self):
        from transformers import AutoTokenizer

        info = torch.utils.data.get_worker_info()
        if info is not None:
            torch.set_num_threads(1)  # workers with default threading stall each other
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        tokenizer = AutoTokenizer.from_pretrained(self.folder)
        encoder = Encoder(tokenizer)
        tasks, weights = zip(*TASK_WEIGHTS.items())
        step = worker
        while True:
            rng = random.Random(f"{TRAIN_SEED_BASE + self.seed}:{step}")
            chosen = rng.choices(tasks, weights, k=self.batch)
            items = [make_item(rng, task) for task in chosen]
            batch = collate([encoder.encode(item) for item in items], tokenizer.pad_token_id)
            yield {key: torch.from_numpy(value) for key, value in batch.items()}
            step += workers


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def teacher_forced_accuracy(model, batches, tokenizer, device) -> dict[str, float]:
    """Per task: the share of items whose every answer token is the argmax given the right prefix —
    exactly the items greedy decoding answers right; grounding: IoU >= 0.5 of the box so predicted."""
    model.eval()
    hits: dict[str, list[float]] = {}
    for tasks, answers, batch in batches:
        batch = to_device(batch, device)
        labels = batch.pop("labels")
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(**batch).logits
        predicted = logits[:, :-1].argmax(-1)
        target = labels[:, 1:]
        for i, task in enumerate(tasks):
            mask = target[i] != -100
            if task == "grounding":  # right as the check judges it: IoU >= 0.5
                text = tokenizer.decode(predicted[i][mask].tolist(), skip_special_tokens=True)
                item = EvalItem(task, "", None, box=check_box(answers[i]))
                score = float(is_right(item, text, QWEN3_VL_MOE.box_format))
            else:
                score = float(bool((predicted[i][mask] == target[i][mask]).all()))
            hits.setdefault(task, []).append(score)
    model.train()
    return {task: sum(v) / len(v) for task, v in sorted(hits.items())}


def held_out_batches(tokenizer, per_task: int, batch: int):
    encoder = Encoder(tokenizer)
    items = draw_items(seed=TRAIN_SEED_BASE - 1, count_per_task=per_task)  # not the eval file's seed
    out = []
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        collated = collate([encoder.encode(item) for item in chunk], tokenizer.pad_token_id)
        out.append(([it.task for it in chunk], [it.bbox_2d for it in chunk],
                    {k: torch.from_numpy(v) for k, v in collated.items()}))
    return out


# ------------------------------------------------------------------------------------------- training

def lr_at(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def build_model(folder: Path, init: Path | None, device):
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    if init is not None:
        model = Qwen3VLMoeForConditionalGeneration.from_pretrained(init, dtype=torch.float32)
    else:
        config = Qwen3VLMoeConfig.from_pretrained(folder)
        torch.manual_seed(0)
        model = Qwen3VLMoeForConditionalGeneration(config).float()
    install_fast_forwards(model)
    return model.to(device).train()


def export(model, folder: Path, max_shard_bytes: int = 15 * 2**20) -> None:
    """bf16 weights in the official fused on-disk layout, in shards under 16 MiB (git-friendly)."""
    from reap_vlm.fixtures.tiny import write_sharded_safetensors

    state = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    for old in folder.glob("model*.safetensors*"):
        old.unlink()
    write_sharded_safetensors(folder, QWEN3_VL_MOE.to_checkpoint_layout(state, per_expert=False),
                              max_shard_bytes=max_shard_bytes)


def train(args) -> dict:
    device = torch.device(args.device)
    folder = Path(args.out)
    write_model_files(folder)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = build_model(folder, Path(args.init) if args.init else None, device)
    top_k = model.config.text_config.num_experts_per_tok
    router = RouterLogits(model)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    loader = torch.utils.data.DataLoader(Batches(folder, args.batch, args.seed), batch_size=None,
                                         num_workers=args.workers, pin_memory=device.type == "cuda",
                                         prefetch_factor=4 if args.workers else None,
                                         persistent_workers=bool(args.workers))
    held_out = held_out_batches(tokenizer, args.eval_per_task, batch=256)
    log = {"args": vars(args), "steps": [], "eval": []}
    start = time.time()
    step, skipped, step20 = 0, [], start
    log["skipped_steps"] = skipped
    for step, batch in enumerate(loader):
        if step == 40 and not args.steps:
            # --steps 0: as many steps as fit the time budget at the speed of steps 20-40 (inside the
            # warm-up, whose length does not depend on the total); the log records the number.
            per_step = (time.time() - step20) / 20
            args.steps = int(0.95 * (args.max_minutes * 60 - (time.time() - start)) / per_step) // 50 * 50 + 40
            print(f"{per_step * 1000:.0f} ms per step: --steps {args.steps}", flush=True)
        if step == 20:
            step20 = time.time()
        if (args.steps and step >= args.steps) or time.time() - start > args.max_minutes * 60:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps or 10**9, args.lr)
        batch = to_device(batch, device)
        labels = batch.pop("labels")
        router.logits = []  # evaluation forwards fill it too
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(**batch).logits
            answer_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                          ignore_index=-100)
            balance = router.balance_loss((batch["input_ids"] != tokenizer.pad_token_id).flatten(), top_k)
            loss = answer_loss + BALANCE_COEF * balance
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if not torch.isfinite(grad_norm):
            # One non-finite gradient would turn every weight into NaN: skip the step, count it.
            bad = [n for n, p in model.named_parameters() if p.grad is not None and not p.grad.isfinite().all()]
            skipped.append({"step": step, "loss": answer_loss.item(), "balance": balance.item(), "grads": bad[:4]})
            print("skipped", json.dumps(skipped[-1]), flush=True)
            continue
        optimizer.step()
        if step % args.log_every == 0:
            entry = {"step": step, "seconds": round(time.time() - start, 1), "loss": round(answer_loss.item(), 4),
                     "balance": round(balance.item(), 4), "lr": optimizer.param_groups[0]["lr"]}
            log["steps"].append(entry)
            print(json.dumps(entry), flush=True)
        if args.eval_every and step % args.eval_every == 0 and step:
            accuracy = teacher_forced_accuracy(model, held_out, tokenizer, device)
            log["eval"].append({"step": step, **accuracy})
            print("eval", step, json.dumps({k: round(v, 3) for k, v in accuracy.items()}), flush=True)
    router.logits = []
    accuracy = teacher_forced_accuracy(model, held_out, tokenizer, device)
    log["eval"].append({"step": step, **accuracy})
    log["train_seconds"] = round(time.time() - start, 1)
    log["steps_done"] = step
    print("final", json.dumps({k: round(v, 3) for k, v in accuracy.items()}), flush=True)
    for handle in router.handles:
        handle.remove()
    export(model, folder)
    (folder / "training_log.json").write_text(json.dumps(log, indent=1))
    return log


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="model folder to write")
    parser.add_argument("--init", help="continue from the weights of this model folder")
    parser.add_argument("--steps", type=int, default=0,
                        help="optimizer steps, the schedule's length (0: as many as fit --max-minutes)")
    parser.add_argument("--batch", type=int, default=1024, help="items per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=min(12, max(0, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--max-minutes", type=float, default=9.0, help="stop early after this long")
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--eval-per-task", type=int, default=64)
    train(parser.parse_args(argv))


if __name__ == "__main__":
    main()
