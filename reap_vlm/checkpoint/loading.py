"""Loading policy: which device and dtype (``auto``), how much memory is free, and loading the whole model or
the processor."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ReapError
from .reader import Checkpoint
from .tensors import memory_state_dict


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ReapError(f"--device {name} was asked for but no CUDA GPU is visible; use --device cpu or auto")
    return name


# the whole model in memory only when it needs at most this share of the free memory (reap.py's engine, the
# check's mode), else layer by layer
AUTO_MEMORY_FRACTION = 0.85


def free_memory_bytes(device: torch.device | str) -> int:
    """Memory a new allocation can get: on CUDA the driver's free memory plus PyTorch's cached, unused
    blocks; on the CPU the kernel's MemAvailable (psutil if /proc is missing)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return int(psutil.virtual_memory().available)


def spreads(device: str, spread: bool) -> bool:
    """Whether ``load_model(..., device, spread)`` of a standard checkpoint spreads its layers over the GPUs."""
    return spread and device == "cuda" and torch.cuda.device_count() > 1


def load_model(path: Path | str, dtype: torch.dtype = torch.float32, device: str = "cpu", spread: bool = False,
               packed: bool = False):
    """The whole model in eval mode: transformers' own loader for the standard fused layout, our
    assembling loader (per-expert keys fused, quantized weights dequantized) otherwise, since
    transformers 5 cannot load those.
    ``spread``: on ``cuda`` with several GPUs, spread the layers over them (accelerate device_map).
    ``packed``: a quantized checkpoint's quantized Linears and experts stay in their stored form on ``device``
    and are dequantized in the forward (``checkpoint.packed``; one device, ``spread`` is ignored); an
    unquantized checkpoint loads as without it."""
    ckpt = Checkpoint(Path(path))
    family = ckpt.family
    auto = family.auto_model()
    quant = ckpt.quant_format  # a ReapError here for quantizations we cannot dequantize
    if not ckpt.has_per_expert_keys and quant is None:
        device_map = "auto" if spreads(device, spread) else device
        model, info = auto.from_pretrained(str(path), dtype=dtype, device_map=device_map,
                                                                  output_loading_info=True)
        check_loading_info(path, info)
        return model.eval()
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    if quant is not None:  # the weights are dequantized below: build the plain model
        for cfg in family.config_sections(config):
            if hasattr(cfg, "quantization_config"):
                delattr(cfg, "quantization_config")
    with init_empty_weights(include_buffers=False):
        model = auto.from_config(config, dtype=dtype)
    keys, installed = None, set()
    if packed and quant is not None:
        from .packed import install_packed, packed_buffer_names

        keys = install_packed(model, ckpt, dtype, device)
        installed = packed_buffer_names(model)
    state = memory_state_dict(ckpt, keys, dtype=dtype, device=device)
    head = head_weight_name(model)
    if config.tie_word_embeddings and head not in state:
        state[head] = state[family.embedding_key]
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    check_loading_info(path, {"missing_keys": [k for k in missing if k not in installed],
                              "unexpected_keys": unexpected})
    return model.to(device).eval()


def head_weight_name(model) -> str:
    """The state-dict name of ``model``'s LM head weight (``lm_head.weight``, ``language_model.lm_head.weight``)."""
    head = model.get_output_embeddings()
    return next(name for name, module in model.named_modules() if module is head) + ".weight"


def check_loading_info(path: Path | str, info: dict) -> None:
    """The loader's report: any key missing from the checkpoint (which transformers would initialise at random),
    unexpected or of another shape is an error; a model that is not the checkpoint is never scored or checked."""
    problems = []
    for field, what in (("missing_keys", "missing from the checkpoint (would be newly initialized)"),
                        ("unexpected_keys", "in the checkpoint but not in the model"),
                        ("mismatched_keys", "of another shape than the config implies")):
        keys = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(field) or ())
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            problems.append(f"{len(keys)} weight(s) {what}: {', '.join(keys[:3])}{more}")
    if problems:
        raise ReapError(f"{path}: the checkpoint does not match its config.json — {'; '.join(problems)}; "
                        "re-download the model or fix the checkpoint")


def tokenizer_of(processor):
    """The tokenizer of a processor (a text-only family's processor is its tokenizer)."""
    return getattr(processor, "tokenizer", processor)


def load_processor(path: Path | str):
    """The folder's processor (AutoProcessor: a multimodal processor, or the tokenizer of a text-only model)."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(str(path))
    except (OSError, ValueError, TypeError, KeyError) as exc:  # decode and JSON errors are ValueErrors
        raise ReapError(f"cannot load the processor/tokenizer from {path} ({str(exc).splitlines()[0]}); "
                        "the folder needs tokenizer and preprocessor files") from None
