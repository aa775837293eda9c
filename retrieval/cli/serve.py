"""`retrieval serve`: an HTTP query service and a draw-a-digit page over an index (a thin layer over retrieval.serve)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from retrieval.cli import app
from retrieval.cli.common import DataRootOption, DeviceOption, IndexCheckpointOption, root_or_default


@app.command("serve")
def serve(
    index: Path = typer.Option(..., "--index", help="Index folder to serve (from `retrieval index build`)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port (0: any free port, printed)."),
    token_file: Optional[Path] = typer.Option(
        None, "--token-file",
        help="A file holding the token that POST /items (adding images) needs as 'Authorization: Bearer <token>'. "
             "Without it, adding is disabled.",
    ),
    max_distance: Optional[float] = typer.Option(
        None, "--max-distance", min=0.0,
        help="Answer 'unknown' past this nearest-neighbour distance (default: the calibrated threshold in the index).",
    ),
    checkpoint: Optional[Path] = IndexCheckpointOption,
    uploads: Optional[Path] = typer.Option(
        None, "--uploads",
        help="Folder for images added through the service, as <label>/<name>.png (default: <index>.uploads "
             "beside the index folder).",
    ),
    max_body_mb: float = typer.Option(16.0, "--max-body-mb", min=0.001, help="Largest request body, in MiB."),
    max_images: int = typer.Option(64, "--max-images", min=1, help="Most images in one request."),
    max_k: int = typer.Option(100, "--max-k", min=1, help="Most neighbours one query may ask for."),
    batch_wait_ms: float = typer.Option(
        2.0, "--batch-wait-ms", min=0.0,
        help="How long a batch waits for requests still arriving, in ms (0: never wait).",
    ),
    threads: int = typer.Option(
        1, "--threads", min=1,
        help="Threads for the tower and Faiss in the compute thread (1 suits a few cores; more for big batches).",
    ),
    workers: int = typer.Option(
        1, "--workers", min=1,
        help="Server processes sharing the port, each with its own copy of the index and tower: more queries per "
             "second where there are cores for them (one per core), the memory of that many servers. Adding "
             "images (--token-file) needs one.",
    ),
    read_timeout: float = typer.Option(
        30.0, "--read-timeout", min=0.001,
        help="Seconds a request's body may take to arrive after its head; then 408 and the connection is closed.",
    ),
    access_log: bool = typer.Option(False, "--access-log", help="Log every request to stderr."),
    device: str = DeviceOption,
    precision: Optional[str] = typer.Option(
        None, "--precision", metavar="auto|fp32|bf16", envvar="RETRIEVAL_PRECISION", show_default=False,
        help="The queries' arithmetic (default auto: the index's precision where this device runs it natively).",
    ),
    root: Optional[Path] = DataRootOption,
) -> None:
    """Serve an index over HTTP: /query, /classify, /items, /index, /health, a draw-a-digit page at /.

    The tower and the index are loaded once; concurrent queries share tower forwards and Faiss searches.
    Ctrl-C or SIGTERM stop the server once the requests in flight are answered. Pixel budget: $RETRIEVAL_MAX_PIXELS.
    """
    import os

    from retrieval.embed import resolve_device
    from retrieval.precision import ENV_VAR, check_precision
    from retrieval.serve import Limits
    from retrieval.serve import serve as run

    if precision is not None:  # the service's Searchers resolve "auto" through $RETRIEVAL_PRECISION
        os.environ[ENV_VAR] = check_precision(precision, "precision")

    limits = Limits(max_body_bytes=int(max_body_mb * 1024 * 1024), max_images=max_images, max_k=max_k,
                    batch_wait=batch_wait_ms / 1000.0, threads=threads, read_timeout=read_timeout)
    raise typer.Exit(run(index, host=host, port=port, token_file=token_file, device=resolve_device(device),
                         checkpoint=checkpoint, max_distance=max_distance, uploads=uploads,
                         root=root_or_default(root), limits=limits, access_log=access_log, workers=workers))
