"""Does vLLM's own loader take a pruned Qwen3-VL-MoE checkpoint whole?  ``python -m reap_vlm.check.vllm_load FOLDER``.

Runs only where vLLM is installed (``requirements-vllm.txt``, a venv of its own: vLLM brings its own torch and
transformers).  On the CPU, in one process: vLLM's config objects built from the folder (``ModelConfig``,
``VllmConfig`` on vLLM's CPU platform), gloo with TP = EP = 1, vLLM's ``Qwen3VLMoeForConditionalGeneration``
built from the pruned config.json, every parameter filled with a sentinel (NaN, or an unlikely integer), the
folder's safetensors streamed through the model's own ``load_weights``.  Then:

- the checkpoint's expert tensors against config.json: a fused ``experts.gate_up_proj`` / ``down_proj`` holding
  as many experts as ``num_experts`` (with fewer, vLLM leaves the rest uninitialised without an error),
  per-expert ids exactly 0..num_experts-1 with every projection present, router rows = ``num_experts``;
- every file tensor handed to some parameter's ``weight_loader`` (vLLM skips some silently: unexpected
  ``.bias``, expert ids it has no slot for), every vLLM parameter named as loaded by ``load_weights`` and no
  element left at the sentinel (per expert for the expert tensors);
- unquantized checkpoints: every parameter's value equal to the transformers model of the same folder (fused:
  transformers' own ``from_pretrained``; per-expert, which transformers cannot load: the files' tensors stacked
  in transformers' layout, names and shapes checked against transformers' model), after vLLM's layout
  transforms (fused q/k/v, gate/up, transposed experts), and every reference tensor used by some parameter.

Self-contained on purpose (torch, safetensors, transformers and vLLM only): it runs in vLLM's environment,
whose versions differ from the project's.  Prints one verdict line, then one line per problem.
Exit status: 0 loaded whole, 1 a problem was found, 2 the check could not run (no such folder, not
Qwen3-VL-MoE, vLLM missing, or vLLM cannot build a layer of this checkpoint on this CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

VLLM_VERSION_CHECKED = "0.33.0"  # requirements-vllm.txt; the loader's names are read from this release
ARCHITECTURE = "Qwen3VLMoeForConditionalGeneration"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_EXPERT_KEY = re.compile(r"^model\.language_model\.layers\.(?P<layer>\d+)\.mlp\.experts\."
                         r"(?:(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.(?P<suffix>\w+)"
                         r"|(?P<fused>gate_up_proj|down_proj))$")
_ROUTER_KEY = re.compile(r"^model\.language_model\.layers\.(?P<layer>\d+)\.mlp\.gate\.weight$")
_VLLM_EXPERTS = re.compile(r"^language_model\.model\.layers\.(?P<layer>\d+)\.mlp\.experts\.(?:routed_experts\.)?"
                           r"(?P<name>w13|w2)_(?P<suffix>\w+)$")
# Before vLLM is imported: its CPU platform (the PyPI wheel is built for CUDA; without a GPU and without this it
# picks no platform and cannot build attention or MoE layers); only its errors on stderr.
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
INT_SENTINEL = -0x5A5A5A5B  # fills integer parameters; int8/uint8 ones get their dtype's minimum


class CannotCheck(Exception):
    """The check could not run (exit 2), as opposed to a problem found in the checkpoint (exit 1)."""


@dataclass
class Report:
    folder: Path
    layout: str = "?"
    quantization: str | None = None
    num_experts: int = 0
    moe_layers: list[int] = field(default_factory=list)
    num_file_tensors: int = 0
    num_params: int = 0
    compared: int = 0
    load_failed: bool = False
    unreferenced: set[int] = field(default_factory=set)  # layers whose per-expert tensors are incomplete
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    def verdict(self) -> str:
        import vllm

        what = (f"{self.folder} ({self.layout} layout{', ' + self.quantization if self.quantization else ''}, "
                f"{len(self.moe_layers)} MoE layers x {self.num_experts} experts)")
        if self.problems:
            return (f"vllm-load-check FAIL: {len(self.problems)} problem(s) loading {what} with vLLM "
                    f"{vllm.__version__}'s {ARCHITECTURE}.load_weights on the CPU")
        values = (f"all {self.compared} equal to transformers' model of the same folder" if self.compared
                  else "values not compared")
        return (f"vllm-load-check PASS: vLLM {vllm.__version__} loaded all {self.num_params} parameters of {what} "
                f"from its {self.num_file_tensors} tensors; {values}")


# ----------------------------------------------------------------------------------------------- the files


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise CannotCheck(f"{folder}: no config.json (is this a checkpoint folder?)")
    config = json.loads(path.read_text())
    if ARCHITECTURE not in (config.get("architectures") or []):
        raise CannotCheck(f"{folder}: architectures {config.get('architectures')} is not {ARCHITECTURE}, "
                          "the only model this check knows")
    return config


def weight_map(folder: Path) -> dict[str, str]:
    """{tensor name: shard file} from the index, or every tensor of the single model.safetensors."""
    if (folder / INDEX_NAME).is_file():
        return json.loads((folder / INDEX_NAME).read_text())["weight_map"]
    if (folder / SINGLE_NAME).is_file():
        from safetensors import safe_open

        with safe_open(folder / SINGLE_NAME, "pt") as f:
            return dict.fromkeys(f.keys(), SINGLE_NAME)
    raise CannotCheck(f"{folder}: neither {INDEX_NAME} nor {SINGLE_NAME}")


def file_shapes(folder: Path, names: dict[str, str]) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes = {}
    for shard in sorted(set(names.values())):
        with safe_open(folder / shard, "pt") as f:
            present = set(f.keys())
            for key in (k for k, s in names.items() if s == shard):
                if key not in present:
                    raise CannotCheck(f"{folder}: the index names {key} in {shard}, which does not hold it")
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def stream_tensors(folder: Path, names: dict[str, str], seen: list[str]):
    """(name, tensor) for every tensor of the checkpoint, shard by shard, as vLLM's loader reads them;
    ``seen`` gets each name as it is handed over (the last one is the one being loaded on an error)."""
    from safetensors import safe_open

    for shard in sorted(set(names.values())):
        with safe_open(folder / shard, "pt") as f:
            for key in (k for k, s in names.items() if s == shard):
                seen.append(key)
                yield key, f.get_tensor(key)


def config_dtype(folder: Path) -> str:
    """config.json's dtype (text_config's, else the top level's), float32 where there is none; a quantized
    checkpoint's float32 becomes bfloat16 (vLLM builds no quantized layer in float32)."""
    config = json.loads((folder / "config.json").read_text())
    text = config.get("text_config", config)
    name = str(text.get("dtype") or text.get("torch_dtype") or config.get("dtype") or config.get("torch_dtype")
               or "float32").removeprefix("torch.")
    if name == "float32" and (config.get("quantization_config") or text.get("quantization_config")):
        return "bfloat16"
    return name


def moe_layers(text: dict) -> list[int]:
    """The layers vLLM's Qwen3MoeDecoderLayer gives a sparse MoE block (its own condition)."""
    mlp_only = set(text.get("mlp_only_layers") or [])
    step = text.get("decoder_sparse_step", 1) or 1
    if not text.get("num_experts"):
        return []
    return [i for i in range(text["num_hidden_layers"]) if i not in mlp_only and (i + 1) % step == 0]


def _ranges(ids) -> str:
    ids = sorted(ids)
    return ", ".join(str(i) for i in ids[:12]) + (f" ... ({len(ids)} in all)" if len(ids) > 12 else "")


def check_layout(shapes: dict[str, tuple[int, ...]], text: dict, report: Report) -> None:
    """The checkpoint's expert and router tensors against config.json's num_experts, before vLLM sees them."""
    num = report.num_experts
    fused: dict[int, dict[str, tuple[int, ...]]] = {}
    per_expert: dict[int, dict[int, set[str]]] = {}
    for key, shape in shapes.items():
        m = _EXPERT_KEY.match(key)
        if m and m["fused"]:
            fused.setdefault(int(m["layer"]), {})[m["fused"]] = shape
        elif m:
            per_expert.setdefault(int(m["layer"]), {}).setdefault(int(m["expert"]), set()).add(
                f"{m['proj']}.{m['suffix']}")
        elif (r := _ROUTER_KEY.match(key)) and shape[0] != num:
            report.problems.append(f"layer {r['layer']}: router {key} has {shape[0]} rows, config.json says "
                                   f"num_experts {num}")
    report.layout = "+".join(n for n, d in (("fused", fused), ("per-expert", per_expert)) if d) or "no experts"
    projs = {"gate_proj", "up_proj", "down_proj"}
    for layer in report.moe_layers:
        if layer not in fused and layer not in per_expert:
            report.problems.append(f"layer {layer}: no expert tensors in the checkpoint (config.json makes it a "
                                   f"MoE layer of {num} experts)")
    for layer, tensors in sorted(fused.items()):
        for name in ("gate_up_proj", "down_proj"):
            if name not in tensors:
                report.problems.append(f"layer {layer}: experts.{name} is missing")
            elif (held := tensors[name][0]) != num:
                what = (f"vLLM loads the {held} it finds and leaves expert(s) {_ranges(range(held, num))} "
                        "uninitialised without an error" if held < num
                        else f"{held - num} more than vLLM has slots for")
                report.problems.append(f"layer {layer}: experts.{name} {list(tensors[name])} holds {held} experts, "
                                       f"config.json says num_experts {num}: {what}")
    for layer, experts in sorted(per_expert.items()):
        missing = set(range(num)) - set(experts)
        extra = {e for e in experts if e >= num}
        if extra:
            report.problems.append(
                f"layer {layer}: per-expert ids {_ranges(extra)} are >= num_experts {num} (ids not renumbered "
                f"0..{num - 1}?); vLLM has no slot for them")
        if missing:
            report.problems.append(f"layer {layer}: expert(s) {_ranges(missing)} of 0..{num - 1} have no "
                                   "tensors in the checkpoint")
        for expert in sorted(set(experts) - extra):
            if lacking := projs - {part.split(".")[0] for part in experts[expert]}:
                report.problems.append(f"layer {layer}: expert {expert} lacks {sorted(lacking)}")


# ----------------------------------------------------------------------------------------------- vLLM


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sentinel_fill(param) -> None:
    import torch

    data = param.data
    if data.is_floating_point():
        data.fill_(float("nan"))
    elif data.dtype == torch.bool:
        data.fill_(False)
    else:
        data.fill_(max(INT_SENTINEL, torch.iinfo(data.dtype).min))


def _untouched(param):
    """Boolean mask of the elements still holding the sentinel."""
    import torch

    data = param.data
    if data.is_floating_point():
        return torch.isnan(data.float()) if data.element_size() == 1 else torch.isnan(data)
    if data.dtype == torch.bool:
        return torch.zeros_like(data)
    return data == max(INT_SENTINEL, torch.iinfo(data.dtype).min)


def build_and_load(folder: Path, names: dict[str, str], dtype: str, report: Report):
    """vLLM's model built on the CPU from ``folder``'s config, loaded with its own ``load_weights``;
    returns the parameters {name: tensor}.  Problems of the load go to ``report``."""
    import torch
    from vllm.config import DeviceConfig, LoadConfig, ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.model_executor.models.qwen3_vl_moe import Qwen3VLMoeForConditionalGeneration
    from vllm.utils.torch_utils import set_default_torch_dtype

    if dtype == "auto":  # vLLM's auto is bfloat16 on the CPU; load what the files hold
        dtype = config_dtype(folder)
    try:
        model_config = ModelConfig(model=str(folder), dtype=dtype, enforce_eager=True)
        vllm_config = VllmConfig(model_config=model_config, device_config=DeviceConfig(device="cpu"),
                                 load_config=LoadConfig(load_format="dummy"))
    except Exception as exc:  # noqa: BLE001 - vLLM's config validation (dtype for a quantization, ...)
        raise CannotCheck(f"vLLM refuses the config: {_one_line(exc)}") from None
    with set_current_vllm_config(vllm_config):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{_free_port()}")
        initialize_model_parallel(1, 1)
        try:
            # As vLLM's model loader does: the class from config.json's architectures, the quantization
            # config's module names mapped to vLLM's, the model built in the checkpoint's dtype.
            with set_default_torch_dtype(model_config.dtype), torch.device("cpu"):
                model = initialize_model(vllm_config=vllm_config)
        except Exception as exc:  # noqa: BLE001 - e.g. no CPU kernel for a quantized layer
            raise CannotCheck(f"vLLM cannot build {ARCHITECTURE} for this checkpoint on this CPU: "
                              f"{_one_line(exc)}") from None
        if not isinstance(model, Qwen3VLMoeForConditionalGeneration):
            raise CannotCheck(f"vLLM chose {type(model).__name__} for this folder, not {ARCHITECTURE}")
        params = dict(model.named_parameters())
        report.num_params = len(params)
        with torch.no_grad():
            for param in params.values():
                _sentinel_fill(param)
        seen: list[str] = []
        reached, tracked = _track_file_tensors(params)
        try:
            with torch.no_grad():
                loaded = set(model.load_weights(tracked(stream_tensors(folder, names, seen))))
        except Exception as exc:  # noqa: BLE001 - vLLM's own assertion is the finding
            where = f" at {seen[-1]}" if seen else ""
            report.problems.append(f"vLLM's load_weights failed{where}: {_one_line(exc)}")
            report.load_failed = True
            return params
    skipped_experts: dict[int, list[int]] = {}
    for key in (k for k in names if k not in reached):
        if (m := _EXPERT_KEY.match(key)) and m["expert"] is not None:
            skipped_experts.setdefault(int(m["layer"]), []).append(int(m["expert"]))
        else:
            report.problems.append(f"skipped by vLLM's loader: the file's {key} reached no parameter's weight_loader")
    for layer, ids in sorted(skipped_experts.items()):
        report.problems.append(f"skipped by vLLM's loader: layer {layer}: the tensors of expert(s) {_ranges(set(ids))} "
                               f"({len(ids)} in all) reached no parameter's weight_loader")
    not_named = sorted(set(params) - loaded)
    for name in not_named:
        report.problems.append(f"not loaded (load_weights did not name it): {name} {list(params[name].shape)}")
    for name, param in params.items():
        mask = _untouched(param)
        if not bool(mask.any()):
            continue
        if m := _VLLM_EXPERTS.match(name):
            experts = mask.reshape(mask.shape[0], -1).any(dim=1).nonzero().flatten().tolist()
            report.problems.append(f"layer {m['layer']}: {m['name']}_{m['suffix']} of expert(s) "
                                   f"{_ranges(experts)} left at its initial value (nothing in the file reached it)")
        elif name not in not_named:
            report.problems.append(f"left at its initial value: {name}, {int(mask.sum())} of {mask.numel()} "
                                   "elements")
    return params


def _track_file_tensors(params: dict):
    """Every parameter's weight_loader wrapped to record which file tensor it was handed (by storage: the
    loaders get views of it: transposed, chunked, one expert of a fused tensor).  Returns the set of file
    keys that reached a loader (and were not refused: FusedMoE's ``return_success`` False) and a wrapper for
    the (name, tensor) stream that registers each tensor's storage."""
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader

    origin: dict[int, str] = {}
    reached: set[str] = set()

    def recording(loader):
        def weight_loader(*args, **kwargs):
            loaded = args[1] if len(args) > 1 else kwargs.get("loaded_weight")
            result = loader(*args, **kwargs)
            key = origin.get(loaded.untyped_storage().data_ptr()) if loaded is not None else None
            if key is not None and result is not False:
                reached.add(key)
            return result
        return weight_loader

    for name, param in params.items():
        try:
            param.weight_loader = recording(getattr(param, "weight_loader", default_weight_loader))
        except AttributeError as exc:  # a vLLM parameter class whose loader cannot be replaced
            raise CannotCheck(f"cannot follow the loading of {name}: {exc}") from None

    def tracked(stream):
        for key, tensor in stream:
            origin[tensor.untyped_storage().data_ptr()] = key
            yield key, tensor

    return reached, tracked


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:400]}" if text else type(exc).__name__


# ----------------------------------------------------------------------------------------------- reference


def reference_state(folder: Path, names: dict[str, str], report: Report) -> dict | None:
    """The transformers model's tensors for ``folder``, or None (reported) when there is none to compare with."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    if report.layout == "fused":
        try:
            model = AutoModelForImageTextToText.from_pretrained(str(folder), dtype=torch.float32)
        except Exception as exc:  # noqa: BLE001
            report.problems.append(f"transformers cannot load the folder either: {_one_line(exc)}")
            return None
        return {k: v.detach() for k, v in model.state_dict().items()}
    # Per-expert: transformers 5 has no loader for it; stack the files' tensors in its layout and hold
    # names and shapes to the model it builds from the config.
    state: dict = {}
    stacks: dict[str, dict[int, dict[str, object]]] = {}
    for key, tensor in stream_tensors(folder, names, []):
        m = _EXPERT_KEY.match(key)
        if m and m["expert"] is not None and m["suffix"] == "weight":
            prefix = key[: m.start("expert")]
            stacks.setdefault(prefix, {}).setdefault(int(m["expert"]), {})[m["proj"]] = tensor.float()
        else:
            state[key] = tensor.float()
    num = report.num_experts
    for prefix, experts in stacks.items():
        if set(experts) != set(range(num)) or any(len(e) != 3 for e in experts.values()):
            report.unreferenced.add(int(prefix.split(".")[3]))  # reported by check_layout
            continue
        state[prefix + "gate_up_proj"] = torch.stack(
            [torch.cat([experts[e]["gate_proj"], experts[e]["up_proj"]]) for e in range(num)])
        state[prefix + "down_proj"] = torch.stack([experts[e]["down_proj"] for e in range(num)])
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(str(folder)))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key in sorted(set(expected) - set(state)):
        if not _EXPERT_KEY.match(key):
            report.problems.append(f"transformers' model has {key}, the checkpoint does not")
    for key in sorted(set(state) - set(expected)):
        report.problems.append(f"the checkpoint has {key}, transformers' model does not")
    for key in sorted(set(state) & set(expected)):
        if tuple(state[key].shape) != expected[key]:
            report.problems.append(f"{key}: {list(state[key].shape)} in the checkpoint, transformers' model "
                                   f"has {list(expected[key])}")
    return state


def hf_name(vllm_name: str) -> str:
    """vLLM's parameter name -> the checkpoint's (Qwen3VLForConditionalGeneration.hf_to_vllm_mapper reversed)."""
    for new, old in (("visual.", "model.visual."), ("language_model.model.", "model.language_model."),
                     ("language_model.lm_head.", "lm_head.")):
        if vllm_name.startswith(new):
            return old + vllm_name[len(new):]
    return vllm_name


def expected_value(vllm_name: str, ref: dict, used: set[str]):
    """What vLLM's parameter ``vllm_name`` must hold, from the transformers-layout ``ref``, or None."""
    import torch

    name = hf_name(vllm_name)
    if m := _VLLM_EXPERTS.match(vllm_name):
        if m["suffix"] != "weight":
            return None
        prefix = name[: name.index(".mlp.experts.") + len(".mlp.experts.")]
        key = prefix + ("gate_up_proj" if m["name"] == "w13" else "down_proj")  # [E, 2I, H] / [E, H, I]: vLLM's too
        parts = [key]
    elif ".self_attn.qkv_proj." in name:
        parts = [name.replace(".qkv_proj.", f".{p}_proj.") for p in "qkv"]
    elif ".mlp.gate_up_proj." in name:
        parts = [name.replace(".gate_up_proj.", f".{p}_proj.") for p in ("gate", "up")]
    else:
        parts = [name]
    if not all(p in ref for p in parts):
        return None
    used.update(parts)
    tensors = [ref[p] for p in parts]
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)


def compare(params: dict, ref: dict, report: Report) -> None:
    import torch

    used: set[str] = set()
    for name, param in params.items():
        want = expected_value(name, ref, used)
        if want is None and (m := _VLLM_EXPERTS.match(name)) and int(m["layer"]) in report.unreferenced:
            continue  # the layer's experts are incomplete in the files: reported, no reference to compare with
        if want is None:
            report.problems.append(f"no tensor of the transformers model for vLLM's {name}")
            continue
        got = param.data
        if tuple(got.shape) != tuple(want.shape):
            report.problems.append(f"{name}: vLLM's shape {list(got.shape)}, transformers' {list(want.shape)}")
            continue
        want = want.to(got.dtype)
        same = (got == want) | (torch.isnan(got) & torch.isnan(want))
        if bool(same.all()):
            report.compared += 1
            continue
        if m := _VLLM_EXPERTS.match(name):
            bad = (~same).reshape(same.shape[0], -1).any(dim=1).nonzero().flatten().tolist()
            report.problems.append(f"layer {m['layer']}: {m['name']}_weight of expert(s) {_ranges(bad)} differs "
                                   "from the file's (cut, transposed or mixed up)")
        else:
            report.problems.append(f"{name}: {int((~same).sum())} of {same.numel()} values differ from the file's")
    tied = "lm_head.weight" in ref and "language_model.lm_head.weight" not in params
    for key in sorted(set(ref) - used - ({"lm_head.weight"} if tied else set())):
        report.problems.append(f"the file's {key} reached no vLLM parameter")


# ----------------------------------------------------------------------------------------------- entry


def check(folder: str | Path, dtype: str = "auto", values: bool = True) -> Report:
    """Run every check on ``folder``; raises CannotCheck when the check cannot run."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CannotCheck(f"{folder}: no such folder")
    config = read_config(folder)
    text = config.get("text_config", config)
    report = Report(folder, num_experts=int(text.get("num_experts") or 0), moe_layers=moe_layers(text))
    quant = config.get("quantization_config") or text.get("quantization_config")
    report.quantization = quant.get("quant_method") if quant else None
    import vllm

    if vllm.__version__ != VLLM_VERSION_CHECKED:
        report.notes.append(f"this check was written against vLLM {VLLM_VERSION_CHECKED}'s loader; this is "
                            f"{vllm.__version__}")
    names = weight_map(folder)
    shapes = file_shapes(folder, names)
    report.num_file_tensors = len(shapes)
    check_layout(shapes, text, report)
    try:
        params = build_and_load(folder, names, dtype, report)
    except CannotCheck as exc:
        if not report.problems:
            raise
        report.notes.append(f"vLLM's loader not run: {exc}")  # the files' own problems stand
        return report
    if report.load_failed:
        report.notes.append("values not compared: vLLM's load stopped")
    elif not values:
        report.notes.append("values not compared (--no-values)")
    elif report.quantization:
        report.notes.append(f"values not compared: {report.quantization} parameters are vLLM's packed forms")
    else:
        ref = reference_state(folder, names, report)
        if ref is not None:
            compare(params, ref, report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reap_vlm.check.vllm_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="the pruned checkpoint folder (prune_model.py's --output)")
    parser.add_argument("--dtype", default="auto", help="vLLM's dtype (default auto: config.json's)")
    parser.add_argument("--no-values", action="store_true",
                        help="skip the comparison with the transformers model (it holds a second copy in float32)")
    args = parser.parse_args(argv)
    try:
        import vllm  # noqa: F401
    except ImportError:
        print("vllm-load-check: vLLM is not installed in this environment (pip install -r requirements-vllm.txt "
              "in a venv of its own)", file=sys.stderr)
        return 2
    try:
        report = check(args.folder, args.dtype, values=not args.no_values)
    except CannotCheck as exc:
        print(f"vllm-load-check NOT CHECKED: {exc}")
        return 2
    print(report.verdict())
    for problem in report.problems:
        print(f"  - {problem}")
    for note in report.notes:
        print(f"  note: {note}")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
