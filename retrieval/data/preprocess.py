"""Turn an arbitrary picture into an MNIST-like 28x28 uint8 image (white ink on black, the MNIST recipe).

    image = load_image_file("seven.jpg")                # decode (pixel budget first) and preprocess
    image = preprocess_image(decode_image(img, name))   # an opened PIL image, e.g. an upload
    images = load_image_files(paths)                    # many files, decoded in parallel, in order

Pictures smaller than ROBUST_MIN_SIDE on their short side are taken as they are (the ink is what differs from
the border's colour). Larger ones (photos, scans, canvas exports) are worked on at about WORK_SIDE pixels, the
resolution a 20x20 digit needs: JPEGs are decoded at a reduced scale (Image.draft), other pictures are box-reduced
as soon as they are grey. There the ink is found robustly (retrieval.data.ink: an uneven background flattened,
noise and stray marks dropped). Two opposite margin bands of another level than the paper (a scanner's dark
margins) are first brought to the paper's level (from MARGIN_MIN_SIDE px on).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import warnings
import zlib
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageChops, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from retrieval.data.ink import (MARGIN_MIN_SIDE, border, extremes, light_ink, margins_levelled, marks, median,
                                robust_ink, ruled_lines_removed, stroke_width)
from retrieval.errors import RetrievalError
from retrieval.logs import show_progress

try:  # libpng through imagecodecs: a PNG's pixels as Pillow decodes them, in about half the time, and without
    # holding the interpreter lock (benchmarks/README.md)
    from imagecodecs import png_decode
except ImportError:  # not installed: Pillow decodes every PNG
    png_decode = None

# Refuse pictures over this many pixels before decoding them (decompression bombs).
DEFAULT_MAX_PIXELS = 40_000_000


def max_pixels() -> int:
    """The pixel budget: $RETRIEVAL_MAX_PIXELS, else DEFAULT_MAX_PIXELS."""
    return int(os.environ.get("RETRIEVAL_MAX_PIXELS") or DEFAULT_MAX_PIXELS)


def check_pixel_budget(w: int, h: int, source) -> None:
    """Refuse a w x h picture over the budget, naming `source` (before decoding it, where possible)."""
    budget = max_pixels()
    if w * h > budget:
        raise RetrievalError(f"{source}: {w}x{h} pixels is over the pixel budget of {budget:,}")


# What a folder's pictures may be called (.jfif: JPEGs as some browsers save them; .avif: Pillow >= 11.3 reads it;
# .heic/.heif are listed so that each one is refused by name, with what to do, rather than skipped unread).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jfif", ".bmp", ".gif", ".webp", ".avif", ".heic", ".heif", ".tif",
                    ".tiff", ".pgm", ".ppm")
# What the picture path does, recorded in indexes and exports; it also keys the cached sets made through it (mnist-c's
# photo and canvas sets, the gate's non-digit renders), so it changes with the path's outputs
# (tests/test_preprocess.py: test_the_recipe_is_renamed_when_its_outputs_change).
PREPROCESSING = ("mnist-28x28: gray, level margin bands, invert light background (the ink further above its noise "
                 "decides where levels do not), one level for an even background and flatten an uneven one (an "
                 "opening raised by its mean; marks at the edges out where marks apart hold the peak), drop noise and "
                 "specks and ruled lines, crop the larger marks' stronger ink short of a line across, fit 20x20 (thick "
                 "strokes larger), centre of mass in 28x28")

# Pictures at least this many pixels on their short side get their ink found robustly (photos, scans, canvases);
# smaller ones are taken as they are (icons, already-small digits).
ROBUST_MIN_SIDE = 32
# Larger pictures are reduced (by a whole factor) to at most this short side before the ink is looked for: the
# digit ends up 20 px high, and the strokes of a digit that fills a quarter of a photo are still a few pixels wide.
WORK_SIDE = 112
# JPEGs are decoded at 1/2, 1/4 or 1/8 scale (DCT scaling) as long as the short side stays at least this.
DRAFT_MIN_SIDE = 64
# The crop of a larger picture reaches as far as its ink over this share of the peak, and a rim of CROP_RIM of that
# box's longer side (a stroke's soft edge): fainter ink touching the digit (a grey blotch, a smudge) is not cropped in.
CROP_LEVEL = 0.3
CROP_RIM = 0.04
# ... and as far as its marks (8-connected) of at least this share of the largest one's size: the dashes of a line
# across the picture do not widen the crop (a digit's detached bar is larger).
CROP_MARK_SHARE = 0.2
# ... and not along a line drawn across the picture (a ruled line, a stroke through the digit): where the crop reaches
# within LINE_EDGE of both side edges through a single run of ink per column, no higher than LINE_THIN of the crop,
# each run continuing the one before, for at least LINE_BEYOND of the width on both sides, and its two inner ends on
# one near-level straight line, the crop starts where those runs end. (A digit's own bar or tail seldom reaches that
# far beyond the rest on both sides, or its two ends are far from level: the digit is kept.)
LINE_EDGE = 0.12
LINE_THIN = 0.3
LINE_BEYOND = 0.15
# A larger picture's digit whose fitted strokes are thick (a dilated, soft scan) is fitted larger: where the stroke
# width of its ink over THICK_LEVEL of the peak, w, exceeds THICK_WIDTH px, into a box of 20 x (20 - THICK_WIDTH) /
# (20 - w) (at most 28x28), so that its strokes' middle lines span about what a THICK_WIDTH-wide digit's do in
# 20x20 (squeezed into 20x20, thick strokes crowd the digit's shape; chosen on the selection split,
# benchmarks/README.md). Measured on the strong ink, a motion or glass blur's soft smear does not count as width.
THICK_LEVEL = 0.75
THICK_WIDTH = 2.8


# -- decoding --------------------------------------------------------------------------------------------------------
def decode_image(img: Image.Image, source="image") -> Image.Image:
    """An opened (not yet loaded) picture -> its pixels, upright (EXIF orientation applied), decoded only at the
    resolution the preprocessing uses: a large JPEG at 1/2, 1/4 or 1/8 scale and straight to grey. Checks the
    pixel budget on the declared size first; Pillow's errors pass through (callers name the file)."""
    check_pixel_budget(*img.size, source)
    plain = _plain_png(img)
    if plain is not None:
        return plain
    w, h = img.size
    if getattr(img, "format", None) == "JPEG" and min(w, h) >= 2 * DRAFT_MIN_SIDE:
        scale = min(w, h) // DRAFT_MIN_SIDE
        img.draft("L", (max(1, w // scale), max(1, h // scale)))
    img.load()
    ImageOps.exif_transpose(img, in_place=True)
    return img


_PLAIN_PNG_MODES = ("L", "LA", "RGB", "RGBA")


def _plain_png(img: Image.Image) -> Image.Image | None:
    """An opened 8-bit grey or colour PNG, with or without alpha, no transparency key and no EXIF chunk (a canvas
    export, a scan, a screenshot), decoded by libpng (imagecodecs): the same pixels as Pillow's decoder (lossless
    both; an RGBA PNG opaque everywhere as its RGBX colour, which preprocesses as the RGBA does). None for any
    other picture, and where imagecodecs is missing or fails on the bytes: Pillow then decodes it (and names what
    is wrong)."""
    if (png_decode is None or getattr(img, "format", None) != "PNG" or not img.tile or img.mode not in _PLAIN_PNG_MODES
            or "transparency" in img.info or min(img.size) < ROBUST_MIN_SIDE):  # (small ones: as fast in Pillow)
        return None
    img.fp.seek(0)
    data = img.fp.read()
    if data[12:16] != b"IHDR" or data[24] != 8 or not _sound_png_chunks(data):  # (IHDR's bit depth)
        return None
    try:
        pixels = png_decode(data)
    except Exception:  # noqa: BLE001 (untrusted bytes: Pillow's decoder gives the error)
        return None
    if img.mode == "RGBA" and pixels.shape == (img.height, img.width, 4) and _opaque(pixels):
        # opaque everywhere (the page's canvas export): its colour alone, the pixels not copied
        return Image.frombuffer("RGBX", img.size, pixels, "raw", "RGBX", 0, 1)
    plain = Image.fromarray(pixels)
    return plain if plain.mode == img.mode and plain.size == img.size else None


def _sound_png_chunks(data: bytes) -> bool:
    """Whether a PNG's chunks all hold their CRC up to IEND, with no eXIf among them (EXIF may turn the picture). A
    damaged file goes to Pillow, which names the damage."""
    view, pos = memoryview(data), 8
    while pos + 12 <= len(data):
        end = pos + 12 + int.from_bytes(view[pos : pos + 4], "big")
        kind = bytes(view[pos + 4 : pos + 8])
        if end > len(data) or kind == b"eXIf" or zlib.crc32(view[pos + 4 : end - 4]) != int.from_bytes(
                view[end - 4 : end], "big"):
            return False
        if kind == b"IEND":
            return True
        pos = end
    return False


def load_image_file(path: str | os.PathLike) -> torch.Tensor:
    """Open an image file safely (pixel budget checked before decoding) and preprocess it."""
    path = Path(path)
    if not path.is_file():
        raise RetrievalError(f"image not found: {path}")
    if path.stat().st_size == 0:
        raise RetrievalError(f"{path}: empty file, expected an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img = decode_image(img, path)
    except RetrievalError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RetrievalError(f"{path}: over the pixel budget (decompression bomb?)") from None
    except UnidentifiedImageError:
        with path.open("rb") as f:
            raise RetrievalError(unreadable_message(path, f.read(12))) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise RetrievalError(f"{path}: cannot decode image ({e})") from None
    return preprocess_image(img, source=str(path))


# The brands of HEIF files (HEIC: the photos iPhones take), which Pillow does not read: named in the error, since
# "unknown format" would leave the user guessing about a photo that opens everywhere else.
_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1")


def unreadable_message(source, head: bytes) -> str:
    """The error for a picture that no decoder here identifies, from its first 12 bytes."""
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        return (f"{source}: a HEIC/HEIF picture (as iPhones save photos), which cannot be read here; save it as JPEG "
                "or PNG")
    return f"{source}: not a readable image (unknown format)"


# A picture's preprocessing is dozens of small numpy calls, each giving up the interpreter lock and taking it back:
# decoding threads mostly wait for one another (two decode a folder of canvas PNGs slower than one,
# benchmarks/README.md). From this many pictures on, they are decoded in forked worker processes instead (Linux:
# a fork costs milliseconds and shares the parent's memory, as torch's DataLoader workers do; the workers only
# decode and preprocess, which starts none of torch's thread pools).
PROCESS_MIN_PICTURES = 256


def decode_workers() -> int:
    """Decoders (processes or threads) for many pictures: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def decoding_pool(count: int, workers: int) -> str | None:
    """How load_image_files decodes `count` pictures with `workers` decoders: "processes", "threads" or None
    (in this thread)."""
    if workers == 1 or count < 2 * workers:
        return None
    if (count >= PROCESS_MIN_PICTURES and sys.platform.startswith("linux")
            and not multiprocessing.current_process().daemon):  # (a daemon process may not have children)
        return "processes"
    return "threads"


def _loaded(path) -> torch.Tensor | RetrievalError:
    try:
        return load_image_file(path)
    except RetrievalError as e:
        return e


def _loaded_array(path) -> np.ndarray | RetrievalError:
    loaded = _loaded(path)
    return loaded.numpy() if isinstance(loaded, torch.Tensor) else loaded


def load_image_files(paths: Sequence[str | os.PathLike], workers: int | None = None, progress: bool = False
                     ) -> list[torch.Tensor | RetrievalError]:
    """load_image_file of every path, in order, on `workers` decoders (default: decode_workers()): forked
    processes for many pictures, threads for a few (decoding_pool). A file that cannot be read gives its
    RetrievalError in its place instead of stopping the others. `progress`: a "decoding" bar (retrieval.logs)."""
    workers = decode_workers() if workers is None else max(1, int(workers))
    pool = decoding_pool(len(paths), workers)
    with tqdm(total=len(paths), desc="decoding", unit="img", leave=False, disable=not show_progress(progress)) as bar:
        if pool is None:
            return [_counted(bar, _loaded(p)) for p in paths]
        if pool == "threads":
            with ThreadPoolExecutor(workers, thread_name_prefix="decode") as threads:
                return [_counted(bar, r) for r in threads.map(_loaded, paths, chunksize=16)]
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as processes:
            return [_counted(bar, torch.from_numpy(r) if isinstance(r, np.ndarray) else r)
                    for r in processes.map(_loaded_array, paths, chunksize=32)]


def _counted(bar, result):
    bar.update(1)
    return result


# -- grey levels -----------------------------------------------------------------------------------------------------
def _to_gray(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> float32 grey levels in 0..255 (alpha composited onto a contrasting background)."""
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img.convert("F") if img.mode.startswith("I;16") else img, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        return np.zeros_like(a) if hi <= lo else (a - lo) * (255.0 / (hi - lo))
    if img.mode in ("LA", "RGBA", "PA"):
        rgba = img.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0
        gray = np.asarray(rgba.convert("L"), dtype=np.float32)
        opaque = alpha > 0.5
        # Strokes drawn on a transparent canvas: put them on the background that contrasts with them.
        ink_is_dark = opaque.any() and gray[opaque].mean() < 128
        background = 255.0 if ink_is_dark else 0.0
        return gray * alpha + background * (1.0 - alpha)
    return np.asarray(img.convert("L"), dtype=np.float32)


def _reduced_gray(img: Image.Image, factor: int) -> np.ndarray:
    """_to_gray of `img` box-reduced `factor` times, reducing as early as the mode allows: one grey channel (and
    alpha, premultiplied, so that compositing after the reduction is compositing before it) instead of all."""
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _to_gray(img.convert("F").reduce(factor))
    if img.mode in ("LA", "RGBA"):
        if _opaque(np.asarray(img)):  # opaque everywhere (the page's canvas export): a grey picture
            return np.asarray(img.convert("L").reduce(factor), dtype=np.float32)
        alpha = img.getchannel("A")
        gray = img.convert("L") if img.mode != "LA" else img.getchannel("L")
        a = np.asarray(alpha.reduce(factor), dtype=np.float32) / 255.0
        premultiplied = np.asarray(ImageChops.multiply(gray, alpha).reduce(factor), dtype=np.float32)
        opaque = a > 0.5
        ink_is_dark = opaque.any() and float((premultiplied[opaque] / a[opaque]).mean()) < 128
        background = 255.0 if ink_is_dark else 0.0
        return premultiplied + background * (1.0 - a)
    if img.mode != "L":
        img = img.convert("L")
    return np.asarray(img.reduce(factor), dtype=np.float32)


def _opaque(pixels: np.ndarray) -> bool:
    """Whether every pixel of RGBA or LA pixels (h, w, 4 or 2 uint8) is opaque: read as little-endian words
    (32-bit, 16-bit) they hold alpha in the top byte, so the smallest word has that byte at 255 exactly then (one
    pass, no channel copied)."""
    word = pixels.shape[-1]
    return int(np.ascontiguousarray(pixels).view(f"<u{word}").min()) >= 0xFF << (8 * (word - 1))


def _working_gray(img: Image.Image) -> tuple[np.ndarray, bool]:
    """(grey levels, robust): the picture's grey levels at the working resolution, and whether it is large enough
    for the robust path."""
    short = min(img.size)
    if short < ROBUST_MIN_SIDE:
        return _to_gray(img), False
    factor = -(-short // WORK_SIDE)
    return (_reduced_gray(img, factor) if factor > 1 else _to_gray(img)), True


# -- the recipe ------------------------------------------------------------------------------------------------------


def _extent(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(first row, last row + 1, first column, last column + 1) holding a True of a 2-D mask with one."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _walked(single: np.ndarray, follows: np.ndarray) -> int:
    """How many columns from the first hold a single thin run (`single`) each following the one before (`follows[i]`:
    column i's run touches column i - 1's)."""
    ok = single.copy()
    ok[1:] &= follows[1:]
    return len(ok) if ok.all() else int(np.argmin(ok))


def _line_across(inked: np.ndarray, width: int) -> tuple[slice, slice] | None:
    """Where a crop's mask `inked` is crossed by a line (LINE_*) in a picture `width` wide: the crop without it (the
    columns between the line's two ends, the rows of the rest of the ink and of the line there unless it stands
    apart from the rest); None where no line crosses it."""
    h, w = inked.shape
    count = inked.sum(0)
    first = inked.argmax(0)
    last = h - 1 - inked[::-1].argmax(0)
    single = (count > 0) & (last - first + 1 == count) & (count <= max(2.0, LINE_THIN * h))
    step = max(1, round(0.02 * width))  # how far one column's run may step from the one before
    follows = np.ones(w, dtype=bool)
    follows[1:] = (first[1:] <= last[:-1] + step) & (last[1:] >= first[:-1] - step)
    left = _walked(single, follows)
    right = _walked(single[::-1], np.concatenate([[True], follows[:0:-1]]))  # (the same pairs, from the right)
    if min(left, right) < LINE_BEYOND * width or left + right >= w - 2:
        return None
    end = w - right  # the first column of the line's right part
    y_left, y_right = (first[left - 1] + last[left - 1]) / 2, (first[end] + last[end]) / 2
    if abs(y_left - y_right) > 0.25 * (end - left + 1) + 0.15 * width:  # not one near-level line
        return None
    middle = inked[:, left:end]
    half = max(int((last[:left] - first[:left]).max()), int((last[end:] - first[end:]).max())) / 2 + 1 + 2 * step
    line_rows = y_left + (np.arange(left, end) - (left - 1)) * (y_right - y_left) / (end - left + 1)
    rest = middle & (np.abs(np.arange(h)[:, None] - line_rows[None, :]) > half)
    if not rest.any():
        return None
    from scipy import ndimage

    labels, _ = ndimage.label(middle, structure=np.ones((3, 3), dtype=bool))
    apart = not np.intersect1d(labels[middle & ~rest], labels[rest]).size
    rows = np.flatnonzero((rest if apart else middle).any(1))
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(left, end)


def _crop_box(ink: np.ndarray, robust: bool) -> tuple[slice, slice]:
    """The rows and columns to crop (ink scaled to 0-255 peak): as far as the ink over a tenth of the peak reaches;
    where the ink was found robustly, only as far as its larger marks (CROP_MARK_SHARE) reach, and of those no
    further than their stronger ink (CROP_LEVEL) and its rim, and not along a line across the picture (LINE_*)."""
    inked = ink > 0.1 * 255.0
    if robust:
        from scipy import ndimage

        labels, count = ndimage.label(inked, structure=np.ones((3, 3), dtype=bool))
        if count > 1:
            sizes = np.bincount(labels.ravel())
            sizes[0] = 0
            larger = (sizes >= CROP_MARK_SHARE * sizes.max())[labels]
            if (ink[larger] > CROP_LEVEL * 255.0).any():  # (else the strong ink is all in small marks: all count)
                ink, inked = np.where(larger, ink, 0.0), larger
    y0, y1, x0, x1 = _extent(inked)
    if robust:
        sy0, sy1, sx0, sx1 = _extent(ink > CROP_LEVEL * 255.0)
        rim = int(np.ceil(CROP_RIM * max(sy1 - sy0, sx1 - sx0)))
        y0, y1, x0, x1 = max(y0, sy0 - rim), min(y1, sy1 + rim), max(x0, sx0 - rim), min(x1, sx1 + rim)
        width = ink.shape[1]
        if x0 <= LINE_EDGE * width and x1 >= (1 - LINE_EDGE) * width:
            without = _line_across(inked[y0:y1, x0:x1], width)
            if without is not None:
                rows, cols = without
                return slice(y0 + rows.start, y0 + rows.stop), slice(x0 + cols.start, x0 + cols.stop)
    return slice(y0, y1), slice(x0, x1)


def preprocess_image(img: Image.Image, source: str = "image") -> torch.Tensor:
    """The MNIST recipe: white-on-black, ink cropped, fitted into 20x20, centred by mass in 28x28 (uint8).
    `img` may be opened and not yet decoded (then it is decoded as decode_image does)."""
    check_pixel_budget(*img.size, source)
    if getattr(img, "tile", None):  # not decoded yet: at the resolution needed
        img = decode_image(img, source)
    gray, robust = _working_gray(img)
    if min(gray.shape) >= MARGIN_MIN_SIDE:
        gray = margins_levelled(gray)
    if min(gray.shape) > 2:
        background = median(border(gray))
    else:  # no interior (1-pixel, 2-pixel-high...): the pixels are the ink, on the contrasting background
        background = 255.0 if gray.mean() < 128 else 0.0
    # Dark ink (a light background: paper, a canvas) is inverted to MNIST's white-on-black, unless the picture
    # reaches much further above the background than below it: light ink on a light background (a brightened or
    # fogged digit); the other way round on a dark background. (Not the nearer extreme alone: a photo's lighting
    # spreads its paper further than its ink.) Between once and twice as far above, the ink that stands further
    # above its background's noise decides (light_ink: a small digit in a photo reaches less far than the paper's
    # lighting, and a fog's patches as far as its ink).
    lo, hi = extremes(gray)
    dark_ink = background > 127
    if dark_ink and hi - background > 2 * (background - lo):
        dark_ink = False
    elif dark_ink and robust and hi - background > background - lo:
        dark_ink = not light_ink(gray)
    elif not dark_ink and background - lo > 2 * (hi - background):
        dark_ink = True
    if dark_ink:
        gray = 255.0 - gray
        background = 255.0 - background
    flat = float(gray.max()) <= float(gray.min())
    if robust and not flat and np.count_nonzero(gray == background) * 2 >= gray.size:
        # most of the picture is exactly the background's level (a drawing, the page's canvas): nothing to
        # flatten and no noise to measure
        ink = marks(ruled_lines_removed(np.clip(gray - background, 0, None)), 0.0, lone_mark_alone=False)
    elif robust and not flat:
        ink = robust_ink(gray)
    else:
        ink = np.clip(gray - background, 0, None)
    peak = float(ink.max())
    if peak <= 0:
        if flat:
            raise RetrievalError(f"{source}: no ink found (the picture is a single flat colour)")
        raise RetrievalError(f"{source}: no ink found (nothing stands out from the background, its noise and any "
                             "ruled lines)")
    ink *= 255.0 / peak
    ink = ink[_crop_box(ink, robust)]
    out = _fitted(ink, 20.0, source)
    if robust:
        width = stroke_width(out > THICK_LEVEL * float(out.max()))
        if width > THICK_WIDTH:  # (a box of at most 28: a blob's width would ask for more)
            out = _fitted(ink, min(28.0, 20.0 * (20.0 - THICK_WIDTH) / max(20.0 - width, 1.0)), source)
    return torch.from_numpy(out)


def _fitted(ink: np.ndarray, side: float, source) -> np.ndarray:
    """Cropped ink (0-255 peak) fitted into a side x side box (its longer side), centred by mass in 28x28 (uint8)."""
    ch, cw = ink.shape
    scale = side / max(ch, cw)
    nh, nw = max(1, round(ch * scale)), max(1, round(cw * scale))
    fitted = Image.fromarray(ink.astype(np.float32), mode="F").resize((nw, nh), Image.Resampling.LANCZOS)
    fitted = np.clip(np.asarray(fitted), 0, 255)
    total = fitted.sum()
    if total <= 0:
        raise RetrievalError(f"{source}: no ink left after resizing")
    yy, xx = np.arange(nh)[:, None], np.arange(nw)[None, :]  # (the products and sums np.mgrid's grids give)
    cy, cx = (yy * fitted).sum() / total, (xx * fitted).sum() / total
    top = int(min(max(round(14 - cy), 0), 28 - nh))
    left = int(min(max(round(14 - cx), 0), 28 - nw))
    out = np.zeros((28, 28), dtype=np.float32)
    out[top : top + nh, left : left + nw] = fitted
    return np.rint(out).astype(np.uint8)
