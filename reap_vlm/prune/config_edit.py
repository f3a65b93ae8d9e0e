"""Editing config.json in place for a pruned model: the expert count and quantization_config's module lists.

Only the values that change are rewritten; every other byte (key order, spacing, line endings) stays as
the source had it.
"""

from __future__ import annotations

import json
import re

from ..errors import ReapError
from ..families import ModelFamily

QUANTIZATION_LISTS = ("modules_to_not_convert", "ignore")

_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def json_value_spans(text: str, path: tuple[str, ...]) -> list[tuple[int, int]]:
    """Character spans of the value(s) at ``path`` (object keys) in JSON ``text``, so it can be edited in place."""

    def skip(i: int) -> int:
        return _WS.match(text, i).end()

    def walk(i: int, rest: tuple[str, ...]) -> tuple[int, list[tuple[int, int]]]:
        if not rest or text[i] != "{":
            end = _DECODER.raw_decode(text, i)[1]
            return end, [] if rest else [(i, end)]
        spans, i = [], skip(i + 1)
        if text[i] == "}":
            return i + 1, spans
        while True:
            key, i = json.decoder.scanstring(text, skip(i) + 1)
            i = skip(skip(i) + 1)  # past ':'
            if key == rest[0]:
                i, found = walk(i, rest[1:])
                spans += found
            else:
                i = _DECODER.raw_decode(text, i)[1]
            i = skip(i)
            if text[i] == "}":
                return i + 1, spans
            i = skip(i + 1)  # past ','

    return walk(skip(0), path)[1]


def _render_list_like(original: str, values: list[str]) -> str:
    """``values`` as a JSON list laid out like ``original`` (one line, or one item per line)."""
    if "\n" not in original or not values:
        return json.dumps(values, ensure_ascii=False)
    item_indent = re.match(r"\[[ \t]*\n([ \t]*)", original)
    closing_indent = re.search(r"\n([ \t]*)\]$", original)
    item = item_indent.group(1) if item_indent else "  "
    closing = closing_indent.group(1) if closing_indent else ""
    return "[\n" + ",\n".join(item + json.dumps(v, ensure_ascii=False) for v in values) + "\n" + closing + "]"


def rewrite_module_names(names: list, family: ModelFamily, id_map: dict[int, dict[int, int]],
                         config: dict | None = None) -> list:
    """A quantization_config module list with dropped experts removed and kept ones renumbered; modules of the
    parts the pruned checkpoint leaves out (``ModelFamily.left_out``, judged with ``config`` where given) too."""
    named = family.expert_module_pattern()
    unlayered = re.compile(rf"(?<![A-Za-z0-9_]){re.escape(family.experts_module)}\\?\.\d+")
    out = []
    for name in names:
        if isinstance(name, str) and (family.left_out(name, config) if config is not None else
                                      family.is_dropped(name)):
            continue  # a module of a part the pruned checkpoint leaves out
        m = named.search(name) if isinstance(name, str) and not name.startswith("re:") else None
        if m is None:
            if isinstance(name, str) and unlayered.search(name):
                raise ReapError(f"quantization_config names {name!r}, an expert by index in a form this pruner cannot "
                                "remap (a regex, or no layer); edit that entry by hand or drop it, then rerun")
            out.append(name)
            continue
        layer, expert = int(m["layer"]), int(m["expert"])
        if layer not in id_map:
            raise ReapError(f"quantization_config names {name!r}, but layer {layer} is not a MoE layer of this "
                            "model; the config does not match the checkpoint")
        if expert in id_map[layer]:
            out.append(f"{name[:m.start('expert')]}{id_map[layer][expert]}{name[m.end('expert'):]}")
    return out


def prune_config_text(text: str, family: ModelFamily, num_kept: int,
                      id_map: dict[int, dict[int, int]]) -> tuple[str, list[str]]:
    """config.json with the expert count and quantization module lists updated; every other byte as it was.
    Returns the new text and the dotted keys that changed."""
    expected = json.loads(text)  # what the edited text must parse to
    text_path = family.text_section_path(expected)
    edits: list[tuple[tuple[int, int], str, str]] = []
    for key in family.set_num_experts(expected, num_kept):
        for span in json_value_spans(text, (*text_path, key)):
            edits.append((span, str(num_kept), ".".join((*text_path, key))))
    section = family.text_section(expected)
    for key, value in family.config_after_pruning(section).items():
        section[key] = value
        for span in json_value_spans(text, (*text_path, key)):
            edits.append((span, json.dumps(value), ".".join((*text_path, key))))
    for where in dict.fromkeys([(), text_path]):
        quantization = _get(expected, (*where, "quantization_config"))
        for list_key in QUANTIZATION_LISTS:
            names = quantization.get(list_key) if isinstance(quantization, dict) else None
            new = rewrite_module_names(names, family, id_map, expected) \
                if isinstance(names, list) else names
            if new == names:
                continue
            quantization[list_key] = new
            path = (*where, "quantization_config", list_key)
            for start, end in json_value_spans(text, path):
                edits.append(((start, end), _render_list_like(text[start:end], new), ".".join(path)))
    for (start, end), value, _ in sorted(edits, reverse=True):
        text = text[:start] + value + text[end:]
    if json.loads(text) != expected:
        raise ReapError("config.json could not be edited in place; report this with the file")
    return text, list(dict.fromkeys(label for _, _, label in edits))


def _get(obj, path: tuple[str, ...]):
    for key in path:
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj
