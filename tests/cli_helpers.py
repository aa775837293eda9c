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
