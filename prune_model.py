#!/usr/bin/env python3
"""Write a pruned copy of a MoE checkpoint that keeps only the experts chosen in reap_metadata.json.

The metadata's experts_to_keep is used as is, unless a prune ratio, criterion, keep multiple or super-expert
setting set by flag, environment or .env differs from what the metadata recorded: then the selection is
recomputed from the metrics the metadata stores (a line says so, and pruning_record.json records it).
The source model is --model / REAP_MODEL_PATH, else the model_path recorded in the metadata."""

from __future__ import annotations

import sys
import time

from reap_vlm.cli import run_main
from reap_vlm.safeguards import safeguard_lines
from reap_vlm.settings import parse_settings, require_dir

OPTIONS = ("model_path", "pruned_output_path", "output_path", "metadata_path", "prune_ratio", "keep_multiple",
           "criterion", "force", "verify", "protect_super_experts", "super_expert_quantile", "super_expert_fraction",
           "super_expert_layers")
# --output is this script's product (the pruned checkpoint); reap.py's folder is the input here.
FLAGS = {"pruned_output_path": "--output", "output_path": "--reap-output"}
HELP = {
    "model_path": "source checkpoint (default: the model_path recorded in the metadata); never written",
    "output_path": "reap.py's output folder, where reap_metadata.json is looked for",
    "prune_ratio": "recompute the selection with this ratio when it differs from the metadata's",
    "criterion": "recompute the selection ranking by this metric when it differs from the metadata's",
    "keep_multiple": "recompute the selection rounding K up to a multiple of N when it differs from the metadata's",
}


def main(argv=None) -> int:
    settings = parse_settings(__doc__, OPTIONS, argv, flags=FLAGS, helps=HELP)
    if settings.model_path is not None:
        require_dir(settings, "model_path", must_contain="config.json", flags=FLAGS)
    from reap_vlm.prune.job import prune_from_settings

    start = time.perf_counter()
    record, output = prune_from_settings(settings)
    seconds = time.perf_counter() - start
    counts = record["tensors"]
    lines = [
        "",
        "pruning summary",
        f"source           {record['source_path']}",
        f"experts          kept {record['num_experts']} of {record['source_num_experts']} in each of "
        f"{len(record['moe_layers'])} MoE layers (selection: {record.get('selection', {}).get('source', 'metadata')})",
        "tensors          " + ", ".join(f"{n} {action}" for action, n in counts.items()),
        f"written          {output} ({record['bytes_written'] / 1e9:.2f} GB in {seconds:.1f}s)",
    ]
    safeguards = record.get("selection", {}).get("safeguards") or {}
    lines[-1:-1] = safeguard_lines(safeguards)
    if "verify" in record:
        lines.append(f"verify           {record['verify']['tensors_checked']} tensors ok, forward "
                     f"{record['verify']['forward']}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
