"""The FastAPI application of `retrieval serve`: its routes and error answers, around a Service.

Every error is a JSON object `{"error": "..."}` with a 4xx status: 400 bad input (undecodable or empty image, bad
base64, bad field), 401/403 missing or wrong token, 404 unknown item, 408 a body not received in time, 409 conflict
(folder busy, prototype class taken), 413 body or pixel budget exceeded, 415 wrong content type, 422 a malformed
path parameter. A client that leaves before its request is read is not an error (a debug line at most).

The pieces: retrieval.serve.service (the index, tower, batcher and decode threads), retrieval.serve.parsing (a
request's pictures and fields), retrieval.serve.guard (body limits and in-flight count), retrieval.serve.openapi.
"""

from __future__ import annotations

import gc
import inspect
import json
import logging
import os
import time
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from retrieval.errors import RetrievalError
from retrieval.serve import library, openapi
from retrieval.serve.guard import RequestGuard
from retrieval.serve.library import ServiceError
from retrieval.serve.parsing import (ADD_FIELDS, DEFAULT_CLASSIFY_K, DEFAULT_K, check_token, read_images,
                                     read_query)
from retrieval.serve.service import JobResult, Limits, QueryJob, Service

# Callers that serve the app (tests, benchmarks) take the service's names from here too.
__all__ = ["JobResult", "Limits", "QueryJob", "Service", "create_app", "page_html"]

logger = logging.getLogger("retrieval.serve")


def create_app(service: Service) -> FastAPI:
    """The FastAPI app serving `service` (its lifespan starts and stops the micro-batcher)."""
    app = new_fastapi(service)
    register_error_handlers(app)
    register_info_routes(app, service)
    register_query_routes(app, service)
    register_item_routes(app, service)
    app.openapi = lambda: openapi.build(app, service.limits)
    app.add_middleware(RequestGuard, service=service)
    return app


def new_fastapi(service: Service) -> FastAPI:
    """An app without routes whose lifespan runs `service`'s micro-batcher."""
    extra = {}
    if "telemetry" in inspect.signature(FastAPI).parameters:  # newer FastAPI: no per-request tracing work
        extra["telemetry"] = {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}
    app = FastAPI(title="retrieval serve", version=_version(), lifespan=service_lifespan(service), **extra,
                  description="Nearest-neighbour queries against a retrieval index (Siamese tower + Faiss).")
    app.state.service = service
    return app


def service_lifespan(service: Service):
    @asynccontextmanager
    async def lifespan(app):
        # Everything loaded so far (torch, Faiss, the index, the tower) lives as long as the server: keep it out of
        # the cyclic garbage collector's full passes, which would otherwise walk it again and again under load
        # (a pause of the whole server each time, which shows as the p99 latency).
        gc.collect()
        gc.freeze()
        await service.batcher.start()
        try:
            yield
        finally:
            await service.batcher.stop()
            gc.unfreeze()

    return lifespan


def json_response(obj, status: int = 200, headers: dict | None = None) -> Response:
    return Response(json.dumps(obj, ensure_ascii=False).encode("utf-8"), status_code=status,
                    media_type="application/json", headers=headers)


# -- error answers: one JSON line each ---------------------------------------------------------------------------------
def register_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(RetrievalError, retrieval_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected_error)


async def service_error(request, exc: ServiceError):
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return json_response({"error": str(exc)}, exc.status, headers)


async def retrieval_error(request, exc: RetrievalError):
    return json_response({"error": str(exc)}, 400)


async def http_error(request, exc: StarletteHTTPException):
    status = exc.status_code if 400 <= exc.status_code < 500 else 400
    return json_response({"error": str(exc.detail)}, status, getattr(exc, "headers", None))


async def validation_error(request, exc: RequestValidationError):
    parts = []
    for err in exc.errors()[:3]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "path", "query"))
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return json_response({"error": "; ".join(parts) or "invalid request"}, 422)


async def unexpected_error(request, exc: Exception):  # a bug: say so, keep serving
    logger.exception("unexpected error answering %s %s", request.method, request.url.path)
    return json_response({"error": f"internal error ({type(exc).__name__}); see the server log"}, 500)


# -- routes ------------------------------------------------------------------------------------------------------------
def register_info_routes(app: FastAPI, service: Service) -> None:
    """The draw-a-digit page, /health and /index."""
    page = page_html()

    @app.get("/", include_in_schema=False)
    async def index_page():
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    @app.get("/health", **openapi.HEALTH)
    async def health():
        return json_response(health_report(service))

    @app.get("/index", **openapi.INDEX)
    async def index_info():
        return json_response(library.index_info(service.folder_name, service.searcher.index))


def register_query_routes(app: FastAPI, service: Service) -> None:
    """/query and /classify: a request's pictures through the micro-batcher."""

    async def run_queries(request: Request, default_k: int) -> JobResult:
        with service.batcher.arrival() as arrival:
            job = await read_query(request, service, default_k)
            return await arrival.submit(job, len(job.images))

    @app.post("/query", **openapi.QUERY)
    async def query(request: Request):
        result = await run_queries(request, DEFAULT_K)
        return json_response(result.answers)

    @app.post("/classify", **openapi.CLASSIFY)
    async def classify(request: Request):
        result = await run_queries(request, DEFAULT_CLASSIFY_K)
        return json_response(classifications(result))


def register_item_routes(app: FastAPI, service: Service) -> None:
    """An item's stored picture, and adding items (with the token)."""

    @app.get("/items/{item_id}/image", **openapi.ITEM_IMAGE)
    async def item_image(item_id: int):
        if not -(2 ** 63) <= item_id < 2 ** 63:
            raise ServiceError(f"no item with id {item_id} in the index", 404)
        png = await service.reference_png(item_id)
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.post("/items", **openapi.ITEMS)
    async def add_items(request: Request):
        check_token(service, request)
        images, names, params = await read_images(request, service, ADD_FIELDS)
        label = library.check_label(params.get("label"))
        index, new_ids = await service.add(images, label)
        return json_response({"label": label, "ids": [int(i) for i in new_ids], "count": len(index),
                              "label_counts": index.label_counts()}, 201)


def health_report(service: Service) -> dict:
    s = service.searcher
    return {"status": "ok", "pid": os.getpid(), "items": len(s.index), "classes": len(s.index.label_counts()),
            "max_distance": s.max_distance, "uptime_s": round(time.time() - service.started, 1),
            "adding": service.token is not None, "max_k": service.limits.max_k,
            "in_flight": service.in_flight - 1,  # not counting the /health request itself
            "compute_threads": service.compute_threads, "decode_threads": service.decode_threads,
            "batching": service.batcher.stats.to_json()}


def classifications(result: JobResult) -> list[dict]:
    """/classify's answer: per query its label and its nearest neighbour (`retrieval query --json` entries in)."""
    out = []
    for answer in result.answers:
        nearest = answer["neighbors"][0] if answer["neighbors"] else None
        out.append({"query": answer["query"], "label": answer["label"],
                    "distance": nearest["distance"] if nearest else None,
                    "max_distance": result.max_distance, "nearest": nearest,
                    **{key: answer[key] for key in ("unknown", "digit_score") if key in answer}})
    return out


def page_html() -> str:
    return resources.files("retrieval").joinpath("web/index.html").read_text("utf-8")


def _version() -> str:
    import retrieval

    return retrieval.__version__
