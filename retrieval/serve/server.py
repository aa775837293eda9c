"""Running the service: bind the socket, run uvicorn, stop cleanly on Ctrl-C / SIGTERM."""

from __future__ import annotations

import logging
import signal
import socket

from retrieval.errors import RetrievalError

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
    message of the server."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    return config


def serve(index, *, host: str = "127.0.0.1", port: int = 8000, token_file=None, device: str = "cpu",
          checkpoint=None, max_distance: float | None = None, uploads=None, root=None, limits=None,
          access_log: bool = False, graceful_timeout: float = 30.0) -> int:
    """Load the index and its tower, serve until Ctrl-C or SIGTERM (in-flight requests finish), return 0."""
    import uvicorn

    from retrieval.serve.app import create_app
    from retrieval.serve.service import Service

    service = Service.open(index, device=device, checkpoint=checkpoint, max_distance=max_distance,
                           token_file=token_file, uploads=uploads, root=root, limits=limits)
    app = create_app(service)
    sock = bind(host, port)
    config = uvicorn.Config(app, log_level="warning", access_log=access_log, lifespan="on",
                            timeout_graceful_shutdown=graceful_timeout, server_header=False,
                            log_config=_uvicorn_logging())
    if access_log:  # uvicorn gave its access logger the warning level too, which drops every (INFO) request line
        logging.getLogger("uvicorn.access").setLevel(logging.INFO)
    server = uvicorn.Server(config)
    stopped_by: list[int] = []

    def remember(sig, frame):  # uvicorn re-raises the signal it stopped on once it has shut down
        stopped_by.append(sig)

    previous = {sig: signal.signal(sig, remember) for sig in (signal.SIGINT, signal.SIGTERM)}
    n = len(service.searcher.index)
    threshold = service.searcher.max_distance
    logger.info(f"retrieval serve: {index} ({n:,} items, {len(service.searcher.index.label_counts())} classes"
        + (f", unknown past distance {threshold:.4f}" if threshold is not None else "")
        + f"; adding {'needs the token' if service.token else 'disabled (no --token-file)'})")
    logger.info(f"listening on {url_of(sock)} (API docs at {url_of(sock)}docs); Ctrl-C to stop")
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
