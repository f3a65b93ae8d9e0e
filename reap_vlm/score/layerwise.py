"""Layer-wise REAP scoring: models larger than GPU and CPU memory, one decoder layer at a time.

The model is a skeleton on the meta device (config through transformers' ``AutoConfig``, modules
through the family's Auto class (``from_config``) under ``accelerate.init_empty_weights``).  For a
group of calibration batches (as many as fit: their hidden states on the GPU when they fit, else in
pinned host memory):

1. the token embeddings and the vision tower get real weights and the model's own multimodal
   forward runs with stand-ins for the decoder layers that capture exactly what the text model
   hands each decoder layer (hidden states, causal mask, or the linear-attention mask of a hybrid
   model's linear layers, mRoPE position embeddings, text position ids) and what it keeps for after
   the layers (visual position mask, deepstack features); then those weights are dropped;
2. decoder layer ``i`` of the skeleton (transformers' own decoder layer class) gets its
   weights from the safetensors (only that layer's keys, through ``checkpoint.tensors.memory_state_dict``,
   so dequantization and layout conversion are the loader's), every batch of the group passes
   through it with the ``ReapObserver`` hooks on, the family's ``after_decoder_layer`` adds the
   deepstack features after the layers that take them (the text model's own ``_deepstack_process``),
   and the weights are dropped.  The next layer is read on a background thread meanwhile (``layer_loader``).

The sums are saved (``resume.ResumeState``) after each group, with the number of batches done; a
rerun continues with the next group.  Same batches, same hooks, same kernels as the whole-model
forward: the scores are the whole-model engine's (tests/test_layerwise.py checks it).

One module (about 400 lines) because the skeleton, the group budget and the loop share one life cycle;
the background reader is ``layer_loader``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.ahead import BatchStream
from ..calibration.encode import num_batches, to_model
from ..checkpoint.loading import free_memory_bytes, head_weight_name
from ..checkpoint.reader import Checkpoint, loaded_bytes
from ..checkpoint.tensors import memory_state_dict
from ..errors import ReapError
from ..inference import inference
from .hooks import ReapObserver, TokenMasks
from .layer_loader import LayerLoader, to_device
from .layer_loader import pin as page_locked
from .resume import ResumeState, last_batch

log = logging.getLogger(__name__)

STORAGE_MODES = ("auto", "device", "host")
_GiB = 1 << 30


# ----------------------------------------------------------------------------------------------- tensors


def _tree_map(fn: Callable[[torch.Tensor], torch.Tensor], obj, memo: dict | None = None):
    """``fn`` applied to every tensor of a nest of dicts, lists and tuples; a tensor met twice (the layers'
    kwargs share their masks) is mapped once and stays shared."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = fn(obj)
        return memo[id(obj)]
    if isinstance(obj, dict):
        return {k: _tree_map(fn, v, memo) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_tree_map(fn, v, memo) for v in obj)
    return obj


def _tree_tensors(obj) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tree_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tree_tensors(v)


def _nbytes(obj) -> int:
    seen, total = set(), 0
    for t in _tree_tensors(obj):
        key = (t.device, t.untyped_storage().data_ptr()) if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _release(module: nn.Module) -> None:
    """Turn the module's parameters back into meta tensors (frees their memory)."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.device.type != "meta":
                sub._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)


def _buffers_to(module: nn.Module, device: torch.device) -> None:
    for sub in module.modules():
        for name, b in list(sub._buffers.items()):
            if b is not None and b.device.type != "meta" and b.device != device:
                sub._buffers[name] = b.to(device)


def _meta_params(module: nn.Module) -> list[str]:
    return [name for name, p in module.named_parameters() if p.device.type == "meta"]


# ----------------------------------------------------------------------------------------------- the model


@dataclass
class BatchState:
    """One batch between decoder layers: what the text model gives every decoder layer, what it
    keeps for after the layers (deepstack), and the observer's token masks."""

    hidden: torch.Tensor  # [B, S, H]
    # per decoder layer, what the text model passes it (attention_mask, position_ids, position_embeddings, ...):
    # hybrid models give layers of different kinds different masks; the dicts share their tensors
    layer_kwargs: list[dict]
    text_inputs: dict  # visual_pos_masks, deepstack_visual_embeds, ...
    masks: TokenMasks
    tokens: int

    def nbytes(self) -> int:
        return _nbytes([self.hidden, self.layer_kwargs, self.text_inputs])

    def to(self, device: torch.device | str, pin: bool = False) -> BatchState:
        device = torch.device(device)

        def move(t: torch.Tensor) -> torch.Tensor:
            if device.type == "cpu":
                t = t.to("cpu")
                return page_locked(t) if pin else t
            return t.to(device, non_blocking=True)

        memo: dict = {}
        return BatchState(move(self.hidden), _tree_map(move, self.layer_kwargs, memo),
                          _tree_map(move, self.text_inputs, memo), self.masks, self.tokens)


class _Reached(Exception):
    """Raised by the last decoder layer's stand-in: every layer's inputs are known."""


_TEXT_INPUTS_CONSUMED = ("input_ids", "inputs_embeds", "attention_mask", "position_ids", "past_key_values",
                         "use_cache")


def _without_vision_inputs(kwargs: dict) -> dict:
    """The keyword arguments less the vision tower's inputs computed ahead (``ModelFamily.model_inputs``'s
    ``image_*``), which the multimodal forward also hands the text model, whose layers ignore them: not kept per
    batch and layer, nor moved with each group."""
    return {k: v for k, v in kwargs.items() if not k.startswith("image_")}


def build_skeleton(ckpt: Checkpoint, dtype: torch.dtype) -> nn.Module:
    """The whole model on the meta device (buffers, e.g. rotary frequencies, real on the CPU)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(ckpt.path))
    with init_empty_weights(include_buffers=False):
        model = ckpt.family.auto_model().from_config(config, dtype=dtype)
    model.requires_grad_(False)
    return model.eval()


class LayerwiseModel:
    """The meta skeleton plus what it takes to give one part of it real weights at a time."""

    def __init__(self, ckpt: Checkpoint, device: str | torch.device, dtype: torch.dtype,
                 model: nn.Module | None = None):
        self.ckpt, self.family = ckpt, ckpt.family
        self.device, self.dtype = torch.device(device), dtype
        self.model = model if model is not None else build_skeleton(ckpt, dtype)
        self.text = self.family.text_model(self.model)
        self.multimodal = self.family.multimodal_model(self.model)
        self.layers = self.text.layers
        names = {id(m): n for n, m in self.model.named_modules()}
        self.layer_prefix = {i: names[id(layer)] + "." for i, layer in enumerate(self.layers)}
        self.layer_keys = self.family.keys_by_layer(ckpt.weight_map)
        if sorted(self.layer_keys) != list(range(len(self.layers))):
            raise ReapError(f"{ckpt.path}: checkpoint has decoder layers {sorted(self.layer_keys)[:5]}..., the "
                            f"config {len(self.layers)}")
        for i, keys in self.layer_keys.items():
            if not all(k.startswith(self.layer_prefix[i]) for k in keys):
                raise ReapError(f"{ckpt.path}: layer {i}'s keys do not sit under {self.layer_prefix[i]!r}")
        self.prelayer_keys = self.family.prelayer_keys(ckpt.weight_map)
        self.after_layer = self.family.after_decoder_layer
        _buffers_to(self.model, self.device)

    # -------------------------------------------------------------- sizes

    def layer_bytes(self, layer: int) -> int:
        """Bytes of one layer's weights in ``dtype`` (quantized weights counted dequantized)."""
        return loaded_bytes(self.ckpt, self.layer_keys[layer], self.dtype)

    def workspace_bytes(self, tokens: int, mode: str) -> int:
        """Working memory of one batch of ``tokens`` tokens through one decoder layer (an estimate)."""
        d = self.family.decoder_dims(self.text.config)
        h, i, k, e = d["hidden"], d["intermediate"], d["top_k"], d["experts"]
        qkv = (d["heads"] + 2 * d["kv_heads"]) * d["head_dim"]
        item = torch.finfo(self.dtype).bits // 8
        per_token = item * (k * (2 * h + 3 * i) + 8 * h + 2 * qkv) + 4 * 4 * e
        ws = tokens * per_token
        if mode == "full":
            ws += min(4 * _GiB, tokens * e * (3 * i + h) * item)
        return ws

    # -------------------------------------------------------------- pre-layer stage

    def load_prelayer(self) -> None:
        state = memory_state_dict(self.ckpt, self.prelayer_keys, self.dtype, "cpu")
        state = {k: to_device(v, self.device) for k, v in state.items()}
        _, unexpected = self.model.load_state_dict(state, strict=False, assign=True)
        if unexpected:
            raise ReapError(f"{self.ckpt.path}: unexpected pre-layer tensors {unexpected[:3]}")
        missing = [n for n in _meta_params(self.model) if n.startswith(self.family.prelayer_prefixes())]
        if missing:
            raise ReapError(f"{self.ckpt.path}: the checkpoint lacks {missing[:3]} (embeddings / vision tower)")

    def release_prelayer(self) -> None:
        prefixes = self.family.prelayer_prefixes()
        for name, module in self.model.named_modules():
            if (name + ".").startswith(prefixes):
                _release(module)

    # -------------------------------------------------------------- head (the layer-wise check's logits)

    def load_head(self) -> None:
        """The weights after the decoder layers (final norm, LM head; the embeddings when the head is tied to
        them) on the device."""
        keys = self.family.head_keys(self.ckpt.weight_map)
        state = memory_state_dict(self.ckpt, keys, self.dtype, "cpu")
        head = head_weight_name(self.model)
        if head not in state and getattr(self.model.config, "tie_word_embeddings", False):
            state[head] = memory_state_dict(self.ckpt, [self.family.embedding_key], self.dtype, "cpu")[
                self.family.embedding_key]
        state = {k: to_device(v, self.device) for k, v in state.items()}
        _, unexpected = self.model.load_state_dict(state, strict=False, assign=True)
        if unexpected or head not in state:
            raise ReapError(f"{self.ckpt.path}: the head's tensors do not match the model (unexpected "
                            f"{unexpected[:3]}, LM head {head!r} {'found' if head in state else 'missing'})")
        self._head_modules = [self.model.get_submodule(k.rsplit(".", 1)[0]) for k in state]

    def release_head(self) -> None:
        for module in getattr(self, "_head_modules", []):
            _release(module)
        self._head_modules = []

    def capture(self, batch: dict[str, torch.Tensor]) -> BatchState:
        """Run the model's own forward with every decoder layer replaced by a stand-in that records what the
        text model passes it and hands the hidden states on unchanged; keep layer 0's hidden states and every
        layer's arguments (a hybrid model's layers of different kinds get different masks)."""
        caught: dict = {"layers": []}
        last = len(self.layers) - 1

        def text_hook(module, args, kwargs):
            caught["text"] = _without_vision_inputs(kwargs)

        def stand_in(i: int):
            def forward(*args, **kwargs):
                kwargs = _without_vision_inputs(kwargs)
                hidden = args[0] if args else kwargs.pop("hidden_states")
                caught.setdefault("hidden", hidden)
                caught["layers"].append(kwargs)
                if i == last:
                    raise _Reached
                return hidden

            return forward

        handle = self.text.register_forward_pre_hook(text_hook, with_kwargs=True)
        for i, layer in enumerate(self.layers):
            layer.forward = stand_in(i)
        try:
            self.multimodal(**batch, use_cache=False)
        except _Reached:
            pass
        finally:
            handle.remove()
            for layer in self.layers:
                vars(layer).pop("forward", None)
        if len(caught["layers"]) != len(self.layers):
            raise ReapError(f"the model's forward reached {len(caught['layers'])} of its {len(self.layers)} "
                            "decoder layers")
        text_inputs = {k: v for k, v in caught.get("text", {}).items() if k not in _TEXT_INPUTS_CONSUMED}
        visual = self.family.visual_token_mask(batch["input_ids"], self.model.config)
        masks = TokenMasks.of(batch["attention_mask"], visual)
        return BatchState(caught["hidden"], caught["layers"], text_inputs, masks, int(masks.n_valid))

    # -------------------------------------------------------------- decoder layers

    def load_layer(self, i: int, state: dict[str, torch.Tensor]) -> nn.Module:
        """Decoder layer ``i`` with the real weights ``state`` (a ``LayerLoader.take``); ``_release`` drops them."""
        layer, prefix = self.layers[i], self.layer_prefix[i]
        missing, unexpected = layer.load_state_dict({k[len(prefix):]: v for k, v in state.items()},
                                                    strict=False, assign=True)
        if missing or unexpected:
            raise ReapError(f"decoder layer {i}: checkpoint tensors do not match the model "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        return layer

    def release_layer(self, i: int) -> None:
        _release(self.layers[i])

    def forward_layer(self, layer: nn.Module, i: int, state: BatchState) -> torch.Tensor:
        """What the text model's forward does at decoder layer ``i`` (the layer, then the family's additions, e.g.
        deepstack): the new hidden states of ``state``."""
        return self.after_layer(self.text, i, layer(state.hidden, **state.layer_kwargs[i]), state.text_inputs)

    def run_layers(self, group: list[BatchState], observer: ReapObserver, loader: LayerLoader, last_layer: int,
                   on_host: bool, desc: str = "layers", on_layer: Callable[[int], None] | None = None) -> None:
        """Every batch of ``group`` through decoder layers 0..last_layer, one layer in memory at a time.
        ``on_layer(i)`` is called once layer i is done and dropped (the benchmark's probe)."""
        bar = tqdm(total=last_layer + 1, desc=desc, unit="layer", dynamic_ncols=True, leave=False)
        for i in range(last_layer + 1):
            if i < last_layer:
                loader.request(i + 1)  # queued behind layer i's read: the disk never waits for the GPU
            layer = self.load_layer(i, loader.take(i))
            for b in group:
                s = b.to(self.device) if on_host else b
                observer.use_masks(s.masks)
                hidden = self.forward_layer(layer, i, s)
                if on_host:
                    b.hidden.copy_(hidden, non_blocking=True)
                else:
                    b.hidden = hidden
                del s, hidden
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
            _release(layer)
            bar.update(1)
            if on_layer is not None:
                on_layer(i)
        bar.close()


# ----------------------------------------------------------------------------------------------- the engine


@dataclass
class _Budget:
    device_bytes: int
    host_bytes: int
    notes: dict = field(default_factory=dict)


def _budget(lw: LayerwiseModel, mode: str, batch_tokens: int, prefetch: str, max_group_bytes: int | None,
            layer_bytes: int) -> _Budget:
    host_free = free_memory_bytes("cpu")
    host = int(host_free * 0.6) - 3 * layer_bytes
    if lw.device.type != "cuda":
        dev = host
    else:
        resident = layer_bytes * (2 if prefetch == "device" else 1)
        dev = int((free_memory_bytes(lw.device) - resident - lw.workspace_bytes(batch_tokens, mode) - _GiB) * 0.9)
    if max_group_bytes is not None:
        dev, host = min(dev, max_group_bytes), min(host, max_group_bytes)
    return _Budget(max(dev, 0), max(host, 0))


def run_layerwise(ckpt: Checkpoint, processor, samples, observer: ReapObserver, *, batch_size: int,
                  max_seq_len: int, max_pixels: int, resume: ResumeState | None, checkpoint_every: int,
                  device: str, dtype: torch.dtype, prefetch: str = "host",
                  storage: str = "auto", max_group_bytes: int | None = None,
                  model: LayerwiseModel | None = None, encode_workers: int = 0,
                  encode_kind: str = "threads") -> dict:
    """Score ``samples`` layer by layer; same meaning and return value as ``engine.run_batches``.

    The sums are saved after every group of batches (``checkpoint_every`` is accepted for the same
    call shape; a group is the unit of progress here); a ``resume.stop_after`` kill cuts the group
    there.  ``prefetch``: "host" (next layer read into pinned host memory; the GPU holds one layer)
    or "device" (read onto the GPU on a side stream; two layers).
    ``storage``: where the group's hidden states live, "auto" (GPU while they fit, else pinned host
    memory), "device" or "host".  ``max_group_bytes`` caps a group (tests use it).  ``encode_workers``: threads
    or processes (``encode_kind``) encoding batches ahead (``calibration.ahead``; 0: inline).
    """
    if storage not in STORAGE_MODES:
        raise ReapError(f"storage {storage!r} is not one of {', '.join(STORAGE_MODES)}")
    t_start = time.perf_counter()
    total = num_batches(samples, batch_size)
    done = resume.load(observer.stats) if resume else 0
    end = last_batch(done, total)
    lw = model or LayerwiseModel(ckpt, device, dtype)
    moe_layers = sorted(observer.stats.layers)
    found = [layer for layer, _ in observer.family.moe_blocks(lw.model)]
    if not set(moe_layers) <= set(found):
        raise ReapError(f"the model has MoE blocks at layers {found}, but the scores expect {moe_layers}")
    last_layer = moe_layers[-1] if moe_layers else -1
    cuda = lw.device.type == "cuda"
    result = {"batches": total, "resumed_from": done, "tokens_this_run": 0, "seconds": 0.0,
              "engine": "layerwise", "groups": 0}
    if done >= total or last_layer < 0:
        result["seconds"] = time.perf_counter() - t_start
        return result
    loader = LayerLoader(ckpt, lw.layer_keys, lw.device, dtype, prefetch)
    layer_bytes = max(lw.layer_bytes(i) for i in range(last_layer + 1))
    remaining = samples[done * batch_size:]
    # pixels cast in the workers as to_model would cast them here: the same values, half the bytes handed over
    it = BatchStream(processor, remaining, batch_size, max_seq_len, max_pixels, observer.family,
                     workers=encode_workers, kind=encode_kind, pixel_dtype=dtype, model_config=ckpt.config)
    completed, tokens, positions = done, 0, 0
    try:
        with observer.attached(observer.family.moe_blocks(lw.model)), inference():
            while completed < end:
                limit = end - completed
                loader.request(0)
                group, on_host = _form_group(lw, it, limit, observer.mode, batch_size * max_seq_len,
                                             loader.prefetch, storage, max_group_bytes, layer_bytes)
                first = completed + 1
                lw.run_layers(group, observer, loader, last_layer, on_host,
                              desc=f"REAP layer-wise, batches {first}-{completed + len(group)}/{total}")
                completed += len(group)
                tokens += sum(b.tokens for b in group)
                positions += sum(b.hidden.shape[0] * b.hidden.shape[1] for b in group)
                result["groups"] += 1
                del group
                if resume:
                    resume.save(observer.stats, completed)
                if cuda:
                    torch.cuda.empty_cache()
    finally:
        it.close()
        loader.close()
        lw.release_prelayer()
    result.update(tokens_this_run=tokens, seconds=time.perf_counter() - t_start, **it.report(positions, tokens))
    result["load"] = loader.stats.report()
    return result


def _form_group(lw: LayerwiseModel, it, limit: int, mode: str, batch_tokens: int, prefetch: str, storage: str,
                max_group_bytes: int | None, layer_bytes: int) -> tuple[list[BatchState], bool]:
    """Run the pre-layer stage for as many batches as fit; returns them and whether they sit on the host."""
    cuda = lw.device.type == "cuda"
    lw.load_prelayer()
    try:
        budget = _budget(lw, mode, batch_tokens, prefetch, max_group_bytes, layer_bytes)
        on_host = cuda and storage == "host"  # on the CPU "host" and "device" are one memory
        group: list[BatchState] = []
        used = largest = 0
        while len(group) < limit:
            batch = next(it, None)
            if batch is None:
                break
            state = lw.capture(to_model(batch, lw.device, lw.dtype, host=lw.family.host_side(batch, lw.model)))
            if on_host and cuda:
                state = state.to("cpu", pin=True)
            group.append(state)
            size = state.nbytes()
            used, largest = used + size, max(largest, size)
            if not on_host and used + largest > budget.device_bytes:
                if cuda and storage == "auto" and budget.host_bytes > budget.device_bytes + largest:
                    group = [b.to("cpu", pin=True) for b in group]
                    on_host = True
                else:
                    break
            if on_host and used + largest > budget.host_bytes:
                break
        if cuda and on_host:
            torch.cuda.current_stream(lw.device).synchronize()
    finally:
        lw.release_prelayer()
    return group, on_host
