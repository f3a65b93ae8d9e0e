"""What a model family is, as data: where its MoE layers, routers and experts live.

Everything the pipeline knows about a model family is asked of a ``ModelFamily``; this module holds
no family's values, only the generic machinery over them.  Its faces:

* config: the text section of config.json, expert count, top-k, MoE layers, sizes;
* checkpoint: ``classify`` a safetensors key; ``ExpertTensorLayout`` for fused tensors;
* tokens and processor: visual token ids, the vision merge size, where an image starts, box format;
* runtime: MoE blocks in a loaded model, routing, expert outputs (scoring, masked routing);
* layer-wise: what runs before decoder layer 0 and what the text model does between layers.

A family is one module in this package: its data as a ``ModelFamily`` value (or a subclass with
the few methods it computes differently; ``fused_experts`` has the machinery of transformers 5's
fused gate_up/down experts), listed in ``FAMILIES``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, fields
from enum import Enum

import torch
from torch import nn

from ..errors import ReapError


def float32_norm(y: torch.Tensor) -> torch.Tensor:
    """||y||_2 over the last dim, as float32; a float64 model's (the exactness tests') computed in float64."""
    if y.dtype == torch.float64:
        return torch.linalg.vector_norm(y, dim=-1).float()
    return torch.linalg.vector_norm(y, dim=-1, dtype=torch.float32)


def peaks_by_abs(y: torch.Tensor) -> torch.Tensor:
    """max_h |y_h| over the last dim, float32, through a copy of |y|."""
    return y.abs().amax(dim=-1).float()


def peaks_by_aminmax(y: torch.Tensor) -> torch.Tensor:
    """max_h |y_h| over the last dim, float32, as max(max, -min): y read once, no copy (bitwise the same)."""
    low, high = torch.aminmax(y, dim=-1)
    return torch.maximum(high, low.neg()).float()


def output_stats(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(||y||_2, max |y_h|) over the last dim of expert outputs y, float32: REAP's norm and the super-experts
    statistic (the largest absolute element of the down_proj output).  On a GPU the peak by aminmax: ``y.abs()``
    first writes a copy of y (a routed text batch's is ~0.4 GB per MoE layer at 30B's widths; 0.36 against 0.18 ms
    on an H200, bench_routed_observer.py).  The CPU's aminmax is the slower one."""
    return float32_norm(y), (peaks_by_aminmax if y.is_cuda else peaks_by_abs)(y)


class KeyRole(Enum):
    FUSED_EXPERTS = "fused_experts"  # one tensor holds every expert of a layer, expert on dim 0
    PER_EXPERT = "per_expert"  # one tensor per expert: ...experts.{e}.<proj>.<suffix>
    ROUTER = "router"  # one row per expert on dim 0 (router weight, score bias)
    OTHER = "other"  # copied unchanged
    DROPPED = "dropped"  # a part the model never loads that holds experts of its own: left out when pruning


@dataclass(frozen=True)
class KeyInfo:
    role: KeyRole
    layer: int | None = None
    expert: int | None = None
    name: str | None = None  # fused tensor name, per-expert "<proj>.<suffix>", or router param
    prefix: str | None = None  # everything before the expert index / tensor name


@dataclass(frozen=True)
class ExpertTensorLayout:
    """A fused expert tensor: its name under ``experts.`` and how disk and memory differ.

    ``memory`` and ``disk`` name the dims after the expert dim, e.g. ("2I", "H") in memory
    and ("H", "2I") on disk.  When they differ the tensor is transposed on load (dims 1, 2),
    which is only decidable because sizes are checked against the config.
    """

    name: str
    memory: tuple[str, str]
    disk: tuple[str, str]

    def shapes(self, sizes: dict[str, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        return tuple(sizes[d] for d in self.memory), tuple(sizes[d] for d in self.disk)

    def to_memory(self, tensor: torch.Tensor, sizes: dict[str, int], key: str) -> torch.Tensor:
        memory, disk = self.shapes(sizes)
        if tuple(tensor.shape[1:]) == memory:
            return tensor
        if tuple(tensor.shape[1:]) == disk:
            return tensor.transpose(1, 2)
        raise ReapError(f"{key}: shape {tuple(tensor.shape)} fits neither [E, {memory}] nor [E, {disk}]; "
                        "the checkpoint does not match its config.json")

    def to_disk(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.transpose(1, 2).contiguous() if self.memory != self.disk else tensor


@dataclass(frozen=True)
class BoxFormat:
    """How a family's grounding answers write a box: coordinates in 0..``coord_max`` relative to the image,
    under one of ``keys`` (compared lower-case without punctuation) or as a bare list, or written as
    the pair ``(x1,y1),(x2,y2)`` when ``pairs``."""

    coord_max: float
    keys: frozenset[str]
    pairs: bool = True


# The common convention of grounding VLMs (a family names it as its ``box_format``; not a default).
NORMALIZED_1000 = BoxFormat(1000.0, frozenset({"bbox2d", "bbox", "box", "box2d", "boundingbox", "boundingbox2d"}))


@dataclass(frozen=True)
class ThinkingFormat:
    """How a family's Thinking models mark their thinking: the block opens with ``open`` (a Thinking chat template
    ends the generation prompt with it) and ends with ``close``; ``empty`` is the closed, empty block that the
    family's templates write for no-thinking generation (appended in place of an open one)."""

    open: str
    close: str
    empty: str


@dataclass(frozen=True)
class ModelFamily:
    name: str
    model_types: tuple[str, ...]  # config.json model_type values
    processor_types: tuple[str, ...]  # class names of its processors (AutoProcessor)
    layer_prefix: str  # regex of a decoder layer's checkpoint key prefix, with (?P<layer>\d+)
    module_layer_regex: str  # same, for module names at run time
    moe_module: str  # the decoder layer's MoE block, e.g. "mlp"
    router_module: str  # the router inside the MoE block
    experts_module: str  # the experts inside the MoE block
    text_section_key: str | None  # where the language model's settings sit in config.json (None: top level)
    expert_count_keys: tuple[str, ...]  # every key that holds the expert count (all are rewritten)
    top_k_key: str
    embedding_key: str  # lm_head's source when tie_word_embeddings
    prelayer: tuple[str, ...]  # key/module prefixes of what runs before decoder layer 0
    box_format: BoxFormat
    # transformers' Auto class that builds the model from config.json ("AutoModelForImageTextToText",
    # "AutoModelForCausalLM"): the loader, the layer-wise skeleton and the check ask it.
    auto_model_class: str
    # Whether the model takes images: a text-only family scores and checks text only, and calibration items
    # with images are refused before anything loads.
    has_vision: bool
    fused: tuple[ExpertTensorLayout, ...] = ()
    thinking: ThinkingFormat | None = None  # None: the family has no thinking block
    # Key prefixes of parts transformers never loads that carry experts of their own (e.g. next-token-prediction
    # layers for speculative decoding): never scored, left out of the pruned checkpoint (``KeyRole.DROPPED``),
    # the config told so by ``config_after_pruning``.  The family's docstring says why.
    dropped_prefixes: tuple[str, ...] = ()
    # Key prefixes of the vision tower's parts that run on every patch (its blocks, the patch embedding); the rest
    # of the pre-layer part but the embeddings (mergers, projectors) runs once per image token.  For the forward's
    # cost estimate that balances torchrun's shares (``checkpoint.reader.forward_weights``).
    vision_per_patch: tuple[str, ...] = ()

    def derived(self, cls: type[ModelFamily], **changes) -> ModelFamily:
        """A family of class ``cls`` (a subclass that computes some things its own way) with this family's data
        but ``changes``: for a family whose checkpoints are laid out like this one's."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return cls(**{**values, **changes})

    # ------------------------------------------------------------------ config face

    def auto_model(self):
        """transformers' Auto class for this family's checkpoints (``from_pretrained`` / ``from_config``)."""
        import transformers

        return getattr(transformers, self.auto_model_class)

    def text_section(self, config):
        """The language model's settings: a config.json dict's section, or a transformers config's attribute."""
        key = self.text_section_key
        if isinstance(config, dict):
            return config[key] if key and key in config else config
        section = getattr(config, key, None) if key else None
        return config if section is None else section

    def text_section_path(self, config: dict) -> tuple[str, ...]:
        """The keys leading to ``text_section(config)`` in config.json (empty: the top level)."""
        key = self.text_section_key
        return (key,) if key and key in config else ()

    def config_sections(self, config) -> list:
        """The top level and the text section (once, when they are one)."""
        text = self.text_section(config)
        return [config] if text is config else [config, text]

    def vocab_size(self, config: dict) -> int:
        return int(self.text_section(config)["vocab_size"])

    def decoder_dims(self, text_config) -> dict[str, int]:
        """A transformers text config's sizes (for memory estimates): hidden, intermediate (an expert's),
        top_k, experts, heads, kv_heads, head_dim."""
        raise NotImplementedError

    def num_experts(self, config: dict) -> int:
        text = self.text_section(config)
        for key in self.expert_count_keys:
            if key in text:
                return int(text[key])
        raise ReapError(f"config.json has no expert count ({' / '.join(self.expert_count_keys)}); "
                        f"is this a {self.name} MoE checkpoint?")

    def top_k(self, config: dict) -> int:
        return int(self.text_section(config)[self.top_k_key])

    def num_layers(self, config: dict) -> int:
        return int(self.text_section(config)["num_hidden_layers"])

    def moe_layers(self, config: dict) -> list[int]:
        """Decoder layers with a sparse MoE block."""
        raise NotImplementedError

    def sizes(self, config: dict) -> dict[str, int]:
        text = self.text_section(config)
        inter = int(text["moe_intermediate_size"])
        return {"H": int(text["hidden_size"]), "I": inter, "2I": 2 * inter}

    def config_after_pruning(self, text_section: dict) -> dict[str, int]:
        """Keys of the text section to set in the pruned config besides the expert count (what the dropped parts
        took with them), with their new values."""
        return {}

    def left_out(self, key: str, config: dict) -> bool:
        """Whether checkpoint ``key`` (or a module name) belongs to a part the model never loads and the pruned
        checkpoint leaves out: a dropped prefix (``is_dropped``), or a decoder layer past ``num_hidden_layers``
        (the next-token-prediction layer some releases append after the stack, GLM-4.5V's layer 46).  Never
        loaded, so never scored; ``config_after_pruning`` tells the config."""
        if self.is_dropped(key):
            return True
        layer, layers = self.layer_of_key(key), self.text_section(config).get("num_hidden_layers")
        return layer is not None and layers is not None and layer >= int(layers)

    def set_num_experts(self, config: dict, count: int) -> list[str]:
        """Write ``count`` under every expert-count key the config already has; return the keys."""
        text = self.text_section(config)
        keys = [k for k in self.expert_count_keys if k in text]
        for key in keys:
            text[key] = count
        return keys

    # ------------------------------------------------------------------ checkpoint face

    def _patterns(self):
        layer = self.layer_prefix + re.escape(self.moe_module) + r"\."
        experts = layer + re.escape(self.experts_module)
        return (
            re.compile(rf"^(?P<prefix>{experts})\.(?P<expert>\d+)\.(?P<name>.+)$"),
            re.compile(rf"^(?P<prefix>{experts})\.(?P<name>[^.]+)$"),
            re.compile(rf"^(?P<prefix>{layer}{re.escape(self.router_module)})\.(?P<name>[^.]+)$"),
        )

    def is_dropped(self, name: str) -> bool:
        """Whether a checkpoint key or module name belongs to a part the pruned checkpoint leaves out."""
        return bool(self.dropped_prefixes) and name.startswith(self.dropped_prefixes)

    def classify(self, key: str) -> KeyInfo:
        if self.is_dropped(key):
            return KeyInfo(KeyRole.DROPPED)
        per_expert, fused, router = self._patterns()
        if m := per_expert.match(key):
            return KeyInfo(KeyRole.PER_EXPERT, int(m["layer"]), int(m["expert"]), m["name"], m["prefix"])
        if m := fused.match(key):
            return KeyInfo(KeyRole.FUSED_EXPERTS, int(m["layer"]), None, m["name"], m["prefix"])
        if m := router.match(key):
            return KeyInfo(KeyRole.ROUTER, int(m["layer"]), None, m["name"], m["prefix"])
        if re.search(rf"(^|\.){re.escape(self.experts_module)}\.\d+\.", key):
            raise ReapError(f"checkpoint key {key!r} carries an expert index but matches no {self.name} rule; "
                            "refusing to copy it unpruned (is this the right model family?)")
        return KeyInfo(KeyRole.OTHER)

    def expert_module_pattern(self) -> re.Pattern:
        """A module name that names one expert of one layer (groups ``layer`` and ``expert``)."""
        experts = re.escape(self.moe_module) + r"\." + re.escape(self.experts_module)
        return re.compile(self.module_layer_regex + experts + r"\.(?P<expert>\d+)(?=\.|$)")

    def router_weight_name(self) -> str:
        """The router weight's name inside a decoder layer (for messages)."""
        return f"{self.moe_module}.{self.router_module}.weight"

    def fused_layout(self, name: str) -> ExpertTensorLayout | None:
        return next((f for f in self.fused if f.name == name), None)

    def to_checkpoint_layout(self, state: dict[str, torch.Tensor], per_expert: bool) -> dict[str, torch.Tensor]:
        """In-memory state dict -> on-disk keys: fused (official layout) or one tensor per expert."""
        out = {}
        for key, tensor in state.items():
            info = self.classify(key)
            if info.role is not KeyRole.FUSED_EXPERTS:
                out[key] = tensor
            elif not per_expert:
                out[key] = self.fused_layout(info.name).to_disk(tensor)
            else:
                for expert, tensors in enumerate(self.split_fused(info.name, tensor)):
                    for proj, weight in tensors.items():
                        out[f"{info.prefix}.{expert}.{proj}.weight"] = weight.contiguous()
        return out

    def split_fused(self, name: str, tensor: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """In-memory fused tensor -> per expert {proj: Linear weight [out, in]}."""
        raise NotImplementedError

    def fuse_per_expert(self, name: str, per_expert: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """Per expert {proj: Linear weight} -> in-memory fused tensor ``name``."""
        raise NotImplementedError

    def fused_sources(self) -> dict[str, tuple[str, ...]]:
        """Which per-expert projections make up each fused tensor."""
        raise NotImplementedError

    # Filling a fused tensor in place, one expert's projection at a time (the loader's way: a layer's
    # per-expert weights are never held twice, as a list and as its stack).  ``fuse_per_expert`` of the
    # same tensors gives the same result.

    def fused_shape(self, name: str, num_experts: int, proj: str, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the in-memory fused tensor ``name`` of ``num_experts`` experts, given the Linear weight
        shape [out, in] of one of its source projections ``proj``."""
        raise NotImplementedError

    def fused_slot(self, name: str, fused: torch.Tensor, expert: int | slice, proj: str) -> torch.Tensor:
        """The view of fused tensor ``name`` that holds expert ``expert``'s projection ``proj`` (its Linear
        weight [out, in]); ``expert`` may be a slice (a range of experts: [n, out, in])."""
        raise NotImplementedError

    def fuse_per_expert_into(self, name: str, out: torch.Tensor, expert: int, tensors: dict[str, torch.Tensor]) -> None:
        """Copy expert ``expert``'s projections ``tensors`` (any of ``fused_sources()[name]``) into their slots
        of the fused tensor ``out`` (allocated with ``fused_shape``)."""
        for proj, tensor in tensors.items():
            slot = self.fused_slot(name, out, expert, proj)
            if slot.shape != tensor.shape:
                raise ReapError(f"expert {expert} {proj}: shape {tuple(tensor.shape)} does not fit {name}'s "
                                f"[{', '.join(map(str, slot.shape))}] (experts' projections differ in shape)")
            slot.copy_(tensor)

    # ------------------------------------------------------------------ runtime face

    def full_scoring_warm_up(self, config: dict, dtype: torch.dtype, devices: list[torch.device]):
        """What the full mode's first ``all_expert_norms`` calls would do in a fresh process, to do ahead on a side
        thread while the model loads (``score.warmup``): a ``triton_experts.KernelWarmUp`` or an object like it
        (``compile()``, ``tune(token_counts, room_bytes, chunk)``, ``reference_bytes_per_row``); None: nothing to
        do (the default)."""
        return None

    def moe_blocks(self, model: nn.Module) -> Iterator[tuple[int, nn.Module]]:
        """(layer index, MoE block) for every sparse layer of a loaded model, in order."""
        pattern = re.compile(self.module_layer_regex + re.escape(self.moe_module) + "$")
        for name, module in model.named_modules():
            m = pattern.search(name)
            if m and hasattr(module, self.router_module) and hasattr(module, self.experts_module):
                yield int(m["layer"]), module

    def router_of(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.router_module)

    def experts_of(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.experts_module)

    def router_logits(self, router_output) -> torch.Tensor:
        """Router logits [T, E] from what the router module returned."""
        raise NotImplementedError

    def route(self, router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate weights [T, k], expert ids [T, k]) from logits, as the model's router computes them."""
        raise NotImplementedError

    def num_router_rows(self, router: nn.Module) -> int:
        return router.weight.shape[0]

    def router_forward(self, router: nn.Module, hidden: torch.Tensor,
                       logit_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """What ``router`` returns (``router_output``), with ``logit_bias`` (e.g. -inf for pruned experts) added to
        the logits before routing."""
        logits = torch.nn.functional.linear(hidden.reshape(-1, router.weight.shape[1]), router.weight)
        if logit_bias is not None:
            logits = logits + logit_bias.to(logits.dtype)
        return self.router_output(router, logits)

    def router_output(self, router: nn.Module, logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The router's return value from its logits: here (logits, gate weights, expert ids)."""
        weights, ids = self.route(logits, router.top_k)
        return logits, weights, ids

    def routed_call(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(hidden [T, H], top-k ids [T, k], applied gate weights [T, k]) from the experts' call."""
        raise NotImplementedError

    # Whether the experts' call carries (hidden, top-k ids, gate weights) (``routed_call``).  A family whose
    # MoE block hands the experts something else (Llama-4: every expert's input already scaled by its gate)
    # sets it False, and the observer takes them from the router's call instead (``routing_from_router``).
    routing_in_experts_call = True

    def routing_from_router(self, router: nn.Module, args: tuple,
                            output) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(hidden [T, H], top-k ids [T, k], applied gate weights [T, k]) from the router's call: its input
        and ``route`` of its logits."""
        hidden = args[0].reshape(-1, args[0].shape[-1])
        weights, ids = self.route(self.router_logits(output), router.top_k)
        return hidden, ids, weights

    def expert_outputs(self, experts: nn.Module, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """E_j(x) before gate weighting, for experts ``expert_ids`` on every row of x: [n, T, H]."""
        raise NotImplementedError

    # ------------------------------------------------------------------ tokens and processor face

    def visual_token_ids(self, config) -> set[int]:
        """Token ids of image/video placeholders in a loaded model's ``config``."""
        raise NotImplementedError

    def visual_token_mask(self, input_ids: torch.Tensor, config) -> torch.Tensor:
        """Where ``input_ids`` holds an image/video placeholder."""
        mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for token in self.visual_token_ids(config):
            mask |= input_ids == token
        return mask

    def vision_merge_size(self, processor) -> int:
        """Vision patches merged into one image token, per side."""
        raise NotImplementedError

    def pixels_per_image_token(self, processor) -> int:
        raise NotImplementedError

    def image_start_id(self, processor) -> int:
        """The token that opens an image's placeholders."""
        raise NotImplementedError

    image_frame_tokens = 0  # tokens around an image's placeholders (start/end markers)
    routing_description = ""  # how ``route`` turns logits into gate weights, in words (reap_metadata.json)

    def image_tokens(self, processor, grid_thw: torch.Tensor | None) -> int:
        """Placeholder tokens of the images of ``grid_thw`` ([n, 3] patches), all together."""
        if grid_thw is None:
            return 0
        merge = self.vision_merge_size(processor)
        return int(grid_thw.prod(dim=-1).sum()) // (merge * merge)

    def host_side(self, batch: dict[str, torch.Tensor], model: nn.Module) -> set[str]:
        """Keys of ``batch`` (one with ``model_inputs``) that stay on the host when it moves to ``model``."""
        return set()

    def model_inputs(self, batch: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
        """Tensors the model's forward would derive from ``batch`` on its device, computed on the host instead
        (by the encoding workers), the same values; the model takes them as keyword arguments and skips its own
        computation.  What it saves is not the arithmetic but the device-to-host reads that computation makes:
        each one stops the host until the device has caught up.  {} where the family has none."""
        return {}

    # ------------------------------------------------------------------ layer-wise face
    # Used by ``reap_vlm.score.layerwise``: the model is a skeleton on the meta device and one decoder
    # layer at a time gets real weights.

    def layer_of_key(self, key: str) -> int | None:
        """Decoder-layer index of a checkpoint key, or None for keys outside the decoder layers."""
        m = re.match(self.layer_prefix, key)
        return int(m["layer"]) if m else None

    def keys_by_layer(self, keys) -> dict[int, list[str]]:
        """Checkpoint keys grouped by decoder layer (keys outside the layers are left out)."""
        out: dict[int, list[str]] = {}
        for key in keys:
            layer = self.layer_of_key(key)
            if layer is not None:
                out.setdefault(layer, []).append(key)
        return out

    def prelayer_prefixes(self) -> tuple[str, ...]:
        """Checkpoint/module name prefixes of what runs before decoder layer 0 (embeddings, vision tower)."""
        return self.prelayer

    def prelayer_keys(self, keys) -> list[str]:
        prefixes = self.prelayer_prefixes()
        return [k for k in keys if k.startswith(prefixes)]

    def head_keys(self, keys) -> list[str]:
        """Checkpoint keys of what runs after the decoder layers (final norm, LM head): neither a layer's nor the
        pre-layer part's."""
        in_layers = {k for layer in self.keys_by_layer(keys).values() for k in layer}
        prelayer = set(self.prelayer_keys(keys))
        return [k for k in keys if k not in in_layers and k not in prelayer]

    def text_model(self, model: nn.Module) -> nn.Module:
        """The decoder stack (owner of ``layers``)."""
        raise NotImplementedError

    def multimodal_model(self, model: nn.Module) -> nn.Module:
        """The module whose forward takes (input_ids, pixel_values, ...) and calls the text model."""
        raise NotImplementedError

    def after_decoder_layer(self, text_model: nn.Module, layer: int, hidden: torch.Tensor,
                            text_inputs: dict) -> torch.Tensor:
        """What the text model's forward does to the hidden states right after decoder layer ``layer``,
        given the keyword arguments the text model was called with (nothing, unless the family adds)."""
        return hidden

    def head_logits(self, model: nn.Module, hidden: torch.Tensor, keep: int) -> torch.Tensor:
        """What the model computes after its last decoder layer: the final norm over every position, then the LM
        head on the last ``keep`` positions (as ``logits_to_keep`` does)."""
        hidden = self.text_model(model).norm(hidden)
        return model.get_output_embeddings()(hidden[:, -keep:])

    # ------------------------------------------------------------------ fast scoring face

    def all_expert_norms(self, experts: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """||E_j(x_t)|| for every row t of x and every expert j: [T, E] float32 (E_j in x's dtype)."""
        ids = torch.arange(experts.num_experts, device=x.device)
        return float32_norm(self.expert_outputs(experts, x, ids)).T

    def full_bytes_per_token(self, experts: nn.Module, dtype: torch.dtype) -> int:
        """Peak working memory per token of ``all_expert_norms`` (for chunk sizing)."""
        shapes = [p.shape for p in experts.parameters() if p.dim() == 3]
        width = 2 * sum(max(s[1], s[2]) for s in shapes)  # every projection's output, twice over: generous
        return experts.num_experts * (width * torch.finfo(dtype).bits // 8 + 8)

    def routed_forward(self, experts: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                       top_k_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The experts' forward that also returns ||E_j(x)|| and max_h |E_j(x)_h| of every routed pair
        ((out, norms, peaks), both [T, k] float32, ``output_stats``), computed once; None where the family
        cannot reproduce the module's own forward."""
        return None
