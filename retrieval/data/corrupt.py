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
"""

from __future__ import annotations

import io
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy import ndimage

from retrieval.errors import RetrievalError, UsageError

logger = logging.getLogger(__name__)

KIND = "mnist-c"
VERSION = "v1"
SEED = 0


# ----------------------------------------------------------------------------------------------- helpers

def _f(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) / 255.0


def _u8(x: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _gauss(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of each image of a (N, H, W) float batch (not across images)."""
    return ndimage.gaussian_filter(x, sigma=(0, sigma, sigma), mode="nearest", truncate=4.0)


def _warp(x: np.ndarray, matrices: np.ndarray) -> np.ndarray:
    """Affine warp of each image about the image centre: output pixel p samples input at A_i @ (p - c) + c,
    bilinear, zero outside (skimage.transform.warp with an inverse map, order 1, constant 0)."""
    n, h, w = x.shape
    t = torch.from_numpy(x).float()[:, None]
    a = torch.from_numpy(matrices).float()  # (N, 2, 2) in (x, y) pixel units
    theta = torch.zeros(n, 2, 3)
    # normalised coordinates with align_corners=False: u = (2p + 1) / size - 1; for square images the 2x2 part
    # carries over unchanged and the centre (13.5, 13.5) maps to 0.
    theta[:, :, :2] = a
    grid = torch.nn.functional.affine_grid(theta, (n, 1, h, w), align_corners=False)
    out = torch.nn.functional.grid_sample(t, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[:, 0].numpy()


def _line_layer(c0: np.ndarray, r0: np.ndarray, c1: np.ndarray, r1: np.ndarray, size: int = 28) -> np.ndarray:
    """MNIST-C's line: intensity log(1 - d / 2.3) + 1 (clipped at 0) of the vertical distance d to the line
    through (c0, r0), (c1, r1), between columns floor(c0) and ceil(c1); (N, size, size) for N segments."""
    cc = np.arange(size, dtype=np.float64)[None, None, :]
    rr = np.arange(size, dtype=np.float64)[None, :, None]
    c0, r0, c1, r1 = (np.asarray(v, dtype=np.float64)[:, None, None] for v in (c0, r0, c1, r1))
    flat = np.abs(c1 - c0) < 1e-9
    slope = np.where(flat, 0.0, (r1 - r0) / np.where(flat, 1.0, c1 - c0))
    d = np.clip(np.abs(rr - (slope * (cc - c0) + r0)), 0, 2.3 - 1e-10)
    out = np.clip(np.log(1 - d / 2.3) + 1, 0, 1)
    out = np.where((cc >= np.floor(c0)) & (cc < np.ceil(c1)) & ~flat, out, 0.0)
    return out


def _plasma(n: int, rng: np.random.Generator, mapsize: int = 256, decay: float = 1.4) -> np.ndarray:
    """Diamond-square plasma fractals (N, mapsize, mapsize) in [0, 1], one per image."""
    m = np.zeros((n, mapsize, mapsize), dtype=np.float32)
    step, wibble = mapsize, 100.0

    def wibbled(a):
        return a / 4 + wibble * rng.uniform(-wibble, wibble, a.shape).astype(np.float32)

    while step >= 2:
        half = step // 2
        corners = m[:, 0:mapsize:step, 0:mapsize:step]
        sq = corners + np.roll(corners, -1, axis=1)
        sq = sq + np.roll(sq, -1, axis=2)
        m[:, half:mapsize:step, half:mapsize:step] = wibbled(sq)
        dr = m[:, half:mapsize:step, half:mapsize:step]
        ul = m[:, 0:mapsize:step, 0:mapsize:step]
        lt = (dr + np.roll(dr, 1, axis=1)) + (ul + np.roll(ul, -1, axis=2))
        m[:, 0:mapsize:step, half:mapsize:step] = wibbled(lt)
        tt = (dr + np.roll(dr, 1, axis=2)) + (ul + np.roll(ul, -1, axis=1))
        m[:, half:mapsize:step, 0:mapsize:step] = wibbled(tt)
        step //= 2
        wibble /= decay
    m -= m.min(axis=(1, 2), keepdims=True)
    return m / m.max(axis=(1, 2), keepdims=True)


def _zhang_suen(b: np.ndarray) -> np.ndarray:
    """Skeletons (Zhang & Suen, 1984 thinning) of a boolean batch (N, H, W), all images at once."""
    img = np.pad(b.astype(np.uint8), ((0, 0), (1, 1), (1, 1)))
    while True:
        changed = False
        for step in (0, 1):
            p = img
            p2, p3, p4 = p[:, :-2, 1:-1], p[:, :-2, 2:], p[:, 1:-1, 2:]
            p5, p6, p7 = p[:, 2:, 2:], p[:, 2:, 1:-1], p[:, 2:, :-2]
            p8, p9 = p[:, 1:-1, :-2], p[:, :-2, :-2]
            seq = [p2, p3, p4, p5, p6, p7, p8, p9, p2]
            nb = sum(seq[:8]).astype(np.int32)
            trans = sum(((seq[i] == 0) & (seq[i + 1] == 1)).astype(np.int32) for i in range(8))
            if step == 0:
                c = (p2 * p4 * p6 == 0) & (p4 * p6 * p8 == 0)
            else:
                c = (p2 * p4 * p8 == 0) & (p2 * p6 * p8 == 0)
            rm = (p[:, 1:-1, 1:-1] == 1) & (nb >= 2) & (nb <= 6) & (trans == 1) & c
            if rm.any():
                changed = True
                img[:, 1:-1, 1:-1][rm] = 0
        if not changed:
            return img[:, 1:-1, 1:-1].astype(bool)


def _upsample(x: np.ndarray, size: int) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[:, None]
    return torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()


def _downsample(x: np.ndarray, size: int) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[:, None]
    return torch.nn.functional.adaptive_avg_pool2d(t, size)[:, 0].numpy()


def _distance_to(mask: np.ndarray) -> np.ndarray:
    """Per image, Euclidean distance of every pixel to the nearest True pixel (inf-free: empty masks give 1e3)."""
    out = np.full(mask.shape, 1e3, dtype=np.float32)
    for i, m in enumerate(mask):
        if m.any():
            out[i] = ndimage.distance_transform_edt(~m)
    return out


def _skeleton(x: np.ndarray, scale: int) -> np.ndarray:
    """The digits' skeletons at `scale` times the resolution (ink = upsampled intensity over one half)."""
    return _zhang_suen(_upsample(x, x.shape[-1] * scale) > 0.5)


# ----------------------------------------------------------------------------------------------- MNIST-C

def shot_noise(x, rng):
    return rng.poisson(x * 3.0) / 3.0


def impulse_noise(x, rng):
    out = x.copy()
    hit = rng.random(x.shape) < 0.17
    salt = rng.random(x.shape) < 0.5
    out[hit & salt], out[hit & ~salt] = 1.0, 0.0
    return out


def glass_blur(x, rng):
    y = _u8(_gauss(x, 0.7)).copy()
    n, h, w = y.shape
    rows = np.arange(n)
    for _ in range(2):
        for i in range(h - 1, 1, -1):  # MNIST-C's range(28 - 1, 1, -1)
            for j in range(w - 1, 1, -1):
                swap = rng.random(n) < 0.5
                d = rng.integers(-1, 1, size=(n, 2))  # MNIST-C's randint(-1, 1): -1 or 0
                k = rows[swap]
                i2, j2 = i + d[swap, 1], j + d[swap, 0]
                a, b = y[k, i, j].copy(), y[k, i2, j2].copy()
                y[k, i, j], y[k, i2, j2] = b, a
    return _gauss(_f(y), 0.7)


def motion_blur(x, rng):
    n, h, w = x.shape
    angle = np.deg2rad(rng.uniform(-45, 45, n))
    radius, sigma = 10, 3.0
    weights = np.exp(-np.arange(radius + 1) ** 2 / (2 * sigma ** 2))
    weights /= weights.sum()
    t = torch.from_numpy(x).float()[:, None]
    base = torch.nn.functional.affine_grid(torch.eye(2, 3).expand(n, 2, 3), (n, 1, h, w), align_corners=False)
    direction = torch.from_numpy(np.stack([np.cos(angle), -np.sin(angle)], 1)).float()  # (x, y) per image
    out = torch.zeros_like(t)
    for d, wgt in enumerate(weights):
        shift = (direction * (2.0 * d / w)).view(n, 1, 1, 2)
        out += float(wgt) * torch.nn.functional.grid_sample(t, base + shift, mode="bilinear",
                                                            padding_mode="border", align_corners=False)
    return out[:, 0].numpy()


def _about_centre(x, mats):
    return _warp(x, mats)


def shear(x, rng):
    s = 0.4 * rng.choice([-1.0, 1.0], len(x))
    # skimage's AffineTransform(shear=s) as an inverse map: x_in = x - sin(s) y... (rotation part 0)
    mats = np.zeros((len(x), 2, 2))
    mats[:, 0, 0], mats[:, 0, 1] = 1.0, -np.sin(s)
    mats[:, 1, 1] = np.cos(s)
    return _about_centre(x, mats)


def scale(x, rng):
    mats = np.zeros((len(x), 2, 2))
    mats[:, 0, 0] = mats[:, 1, 1] = 1 / 0.7
    return _about_centre(x, mats)


def rotate(x, rng):
    r = 0.4 * rng.choice([-1.0, 1.0], len(x))
    mats = np.stack([np.stack([np.cos(r), -np.sin(r)], 1), np.stack([np.sin(r), np.cos(r)], 1)], 1)
    return _about_centre(x, mats)


def translate(x, rng):
    sign = rng.choice([-1, 1], (len(x), 2))
    out = np.zeros_like(x)
    for i, (dx, dy) in enumerate(sign * 3):
        out[i] = ndimage.shift(x[i], (dy, dx), order=0, mode="constant", cval=0.0)
    return out


def brightness(x, rng):
    return x + 0.5


def stripe(x, rng):
    out = x.copy()
    out[:, :, :7] = 1 - out[:, :, :7]
    out[:, :, 21:] = 1 - out[:, :, 21:]
    return out


def fog(x, rng):
    out = np.empty_like(x)
    peak = x.max(axis=(1, 2), keepdims=True)
    for s in range(0, len(x), 256):
        layer = _plasma(len(x[s:s + 256]), rng)[:, :28, :28]
        y = x[s:s + 256] + 3.0 * layer
        out[s:s + 256] = y * peak[s:s + 256] / (peak[s:s + 256] + 3.0)
    return out


def spatter(x, rng):
    liquid = _gauss(rng.normal(0.65, 0.3, x.shape).astype(np.float32), 1.0)
    m = _gauss((liquid > 0.65).astype(np.float32), 1.5)
    m[m < 0.8] = 0
    return x * (1 - m) + 63 / 255 * m


def dotted_line(x, rng):
    r = rng.integers(0, 27, (len(x), 2))
    layer = _line_layer(np.zeros(len(x)), r[:, 0], np.full(len(x), 27.0), r[:, 1])
    cols = np.arange(28)
    layer[:, :, (cols < 28) & ((cols // 2) % 2 == 0)] = 0  # every other 2-px dash off, starting with the first
    return x + layer


def zigzag(x, rng):
    n = len(x)
    out = x.copy()
    a = b = 2.0
    c0, c1 = 2, 25
    r0 = rng.integers(0, 27, n).astype(np.float64)
    r1 = r0 + rng.integers(-5, 5, n)
    for k in range(n):
        theta = np.arctan((r1[k] - r0[k]) / (c1 - c0))
        d = (c1 - c0) / np.cos(theta)
        pts = [(0.0, 0.0)]
        r_i = 0.0
        for i in range(int((d - a) // (2 * a)) + 1):
            r_i = (-1) ** i * b
            pts.append(((2 * i + 1) * a, r_i))
        last = (2 * a) * (d // (2 * a))
        if d != last:
            pts.append((d, r_i / (2 * (d - last))))
        p = np.array(pts).T
        rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        cs, rs = rot @ p
        cs, rs = cs + c0, rs + r0[k]
        segs = _line_layer(cs[:-1], rs[:-1], cs[1:], rs[1:])
        img = out[k]
        for s in segs:
            img = np.clip(img + s, 0, 1)
        out[k] = img
    return out


def canny_edges(x, rng):
    """Canny (1986) on each image: Gaussian sigma 1, Sobel gradients, non-maximum suppression along the gradient
    direction, hysteresis between 0.1 and 0.2 (skimage.feature.canny's defaults for float images)."""
    s = ndimage.gaussian_filter(x, sigma=(0, 1, 1), mode="constant", truncate=4.0)
    # Sobel within each image: ndimage.sobel on the (n, h, w) stack would also smooth across neighbouring images
    # (revision 1 of this set did, so its edges mixed three digits; the cache folder is keyed by the revision)
    sobel_y = np.array([[[-1, -2, -1], [0, 0, 0], [1, 2, 1]]], np.float32)
    gy = ndimage.correlate(s, sobel_y, mode="constant")
    gx = ndimage.correlate(s, sobel_y.transpose(0, 2, 1), mode="constant")
    mag = np.hypot(gx, gy)
    ang = (np.rad2deg(np.arctan2(gy, gx)) + 180.0) % 180.0
    pad = np.pad(mag, ((0, 0), (1, 1), (1, 1)))
    h, w = x.shape[1:]

    def nb(dy, dx):
        return pad[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    sector = np.digitize(ang, [22.5, 67.5, 112.5, 157.5]) % 4  # 0: horizontal gradient, 1: 45, 2: 90, 3: 135
    offsets = {0: (0, 1), 1: (1, 1), 2: (1, 0), 3: (1, -1)}
    keep = np.zeros(x.shape, bool)
    for k, (dy, dx) in offsets.items():
        local = (mag >= nb(dy, dx)) & (mag >= nb(-dy, -dx))
        keep |= (sector == k) & local
    keep[:, [0, -1], :] = keep[:, :, [0, -1]] = False
    weak = keep & (mag >= 0.1)
    strong = keep & (mag >= 0.2)
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = True  # 8-connected within an image, never across images
    labels, count = ndimage.label(weak, structure=structure)
    good = np.zeros(count + 1, bool)
    good[np.unique(labels[strong])] = True
    good[0] = False
    return good[labels].astype(np.float32)


# ----------------------------------------------------------------------------------------------- beyond MNIST-C

def _lowres(size):
    def op(x, rng):
        return _upsample(_downsample(x, size), 28)
    op.__doc__ = f"area-downsampled to {size}x{size}, bilinear back to 28x28"
    return op


def thin(x, rng):
    sk = _skeleton(x, 4)
    ink = np.clip(2.5 - _distance_to(sk), 0, 1)  # a 5-px line at 4x: 1.25 px at 28x28
    return _downsample(ink, 28) * x.max(axis=(1, 2), keepdims=True)


def thick(x, rng):
    big = _upsample(x, 112)
    ink = np.clip(6.5 - _distance_to(big > 0.5), 0, 1)  # grown by 6 px at 4x: 1.5 px at 28x28
    return np.maximum(_downsample(ink, 28), x)


def _preprocessed(pictures: list[np.ndarray]) -> np.ndarray:
    from PIL import Image

    from retrieval.data.preprocess import preprocess_image

    out = np.zeros((len(pictures), 28, 28), dtype=np.float32)
    for i, p in enumerate(pictures):
        img = Image.fromarray(np.rint(np.clip(p, 0, 255)).astype(np.uint8), mode="L")
        try:
            out[i] = preprocess_image(img).numpy() / 255.0
        except RetrievalError:  # nothing left to find: an empty query, which must then fail to match
            out[i] = 0.0
    return out


def _photo(lighting: bool, blur: bool, jpeg: bool, grey: bool):
    def op(x, rng):
        from PIL import Image

        n, size = len(x), 112
        ink = np.clip(_upsample(x, size), 0, 1)
        paper = rng.uniform(0.55, 0.75, n) if grey else rng.uniform(0.92, 1.0, n)
        ink_level = paper - (rng.uniform(0.25, 0.4, n) if grey else rng.uniform(0.7, 0.85, n))
        page = paper[:, None, None] * (1 - ink) + ink_level[:, None, None] * ink
        if lighting:  # a smooth gradient from one side, plus a soft shadow blob
            yy, xx = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
            ang = rng.uniform(0, 2 * np.pi, n)[:, None, None]
            grad = (np.cos(ang) * xx + np.sin(ang) * yy)[...] * rng.uniform(0.5, 0.9, n)[:, None, None]
            cy, cx = rng.uniform(-0.5, 0.5, (2, n))[:, :, None, None]
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.08) * rng.uniform(0.1, 0.3, n)[:, None, None]
            page = page * np.clip(1 + grad - blob, 0.25, 1.6)
        if blur:
            page = _gauss(page.astype(np.float32), 2.0)
        page = np.clip(page + rng.normal(0, 0.02, page.shape), 0, 1) * 255.0
        pictures = []
        quality = rng.integers(10, 26, n)
        for i in range(n):
            p = page[i]
            if jpeg:
                buf = io.BytesIO()
                Image.fromarray(np.rint(p).astype(np.uint8), mode="L").save(buf, "JPEG", quality=int(quality[i]))
                buf.seek(0)
                p = np.asarray(Image.open(buf), dtype=np.float32)
            pictures.append(p)
        return _preprocessed(pictures)
    return op


def canvas(x, rng):
    n = len(x)
    sk = _skeleton(x, 4)  # 112x112
    pen = rng.uniform(5.6, 8.8, n)[:, None, None]  # pen width at 112: 14-22 px on the 280 canvas (the web pad: 18)
    ink = np.clip(pen / 2 + 0.5 - _distance_to(sk), 0, 1)
    pictures = 255.0 - (255.0 - 17.0) * _upsample(ink, 280)  # #111 ink on white, as retrieval/web draws
    return _preprocessed(list(pictures))


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
    Corruption("lowres-8", "low resolution", _lowres(8), False),
    Corruption("lowres-10", "low resolution", _lowres(10), False),
    Corruption("lowres-14", "low resolution", _lowres(14), False),
    Corruption("thin", "stroke width", thin, False),
    Corruption("thick", "stroke width", thick, False),
    Corruption("photo-lighting", "photo", _photo(True, False, False, False), False),
    Corruption("photo-blur", "photo", _photo(False, True, False, False), False),
    Corruption("photo-jpeg", "photo", _photo(False, False, True, False), False),
    Corruption("photo-grey", "photo", _photo(False, False, False, True), False),
    Corruption("photo", "photo", _photo(True, True, True, True), False),
    Corruption("canvas", "canvas", canvas, False),
)}


def corruption_names() -> list[str]:
    return list(CORRUPTIONS)


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
    return _u8(np.asarray(c.op(_f(x), rng), dtype=np.float32))


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
