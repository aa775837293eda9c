"""Embeddings -> a Faiss index with stable int64 ids, labels and sources, saved to a folder with its metadata.

An index folder holds three artifacts named by `meta.json`:

    meta.json               factory, metric, dimension, count, classes, tower, data, files, checksums, ...
    index-<token>.faiss     the Faiss index (always an IndexIDMap2, so ids survive appends)
    items-<token>.npz       per id: label (index into meta["classes"]) and source ("mnist:train[12]", a path, ...)
                            as arrays (retrieval.items; items-<token>.json in folders written before, still read)
    lists-<token>.ivfdata   with `on_disk` (IVF only): the inverted lists, memory-mapped read-only when loaded
    tower-<fp>.safetensors  a copy of the tower that embedded the vectors (<fp>: the start of its fingerprint),
    tower-<fp>.json         with its checkpoint sidecar and its model card (meta["tower"]["files"] names them),
    tower-<fp>.md           so a copied folder (cp -r, rsync, tar) answers queries anywhere

Saving writes the tower files (unless the folder already holds them, byte for byte) and the data files under
fresh names (an on-disk lists file the index already maps in this folder is kept: a build writes it there, under a
temp name until complete), then atomically replaces meta.json (the commit point), then deletes the files the old
meta.json named. A committed lists file is never written to: adding to an on-disk index copies its lists.
A crash at any moment leaves either the old or the new index whole. Indexes written before the tower was copied
name it by absolute path only (meta["tower"]["checkpoint"]); they still load, with a hint to rebuild.
Writers hold `retrieval.fsutil.exclusive_lock(folder)`, so two builds into one folder never interleave.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import re
import uuid
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np

import retrieval
from retrieval.checkpoint import load_checkpoint
from retrieval.errors import RetrievalError, UsageError
from retrieval.faiss_tools import (
    METRICS, add_with_ids, faiss_search, omp_threads, train_index, apply_search_params, check_training_size,
    default_search_params, default_train_size, faiss_quiet, index_ivf, lists_on_disk, lists_to_memory,
    metric_code, needs_training, no_prefetch, search_parameters, training_sample, write_lists,
)
from retrieval.fsutil import atomic_path, atomic_write_json, exclusive_lock, read_json, sha256_file
from retrieval.items import SourceTable, read_items, write_items
from retrieval.knn import PositionLookup

FORMAT = "retrieval-index/1"
META_NAME = "meta.json"
# Keys that describe the stored files; update_index_meta must not change them.
STRUCTURAL_KEYS = ("format", "files", "factory", "metric", "dimension", "count", "next_id", "classes")

_IDMAP_PREFIX = re.compile(r"^\s*IDMap2?\s*,\s*", re.IGNORECASE)
# Data files: the Faiss index, the items (.npz; .json in folders written before), the on-disk inverted lists.
_DATA_FILE = r"(index-[0-9a-f]+\.faiss|items-[0-9a-f]+\.(json|npz)|lists-[0-9a-f]+\.ivfdata)"
_OWN_FILE = re.compile(rf"^({_DATA_FILE}|\.({_DATA_FILE}|meta\.json)\..*\.tmp)$")
# The copied tower: weights, checkpoint sidecar and model card (and their temp names while being written).
_TOWER_FILE = re.compile(r"^tower-[0-9a-f]+\.(safetensors|json|md)$")
_TOWER_TEMP = re.compile(r"^\.tower-[0-9a-f]+\.(safetensors|json|md)\..*\.tmp$")
TOWER_KINDS = {"weights": ".safetensors", "sidecar": ".json", "card": ".md"}


logger = logging.getLogger(__name__)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def normalize_factory(factory: str) -> str:
    """Drop an 'IDMap,'/'IDMap2,' prefix (ids are always kept) and surrounding blanks."""
    text = _IDMAP_PREFIX.sub("", factory or "").strip()
    if not text:
        raise UsageError("`factory`: empty Faiss factory string; expected e.g. Flat, HNSW32, IVF256,Flat, IVF256,PQ16")
    return text


def _as_unit_float32(x, what: str = "embeddings") -> np.ndarray:
    x = np.array(x, dtype=np.float32, copy=True, order="C")
    if x.ndim != 2:
        raise RetrievalError(f"{what} must be a 2-d array (n, d), got shape {tuple(x.shape)}")
    if not np.isfinite(x).all():
        raise RetrievalError(f"{what} contain NaN or infinite values")
    faiss.normalize_L2(x)  # the distance contract assumes unit vectors (the towers already emit them)
    return x


class EmbeddingIndex:
    """A Faiss index of unit embeddings with stable ids, a label and a source per id, and its metadata.

    `search` returns Euclidean distances between unit vectors for both metrics (ip: sqrt(2 - 2 cos)), ascending;
    slots past the end of the index hold id -1 and distance inf.
    """

    def __init__(self, index: faiss.Index, meta: dict, ids: np.ndarray, labels: np.ndarray,
                 sources: Sequence[str] | SourceTable):
        self.index = index
        self.meta = meta
        self.ids = np.asarray(ids, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.sources = sources if isinstance(sources, SourceTable) else SourceTable.from_strings(sources)
        self.folder: Path | None = None  # where it was loaded from or last saved to
        self.lists_file: Path | None = None  # the on-disk inverted lists file the index maps, as it is there
        self._pos = None  # PositionLookup of self.ids, built on first use
        self._gpu = self._device = None  # a GPU copy searched instead of .index (use_device); the device asked for

    # -- description -------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def dimension(self) -> int:
        return int(self.index.d)

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    @property
    def metric(self) -> str:
        return self.meta["metric"]

    def label_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.classes)) if len(self.labels) else np.zeros(0, int)
        return {self.classes[i]: int(n) for i, n in enumerate(counts) if n > 0}

    def positions_of(self, ids) -> np.ndarray:
        """Positions in .ids/.labels/.sources of `ids` (-1 for -1 or unknown ids)."""
        if self._pos is None:
            self._pos = PositionLookup(self.ids)
        return self._pos(ids)

    def labels_of(self, ids) -> np.ndarray:
        """int64 labels (indices into .classes) of `ids`; -1 where the id is -1."""
        pos = self.positions_of(ids)
        return np.where(pos >= 0, self.labels[np.maximum(pos, 0)] if len(self.labels) else -1, -1).astype(np.int64)

    def sources_of(self, ids) -> list:
        pos = self.positions_of(ids)
        return [self.sources[p] if p >= 0 else None for p in pos.ravel().tolist()]

    # -- search --------------------------------------------------------------------------------------------------
    def search(self, queries, k: int, params: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """queries float32 (n, d) -> (distances float32 (n, k) ascending, ids int64 (n, k)).

        `params`: search parameters for this search only (e.g. "nprobe=64"; see search_parameters), instead of
        the index's own (meta["search_params"])."""
        k = int(k)
        if k <= 0:
            raise UsageError(f"k must be a positive number of neighbours, got {k}")
        q = _as_unit_float32(queries, "query embeddings")
        if q.shape[1] != self.dimension:
            raise RetrievalError(
                f"query embeddings have dimension {q.shape[1]} but the index holds {self.dimension}-d vectors "
                "(a different tower?)"
            )
        sp, _keep = search_parameters(self.index, params) if params else (None, [])
        searched = self._gpu if self._gpu is not None and sp is None else self.index
        if len(q) == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        if len(q) < faiss.omp_get_max_threads():
            # Faiss parallelises over queries: a lone query gains nothing from a thread team, and on a busy
            # machine waking one costs more than the search (measured in benchmarks/index.py).
            with omp_threads(1):
                scores, ids = faiss_search(searched, q, k, sp)
        else:
            scores, ids = faiss_search(searched, q, k, sp)
        scores = np.where(ids >= 0, scores, 0.0)  # Faiss pads with -1 ids and +-FLT_MAX scores
        if self.metric == "ip":
            dist = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * scores))
        else:
            dist = np.sqrt(np.maximum(0.0, scores))
        dist = dist.astype(np.float32)
        dist[ids < 0] = np.inf
        if k > 1 and (dist[:, 1:] < dist[:, :-1]).any():
            # Approximate indexes may return near-ties out of order after the conversion; keep the contract.
            order = np.argsort(dist, axis=1, kind="stable")
            dist, ids = np.take_along_axis(dist, order, 1), np.take_along_axis(ids, order, 1)
        return dist, ids.astype(np.int64, copy=False)

    def use_device(self, device) -> bool:
        """Search on `device` from now on: a GPU copy of the Faiss index when the device is CUDA and Faiss has
        GPU support (faiss_gpu), else the CPU index. Per-search parameters (`params`) search the CPU index.
        Returns whether searches run on a GPU."""
        from retrieval.faiss_gpu import to_search_device

        self._gpu = to_search_device(self.index, device)
        self._device = device
        return self._gpu is not None

    @property
    def on_gpu(self) -> bool:
        return self._gpu is not None

    @property
    def search_device(self):
        """The device last given to use_device (None: never asked; searches run on the CPU unless on_gpu)."""
        return self._device

    def _refresh_gpu_copy(self) -> None:
        if self._gpu is not None:  # the copy holds the vectors and settings of when it was made
            self.use_device(self._device)

    def flat_vectors(self) -> np.ndarray | None:
        """The stored vectors of an exact (Flat) index, in the order of .ids; None for approximate indexes (their
        search is what their users get, so that is what gets evaluated)."""
        inner = faiss.downcast_index(self.index.index) if hasattr(self.index, "index") else None
        if isinstance(inner, faiss.IndexFlat) and inner.ntotal == len(self.ids):
            return inner.reconstruct_n(0, inner.ntotal)
        return None

    def set_search_params(self, params: str) -> None:
        """Faiss ParameterSpace settings, e.g. "nprobe=16" or "efSearch=128"; recorded in the metadata."""
        apply_search_params(self.index, params)
        self.meta["search_params"] = params
        self._refresh_gpu_copy()

    # -- growth --------------------------------------------------------------------------------------------------
    def add(self, embeddings, labels, classes: Sequence[str], sources: Sequence[str], data: Sequence[dict] = ()) -> np.ndarray:
        """Append vectors with fresh ids. `labels` index `classes` (the new data's class names): they are mapped
        to this index's classes by name, new names are appended. `data` entries (spec, filters, ...) are recorded
        in meta["data"] with the new id range. Returns the new ids."""
        x = _as_unit_float32(embeddings)
        if x.shape[1] != self.dimension:
            raise RetrievalError(f"embeddings have dimension {x.shape[1]} but the index holds {self.dimension}-d vectors")
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels) != len(x) or len(sources) != len(x):
            raise ValueError("embeddings, labels and sources must have the same length")
        mapping = np.array([self._class_id(c) for c in classes], dtype=np.int64)
        new_labels = mapping[labels] if len(labels) else labels
        start = int(self.meta.get("next_id", int(self.ids.max()) + 1 if len(self.ids) else 0))
        new_ids = np.arange(start, start + len(x), dtype=np.int64)
        if lists_on_disk(self.index):  # the mapped file belongs to the committed index: add to a copy in memory
            lists_to_memory(self.index)
            self.lists_file = None
        add_with_ids(self.index, x, new_ids)
        self.ids = np.concatenate([self.ids, new_ids])
        self.labels = np.concatenate([self.labels, new_labels])
        self.sources.extend(str(s) for s in sources)
        self._pos = None
        self._refresh_gpu_copy()
        self.meta["count"] = len(self)
        self.meta["next_id"] = start + len(x)
        self.meta["updated"] = _now()
        for entry in data:
            self.meta.setdefault("data", []).append({**entry, "ids": [int(start), int(start + len(x) - 1)]})
        return new_ids

    def _class_id(self, name: str) -> int:
        name = str(name)
        if name not in self.meta["classes"]:
            self.meta["classes"].append(name)
        return self.meta["classes"].index(name)


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
    ...). retrieval.index_build builds the same index from chunks (and across processes).
    """
    factory = normalize_factory(factory)
    code = metric_code(metric)
    x = _as_unit_float32(embeddings)
    labels = np.asarray(labels, dtype=np.int64)
    if len(x) == 0:
        raise RetrievalError("no embeddings to index")
    if len(labels) != len(x) or len(sources) != len(x):
        raise ValueError(f"embeddings ({len(x)}), labels ({len(labels)}) and sources ({len(sources)}) differ in length")
    if labels.min() < 0 or labels.max() >= len(classes):
        raise ValueError(f"labels must index classes (0..{len(classes) - 1})")
    try:
        sub = faiss.index_factory(x.shape[1], factory, code)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1]
        msg = msg.split(": ", 1)[-1] if "index_factory" in msg else msg
        raise UsageError(f"`factory` {factory!r}: Faiss cannot build it ({msg})") from None
    trained_on = None
    if needs_training(sub):
        size = default_train_size(sub) if train_size is None else int(train_size)
        sample = training_sample(len(x), size, seed)
        check_training_size(sub, factory, len(sample), available=len(x))
        train_index(sub, factory, x if len(sample) == len(x) else x[sample], seed, checked=True)
        trained_on = len(sample)
    index = faiss.IndexIDMap2(sub)
    if search_params is None:
        search_params = default_search_params(index)
    apply_search_params(index, search_params)
    ids = np.arange(len(x), dtype=np.int64)
    add_with_ids(index, x, ids)
    full_meta = new_index_meta(factory, metric, int(x.shape[1]), int(index.ntotal), len(x), classes, search_params,
                               seed, trained_on, **meta)
    return EmbeddingIndex(index, full_meta, ids, labels, [str(s) for s in sources])


def new_index_meta(factory: str, metric: str, dimension: int, count: int, next_id: int, classes: Sequence[str],
                   search_params: str, seed: int, trained_on: int | None, **meta) -> dict:
    """The metadata of a freshly built index (extra keyword arguments: tower, data, preprocessing, ...)."""
    full_meta = {
        "format": FORMAT,
        "factory": factory,
        "metric": metric,
        "dimension": int(dimension),
        "count": int(count),
        "next_id": int(next_id),
        "classes": [str(c) for c in classes],
        "search_params": search_params,
        "seed": int(seed),
        **({"train_size": int(trained_on)} if trained_on is not None else {}),
        "created": _now(),
        "tool_version": retrieval.__version__,
        "faiss_version": faiss.__version__,
    }
    for key, value in meta.items():
        if key in STRUCTURAL_KEYS:
            raise ValueError(f"metadata key {key!r} is set by build_index")
        full_meta[key] = value
    return full_meta


# -- files ------------------------------------------------------------------------------------------------------
def _remove_unreferenced(folder: Path, keep: set[str]) -> None:
    """Delete our own data/temp files that meta.json no longer names (old versions, leftovers of killed saves)."""
    for p in folder.iterdir():
        if p.name not in keep and _is_own_file(p.name):
            p.unlink(missing_ok=True)


def _is_own_file(name: str) -> bool:
    return bool(_OWN_FILE.match(name) or _TOWER_FILE.match(name) or _TOWER_TEMP.match(name))


def is_index_folder_content(name: str) -> bool:
    """True for the files an index folder may hold (used to refuse writing an index into an unrelated folder)."""
    return name in (META_NAME, ".lock") or _is_own_file(name)


def tower_files(meta: dict) -> dict[str, str]:
    """{"weights"|"sidecar"|"card": file name} of the tower copy an index's metadata names ({} for indexes written
    before towers were copied); names that are not plain tower-<fp>.* file names are refused."""
    files = (meta.get("tower") or {}).get("files") if isinstance(meta.get("tower"), dict) else None
    if not isinstance(files, dict):
        return {}
    out = {}
    for kind in TOWER_KINDS:
        name = files.get(kind)
        if name is None:
            continue
        if not isinstance(name, str) or not _TOWER_FILE.match(name) or not name.endswith(TOWER_KINDS[kind]):
            raise RetrievalError(f"index metadata names tower file {name!r} for its {kind}; expected "
                                 f"tower-<hex>{TOWER_KINDS[kind]} in the index folder")
        out[kind] = name
    return out


def _copy_file(source: Path, target: Path) -> None:
    with atomic_path(target) as tmp:
        with open(source, "rb") as src, open(tmp, "wb") as dst:
            for block in iter(lambda: src.read(1 << 20), b""):
                dst.write(block)


def _save_tower_files(index: EmbeddingIndex, folder: Path) -> set[str]:
    """Make `folder` hold the tower files the metadata names, each written atomically. Weights and sidecar: kept
    when already there with the recorded SHA-256, else copied from the folder the index was loaded from, else from
    the checkpoint it was built with (any source verified by SHA-256). The card: the run's card of a fresh build,
    else kept or copied like the others, else rendered from the sidecar. Returns the file names."""
    from retrieval.cards import checkpoint_card

    names = tower_files(index.meta)
    if not names:
        return set()
    info = index.meta["tower"]
    files = info["files"]
    original = Path(str(info["checkpoint"])) if info.get("checkpoint") else None
    loaded_from = Path(index.folder) if index.folder is not None else None
    for kind in ("weights", "sidecar"):
        if kind not in names:
            continue
        name, want = names[kind], files.get(f"{kind}_sha256")
        candidates = [folder / name] + ([loaded_from / name] if loaded_from else [])
        if original is not None:
            candidates.append(original.with_suffix(TOWER_KINDS[kind]))
        source = next((p for p in candidates if p.is_file() and (want is None or sha256_file(p) == want)), None)
        if source is None:
            raise RetrievalError(
                f"cannot write the index into {folder}: its tower's {kind} ({name}, fingerprint "
                f"{str(info.get('fingerprint'))[:12]}) is neither in the folder nor at {original} any more"
            )
        if source != folder / name:
            _copy_file(source, folder / name)
    if "card" in names:
        target = folder / names["card"]
        copy = loaded_from / names["card"] if loaded_from else None
        if loaded_from is None and original is not None and original.is_file():
            with atomic_path(target) as tmp:  # a fresh build: the run's card as it is now
                tmp.write_text(checkpoint_card(original), encoding="utf-8")
        elif target.is_file():
            pass
        elif copy is not None and copy.is_file():
            _copy_file(copy, target)
        elif "weights" in names:
            with atomic_path(target) as tmp:
                tmp.write_text(checkpoint_card(folder / names["weights"]), encoding="utf-8")
    return set(names.values())


def save_index(index: EmbeddingIndex, folder: str | os.PathLike, *, locked: bool = False) -> Path:
    """Write `index` into `folder` atomically (see the module docstring); returns the meta.json path.

    Holds exclusive_lock(folder) unless `locked` says the caller already holds it (e.g. across a whole build).
    """
    folder = Path(folder)
    if not locked:
        with exclusive_lock(folder):
            return save_index(index, folder, locked=True)
    tower_names = _save_tower_files(index, folder)
    token = uuid.uuid4().hex[:16]
    faiss_name, items_name = f"index-{token}.faiss", f"items-{token}.npz"
    lists = _save_lists(index, folder, token) if index.meta.get("on_disk") else {}
    with atomic_path(folder / faiss_name) as tmp:
        try:
            with faiss_quiet() if lists else contextlib.nullcontext():
                faiss.write_index(index.index, str(tmp))
        except RuntimeError as e:
            raise RetrievalError(f"cannot write {folder / faiss_name}: {str(e).strip().splitlines()[-1]}") from None
    write_items(folder / items_name, index.ids, index.labels, index.sources)
    meta = dict(index.meta)
    meta["count"] = len(index)
    meta["dimension"] = index.dimension
    meta["files"] = {
        "faiss": faiss_name,
        "faiss_sha256": sha256_file(folder / faiss_name),
        "items": items_name,
        "items_sha256": sha256_file(folder / items_name),
        **lists,
    }
    atomic_write_json(folder / META_NAME, meta)  # the commit point
    index.meta = meta
    index.folder = folder
    _remove_unreferenced(folder, {faiss_name, items_name, *([lists["lists"]] if lists else []), *tower_names})
    return folder / META_NAME


_LISTS_NAME = re.compile(r"^lists-[0-9a-f]+\.ivfdata$")


def _save_lists(index: EmbeddingIndex, folder: Path, token: str) -> dict:
    """The on-disk inverted lists of an index being saved into `folder`: the file it maps when that file is in
    the folder and unchanged (a fresh build wrote it there), else a new file lists-<token>.ivfdata written from
    its lists (in memory after an add, or mapped from another folder). Returns the meta["files"] entries."""
    current = index.lists_file
    known = index.meta.get("files") or {}
    if (current is not None and lists_on_disk(index.index) and current.is_file()
            and current.parent.resolve() == folder.resolve()):
        sha = known.get("lists_sha256") if known.get("lists") == current.name else None
        return {"lists": current.name, "lists_bytes": current.stat().st_size, "lists_sha256": sha or sha256_file(current)}
    path = folder / f"lists-{token}.ivfdata"
    size = write_lists(index.index, path)
    index.lists_file = path
    return {"lists": path.name, "lists_bytes": size, "lists_sha256": sha256_file(path)}


def read_index_meta(folder: str | os.PathLike) -> dict:
    """meta.json of an index folder, checked for the keys every reader relies on."""
    folder = Path(folder)
    if not folder.exists():
        raise RetrievalError(f"index folder not found: {folder}")
    if not folder.is_dir():
        raise RetrievalError(f"{folder} is not an index folder (expected a folder holding {META_NAME})")
    path = folder / META_NAME
    meta = read_json(path, "index metadata")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise RetrievalError(f"{path} is not retrieval index metadata (format {FORMAT!r} expected)")
    required = ("files", "factory", "metric", "dimension", "count", "classes")
    missing = [k for k in required if k not in meta]
    files = meta.get("files")
    if not missing and not (isinstance(files, dict) and isinstance(files.get("faiss"), str) and isinstance(files.get("items"), str)):
        missing.append("files.faiss/files.items")
    if missing:
        raise RetrievalError(f"{path} is incomplete: missing {', '.join(missing)}")
    return meta


def _load_files(folder: Path, meta: dict) -> EmbeddingIndex:
    meta_path = folder / META_NAME
    files = meta["files"]
    faiss_path, items_path = folder / files["faiss"], folder / files["items"]
    lists_name = files.get("lists")
    if lists_name is not None and not (isinstance(lists_name, str) and _LISTS_NAME.match(lists_name)):
        raise RetrievalError(f"{meta_path} names the inverted lists file {lists_name!r}; expected lists-<hex>.ivfdata")
    lists_path = folder / lists_name if lists_name else None
    for path, what in ((faiss_path, "index file"), (items_path, "index items file"),
                       (lists_path, "on-disk inverted lists file")):
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"{what} not found: {path} (named by {meta_path})")
    for path, key in ((faiss_path, "faiss_sha256"), (items_path, "items_sha256")):
        if files.get(key) and sha256_file(path) != files[key]:
            raise RetrievalError(f"{path} is corrupt or was changed: its SHA-256 does not match {meta_path}")
    if lists_path is not None and files.get("lists_bytes") is not None \
            and lists_path.stat().st_size != files["lists_bytes"]:
        # the lists are not hashed at every load (they may be larger than memory); their size is checked
        raise RetrievalError(f"{lists_path} is corrupt or was changed: it holds {lists_path.stat().st_size:,} bytes, "
                             f"{meta_path} says {files['lists_bytes']:,}")
    try:
        if lists_path is None:
            index = faiss.read_index(str(faiss_path))
        else:  # the lists file is memory-mapped read-only, found beside the .faiss file wherever the folder is
            with faiss_quiet():
                index = faiss.read_index(str(faiss_path), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError as e:
        raise RetrievalError(f"{faiss_path} is not a readable Faiss index ({str(e).strip().splitlines()[-1]})") from None
    if lists_path is not None:
        disk = faiss.downcast_InvertedLists(index_ivf(index).invlists) if index_ivf(index) is not None else None
        if not isinstance(disk, faiss.OnDiskInvertedLists) or Path(disk.filename).name != lists_name:
            raise RetrievalError(f"{faiss_path} does not use the inverted lists file {lists_name} that {meta_path} "
                                 "names")
        no_prefetch(index)
    if not isinstance(index, faiss.IndexIDMap2):
        raise RetrievalError(f"{faiss_path} is a {type(index).__name__}, expected an IndexIDMap2 (stable ids)")
    if index.d != meta["dimension"]:
        raise RetrievalError(
            f"{meta_path} says dimension {meta['dimension']} but {faiss_path} holds {index.d}-d vectors"
        )
    if index.ntotal != meta["count"]:
        raise RetrievalError(f"{meta_path} says {meta['count']} vectors but {faiss_path} holds {index.ntotal}")
    if meta["metric"] not in METRICS or index.metric_type != METRICS[meta["metric"]]:
        raise RetrievalError(f"{meta_path} says metric {meta['metric']!r} but {faiss_path} uses another metric")
    ids, labels, sources = read_items(items_path)
    if not (len(ids) == len(labels) == len(sources) == index.ntotal):
        raise RetrievalError(
            f"{items_path} lists {len(ids)} ids / {len(labels)} labels / {len(sources)} sources "
            f"but {faiss_path} holds {index.ntotal} vectors"
        )
    if not np.array_equal(ids, faiss.vector_to_array(index.id_map)):
        raise RetrievalError(f"{items_path}: its ids differ from the ids stored in {faiss_path}")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(meta["classes"])):
        raise RetrievalError(f"{items_path}: labels out of range for the {len(meta['classes'])} classes in {meta_path}")
    apply_search_params(index, meta.get("search_params") or "")
    loaded = EmbeddingIndex(index, meta, ids, labels, sources)
    loaded.folder = folder
    loaded.lists_file = lists_path
    return loaded


def load_index(folder: str | os.PathLike) -> EmbeddingIndex:
    """Load an index folder, checking meta.json against the Faiss and items files (clear error naming the file)."""
    folder = Path(folder)
    for attempt in range(3):
        meta = read_index_meta(folder)
        try:
            return _load_files(folder, meta)
        except FileNotFoundError as e:
            # A concurrent save may have committed a new version and deleted the files we were about to read.
            if attempt < 2 and read_index_meta(folder).get("files") != meta["files"]:
                continue
            raise RetrievalError(str(e)) from None
    raise AssertionError("unreachable")


# IndexIDMap2 keeps a hash map from id to position beside its id array: about this many bytes per vector.
REV_MAP_BYTES = 40


def index_sizes(index: EmbeddingIndex) -> dict:
    """Bytes of the index: on disk, per file of its folder (faiss, items, lists, tower) and in total; and about how
    much memory it takes loaded (the Faiss structures as written, the items arrays, the id map's hash map), with
    the on-disk inverted lists apart (memory-mapped: paged in as searched, never all resident unless read all)."""
    folder = Path(index.folder) if index.folder is not None else None
    files = index.meta.get("files") or {}
    disk: dict[str, int] = {}
    if folder is not None:
        for key in ("faiss", "items", "lists"):
            if files.get(key) and (folder / files[key]).is_file():
                disk[key] = (folder / files[key]).stat().st_size
        tower = sum((folder / name).stat().st_size for name in tower_files(index.meta).values()
                    if (folder / name).is_file())
        if tower:
            disk["tower"] = tower
    sources = index.sources.arrays()
    items_memory = int(index.ids.nbytes + index.labels.nbytes + sum(a.nbytes for a in sources.values()))
    faiss_memory = disk.get("faiss")
    if faiss_memory is None:  # not saved: measure the serialized form
        with faiss_quiet() if lists_on_disk(index.index) else contextlib.nullcontext():
            faiss_memory = int(faiss.serialize_index(index.index).nbytes)
    memory = faiss_memory + items_memory + REV_MAP_BYTES * len(index)
    return {
        "disk": {**disk, "total": sum(disk.values())},
        "memory": {"index": faiss_memory, "items": items_memory, "id_map": REV_MAP_BYTES * len(index),
                   "total": memory},
        "mapped": disk.get("lists", 0),  # on-disk inverted lists: mapped, not loaded
    }


def update_index_meta(folder: str | os.PathLike, **changes) -> dict:
    """Atomically rewrite meta.json with `changes` (a value of None deletes the key); returns the new metadata.

    For annotations such as `calibration={"max_distance": 0.8, ...}`; keys describing the stored files
    (format, files, factory, metric, dimension, count, next_id, classes) cannot be changed this way.
    """
    folder = Path(folder)
    bad = [k for k in changes if k in STRUCTURAL_KEYS]
    if bad:
        raise ValueError(f"update_index_meta cannot change {', '.join(bad)}; rebuild or use index add")
    with exclusive_lock(folder):
        meta = read_index_meta(folder)
        for key, value in changes.items():
            if value is None:
                meta.pop(key, None)
            else:
                meta[key] = value
        meta["updated"] = _now()
        atomic_write_json(folder / META_NAME, meta)
    return meta


def load_index_tower(index: EmbeddingIndex, device="cpu", checkpoint: str | os.PathLike | None = None):
    """The Checkpoint whose tower built `index`, verified by fingerprint and embedding size: `checkpoint` when given,
    else the copy in the index folder, else (indexes written before towers were copied) the checkpoint path the
    metadata names, with a hint to rebuild."""
    info = index.meta.get("tower") or {}
    names = tower_files(index.meta)
    folder = Path(index.folder) if index.folder is not None else None
    old_format = not names
    hint = (f"the index {folder or ''} was written by an earlier version that did not copy its tower into the folder; "
            "rebuild it with `retrieval index build` (or add to it with `retrieval index add`) so that it carries "
            "its tower and works wherever the folder is copied")
    if checkpoint is not None:
        ckpt = load_checkpoint(checkpoint, device=device)
        check_tower_matches(index, ckpt)
        if old_format:
            logger.warning(f"note: {hint}")
        return ckpt
    if names.get("weights"):
        copy = folder / names["weights"] if folder is not None else None
        if copy is not None and copy.is_file():
            ckpt = load_checkpoint(copy, device=device)
            check_tower_matches(index, ckpt)
            return ckpt
        path = info.get("checkpoint")
        if not (path and Path(path).is_file()):
            where = f"{copy} is missing" if copy is not None else "the index was never saved"
            raise RetrievalError(f"the index's copy of its tower is gone ({where}) and so is the checkpoint it was "
                                 f"built with ({path}); give a copy of that checkpoint as `checkpoint`")
        logger.warning(f"the index's copy of its tower is missing ({copy}); using the checkpoint it was built with, "
                       f"{path}")
        ckpt = load_checkpoint(path, device=device)
        check_tower_matches(index, ckpt)
        return ckpt
    path = info.get("checkpoint")
    if not path:
        raise RetrievalError("the index metadata names no checkpoint; give it as `checkpoint`")
    if not Path(path).exists() and not Path(str(path) + ".safetensors").exists():
        raise RetrievalError(
            f"the checkpoint this index was built with is gone: {path}; give a copy of it as `checkpoint` "
            f"(this index predates self-contained index folders: rebuild it so it carries its tower)"
        )
    logger.warning(f"note: {hint}")
    ckpt = load_checkpoint(path, device=device)
    check_tower_matches(index, ckpt)
    return ckpt


def check_tower_matches(index: EmbeddingIndex, ckpt) -> None:
    """Raise a clear error unless `ckpt` holds the tower the index was built with."""
    tower_meta = index.meta.get("tower") or {}
    want = tower_meta.get("fingerprint")
    if ckpt.tower.embedding_size != index.dimension:
        raise RetrievalError(
            f"checkpoint {ckpt.path} embeds into {ckpt.tower.embedding_size} dimensions but the index holds "
            f"{index.dimension}-d vectors: it is not the tower this index was built with"
        )
    if want and ckpt.fingerprint != want:
        raise RetrievalError(
            f"checkpoint {ckpt.path} (fingerprint {ckpt.fingerprint[:12]}) is not the tower this index was built "
            f"with (fingerprint {want[:12]}, {tower_meta.get('checkpoint')})"
        )


def tower_meta(ckpt) -> dict:
    """The metadata block describing the tower (from a Checkpoint) that an index stores: name, size, fingerprint,
    the checkpoint it came from, and the names (and SHA-256) of the copies save_index puts in the index folder."""
    weights = Path(ckpt.path).resolve()
    sidecar = weights.with_suffix(".json")
    stem = f"tower-{ckpt.fingerprint[:16]}"
    try:
        recorded = read_json(sidecar, "checkpoint metadata").get("fingerprint")
    except (RetrievalError, AttributeError):
        recorded = None
    if recorded != ckpt.fingerprint:
        raise RetrievalError(f"{sidecar} changed while it was in use (another training run writing it?); try again")
    return {
        "name": ckpt.meta.get("tower", ckpt.tower.arch),
        "embedding_size": int(ckpt.tower.embedding_size),
        "fingerprint": ckpt.fingerprint,
        "checkpoint": str(weights),
        "files": {
            "weights": stem + TOWER_KINDS["weights"],
            "weights_sha256": sha256_file(weights),
            "sidecar": stem + TOWER_KINDS["sidecar"],
            "sidecar_sha256": sha256_file(sidecar),
            "card": stem + TOWER_KINDS["card"],
        },
    }


def class_prototypes(embeddings: np.ndarray, labels: np.ndarray, classes: Sequence[str]):
    """One unit vector per class present: the re-normalised mean embedding. Returns (vectors, labels, sources)."""
    labels = np.asarray(labels, np.int64)
    sums = np.zeros((len(classes), embeddings.shape[1]), np.float64)
    np.add.at(sums, labels, embeddings)
    return prototypes_from_sums(sums, np.bincount(labels, minlength=len(classes)), classes)


def prototypes_from_sums(sums: np.ndarray, counts: np.ndarray, classes: Sequence[str]):
    """class_prototypes from per-class sums (float64 (classes, d)) and counts of embeddings (e.g. accumulated a
    chunk at a time). Returns (vectors, labels, sources) of the classes present."""
    present = np.flatnonzero(np.asarray(counts) > 0)
    vectors = (sums[present] / np.asarray(counts)[present, None]).astype(np.float32)
    faiss.normalize_L2(vectors)
    sources = [f"prototype:{classes[c]} ({int(counts[c])} image{'s' if counts[c] != 1 else ''})" for c in present]
    return vectors, present.astype(np.int64), sources


def check_index_target(folder: str | os.PathLike) -> bool:
    """Refuse to write an index into a folder holding other things; returns whether the folder already existed."""
    folder = Path(folder)
    if not folder.exists():
        return False
    if not folder.is_dir():
        raise UsageError(f"`out` {folder} exists and is not a folder")
    foreign = [p.name for p in folder.iterdir() if not is_index_folder_content(p.name)]
    if foreign:
        raise UsageError(
            f"`out` {folder} holds other files ({', '.join(sorted(foreign)[:3])}{', ...' if len(foreign) > 3 else ''}); "
            "choose a new or empty folder, or an existing index folder to replace it"
        )
    return True
