"""Reader and writer for the IDX format of MNIST-style datasets (raw or gzipped)."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from retrieval.errors import RetrievalError

# Third byte of the magic number: element type; only unsigned bytes are used by the datasets we read.
_UBYTE = 0x08


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RetrievalError(f"IDX file not found: {path}") from None
    except OSError as e:
        raise RetrievalError(f"cannot read IDX file {path}: {e.strerror or e}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise RetrievalError(f"{path} is a corrupt or truncated gzip file ({e})") from None
    return raw


def read_idx(path: str | os.PathLike, expect_ndim: int | None = None) -> np.ndarray:
    """Read an IDX file of unsigned bytes; validate its magic number, dimensions and length."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise RetrievalError(f"{path} is not an IDX file (only {len(data)} bytes)")
    zero0, zero1, dtype, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0 or dtype != _UBYTE or not 1 <= ndim <= 4:
        raise RetrievalError(
            f"{path} is not an IDX file of unsigned bytes (magic {data[:4].hex()}, expected 0000080N)"
        )
    if expect_ndim is not None and ndim != expect_ndim:
        raise RetrievalError(f"{path} holds a {ndim}-D array, expected {expect_ndim}-D")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise RetrievalError(f"{path} is truncated inside its header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    actual = len(data) - header
    if actual != expected:
        state = "truncated" if actual < expected else "longer than its header says"
        raise RetrievalError(f"{path} is {state}: header {list(dims)} needs {expected} bytes of data, found {actual}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def read_idx_pair(images_path: str | os.PathLike, labels_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read matching image (N, H, W) and label (N,) files; labels come back as int64."""
    images = read_idx(images_path, expect_ndim=3)
    labels = read_idx(labels_path, expect_ndim=1).astype(np.int64)
    if len(images) != len(labels):
        raise RetrievalError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels")
    return images, labels


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 array as IDX (gzipped when the name ends in .gz); atomically."""
    from retrieval.fsutil import atomic_write_bytes

    array = np.ascontiguousarray(array, dtype=np.uint8)
    payload = bytes([0, 0, _UBYTE, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    if str(path).endswith(".gz"):
        payload = gzip.compress(payload, mtime=0)
    atomic_write_bytes(path, payload)
