"""Shared by the `retrieval serve` tests: a small tower trained once per test session (it really recognises
digits), a small index built with it, drawn pictures, and a real `retrieval serve` subprocess."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from PIL import Image, ImageDraw

# About 5 s on 2 busy CPU cores (one thread: thread teams stall when other jobs share the cores); precision@1 ~0.95 on MNIST test against the 500-image index below.
TINY_TRAINING = """# serve tests: a tiny tower that really recognises digits
name = "serve-tiny"
[data]
subset = 5000
val_size = 0
[train]
epochs = 3
batch_size = 128
[sampler]
m = 8
[optimizer]
lr = 0.006
"""
INDEX_SIZE = 500
TOKEN = "test-token-4f2a9c"


def cli(*args) -> None:
    """Run the real CLI in this process; raise with its stderr unless it succeeds."""
    import contextlib

    from retrieval.cli import main

    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if code != 0:
        raise RuntimeError(f"retrieval {' '.join(map(str, args))} failed ({code}):\n{err.getvalue()[-3000:]}")


def serve_artifacts(tmp_path_factory, data_root) -> Path:
    """base/run (a tiny trained tower), base/index (500 mnist:train images), base/token.txt; built once per
    session through the CLI (`retrieval train`, `retrieval index build`)."""
    base = tmp_path_factory.getbasetemp() / "serve-artifacts"
    if (base / "index" / "meta.json").is_file():
        return base
    base.mkdir(parents=True, exist_ok=True)
    (base / "serve-tiny.toml").write_text(TINY_TRAINING)
    cli("train", "--config", base / "serve-tiny.toml", "--out", base / "run", "--device", "cpu", "--no-progress",
         "--threads", 1, "--root", data_root)
    cli("index", "build", "--checkpoint", base / "run", "--data", "mnist:train", "--subset", INDEX_SIZE,
         "--seed", 1, "--out", base / "index", "--device", "cpu", "--root", data_root)
    (base / "token.txt").write_text(TOKEN + "\n")
    return base


def copy_index(base: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(base / "index", dest)
    return dest


def drawing(strokes, size=(200, 200), width=16, jitter=(0, 0)) -> bytes:
    """Black strokes on white paper, as PNG bytes (strokes in a 200x200 frame)."""
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    dx, dy = jitter
    for line in strokes:
        draw.line([(x + dx, y + dy) for x, y in line], fill="black", width=width, joint="curve")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


SEVEN = [[(45, 40), (155, 40), (85, 170)]]
STAR = [[(100, 30), (100, 170)], [(40, 65), (160, 135)], [(40, 135), (160, 65)]]  # an asterisk


class ServerProcess:
    """`python -m retrieval serve --port 0 ...` in a subprocess; its stderr collected; its URL read from it."""

    def __init__(self, index: Path, *args: str, env: dict | None = None, timeout: float = 90.0):
        full_env = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "retrieval", "serve", "--index", str(index), "--port", "0", *map(str, args)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
        )
        self.lines: list[str] = []
        self._seen = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.url = self.wait_for(r"listening on (\S+)", timeout).group(1).rstrip("/")
        host, _, port = self.url.removeprefix("http://").rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        deadline = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("the server did not come up:\n" + self.log)
                time.sleep(0.05)

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self._seen:
                self.lines.append(line)
                self._seen.notify_all()
        with self._seen:
            self._seen.notify_all()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 30.0) -> re.Match:
        deadline = time.time() + timeout
        with self._seen:
            while True:
                for line in self.lines:
                    m = re.search(pattern, line)
                    if m:
                        return m
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise RuntimeError(f"the server exited ({self.proc.returncode}) before {pattern!r}:\n{self.log}")
                left = deadline - time.time()
                if left <= 0:
                    raise TimeoutError(f"no {pattern!r} from the server in {timeout}s:\n{self.log}")
                self._seen.wait(min(left, 0.5))

    def stop(self, sig=signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        self._reader.join(timeout=5)
        return code

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.stop()


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def wait_in_flight(url: str, n: int, timeout: float = 30.0) -> None:
    """Wait until the server is reading or answering `n` other requests (/health's in_flight): their heads have
    been read and their handlers run."""
    deadline = time.time() + timeout
    while True:
        seen = get_json(url + "/health")["in_flight"]
        if seen >= n:
            return
        if time.time() > deadline:
            raise TimeoutError(f"the server has {seen} requests in flight after {timeout}s, expected {n}")
        time.sleep(0.01)


class RawRequest:
    """One HTTP/1.1 request on its own connection, sent in parts: `start(n)` sends the head and the first n bytes
    of the body, `finish()` the rest, `response()` reads the answer -> (status, headers, body)."""

    def __init__(self, server: ServerProcess, method: str, path: str, body: bytes, content_type: str,
                 headers: dict | None = None, content_length: int | None = None):
        import socket

        self.body = body
        lines = [f"{method} {path} HTTP/1.1", "Host: test", f"Content-Type: {content_type}",
                 f"Content-Length: {len(body) if content_length is None else content_length}",
                 *(f"{k}: {v}" for k, v in (headers or {}).items())]
        self.head = ("\r\n".join(lines) + "\r\n\r\n").encode()
        self.conn = socket.create_connection((server.host, server.port), timeout=60)
        self.sent = 0

    @classmethod
    def of(cls, server: ServerProcess, request, **kw) -> "RawRequest":
        """From an httpx.Request (its encoded body and content type)."""
        body = request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}
        return cls(server, request.method, request.url.raw_path.decode(), body, request.headers["content-type"],
                   headers, **kw)

    def start(self, n: int) -> "RawRequest":
        self.conn.sendall(self.head + self.body[:n])
        self.sent = n
        return self

    def finish(self) -> "RawRequest":
        self.conn.sendall(self.body[self.sent:])
        self.sent = len(self.body)
        return self

    def response(self) -> tuple[int, dict, bytes]:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.conn.recv(65536)
            if not chunk:
                raise ConnectionError(f"the server closed the connection after {data[:200]!r}")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
        length = int(headers.get("content-length", 0))
        while len(body) < length:
            chunk = self.conn.recv(65536)
            if not chunk:
                break
            body += chunk
        return int(status_line.split()[1]), headers, body

    def closed_by_server(self) -> bool:
        """Whether the server has closed the connection (what is left to read is the end of the stream)."""
        try:
            return self.conn.recv(1) == b""
        except OSError:
            return True

    def close(self) -> None:
        self.conn.close()


def assert_same_answer(got: dict, want: dict) -> None:
    """Two answers to the same image: the same name, label and neighbours, distances equal up to float rounding (a
    tower forward of a batch may round differently from one of a single image)."""
    import numpy as np

    assert got["query"] == want["query"] and got["label"] == want["label"], (got, want)
    assert [n["id"] for n in got["neighbors"]] == [n["id"] for n in want["neighbors"]], (got, want)
    assert [n["label"] for n in got["neighbors"]] == [n["label"] for n in want["neighbors"]]
    assert np.allclose([n["distance"] for n in got["neighbors"]], [n["distance"] for n in want["neighbors"]],
                       atol=1e-4), (got, want)
