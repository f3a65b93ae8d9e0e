#!/usr/bin/env python3
"""Check a pruned MoE checkpoint: faithful to the original (surgery consistency), still answering
(no degenerate generations), agreement with the original, bounding-box answers; writes test_report.json/.md.

The original is --reference, else --original, else the source named in the pruned folder's
pruning_record.json, else REAP_MODEL_PATH; --reference none checks the pruned model alone.
Exit status: 0 PASS (every check asked for ran and passed), 1 FAIL (a check failed, or bad data), 2 bad settings,
3 INCOMPLETE (no check failed, but one that was asked for could not run: surgery, by default, needs the original
and the kept experts' ids; --reference none asks for no comparison).
"""

from __future__ import annotations

import sys

from reap_vlm.check.options import TEST_FLAGS, TEST_HELP, TEST_OPTIONS
from reap_vlm.cli import run_main
from reap_vlm.settings import parse_settings


def main(argv=None) -> int:
    settings = parse_settings(__doc__, TEST_OPTIONS, argv, flags=TEST_FLAGS, helps=TEST_HELP)
    from reap_vlm.check.job import run_test

    outcome = run_test(settings)
    print(outcome.verdict)
    print(f"report: {outcome.report_paths[1]}", file=sys.stderr)
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(run_main(main))
