"""Finding the ink of a grey picture (float levels 0..255, white ink on black once retrieval.data.preprocess has
decided which way the ink goes): margin bands levelled onto the paper, an uneven background flattened, noise
measured and taken off, stray and faint marks dropped. Small pictures' helpers (median, percentiles) are numpy's
own figures from partial sorts."""

from __future__ import annotations

import numpy as np
from PIL import Image

# The background is estimated on a copy of about this short side (it varies slowly).
BACKGROUND_SIDE = 32
# On an uneven background, marks touching the picture's edges are left out where marks apart from them hold the ink's
# peak, within this share of it (_apart_from_the_edges): a shadow's band along the picture's side, or the narrow end
# of a hard-edged shadow cut off by it, is narrower than any opening that follows the lighting; it outsized a small
# digit, or the crop took it for the digit.
APART_PEAK = 0.9
# A background counts as even (one level, no flattening) when three corners differ by at most this share of the
# ink's contrast.
EVEN_CORNERS = 0.1
# How far the picture reaches above and below its background (retrieval.data.preprocess: the ink's direction) is read
# from this percentage of the pixels at each extreme. A digit seen from afar in a photo is under half a percent of the
# picture: wider tails read the lighting and the paper's grain instead.
INK_TAIL = 0.1

# -- margin bands -----------------------------------------------------------------------------------------------------
# Two opposite margins count as bands of another level than the paper when they differ from it by this many grey
# levels at least (a scanner's dark margins, inverted edge bands).
MARGIN_MIN_STEP = 64.0
# ... and are each at most this share of the picture's width (or height).
MARGIN_MAX_SHARE = 0.35
# Pictures narrower than this are not looked at for margins.
MARGIN_MIN_SIDE = 16


def margins_levelled(gray: np.ndarray) -> np.ndarray:
    """`gray` with two opposite margin bands (left and right, or top and bottom) brought to the paper's level, or
    `gray` itself when it has none. A band is read as inverted (a scanner's dark margins on white paper, MNIST-C's
    stripes): each of its columns is reflected about its own median onto the paper's level, so ink that crosses
    into a band is kept, and a band's blurred edge leaves no ridge. Without this the paper between the bands is
    taken for one block of ink."""
    edge = border(gray)
    if float(edge.max()) - float(edge.min()) < MARGIN_MIN_STEP:  # both levels would lie on the border
        return gray
    for axis in (1, 0):  # bands of columns, then of rows
        g = gray if axis == 1 else gray.T
        levelled = _column_bands_levelled(g)
        if levelled is not None:
            return levelled if axis == 1 else levelled.T
    return gray


def _column_bands_levelled(g: np.ndarray) -> np.ndarray | None:
    """margins_levelled for left and right bands of columns (None when `g` has no such pair)."""
    h, w = g.shape
    third = w // 3
    middle = np.concatenate([g[0, third:w - third], g[-1, third:w - third]])
    margin, paper = median(np.concatenate([g[:, 0], g[:, -1]])), median(middle)
    step = abs(margin - paper)
    if step < MARGIN_MIN_STEP:
        return None
    near_margin = np.abs(g[:, [0, -1]] - margin) < 0.25 * step
    if near_margin.mean(axis=0).min() < 0.9:  # each side a band all along
        return None
    if np.mean(np.abs(middle - paper) < 0.25 * step) < 0.8:  # the paper between them one level
        return None
    # each band's width: where the top and the bottom rows reach the paper (a band's edge is straight)
    off_paper = np.abs(g[[0, -1]] - paper) > 0.1 * step
    left, right = off_paper.argmin(axis=1), off_paper[:, ::-1].argmin(axis=1)
    if max(abs(int(left[0]) - int(left[1])), abs(int(right[0]) - int(right[1]))) > max(2, w // 20):
        return None
    left, right = int(left.max()), int(right.max())
    if max(left, right) > MARGIN_MAX_SHARE * w:
        return None
    out = g.copy()
    for cols in (slice(0, left), slice(w - right, w)):
        col_levels = np.median(g[:, cols], axis=0)  # each column's own level
        inverted = np.abs(col_levels - margin) < np.abs(col_levels - paper)
        sign = np.where(inverted, -1.0, 1.0)
        out[:, cols] = np.clip(paper + sign * (g[:, cols] - col_levels), 0.0, 255.0)
    return out


# -- finding the ink -------------------------------------------------------------------------------------------------
def _otsu(values: np.ndarray, bins: int = 64) -> float:
    """Otsu's threshold of `values` (the level that best splits them into two classes)."""
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return hi
    hist = np.bincount(np.minimum(((values - lo) * (bins / (hi - lo))).astype(np.int64), bins - 1).ravel(),
                       minlength=bins).astype(np.float64)
    p = hist / hist.sum()
    mids = lo + (np.arange(bins) + 0.5) * ((hi - lo) / bins)
    w0 = np.cumsum(p)
    m0 = np.cumsum(p * mids)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m0[-1] * w0 - m0) ** 2 / (w0 * (1.0 - w0))
    between[~np.isfinite(between)] = 0.0
    return lo + (int(np.argmax(between)) + 1) * ((hi - lo) / bins)


def median(values: np.ndarray) -> float:
    """float(np.median(values)) (the same number) from a partial sort: a fraction of its overhead on the few
    hundred border pixels of one picture."""
    flat = np.asarray(values).ravel()
    half = flat.size // 2
    if flat.size % 2:
        return float(np.partition(flat, half)[half])
    part = np.partition(flat, (half - 1, half))
    return float((part[half - 1] + part[half]) / 2)


def percentiles(values: np.ndarray, qs) -> np.ndarray:
    """np.percentile(values, qs) (its default, linear method; the same numbers) from a partial sort of the two
    order statistics around each q: a fraction of its overhead on the small arrays of one picture."""
    flat = np.asarray(values).ravel()
    pos = np.asarray(qs, dtype=np.float64) / 100.0 * (flat.size - 1)
    below = np.floor(pos).astype(np.int64)
    above = np.minimum(below + 1, flat.size - 1)
    part = np.partition(flat, sorted({*below.tolist(), *above.tolist()}))
    a, b, t = part[below], part[above], pos - below
    diff = b - a
    return np.where(t >= 0.5, b - diff * (1 - t), a + diff * t)  # numpy's own interpolation, both halves


def border(gray: np.ndarray) -> np.ndarray:
    return np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])


def _resized(a: np.ndarray, size: tuple[int, int], method=Image.Resampling.BILINEAR) -> np.ndarray:
    return np.asarray(Image.fromarray(np.asarray(a, dtype=np.float32), mode="F").resize(size, method))


def _grey_opening(a: np.ndarray, k: int) -> np.ndarray:
    """Grey opening of `a` with a k x k square (separable filters)."""
    from scipy import ndimage

    return ndimage.maximum_filter(ndimage.minimum_filter(a, size=k, mode="nearest"), size=k, mode="nearest")


def _opened(small: np.ndarray, k: int) -> np.ndarray:
    """Grey opening with a k x k square, smoothed by a k x k mean where that does not take it lower: the mean ramps
    across a hard shadow's step, and below the opening it would leave a band along the step's higher side that
    passes for a stroke."""
    from scipy import ndimage

    opening = _grey_opening(small, k)
    return np.maximum(opening, ndimage.uniform_filter(opening, size=k, mode="nearest"))


def stroke_width(mask: np.ndarray) -> float:
    """Mean width of the strokes of a mask: twice its area over its boundary (a w-wide stroke of length L has
    area wL and about 2L boundary pixels)."""
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    boundary = int(mask.sum() - inner.sum())
    return 2.0 * float(mask.sum()) / max(boundary, 1)


def _grown(mask: np.ndarray, r: int) -> np.ndarray:
    """`mask` dilated r times by the 4-neighbour cross (a diamond of radius r, as ndimage.binary_dilation with
    `iterations=r` gives; shifted ORs: faster than a filter on small pictures)."""
    out = mask
    for _ in range(r):
        prev, out = out, out.copy()
        out[1:] |= prev[:-1]
        out[:-1] |= prev[1:]
        out[:, 1:] |= prev[:, :-1]
        out[:, :-1] |= prev[:, 1:]
    return out


def _even_background(gray: np.ndarray, level: float) -> bool:
    """Whether three of the picture's corners (an eighth of each side) lie at one level, within EVEN_CORNERS of the
    ink's contrast (the brightest 0.5% against the border's `level`): one corner may hold ink."""
    h, w = gray.shape
    a, b = max(2, h // 8), max(2, w // 8)
    c = sorted(median(corner) for corner in (gray[:a, :b], gray[:a, -b:], gray[-a:, :b], gray[-a:, -b:]))
    contrast = float(percentiles(gray, (99.5,))[0]) - level
    return min(c[2] - c[0], c[3] - c[1]) <= EVEN_CORNERS * max(contrast, 1.0)


def _flattened(gray: np.ndarray, level: float) -> tuple[np.ndarray, float]:
    """(gray less its background, Otsu's threshold of that) for an uneven background (robust_ink; `level`: the
    border's, the background where an opening would span the picture)."""
    h, w = gray.shape
    f = max(1, min(h, w) // BACKGROUND_SIDE)
    small = _resized(gray, (max(1, w // f), max(1, h // f)), Image.Resampling.BOX)
    short = min(small.shape)
    k = max(3, short // 3) | 1
    residual = gray - np.minimum(_resized(_opened(small, k), (w, h)), gray)
    threshold = _otsu(residual)
    wide = int(3.0 * stroke_width(residual > threshold) / f) | 1
    if wide > k:  # strokes too wide for a third-wide opening: a wider one, or one background level
        if wide >= short:
            residual = np.clip(gray - level, 0, None)
        else:
            residual = gray - np.minimum(_resized(_opened(small, wide), (w, h)), gray)
        threshold = _otsu(residual)
    return residual, threshold


def extremes(gray: np.ndarray) -> tuple[float, float]:
    """The picture's darkest and lightest levels, each read INK_TAIL percent in from its end (a few stray pixels do
    not count; the ink of a digit seen from afar does); a picture of under 64 pixels: its minimum and maximum."""
    if gray.size < 64:
        return float(gray.min()), float(gray.max())
    lo, hi = percentiles(gray, (INK_TAIL, 100 - INK_TAIL))
    return float(lo), float(hi)


def light_ink(gray: np.ndarray) -> bool:
    """Whether the ink of a picture on a light background is lighter than it (a fogged, brightened digit) rather
    than darker: the direction in which the ink stands further above its background's noise (contrast_to_noise of
    the picture and of its negative; a digit's strokes stand far above the paper's grain, and a fog's patches do
    not stand out of it). For the pictures whose levels alone leave it open."""
    return contrast_to_noise(gray) > contrast_to_noise(255.0 - gray)


def robust_ink(gray: np.ndarray) -> np.ndarray:
    """Light ink on a dark background that may be uneven (a photo's lighting, grey paper, shadows) and noisy ->
    the ink alone.

    An even background (three of the picture's corners at one level, within EVEN_CORNERS of the ink's contrast: a
    scan on plain paper) is one level, the border's: an opening would take part of a thick, soft stroke for
    background. Otherwise the background is a grey opening wider than any stroke, on a copy of about
    BACKGROUND_SIDE px: a third of the short side, or wider where the strokes are wide (3x their width, measured
    on the ink Otsu's threshold finds once a third-wide opening is taken off); when the opening would span the
    picture, the background is one level too. The noise level (median and median absolute deviation) is
    measured on the background pixels only, below Otsu's threshold (ink covering half of a scan is not noise),
    and taken off, and so are the ruled lines of lined paper (ruled_lines_removed). On an uneven background,
    marks touching the picture's edges are left out where marks apart from them hold the peak
    (_apart_from_the_edges), before `marks` measures the others against the largest (a shadow's band along the
    picture's side may be thirty times a small digit's size). Then `marks`: small marks and faint ones (what is
    left of a shadow's edge) are dropped; the brightest 1% of the ink saturates (so that a few hot pixels do not
    dim the digit)."""
    residual, centre, sigma, uneven = _residual_and_noise(gray)
    ink = ruled_lines_removed(np.clip(residual - centre - 2.0 * sigma, 0, None))
    return marks(_apart_from_the_edges(ink) if uneven else ink, sigma)


def _apart_from_the_edges(ink: np.ndarray) -> np.ndarray:
    """`ink` less its marks touching the picture's edges, where marks apart from them hold its peak (within
    APART_PEAK): on an uneven background, a shadow's band along the picture's side, or the narrow end of a
    hard-edged shadow cut off by it."""
    peak = float(ink.max())
    inked = ink > 0.1 * peak
    at_edges = _touching_the_edges(inked)
    apart = inked & ~at_edges
    if at_edges.any() and apart.any() and float(ink[apart].max()) >= APART_PEAK * peak:
        return np.where(at_edges, 0.0, ink)
    return ink


def _touching_the_edges(mask: np.ndarray) -> np.ndarray:
    """The marks of `mask` (8-connected) that touch the picture's edges."""
    from scipy import ndimage

    labels, _ = ndimage.label(mask, structure=_EIGHT_NEIGHBOURS)
    return np.isin(labels, border(labels)) & mask


def _residual_and_noise(gray: np.ndarray) -> tuple[np.ndarray, float, float, bool]:
    """(the picture less its background, the level and the noise (MAD sigma) of that residual's background pixels,
    whether the background was uneven): robust_ink's first steps."""
    level = median(border(gray))
    uneven = not _even_background(gray, level)
    if not uneven:
        residual = np.clip(gray - level, 0, None)
        threshold = _otsu(residual)
    else:
        residual, threshold = _flattened(gray, level)
    background = residual[::2, ::2] if residual.size > 4096 else residual  # a sample is enough for the levels
    background = background[background <= threshold]
    if background.size < 16:
        background = residual
    centre = median(background)
    return residual, centre, 1.4826 * median(np.abs(background - centre)), uneven


def contrast_to_noise(gray: np.ndarray) -> float:
    """How far the lightest ink stands above its background, in the background's noise (robust_ink's residual and
    noise; a noise under one grey level counts as one)."""
    residual, centre, sigma, _ = _residual_and_noise(gray)
    return (float(residual.max()) - centre) / max(sigma, 1.0)


_EIGHT_NEIGHBOURS = np.ones((3, 3), dtype=bool)


def marks(ink: np.ndarray, sigma: float, lone_mark_alone: bool = True) -> np.ndarray:
    """The ink of the marks that count: marks much smaller than the largest one, or much fainter than the ink,
    are dropped, keeping what lies next to a kept mark; the brightest 1% saturates. With `lone_mark_alone` false
    (a noise-free drawing), a single mark keeps all the faint ink (its anti-aliased rim): a drawing has no noise
    to drop."""
    from scipy import ndimage

    peak = float(ink.max())
    if peak <= 0:
        return ink
    mask = ink > max(0.15 * peak, min(2.0 * sigma, 0.5 * peak))  # (the brightest ink is always a mark)
    labels, count = ndimage.label(mask, structure=_EIGHT_NEIGHBOURS)
    if count > 1 or lone_mark_alone:
        ink = _near_kept_marks(ink, labels, count, peak)
    inked = ink[ink > 0]
    top = float(percentiles(inked, (99,))[0]) if inked.size else 0.0
    return np.minimum(ink, top) if top > 0 else ink


def _near_kept_marks(ink: np.ndarray, labels: np.ndarray, count: int, peak: float) -> np.ndarray:
    """`ink` where it belongs to a mark that counts or lies next to one (marks)."""
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    bright = np.bincount(labels[ink >= 0.5 * peak], minlength=count + 1) > 0  # the brightest mark is one
    bright[0] = False
    keep = bright & (sizes >= max(3.0, 0.05 * float(sizes[bright].max())))
    # faint ink counts only next to a kept mark (with one mark too: a shadow's edge far from the digit in a photo is
    # not ink)
    h, w = ink.shape
    return np.where(_grown(keep[labels], max(1, min(h, w) // 64)), ink, 0.0)


# -- ruled lines ------------------------------------------------------------------------------------------------------
# Lined paper: bands of rows the ink (over a tenth of its peak) crosses over at least RULED_SPAN of the picture's
# width (a row or one beside it, for a line a little off level), each no higher than RULED_THIN of the picture, at
# least two of them (a single one may be a 7's bar in a tight scan; the crop's line rule in retrieval.data.preprocess
# looks at those); squared paper: bands of columns too, at least three (a tight scan of a 0 or a 4 touches the top
# and the bottom: two strokes may cross it from top to bottom).
RULED_SPAN = 0.9
RULED_THIN = 0.1
# ... and of a line's columns, those holding over RULED_STRONGER times the line's own ink hold a stroke along it.
RULED_STRONGER = 1.5


def ruled_lines_removed(ink: np.ndarray) -> np.ndarray:
    """`ink` less the ruled lines of lined or squared paper (RULED_*), where there are any (before `marks`: a faint
    line that crosses no stroke would be dropped as a faint mark, and the part that touches one kept): a line's
    pixels stay only where a stroke crosses it (ink on both sides of it, give or take a pixel) or runs along it
    (more ink across the line than the line has: RULED_STRONGER)."""
    inked = ink > 0.1 * float(ink.max())
    if _ends_inked(inked, 2):
        ink = _level_lines_removed(ink, 2)
    if _ends_inked(inked.T, 3):
        ink = _level_lines_removed(ink.T, 3).T
    return ink


def _ends_inked(inked: np.ndarray, fewest: int) -> bool:
    """A first look (most pictures end here): whether `fewest` rows, or rows beside them, are inked at both ends of
    the picture (a row inked over RULED_SPAN of the width is, within 1 - RULED_SPAN of each side)."""
    k = int(inked.shape[1] * (1 - RULED_SPAN)) + 1
    left, right = _with_rows_beside(inked[:, :k].any(1)), _with_rows_beside(inked[:, -k:].any(1))
    return np.count_nonzero(left & right) >= fewest


def _with_rows_beside(mask: np.ndarray) -> np.ndarray:
    """`mask` (rows first) or'ed with the rows above and below: a line a little off level is in one of the three."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    return out


def _level_lines_removed(ink: np.ndarray, fewest: int) -> np.ndarray:
    """ruled_lines_removed for the lines along the rows, where there are `fewest` of them at least."""
    floor = 0.1 * float(ink.max())
    inked = ink > floor
    h, w = inked.shape
    across = _with_rows_beside(inked).mean(1) >= RULED_SPAN
    if np.count_nonzero(across) < fewest:
        return ink
    edges = np.flatnonzero(np.diff(np.concatenate([[0], across.astype(np.int8), [0]])))
    bands = [(a, b) for a, b in zip(edges[::2], edges[1::2]) if b - a <= max(3.0, RULED_THIN * h)]
    if len(bands) < fewest:
        return ink
    out = ink.copy()
    no_ink = np.zeros(w, dtype=bool)
    for a, b in bands:
        a, b = max(0, a - 1), min(h, b + 1)  # the line's soft edges
        crossing = (inked[a - 1] if a > 0 else no_ink) & (inked[b] if b < h else no_ink)
        crossing = _grown(crossing[None], 1)[0]
        column_ink = ink[a:b].sum(0)  # (a line a little off level splits its ink between two rows)
        line_ink = float(np.percentile(column_ink[column_ink > floor], 25))  # a stroke along it covers less
        out[a:b, ~(crossing | (column_ink > RULED_STRONGER * line_ink))] = 0.0
    return out
