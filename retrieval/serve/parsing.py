"""Reading a request of `retrieval serve`: its pictures (multipart files or base64 JSON) and its parameters, each
checked against the service's limits and answered with a one-line ServiceError naming the field at fault.

Starlette parses the multipart body (request.form(), python-multipart) and the JSON text (request.json()); what
is checked here by hand is the shape of what they return, so that every bad field gets a 400 naming it rather
than a 422 listing a schema's errors.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import math

import torch

from retrieval.errors import RetrievalError
from retrieval.serve import library
from retrieval.serve.library import ServiceError
from retrieval.serve.service import Limits, QueryJob, Service

DEFAULT_K = 5
DEFAULT_CLASSIFY_K = 1
QUERY_FIELDS = ("k", "max_distance", "search_params")
ADD_FIELDS = ("label",)
IMAGE_FIELDS = ("images", "image")  # the multipart file fields (one picture per part)
JSON_TYPES = ("application/json",)
MULTIPART = "multipart/form-data"
MAX_FIELD_BYTES = 64 * 1024  # one multipart part that is not a file


# -- parameters --------------------------------------------------------------------------------------------------------
def int_param(name: str, value, lo: int, hi: int) -> int:
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


def search_params_param(service: Service, value) -> str | None:
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


def distance_param(name: str, value) -> float | None:
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


def base64_field(name: str, text) -> bytes:
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


def check_token(service: Service, request) -> None:
    """Adding items needs the server's token as `Authorization: Bearer <token>` (403 when adding is disabled)."""
    if service.token is None:
        raise ServiceError("adding items is disabled on this server (start `retrieval serve` with --token-file)", 403)
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if not header:
        raise ServiceError("adding items needs the server's token: send 'Authorization: Bearer <token>'", 401)
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), service.token.encode()):
        raise ServiceError("wrong token", 403)


# -- the request's body ------------------------------------------------------------------------------------------------
def content_type(request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def read_query(request, service: Service, default_k: int) -> QueryJob:
    """A /query or /classify request -> the job for the micro-batcher (its pictures decoded, its fields checked)."""
    images, names, params = await read_images(request, service, QUERY_FIELDS)
    k = int_param("k", params["k"], 1, service.limits.max_k) if "k" in params else default_k
    max_distance = distance_param("max_distance", params.get("max_distance"))
    search_params = search_params_param(service, params.get("search_params"))
    return QueryJob(images, names, k, max_distance, search_params)


async def read_images(request, service: Service, fields: tuple[str, ...]) -> tuple[torch.Tensor, list[str], dict]:
    """Images (multipart `images` files, or JSON `images`: base64 strings or {"name", "data"}) and the other
    `fields` of a request -> (uint8 (n, 28, 28) images, names, fields)."""
    limits = service.limits
    kind = content_type(request)
    if kind == MULTIPART:
        raw, params = await read_multipart(request, limits, fields)
    elif kind in JSON_TYPES:
        raw, params = json_images(await read_json(request), limits, fields)
    else:
        raise ServiceError(f"expected multipart/form-data or application/json, got {kind or 'no content type'}", 415)
    check_image_count(len(raw), limits)
    opened = [(name, library.open_upload(data, name)) for name, data in raw]  # headers only: refused early
    return await service.preprocess(opened), [name for name, _ in raw], params


def check_image_count(count: int, limits: Limits) -> None:
    if not count:
        raise ServiceError("images: no image given")
    if count > limits.max_images:
        raise ServiceError(f"images: at most {limits.max_images} images per request, got {count}")


async def read_multipart(request, limits: Limits, fields: tuple[str, ...]) -> tuple[list[tuple[str, bytes]], dict]:
    """A multipart body -> ((name, bytes) per file part, the text `fields`), parsed by Starlette within the limits."""
    try:
        form = await request.form(max_files=limits.max_images + 1, max_fields=len(fields) + 2,
                                  max_part_size=MAX_FIELD_BYTES)
    except AssertionError:  # python-multipart missing: a deployment bug, but answer it clearly
        raise ServiceError("multipart uploads are not available on this server", 415) from None
    raw: list[tuple[str, bytes]] = []
    params: dict = {}
    try:
        for key, value in form.multi_items():
            if hasattr(value, "read"):  # an UploadFile
                if key not in IMAGE_FIELDS:
                    raise ServiceError(f"unexpected file field {key!r}; send images as 'images'")
                raw.append((value.filename or str(len(raw)), await value.read()))
            elif key in fields:
                if key in params:
                    raise ServiceError(f"{key}: given more than once")
                params[key] = value
            elif key in IMAGE_FIELDS:
                raise ServiceError(f"{key}: expected a file upload, got a text field")
            else:
                raise ServiceError(f"unexpected field {key!r}; expected images, {', '.join(fields)}")
    finally:
        await form.close()
    return raw, params


async def read_json(request) -> dict:
    """A JSON body -> its object (400 when it is not JSON, or not an object)."""
    try:
        doc = await request.json()
    except (ValueError, UnicodeDecodeError) as e:
        raise ServiceError(f"the body is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ServiceError('expected a JSON object like {"images": ["<base64 PNG>"]}')
    return doc


def json_images(doc: dict, limits: Limits, fields: tuple[str, ...]) -> tuple[list[tuple[str, bytes]], dict]:
    """A request's JSON object -> ((name, bytes) per entry of `images`, the other `fields` it gives)."""
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
    raw = [json_image(i, item) for i, item in enumerate(items)]
    return raw, {k: doc[k] for k in fields if k in doc}


def json_image(i: int, item) -> tuple[str, bytes]:
    """`images[i]` of a JSON request: a base64 string, or {"name": ..., "data": "<base64>"} -> (name, bytes)."""
    if not isinstance(item, dict):
        return str(i), base64_field(f"images[{i}]", item)
    extra = set(item) - {"name", "data"}
    if extra or "data" not in item:
        raise ServiceError(f'images[{i}]: expected {{"name": ..., "data": "<base64>"}}')
    name = item.get("name", str(i))
    if not isinstance(name, str):
        raise ServiceError(f"images[{i}].name: expected a string")
    return name, base64_field(f"images[{i}].data", item["data"])
