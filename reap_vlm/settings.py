"""Configuration shared by reap.py, prune_model.py and test_pruned_model.py.

One table of options (``OPTIONS``) says, for every setting, its flag, its
environment variable, its parser and its default.  Precedence, highest first:
command-line flag > environment (``REAP_*``) > ``.env`` file (``REAP_ENV_FILE``
names another) > default.  Every value is parsed and validated before any work
starts; a bad one raises :class:`ConfigError` naming the flag, the variable, the
value and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

from .checkpoint.fsutil import read_text
from .errors import ConfigError, ReapError

SCORING_MODES = ("full", "routed", "router")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "bfloat16", "float16", "float32")
ENGINES = ("auto", "model", "layerwise")
ENCODE_WORKER_KINDS = ("auto", "threads", "processes")
BACKENDS = ("transformers", "vllm")
CHECK_MODES = ("auto", "whole", "packed", "layerwise")
CRITERIA = (
    "reap",
    "ean",
    "frequency",
    "weighted_frequency",
    "reap_dense",
    "soft_frequency",
    "reap_image",
    "reap_text",
    "frequency_image",
    "frequency_text",
    "reap_balanced",
)

# Seed-era variables that no longer do anything, and what replaced them.
DEPRECATED_ENV = {
    "REAP_VRAM_GB": "GPU memory is now measured at start-up (token chunks are sized from free memory)",
    "REAP_VRAM_BUFFER": "GPU memory is now measured at start-up (token chunks are sized from free memory)",
    "REAP_PARALLEL_LAYERS": "layers are scored by --engine (layerwise streams one layer at a time with prefetch)",
}


class _Invalid(ValueError):
    """Raised by a parser; its message says what is allowed."""


def _choice(allowed: Sequence[str]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise _Invalid("one of " + ", ".join(allowed))
        return value

    return parse


def _device(raw: str) -> str:
    value = raw.strip().lower()
    if value in DEVICES:
        return value
    if value.startswith("cuda:") and value[5:].isdigit():
        return value
    raise _Invalid("auto, cpu, cuda or cuda:N")


def _int(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    span = f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"

    def parse(raw: str) -> int:
        try:
            value = int(str(raw).strip())
        except ValueError:
            raise _Invalid(span) from None
        if value < minimum or (maximum is not None and value > maximum):
            raise _Invalid(span)
        return value

    return parse


def _ratio(raw: str) -> float:
    try:
        value = float(str(raw).strip())
    except ValueError:
        raise _Invalid("a number in [0, 1)") from None
    if not 0.0 <= value < 1.0:
        raise _Invalid("a number in [0, 1)")
    return value


def _bool(raw: str | bool) -> bool:
    if isinstance(raw, bool):
        return raw
    value = str(raw).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise _Invalid("true or false (1/0, yes/no, on/off)")


def _path(raw: str) -> Path:
    value = str(raw).strip()
    if not value:
        raise _Invalid("a non-empty path")
    return Path(os.path.expanduser(value))


def _optional_path(raw: str) -> Path | None:
    return None if str(raw).strip() == "" else _path(raw)


def _optional_float(raw: str) -> float | None:
    if str(raw).strip() == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise _Invalid("a number in [0, 1], or empty for no threshold") from None
    if not 0.0 <= value <= 1.0:
        raise _Invalid("a number in [0, 1], or empty for no threshold")
    return value


def _float_in(accepts: Callable[[float], bool], allowed: str) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(str(raw).strip())
        except ValueError:
            raise _Invalid(allowed) from None
        if not accepts(value):
            raise _Invalid(allowed)
        return value

    return parse


def _workers(raw: str) -> int | str:
    if str(raw).strip().lower() == "auto":
        return "auto"
    try:
        return _int(0, 64)(raw)
    except _Invalid:
        raise _Invalid("auto or an integer in [0, 64]") from None


_share = _float_in(lambda v: 0.0 < v <= 1.0, "a number in (0, 1]")
_percent = _float_in(lambda v: 0.0 <= v <= 100.0, "a percentile in [0, 100]")


@dataclass(frozen=True)
class Option:
    name: str
    flag: str
    env: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    is_switch: bool = False  # --x / --no-x


OPTIONS: dict[str, Option] = {
    o.name: o
    for o in [
        Option("model_path", "--model", "REAP_MODEL_PATH", _optional_path, None,
               "checkpoint folder of the model to score/prune (config.json + safetensors)"),
        Option("output_path", "--output", "REAP_OUTPUT_PATH", _path, Path("output/reap"),
               "folder for reap_metadata.json, the heatmap and resume state"),
        Option("pruned_output_path", "--pruned-output", "REAP_PRUNED_OUTPUT_PATH", _path,
               Path("output/pruned-model"), "folder the pruned checkpoint is written to"),
        Option("metadata_path", "--metadata", "REAP_METADATA_PATH", _optional_path, None,
               "reap_metadata.json to prune from (default: <REAP_OUTPUT_PATH>/reap_metadata.json)"),
        Option("calibration_path", "--calibration", "REAP_CALIBRATION_PATH", _optional_path, None,
               "calibration file: JSON list / JSONL of {image, regions}, {prompt}, {messages} or {text} items"),
        Option("prune_ratio", "--prune-ratio", "REAP_PRUNE_RATIO", _ratio, 0.40,
               "fraction of experts removed per MoE layer (0.40 of 128 keeps 77)"),
        Option("keep_multiple", "--keep-multiple", "REAP_KEEP_MULTIPLE", _int(1), 1,
               "round the kept count up to a multiple of N (e.g. the expert-parallel size)"),
        Option("criterion", "--criterion", "REAP_CRITERION", _choice(CRITERIA), "reap",
               "metric that ranks experts (router mode: frequency unless set)"),
        Option("protect_super_experts", "--protect-super-experts", "REAP_PROTECT_SUPER_EXPERTS", _bool, False,
               "keep the super experts whatever their score (they displace the lowest-ranked kept experts)",
               is_switch=True),
        Option("super_expert_quantile", "--super-expert-quantile", "REAP_SUPER_EXPERT_QUANTILE", _percent, 99.5,
               "super expert: max activation above this percentile of every expert's (and the fraction below)"),
        Option("super_expert_fraction", "--super-expert-fraction", "REAP_SUPER_EXPERT_FRACTION", _share, 0.1,
               "super expert: max activation above this fraction of the largest expert's (and the percentile)"),
        Option("super_expert_layers", "--super-expert-layers", "REAP_SUPER_EXPERT_LAYERS", _share, 0.75,
               "super experts are looked for in this first fraction of the MoE layers"),
        Option("scoring_mode", "--mode", "REAP_SCORING_MODE", _choice(SCORING_MODES), "full",
               "full: every expert on every token; routed: routed pairs only; router: router statistics only"),
        Option("max_samples", "--max-samples", "REAP_MAX_SAMPLES", _int(1), 300,
               "calibration samples used (drawn with REAP_SEED when the file has more)"),
        Option("max_seq_len", "--max-seq-len", "REAP_MAX_SEQ_LEN", _int(16), 2048,
               "tokens per sample; text is truncated, image tokens never cut"),
        Option("max_pixels", "--max-pixels", "REAP_MAX_PIXELS", _int(0), 0,
               "cap on pixels per image before the processor (0: the processor's own sizing)"),
        Option("batch_size", "--batch-size", "REAP_BATCH_SIZE", _int(1), 1,
               "samples per forward (padded; padding is never counted)"),
        Option("sort_window", "--sort-window", "REAP_SORT_WINDOW", _int(0), 16,
               "batches per window within which samples are sorted by token length, less padding (0: file order)"),
        Option("encode_workers", "--encode-workers", "REAP_ENCODE_WORKERS", _workers, "auto",
               "workers encoding batches ahead of the forward (auto: this process's share of the usable cores, "
               "split among a host's torchrun ranks, less one, at most 8; 0: inline)"),
        Option("encode_workers_kind", "--encode-workers-kind", "REAP_ENCODE_WORKERS_KIND",
               _choice(ENCODE_WORKER_KINDS), "auto",
               "processes (forked, batches through shared memory) or threads (auto: processes where /dev/shm has "
               "room, else threads)"),
        Option("seed", "--seed", "REAP_SEED", _int(0), 42, "seed for sample drawing and prompt templates"),
        Option("device", "--device", "REAP_DEVICE", _device, "auto", "auto, cpu, cuda or cuda:N"),
        Option("dtype", "--dtype", "REAP_DTYPE", _choice(DTYPES), "auto",
               "compute dtype (auto: bfloat16 on GPU, float32 on CPU)"),
        Option("engine", "--engine", "REAP_ENGINE", _choice(ENGINES), "auto",
               "model: whole model in memory; layerwise: one decoder layer at a time from disk"),
        Option("checkpoint_every", "--checkpoint-every", "REAP_CHECKPOINT_EVERY", _int(1), 20,
               "save resumable accumulators every N batches (layerwise: after each group of batches)"),
        Option("resume", "--resume", "REAP_RESUME", _bool, True,
               "continue from saved accumulators when the inputs are the same", is_switch=True),
        Option("skip_bad_samples", "--skip-bad-samples", "REAP_SKIP_BAD_SAMPLES", _bool, False,
               "skip (and count) calibration items with a missing image or bad fields", is_switch=True),
        Option("force", "--force", "REAP_FORCE", _bool, False, "overwrite an existing output folder",
               is_switch=True),
        Option("verify", "--verify", "REAP_VERIFY", _bool, False,
               "re-open the written checkpoint and check it (and one forward when it fits)", is_switch=True),
        Option("reference_path", "--reference", "REAP_REFERENCE_PATH", _optional_path, None,
               "original checkpoint to compare with (default: the source in the pruning record)"),
        Option("test_output_path", "--report", "REAP_TEST_OUTPUT_PATH", _path, Path("output/test-report"),
               "folder for test_report.json / .md and bbox pictures"),
        Option("max_new_tokens", "--max-new-tokens", "REAP_MAX_NEW_TOKENS", _int(1), 64,
               "tokens generated per prompt in generation checks"),
        Option("num_prompts", "--num-prompts", "REAP_NUM_PROMPTS", _int(1), 8, "held-out prompts per check"),
        Option("backend", "--backend", "REAP_BACKEND", _choice(BACKENDS), "transformers",
               "generation backend for test_pruned_model.py"),
        Option("min_top1_agreement", "--min-top1-agreement", "REAP_MIN_TOP1_AGREEMENT", _optional_float, None,
               "fail when next-token top-1 agreement with the original is below this"),
        Option("min_bbox_iou", "--min-bbox-iou", "REAP_MIN_BBOX_IOU", _optional_float, None,
               "fail when the mean IoU of pruned vs original boxes is below this"),
        Option("eval_path", "--eval", "REAP_EVAL_PATH", _optional_path, None,
               "evaluation file with known answers (JSONL of {task, prompt, image, answer | bbox_2d}): "
               "task accuracy of the original and the pruned model"),
        Option("min_accuracy_ratio", "--min-accuracy-ratio", "REAP_MIN_ACCURACY_RATIO", _optional_float, None,
               "fail when a task's accuracy of the pruned model is below this fraction of the original's"),
        Option("check_mode", "--check-mode", "REAP_CHECK_MODE", _choice(CHECK_MODES), "auto",
               "whole: each model loaded whole (quantized weights dequantized); packed: quantized weights kept "
               "packed; layerwise: surgery and agreement streamed a decoder layer at a time, no generation; auto: "
               "the first that fits in free memory"),
        Option("thinking", "--thinking", "REAP_THINKING", _bool, False,
               "let a Thinking model think (else its chat template's thinking block is closed in the prompt)",
               is_switch=True),
        Option("thinking_max_new_tokens", "--thinking-max-new-tokens", "REAP_THINKING_MAX_NEW_TOKENS", _int(1),
               1024, "tokens generated per prompt with --thinking (the thinking and the answer)"),
    ]
}


@dataclass
class Settings:
    """Every setting of every script; a script reads the ones it declared."""

    model_path: Path | None = None
    output_path: Path = Path("output/reap")
    pruned_output_path: Path = Path("output/pruned-model")
    metadata_path: Path | None = None
    calibration_path: Path | None = None
    prune_ratio: float = 0.40
    keep_multiple: int = 1
    criterion: str = "reap"
    protect_super_experts: bool = False
    super_expert_quantile: float = 99.5
    super_expert_fraction: float = 0.1
    super_expert_layers: float = 0.75
    scoring_mode: str = "full"
    max_samples: int = 300
    max_seq_len: int = 2048
    max_pixels: int = 0
    batch_size: int = 1
    sort_window: int = 16
    encode_workers: int | str = "auto"
    encode_workers_kind: str = "auto"
    seed: int = 42
    device: str = "auto"
    dtype: str = "auto"
    engine: str = "auto"
    checkpoint_every: int = 20
    resume: bool = True
    skip_bad_samples: bool = False
    force: bool = False
    verify: bool = False
    reference_path: Path | None = None
    test_output_path: Path = Path("output/test-report")
    max_new_tokens: int = 64
    num_prompts: int = 8
    backend: str = "transformers"
    min_top1_agreement: float | None = None
    min_bbox_iou: float | None = None
    eval_path: Path | None = None
    min_accuracy_ratio: float | None = None
    check_mode: str = "auto"
    thinking: bool = False
    thinking_max_new_tokens: int = 1024
    sources: dict[str, str] = field(default_factory=dict)  # name -> "flag" | "env" | ".env" | "default"

    def explicitly_set(self, name: str) -> bool:
        return self.sources.get(name, "default") != "default"


assert {f.name for f in dataclasses.fields(Settings)} - {"sources"} == set(OPTIONS)


def _describe_default(option: Option) -> str:
    default = option.default
    if option.is_switch:
        return "on" if default else "off"
    return "none" if default is None else str(default)


def build_parser(description: str, names: Sequence[str], flags: dict[str, str] | None = None,
                 epilog: str | None = None, helps: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """An argparse parser for the options ``names``; ``flags`` / ``helps`` rename flags and reword help
    for this script."""
    flags, helps = flags or {}, helps or {}
    parser = argparse.ArgumentParser(
        description=description,
        epilog=epilog or "Precedence: flag > environment > .env file (REAP_ENV_FILE names another) > default.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for name in names:
        option = OPTIONS[name]
        flag = flags.get(name, option.flag)
        text = f"{helps.get(name, option.help)} [env {option.env}; default: {_describe_default(option)}]"
        if option.is_switch:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            parser.add_argument(flag, dest=name, default=None, metavar=option.env.removeprefix("REAP_"),
                                help=text)
    return parser


def _env_file_values(environ: dict[str, str]) -> dict[str, str]:
    name = environ.get("REAP_ENV_FILE")
    path = Path(name) if name else Path(".env")
    if name and not path.is_file():
        raise ConfigError(f"REAP_ENV_FILE={name}: no such file; point it at an existing .env file or unset it")
    if not path.is_file():
        return {}
    try:
        text = read_text(path, "settings file")  # non-UTF-8 bytes are one line, not a traceback
    except ReapError as exc:
        raise ConfigError(str(exc)) from None
    return {k: v for k, v in dotenv_values(stream=io.StringIO(text)).items() if v is not None}


def resolve(names: Sequence[str], cli_values: dict[str, Any], flags: dict[str, str] | None = None,
            environ: dict[str, str] | None = None) -> Settings:
    """Merge flag, environment, .env and default values for ``names`` into validated Settings."""
    flags = flags or {}
    environ = dict(os.environ if environ is None else environ)
    from_file = _env_file_values(environ)
    for variable, replacement in DEPRECATED_ENV.items():
        if variable in environ or variable in from_file:
            warnings.warn(f"{variable} is no longer used: {replacement}.", stacklevel=2)
    settings = Settings()
    for name in names:
        option = OPTIONS[name]
        flag = flags.get(name, option.flag)
        for source, label, raw in (
            ("flag", flag, cli_values.get(name)),
            ("env", option.env, environ.get(option.env)),
            (".env", f"{option.env} (in .env)", from_file.get(option.env)),
        ):
            if raw is not None:
                try:
                    value = option.parse(raw)
                except _Invalid as allowed:
                    where = f"{flag} / {option.env}" if source == "flag" else f"{label} ({flag})"
                    raise ConfigError(f"{where}={raw!r} is not valid: expected {allowed}") from None
                setattr(settings, name, value)
                settings.sources[name] = source
                break
        else:
            settings.sources[name] = "default"
    return settings


def parse_settings(description: str, names: Sequence[str], argv: Sequence[str] | None = None,
                   flags: dict[str, str] | None = None, environ: dict[str, str] | None = None,
                   helps: dict[str, str] | None = None) -> Settings:
    parser = build_parser(description, names, flags, helps=helps)
    args = parser.parse_args(argv)
    return resolve(names, vars(args), flags, environ)


def _required(settings: Settings, name: str, flags: dict[str, str] | None, hint: str) -> tuple[str, Path]:
    option = OPTIONS[name]
    where = f"{(flags or {}).get(name, option.flag)} / {option.env}"
    value = getattr(settings, name)
    if value is None:
        raise ConfigError(f"{where} is required: {option.help}{hint}")
    return where, value


def require_dir(settings: Settings, name: str, must_contain: str | None = None, hint: str = "",
                flags: dict[str, str] | None = None) -> Path:
    """The folder option ``name``, which must exist (and hold ``must_contain``)."""
    where, value = _required(settings, name, flags, hint)
    if not value.is_dir():
        raise ConfigError(f"{where}={value}: no such folder{hint}")
    if must_contain and not (value / must_contain).is_file():
        raise ConfigError(f"{where}={value}: folder has no {must_contain}{hint}")
    return value


def require_file(settings: Settings, name: str, hint: str = "", flags: dict[str, str] | None = None) -> Path:
    where, value = _required(settings, name, flags, hint)
    if not value.is_file():
        raise ConfigError(f"{where}={value}: no such file{hint}")
    return value
