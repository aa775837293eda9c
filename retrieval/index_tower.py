"""The tower an index folder carries: the copy of the checkpoint that embedded its vectors, and the checks that a
tower is that one (fingerprint, embedding size).

    tower-<fp>.safetensors  the weights (<fp>: the start of the tower's fingerprint),
    tower-<fp>.json         its checkpoint sidecar,
    tower-<fp>.md           and its model card; meta["tower"]["files"] names them

so a copied folder (cp -r, rsync, tar) answers queries anywhere. Folders written before the tower was copied name
it by path only (retrieval.index_legacy).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from retrieval.checkpoint import load_checkpoint
from retrieval.embedding_index import EmbeddingIndex
from retrieval.errors import RetrievalError
from retrieval.fsutil import atomic_path, read_json, sha256_file
from retrieval.index_legacy import checkpoint_by_path, rebuild_hint

TOWER_KINDS = {"weights": ".safetensors", "sidecar": ".json", "card": ".md"}
# The copied tower's files (and their temp names while being written).
TOWER_FILE = re.compile(r"^tower-[0-9a-f]+\.(safetensors|json|md)$")
TOWER_TEMP = re.compile(r"^\.tower-[0-9a-f]+\.(safetensors|json|md)\..*\.tmp$")

logger = logging.getLogger(__name__)


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
        if not isinstance(name, str) or not TOWER_FILE.match(name) or not name.endswith(TOWER_KINDS[kind]):
            raise RetrievalError(f"index metadata names tower file {name!r} for its {kind}; expected "
                                 f"tower-<hex>{TOWER_KINDS[kind]} in the index folder")
        out[kind] = name
    return out


def tower_meta(ckpt) -> dict:
    """The metadata block describing the tower (from a Checkpoint) that an index stores: name, size, fingerprint,
    the checkpoint it came from, and the names (and SHA-256) of the copies saving puts in the index folder."""
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


def check_tower_matches(index: EmbeddingIndex, ckpt) -> None:
    """Raise a clear error unless `ckpt` holds the tower the index was built with."""
    tower = index.meta.get("tower") or {}
    want = tower.get("fingerprint")
    if ckpt.tower.embedding_size != index.dimension:
        raise RetrievalError(
            f"checkpoint {ckpt.path} embeds into {ckpt.tower.embedding_size} dimensions but the index holds "
            f"{index.dimension}-d vectors: it is not the tower this index was built with"
        )
    if want and ckpt.fingerprint != want:
        raise RetrievalError(
            f"checkpoint {ckpt.path} (fingerprint {ckpt.fingerprint[:12]}) is not the tower this index was built "
            f"with (fingerprint {want[:12]}, {tower.get('checkpoint')})"
        )


# -- loading ---------------------------------------------------------------------------------------------------
def load_index_tower(index: EmbeddingIndex, device="cpu", checkpoint: str | os.PathLike | None = None):
    """The Checkpoint whose tower built `index`, verified by fingerprint and embedding size: `checkpoint` when given,
    else the copy in the index folder, else (indexes written before towers were copied) the checkpoint path the
    metadata names, with a hint to rebuild."""
    folder = Path(index.folder) if index.folder is not None else None
    names = tower_files(index.meta)
    if checkpoint is not None:
        ckpt = _checked(index, checkpoint, device)
        if not names:
            logger.warning(f"note: {rebuild_hint(folder)}")
        return ckpt
    if names.get("weights"):
        return _checked(index, _copy_or_original(index, folder, names["weights"]), device)
    path = checkpoint_by_path(index.meta)
    logger.warning(f"note: {rebuild_hint(folder)}")
    return _checked(index, path, device)


def _checked(index: EmbeddingIndex, path, device):
    ckpt = load_checkpoint(path, device=device)
    check_tower_matches(index, ckpt)
    return ckpt


def _copy_or_original(index: EmbeddingIndex, folder: Path | None, weights: str) -> Path:
    """The folder's copy of the weights, else (with a warning) the checkpoint the index was built with."""
    copy = folder / weights if folder is not None else None
    if copy is not None and copy.is_file():
        return copy
    path = (index.meta.get("tower") or {}).get("checkpoint")
    if not (path and Path(path).is_file()):
        where = f"{copy} is missing" if copy is not None else "the index was never saved"
        raise RetrievalError(f"the index's copy of its tower is gone ({where}) and so is the checkpoint it was "
                             f"built with ({path}); give a copy of that checkpoint as `checkpoint`")
    logger.warning(f"the index's copy of its tower is missing ({copy}); using the checkpoint it was built with, "
                   f"{path}")
    return Path(path)


# -- saving ----------------------------------------------------------------------------------------------------
def copy_tower_files(index: EmbeddingIndex, folder: Path) -> set[str]:
    """Make `folder` hold the tower files the metadata names, each written atomically. Weights and sidecar: kept
    when already there with the recorded SHA-256, else copied from the folder the index was loaded from, else from
    the checkpoint it was built with (any source verified by SHA-256). The card: the run's card of a fresh build,
    else kept or copied like the others, else rendered from the sidecar. Returns the file names."""
    names = tower_files(index.meta)
    if not names:
        return set()
    for kind in ("weights", "sidecar"):
        if kind in names:
            _copy_verified(index, folder, kind, names[kind])
    if "card" in names:
        _write_card(index, folder, names)
    return set(names.values())


def _original(index: EmbeddingIndex) -> Path | None:
    """The checkpoint the index was built with, where it was then."""
    info = index.meta["tower"]
    return Path(str(info["checkpoint"])) if info.get("checkpoint") else None


def _copy_verified(index: EmbeddingIndex, folder: Path, kind: str, name: str) -> None:
    info = index.meta["tower"]
    want = info["files"].get(f"{kind}_sha256")
    original = _original(index)
    candidates = [folder / name] + ([Path(index.folder) / name] if index.folder is not None else [])
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


def _write_card(index: EmbeddingIndex, folder: Path, names: dict[str, str]) -> None:
    from retrieval.cards import checkpoint_card

    original = _original(index)
    loaded_from = Path(index.folder) if index.folder is not None else None
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


def _copy_file(source: Path, target: Path) -> None:
    with atomic_path(target) as tmp:
        with open(source, "rb") as src, open(tmp, "wb") as dst:
            for block in iter(lambda: src.read(1 << 20), b""):
                dst.write(block)
