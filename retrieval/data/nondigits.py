"""Pictures that are no digit, from real character sources, for the digit-or-not gate (retrieval/gate.py).

Every source draws its marks as people write them (random rotation, shear and aspect, a wobbly hand, pen widths
from hairline to marker, elastic distortion, paper and ink tones, a little sensor noise), some of them through the
web canvas and phone-photo paths of retrieval.data.corrupt, and then through the query preprocessing
(retrieval.data.preprocess.preprocess_image): uint8 28x28 images as a query picture becomes. The same seed gives
the same images; a set is cached in DATA_ROOT/nondigits/ (a .npz without pickles and a JSON sidecar holding its
SHA-256, checked on every read; a set that fails the check is made again).

Sources, held out by source (SPLITS):
  hershey            Hershey's stroke fonts (Debian hershey-fonts-data: /usr/share/hershey-fonts/*.jhf)
  kanjivg-train|-selection   KanjiVG's stroke files (PyPI wheel kanjivg, fetched like MNIST's wheel), split by
                     code point
  fonts-train|-selection     Debian's handwriting fonts (and Devanagari, Gujarati, Kannada, Thai, Japanese ones),
                     split by package (FONT_PACKAGES)
  synthetic          the synthetic marks of retrieval.augment.draw_non_digits (scribbles, shapes, crossing lines,
                     speckle, noise, blank pages)
  handtex-train|-selection   LaTeX symbols of 25 packages (PyPI wheel handtex: their glyph outlines), split by
                     command; -train is no default training source (benchmarks/gate.py --train-sources tries it)
  animal-mnist       Animal-MNIST's silhouettes (PyPI wheel animal-mnist), 28x28 as they come
The system fonts DejaVu and Liberation are never a source here: they are for measurement (benchmarks/gate.py).
Where the marks come from and which characters may be one: retrieval.data.nondigit_sources; how they are drawn:
retrieval.data.hand_drawing; this module makes, caches and loads the sets.

No digit of any script is ever a negative: characters with a Unicode numeric value (0-9, Devanagari, Thai, ...
digits, CJK numerals such as 一 二 三 十 百) are left out, and so are LOOK_ALIKES, letters and marks that are written
like a digit (O o D Q, I l | !, Z z, S s, g q, b G B, ...): the gate cannot decide those, they are measured apart.
"""

from __future__ import annotations

import hashlib
import io
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrieval.data.hand_drawing import draw_glyph, draw_outlines, draw_strokes
# the characters' rules and the sources' readers are re-exported too: the gate's tests and benchmarks use them here
from retrieval.data.nondigit_sources import (  # noqa: F401
    FOLDER, FONT_SPLIT, LOOK_ALIKES, allowed_char, allowed_command, animal_mnist_images, font_chars, font_files,
    handtex_part, hershey_glyphs, is_digit_char, kanjivg_part, kanjivg_strokes, parse_jhf, svg_outlines,
    svg_path_points,
)
from retrieval.errors import RetrievalError, UsageError

logger = logging.getLogger(__name__)

VERSION = 1  # raised whenever rendering changes, so cached sets are made again

SOURCES = ("hershey", "kanjivg-train", "fonts-train", "synthetic", "handtex-train", "kanjivg-selection",
           "fonts-selection", "handtex-selection", "animal-mnist")
SPLITS = {
    "train": ("hershey", "kanjivg-train", "fonts-train", "synthetic"),
    "selection": ("kanjivg-selection", "fonts-selection", "handtex-selection", "animal-mnist"),
}
CANVAS_SHARE, PHOTO_SHARE = 0.15, 0.15  # of each stroke or font source, redrawn through those paths


# ---------------------------------------------------------------------------------------------- sets


@dataclass
class NonDigits:
    """uint8 (n, 28, 28) preprocessed pictures of one source and what each shows (a character, or a kind)."""

    source: str
    images: np.ndarray
    marks: list[str]


def _preprocess(picture: np.ndarray) -> np.ndarray | None:
    from PIL import Image

    from retrieval.data.preprocess import preprocess_image

    try:
        return preprocess_image(Image.fromarray(picture, mode="L")).numpy()
    except RetrievalError:
        return None


def _drawers(source: str, root: Path):
    """(marks, draw(i, rng) -> picture) of a stroke or font source."""
    if source == "hershey":
        glyphs = hershey_glyphs()
        return [g[1] for g in glyphs], lambda i, rng: draw_strokes(glyphs[i][2], rng)
    if source.startswith("kanjivg-"):
        glyphs = kanjivg_part(root, source.split("-", 1)[1])
        return [g[0] for g in glyphs], lambda i, rng: draw_strokes(kanjivg_strokes(str(root), glyphs[i][1]), rng)
    if source.startswith("handtex-"):
        symbols = handtex_part(root, source.split("-", 1)[1])
        return [s[0] for s in symbols], lambda i, rng: draw_outlines(symbols[i][1], rng)
    if source.startswith("fonts-"):
        # a package first, then one of its font files, then a character: every hand counts alike, however many
        # files or characters it has
        packages: dict[str, list] = {}
        for package, f in font_files(source):
            chars = font_chars(str(f))
            if chars:  # setofont-ex.ttf: extra marks only, none of them wanted
                packages.setdefault(package, []).append((f, chars))
        pk = sorted(packages)

        def pick(rng):
            files = packages[pk[int(rng.integers(len(pk)))]]
            f, chars = files[int(rng.integers(len(files)))]
            return f, chars[int(rng.integers(len(chars)))]

        return pick, None
    raise UsageError(f"unknown non-digit source {source!r}; expected one of: {', '.join(SOURCES)}")


def _render(source: str, n: int, seed: int, root: Path) -> NonDigits:
    rng = np.random.default_rng([seed, zlib.crc32(source.encode())])
    if source == "synthetic":
        import torch

        from retrieval.augment import draw_non_digits

        g = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
        x = (draw_non_digits(n, 28, g)[:, 0] * 255).round().to(torch.uint8).numpy()
        return NonDigits(source, x, ["synthetic"] * n)
    if source == "animal-mnist":
        images = animal_mnist_images(root)
        pick = np.sort(rng.choice(len(images), size=min(n, len(images)), replace=False))
        return NonDigits(source, images[pick], ["animal"] * len(pick))
    marks, draw = _drawers(source, root)
    if not marks:
        raise RetrievalError(f"non-digit source {source}: no allowed glyph found")
    images, out_marks = [], []
    while len(images) < n:
        if draw is None:  # fonts: marks is the picker
            f, mark = marks(rng)
            picture = draw_glyph(f, mark, rng)
        else:
            i = int(rng.integers(len(marks)))
            mark, picture = marks[i], draw(i, rng)
        x = _preprocess(picture)
        # a glyph the font lacks draws a box or a blot: keep pictures whose ink is a stroke, not a filled area
        if x is not None and (x > 127).mean() < 0.35:
            images.append(x)
            out_marks.append(mark)
    x = np.stack(images)
    # a share redrawn as the web canvas draws (skeleton, round 14-22 px pen) and as a phone photo sees it
    from retrieval.data.corrupt import corrupt

    k_canvas, k_photo = int(round(CANVAS_SHARE * n)), int(round(PHOTO_SHARE * n))
    order = rng.permutation(n)
    c_rows, p_rows = np.sort(order[:k_canvas]), np.sort(order[k_canvas:k_canvas + k_photo])
    if len(c_rows):
        x[c_rows] = corrupt(x[c_rows], "canvas", seed=seed)
    if len(p_rows):
        x[p_rows] = corrupt(x[p_rows], "photo", seed=seed)
    return NonDigits(source, x, out_marks)


def _cache_name(source: str, n: int, seed: int) -> str:
    from retrieval.data.preprocess import PREPROCESSING

    return f"{source}-n{n}-seed{seed}-v{VERSION}-p{zlib.crc32(PREPROCESSING.encode()):08x}"


def load_source(source: str, n: int, seed: int = 0, root=None) -> NonDigits:
    """`n` preprocessed pictures of `source`, the same for the same seed: read from DATA_ROOT/nondigits/ when
    cached and intact, else rendered (fetching what the source needs) and cached."""
    from retrieval.data.specs import data_root
    from retrieval.fsutil import atomic_path, atomic_write_json, ensure_writable_dir, exclusive_lock, read_json

    if source not in SOURCES:
        raise UsageError(f"unknown non-digit source {source!r}; expected one of: {', '.join(SOURCES)}")
    if int(n) <= 0:
        raise UsageError(f"`n` must be a positive number of pictures, got {n}")
    root = data_root(root)
    folder = ensure_writable_dir(root / FOLDER, "data root")
    name = _cache_name(source, int(n), int(seed))
    data, sidecar = folder / f"{name}.npz", folder / f"{name}.json"
    with exclusive_lock(folder, wait=True):
        if data.is_file() and sidecar.is_file():
            blob = data.read_bytes()
            meta = read_json(sidecar, "non-digit set sidecar")
            if hashlib.sha256(blob).hexdigest() == meta.get("sha256"):
                with np.load(io.BytesIO(blob), allow_pickle=False) as z:
                    return NonDigits(source, z["images"], [str(m) for m in z["marks"]])
            logger.info(f"removing {data}: checksum mismatch")
            data.unlink()
        logger.info(f"rendering {n} non-digit pictures of {source} (seed {seed}) into {folder}")
        out = _render(source, int(n), int(seed), root)
        buf = io.BytesIO()
        np.savez(buf, images=out.images, marks=np.array(out.marks, dtype=str))
        with atomic_path(data) as tmp:
            tmp.write_bytes(buf.getvalue())
        atomic_write_json(sidecar, {"source": source, "n": int(n), "seed": int(seed), "version": VERSION,
                                    "sha256": hashlib.sha256(buf.getvalue()).hexdigest()})
    return out


def load_split(split: str, n: int, seed: int = 0, root=None) -> dict[str, NonDigits]:
    """`n` pictures of every source of SPLITS[split]."""
    if split not in SPLITS:
        raise UsageError(f"unknown non-digit split {split!r}; expected one of: {', '.join(SPLITS)}")
    return {s: load_source(s, n, seed, root) for s in SPLITS[split]}
