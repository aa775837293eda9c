"""Digits as the picture files users send: a 28x28 digit + a seed -> an encoded picture, per family.

The robustness sets of retrieval.data.corrupt are 28x28 arrays; users send files (old scans, the web page's canvas,
phone photos, screenshots) that go through the picture path (retrieval.data.preprocess: decode -> grey ->
background -> ink crop -> 28x28). Each family here renders an MNIST digit (uint8 28x28, white ink on black) the way
such a file would look, deterministically for a seed, and encodes it as that kind of file:

  scan-8|10|14|20   an old scan: the digit cropped so its ink touches the frame, area-reduced to NxN on grey paper,
                    upscaled bilinear or bicubic to a square of 64-300 px, a little sensor noise, JPEG (quality
                    45-90), grey (L)
  scan-thick        thick, soft strokes (grown 1-2.5 px at 28x28, then blurred) touching the frame, 64x64 JPEG:
                    the scans a background flattening can mistake for background
  canvas-mouse      the web page's export (retrieval/web: 280x280 canvas, white, #111 ink, round pen 18 px, strokes
                    as segments between pointer events): the digit's skeleton drawn through pointer events a few px
                    apart (a mouse), RGBA PNG
  canvas-finger     the same with events 12-30 px apart and a shakier hand (a finger on a phone): polygonal strokes
  canvas-560        canvas-mouse on a 560x560 canvas (a high-density screen), pen 36 px
  photo-1024        a phone photo of the digit written on paper, 1024x768 JPEG (RGB): paper texture, perspective,
                    a lighting gradient, a soft shadow, defocus blur, sensor noise
  photo-3000        the same at 3000x4000 (portrait)
  photo-far         photo-1024 taken from further away: the digit's 28x28 frame is 6-18% of the short side (not
                    25-50%), so its ink is under half a percent of the picture
  photo-shadow      photo-1024 under a hard light: the shadow's edge is sharp (a few px, not 4-10% of the page),
                    and the digit's frame 6-50% of the short side
  lined             the digit written on lined paper, squared one time in three (lines 1-1.5% of the picture wide
                    every 12-20% of it, 0.2-0.8 as dark as the ink, a little off level), a square of 200-320 px, grey
                    JPEG (quality 70-90)
  screenshot        a printed digit as a screenshot (DejaVu or Liberation, light or dark theme), RGB PNG; it draws
                    the digit's LABEL, not the array, so it needs `label`
  mnistc-NAME       the MNIST-C corruption NAME (retrieval.data.corrupt) of the digit, as a picture 2-10 times the
                    size (bilinear, bicubic or nearest), grey PNG, white on black as MNIST-C has it

`ARRAY_COUNTERPART` names, per family, the 28x28 corruption of retrieval.data.corrupt that imitates it (None: the
clean digit), for measuring the arrays beside the pictures. HELD_OUT families are kept out of every choice of
recipe and preprocessing (report them apart): `screenshot` (printed digits: the system fonts are for measurement
only) and `photo-3000` (a size nothing is tuned on).
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from retrieval.errors import UsageError

MNIST_C = ("shot_noise", "impulse_noise", "glass_blur", "motion_blur", "shear", "scale", "rotate", "brightness",
           "translate", "stripe", "fog", "spatter", "dotted_line", "zigzag", "canny_edges")

FAMILIES: dict[str, str] = {  # name -> group
    **{f"scan-{n}": "scan" for n in (8, 10, 14, 20)},
    "scan-thick": "scan",
    "canvas-mouse": "canvas", "canvas-finger": "canvas", "canvas-560": "canvas",
    "photo-1024": "photo", "photo-3000": "photo", "photo-far": "photo", "photo-shadow": "photo",
    "lined": "lined",
    "screenshot": "screenshot",
    **{f"mnistc-{name}": "mnist-c" for name in MNIST_C},
}
HELD_OUT = frozenset({"screenshot", "photo-3000"})
ARRAY_COUNTERPART: dict[str, str | None] = {
    "scan-8": "lowres-8", "scan-10": "lowres-10", "scan-14": "lowres-14", "scan-20": None, "scan-thick": "thick",
    "canvas-mouse": "canvas", "canvas-finger": "canvas", "canvas-560": "canvas",
    "photo-1024": "photo", "photo-3000": "photo", "photo-far": "photo", "photo-shadow": "photo", "lined": None,
    "screenshot": None,
    **{f"mnistc-{name}": name for name in MNIST_C},
}
NEEDS_LABEL = frozenset({"screenshot"})


@dataclass(frozen=True)
class Picture:
    """An encoded picture file: its bytes, the file suffix it goes by, its size (w, h) and PIL mode."""

    data: bytes
    suffix: str
    size: tuple[int, int]
    mode: str

    def open(self) -> Image.Image:
        return Image.open(io.BytesIO(self.data))


def _rng(family: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(family.encode())])


def _check(digit) -> np.ndarray:
    d = np.asarray(digit)
    if d.shape != (28, 28) or d.dtype != np.uint8:
        raise UsageError(f"`digit` must be a uint8 28x28 array, got {d.dtype} {d.shape}")
    return d


def _encode(img: Image.Image, fmt: str, **params) -> Picture:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return Picture(buf.getvalue(), ".png" if fmt == "PNG" else ".jpg", img.size, img.mode)


def _grey(a: np.ndarray) -> Image.Image:
    return Image.fromarray(np.rint(np.clip(a, 0, 255)).astype(np.uint8), mode="L")


def _resized(a: np.ndarray, size: tuple[int, int], resample) -> np.ndarray:
    """A float array resized with PIL (size is (w, h))."""
    return np.asarray(Image.fromarray(a.astype(np.float32), mode="F").resize(size, resample), dtype=np.float32)


def _framed(digit: np.ndarray) -> np.ndarray:
    """The digit cropped to its ink (levels over 20), padded to a square: the ink touches two opposite sides."""
    ys, xs = np.nonzero(digit > 20)
    if len(ys) == 0:
        return digit.astype(np.float32)
    a = digit[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float32)
    h, w = a.shape
    side = max(h, w)
    out = np.zeros((side, side), np.float32)
    out[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = a
    return out


# ----------------------------------------------------------------------------------------------- scans

def _scan(n: int):
    def render(digit: np.ndarray, rng: np.random.Generator) -> Picture:
        ink = _resized(_framed(digit) / 255.0, (n, n), Image.Resampling.BOX)
        paper, level = rng.uniform(150, 235), rng.uniform(10, 80)
        small = paper * (1 - ink) + level * ink
        side = int(rng.integers(64, 301))
        resample = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)[int(rng.integers(2))]
        page = _resized(small, (side, side), resample) + rng.normal(0, rng.uniform(1, 4), (side, side))
        return _encode(_grey(page), "JPEG", quality=int(rng.integers(45, 91)))
    return render


def _scan_thick(digit: np.ndarray, rng: np.random.Generator) -> Picture:
    from scipy import ndimage

    grown = ndimage.grey_dilation(digit.astype(np.float32), footprint=_disc(rng.uniform(1.0, 2.5)))
    ink = _resized(_framed(np.clip(grown, 0, 255).astype(np.uint8)) / 255.0, (64, 64), Image.Resampling.BILINEAR)
    ink = ndimage.gaussian_filter(ink, rng.uniform(1.5, 3.0), mode="nearest")
    ink = ink / max(float(ink.max()), 1e-6) * rng.uniform(0.8, 1.0)
    paper, level = rng.uniform(170, 240), rng.uniform(20, 90)
    page = paper * (1 - ink) + level * ink + rng.normal(0, 2.0, ink.shape)
    return _encode(_grey(page), "JPEG", quality=int(rng.integers(60, 91)))


def _disc(radius: float) -> np.ndarray:
    r = int(np.ceil(radius))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return xx ** 2 + yy ** 2 <= radius ** 2 + 1e-9


# ----------------------------------------------------------------------------------------------- canvas

def _strokes(digit: np.ndarray) -> list[np.ndarray]:
    """The digit's skeleton (Zhang-Suen at 112x112) as ordered polylines of (x, y) in 28x28 units."""
    from retrieval.data.corruptions.image_ops import skeleton

    skel = skeleton(digit[None].astype(np.float32) / 255.0, 4)[0]
    left = {(int(y), int(x)) for y, x in zip(*np.nonzero(skel))}

    def free_neighbours(p):
        return [(p[0] + dy, p[1] + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                if (dy or dx) and (p[0] + dy, p[1] + dx) in left]

    paths = []
    while left:
        start = min(left, key=lambda p: (len(free_neighbours(p)), p))  # an end of a stroke where there is one
        path, cur, heading = [start], start, None
        left.discard(start)
        while True:
            options = free_neighbours(cur)
            if not options:
                break

            def turn(q):
                step = np.array([q[0] - cur[0], q[1] - cur[1]], float)
                straight = 0.0 if heading is None else -float(step @ heading) / np.linalg.norm(step)
                return (straight, abs(step).sum(), q)  # go on straight; 4-neighbours before diagonals

            nxt = min(options, key=turn)
            heading = np.array([nxt[0] - cur[0], nxt[1] - cur[1]], float)
            heading /= np.linalg.norm(heading)
            path.append(nxt)
            left.discard(nxt)
            cur = nxt
        if len(path) >= 3 or not paths:
            paths.append(np.array(path, float)[:, ::-1] / 4.0)  # (x, y) at 28x28
    return paths


def _pointer_events(path: np.ndarray, step: float, wobble: float, rng: np.random.Generator) -> np.ndarray:
    """Points along a polyline `step` apart (canvas px), each off by a hand's wobble: the pointer events."""
    seg = np.linalg.norm(np.diff(path, axis=0), axis=1)
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    if arc[-1] <= 0:
        return path[:1] + rng.normal(0, wobble, (1, 2))
    at = np.arange(0.0, arc[-1], step * rng.uniform(0.7, 1.3))
    at = np.append(at, arc[-1])
    pts = np.stack([np.interp(at, arc, path[:, 0]), np.interp(at, arc, path[:, 1])], 1)
    return pts + rng.normal(0, wobble, pts.shape)


def _canvas(size: int, step: tuple[float, float], wobble: float):
    def render(digit: np.ndarray, rng: np.random.Generator) -> Picture:
        pen = 18 * size / 280  # the page's lineWidth, on a canvas `size` px wide
        paths = _strokes(digit)
        allpts = np.concatenate(paths)
        lo, hi = allpts.min(0), allpts.max(0)
        extent = max(float((hi - lo).max()), 1.0)
        scale = rng.uniform(0.45, 0.8) * size / extent  # the digit spans 45-80% of the pad
        room = size - extent * scale - pen
        offset = (rng.uniform(pen / 2, pen / 2 + max(room, 0.0), 2) - lo * scale)
        ss = 4  # drawn at 4x and reduced: anti-aliased edges about 1 px wide, as a browser draws them
        img = Image.new("L", (size * ss, size * ss), 255)
        d = ImageDraw.Draw(img)
        r = pen * ss / 2
        for path in paths:
            pts = _pointer_events(path * scale + offset, rng.uniform(*step), wobble, rng) * ss
            for x, y in pts:  # round caps and joins (and the dot of pointerdown)
                d.ellipse((x - r, y - r, x + r, y + r), fill=17)
            if len(pts) > 1:
                d.line([tuple(p) for p in pts], fill=17, width=int(round(pen * ss)))
        grey = img.reduce(ss)
        return _encode(Image.merge("RGBA", (grey, grey, grey, Image.new("L", grey.size, 255))), "PNG")
    return render


# ----------------------------------------------------------------------------------------------- photos

def _photo(width: int, height: int, work: tuple[int, int], sides: tuple[float, float] = (0.25, 0.5),
           shadow_edge: tuple[float, float] = (0.04, 0.1)):
    def render(digit: np.ndarray, rng: np.random.Generator) -> Picture:
        from scipy import ndimage

        w, h = work  # composed at this size, then scaled to the photo's
        paper = np.array([rng.uniform(205, 240), rng.uniform(200, 235), rng.uniform(190, 225)], np.float32)
        texture = ndimage.gaussian_filter(rng.normal(0, 1, (h // 8, w // 8)).astype(np.float32), 2)
        texture *= rng.uniform(2, 6) / max(float(texture.std()), 1e-6)
        # lighting: a gradient across the page and a soft shadow from one side (smooth: made on a coarse grid)
        yy, xx = np.mgrid[0:h // 8, 0:w // 8].astype(np.float32)
        xx, yy = xx / (w // 8) - 0.5, yy / (h // 8) - 0.5
        angle, sa = rng.uniform(0, 2 * np.pi, 2)
        light = 1 + rng.uniform(0.15, 0.45) * (np.cos(angle) * xx + np.sin(angle) * yy)
        edge = np.cos(sa) * xx + np.sin(sa) * yy - rng.uniform(0.1, 0.4)
        light *= 1 - rng.uniform(0.2, 0.45) / (1 + np.exp(-edge / rng.uniform(*shadow_edge)))
        light = _resized(light, (w, h), Image.Resampling.BILINEAR)[..., None]
        page = (paper[None, None, :] + _resized(texture, (w, h), Image.Resampling.BILINEAR)[..., None]) * light
        # the digit in pen: `sides` of the short side (its 28x28 frame), near the centre
        side = int(rng.uniform(*sides) * min(w, h))
        ink = _resized(digit.astype(np.float32) / 255.0, (side, side), Image.Resampling.BICUBIC).clip(0, 1)
        ink = (ink * rng.uniform(0.85, 1.0))[..., None]
        x0 = int(w / 2 - side / 2 + rng.uniform(-0.15, 0.15) * w)
        y0 = int(h / 2 - side / 2 + rng.uniform(-0.15, 0.15) * h)
        colour = np.array([rng.uniform(15, 50), rng.uniform(15, 50), rng.uniform(30, 90)], np.float32)
        box = (slice(y0, y0 + side), slice(x0, x0 + side))
        page[box] = page[box] * (1 - ink) + colour * light[box] * ink
        img = Image.fromarray(np.clip(page, 0, 255).astype(np.uint8), "RGB")
        # perspective: the page seen from a little off-axis (each corner taken up to 8% inwards: the paper
        # still fills the frame)
        corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], float)
        inwards = np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]], float)
        moved = corners + inwards * rng.uniform(0.01, 0.08, (4, 2)) * [w, h]  # (>= 1%: no sample off the page)
        img = img.transform((w, h), Image.Transform.PERSPECTIVE, _perspective(corners, moved),
                            Image.Resampling.BILINEAR, fillcolor=tuple(int(v) for v in paper))
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 2.0) * w / 1024))  # defocus
        if (w, h) != (width, height):
            img = img.resize((width, height), Image.Resampling.BICUBIC)
        grain = rng.standard_normal((height, width, 1), dtype=np.float32) * rng.uniform(1.5, 4)
        noisy = np.asarray(img, np.int16) + np.rint(grain).astype(np.int16)
        img = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")
        return _encode(img, "JPEG", quality=int(rng.integers(75, 93)))
    return render


def _perspective(dst: np.ndarray, src: np.ndarray) -> tuple:
    """PIL's 8 perspective coefficients mapping output corners `dst` to input points `src`."""
    a = []
    for (x, y), (u, v) in zip(dst, src):
        a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    return tuple(np.linalg.solve(np.array(a, float), src.reshape(8)))


# ----------------------------------------------------------------------------------------------- screenshots

@lru_cache(maxsize=1)
def _screen_fonts() -> tuple[Path, ...]:
    fonts = sorted(f for d in ("dejavu", "liberation") for f in Path("/usr/share/fonts/truetype", d).glob("*.ttf"))
    if not fonts:
        raise UsageError("the screenshot family draws with the DejaVu or Liberation fonts "
                         "(/usr/share/fonts/truetype/{dejavu,liberation}); none is installed")
    return tuple(fonts)


def _screenshot(digit: np.ndarray, rng: np.random.Generator, label: str) -> Picture:
    fonts = _screen_fonts()
    font = ImageFont.truetype(str(fonts[int(rng.integers(len(fonts)))]), int(rng.integers(16, 65)))
    dark = rng.random() < 0.3
    bg = (30, 30, 30) if dark else tuple(int(v) for v in rng.integers(235, 256, 3))
    fg = tuple(int(v) for v in rng.integers(200, 240, 3)) if dark else tuple(int(v) for v in rng.integers(0, 60, 3))
    box = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), label, font=font)
    tw, th = box[2] - box[0], box[3] - box[1]
    w, h = int(tw * rng.uniform(2, 5)) + 8, int(th * rng.uniform(1.6, 3)) + 8
    img = Image.new("RGB", (w, h), bg)
    x = rng.uniform(4, w - tw - 4) - box[0]
    y = rng.uniform(4, h - th - 4) - box[1]
    ImageDraw.Draw(img).text((x, y), label, fill=fg, font=font)
    return _encode(img, "PNG")


# ----------------------------------------------------------------------------------------------- lined paper

def _lined(digit: np.ndarray, rng: np.random.Generator) -> Picture:
    side = int(rng.integers(200, 321))
    paper, ink_level = rng.uniform(200, 245), rng.uniform(10, 60)
    line_share, spacing = rng.uniform(0.2, 0.8), rng.uniform(0.12, 0.2) * side
    lines = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(lines)
    tilt = rng.uniform(-0.01, 0.01) * side
    width = max(1, int(rng.uniform(0.01, 0.015) * side))
    y = rng.uniform(0, spacing)
    while y < side:
        draw.line([(0, y - tilt), (side - 1, y + tilt)], fill=255, width=width)
        y += spacing
    if rng.random() < 1 / 3:  # squared paper
        x = rng.uniform(0, spacing)
        while x < side:
            draw.line([(x + tilt, 0), (x - tilt, side - 1)], fill=255, width=width)
            x += spacing
    size = int(side * rng.uniform(0.6, 0.85))
    ink = np.zeros((side, side), np.float32)
    x0, y0 = rng.integers(0, side - size + 1, 2)
    ink[y0:y0 + size, x0:x0 + size] = _resized(digit / 255.0, (size, size), Image.Resampling.BILINEAR)
    ink = np.maximum(ink, np.asarray(lines, np.float32) / 255 * line_share)
    page = paper - (paper - ink_level) * ink + rng.normal(0, 2.0, ink.shape)
    return _encode(_grey(page), "JPEG", quality=int(rng.integers(70, 91)))


# ----------------------------------------------------------------------------------------------- MNIST-C

def _mnistc(name: str):
    def render(digit: np.ndarray, rng: np.random.Generator) -> Picture:
        from retrieval.data.corrupt import corrupt

        a = corrupt(digit[None], name, seed=int(rng.integers(2 ** 31)))[0]
        side = 28 * int(rng.integers(2, 11))
        resample = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC,
                    Image.Resampling.NEAREST)[int(rng.integers(3))]
        return _encode(Image.fromarray(a, mode="L").resize((side, side), resample), "PNG")
    return render


_RENDER = {
    **{f"scan-{n}": _scan(n) for n in (8, 10, 14, 20)},
    "scan-thick": _scan_thick,
    "canvas-mouse": _canvas(280, (2.0, 6.0), 0.4),
    "canvas-finger": _canvas(280, (12.0, 30.0), 1.5),
    "canvas-560": _canvas(560, (4.0, 12.0), 0.8),
    "photo-1024": _photo(1024, 768, (1024, 768)),
    "photo-3000": _photo(3000, 4000, (750, 1000)),
    "photo-far": _photo(1024, 768, (1024, 768), sides=(0.06, 0.18)),
    "photo-shadow": _photo(1024, 768, (1024, 768), sides=(0.06, 0.5), shadow_edge=(0.003, 0.01)),
    "lined": _lined,
    **{f"mnistc-{name}": _mnistc(name) for name in MNIST_C},
}


def render(digit, family: str, seed: int, label: str | int | None = None) -> Picture:
    """The picture file of `family` for a uint8 28x28 MNIST digit; the same for the same seed. `label` (the digit's
    class) is needed by the families that draw the class rather than the array (NEEDS_LABEL)."""
    if family not in FAMILIES:
        raise UsageError(f"unknown picture family {family!r}; expected one of: {', '.join(FAMILIES)}")
    d = _check(digit)
    rng = _rng(family, seed)
    if family == "screenshot":
        if label is None:
            raise UsageError("the screenshot family draws the digit's label: pass `label`")
        return _screenshot(d, rng, str(label))
    return _RENDER[family](d, rng)
