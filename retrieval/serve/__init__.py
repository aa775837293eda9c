"""`retrieval serve`: an HTTP query service over an index (FastAPI + uvicorn) and a draw-a-digit page.

    from retrieval.serve import Limits, Service, create_app
    app = create_app(Service.open("indexes/mnist", token_file="token.txt"))   # any ASGI server, or:
    serve("indexes/mnist", port=8000)                                          # what the CLI runs

The tower and the index are loaded once (retrieval.serve.service); concurrent queries are micro-batched
(retrieval.serve.batcher); a request's pictures and fields are read in retrieval.serve.parsing, its body limits
kept by retrieval.serve.guard, its routes in retrieval.serve.app; the library calls live in retrieval.serve.library.
"""

from retrieval.serve.app import create_app
from retrieval.serve.server import serve
from retrieval.serve.service import Limits, Service

__all__ = ["Limits", "Service", "create_app", "serve"]
