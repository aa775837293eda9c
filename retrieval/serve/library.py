"""The service's calls into the retrieval library, kept in a few named functions.

Everything `retrieval serve` does with an index or a tower goes through this module (open an index with its
tower, describe it as `index info --json` does, decode an upload with the CLI's pixel budget and preprocessing,
embed, answer queries as `retrieval query --json` does, add labelled images as `retrieval index add` does, find
a reference's stored image), so the service can be re-pointed to another layer by editing these functions only.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import re
import time
import uuid
import warnings
from pathlib import Path
from typing import Callable, Sequence

import faiss
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from retrieval.data.preprocess import PREPROCESSING, check_pixel_budget, preprocess_image, unreadable_message
from retrieval.errors import RetrievalError
from retrieval.faiss_tools import search_parameters
from retrieval.fsutil import atomic_write_bytes, exclusive_lock
from retrieval.grid import SourceImages
from retrieval.index import check_tower_matches, index_sizes, load_index, load_index_tower, read_index_meta
from retrieval.query import UNKNOWN, Searcher
from retrieval.workflows import append_embeddings

# Class names taught through the service become folder names under the uploads folder (folder:DIR specs).
LABEL_PATTERN = re.compile(r"^[^\W_][\w .+\-]{0,39}$")


class ServiceError(RetrievalError):
    """A request the service refuses, with the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# -- opening and describing ---------------------------------------------------------------------------------------
def open_index(folder, *, device: str = "cpu", checkpoint=None, max_distance: float | None = None,
               batch_size: int | None = None):
    """(Searcher, Checkpoint) for an index folder: its tower loaded once and checked by fingerprint."""
    index = load_index(folder)
    ckpt = load_index_tower(index, device=device, checkpoint=checkpoint)
    return Searcher(index, ckpt.tower, device=device, max_distance=max_distance, batch_size=batch_size), ckpt


def searcher_for(searcher, index=None, max_distance: float | None = None):
    """A Searcher sharing `searcher`'s tower, on `index` (default: the same index) with the distance threshold
    `max_distance` (None: the index's calibrated threshold, if any); the tower `searcher` prepared for embedding
    is reused, not copied again for every batch that names a threshold."""
    return Searcher(searcher.index if index is None else index, searcher.tower, device=searcher.device,
                    max_distance=max_distance, batch_size=searcher.batch_size,
                    prepared=(searcher.precision, searcher.embedding_tower))


def set_compute_threads(threads: int) -> dict:
    """Threads for the tower (torch's intra-op pool) and for Faiss (this thread's OpenMP team). A service answers
    small batches: on a few cores, one thread each beats thread teams that wake and spin for every request.
    Returns what the two libraries then report ({"torch": n, "faiss": n})."""
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    return {"torch": torch.get_num_threads(), "faiss": faiss.omp_get_max_threads()}


def index_info(folder_name: str, index) -> dict:
    """What `retrieval index info --json` prints: the metadata, the per-label counts and the sizes."""
    return {"folder": folder_name, "meta": index.meta, "label_counts": index.label_counts(),
            "sizes": index_sizes(index)}


# -- uploads --------------------------------------------------------------------------------------------------------
def open_upload(data: bytes, name: str) -> Image.Image:
    """Read an uploaded picture's header (not its pixels), refusing it when it is empty, not an image, or over the
    pixel budget ($RETRIEVAL_MAX_PIXELS, the CLI's limit) before anything is decoded. (Cheap, but not thread-safe:
    warnings.catch_warnings changes process-wide state; the service calls it on its event loop.)"""
    if not data:
        raise ServiceError(f"{name}: empty file, expected an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            check_pixel_budget(*img.size, name)
    except RetrievalError as e:
        raise ServiceError(str(e), 413) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ServiceError(f"{name}: over the pixel budget (decompression bomb?)", 413) from None
    except UnidentifiedImageError:
        raise ServiceError(unreadable_message(name, data[:12])) from None
    except Exception as e:  # any other failure to read untrusted bytes is the upload's, not the server's
        raise ServiceError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from None
    return img


def preprocess_upload(img: Image.Image, name: str) -> torch.Tensor:
    """Decode an opened upload and turn it into the uint8 28x28 image the tower sees (the CLI's recipe). Safe to
    run in several threads at once (the pixel budget was checked when the upload was opened)."""
    try:  # decoded as the CLI decodes a file: at the resolution needed, then turned upright by its EXIF orientation
        return preprocess_image(img, source=name)
    except RetrievalError as e:
        raise ServiceError(str(e), 413 if "pixel budget" in str(e) else 400) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ServiceError(f"{name}: over the pixel budget (decompression bomb?)", 413) from None
    except Exception as e:  # a decoder failing on untrusted bytes: the upload's fault, answered 400
        raise ServiceError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from None


def decode_upload(data: bytes, name: str) -> torch.Tensor:
    return preprocess_upload(open_upload(data, name), name)


def png_bytes(image: torch.Tensor) -> bytes:
    """A uint8 (28, 28) image as PNG."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image.numpy())).save(buf, format="PNG")
    return buf.getvalue()


# -- queries --------------------------------------------------------------------------------------------------------
def embed(searcher, images: torch.Tensor) -> np.ndarray:
    """uint8 (n, 28, 28) -> float32 (n, d): one tower forward (in batches of the searcher's batch size)."""
    return searcher.embed(images)


def effective_k(searcher, k: int) -> int:
    """k clamped to the index size, as `retrieval query` does."""
    return searcher.effective_k(k)[0]


def digit_scores(searcher, images: torch.Tensor, embeddings: np.ndarray):
    """The digit-or-not gate's scores of the images (None when the tower has no gate; retrieval.gate)."""
    return searcher.digit_scores(images, embeddings)


def answer_queries(searcher, embeddings: np.ndarray, k: int, names: Sequence[str],
                   search_params: str | None = None, digit_scores=None) -> list[dict]:
    """One Faiss search for these embeddings (with `search_params` instead of the index's, when given); each answer
    is what `retrieval query --json` prints for it (with the gate's `digit_scores`, when the tower has a gate)."""
    return [r.to_json() for r in searcher.search_embeddings(embeddings, k, list(names), search_params=search_params,
                                                            digit_scores=digit_scores)]


def check_search_params(searcher, params: str) -> None:
    """A UsageError unless `params` are Faiss search parameters that apply to the served index."""
    search_parameters(searcher.index.index, params)


# -- adding items ---------------------------------------------------------------------------------------------------
def check_label(label) -> str:
    if not isinstance(label, str) or not label.strip():
        raise ServiceError("label: a non-empty class name is required")
    label = label.strip()
    if label == UNKNOWN:
        raise ServiceError(f"label: {UNKNOWN!r} is the answer for 'no class'; choose another name")
    if not LABEL_PATTERN.match(label):
        raise ServiceError("label: 1-40 characters: letters, digits, spaces and . + - _ (starting with a letter "
                           f"or digit), got {label[:60]!r}")
    return label


def default_uploads_folder(folder: Path) -> Path:
    """Where taught images go by default: a sibling of the index folder (`<index>.uploads/<label>/*.png`, so
    `folder:<index>.uploads` rebuilds them)."""
    folder = Path(folder)
    return folder.parent / f"{folder.name}.uploads"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


@contextlib.contextmanager
def _folder_lock(folder: Path, timeout: float):
    """exclusive_lock(folder), waiting up to `timeout` seconds for another writer (a CLI `index add`...)."""
    deadline = time.monotonic() + timeout
    while True:
        acquired = False
        try:
            with exclusive_lock(folder):
                acquired = True
                yield
                return
        except RetrievalError:
            if acquired:
                raise
            if time.monotonic() >= deadline:
                raise ServiceError("the index folder is being written by another process; try again", 409) from None
        time.sleep(0.05)


def add_items(folder, checkpoint, embed_images: Callable[[torch.Tensor], np.ndarray], images: torch.Tensor,
              label: str, uploads: Path, *, lock_timeout: float = 10.0):
    """Add `images` (uint8 (n, 28, 28)) under `label` to the index folder as `retrieval index add` does: under the
    folder lock, the index as saved on disk, the tower checked by fingerprint, new ids appended, saved atomically.
    The images are written to `uploads/<label>/` first (their sources); on failure nothing is committed and they
    are removed. Returns (the saved EmbeddingIndex, new ids)."""
    folder = Path(folder)
    written: list[Path] = []
    with _folder_lock(folder, lock_timeout):
        try:
            index = load_index(folder)
            check_tower_matches(index, checkpoint)
            prototypes = bool(index.meta.get("prototypes"))
            if prototypes and label in index.classes:
                raise ServiceError(f"{folder} holds one prototype per class and already has {label!r}; "
                                   "rebuild it to change that class", 409)
            emb = embed_images(images)
            labels = np.zeros(len(images), dtype=np.int64)
            sources = [f"serve:{label}"] * len(images)  # prototypes name their own source
            if not prototypes:
                where = Path(uploads).resolve() / label
                stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
                sources = []
                for image in images:
                    path = where / f"{stamp}-{uuid.uuid4().hex[:12]}.png"
                    atomic_write_bytes(path, png_bytes(image))
                    written.append(path)
                    sources.append(str(path))
            entry = {"spec": f"serve:{label}", "filters": "", "images": len(images),
                     "preprocessing": PREPROCESSING, "added": _now()}
            before = int(index.meta.get("next_id", len(index)))
            try:
                new_ids = append_embeddings(index, folder, emb, labels, [label], sources, [entry])
            except BaseException:
                try:  # a failure after the commit point (cleaning old files) keeps the images it names
                    if int(read_index_meta(folder).get("next_id", -1)) > before:
                        written.clear()
                except RetrievalError:
                    pass
                raise
            written.clear()
            return index, new_ids
        finally:
            for path in written:
                path.unlink(missing_ok=True)
            for parent in {p.parent for p in written}:
                with contextlib.suppress(OSError):
                    parent.rmdir()  # only when it is empty (a class this request would have started)


# -- stored images ---------------------------------------------------------------------------------------------------
class ReferenceImages:
    """The stored image of an indexed item: a dataset item, an image file; None for prototypes or moved files."""

    def __init__(self, root=None):
        self._sources = SourceImages(root)

    def get(self, index, item_id: int) -> torch.Tensor | None:
        pos = int(index.positions_of(np.array([item_id], dtype=np.int64))[0])
        if pos < 0:
            raise ServiceError(f"no item with id {item_id} in the index", 404)
        return self._sources.get(index.sources[pos])
