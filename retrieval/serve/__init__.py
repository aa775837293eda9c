"""`retrieval serve`: an HTTP query service over an index (FastAPI + uvicorn) and a draw-a-digit page.

    from retrieval.serve import Limits, Service, create_app
    app = create_app(Service.open("indexes/mnist", token_file="token.txt"))   # any ASGI server, or:
    serve("indexes/mnist", port=8000)                                          # what the CLI runs

The tower and the index are loaded once; concurrent queries are micro-batched (retrieval.serve.batcher); the
library calls live in retrieval.serve.library.
"""

from retrieval.serve.app import Limits, Service, create_app
from retrieval.serve.server import serve

__all__ = ["Limits", "Service", "create_app", "serve"]
