"""Where the library's messages go: every module logs to `logging.getLogger(__name__)` under "retrieval"; the CLI
(or any application) decides what to show. Library users see nothing below WARNING unless they configure logging.
"""

from __future__ import annotations

import logging
import sys

ROOT = "retrieval"


class _CliFormatter(logging.Formatter):
    """The message as is; warnings and errors get a "warning: " / "error: " prefix (the CLI's one-line style)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"error: {message}"
        if record.levelno >= logging.WARNING:
            from retrieval.errors import as_cli_message  # warnings name arguments as errors do: --train-size

            return f"warning: {as_cli_message(message)}"
        return message


class _StderrHandler(logging.StreamHandler):
    """Writes to the sys.stderr of the moment (so pytest's capture and tqdm's redirection see it)."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # logging.StreamHandler assigns it; the property always answers sys.stderr
        pass


def setup_cli_logging(verbosity: int = 0) -> None:
    """Send the library's messages to stderr: INFO and up (verbosity 0), WARNING and up (< 0, --quiet), DEBUG
    and up (> 0, --verbose). Idempotent: a second call only changes the level."""
    logger = logging.getLogger(ROOT)
    logger.setLevel(logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_CliFormatter())
        logger.addHandler(handler)


def show_progress(requested: bool = True) -> bool:
    """Whether a progress bar should be drawn: asked for, stderr is a terminal, and INFO messages are shown (not
    --quiet). Bars go to stderr, so they never mix with results on stdout."""
    return bool(requested) and sys.stderr.isatty() and logging.getLogger(ROOT).isEnabledFor(logging.INFO)
