"""The OpenAPI description of `retrieval serve` (/openapi.json): request bodies in both encodings, every answer
and every error status, so clients (and schemathesis) can check the service against it."""

from __future__ import annotations

from fastapi.responses import Response

# A tower with a digit-or-not gate (retrieval.gate) adds these to each answer.
_GATE_FIELDS = {
    "unknown": {"type": "string", "enum": ["not a digit", "far from every class"],
                "description": "why the label is `unknown`: the gate's digit score is below its threshold, or the "
                               "nearest reference is past the distance threshold"},
    "digit_score": {"type": "number", "minimum": 0, "maximum": 1,
                    "description": "the digit-or-not gate's probability that the image is a digit"},
}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": _ref("Error")}}}


def _json(description: str, schema: dict) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


BAD_INPUT = _error("Bad input: an undecodable, empty or inkless image, bad base64, a bad or missing field")
TOO_LARGE = _error("The body is over the size limit, or a picture is over the pixel budget")
TOO_SLOW = _error("The body did not arrive within the read timeout (the connection is closed)")
WRONG_TYPE = _error("Not multipart/form-data or application/json")


def _body(json_schema: str, multipart_schema: str) -> dict:
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": _ref(json_schema)},
        "multipart/form-data": {"schema": _ref(multipart_schema),
                                "encoding": {"images": {"contentType": "image/png, image/jpeg, image/*"}}},
    }}}


HEALTH = dict(summary="Liveness and a few counters",
              responses={200: _json("The server is up", _ref("Health"))})
INDEX = dict(summary="The index metadata and per-label counts (as `retrieval index info --json`)",
             responses={200: _json("Index description", _ref("IndexInfo"))})
QUERY = dict(
    summary="Nearest neighbours of one or several images (as `retrieval query --json`)",
    description="Send images as multipart uploads (`images`, repeated) or JSON (`images`: base64 PNG/JPEG strings "
                "or {name, data} objects). `k` (default 5) is clamped to the index size like the CLI; "
                "`max_distance` overrides the calibrated threshold past which the label is `unknown`; "
                "`search_params` (Faiss's names, e.g. `nprobe=64` or `efSearch=128,k_factor_rf=8`) replace the "
                "index's search parameters for this request, as `retrieval query --search-params`.",
    responses={200: _json("One answer per image, in order", {"type": "array", "items": _ref("QueryAnswer")}),
               400: BAD_INPUT, 408: TOO_SLOW, 413: TOO_LARGE, 415: WRONG_TYPE},
    openapi_extra=_body("QueryJSON", "QueryMultipart"),
)
CLASSIFY = dict(
    summary="A label (or `unknown`) for each image, from its k nearest neighbours (default k=1) and the threshold",
    responses={200: _json("One answer per image, in order", {"type": "array", "items": _ref("Classification")}),
               400: BAD_INPUT, 408: TOO_SLOW, 413: TOO_LARGE, 415: WRONG_TYPE},
    openapi_extra=_body("QueryJSON", "QueryMultipart"),
)
ITEM_IMAGE = dict(
    summary="The stored 28x28 image of an indexed reference, as PNG",
    response_class=Response,
    responses={200: {"description": "PNG image", "content": {"image/png": {"schema": {"type": "string",
                                                                                       "format": "binary"}}}},
               404: _error("No such item, or it has no stored image (a class prototype, a moved file)")},
)
ITEMS = dict(
    summary="Add labelled images to the index (persisted atomically, like `retrieval index add`)",
    description="Needs `Authorization: Bearer <token>` with the token of the server's --token-file. All images "
                "of a request get `label`; adds are serialised, and a request that fails changes nothing.",
    status_code=201,
    responses={201: _json("The new ids and the index's new counts", _ref("AddResult")),
               400: BAD_INPUT, 401: _error("No token given"), 403: _error("Wrong token, or adding is disabled"),
               408: TOO_SLOW, 409: _error("The index folder is busy, or a prototype index already has this class"),
               413: TOO_LARGE, 415: WRONG_TYPE},
    openapi_extra={**_body("AddJSON", "AddMultipart"), "security": [{"bearer": []}]},
)


def schemas(limits) -> dict:
    image_b64 = {"type": "string", "description": "base64 PNG/JPEG (a base64 data: URL is accepted too)"}
    images_json = {"type": "array", "minItems": 1, "maxItems": limits.max_images, "items": {"anyOf": [
        image_b64,
        {"type": "object", "required": ["data"], "additionalProperties": False,
         "properties": {"name": {"type": "string"}, "data": image_b64}},
    ]}}
    images_multipart = {"type": "array", "minItems": 1, "maxItems": limits.max_images,
                        "items": {"type": "string", "format": "binary"}}
    k = {"type": "integer", "minimum": 1, "maximum": limits.max_k}
    max_distance = {"type": ["number", "null"], "minimum": 0}
    search_params = {"type": "string", "maxLength": 200,
                     "description": "Faiss search parameters for this request, e.g. nprobe=64 (IVF), efSearch=128 "
                                    "(HNSW), k_factor_rf=8 (refine stage); empty: the index's own"}
    label = {"type": "string", "minLength": 1, "maxLength": 40,
             "description": "class name: letters, digits, spaces and . + - _; not 'unknown'"}
    neighbor = {"type": "object", "required": ["id", "label", "distance", "source"], "properties": {
        "id": {"type": "integer"}, "label": {"type": "string"}, "distance": {"type": "number"},
        "source": {"type": "string"}}}
    return {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
        "Neighbor": neighbor,
        "QueryAnswer": {"type": "object", "required": ["query", "label", "neighbors"], "properties": {
            "query": {"type": "string"}, "label": {"type": ["string", "null"]},
            "neighbors": {"type": "array", "items": _ref("Neighbor")},
            "true_label": {"type": "string"}, "error": {"type": "string"}, **_GATE_FIELDS}},
        "Classification": {"type": "object", "required": ["query", "label", "distance", "max_distance", "nearest"],
                           "properties": {
                               "query": {"type": "string"}, "label": {"type": ["string", "null"]},
                               "distance": {"type": ["number", "null"]},
                               "max_distance": {"type": ["number", "null"]},
                               "nearest": {"anyOf": [_ref("Neighbor"), {"type": "null"}]}, **_GATE_FIELDS}},
        "Health": {"type": "object", "required": ["status", "items"], "properties": {
            "status": {"type": "string"}, "items": {"type": "integer"}, "classes": {"type": "integer"},
            "pid": {"type": "integer", "description": "the server process that answered (one of them, with "
                    "--workers)"},
            "max_distance": {"type": ["number", "null"]}, "uptime_s": {"type": "number"},
            "adding": {"type": "boolean"}, "max_k": {"type": "integer", "description": "the largest k a query may ask"},
            "in_flight": {"type": "integer", "description": "other requests being read or answered"},
            "compute_threads": {"type": ["object", "null"],
                                "description": "threads torch and Faiss use on the compute thread (--threads)"},
            "decode_threads": {"type": "integer", "description": "threads decoding and preprocessing uploads"},
            "batching": {"type": "object"}}},
        "IndexInfo": {"type": "object", "required": ["folder", "meta", "label_counts"], "properties": {
            "folder": {"type": "string"}, "meta": {"type": "object"},
            "label_counts": {"type": "object", "additionalProperties": {"type": "integer"}},
            "sizes": {"type": "object", "description": "bytes on disk per file, about how many in memory, and how "
                                                       "many are memory-mapped (on-disk inverted lists)"}}},
        "AddResult": {"type": "object", "required": ["label", "ids", "count", "label_counts"], "properties": {
            "label": {"type": "string"}, "ids": {"type": "array", "items": {"type": "integer"}},
            "count": {"type": "integer"},
            "label_counts": {"type": "object", "additionalProperties": {"type": "integer"}}}},
        "QueryJSON": {"type": "object", "required": ["images"], "additionalProperties": False, "properties": {
            "images": images_json, "k": k, "max_distance": max_distance, "search_params": search_params}},
        "QueryMultipart": {"type": "object", "required": ["images"], "additionalProperties": False, "properties": {
            "images": images_multipart, "k": k, "max_distance": {"type": "number", "minimum": 0},
            "search_params": search_params}},
        "AddJSON": {"type": "object", "required": ["images", "label"], "additionalProperties": False,
                    "properties": {"images": images_json, "label": label}},
        "AddMultipart": {"type": "object", "required": ["images", "label"], "additionalProperties": False,
                         "properties": {"images": images_multipart, "label": label}},
    }


def build(app, limits) -> dict:
    """The app's OpenAPI document with our schemas; FastAPI's 422 bodies described as our {"error"} object."""
    from fastapi.openapi.utils import get_openapi

    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = doc.setdefault("components", {})
    components.setdefault("schemas", {}).update(schemas(limits))
    components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer",
                                                "description": "the token in the server's --token-file"}}
    for methods in doc.get("paths", {}).values():
        for op in methods.values():
            responses = op.get("responses", {})
            if "422" in responses:
                responses["422"] = _error("A malformed path parameter")
    for name in ("HTTPValidationError", "ValidationError"):
        components["schemas"].pop(name, None)
    app.openapi_schema = doc
    return doc
