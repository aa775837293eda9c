"""Errors the CLI turns into a one-line message and an exit code (no traceback unless --debug)."""


class RetrievalError(Exception):
    """A failure caused by the user's input or environment (missing file, corrupt artifact...). Exit code 1."""

    exit_code = 1


class UsageError(RetrievalError):
    """A bad option or argument value. Exit code 2."""

    exit_code = 2
