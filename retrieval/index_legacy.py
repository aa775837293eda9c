"""Index folders written by earlier versions, still read: the items as one JSON file (items-<token>.json) and the
tower named by the absolute path of its checkpoint only (no copy in the folder, no meta["tower"]["files"]).

Saving such a folder again (`retrieval index add`) writes it in the current format: items as arrays, the tower
copied in.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from retrieval.errors import RetrievalError
from retrieval.fsutil import read_json

JSON_ITEMS_SUFFIX = ".json"


def read_json_items(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(ids int64, labels int64, sources) from items-<token>.json ({"ids": [...], "labels": [...], "sources": [...]})."""
    items = read_json(path, "index items file")
    try:
        ids = np.asarray(items["ids"], dtype=np.int64)
        labels = np.asarray(items["labels"], dtype=np.int64)
        sources = [str(s) for s in items["sources"]]
    except (KeyError, TypeError, ValueError) as e:
        raise RetrievalError(f"{path} is not an index items file ({e})") from None
    return ids, labels, sources


def rebuild_hint(folder: Path | None) -> str:
    """Why and how to bring a folder whose tower is named by path only up to date."""
    return (f"the index {folder or ''} was written by an earlier version that did not copy its tower into the folder; "
            "rebuild it with `retrieval index build` (or add to it with `retrieval index add`) so that it carries "
            "its tower and works wherever the folder is copied")


def checkpoint_by_path(meta: dict) -> str:
    """The checkpoint path the metadata of such a folder names, with a clear error when it names none or it is
    gone."""
    path = (meta.get("tower") or {}).get("checkpoint")
    if not path:
        raise RetrievalError("the index metadata names no checkpoint; give it as `checkpoint`")
    if not Path(path).exists() and not Path(str(path) + ".safetensors").exists():
        raise RetrievalError(
            f"the checkpoint this index was built with is gone: {path}; give a copy of it as `checkpoint` "
            f"(this index predates self-contained index folders: rebuild it so it carries its tower)"
        )
    return path
