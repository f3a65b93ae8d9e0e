"""Errors a user can act on.

Anything raised as a ``ReapError`` is printed as one line (no traceback) by the
command-line wrapper; everything else is a bug and keeps its traceback.
"""


class ReapError(Exception):
    """A problem with the user's input or environment; the message says what to do."""

    exit_code = 1


class ConfigError(ReapError):
    """A bad configuration value (flag, environment variable or .env entry)."""

    exit_code = 2
