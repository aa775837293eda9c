"""Errors the CLI turns into a one-line message and an exit code (no traceback unless --debug).

Messages name the argument they are about in backticks (`factory`, `batch_size`) or by its config key
(`train.epochs`); the CLI shows argument names as its flags (--factory, --batch-size), so the library never
speaks of flags its Python callers do not have.
"""

import re

_ARGUMENT = re.compile(r"`([a-z][a-z0-9_]*)`")


class RetrievalError(Exception):
    """A failure caused by the user's input or environment (missing file, corrupt artifact...). Exit code 1."""

    exit_code = 1


class UsageError(RetrievalError):
    """A bad option or argument value. Exit code 2."""

    exit_code = 2


def as_cli_message(message: str) -> str:
    """`batch_size` -> --batch-size: argument names as the CLI's flags (config keys such as `train.epochs` stay)."""
    return _ARGUMENT.sub(lambda m: "--" + m[1].replace("_", "-"), message)
