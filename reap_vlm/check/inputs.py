"""What a check compares: the pruned checkpoint, its pruning record, the original (where found) and which
original experts the pruned one kept."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint.fsutil import read_json
from ..checkpoint.integrity import check_checkpoint
from ..checkpoint.reader import Checkpoint
from ..errors import ConfigError, ReapError
from ..metadata import METADATA_NAME, load_metadata
from ..outputs import check_output_folder
from ..prune.output import PRUNING_RECORD
from ..schema import int_list, is_int, is_int_key, validate
from ..settings import OPTIONS, Settings
from .options import NO_REFERENCE, TEST_FLAGS, flag_of


@dataclass
class Inputs:
    pruned: Checkpoint
    record: dict | None
    reference: Path | None
    reference_source: str
    keep: dict[int, list[int]] | None = None  # original ids kept per MoE layer
    order: dict[int, list[int]] | None = None  # order[layer][new id] = original id
    keep_source: str | None = None
    keep_problem: str | None = None  # the record contradicts the pruned checkpoint (a failure)
    notes: list[str] = field(default_factory=list)

    @property
    def reference_declined(self) -> bool:
        """--reference none: the user asked for no comparison with the original."""
        return self.reference is None and self.reference_source.startswith(f"{NO_REFERENCE} (")


def _is_checkpoint(path: Path | None) -> bool:
    return path is not None and (Path(path) / "config.json").is_file()


def _require_checkpoint(settings: Settings, name: str) -> Path:
    path = getattr(settings, name)
    if path is None:
        raise ConfigError(f"{flag_of(name)} is required: {OPTIONS[name].help}")
    if not Path(path).is_dir():
        raise ConfigError(f"{flag_of(name)}={path}: no such folder")
    if not _is_checkpoint(path):
        raise ConfigError(f"{flag_of(name)}={path}: folder has no config.json (not a checkpoint folder)")
    return Path(path)


def _same(a: Path, b: Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def find_reference(settings: Settings, record: dict | None, notes: list[str]) -> tuple[Path | None, str]:
    """The original to compare with: --reference, else --original, else the pruning record's source
    (when that folder is here), else REAP_MODEL_PATH; ``--reference none`` checks the pruned model alone."""
    raw = settings.reference_path
    if raw is not None and str(raw).strip().lower() == NO_REFERENCE:
        return None, f"none ({flag_of('reference_path')}={NO_REFERENCE})"
    if raw is not None:
        return _require_checkpoint(settings, "reference_path"), flag_of("reference_path")
    if settings.model_path is not None and settings.sources.get("model_path") == "flag":
        return _require_checkpoint(settings, "model_path"), TEST_FLAGS["model_path"]
    source = (record or {}).get("source_path")
    if source:
        if _is_checkpoint(Path(source)):
            return Path(source), PRUNING_RECORD
        notes.append(f"{PRUNING_RECORD} names the original {source}, which is not here; "
                     f"pass it with {flag_of('reference_path')}")
    if settings.model_path is not None:
        if _is_checkpoint(settings.model_path):
            return Path(settings.model_path), OPTIONS["model_path"].env
        notes.append(f"{OPTIONS['model_path'].env}={settings.model_path} is not a checkpoint folder")
    return None, "not found"


def _kept_experts(inputs: Inputs) -> None:
    """Which original experts the pruned model holds, from the pruning record, else reap_metadata.json."""
    pruned = inputs.pruned
    layers, count = pruned.moe_layers, pruned.num_experts
    record = inputs.record
    id_map = None
    if record is not None and "experts_to_keep" in record:
        where = PRUNING_RECORD
        keep = {int(k): [int(e) for e in v] for k, v in record["experts_to_keep"].items()}
        id_map = record.get("id_map")
    elif (pruned.path / METADATA_NAME).is_file():
        where = f"{METADATA_NAME} (no {PRUNING_RECORD}; assumes kept experts were renumbered in ascending order)"
        keep = load_metadata(pruned.path / METADATA_NAME).experts_to_keep
        sizes = sorted({len(v) for v in keep.values()})
        if sizes != [count] or sorted(keep) != layers:
            inputs.notes.append(f"{METADATA_NAME} keeps {sizes} experts in layers {sorted(keep)[:4]}..., but the "
                                f"pruned model has {count} in layers {layers[:4]}...; it was not the selection used "
                                "(no surgery check)")
            return
    else:
        inputs.notes.append(f"the pruned folder has neither {PRUNING_RECORD} nor {METADATA_NAME}: which experts were "
                            "kept is unknown (no surgery check)")
        return
    if sorted(keep) != layers:
        inputs.keep_problem = (f"{where} lists MoE layers {sorted(keep)[:6]}, the pruned config.json has "
                               f"{layers[:6]}")
        return
    for layer, ids in keep.items():
        if len(ids) != count or len(set(ids)) != len(ids):
            inputs.keep_problem = (f"{where}: layer {layer} keeps {len(set(ids))} distinct experts, but the pruned "
                                   f"config.json says {count}")
            return
    order = {layer: sorted(ids) for layer, ids in keep.items()}
    if id_map:
        for layer in keep:
            mapping = {int(old): int(new) for old, new in id_map.get(str(layer), {}).items()}
            if sorted(mapping.values()) != list(range(count)) or sorted(mapping) != sorted(keep[layer]):
                inputs.keep_problem = f"{PRUNING_RECORD}: id_map of layer {layer} is not a renumbering of its kept ids"
                return
            order[layer] = sorted(mapping, key=mapping.get)
    inputs.keep, inputs.order, inputs.keep_source = keep, order, where


def read_record(path: Path) -> dict:
    """pruning_record.json, its fields checked before use."""
    fix = "it was edited by hand or not written by prune_model.py — prune again"
    return validate(read_json(path, PRUNING_RECORD), path, PRUNING_RECORD, {
        "source_path": (lambda v: isinstance(v, str), "a path string", False),
        "source_num_experts": (lambda v: is_int(v, 1), "a positive integer", False),
        "experts_to_keep": (lambda v: isinstance(v, dict) and all(is_int_key(k) and int_list(ids)
                                                                  for k, ids in v.items()),
                            "an object from layer number to expert ids", False),
        "id_map": (lambda v: isinstance(v, dict) and all(
            is_int_key(k) and isinstance(m, dict) and all(is_int_key(o) and is_int(n) for o, n in m.items())
            for k, m in v.items()), "an object from layer number to {old id: new id}", False),
    }, fix)


def _vocab_size(ckpt: Checkpoint) -> int | None:
    try:
        return ckpt.family.vocab_size(ckpt.config)
    except (KeyError, ValueError, TypeError):
        return None


def resolve_inputs(settings: Settings) -> Inputs:
    pruned_path = _require_checkpoint(settings, "pruned_output_path")
    pruned = Checkpoint(pruned_path)
    record_path = pruned_path / PRUNING_RECORD
    record = read_record(record_path) if record_path.is_file() else None
    notes: list[str] = []
    reference, reference_source = find_reference(settings, record, notes)
    if reference is not None and _same(reference, pruned_path):
        raise ConfigError(f"the original ({reference_source}) is the pruned model itself ({pruned_path}); point "
                          f"{flag_of('reference_path')} at the unpruned checkpoint")
    inputs = Inputs(pruned, record, reference, reference_source, notes=notes)
    _kept_experts(inputs)
    if reference is not None:
        original = Checkpoint(reference)
        if original.family is not pruned.family or original.moe_layers != pruned.moe_layers:
            raise ReapError(f"the original {reference} ({original.family.name}, MoE layers {original.moe_layers[:4]}"
                            f"...) does not match the pruned model ({pruned.family.name}, {pruned.moe_layers[:4]}"
                            "...); pass the checkpoint it was pruned from")
        vocab = [_vocab_size(c) for c in (original, pruned)]
        if None not in vocab and vocab[0] != vocab[1]:  # unknown: the loader tells
            raise ReapError(f"the original {reference} has a vocabulary of {vocab[0]} tokens, the pruned model "
                            f"{vocab[1]}; their logits cannot be compared — pass the checkpoint it was pruned from")
        expected = (record or {}).get("source_num_experts")
        if expected is not None and int(expected) != original.num_experts:
            raise ReapError(f"the original {reference} has {original.num_experts} experts per layer, but the pruned "
                            f"model was cut from one with {expected}; pass the checkpoint it was pruned from")
        if inputs.keep and max(max(v) for v in inputs.keep.values()) >= original.num_experts:
            raise ReapError(f"the kept expert ids ({inputs.keep_source}) go beyond the {original.num_experts} "
                            f"experts of {reference}; pass the checkpoint it was pruned from")
        if original.num_experts < pruned.num_experts:
            raise ReapError(f"the original {reference} has fewer experts ({original.num_experts}) than the pruned "
                            f"model ({pruned.num_experts}); are --model and --reference swapped?")
    check_output_folder(Path(settings.test_output_path), flag_of("test_output_path"),
                        {"pruned model folder": pruned_path, "original model folder": reference},
                        what="the test report")
    check_checkpoint(pruned)
    if reference is not None:
        check_checkpoint(Checkpoint(reference))
    return inputs
