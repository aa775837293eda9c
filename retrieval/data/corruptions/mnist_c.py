"""The 15 corruptions of MNIST-C (Mu & Gilmer, 2019), implemented from the paper's definitions with the
severities of its released set, on whole float batches (N, 28, 28) in [0, 1]; each takes (x, rng). Grouped by
family: noise, blur, affine, contrast, occlusion, edges (retrieval.data.corrupt registers them)."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from retrieval.data.corruptions.image_ops import as_float, as_uint8, gauss, line_layer, plasma, warp


# ----------------------------------------------------------------------------------------------- noise

def shot_noise(x, rng):
    return rng.poisson(x * 3.0) / 3.0


def impulse_noise(x, rng):
    out = x.copy()
    hit = rng.random(x.shape) < 0.17
    salt = rng.random(x.shape) < 0.5
    out[hit & salt], out[hit & ~salt] = 1.0, 0.0
    return out


# ----------------------------------------------------------------------------------------------- blur

def glass_blur(x, rng):
    y = as_uint8(gauss(x, 0.7)).copy()
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
    return gauss(as_float(y), 0.7)


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


# ----------------------------------------------------------------------------------------------- affine

def _about_centre(x, mats):
    return warp(x, mats)


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


# ----------------------------------------------------------------------------------------------- contrast

def brightness(x, rng):
    return x + 0.5


def fog(x, rng):
    out = np.empty_like(x)
    peak = x.max(axis=(1, 2), keepdims=True)
    for s in range(0, len(x), 256):
        layer = plasma(len(x[s:s + 256]), rng)[:, :28, :28]
        y = x[s:s + 256] + 3.0 * layer
        out[s:s + 256] = y * peak[s:s + 256] / (peak[s:s + 256] + 3.0)
    return out


# ----------------------------------------------------------------------------------------------- occlusion

def stripe(x, rng):
    out = x.copy()
    out[:, :, :7] = 1 - out[:, :, :7]
    out[:, :, 21:] = 1 - out[:, :, 21:]
    return out

def spatter(x, rng):
    liquid = gauss(rng.normal(0.65, 0.3, x.shape).astype(np.float32), 1.0)
    m = gauss((liquid > 0.65).astype(np.float32), 1.5)
    m[m < 0.8] = 0
    return x * (1 - m) + 63 / 255 * m


def dotted_line(x, rng):
    r = rng.integers(0, 27, (len(x), 2))
    layer = line_layer(np.zeros(len(x)), r[:, 0], np.full(len(x), 27.0), r[:, 1])
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
        segs = line_layer(cs[:-1], rs[:-1], cs[1:], rs[1:])
        img = out[k]
        for s in segs:
            img = np.clip(img + s, 0, 1)
        out[k] = img
    return out


# ----------------------------------------------------------------------------------------------- edges

def canny_edges(x, rng):
    """Canny (1986) on each image: Gaussian sigma 1, Sobel gradients, non-maximum suppression along the gradient
    direction, hysteresis between 0.1 and 0.2 (skimage.feature.canny's defaults for float images)."""
    s = ndimage.gaussian_filter(x, sigma=(0, 1, 1), mode="constant", truncate=4.0)
    # Sobel within each image: ndimage.sobel on the (n, h, w) stack would also smooth across neighbouring images
    # and mix their edges
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
