"""Running the real CLI entry point in the test process (no interpreter start-up per call)."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import pytest

from retrieval.cli import main


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """main(args) -> (exit code, stdout, stderr), captured with pytest's capsys."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    code = exit_info.value.code
    return (0 if code is None else code), captured.out, captured.err


def write_png_header_only(path, width: int, height: int):
    """A PNG that declares width x height grey pixels but holds no pixel data: opening it reads the size,
    decoding it fails. Lets a test tell a refusal before decoding from one after it."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


HEIC_HEAD = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic"  # how an iPhone photo's file starts
BAR = re.compile(r"\d+%\||\r|it/s|query/s|img/s\]")  # what a tqdm bar writes


def run_cli_on_a_terminal(args, env: dict) -> tuple[int, str, str]:
    """`python -m retrieval ARGS` in a new process with stderr on a pseudo-terminal of 100 columns (where progress
    bars are drawn) -> (exit code, stdout, everything the terminal received)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns (0: no bar drawn)
    cli = subprocess.Popen([sys.executable, "-m", "retrieval", *map(str, args)], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=follower, env={**os.environ, **env})
    os.close(follower)
    terminal = b""
    try:
        while chunk := _read_or_nothing(leader):  # read as it comes: a full terminal buffer would block the CLI
            terminal += chunk
        stdout = cli.stdout.read().decode()
        cli.wait(timeout=300)
    finally:
        os.close(leader)
        cli.stdout.close()
        if cli.poll() is None:
            cli.kill()
    return cli.returncode, stdout, terminal.decode(errors="replace")


def _read_or_nothing(fd: int) -> bytes:
    try:
        return os.read(fd, 1 << 16)
    except OSError:  # EIO: the terminal's other side is closed and everything was read
        return b""
