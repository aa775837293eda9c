"""The picture path as it was before issue 25 (retrieval/data/preprocess.py at commit 1a91827), frozen: the baseline
that benchmarks/pictures.py times and scores side by side with the current one, and that tests/test_preprocess.py
compares the current 28x28 images against. Not used by the package."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from retrieval.errors import RetrievalError

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


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm", ".ppm")
PREPROCESSING = ("mnist-28x28: gray, invert light background, flatten uneven background, drop noise and specks, "
                 "crop ink, fit 20x20, centre of mass in 28x28")

# Pictures at least this many pixels on their short side get the background flattened and the ink found robustly
# (photos, scans, canvases); smaller ones are taken as they are (icons, already-small digits).
ROBUST_MIN_SIDE = 32


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


def _robust_ink(gray: np.ndarray) -> np.ndarray:
    """Light ink on a dark background that may be uneven (a photo's lighting, grey paper, shadows) and noisy ->
    the ink alone: the background is estimated by a grey opening wider than any stroke (a third of the short side,
    on a copy reduced to about 64 px) and subtracted; the noise level (median absolute deviation of what is left)
    is taken off; connected specks much smaller than the largest stroke are dropped; the brightest 1% of the ink
    saturates (so that a few hot pixels do not dim the digit)."""
    from scipy import ndimage

    h, w = gray.shape
    f = max(1, min(h, w) // 64)
    small = np.asarray(Image.fromarray(gray, mode="F").resize((max(1, w // f), max(1, h // f)),
                                                               Image.Resampling.BOX))
    k = max(3, min(small.shape) // 3) | 1
    bg = ndimage.uniform_filter(ndimage.grey_opening(small, size=(k, k), mode="nearest"), size=k, mode="nearest")
    bg = np.asarray(Image.fromarray(bg.astype(np.float32), mode="F").resize((w, h), Image.Resampling.BILINEAR))
    residual = gray - np.minimum(bg, gray)
    centre = float(np.median(residual))
    sigma = 1.4826 * float(np.median(np.abs(residual - centre)))
    ink = np.clip(residual - centre - 2.0 * sigma, 0, None)
    if float(ink.max()) <= 0:
        return ink
    mask = ink > max(0.15 * float(ink.max()), 2.0 * sigma)
    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    if count > 1:
        sizes = ndimage.sum_labels(np.ones_like(ink), labels, index=np.arange(1, count + 1))
        keep = np.concatenate([[False], sizes >= max(3.0, 0.05 * float(sizes.max()))])
        near = ndimage.binary_dilation(keep[labels], iterations=max(1, min(h, w) // 64))
        ink = np.where(near, ink, 0.0)
    top = float(np.percentile(ink[ink > 0], 99)) if (ink > 0).any() else 0.0
    return np.minimum(ink, top) if top > 0 else ink


def preprocess_image(img: Image.Image, source: str = "image") -> torch.Tensor:
    """The MNIST recipe: white-on-black, ink cropped, fitted into 20x20, centred by mass in 28x28 (uint8)."""
    check_pixel_budget(*img.size, source)
    gray = _to_gray(img)
    if min(gray.shape) > 2:
        border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
        background = float(np.median(border))
    else:  # no interior (1-pixel, 2-pixel-high...): the pixels are the ink, on the contrasting background
        background = 255.0 if gray.mean() < 128 else 0.0
    if background > 127:  # light background: ink is dark, invert to MNIST's white-on-black
        gray = 255.0 - gray
        background = 255.0 - background
    if min(gray.shape) >= ROBUST_MIN_SIDE and float(gray.max()) > float(gray.min()):
        ink = _robust_ink(gray)
    else:
        ink = np.clip(gray - background, 0, None)
    peak = float(ink.max())
    if peak <= 0:
        raise RetrievalError(f"{source}: no ink found (the picture is a single flat colour)")
    ink *= 255.0 / peak
    ys, xs = np.nonzero(ink > 0.1 * 255.0)
    ink = ink[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    ch, cw = ink.shape
    scale = 20.0 / max(ch, cw)
    nh, nw = max(1, round(ch * scale)), max(1, round(cw * scale))
    fitted = Image.fromarray(ink.astype(np.float32), mode="F").resize((nw, nh), Image.Resampling.LANCZOS)
    fitted = np.clip(np.asarray(fitted), 0, 255)
    total = fitted.sum()
    if total <= 0:
        raise RetrievalError(f"{source}: no ink left after resizing")
    yy, xx = np.mgrid[0:nh, 0:nw]
    cy, cx = (yy * fitted).sum() / total, (xx * fitted).sum() / total
    top = int(np.clip(round(14 - cy), 0, 28 - nh))
    left = int(np.clip(round(14 - cx), 0, 28 - nw))
    out = np.zeros((28, 28), dtype=np.float32)
    out[top : top + nh, left : left + nw] = fitted
    return torch.from_numpy(np.rint(out).astype(np.uint8))


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
                check_pixel_budget(*img.size, path)
                img = ImageOps.exif_transpose(img)
                img.load()
    except RetrievalError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RetrievalError(f"{path}: over the pixel budget (decompression bomb?)") from None
    except UnidentifiedImageError:
        raise RetrievalError(f"{path}: not a readable image (unknown format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise RetrievalError(f"{path}: cannot decode image ({e})") from None
    return preprocess_image(img, source=str(path))
