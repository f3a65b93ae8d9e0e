"""What every entry point shares: one-line errors, exit codes, warnings without tracebacks."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence

from .errors import ReapError


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def close_progress_bars() -> None:
    """Close every live progress bar, so what is printed next starts on its own line and no bar is drawn over it."""
    sys.stdout.flush()
    tqdm_module = sys.modules.get("tqdm.std")
    if tqdm_module is None:
        return
    bars = set()
    for cls in [tqdm_module.tqdm, *tqdm_module.tqdm.__subclasses__()]:
        bars.update(getattr(cls, "_instances", ()))
    for bar in sorted(bars, key=lambda b: -getattr(b, "pos", 0)):
        bar.close()
    sys.stderr.flush()


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main``; a ReapError becomes ``error: ...`` on stderr (one line per problem) and its exit code (2 for
    configuration)."""
    previous = warnings.showwarning
    warnings.showwarning = _one_line_warning
    try:
        return main(argv)
    except ReapError as exc:
        close_progress_bars()
        for line in str(exc).splitlines() or [type(exc).__name__]:  # one line per problem
            print(f"error: {line}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        close_progress_bars()
        print("interrupted: no output was left half-written; rerun the same command "
              "(reap.py continues from its saved state)", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = previous
