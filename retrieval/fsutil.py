"""Crash-safe file writing: every artifact goes to a temp name in the same folder and is renamed into place."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

from retrieval.errors import RetrievalError

_UMASK = os.umask(0)
os.umask(_UMASK)


def ensure_writable_dir(path: Path, what: str = "output folder") -> Path:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RetrievalError(f"{what} {path} is a file, expected a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RetrievalError(f"cannot create {what} {path}: {e.strerror or e}") from None
    if not os.access(path, os.W_OK):
        raise RetrievalError(f"{what} {path} is not writable")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync and rename it over `path`, on failure delete it."""
    path = Path(path)
    ensure_writable_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; artifacts get the usual permissions
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> dict:
    path = Path(path)
    if not path.is_file():
        raise RetrievalError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RetrievalError(f"{what} {path} is not valid JSON ({e})") from None


# The file exclusive_lock holds in a folder (a writer's folder may hold it beside its own files).
LOCK_NAME = ".lock"


@contextlib.contextmanager
def exclusive_lock(folder: str | os.PathLike, wait: bool = False) -> Iterator[None]:
    """Hold an advisory lock on `folder/.lock` so two writers never interleave in one folder."""
    folder = ensure_writable_dir(Path(folder))
    fh = open(folder / LOCK_NAME, "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise RetrievalError(f"{folder} is being written by another process; try again when it ends") from None
            raise
        yield
    finally:
        fh.close()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
