"""Pixel operations the corruption families share, on float batches (N, H, W) in [0, 1]: conversions, blur,
affine warps, MNIST-C's line and plasma layers, skeletons and distance maps."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage


def as_float(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) / 255.0


def as_uint8(x: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def gauss(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of each image of a (N, H, W) float batch (not across images)."""
    return ndimage.gaussian_filter(x, sigma=(0, sigma, sigma), mode="nearest", truncate=4.0)


def warp(x: np.ndarray, matrices: np.ndarray) -> np.ndarray:
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


def line_layer(c0: np.ndarray, r0: np.ndarray, c1: np.ndarray, r1: np.ndarray, size: int = 28) -> np.ndarray:
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


def plasma(n: int, rng: np.random.Generator, mapsize: int = 256, decay: float = 1.4) -> np.ndarray:
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


def zhang_suen(b: np.ndarray) -> np.ndarray:
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


def upsample(x: np.ndarray, size: int) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[:, None]
    return torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()


def downsample(x: np.ndarray, size: int) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[:, None]
    return torch.nn.functional.adaptive_avg_pool2d(t, size)[:, 0].numpy()


def distance_to(mask: np.ndarray) -> np.ndarray:
    """Per image, Euclidean distance of every pixel to the nearest True pixel (inf-free: empty masks give 1e3)."""
    out = np.full(mask.shape, 1e3, dtype=np.float32)
    for i, m in enumerate(mask):
        if m.any():
            out[i] = ndimage.distance_transform_edt(~m)
    return out


def skeleton(x: np.ndarray, scale: int) -> np.ndarray:
    """The digits' skeletons at `scale` times the resolution (ink = upsampled intensity over one half)."""
    return zhang_suen(upsample(x, x.shape[-1] * scale) > 0.5)
