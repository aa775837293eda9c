"""Corrupted MNIST query sets: the 15 corruptions of MNIST-C and what users bring that MNIST-C lacks.

A dataset spec `mnist-c:SPLIT/NAME` (e.g. `mnist-c:test/fog`, `mnist-c:test/lowres-8`, `mnist-c:test/canvas`) names
MNIST's SPLIT with corruption NAME applied to every image. The set is made once, deterministically (seed 0 and the
corruption's name seed every random draw), and cached as an IDX pair in DATA_ROOT/mnist-c/SPLIT-NAME-VERSION/ (each
file written atomically, labels last: a folder with both files is complete). Afterwards the spec loads like any
other, wherever a spec is accepted (evaluate, query items `mnist-c:test/fog[12]`, fewshot, index build).

MNIST-C (Mu & Gilmer, 2019, "MNIST-C: A Robustness Benchmark for Computer Vision"): implemented here from the
paper's definitions with the severities of its released set, on whole batches (numpy/scipy/torch; no ImageMagick,
OpenCV or scikit-image):
  shot_noise      Poisson noise, x' = Poisson(x * 3) / 3                   impulse_noise  salt and pepper on 17%
  glass_blur      Gaussian blur (sigma 0.7), 2 passes of local pixel swaps (max 1 px), blur again
  motion_blur     one-sided Gaussian kernel (radius 10, sigma 3) along a random angle in [-45, 45] degrees
  shear           shear 0.4 (random sign) about the centre            scale    zoom out to 0.7 about the centre
  rotate          0.4 rad (random sign) about the centre               translate 3 px in random diagonal direction
  brightness      +0.5 on HSV value (grey: x + 0.5, clipped)           stripe   columns 0-6 and 21-27 inverted
  fog             diamond-square plasma fractal (wibble decay 1.4) times 3 added, rescaled to the image's maximum
  spatter         thresholded smoothed Gaussian field as mud blobs (grey 63)
  dotted_line     a dashed anti-aliased line across the image        zigzag   a zigzag line of 2 px teeth
  canny_edges     the image replaced by its Canny edges (sigma 1, hysteresis thresholds 0.1 / 0.2)
Beyond MNIST-C:
  lowres-8|10|14  area-downsampled to 8x8, 10x10 or 14x14, then upscaled bilinearly to 28x28 (old scans)
  thin, thick     strokes redrawn 1.25 px wide along the digit's skeleton / grown by 1.5 px on every side
  photo-lighting, photo-blur, photo-jpeg, photo-grey, photo
                  the digit as a phone photo: dark ink on paper at 112x112, with (respectively) uneven lighting,
                  defocus blur, JPEG at quality 10-25, grey low-contrast paper, or all four; then the query
                  preprocessing (retrieval.data.preprocess.preprocess_image), as an uploaded picture gets
  canvas          the web canvas (retrieval/web: 280x280, white, #111 ink, round pen 18 px): the digit's skeleton
                  (Zhang-Suen thinning at 112x112) drawn with a round pen 14-22 px wide, scaled to 280x280, then
                  the query preprocessing
The operations live in retrieval.data.corruptions (mnist_c, beyond_mnist_c, and the image_ops they share); this
module holds their registry, the `mnist-c:` spec and the cached sets.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from retrieval.data.corruptions.beyond_mnist_c import canvas, lowres, photo, thick, thin
from retrieval.data.corruptions.image_ops import as_float, as_uint8
from retrieval.data.corruptions.mnist_c import (
    brightness, canny_edges, dotted_line, fog, glass_blur, impulse_noise, motion_blur, rotate, scale, shear,
    shot_noise, spatter, stripe, translate, zigzag,
)
from retrieval.errors import RetrievalError, UsageError

logger = logging.getLogger(__name__)

KIND = "mnist-c"
VERSION = "v1"
SEED = 0


# ----------------------------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class Corruption:
    name: str
    family: str
    op: Callable[[np.ndarray, np.random.Generator], np.ndarray]
    mnist_c: bool
    revision: int = 1  # raised when the op's output changes (a fix), so cached sets are remade


CORRUPTIONS: dict[str, Corruption] = {c.name: c for c in (
    Corruption("shot_noise", "noise", shot_noise, True),
    Corruption("impulse_noise", "noise", impulse_noise, True),
    Corruption("glass_blur", "blur", glass_blur, True),
    Corruption("motion_blur", "blur", motion_blur, True),
    Corruption("shear", "affine", shear, True),
    Corruption("scale", "affine", scale, True),
    Corruption("rotate", "affine", rotate, True),
    Corruption("brightness", "contrast", brightness, True),
    Corruption("translate", "affine", translate, True),
    Corruption("stripe", "occlusion", stripe, True),
    Corruption("fog", "contrast", fog, True),
    Corruption("spatter", "occlusion", spatter, True),
    Corruption("dotted_line", "occlusion", dotted_line, True),
    Corruption("zigzag", "occlusion", zigzag, True),
    Corruption("canny_edges", "edges", canny_edges, True, revision=2),
    Corruption("lowres-8", "low resolution", lowres(8), False),
    Corruption("lowres-10", "low resolution", lowres(10), False),
    Corruption("lowres-14", "low resolution", lowres(14), False),
    Corruption("thin", "stroke width", thin, False),
    Corruption("thick", "stroke width", thick, False),
    Corruption("photo-lighting", "photo", photo(True, False, False, False), False),
    Corruption("photo-blur", "photo", photo(False, True, False, False), False),
    Corruption("photo-jpeg", "photo", photo(False, False, True, False), False),
    Corruption("photo-grey", "photo", photo(False, False, False, True), False),
    Corruption("photo", "photo", photo(True, True, True, True), False),
    Corruption("canvas", "canvas", canvas, False),
)}


def _lookup(name: str) -> Corruption:
    key = name.strip().lower().replace("-", "_")
    for c in CORRUPTIONS.values():
        if c.name.replace("-", "_") == key:
            return c
    raise UsageError(f"unknown corruption {name!r}; expected one of: {', '.join(CORRUPTIONS)}")


def corrupt(images: np.ndarray | torch.Tensor, name: str, seed: int = SEED) -> np.ndarray:
    """Corruption `name` applied to uint8 images (N, 28, 28): uint8 (N, 28, 28), the same for the same seed."""
    c = _lookup(name)
    x = np.asarray(images.numpy() if isinstance(images, torch.Tensor) else images)
    if x.ndim != 3 or x.shape[1:] != (28, 28) or x.dtype != np.uint8:
        raise UsageError(f"`images` must be uint8 (N, 28, 28), got {x.dtype} {tuple(x.shape)}")
    rng = np.random.default_rng([seed, zlib.crc32(c.name.encode())])
    if len(x) == 0:
        return x.copy()
    return as_uint8(np.asarray(c.op(as_float(x), rng), dtype=np.float32))


def parse_spec(rest: str) -> tuple[str, str]:
    """`test/fog` (the part after `mnist-c:`) -> ("test", "fog")."""
    split, sep, name = rest.strip().partition("/")
    split = split.strip().lower()
    if not sep or split not in ("train", "test") or not name.strip():
        raise UsageError(f"dataset spec {KIND}:{rest}: expected {KIND}:train/NAME or {KIND}:test/NAME, NAME one of: "
                         f"{', '.join(CORRUPTIONS)}")
    return split, _lookup(name).name


PREPROCESSED = {"photo-lighting", "photo-blur", "photo-jpeg", "photo-grey", "photo", "canvas"}


def corrupted_dir(root: Path, split: str, name: str) -> Path:
    """The cache folder; sets made through the query preprocessing are keyed by its recipe as well."""
    revision = CORRUPTIONS[name].revision
    tag = VERSION if revision == 1 else f"{VERSION}.{revision}"
    if name in PREPROCESSED:
        from retrieval.data.preprocess import PREPROCESSING

        tag += f"-p{zlib.crc32(PREPROCESSING.encode()):08x}"
    return Path(root) / KIND / f"{split}-{name}-{tag}"


IMAGES, LABELS = "images-idx3-ubyte", "labels-idx1-ubyte"


def ensure_corrupted(rest: str, root: Path, fetch: bool = True) -> Path:
    """The cached folder of `mnist-c:REST`, made from MNIST's split when missing (IDX files, written atomically,
    labels last)."""
    from retrieval.data.idx import read_idx_pair, write_idx
    from retrieval.data.fetch import TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS, dataset_dir, \
        dataset_files_present, fetch_dataset
    from retrieval.fsutil import exclusive_lock, ensure_writable_dir

    split, name = parse_spec(rest)
    folder = corrupted_dir(root, split, name)
    if (folder / LABELS).is_file() and (folder / IMAGES).is_file():
        return folder
    if not dataset_files_present("mnist", root):
        if not fetch:
            raise RetrievalError(f"mnist is not in {root}; run `retrieval data fetch mnist`")
        fetch_dataset("mnist", root)
    ensure_writable_dir(folder, "corrupted-data folder")
    with exclusive_lock(folder, wait=True):
        if (folder / LABELS).is_file() and (folder / IMAGES).is_file():
            return folder
        src = dataset_dir(root, "mnist")
        pair = (TRAIN_IMAGES, TRAIN_LABELS) if split == "train" else (TEST_IMAGES, TEST_LABELS)
        images, labels = read_idx_pair(src / pair[0], src / pair[1])
        logger.info(f"making {KIND}:{split}/{name} ({len(images):,} images) in {folder}")
        out = np.concatenate([corrupt(images[s:s + 2000], name, seed=SEED + s // 2000)
                              for s in range(0, len(images), 2000)]) if len(images) else images
        write_idx(folder / IMAGES, out)
        write_idx(folder / LABELS, labels.astype(np.uint8))
    return folder
