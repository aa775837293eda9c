"""Embeddings -> a Faiss index with stable int64 ids, labels and sources, saved to a folder with its metadata: the
public names, gathered from the modules that hold them.

    retrieval.embedding_index   EmbeddingIndex (search, add), the metadata of a new index, class prototypes
    retrieval.index_folder      IndexFolder: an index folder's layout, load / verify / save / update, sizes
    retrieval.index_tower       the tower copy an index folder carries, and the fingerprint checks
    retrieval.index_legacy      folders written by earlier versions (items as JSON, the tower by path only)
    retrieval.index_build       the build (streaming, sharded across processes); build_index below is its
                                in-memory use
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from retrieval.embedding_index import (
    FORMAT, STRUCTURAL_KEYS, EmbeddingIndex, as_unit_float32, class_prototypes, new_index_meta, normalize_factory,
    prototypes_from_sums,
)
from retrieval.faiss_tools import metric_code
from retrieval.index_build import IndexSpec, build_from_arrays
from retrieval.index_folder import (
    META_NAME, REV_MAP_BYTES, IndexFolder, index_sizes, is_index_folder_content,
)
from retrieval.index_tower import (
    TOWER_KINDS, check_tower_matches, load_index_tower, tower_files, tower_meta,
)

__all__ = [
    "FORMAT", "STRUCTURAL_KEYS", "EmbeddingIndex", "as_unit_float32", "class_prototypes", "new_index_meta",
    "normalize_factory", "prototypes_from_sums", "META_NAME", "REV_MAP_BYTES", "IndexFolder", "index_sizes",
    "is_index_folder_content", "TOWER_KINDS", "check_tower_matches", "load_index_tower", "tower_files", "tower_meta",
    "build_index", "load_index", "save_index", "read_index_meta", "update_index_meta", "check_index_target",
]


def build_index(
    embeddings,
    labels,
    classes: Sequence[str],
    sources: Sequence[str],
    factory: str = "Flat",
    metric: str = "ip",
    seed: int = 0,
    *,
    search_params: str | None = None,
    train_size: int | None = None,
    **meta,
) -> EmbeddingIndex:
    """Build a Faiss index (faiss.index_factory string, metric ip|l2) over unit embeddings with ids 0..n-1.

    Indexes that need training (IVF, PQ) are trained on a seeded sample of `train_size` of the embeddings
    (training_sample; default default_train_size). `search_params` (ParameterSpace syntax, e.g. "nprobe=16")
    default to `default_search_params`. Extra keyword arguments go into the metadata (tower, data, preprocessing,
    ...). The same pipeline as retrieval.index_build's streaming build (over one chunk, in this process).
    """
    factory = normalize_factory(factory)
    metric_code(metric)
    spec = IndexSpec(factory, metric, seed, train_size=train_size, search_params=search_params)
    return build_from_arrays(embeddings, labels, classes, sources, spec, meta)


def load_index(folder: str | os.PathLike) -> EmbeddingIndex:
    """Load an index folder, checking meta.json against the Faiss and items files (clear error naming the file)."""
    return IndexFolder(folder).load()


def save_index(index: EmbeddingIndex, folder: str | os.PathLike, *, locked: bool = False) -> Path:
    """Write `index` into `folder` atomically (IndexFolder.save); returns the meta.json path."""
    return IndexFolder(folder).save(index, locked=locked)


def read_index_meta(folder: str | os.PathLike) -> dict:
    """meta.json of an index folder, checked for the keys every reader relies on."""
    return IndexFolder(folder).read_meta()


def update_index_meta(folder: str | os.PathLike, **changes) -> dict:
    """Atomically rewrite meta.json with `changes` (a value of None deletes the key); IndexFolder.update_meta."""
    return IndexFolder(folder).update_meta(**changes)


def check_index_target(folder: str | os.PathLike) -> bool:
    """Refuse to write an index into a folder holding other things; returns whether the folder already existed."""
    return IndexFolder(folder).check_target()
