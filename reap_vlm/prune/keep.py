"""Which experts to keep: experts_to_keep of reap_metadata.json checked against the model, or recomputed from its
metrics when a prune ratio, criterion or keep multiple set now differs from the recorded one."""

from __future__ import annotations

import math
from collections import Counter

from ..errors import ReapError
from ..metadata import ReapMetadata
from ..safeguards import select_with_safeguards, super_expert_criteria
from ..selection import num_to_keep, with_derived
from ..settings import OPTIONS


def check_experts_to_keep(experts_to_keep: dict, moe_layers: list[int], num_experts: int,
                          top_k: int) -> dict[int, list[int]]:
    """The kept ids per MoE layer, sorted, after checking they fit the model; a ReapError says what does not."""
    keep = {int(layer): sorted(int(e) for e in ids) for layer, ids in experts_to_keep.items()}
    if set(keep) != set(moe_layers):
        extra, missing = sorted(set(keep) - set(moe_layers)), sorted(set(moe_layers) - set(keep))
        raise ReapError(f"experts_to_keep does not fit the model: its layers differ from the model's MoE layers "
                        f"(missing {missing[:8]}, not MoE {extra[:8]}); the metadata was made for another "
                        "model — rerun reap.py on this model or pass the matching --model / --metadata")
    for layer, ids in sorted(keep.items()):
        bad = [e for e in ids if not 0 <= e < num_experts]
        if bad:
            raise ReapError(f"experts_to_keep does not fit the model: layer {layer} names expert ids {bad[:5]} "
                            f"outside 0..{num_experts - 1}; rerun reap.py on this model")
        duplicated = sorted(e for e, n in Counter(ids).items() if n > 1)
        if duplicated:
            raise ReapError(f"experts_to_keep is invalid: layer {layer} lists expert ids {duplicated[:5]} more "
                            "than once; rerun reap.py or fix the list")
    counts = sorted({len(ids) for ids in keep.values()})
    if len(counts) > 1:
        raise ReapError(f"experts_to_keep keeps uneven counts across layers ({counts}); vLLM needs one expert "
                        "count for every layer — recompute the selection with --prune-ratio")
    if counts[0] < top_k:
        raise ReapError(f"experts_to_keep keeps {counts[0]} experts per layer, fewer than the {top_k} each token "
                        "routes to; lower --prune-ratio")
    return keep


def keep_from_metadata(metadata: ReapMetadata, num_experts: int, top_k: int, **chosen) -> dict[int, list[int]]:
    """The metadata's selection, or — when any setting is given — one recomputed from its stored metrics
    (``selection_from_metadata``)."""
    return selection_from_metadata(metadata, num_experts, top_k, **chosen)[0]


def selection_from_metadata(metadata: ReapMetadata, num_experts: int, top_k: int, *, prune_ratio: float | None = None,
                            criterion: str | None = None, keep_multiple: int | None = None,
                            **safeguard_settings) -> tuple[dict[int, list[int]], dict | None]:
    """The metadata's selection, or — when any of prune ratio, criterion, keep multiple is given — one recomputed
    from its stored metrics, with the super-expert settings given or recorded (``safeguards``); returns the kept
    ids and, when recomputed, what the safeguards found and did."""
    raw = metadata.raw
    if int(raw["num_experts"]) != num_experts:
        raise ReapError(f"{metadata.path} was computed for a model with {raw['num_experts']} experts per layer, "
                        f"but the model to prune has {num_experts}; pass the matching --model or rerun reap.py")
    if prune_ratio is None and criterion is None and keep_multiple is None and \
            all(v is None for v in safeguard_settings.values()):
        return metadata.experts_to_keep, None
    ratio = raw.get("prune_ratio") if prune_ratio is None else prune_ratio
    multiple = raw.get("keep_multiple", 1) if keep_multiple is None else keep_multiple
    criterion = raw.get("criterion", "reap") if criterion is None else criterion
    if ratio is None:
        raise ReapError(f"{metadata.path} records no prune_ratio; pass --prune-ratio")
    if not metadata.metrics:
        raise ReapError(f"{metadata.path} stores no metrics to recompute the selection from; rerun reap.py "
                        "with the new --prune-ratio / --criterion")
    keep = num_to_keep(num_experts, float(ratio), int(multiple), top_k)
    settings = {**{name: raw.get(name) for name in SAFEGUARD_SETTINGS},
                **{k: v for k, v in safeguard_settings.items() if v is not None}}
    protect = bool(settings["protect_super_experts"])
    kept, safeguards = select_with_safeguards(metadata.metrics, metadata.moe_layers, criterion, keep,
                                              protect=protect, criteria=super_expert_criteria(settings))
    return kept, (safeguards if protect or safeguards["super_experts"] is not None else None)


# The settings that decide the selection, as the messages name them.
SAFEGUARD_SETTINGS = {"protect_super_experts": "super-expert protection",
                      "super_expert_quantile": "super-expert quantile",
                      "super_expert_fraction": "super-expert fraction", "super_expert_layers": "super-expert layers"}
SELECTION_SETTINGS = {"prune_ratio": "prune ratio", "criterion": "criterion", "keep_multiple": "keep multiple",
                      **SAFEGUARD_SETTINGS}


def recorded_selection(raw: dict) -> dict:
    """What the metadata's experts_to_keep was made with (metadata from before keep_multiple existed: 1; from
    before super-expert protection: off, thresholds not recorded)."""
    return {"prune_ratio": raw.get("prune_ratio"), "criterion": raw.get("criterion"),
            "keep_multiple": raw.get("keep_multiple", 1),
            **{name: raw[name] for name in SAFEGUARD_SETTINGS if name in raw}}


def _same_setting(name: str, value, recorded) -> bool:
    if recorded is None:
        return False
    try:
        if isinstance(value, float):
            return math.isclose(float(value), float(recorded), rel_tol=0.0, abs_tol=1e-9)
        if name == "keep_multiple":
            return int(value) == int(recorded)
    except (TypeError, ValueError):
        return False
    return str(value) == str(recorded)


def _show(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _where_set(settings, name: str) -> str:
    option = OPTIONS[name]
    source = settings.sources.get(name, "default")
    return {"flag": option.flag, "env": f"{option.env} in the environment",
            ".env": f"{option.env} in .env"}.get(source, source)


def selection_changes(settings, raw: dict) -> tuple[dict, list[str]]:
    """The settings (flag, environment or .env; never defaults) that differ from what the metadata's selection
    was made with, and one phrase per difference naming where it was set.  Equal values keep the metadata's
    selection: a .env that repeats reap.py's settings must not silently replace it."""
    recorded = recorded_selection(raw)
    overrides: dict = {}
    changes: list[str] = []
    for name, label in SELECTION_SETTINGS.items():
        if not settings.explicitly_set(name):
            continue
        value = getattr(settings, name)
        if _same_setting(name, value, recorded[name]):
            continue
        overrides[name] = value
        was = (f"differs from the metadata's {_show(recorded[name])}" if recorded[name] is not None
               else "is not recorded in the metadata")
        changes.append(f"{label} {_show(value)} ({_where_set(settings, name)}) {was}")
    return overrides, changes


def recomputed_metadata(raw: dict, keep: dict[int, list[int]], selection: dict) -> dict:
    """reap_metadata.json as it belongs beside a checkpoint pruned with a recomputed selection: the metrics as
    measured, the selection fields describing what was really kept, and a marker saying what reap.py chose."""
    metadata = dict(raw)
    criterion = selection["criterion"]
    metadata.update({
        "experts_to_keep": {str(layer): ids for layer, ids in sorted(keep.items())},
        "num_experts_to_keep": selection["num_experts_to_keep"],
        "prune_ratio": selection["prune_ratio"],
        "criterion": criterion,
        "keep_multiple": selection["keep_multiple"],
        "selection_recomputed": {
            "by": "prune_model.py",
            "why": selection["why"],
            "reap_selection": {**recorded_selection(raw), "num_experts_to_keep": raw.get("num_experts_to_keep")},
        },
    })
    derived = with_derived(raw.get("metrics") or {})
    if criterion in derived:  # mean_scores holds the criterion's values
        metadata["mean_scores"] = derived[criterion]
    metadata.update({name: selection[name] for name in SAFEGUARD_SETTINGS if name in selection})
    metadata.update(selection.get("safeguards") or {})
    return metadata
