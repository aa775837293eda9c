"""Loopback HTTP servers standing in for dataset mirrors and a package index (no network in the tests)."""

from __future__ import annotations

import http.server
import socket
import threading
import zipfile
from pathlib import Path

WAIT_S = 60  # the longest a request is held (a stalled mirror); tests normally take seconds


def refused_port() -> socket.socket:
    """A loopback port that is bound but never listens: connecting to it is refused at once (close it after)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


class LoopbackServer:
    """A threading HTTP server on 127.0.0.1 (port 0) running in a daemon thread; `handler` answers requests."""

    def __init__(self, handler: type[http.server.BaseHTTPRequestHandler]):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class FileServer(LoopbackServer):
    """Serves `files` (URL path without the leading slash -> bytes; paths ending in / as HTML pages), 404 for
    anything else; paths starting with one of `stalled` are accepted and never answered (until closed). `requests` lists the paths asked for, in order."""

    def __init__(self, files: dict[str, bytes], stalled: tuple[str, ...] = ()):
        self.files, self.stalled = dict(files), stalled
        self.requests: list[str] = []
        self.released = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path.lstrip("/")
                server.requests.append(path)
                if path.startswith(server.stalled):
                    server.released.wait(WAIT_S)
                    return
                data = server.files.get(path)
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/html" if path.endswith("/") else "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        super().__init__(Handler)

    def close(self) -> None:
        self.released.set()
        super().close()


def write_wheel(path: Path, name: str, version: str, members: dict[str, bytes]) -> Path:
    """A minimal valid wheel `name`-`version` holding `members` (archive path -> bytes), written to `path`."""
    dist_info = f"{name}-{version}.dist-info"
    files = {**members,
             f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{member},,\n" for member in files) + f"{dist_info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in files.items():
            zf.writestr(member, data)
        zf.writestr(f"{dist_info}/RECORD", record)
    return path
