"""retrieval: train a Siamese tower, index its embeddings with Faiss, query and evaluate."""

from __future__ import annotations


def __getattr__(name: str):
    # The version is defined once, in pyproject.toml; read from the installed metadata on first use (lazily, so
    # importing the package stays cheap).
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            value = version("retrieval")
        except PackageNotFoundError:  # imported from a source tree that was never installed
            value = "0+unknown"
        globals()["__version__"] = value
        return value
    raise AttributeError(f"module 'retrieval' has no attribute {name!r}")
