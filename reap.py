#!/usr/bin/env python3
"""Score every expert of a MoE model (a supported family) with REAP on calibration data; write reap_metadata.json."""

from __future__ import annotations

import sys

from reap_vlm.cli import run_main
from reap_vlm.score.report import summary_lines
from reap_vlm.settings import parse_settings, require_dir, require_file

OPTIONS = ("model_path", "calibration_path", "output_path", "scoring_mode", "batch_size", "max_samples",
           "max_seq_len", "max_pixels", "prune_ratio", "keep_multiple", "criterion", "device", "dtype", "engine",
           "seed", "resume", "checkpoint_every", "skip_bad_samples", "protect_super_experts", "super_expert_quantile",
           "super_expert_fraction", "super_expert_layers")


def main(argv=None) -> int:
    settings = parse_settings(__doc__, OPTIONS, argv)
    require_dir(settings, "model_path", must_contain="config.json")
    require_file(settings, "calibration_path")
    from reap_vlm.score.job import run_reap

    metadata = run_reap(settings)
    print("\n".join(["", "REAP summary", *summary_lines(metadata),
                     f"written          {settings.output_path}/reap_metadata.json"]))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
