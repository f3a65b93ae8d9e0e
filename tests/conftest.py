"""Shared fixtures: tiny Qwen3-VL-MoE checkpoints and calibration sets, built offline once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from reap_vlm.fixtures.tiny import FixtureSpec, build_calibration_set, build_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def fixture_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fixtures")


@pytest.fixture(scope="session")
def tiny_model(fixture_root) -> Path:
    """Fused official layout (gate_up_proj [E, H, 2I]), float32, 3 shards."""
    return build_tiny_checkpoint(fixture_root / "tiny-fused")


@pytest.fixture(scope="session")
def tiny_model_per_expert(fixture_root) -> Path:
    """Same weights, one tensor per expert (experts.{e}.{gate,up,down}_proj.weight)."""
    return build_tiny_checkpoint(fixture_root / "tiny-per-expert", FixtureSpec(per_expert=True))


@pytest.fixture(scope="session")
def calibration(fixture_root) -> Path:
    """Folder with calibration_data.json (user format), chat.jsonl and text.json, images/ beside them."""
    return build_calibration_set(fixture_root / "calibration")
