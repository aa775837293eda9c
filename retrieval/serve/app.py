"""The FastAPI application of `retrieval serve`: the service state, its routes, limits and error answers.

Every error is a JSON object `{"error": "..."}` with a 4xx status: 400 bad input (undecodable or empty image, bad
base64, bad field), 401/403 missing or wrong token, 404 unknown item, 408 a body not received in time, 409 conflict
(folder busy, prototype class taken), 413 body or pixel budget exceeded, 415 wrong content type, 422 a malformed
path parameter. A client that leaves before its request is read is not an error (a debug line at most).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import gc
import hmac
import inspect
import json
import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from starlette.requests import ClientDisconnect

from retrieval.errors import RetrievalError, UsageError
from retrieval.serve import library
from retrieval.serve.batcher import MicroBatcher
from retrieval.serve.library import ServiceError

logger = logging.getLogger("retrieval.serve")

DEFAULT_K = 5
DEFAULT_CLASSIFY_K = 1
# Requests whose pictures hold this many pixels in all (five MNIST digits) are preprocessed on the event loop: it
# takes less time than handing them to a decode thread and back.
INLINE_PIXELS = 64 * 64


@dataclass
class Limits:
    max_body_bytes: int = 16 * 1024 * 1024  # a request body larger than this is refused (413)
    max_images: int = 64  # images per request
    max_k: int = 100  # neighbours per query (also clamped to the index size, like the CLI)
    batch_wait: float = 0.002  # seconds the micro-batcher waits for requests that are still arriving
    max_batch_items: int = 256  # images per tower forward
    lock_timeout: float = 10.0  # seconds an add waits for another writer of the index folder
    threads: int = 1  # torch and Faiss threads of the compute thread (1 suits small batches on few cores)
    read_timeout: float = 30.0  # seconds a request's body may take to arrive once its head has (then 408, closed)
    decode_threads: int = 0  # threads decoding and preprocessing uploads (0: one per CPU core this process may use)


@dataclass
class QueryJob:
    images: torch.Tensor  # uint8 (n, 28, 28)
    names: list[str]
    k: int
    max_distance: float | None  # None: the server's threshold
    search_params: str | None = None  # Faiss search parameters for this request ("nprobe=64"); None: the index's


@dataclass
class JobResult:
    answers: list[dict]  # `retrieval query --json` entries
    max_distance: float | None  # the threshold that applied


@dataclass
class Service:
    """An opened index with its tower, the micro-batcher in front of them, and what adding items needs."""

    folder: Path
    folder_name: str
    searcher: Any  # retrieval.query.Searcher; replaced (never mutated) when items are added
    checkpoint: Any  # the tower's Checkpoint (its fingerprint is checked against the index on every add)
    uploads: Path
    token: str | None = None
    max_distance: float | None = None  # --max-distance; None: the index's calibrated threshold
    root: Path | None = None
    limits: Limits = field(default_factory=Limits)
    started: float = field(default_factory=time.time)

    def __post_init__(self):
        threads = self.limits.threads
        self.compute_threads: dict | None = None  # what torch and Faiss report on the compute thread, once it runs

        def init_compute_thread():
            self.compute_threads = library.set_compute_threads(threads)

        self.batcher = MicroBatcher(self.process, max_wait=self.limits.batch_wait,
                                    max_items=self.limits.max_batch_items, thread_init=init_compute_thread)
        self.in_flight = 0  # HTTP requests being read or answered (RequestGuard counts them)
        # Pictures are decoded and preprocessed off the event loop, several at once where there are cores for it
        # (PIL's decoders and most numpy/scipy work release the GIL), while the loop reads the next requests.
        self.decode_threads = self.limits.decode_threads or available_cpus()
        self.decoder = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="retrieval-decode")
        self.references = library.ReferenceImages(self.root)
        # threading locks, taken in worker threads: the service outlives event loops (tests open several)
        self._reference_lock = threading.Lock()
        self._add_lock = threading.Lock()

    @classmethod
    def open(cls, folder, *, device: str = "cpu", checkpoint=None, max_distance: float | None = None,
             token_file=None, uploads=None, root=None, limits: Limits | None = None) -> "Service":
        folder = Path(folder)
        token = read_token(token_file) if token_file is not None else None
        searcher, ckpt = library.open_index(folder, device=device, checkpoint=checkpoint, max_distance=max_distance)
        uploads = Path(uploads) if uploads else library.default_uploads_folder(folder)
        if token is not None:  # adding is enabled: find out now that the images would have nowhere to go
            from retrieval.fsutil import ensure_writable_dir

            ensure_writable_dir(uploads, "uploads folder")
        return cls(folder=folder, folder_name=str(folder), searcher=searcher, checkpoint=ckpt, uploads=uploads,
                   token=token, max_distance=max_distance, root=Path(root) if root else None,
                   limits=limits or Limits())

    # -- the compute thread -----------------------------------------------------------------------------------------
    def process(self, jobs: list[QueryJob]) -> list[JobResult]:
        """One tower forward for every image of `jobs`, one Faiss search per distinct (k, threshold)."""
        searcher = self.searcher  # a snapshot: an add swaps in a new Searcher between batches
        images = jobs[0].images if len(jobs) == 1 else torch.cat([j.images for j in jobs])
        embeddings = library.embed(searcher, images)
        scores = library.digit_scores(searcher, images, embeddings)  # None for a tower without a gate
        groups: dict[tuple, list] = {}
        start = 0
        for i, job in enumerate(jobs):
            k = library.effective_k(searcher, job.k)
            groups.setdefault((k, job.max_distance, job.search_params), []).append(
                (i, start, start + len(job.images)))
            start += len(job.images)
        out: list[JobResult | None] = [None] * len(jobs)
        for (k, max_distance, search_params), members in groups.items():
            view = searcher if max_distance is None else library.searcher_for(searcher, max_distance=max_distance)
            if len(groups) == 1:  # the usual case: every job asks the same k and threshold
                subset, subset_scores = embeddings, scores
            else:
                rows = np.concatenate([np.arange(a, b) for _, a, b in members])
                subset, subset_scores = embeddings[rows], None if scores is None else scores[rows]
            names = [name for i, _, _ in members for name in jobs[i].names]
            answers = library.answer_queries(view, subset, k, names, search_params, subset_scores)
            at = 0
            for i, a, b in members:
                out[i] = JobResult(answers[at:at + b - a], view.max_distance)
                at += b - a
        return out

    # -- decoding uploads --------------------------------------------------------------------------------------------
    async def preprocess(self, opened: list[tuple[str, Any]]) -> torch.Tensor:
        """(name, opened PIL image) pairs -> uint8 (n, 28, 28), decoded in the decode threads (the pictures split
        into one contiguous share per thread), or here when they are a few tiny ones (MNIST-size: cheaper than the
        hand-off). A failure raises the error of the first failing picture in order."""
        if sum(img.size[0] * img.size[1] for _, img in opened) <= INLINE_PIXELS:
            tensors = _preprocess_share(opened)
        else:
            loop = asyncio.get_running_loop()
            shares = min(len(opened), self.decode_threads)
            bounds = [len(opened) * i // shares for i in range(shares + 1)]
            if shares == 1:
                tensors = await loop.run_in_executor(self.decoder, _preprocess_share, opened)
            else:
                results = await asyncio.gather(*(loop.run_in_executor(self.decoder, _preprocess_share, opened[a:b])
                                                 for a, b in zip(bounds, bounds[1:])))
                tensors = [t for share in results for t in share]
        for t in tensors:
            if isinstance(t, BaseException):
                raise t
        return torch.stack(tensors)

    # -- adding items ------------------------------------------------------------------------------------------------
    async def add(self, images: torch.Tensor, label: str):
        """Serialised: one add at a time in this process (a lock in the worker thread), and the folder lock
        against other writers. The new index replaces the served one only once it is saved."""

        def embed_on_compute_thread(x):
            return self.batcher.executor.submit(library.embed, self.searcher, x).result()

        def run():
            with self._add_lock:
                index, new_ids = library.add_items(self.folder, self.checkpoint, embed_on_compute_thread, images,
                                                   label, self.uploads, lock_timeout=self.limits.lock_timeout)
                self.searcher = library.searcher_for(self.searcher, index=index, max_distance=self.max_distance)
                return index, new_ids

        return await asyncio.get_running_loop().run_in_executor(None, run)

    async def reference_png(self, item_id: int) -> bytes:
        def run():
            with self._reference_lock:  # the first lookup may load a dataset: once
                return self.references.get(self.searcher.index, item_id)

        image = await asyncio.get_running_loop().run_in_executor(None, run)
        if image is None:
            raise ServiceError(f"item {item_id} has no stored image (a class prototype, or its file is gone)", 404)
        return library.png_bytes(image)


def _preprocess_share(opened) -> list:
    """Preprocess some opened uploads in this thread: a tensor, or the exception, per picture."""
    out = []
    for name, img in opened:
        try:
            out.append(library.preprocess_upload(img, name))
        except Exception as e:  # noqa: BLE001 -- answered in order by Service.preprocess
            out.append(e)
    return out


def available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def read_token(path) -> str:
    path = Path(path)
    try:
        token = path.read_text("utf-8").strip()
    except FileNotFoundError:
        raise UsageError(f"--token-file {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--token-file {path}: cannot read it ({e})") from None
    if not token or len(token.split()) != 1:
        raise UsageError(f"--token-file {path}: expected one token (a line without blanks)")
    return token


# -- request parsing ---------------------------------------------------------------------------------------------------
JSON_TYPES = ("application/json",)
MULTIPART = "multipart/form-data"


def _content_type(request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _int_param(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, str):
        text = value.strip()
        if not text.lstrip("+-").isdigit():
            raise ServiceError(f"{name}: expected an integer, got {value[:40]!r}")
        value = int(text)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ServiceError(f"{name}: expected an integer, got {json.dumps(value)[:40]}")
    if not lo <= value <= hi:
        raise ServiceError(f"{name}: must be between {lo} and {hi}, got {value}")
    return value


def _search_params_param(service: "Service", value) -> str | None:
    """`search_params` of a request: Faiss search parameters for its search ("nprobe=64,k_factor_rf=8"), checked
    against the served index; None (absent or empty): the index's own."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str) or len(value) > 200:
        raise ServiceError(f"search_params: expected a string such as \"nprobe=32\", got {json.dumps(value)[:40]}")
    try:
        library.check_search_params(service.searcher, value)
    except RetrievalError as e:
        raise ServiceError(f"search_params: {e}") from None
    return value.strip()


def _distance_param(name: str, value) -> float | None:
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ServiceError(f"{name}: expected a number, got {value[:40]!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ServiceError(f"{name}: expected a number or null, got {json.dumps(value)[:40]}")
    if not (math.isfinite(value) and value >= 0):
        raise ServiceError(f"{name}: must be a finite distance >= 0, got {value}")
    return float(value)


def _b64(name: str, text) -> bytes:
    if not isinstance(text, str):
        raise ServiceError(f"{name}: expected a base64 string, got {type(text).__name__}")
    if text.startswith("data:"):
        head, _, text = text.partition(",")
        if ";base64" not in head:
            raise ServiceError(f"{name}: only base64 data: URLs are accepted")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ServiceError(f"{name}: not valid base64") from None


async def read_images(request, service: Service, fields: tuple[str, ...]) -> tuple[torch.Tensor, list[str], dict]:
    """Images (multipart `images` files, or JSON `images`: base64 strings or {"name", "data"}) and the other
    `fields` of a request -> (uint8 (n, 28, 28) images, names, fields)."""
    limits = service.limits
    kind = _content_type(request)
    raw: list[tuple[str, bytes]] = []
    params: dict = {}
    if kind == MULTIPART:
        try:
            form = await request.form(max_files=limits.max_images + 1, max_fields=len(fields) + 2,
                                      max_part_size=64 * 1024)
        except AssertionError:  # python-multipart missing: a deployment bug, but answer it clearly
            raise ServiceError("multipart uploads are not available on this server", 415) from None
        try:
            for key, value in form.multi_items():
                if hasattr(value, "read"):  # an UploadFile
                    if key not in ("images", "image"):
                        raise ServiceError(f"unexpected file field {key!r}; send images as 'images'")
                    raw.append((value.filename or str(len(raw)), await value.read()))
                elif key in fields:
                    if key in params:
                        raise ServiceError(f"{key}: given more than once")
                    params[key] = value
                elif key in ("images", "image"):
                    raise ServiceError(f"{key}: expected a file upload, got a text field")
                else:
                    raise ServiceError(f"unexpected field {key!r}; expected images, {', '.join(fields)}")
        finally:
            await form.close()
    elif kind in JSON_TYPES:
        body = await request.body()
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ServiceError(f"the body is not valid JSON ({e})") from None
        if not isinstance(doc, dict):
            raise ServiceError('expected a JSON object like {"images": ["<base64 PNG>"]}')
        unknown = [k for k in doc if k != "images" and k not in fields]
        if unknown:
            raise ServiceError(f"unexpected field {unknown[0]!r}; expected images, {', '.join(fields)}")
        items = doc.get("images")
        if items is None:
            raise ServiceError('images: missing; expected a list of base64 PNG/JPEG strings')
        if not isinstance(items, list):
            raise ServiceError("images: expected a list of base64 strings or {\"name\", \"data\"} objects")
        if len(items) > limits.max_images:
            raise ServiceError(f"images: at most {limits.max_images} images per request, got {len(items)}")
        for i, item in enumerate(items):
            if isinstance(item, dict):
                extra = set(item) - {"name", "data"}
                if extra or "data" not in item:
                    raise ServiceError(f'images[{i}]: expected {{"name": ..., "data": "<base64>"}}')
                name = item.get("name", str(i))
                if not isinstance(name, str):
                    raise ServiceError(f"images[{i}].name: expected a string")
                raw.append((name, _b64(f"images[{i}].data", item["data"])))
            else:
                raw.append((str(i), _b64(f"images[{i}]", item)))
        params = {k: doc[k] for k in fields if k in doc}
    else:
        raise ServiceError(f"expected multipart/form-data or application/json, got {kind or 'no content type'}", 415)
    if not raw:
        raise ServiceError("images: no image given")
    if len(raw) > limits.max_images:
        raise ServiceError(f"images: at most {limits.max_images} images per request, got {len(raw)}")
    opened = [(name, library.open_upload(data, name)) for name, data in raw]  # headers only: refused early
    return await service.preprocess(opened), [name for name, _ in raw], params


# -- the application ----------------------------------------------------------------------------------------------------
class RequestGuard:
    """Every HTTP request passes here: counted while in flight (service.in_flight); its body refused with 413 past
    `max_body_bytes` (by Content-Length, or while streaming) and with 408 when it has not fully arrived
    `read_timeout` seconds after the request's head (the connection is closed: a client that stalls holds nothing
    for long); a client that hangs up before its body is read is dropped with a debug line, not reported as an
    error."""

    def __init__(self, app, service: "Service"):
        self.app = app
        self.service = service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limits = self.service.limits
        limit = limits.max_body_bytes
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > limit
            except ValueError:
                too_big = False
            if too_big:
                return await _send_error(send, 413, f"request body over the limit of {limit:,} bytes")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limits.read_timeout
        seen = 0
        body_done = False
        started = False

        async def guarded_receive():
            nonlocal seen, body_done
            if body_done:  # after the body: only a disconnect can come, whenever it does
                return await receive()
            try:
                if _timeout_at is not None:  # Python 3.11+: no task per receive, as wait_for makes
                    async with _timeout_at(deadline):
                        message = await receive()
                else:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except (asyncio.TimeoutError, TimeoutError):
                raise _ReadTimeout() from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge()
                body_done = not message.get("more_body", False)
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        self.service.in_flight += 1
        try:
            await self.app(scope, guarded_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _send_error(send, 413, f"request body over the limit of {limit:,} bytes")
        except _ReadTimeout:
            logger.debug("%s %s: the body did not arrive within %g s (408)", scope["method"], scope["path"],
                         limits.read_timeout)
            if not started:
                await _send_error(send, 408, f"the request body did not arrive within {limits.read_timeout:g} s")
        except ClientDisconnect:
            logger.debug("%s %s: the client left before its request was read", scope["method"], scope["path"])
        finally:
            self.service.in_flight -= 1


_timeout_at = getattr(asyncio, "timeout_at", None)


class _TooLarge(Exception):
    pass


class _ReadTimeout(Exception):
    pass


async def _send_error(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def page_html() -> str:
    return resources.files("retrieval").joinpath("web/index.html").read_text("utf-8")


def create_app(service: Service):
    """The FastAPI app serving `service` (its lifespan starts and stops the micro-batcher)."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from retrieval.serve import openapi

    @asynccontextmanager
    async def lifespan(app):
        # Everything loaded so far (torch, Faiss, the index, the tower) lives as long as the server: keep it out of
        # the cyclic garbage collector's full passes, which would otherwise walk it again and again under load.
        # (A full pass over them took 160 ms on the 2-core machine with a 60k index: the p99 latency, every few seconds.)
        gc.collect()
        gc.freeze()
        await service.batcher.start()
        try:
            yield
        finally:
            await service.batcher.stop()
            gc.unfreeze()

    extra = {}
    if "telemetry" in inspect.signature(FastAPI).parameters:  # newer FastAPI: no per-request tracing work
        extra["telemetry"] = {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}
    app = FastAPI(title="retrieval serve", version=_version(), lifespan=lifespan, **extra,
                  description="Nearest-neighbour queries against a retrieval index (Siamese tower + Faiss).")
    app.state.service = service
    page = page_html()

    def json_response(obj, status: int = 200, headers: dict | None = None) -> Response:
        return Response(json.dumps(obj, ensure_ascii=False).encode("utf-8"), status_code=status,
                        media_type="application/json", headers=headers)

    @app.exception_handler(ServiceError)
    async def _service_error(request, exc: ServiceError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return json_response({"error": str(exc)}, exc.status, headers)

    @app.exception_handler(RetrievalError)
    async def _retrieval_error(request, exc: RetrievalError):
        return json_response({"error": str(exc)}, 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        status = exc.status_code if 400 <= exc.status_code < 500 else 400
        return json_response({"error": str(exc.detail)}, status, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        parts = []
        for err in exc.errors()[:3]:
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "path", "query"))
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return json_response({"error": "; ".join(parts) or "invalid request"}, 422)

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):  # a bug: say so, keep serving
        logger.exception("unexpected error answering %s %s", request.method, request.url.path)
        return json_response({"error": f"internal error ({type(exc).__name__}); see the server log"}, 500)

    @app.get("/", include_in_schema=False)
    async def index_page():
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    @app.get("/health", **openapi.HEALTH)
    async def health():
        s = service.searcher
        return json_response({"status": "ok", "items": len(s.index), "classes": len(s.index.label_counts()),
                              "max_distance": s.max_distance, "uptime_s": round(time.time() - service.started, 1),
                              "adding": service.token is not None, "max_k": service.limits.max_k,
                              "in_flight": service.in_flight - 1,
                              "compute_threads": service.compute_threads, "decode_threads": service.decode_threads,
                              "batching": service.batcher.stats.to_json()})

    @app.get("/index", **openapi.INDEX)
    async def index_info():
        return json_response(library.index_info(service.folder_name, service.searcher.index))

    async def _run_queries(request: Request, default_k: int) -> JobResult:
        with service.batcher.arrival() as arrival:
            images, names, params = await read_images(request, service, ("k", "max_distance", "search_params"))
            k = _int_param("k", params["k"], 1, service.limits.max_k) if "k" in params else default_k
            max_distance = _distance_param("max_distance", params.get("max_distance"))
            search_params = _search_params_param(service, params.get("search_params"))
            return await arrival.submit(QueryJob(images, names, k, max_distance, search_params), len(images))

    @app.post("/query", **openapi.QUERY)
    async def query(request: Request):
        result = await _run_queries(request, DEFAULT_K)
        return json_response(result.answers)

    @app.post("/classify", **openapi.CLASSIFY)
    async def classify(request: Request):
        result = await _run_queries(request, DEFAULT_CLASSIFY_K)
        out = []
        for answer in result.answers:
            nearest = answer["neighbors"][0] if answer["neighbors"] else None
            out.append({"query": answer["query"], "label": answer["label"],
                        "distance": nearest["distance"] if nearest else None,
                        "max_distance": result.max_distance, "nearest": nearest,
                        **{key: answer[key] for key in ("unknown", "digit_score") if key in answer}})
        return json_response(out)

    @app.get("/items/{item_id}/image", **openapi.ITEM_IMAGE)
    async def item_image(item_id: int):
        if not -(2 ** 63) <= item_id < 2 ** 63:
            raise ServiceError(f"no item with id {item_id} in the index", 404)
        png = await service.reference_png(item_id)
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.post("/items", **openapi.ITEMS)
    async def add_items(request: Request):
        _check_token(service, request)
        images, names, params = await read_images(request, service, ("label",))
        label = library.check_label(params.get("label"))
        index, new_ids = await service.add(images, label)
        return json_response({"label": label, "ids": [int(i) for i in new_ids], "count": len(index),
                              "label_counts": index.label_counts()}, 201)

    app.openapi = lambda: openapi.build(app, service.limits)
    app.add_middleware(RequestGuard, service=service)
    return app


def _check_token(service: Service, request) -> None:
    if service.token is None:
        raise ServiceError("adding items is disabled on this server (start `retrieval serve` with --token-file)", 403)
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if not header:
        raise ServiceError("adding items needs the server's token: send 'Authorization: Bearer <token>'", 401)
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), service.token.encode()):
        raise ServiceError("wrong token", 403)


def _version() -> str:
    import retrieval

    return retrieval.__version__
