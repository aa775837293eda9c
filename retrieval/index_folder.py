"""An index folder: what it holds, and reading, checking and writing it (IndexFolder).

    meta.json               factory, metric, dimension, count, classes, tower, data, files, checksums, ...
    index-<token>.faiss     the Faiss index (always an IndexIDMap2, so ids survive appends)
    items-<token>.npz       per id: label (index into meta["classes"]) and source ("mnist:train[12]", a path, ...)
                            as arrays (retrieval.items)
    lists-<token>.ivfdata   with `on_disk` (IVF only): the inverted lists, memory-mapped read-only when loaded
    tower-<fp>.*            a copy of the tower that embedded the vectors (retrieval.index_tower)
    .lock                   held by writers (retrieval.fsutil.exclusive_lock), so two builds never interleave

Saving writes the tower files (unless the folder already holds them, byte for byte) and the data files under
fresh names (an on-disk lists file the index already maps in this folder is kept: a build writes it there, under a
temp name until complete), then atomically replaces meta.json (the commit point), then deletes the files the old
meta.json named. A committed lists file is never written to: adding to an on-disk index copies its lists.
A crash at any moment leaves either the old or the new index whole. Folders written by earlier versions (items as
JSON, the tower named by path only) still load (retrieval.index_legacy).
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from pathlib import Path

import faiss
import numpy as np

from retrieval.embedding_index import STRUCTURAL_KEYS, EmbeddingIndex, FORMAT, now
from retrieval.errors import RetrievalError, UsageError
from retrieval.faiss_tools import (
    METRICS, apply_search_params, faiss_quiet, index_ivf, lists_on_disk, no_prefetch, write_lists,
)
from retrieval.fsutil import LOCK_NAME, atomic_path, atomic_write_json, exclusive_lock, read_json, sha256_file
from retrieval.index_tower import TOWER_FILE, TOWER_TEMP, copy_tower_files, tower_files
from retrieval.items import read_items, write_items

META_NAME = "meta.json"
# Data files: the Faiss index, the items (.npz; .json in folders written before), the on-disk inverted lists.
_DATA_FILE = r"(index-[0-9a-f]+\.faiss|items-[0-9a-f]+\.(json|npz)|lists-[0-9a-f]+\.ivfdata)"
_OWN_FILE = re.compile(rf"^({_DATA_FILE}|\.({_DATA_FILE}|meta\.json)\..*\.tmp)$")
LISTS_NAME = re.compile(r"^lists-[0-9a-f]+\.ivfdata$")
# The keys every reader relies on.
REQUIRED_KEYS = ("files", "factory", "metric", "dimension", "count", "classes")
# IndexIDMap2 keeps a hash map from id to position beside its id array: about this many bytes per vector.
REV_MAP_BYTES = 40


def is_own_file(name: str) -> bool:
    """A data, tower or temp file an index folder writes (deleted once meta.json no longer names it)."""
    return bool(_OWN_FILE.match(name) or TOWER_FILE.match(name) or TOWER_TEMP.match(name))


def is_index_folder_content(name: str) -> bool:
    """True for the files an index folder may hold (used to refuse writing an index into an unrelated folder)."""
    return name in (META_NAME, LOCK_NAME) or is_own_file(name)


class IndexFolder:
    """One index folder on disk: its files' names, and loading, verifying, saving and annotating the index in it.

        folder = IndexFolder("indexes/run-mnist-train")
        index = folder.load()                  # meta.json checked against the Faiss, items and lists files
        folder.save(index)                     # atomically, under the folder's lock
        folder.update_meta(calibration={...})
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"IndexFolder({str(self.path)!r})"

    # -- layout ----------------------------------------------------------------------------------------------
    @property
    def meta_path(self) -> Path:
        return self.path / META_NAME

    def file(self, name: str) -> Path:
        """A file of the folder, by the name meta.json gives it."""
        return self.path / name

    def holds_index(self) -> bool:
        """Whether the folder holds a committed index (its meta.json)."""
        return self.meta_path.is_file()

    def missing_tower_files(self, meta: dict) -> list[str]:
        """The tower files the metadata names (weights and sidecar: what queries need) that are not here."""
        return [name for kind, name in tower_files(meta).items() if kind != "card" and not self.file(name).is_file()]

    def lock(self):
        """exclusive_lock on the folder (creating it): held by every writer."""
        return exclusive_lock(self.path)

    # -- the target of a build ---------------------------------------------------------------------------------
    def check_target(self) -> bool:
        """Refuse to write an index into a folder holding other things; returns whether the folder already existed."""
        if not self.path.exists():
            return False
        if not self.path.is_dir():
            raise UsageError(f"`out` {self.path} exists and is not a folder")
        foreign = [p.name for p in self.path.iterdir() if not is_index_folder_content(p.name)]
        if foreign:
            raise UsageError(
                f"`out` {self.path} holds other files ({', '.join(sorted(foreign)[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}); "
                "choose a new or empty folder, or an existing index folder to replace it"
            )
        return True

    def remove_if_unused(self) -> None:
        """Remove the folder when it holds nothing but the lock (a build that created it failed)."""
        if self.path.is_dir() and {p.name for p in self.path.iterdir()} <= {LOCK_NAME}:
            (self.path / LOCK_NAME).unlink(missing_ok=True)
            self.path.rmdir()

    # -- reading -----------------------------------------------------------------------------------------------
    def read_meta(self) -> dict:
        """meta.json, checked for the keys every reader relies on."""
        if not self.path.exists():
            raise RetrievalError(f"index folder not found: {self.path}")
        if not self.path.is_dir():
            raise RetrievalError(f"{self.path} is not an index folder (expected a folder holding {META_NAME})")
        path = self.meta_path
        meta = read_json(path, "index metadata")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise RetrievalError(f"{path} is not retrieval index metadata (format {FORMAT!r} expected)")
        missing = [k for k in REQUIRED_KEYS if k not in meta]
        files = meta.get("files")
        if not missing and not (isinstance(files, dict) and isinstance(files.get("faiss"), str)
                                and isinstance(files.get("items"), str)):
            missing.append("files.faiss/files.items")
        if missing:
            raise RetrievalError(f"{path} is incomplete: missing {', '.join(missing)}")
        return meta

    def load(self) -> EmbeddingIndex:
        """The index, meta.json checked against the Faiss and items files (clear errors naming the file)."""
        for attempt in range(3):
            meta = self.read_meta()
            try:
                return self._load_files(meta)
            except FileNotFoundError as e:
                # A concurrent save may have committed a new version and deleted the files we were about to read.
                if attempt < 2 and self.read_meta().get("files") != meta["files"]:
                    continue
                raise RetrievalError(str(e)) from None
        raise AssertionError("unreachable")

    def _load_files(self, meta: dict) -> EmbeddingIndex:
        faiss_path, items_path, lists_path = self.verify(meta)
        index = self._read_faiss(meta, faiss_path, lists_path)
        ids, labels, sources = read_items(items_path)
        _check_items(meta, self.meta_path, items_path, faiss_path, index, (ids, labels, sources))
        apply_search_params(index, meta.get("search_params") or "")
        loaded = EmbeddingIndex(index, meta, ids, labels, sources)
        loaded.folder = self.path
        loaded.lists_file = lists_path
        return loaded

    def verify(self, meta: dict) -> tuple[Path, Path, Path | None]:
        """The Faiss, items and lists files `meta` names, checked to be there and unchanged (SHA-256 of the Faiss
        and items files; the lists' size: they may be larger than memory, so they are not hashed at every load)."""
        files = meta["files"]
        faiss_path, items_path = self.file(files["faiss"]), self.file(files["items"])
        lists_name = files.get("lists")
        if lists_name is not None and not (isinstance(lists_name, str) and LISTS_NAME.match(lists_name)):
            raise RetrievalError(f"{self.meta_path} names the inverted lists file {lists_name!r}; "
                                 "expected lists-<hex>.ivfdata")
        lists_path = self.file(lists_name) if lists_name else None
        for path, what in ((faiss_path, "index file"), (items_path, "index items file"),
                           (lists_path, "on-disk inverted lists file")):
            if path is not None and not path.is_file():
                raise FileNotFoundError(f"{what} not found: {path} (named by {self.meta_path})")
        for path, key in ((faiss_path, "faiss_sha256"), (items_path, "items_sha256")):
            if files.get(key) and sha256_file(path) != files[key]:
                raise RetrievalError(f"{path} is corrupt or was changed: its SHA-256 does not match {self.meta_path}")
        if lists_path is not None and files.get("lists_bytes") is not None \
                and lists_path.stat().st_size != files["lists_bytes"]:
            raise RetrievalError(f"{lists_path} is corrupt or was changed: it holds {lists_path.stat().st_size:,} "
                                 f"bytes, {self.meta_path} says {files['lists_bytes']:,}")
        return faiss_path, items_path, lists_path

    def _read_faiss(self, meta: dict, faiss_path: Path, lists_path: Path | None) -> faiss.Index:
        """The Faiss index (its on-disk lists mapped read-only), checked against the metadata."""
        try:
            if lists_path is None:
                index = faiss.read_index(str(faiss_path))
            else:  # the lists file is memory-mapped read-only, found beside the .faiss file wherever the folder is
                with faiss_quiet():
                    index = faiss.read_index(str(faiss_path), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError as e:
            raise RetrievalError(f"{faiss_path} is not a readable Faiss index "
                                 f"({str(e).strip().splitlines()[-1]})") from None
        if lists_path is not None:
            disk = faiss.downcast_InvertedLists(index_ivf(index).invlists) if index_ivf(index) is not None else None
            if not isinstance(disk, faiss.OnDiskInvertedLists) or Path(disk.filename).name != lists_path.name:
                raise RetrievalError(f"{faiss_path} does not use the inverted lists file {lists_path.name} that "
                                     f"{self.meta_path} names")
            no_prefetch(index)
        _check_faiss(meta, self.meta_path, faiss_path, index)
        return index

    # -- writing -----------------------------------------------------------------------------------------------
    def save(self, index: EmbeddingIndex, *, locked: bool = False) -> Path:
        """Write `index` here atomically (see the module docstring); returns the meta.json path.

        Holds the folder's lock unless `locked` says the caller already holds it (e.g. across a whole build)."""
        if not locked:
            with self.lock():
                return self.save(index, locked=True)
        tower_names = copy_tower_files(index, self.path)
        files = self._write_data(index, uuid.uuid4().hex[:16])
        meta = {**index.meta, "count": len(index), "dimension": index.dimension, "files": files}
        atomic_write_json(self.meta_path, meta)  # the commit point
        index.meta = meta
        index.folder = self.path
        self._remove_unreferenced({files["faiss"], files["items"], *([files["lists"]] if "lists" in files else []),
                                   *tower_names})
        return self.meta_path

    def _write_data(self, index: EmbeddingIndex, token: str) -> dict:
        """The Faiss, items (and lists) files under fresh names; returns the meta["files"] entries."""
        faiss_name, items_name = f"index-{token}.faiss", f"items-{token}.npz"
        lists = self._save_lists(index, token) if index.meta.get("on_disk") else {}
        with atomic_path(self.file(faiss_name)) as tmp:
            try:
                with faiss_quiet() if lists else contextlib.nullcontext():
                    faiss.write_index(index.index, str(tmp))
            except RuntimeError as e:
                raise RetrievalError(f"cannot write {self.file(faiss_name)}: "
                                     f"{str(e).strip().splitlines()[-1]}") from None
        write_items(self.file(items_name), index.ids, index.labels, index.sources)
        return {"faiss": faiss_name, "faiss_sha256": sha256_file(self.file(faiss_name)),
                "items": items_name, "items_sha256": sha256_file(self.file(items_name)), **lists}

    def _save_lists(self, index: EmbeddingIndex, token: str) -> dict:
        """The on-disk inverted lists of an index being saved here: the file it maps when that file is in this
        folder and unchanged (a fresh build wrote it here), else a new file lists-<token>.ivfdata written from its
        lists (in memory after an add, or mapped from another folder). Returns the meta["files"] entries."""
        current = index.lists_file
        known = index.meta.get("files") or {}
        if (current is not None and lists_on_disk(index.index) and current.is_file()
                and current.parent.resolve() == self.path.resolve()):
            sha = known.get("lists_sha256") if known.get("lists") == current.name else None
            return {"lists": current.name, "lists_bytes": current.stat().st_size,
                    "lists_sha256": sha or sha256_file(current)}
        path = self.file(f"lists-{token}.ivfdata")
        size = write_lists(index.index, path)
        index.lists_file = path
        return {"lists": path.name, "lists_bytes": size, "lists_sha256": sha256_file(path)}

    def _remove_unreferenced(self, keep: set[str]) -> None:
        """Delete our own data/temp files that meta.json no longer names (old versions, leftovers of killed saves)."""
        for p in self.path.iterdir():
            if p.name not in keep and is_own_file(p.name):
                p.unlink(missing_ok=True)

    def update_meta(self, **changes) -> dict:
        """Atomically rewrite meta.json with `changes` (a value of None deletes the key); returns the new metadata.

        For annotations such as `calibration={"max_distance": 0.8, ...}`; keys describing the stored files
        (format, files, factory, metric, dimension, count, next_id, classes) cannot be changed this way."""
        bad = [k for k in changes if k in STRUCTURAL_KEYS]
        if bad:
            raise ValueError(f"update_index_meta cannot change {', '.join(bad)}; rebuild or use index add")
        with self.lock():
            meta = self.read_meta()
            for key, value in changes.items():
                if value is None:
                    meta.pop(key, None)
                else:
                    meta[key] = value
            meta["updated"] = now()
            atomic_write_json(self.meta_path, meta)
        return meta

    # -- sizes -------------------------------------------------------------------------------------------------
    def file_sizes(self, meta: dict) -> dict[str, int]:
        """Bytes on disk per file of the index `meta` describes (faiss, items, lists, tower), where present."""
        files = meta.get("files") or {}
        disk = {key: self.file(files[key]).stat().st_size for key in ("faiss", "items", "lists")
                if files.get(key) and self.file(files[key]).is_file()}
        tower = sum(self.file(name).stat().st_size for name in tower_files(meta).values() if self.file(name).is_file())
        if tower:
            disk["tower"] = tower
        return disk


def _check_faiss(meta: dict, meta_path: Path, faiss_path: Path, index: faiss.Index) -> None:
    if not isinstance(index, faiss.IndexIDMap2):
        raise RetrievalError(f"{faiss_path} is a {type(index).__name__}, expected an IndexIDMap2 (stable ids)")
    if index.d != meta["dimension"]:
        raise RetrievalError(f"{meta_path} says dimension {meta['dimension']} but {faiss_path} holds {index.d}-d "
                             "vectors")
    if index.ntotal != meta["count"]:
        raise RetrievalError(f"{meta_path} says {meta['count']} vectors but {faiss_path} holds {index.ntotal}")
    if meta["metric"] not in METRICS or index.metric_type != METRICS[meta["metric"]]:
        raise RetrievalError(f"{meta_path} says metric {meta['metric']!r} but {faiss_path} uses another metric")


def _check_items(meta: dict, meta_path: Path, items_path: Path, faiss_path: Path, index: faiss.Index,
                 items: tuple) -> None:
    ids, labels, sources = items
    if not (len(ids) == len(labels) == len(sources) == index.ntotal):
        raise RetrievalError(
            f"{items_path} lists {len(ids)} ids / {len(labels)} labels / {len(sources)} sources "
            f"but {faiss_path} holds {index.ntotal} vectors"
        )
    if not np.array_equal(ids, faiss.vector_to_array(index.id_map)):
        raise RetrievalError(f"{items_path}: its ids differ from the ids stored in {faiss_path}")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(meta["classes"])):
        raise RetrievalError(f"{items_path}: labels out of range for the {len(meta['classes'])} classes in {meta_path}")


def index_sizes(index: EmbeddingIndex) -> dict:
    """Bytes of the index: on disk, per file of its folder (faiss, items, lists, tower) and in total; and about how
    much memory it takes loaded (the Faiss structures as written, the items arrays, the id map's hash map), with
    the on-disk inverted lists apart (memory-mapped: paged in as searched, never all resident unless read all)."""
    disk = IndexFolder(index.folder).file_sizes(index.meta) if index.folder is not None else {}
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
