"""The pruned checkpoint's model card (README.md): Hugging Face front matter (base_model, tags, pipeline_tag, the
source's license), then what was pruned and how it was chosen.  The source's card is kept beside it as
SOURCE_README.md: it describes the source, not this model."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..checkpoint.fsutil import read_text
from ..errors import ReapError

CARD_NAME = "README.md"
SOURCE_CARD_NAME = "SOURCE_README.md"
TAGS = ("reap", "expert-pruning", "moe", "pruned")
PIPELINE_TAG = "image-text-to-text"


def front_matter(card: str) -> dict:
    """The YAML front matter of a model card ({} when there is none or it cannot be read)."""
    match = re.match(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", card, re.S)
    if not match:
        return {}
    try:
        import yaml

        data = yaml.safe_load(match.group(1))
    except Exception:  # noqa: BLE001 - a malformed card only loses its metadata here
        return {}
    return data if isinstance(data, dict) else {}


def source_name(source: Path, config: dict, source_meta: dict) -> str:
    """The source's Hugging Face name when it is known (its card's model_name / base_model, config.json's
    _name_or_path unless that is a local path), else its folder's name."""
    for value in (source_meta.get("model_name"), config.get("_name_or_path")):
        if isinstance(value, str) and value.strip() and not Path(value).is_absolute() and not value.startswith("."):
            return value.strip()
    return Path(source).resolve().name


def source_license(config: dict, source_meta: dict) -> str | None:
    for value in (source_meta.get("license"), config.get("license")):
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def _yaml_scalar(value) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid YAML scalar


def model_card(source: Path, config: dict, record: dict, metadata: dict | None) -> str:
    """README.md of the pruned checkpoint."""
    card_path = Path(source) / CARD_NAME
    try:
        source_card = read_text(card_path, "model card") if card_path.is_file() else ""
    except ReapError:
        source_card = ""
    meta = front_matter(source_card)
    name = source_name(source, config, meta)
    license_ = source_license(config, meta)
    total, kept = record["source_num_experts"], record["num_experts"]
    selection = record.get("selection") or {}
    metadata = metadata or {}
    criterion = selection.get("criterion") or metadata.get("criterion") or "unknown"
    lines = ["---", f"base_model: {_yaml_scalar(name)}", "tags:", *(f"- {t}" for t in TAGS),
             f"pipeline_tag: {PIPELINE_TAG}", "library_name: transformers"]
    if license_:
        lines.append(f"license: {_yaml_scalar(license_)}")
    lines += ["---", "", f"# {name}, {total - kept} of {total} experts pruned (REAP)", "",
              f"This is [{name}]({_link(name)}) with the experts of every MoE layer pruned from {total} to {kept} "
              f"(prune ratio {(total - kept) / total:.2f}) by REAP expert pruning (reap-vlm). Every other weight is "
              "the source's, byte for byte. The source's own model card is kept as "
              f"[{SOURCE_CARD_NAME}]({SOURCE_CARD_NAME}); it describes the unpruned model.", "",
              "## Pruning", "",
              f"- experts per MoE layer: {kept} of {total}, in {len(record['moe_layers'])} MoE layers",
              f"- selection criterion: {criterion} (the top {kept} experts of each layer)",
              f"- selection: {selection.get('source', 'metadata')}"
              + (f" ({selection['why']})" if selection.get("why") else "")]
    lines += _calibration_lines(metadata)
    lines += ["", "## Kept experts (original ids, renumbered 0..K-1 in this order)", "", "| layer | kept experts |",
              "|---|---|"]
    lines += [f"| {layer} | {', '.join(map(str, ids))} |" for layer, ids in record["experts_to_keep"].items()]
    lines += ["", "pruning_record.json holds the full record (id map, tensors rewritten); reap_metadata.json the "
              "scores the selection was made from.", ""]
    return "\n".join(lines)


def _link(name: str) -> str:
    return f"https://huggingface.co/{name}" if "/" in name else f"../{name}"


def _calibration_lines(metadata: dict) -> list[str]:
    if not metadata.get("num_samples"):
        return ["- calibration: not recorded"]
    tokens = metadata.get("num_tokens") or {}
    path = metadata.get("calibration_path")
    skipped = metadata.get("num_skipped_samples") or 0
    line = (f"- calibration: {metadata['num_samples']} samples" + (f" from {Path(path).name}" if path else "")
            + (f" ({skipped} skipped as bad)" if skipped else ""))
    if tokens:
        line += f", {tokens.get('total', 0)} tokens ({tokens.get('image', 0)} image tokens)"
    mode = metadata.get("scoring_mode")
    return [line + (f", scoring mode {mode}" if mode else "")]
