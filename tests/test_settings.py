"""Configuration: precedence, validation (exit 2, one line), deprecated variables, --help."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from reap_vlm.errors import ConfigError
from reap_vlm.settings import DEPRECATED_ENV, OPTIONS, Settings, parse_settings, resolve

ROOT = Path(__file__).resolve().parents[1]
ALL = tuple(OPTIONS)


def test_defaults_match_settings_dataclass():
    defaults = Settings()
    for name, option in OPTIONS.items():
        assert getattr(defaults, name) == option.default, name


def test_precedence_flag_over_env_over_dotenv_over_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("REAP_BATCH_SIZE=3\nREAP_MAX_SAMPLES=7\nREAP_SEED=9\n")
    environ = {"REAP_BATCH_SIZE": "5", "REAP_MAX_SAMPLES": "11"}
    s = parse_settings("t", ALL, ["--batch-size", "8"], environ=environ)
    assert s.batch_size == 8 and s.sources["batch_size"] == "flag"
    assert s.max_samples == 11 and s.sources["max_samples"] == "env"
    assert s.seed == 9 and s.sources["seed"] == ".env"
    assert s.max_seq_len == 2048 and s.sources["max_seq_len"] == "default"


def test_reap_env_file_names_another_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("REAP_SEED=1\n")
    other = tmp_path / "other.env"
    other.write_text("REAP_SEED=2\nREAP_SCORING_MODE=routed\n")
    s = resolve(ALL, {}, environ={"REAP_ENV_FILE": str(other)})
    assert (s.seed, s.scoring_mode) == (2, "routed")
    with pytest.raises(ConfigError, match="REAP_ENV_FILE"):
        resolve(ALL, {}, environ={"REAP_ENV_FILE": str(tmp_path / "missing.env")})


def test_switches_and_per_script_flag_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = parse_settings("t", ("resume", "force", "pruned_output_path"), ["--no-resume", "--force", "--output", "x"],
                       flags={"pruned_output_path": "--output"}, environ={})
    assert s.resume is False and s.force is True and s.pruned_output_path == Path("x")
    s = resolve(("resume",), {}, environ={"REAP_RESUME": "off"})
    assert s.resume is False


BAD_VALUES = [
    ("prune_ratio", "1.5", "a number in [0, 1)"),
    ("prune_ratio", "abc", "a number in [0, 1)"),
    ("prune_ratio", "-0.1", "a number in [0, 1)"),
    ("scoring_mode", "fast", "one of full, routed, router"),
    ("criterion", "magic", "one of reap"),
    ("max_samples", "0", "an integer >= 1"),
    ("max_samples", "many", "an integer >= 1"),
    ("max_seq_len", "8", "an integer >= 16"),
    ("batch_size", "0", "an integer >= 1"),
    ("batch_size", "2.5", "an integer >= 1"),
    ("seed", "-1", "an integer >= 0"),
    ("device", "tpu", "auto, cpu, cuda or cuda:N"),
    ("device", "cuda:x", "auto, cpu, cuda or cuda:N"),
    ("dtype", "int8", "one of auto, bfloat16"),
    ("engine", "magic", "one of auto, model, layerwise"),
    ("max_pixels", "-5", "an integer >= 0"),
    ("sort_window", "-1", "an integer >= 0"),
    ("encode_workers", "many", "auto or an integer in [0, 64]"),
    ("encode_workers", "65", "auto or an integer in [0, 64]"),
    ("encode_workers_kind", "fibers", "one of auto, threads, processes"),
    ("keep_multiple", "0", "an integer >= 1"),
    ("checkpoint_every", "0", "an integer >= 1"),
    ("resume", "maybe", "true or false"),
    ("skip_bad_samples", "2", "true or false"),
    ("force", "y", "true or false"),
    ("verify", "sure", "true or false"),
    ("test_output_path", " ", "a non-empty path"),
    ("output_path", "", "a non-empty path"),
    ("max_new_tokens", "0", "an integer >= 1"),
    ("num_prompts", "0", "an integer >= 1"),
    ("backend", "onnx", "one of transformers, vllm"),
    ("protect_super_experts", "kinda", "true or false"),
    ("super_expert_quantile", "101", "a percentile in [0, 100]"),
    ("super_expert_fraction", "0", "a number in (0, 1]"),
    ("super_expert_layers", "x", "a number in (0, 1]"),
    ("min_top1_agreement", "2", "a number in [0, 1]"),
    ("min_bbox_iou", "x", "a number in [0, 1]"),
    ("min_accuracy_ratio", "1.5", "a number in [0, 1]"),
    ("check_mode", "fast", "one of auto, whole, packed, layerwise"),
    ("thinking", "perhaps", "true or false"),
    ("thinking_max_new_tokens", "0", "an integer >= 1"),
]


def test_every_option_has_a_validation_case():
    # Paths without a parse rule beyond non-empty: one representative each is enough.
    covered = {name for name, _, _ in BAD_VALUES}
    path_like = {"model_path", "pruned_output_path", "metadata_path", "calibration_path", "reference_path",
                 "test_output_path", "eval_path"}
    assert set(OPTIONS) - covered <= path_like


@pytest.mark.parametrize("name,value,allowed", BAD_VALUES)
def test_bad_value_from_env_names_variable_value_and_rule(name, value, allowed, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    option = OPTIONS[name]
    with pytest.raises(ConfigError) as err:
        resolve(ALL, {}, environ={option.env: value})
    message = str(err.value)
    assert option.env in message and option.flag in message and repr(value) in message and allowed in message
    assert "\n" not in message and err.value.exit_code == 2


def test_bad_value_from_flag_and_from_dotenv(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"--batch-size / REAP_BATCH_SIZE='x'"):
        resolve(ALL, {"batch_size": "x"}, environ={})
    (tmp_path / ".env").write_text("REAP_PRUNE_RATIO=2\n")
    with pytest.raises(ConfigError, match=r"REAP_PRUNE_RATIO \(in .env\)"):
        resolve(ALL, {}, environ={})


def test_deprecated_seed_variables_warn_with_replacement(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for variable, replacement in DEPRECATED_ENV.items():
        with pytest.warns(UserWarning, match=variable) as record:
            resolve(ALL, {}, environ={variable: "4"})
        assert replacement.split()[0] in str(record[0].message)


def _run(script: str, *args: str, env: dict | None = None, cwd: Path | None = None):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("REAP_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd or ROOT, timeout=120)


def test_cli_bad_value_exits_2_with_one_line_and_no_traceback(tmp_path):
    result = _run("reap.py", "--prune-ratio", "1.2", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["error: --prune-ratio / REAP_PRUNE_RATIO='1.2' is not valid: expected a number in [0, 1)"]


def test_cli_missing_model_and_deprecated_warning(tmp_path):
    result = _run("reap.py", env={"REAP_VRAM_GB": "140"}, cwd=tmp_path)
    assert result.returncode == 2
    assert "warning: REAP_VRAM_GB is no longer used" in result.stderr
    assert "error: --model / REAP_MODEL_PATH is required" in result.stderr


def test_help_lists_every_option_with_variable_and_default(tmp_path):
    result = _run("reap.py", "--help", cwd=tmp_path)
    assert result.returncode == 0
    from reap import OPTIONS as REAP_OPTIONS

    text = " ".join(result.stdout.split())
    for name in REAP_OPTIONS:
        option = OPTIONS[name]
        assert option.flag in text and f"env {option.env}" in text, name
    assert "default: 0.4" in text and "default: full" in text


def test_env_example_documents_every_variable():
    text = (ROOT / ".env.example").read_text()
    for option in OPTIONS.values():
        assert f"{option.env}=" in text, option.env
    # and the launcher's own (run.sh's LAUNCHER_VARS), but for REAP_ENV_FILE, which names this file, and
    # REAP_SOURCE_HASH, which ./run.sh build sets
    launcher = re.findall(r'^LAUNCHER_VARS\+?="([^"]*)"', (ROOT / "run.sh").read_text(), re.M)
    names = " ".join(launcher).split()
    assert "REAP_RUNTIME" in names and "REAP_DEVEL_IMAGE" in names
    for name in set(names) - {"REAP_ENV_FILE", "REAP_SOURCE_HASH"}:
        assert f"{name}=" in text, name
