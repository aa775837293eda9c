"""Running the service: bind the socket, run uvicorn (in this process, or in worker processes sharing the socket),
stop cleanly on Ctrl-C / SIGTERM."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket

from retrieval.errors import RetrievalError, UsageError

logger = logging.getLogger(__name__)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free port, read it from getsockname())."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise RetrievalError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, _, _, _, address = infos[0]
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted connections only for sockets that say TCP
    # (without it, a response written in two parts waits ~40 ms for the client's delayed ACK).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise RetrievalError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def _uvicorn_logging() -> dict:
    """uvicorn's logging configuration with the access log on stderr (its default is stdout), like every other
    message of the server, and its own messages from warnings up (every worker process applies it)."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    config["loggers"]["uvicorn"]["level"] = config["loggers"]["uvicorn.error"]["level"] = "WARNING"
    config["loggers"]["uvicorn.access"]["level"] = "INFO"  # (shown only with access_log)
    return config


# Seconds the requests in flight get to finish on Ctrl-C / SIGTERM.
GRACEFUL_SHUTDOWN_S = 30.0
# How a worker process of `serve(workers=N)` learns which service to open: JSON in its environment.
WORKER_SPEC_ENV = "RETRIEVAL_SERVE_WORKER"


def worker_app():
    """The app of one worker process (uvicorn imports this by name in each): the service its parent described in
    $RETRIEVAL_SERVE_WORKER, opened anew in this process."""
    from retrieval.serve.app import create_app
    from retrieval.serve.service import Limits, Service

    spec = json.loads(os.environ[WORKER_SPEC_ENV])
    spec["limits"] = Limits(**spec["limits"])
    return create_app(Service.open(**spec))


def serve(index, *, host: str = "127.0.0.1", port: int = 8000, token_file=None, device: str = "cpu",
          checkpoint=None, max_distance: float | None = None, uploads=None, root=None, limits=None,
          access_log: bool = False, workers: int = 1) -> int:
    """Load the index and its tower, serve until Ctrl-C or SIGTERM (in-flight requests finish), return 0.
    `workers` > 1: that many processes, each with its own copy of the index and tower, accept on one socket (more
    queries answered per second where there are cores for them); adding images then is refused (an add would
    reach one worker's copy only)."""
    import uvicorn

    from retrieval.serve.app import create_app
    from retrieval.serve.service import Limits, Service

    if workers < 1:
        raise UsageError(f"--workers: expected at least 1, got {workers}")
    if workers > 1 and token_file is not None:
        raise UsageError("--workers: adding images (--token-file) needs one worker; each worker process holds its "
                         "own copy of the index, and an add would reach only one of them")
    service = Service.open(index, device=device, checkpoint=checkpoint, max_distance=max_distance,
                           token_file=token_file, uploads=uploads, root=root, limits=limits)
    options = dict(log_level=None, access_log=access_log, lifespan="on",
                   timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, server_header=False, log_config=_uvicorn_logging())
    sock = bind(host, port)
    n = len(service.searcher.index)
    threshold = service.searcher.max_distance
    logger.info(f"retrieval serve: {index} ({n:,} items, {len(service.searcher.index.label_counts())} classes"
        + (f", unknown past distance {threshold:.4f}" if threshold is not None else "")
        + f"; adding {'needs the token' if service.token else 'disabled (no --token-file)'})")
    logger.info(f"listening on {url_of(sock)} (API docs at {url_of(sock)}docs)"
                + (f", {workers} worker processes" if workers > 1 else "") + "; Ctrl-C to stop")
    if workers > 1:
        del service  # each worker opens its own
        os.environ[WORKER_SPEC_ENV] = json.dumps({
            "folder": str(index), "device": str(device), "checkpoint": None if checkpoint is None else str(checkpoint),
            "max_distance": max_distance, "uploads": None if uploads is None else str(uploads),
            "root": None if root is None else str(root), "limits": dataclasses.asdict(limits or Limits())})
        return _run_workers(uvicorn.Config(f"{__name__}:worker_app", factory=True, workers=workers, **options), sock)
    server = uvicorn.Server(uvicorn.Config(create_app(service), **options))
    stopped_by: list[int] = []

    def remember(sig, frame):  # uvicorn re-raises the signal it stopped on once it has shut down
        stopped_by.append(sig)

    previous = {sig: signal.signal(sig, remember) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    if not server.started:
        raise RetrievalError("the server did not start (see the messages above)")
    reason = f" ({signal.Signals(stopped_by[0]).name})" if stopped_by else ""
    stats = service.batcher.stats
    logger.info(f"retrieval serve: stopped{reason} after {stats.jobs:,} queries in {stats.batches:,} batches")
    return 0


def _run_workers(config, sock: socket.socket) -> int:
    """uvicorn's supervisor: starts config.workers processes on `sock`, replaces one that dies, and on Ctrl-C /
    SIGTERM stops them all (each finishing its requests in flight)."""
    from uvicorn.supervisors import Multiprocess

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        Multiprocess(config, sockets=[sock]).run()
    finally:
        for sig, handler in previous.items():  # (the supervisor installs its own)
            signal.signal(sig, handler)
        sock.close()
    logger.info("retrieval serve: stopped")
    return 0
