"""test_pruned_model.py's settings: which options it reads and its own flag names (no heavy imports)."""

from __future__ import annotations

from ..settings import OPTIONS

TEST_OPTIONS = ("pruned_output_path", "reference_path", "model_path", "calibration_path", "test_output_path",
                "max_new_tokens", "num_prompts", "backend", "min_top1_agreement", "min_bbox_iou", "eval_path",
                "min_accuracy_ratio", "device", "dtype", "seed", "max_pixels", "check_mode", "thinking",
                "thinking_max_new_tokens")
# --model is the pruned model here; the original is --reference (or --original, REAP_MODEL_PATH).
TEST_FLAGS = {"pruned_output_path": "--model", "model_path": "--original", "test_output_path": "--output"}
TEST_HELP = {
    "pruned_output_path": "pruned checkpoint folder to check",
    "model_path": "original model, used when --reference is not given (before the pruning record's source)",
}
NO_REFERENCE = "none"  # --reference none: check the pruned model alone


def flag_of(name: str) -> str:
    """'--flag / REAP_VARIABLE' as test_pruned_model.py spells them, for messages."""
    return f"{TEST_FLAGS.get(name, OPTIONS[name].flag)} / {OPTIONS[name].env}"
