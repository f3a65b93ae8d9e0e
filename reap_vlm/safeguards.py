"""Selection safeguards beside the plain top K: super experts found and (on request) protected, and the
calibration's coverage of image tokens.  Shared by reap.py's selection and prune_model.py's recomputed one;
the formulas live in ``selection.py``."""

from __future__ import annotations

import warnings

from .selection import SUPER_EXPERT_DEFAULTS, find_super_experts, protect_experts, rankings

# Below this share of image tokens a model with a vision tower is warned about its calibration.
MIN_IMAGE_SHARE = 0.05
SUPER_EXPERT_SETTINGS = {"quantile": "super_expert_quantile", "fraction": "super_expert_fraction",
                         "layers": "super_expert_layers"}


def super_expert_criteria(values: dict) -> dict:
    """{"quantile", "fraction", "layers"} from values keyed by setting name (``vars(settings)``, a metadata's
    fields); a missing or None one is the default."""
    return {key: float(SUPER_EXPERT_DEFAULTS[key] if values.get(name) is None else values[name])
            for key, name in SUPER_EXPERT_SETTINGS.items()}


def select_for_run(settings, metrics: dict, moe_layers: list[int], keep: int, n_tokens: int, n_image: int,
                   config: dict) -> tuple[dict[int, list[int]], dict]:
    """reap.py's selection: the kept ids, and the fields reap_metadata.json adds for the safeguards (the settings
    by name, ``super_experts``, ``protection``, ``calibration_coverage``)."""
    criteria = super_expert_criteria(vars(settings))
    kept, found = select_with_safeguards(metrics, moe_layers, settings.criterion, keep,
                                         protect=settings.protect_super_experts, criteria=criteria)
    fields = {"protect_super_experts": settings.protect_super_experts,
              **{name: criteria[key] for key, name in SUPER_EXPERT_SETTINGS.items()}, **found,
              "calibration_coverage": calibration_coverage(metrics, moe_layers, n_tokens, n_image,
                                                           has_vision_tower(config))}
    return kept, fields


def select_with_safeguards(metrics: dict, moe_layers: list[int], criterion: str, keep: int, *, protect: bool,
                           criteria: dict) -> tuple[dict[int, list[int]], dict]:
    """The top ``keep`` per layer by ``criterion``, with the super experts kept when ``protect``; returns the kept
    ids and what the metadata records: {"super_experts": ..., "protection": ...}."""
    found = find_super_experts(metrics, moe_layers, **criteria)
    ranked = rankings(metrics, moe_layers, criterion)
    protected = found["experts"] if (protect and found) else {}
    if protect and found is None:
        warnings.warn("--protect-super-experts: these metrics hold no max_activation (router mode, or metadata "
                      "from an older reap.py); nothing is protected — rescore with --mode full or routed",
                      stacklevel=2)
    kept, moved = protect_experts(ranked, keep, protected)
    protection = {"enabled": protect, "protected": sum(len(v) for v in protected.values()),
                  "brought_in": sum(len(m["added"]) for m in moved.values()),
                  "layers": {str(layer): m for layer, m in sorted(moved.items())}}
    return kept, {"super_experts": _for_json(found), "protection": protection}


def _for_json(found: dict | None) -> dict | None:
    if found is None:
        return None
    return {**found, "experts": {str(layer): ids for layer, ids in sorted(found["experts"].items())}}


def calibration_coverage(metrics: dict, moe_layers: list[int], n_tokens: int, n_image: int,
                         has_vision: bool) -> dict:
    """Image/text token shares, the experts image tokens never reached (per layer and in all), and a warning
    when a model with a vision tower saw under ``MIN_IMAGE_SHARE`` image tokens."""
    image_share = n_image / n_tokens if n_tokens else 0.0
    never = {}
    for layer, row in zip(moe_layers, metrics.get("frequency_image", [])):
        never[str(layer)] = [e for e, c in enumerate(row) if c == 0]
    warning = None
    if has_vision and image_share < MIN_IMAGE_SHARE:
        warning = (f"only {image_share:.1%} of the calibration tokens are image tokens (under "
                   f"{MIN_IMAGE_SHARE:.0%}) while the model has a vision tower: experts that serve images may look "
                   "unimportant; add image samples or consider --criterion reap_balanced")
    return {"image_share": image_share, "text_share": 1.0 - image_share if n_tokens else 0.0,
            "experts_never_routed_by_image": sum(len(v) for v in never.values()),
            "never_routed_by_image": never, "warning": warning}


def has_vision_tower(config: dict) -> bool:
    return isinstance(config.get("vision_config"), dict)


def safeguard_lines(metadata: dict) -> list[str]:
    """The summary's lines for coverage, super experts and protection."""
    lines = []
    coverage = metadata.get("calibration_coverage")
    if coverage:
        lines.append(f"coverage         image {coverage['image_share']:.1%} / text {coverage['text_share']:.1%} of "
                     f"tokens; {coverage['experts_never_routed_by_image']} expert-layer pairs never routed by image "
                     "tokens")
        if coverage.get("warning"):
            lines.append(f"warning          {coverage['warning']}")
    found = metadata.get("super_experts")
    if found is not None:
        names = ", ".join(f"{d['layer']}:{d['expert']} ({d['max_activation']:.3g}, {d['modality']})"
                          for d in found["details"][:8])
        threshold = "n/a" if found["threshold"] is None else f"{found['threshold']:.3g}"
        lines.append(f"super experts    {len(found['details'])} (layer:expert; max activation > {threshold})"
                     + (f": {names}" if names else ""))
    protection = metadata.get("protection")
    if protection and protection["enabled"]:
        moved = "; ".join(f"layer {layer}: kept {m['added']} instead of {m['displaced']}"
                          for layer, m in protection["layers"].items())
        lines.append(f"protected        {protection['protected']} super experts, {protection['brought_in']} of them "
                     "outside the top K" + (f" ({moved})" if moved else " (all already kept)"))
    return lines
