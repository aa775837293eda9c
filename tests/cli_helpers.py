"""Running the real CLI entry point in the test process (no interpreter start-up per call)."""

from __future__ import annotations

import pytest

from retrieval.cli import main


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """main(args) -> (exit code, stdout, stderr), captured with pytest's capsys."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    code = exit_info.value.code
    return (0 if code is None else code), captured.out, captured.err
