"""Marks drawn as people write them, for the gate's non-digit sets (retrieval.data.nondigits): strokes along a
wobbly pen and font glyphs in a hand's slant, both with elastic distortion, paper and ink tones and a little sensor
noise (dark ink on light paper, uint8)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _elastic(a: np.ndarray, rng: np.random.Generator, pixels: float) -> np.ndarray:
    """A smooth random warp (a 4x4 grid of displacements upsampled cubically) moving pixels by up to `pixels`."""
    from scipy import ndimage

    if pixels <= 0:
        return a
    h, w = a.shape
    coarse = rng.uniform(-1, 1, (2, 4, 4))
    field = np.stack([ndimage.zoom(c, (h / 4, w / 4), order=3, mode="nearest")[:h, :w] for c in coarse]) * pixels
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return ndimage.map_coordinates(a, [yy + field[0], xx + field[1]], order=1, mode="nearest")


def _hand_matrix(rng: np.random.Generator) -> np.ndarray:
    """How a hand holds the page: rotation up to 15 degrees, shear up to 0.3, aspect up to 1.3x either way."""
    ang = np.deg2rad(rng.uniform(-15, 15))
    shear = rng.uniform(-0.3, 0.3)
    aspect = np.exp(rng.uniform(-0.26, 0.26))
    rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    return rot @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([aspect, 1 / aspect])


def _finish(a: np.ndarray, rng: np.random.Generator, paper: float) -> np.ndarray:
    """Elastic distortion, then a little sensor noise, as an 8-bit picture."""
    size = min(a.shape)
    a = _elastic(a, rng, size * rng.uniform(0.0, 0.035))
    a = a + rng.normal(0, rng.uniform(0, 6), a.shape)
    return np.clip(a, 0, 255).astype(np.uint8)


def draw_strokes(strokes, rng: np.random.Generator) -> np.ndarray:
    """Strokes (lists of (k, 2) points, y down) drawn as a hand writes them: a wobbly pen of random width along
    transformed strokes on a canvas of 40-112 px (dark ink on light paper, uint8)."""
    from PIL import Image, ImageDraw

    pts = np.concatenate(strokes)
    lo, hi = pts.min(0), pts.max(0)
    span = float(max((hi - lo).max(), 1e-3))
    m = _hand_matrix(rng)
    size = int(rng.integers(40, 113))
    wobble = rng.uniform(0, 0.025)
    moved = []
    for s in strokes:
        s = (np.asarray(s, np.float64) - (lo + hi) / 2) / span
        if len(s) > 1:  # resample so the wobble is smooth along the stroke, whatever the source's point spacing
            seg = np.r_[0, np.cumsum(np.linalg.norm(np.diff(s, axis=0), axis=1))]
            k = max(2, int(seg[-1] / 0.03) + 1)
            u = np.linspace(0, seg[-1], k)
            s = np.stack([np.interp(u, seg, s[:, 0]), np.interp(u, seg, s[:, 1])], 1)
            drift = np.cumsum(rng.normal(0, 1, (len(s), 2)), 0)
            drift -= np.linspace(0, 1, len(s))[:, None] * drift[-1]  # a bridge: ends stay near their places
            s = s + wobble * drift / max(1.0, np.sqrt(len(s)))
        moved.append(s @ m.T)
    allp = np.concatenate(moved)
    lo2, hi2 = allp.min(0), allp.max(0)
    fill = rng.uniform(0.55, 0.85) * size / max(float((hi2 - lo2).max()), 1e-3)
    offset = size / 2 - (lo2 + hi2) / 2 * fill + rng.uniform(-0.06, 0.06, 2) * size
    paper = float(rng.uniform(170, 256))
    ink = float(rng.uniform(0, max(1.0, paper - 90)))
    pen = max(1, int(round(size * rng.uniform(0.02, 0.09))))
    img = Image.new("L", (size, size), int(paper))
    d = ImageDraw.Draw(img)
    for s in moved:
        p = [tuple(v) for v in (s * fill + offset)]
        if len(p) == 1:
            p = p * 2
        d.line(p, fill=int(ink), width=pen, joint="curve")
        r = pen / 2
        for x, y in (p[0], p[-1]):  # round pen tips
            d.ellipse((x - r, y - r, x + r, y + r), fill=int(ink))
    return _finish(np.asarray(img, np.float32), rng, paper)


def draw_glyph(font_path: Path, ch: str, rng: np.random.Generator) -> np.ndarray:
    """One character of a font as handwriting in that hand: random size, hand transform, stroke weight thinner or
    bolder, elastic distortion (dark ink on light paper, uint8)."""
    from PIL import Image, ImageDraw, ImageFont

    size = int(rng.integers(48, 113))
    paper = float(rng.uniform(170, 256))
    ink = float(rng.uniform(0, max(1.0, paper - 90)))
    big = 2 * size
    font = ImageFont.truetype(str(font_path), int(size * rng.uniform(0.5, 0.75)))
    img = Image.new("L", (big, big), 255)
    ImageDraw.Draw(img).text((big / 2, big / 2), ch, fill=0, font=font, anchor="mm")
    return _in_hand(img, size, paper, ink, rng)


def draw_outlines(outlines, rng: np.random.Generator) -> np.ndarray:
    """A glyph given by its closed outlines ((k, 2) points, y down; filled by the nonzero rule, as fonts are: a
    hole runs the other way round) drawn as draw_glyph draws a font's character (dark ink on light paper, uint8)."""
    from PIL import Image, ImageDraw

    size = int(rng.integers(48, 113))
    paper = float(rng.uniform(170, 256))
    ink = float(rng.uniform(0, max(1.0, paper - 90)))
    big = 2 * size
    pts = np.concatenate(outlines)
    lo, hi = pts.min(0), pts.max(0)
    scale = size * rng.uniform(0.4, 0.65) / float(max((hi - lo).max(), 1e-3))
    winding = np.zeros((big, big), np.int16)
    for outline in outlines:
        p = (outline - (lo + hi) / 2) * scale + big / 2
        turn = np.sign(np.sum(p[:, 0] * np.roll(p[:, 1], -1) - np.roll(p[:, 0], -1) * p[:, 1]))  # (shoelace)
        layer = Image.new("1", (big, big), 0)
        ImageDraw.Draw(layer).polygon([tuple(v) for v in p], fill=1)
        winding += np.asarray(layer).astype(np.int16) * int(turn)
    return _in_hand(Image.fromarray(np.where(winding != 0, 0, 255).astype(np.uint8)), size, paper, ink, rng)


def _in_hand(img, size: int, paper: float, ink: float, rng: np.random.Generator) -> np.ndarray:
    """A glyph drawn black on white in the middle of a square twice `size` -> in a hand's slant and weight, on
    paper (draw_glyph, draw_outlines)."""
    from PIL import Image, ImageFilter

    big = img.size[0]
    weight = int(rng.integers(-1, 3))  # thinner, as is, or bolder by 1-2 px
    if weight > 0:
        img = img.filter(ImageFilter.MinFilter(2 * weight + 1))
    elif weight < 0:
        img = img.filter(ImageFilter.MaxFilter(3))
    m = np.linalg.inv(_hand_matrix(rng))
    c = big / 2
    shift = c - m @ np.array([c, c])
    img = img.transform((big, big), Image.Transform.AFFINE, (*m[0], shift[0], *m[1], shift[1]),
                        resample=Image.Resampling.BILINEAR, fillcolor=255)
    a = np.asarray(img, np.float32) / 255.0
    a = paper * a + ink * (1 - a)
    lo = big // 2 - size // 2
    return _finish(a[lo:lo + size, lo:lo + size], rng, paper)
