"""What every entry point shares: one-line errors, exit codes, warnings without tracebacks."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence

from .errors import ReapError


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main``; a ReapError becomes ``error: ...`` on stderr (one line per problem) and its exit code (2 for
    configuration)."""
    previous = warnings.showwarning
    warnings.showwarning = _one_line_warning
    try:
        return main(argv)
    except ReapError as exc:
        for line in str(exc).splitlines() or [type(exc).__name__]:  # one line per problem
            print(f"error: {line}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: no output was left half-written; rerun the same command "
              "(reap.py continues from its saved state)", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = previous
