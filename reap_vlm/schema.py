"""The shapes of the JSON files the scripts hand each other (reap_metadata.json, pruning_record.json), checked
before use: a value of the wrong type or out of range is one line naming the file and the field."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .checkpoint.fsutil import json_type
from .errors import ReapError


def is_int(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_int_key(key: Any) -> bool:
    return isinstance(key, str) and key.isdigit()


def int_list(value: Any, low: int = 0, high: int | None = None) -> bool:
    return isinstance(value, list) and all(is_int(v, low) and (high is None or v < high) for v in value)


def matrix(rows: int, columns: int) -> Callable[[Any], bool]:
    return lambda value: (isinstance(value, list) and len(value) == rows and
                          all(isinstance(r, list) and len(r) == columns and all(map(is_number, r)) for r in value))


Rule = tuple[Callable[[Any], bool], str, bool]  # check, what it should be, required


def validate(raw: Any, path: Path, what: str, rules: dict[str, Rule], fix: str) -> dict:
    """``raw`` (a JSON object) against ``rules``: the first field that is missing or breaks its rule is a ReapError
    naming the file, the field, what it should be and what it is."""
    if not isinstance(raw, dict):
        raise ReapError(f"{what} {path}: expected a JSON object at the top level, found {json_type(raw)}; {fix}")
    for field, (check, expected, required) in rules.items():
        if field not in raw:
            if required:
                raise ReapError(f"{what} {path}: field \"{field}\" is missing; {fix}")
            continue
        if not check(raw[field]):
            shown = repr(raw[field])
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise ReapError(f"{what} {path}: field \"{field}\" should be {expected}, found {json_type(raw[field])} "
                            f"{shown}; {fix}")
    return raw
