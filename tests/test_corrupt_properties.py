"""One property per corruption (retrieval.data.corrupt) that holds for it and for no other (issue 24).

A per-corruption test that only checks "deterministic, same shape, some pixels changed" stays green when every
corruption is swapped for `brightness`. Each property here states what its corruption does, measured with code
of its own (scipy/numpy, not the implementation's helpers), and test_each_property_rejects_every_other_corruption
checks all 650 swaps: a property must fail on every other corruption's output.

Corruptions that make a picture and send it through the query preprocessing (photo-*, canvas) are checked on the
pictures they make: a spy around retrieval.data.preprocess.preprocess_image records what reaches it and calls the
real function (nothing is replaced).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import pytest
from scipy import ndimage

from retrieval.data.corrupt import CORRUPTIONS, corrupt
from retrieval.data.specs import load_dataset

SEEDS = (0, 5)


@dataclass
class Made:
    """A corruption's output on the test digits (float 0..255) and the pictures it sent to the preprocessing."""

    clean: np.ndarray
    out: np.ndarray
    pictures: list[np.ndarray] = field(default_factory=list)
    again: np.ndarray | None = None  # the output for the next seed


@contextlib.contextmanager
def recorded_pictures():
    """Record every picture that reaches retrieval.data.preprocess.preprocess_image (the real one still runs)."""
    import retrieval.data.preprocess as preprocess

    real = preprocess.preprocess_image
    seen: list[np.ndarray] = []

    def spy(img, *args, **kwargs):
        seen.append(np.asarray(img, dtype=np.float64))
        return real(img, *args, **kwargs)

    preprocess.preprocess_image = spy
    try:
        yield seen
    finally:
        preprocess.preprocess_image = real


def make(digits: np.ndarray, name: str, seed: int = 0) -> Made:
    with recorded_pictures() as seen:
        out = corrupt(digits, name, seed=seed)
    again = corrupt(digits, name, seed=seed + 1)
    return Made(digits.astype(np.float64), out.astype(np.float64), list(seen), again.astype(np.float64))


# ----------------------------------------------------------------------------------------------- measuring tools

def _mass(img):
    return float(img.sum())


def _centre(img):
    """Centre of mass (x, y) in pixels."""
    yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]]
    m = img.sum()
    return np.array([(xx * img).sum() / m, (yy * img).sum() / m])


def _corr(a, b):
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float((a * b).sum() / (np.sqrt((a * a).sum() * (b * b).sum()) + 1e-12))


def _warped(img, a):
    """img warped about the centre (13.5, 13.5): output pixel p samples the input at a @ (p - c) + c, with a in
    (x, y) pixel units; bilinear, zero outside (scipy, not the torch grid the implementation uses)."""
    c = np.array([13.5, 13.5])
    m = np.array([[a[1, 1], a[1, 0]], [a[0, 1], a[0, 0]]])  # the same map in (row, col)
    return ndimage.affine_transform(img, m, offset=c - m @ c, order=1, mode="constant", cval=0.0)


def _best_warp(made, candidates: dict):
    """Per image, the candidate map whose warp of the clean digit is nearest the output, and that rms error."""
    best = []
    for c, o in zip(made.clean, made.out):
        errs = {k: float(np.sqrt(((_warped(c, a) - o) ** 2).mean())) for k, a in candidates.items()}
        k = min(errs, key=errs.get)
        best.append((k, errs[k], errs))
    return best


def _bilinear_matrix(n: int, size: int = 28) -> np.ndarray:
    """(size, n): bilinear upscaling of n samples to size (half-pixel centres, edge samples repeated)."""
    u = np.zeros((size, n))
    for i in range(size):
        s = min(max((i + 0.5) * n / size - 0.5, 0.0), n - 1.0)
        lo = int(np.floor(s))
        hi = min(lo + 1, n - 1)
        u[i, lo] += 1 - (s - lo)
        u[i, hi] += s - lo
    return u


def _area_matrix(n: int, size: int = 28) -> np.ndarray:
    """(n, size): the mean over each of n bins [floor(i size / n), ceil((i + 1) size / n))."""
    d = np.zeros((n, size))
    for i in range(n):
        lo, hi = (i * size) // n, -(-((i + 1) * size) // n)
        d[i, lo:hi] = 1.0 / (hi - lo)
    return d


def _added(made, tol=2.0):
    return made.out - made.clean > tol


def _line_rows(mask_img, weights):
    """Per column with additions, the weighted mean row of the additions."""
    cols = np.nonzero(mask_img.any(axis=0))[0]
    rows = np.array([(np.nonzero(mask_img[:, c])[0] * weights[mask_img[:, c], c]).sum() / weights[mask_img[:, c], c].sum()
                     for c in cols])
    return cols, rows


def _line_residual(c, o):
    """The added ink's mean row per column (columns where it crosses no digit ink), less a straight-line fit."""
    add = o - c > 2
    add[:, (add & (c > 10)).any(axis=0)] = False
    xs, rows = _line_rows(add, o - c)
    return rows - np.polyval(np.polyfit(xs, rows, 1), xs)


def _no_pictures(made):
    assert not made.pictures, "went through the picture preprocessing"


# ----------------------------------------------------------------------------------------------- properties

def shot_noise(m: Made):
    _no_pictures(m)
    levels = np.unique(m.out)
    assert set(levels) <= {0.0, 85.0, 170.0, 255.0}, f"levels {levels[:8]}: Poisson(3x)/3 takes only k/3"
    assert (m.out[m.clean == 0] == 0).all(), "ink appeared on the background (Poisson(0) is 0)"
    strong = m.clean >= 200
    assert (m.out[strong] > 0).mean() > 0.8, "strong ink mostly dropped"
    ratio = m.out.sum() / m.clean.sum()
    assert 0.65 < ratio < 1.0, f"mean ink ratio {ratio:.2f} (expected about 0.8: unbiased below saturation)"


def impulse_noise(m: Made):
    _no_pictures(m)
    changed = m.out != m.clean
    assert set(np.unique(m.out[changed])) <= {0.0, 255.0}, "changed pixels must be salt (255) or pepper (0)"
    salted = (m.out[m.clean == 0] == 255).mean()
    assert 0.06 < salted < 0.11, f"{salted:.3f} of the background salted (17% hit, half salt)"
    mid = (m.clean > 20) & (m.clean < 235)
    assert 0.12 < changed[mid].mean() < 0.23, f"{changed[mid].mean():.3f} of grey pixels hit (17%)"


def glass_blur(m: Made):
    _no_pictures(m)
    for c, o in zip(m.clean, m.out):
        assert 0.9 < _mass(o) / _mass(c) < 1.1, "a blur keeps the ink mass"
        assert np.linalg.norm(_centre(o) - _centre(c)) < 0.8, "a local blur leaves the centre of mass in place"
        wider = _corr(o, ndimage.gaussian_filter(c, 1.0))
        assert wider > 0.9 and wider > _corr(o, c) + 0.01, f"not the digit blurred (corr {wider:.3f})"
    # the local pixel swaps are drawn at random: another seed, another picture (a plain blur would be the same)
    assert np.abs(m.out - m.again).mean() > 1.0, "the same for another seed: no random pixel swaps"


def motion_blur(m: Made):
    _no_pictures(m)
    for c, o in zip(m.clean, m.out):
        assert 0.85 < _mass(o) / _mass(c) < 1.15, "a blur keeps the ink mass"
        dx, dy = _centre(o) - _centre(c)
        shift = np.hypot(dx, dy)
        # one-sided kernel (sigma 3, radius 10) along an angle in [-45, 45] deg: the ink trails by its mean length
        assert 1.6 < shift < 3.2, f"centre of mass moved {shift:.2f} px (the kernel's mean length is 2.4)"
        assert dx < -0.6 * shift, f"moved ({dx:.2f}, {dy:.2f}), not within 45 degrees of the -x axis"


def _shear_maps():
    return {s: np.array([[1.0, -np.sin(s)], [0.0, np.cos(s)]]) for s in (-0.6, -0.4, -0.2, 0.0, 0.2, 0.4, 0.6)}


def shear(m: Made):
    _no_pictures(m)
    for k, err, errs in _best_warp(m, _shear_maps()):
        assert abs(k) == 0.4 and err < 3.0, f"best shear {k} (rms {err:.1f}); 0.4 either way expected"


def scale(m: Made):
    _no_pictures(m)
    maps = {z: np.eye(2) / z for z in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)}
    for k, err, errs in _best_warp(m, maps):
        assert k == 0.7 and err < 3.0, f"best zoom {k} (rms {err:.1f}); 0.7 expected"


def _rotations():
    return {r: np.array([[np.cos(r), -np.sin(r)], [np.sin(r), np.cos(r)]]) for r in np.round(np.arange(-6, 7) / 10, 1)}


def rotate(m: Made):
    _no_pictures(m)
    for k, err, errs in _best_warp(m, _rotations()):
        assert abs(k) == 0.4 and err < 3.0, f"best rotation {k} rad (rms {err:.1f}); 0.4 either way expected"
    # and the principal axis of the ink turns by 0.4 rad for the elongated digits
    for c, o in zip(m.clean, m.out):
        def axis(img):
            yy, xx = np.mgrid[0:28, 0:28] - 13.5
            cov = np.cov(np.stack([xx.ravel(), yy.ravel()]), aweights=img.ravel())
            w, v = np.linalg.eigh(cov)
            return np.arctan2(v[1, 1], v[0, 1]), w[1] / w[0]

        (a0, e0), (a1, _) = axis(c), axis(o)
        if e0 > 3:
            turn = (a1 - a0 + np.pi / 2) % np.pi - np.pi / 2
            assert abs(abs(turn) - 0.4) < 0.12, f"principal axis turned {turn:.2f} rad"


def brightness(m: Made):
    _no_pictures(m)
    assert np.abs(m.out - np.minimum(m.clean + 128, 255)).max() <= 1, "not x + 0.5 (clipped)"


def translate(m: Made):
    _no_pictures(m)
    for c, o in zip(m.clean, m.out):
        fits = [(dx, dy) for dx in (-3, 3) for dy in (-3, 3)
                if np.array_equal(ndimage.shift(c, (dy, dx), order=0, cval=0.0), o)]
        assert fits, "not the digit moved by 3 px along a diagonal"
        if c[3:-3, 3:-3].sum() == c.sum():  # no ink lost at the frame: the centre of mass moves by (+-3, +-3)
            assert np.allclose(np.abs(_centre(o) - _centre(c)), 3, atol=1e-6)


def stripe(m: Made):
    _no_pictures(m)
    edges = np.r_[0:7, 21:28]
    assert np.array_equal(m.out[:, :, edges], 255 - m.clean[:, :, edges]), "columns 0-6 and 21-27 not inverted"
    assert np.array_equal(m.out[:, :, 7:21], m.clean[:, :, 7:21]), "the middle columns changed"


def fog(m: Made):
    _no_pictures(m)
    for c, o in zip(m.clean, m.out):
        p = c.max() / 255
        layer = o - c * p / (p + 3)  # (x + 3 L) p / (p + 3): what is left is 3 L p / (p + 3), L in [0, 1]
        assert layer.min() > -2 and layer.max() < 255 * 3 / 4 + 2, "not an added layer in [0, 3/4]"
        assert layer.mean() > 20, "no fog: the layer adds little"
        assert layer[c == 0].std() > 2, "the layer is flat on the background (fog varies over the image)"
        assert abs(_corr(layer, c)) < 0.5, "the layer follows the digit (fog is a plasma texture, not the digit)"
        assert _corr(o, c) > 0.3, "the digit is gone"


def spatter(m: Made):
    _no_pictures(m)
    changed = np.abs(m.out - m.clean) > 1
    assert changed.any(axis=(1, 2)).mean() >= 0.5, "most images have no spatter"
    x, y = m.clean[changed], m.out[changed]
    far = np.abs(x - 63) > 15
    mud = (y[far] - x[far]) / (63 - x[far])  # x (1 - m) + 63 m: m in [0.8, 1]
    assert (mud > 0.77).all() and (mud < 1.03).all(), f"mixing weights {mud.min():.2f}..{mud.max():.2f}"
    assert set(np.unique(m.out[(m.clean == 0) & changed])) <= set(range(49, 65)), "mud is not grey 63 (x 0.8-1)"


def dotted_line(m: Made):
    _no_pictures(m)
    for c, o in zip(m.clean, m.out):
        assert (o >= c - 1).all(), "a line only adds ink"
        add = o - c > 2
        cols = np.nonzero(add.any(axis=0))[0]
        assert len(cols) >= 6, "no line"
        assert ((cols // 2) % 2 == 1).all(), f"ink added in the gaps (columns {cols}): dashes are 2 px on, 2 off"
        rest = _line_residual(c, o)
        assert rest.std() < 0.5, "the dashes are not on one straight line"


def zigzag(m: Made):
    _no_pictures(m)
    wavy = 0
    for c, o in zip(m.clean, m.out):
        assert (o >= c - 1).all(), "a zigzag only adds ink"
        add = o - c > 2
        cols = np.nonzero(add.any(axis=0))[0]
        assert len(cols) >= 8, "no zigzag"
        assert cols.min() >= 0 and ((cols // 2) % 2 == 0).sum() >= 4, "dashed: ink only every other 2 columns"
        rest = _line_residual(c, o)
        assert np.abs(rest).max() < 3.5, "the ink is not along one line"
        wavy += rest.std() > 0.7
    assert wavy >= 0.75 * len(m.out), "the additions are straight lines, not zigzags"


def canny_edges(m: Made):
    _no_pictures(m)
    assert set(np.unique(m.out)) <= {0.0, 255.0}, "edges are binary"
    for c, o in zip(m.clean, m.out):
        ink = c > 127
        boundary = ink & ~ndimage.binary_erosion(ink)
        edge = o > 0
        assert edge.sum() >= 10, "no edges"
        to_boundary = ndimage.distance_transform_edt(~boundary)
        assert (to_boundary[edge] <= 2.0).all(), "an edge pixel far from the digit's outline"
        assert (ndimage.distance_transform_edt(~edge)[boundary] <= 2.0).mean() > 0.7, "the outline is not traced"
        deep = ndimage.distance_transform_edt(ink) >= 3
        assert not (edge & deep).any(), "edges inside the strokes"


def _lowres(n: int):
    def prop(m: Made):
        _no_pictures(m)
        u, d = _bilinear_matrix(n), _area_matrix(n)
        pu = np.linalg.pinv(u)
        for c, o in zip(m.clean, m.out):
            small = pu @ o @ pu.T  # the n x n picture whose bilinear upscaling is nearest the output
            rest = np.sqrt(((u @ small @ u.T - o) ** 2).mean())
            assert rest < 1.0, f"not an upscaled {n}x{n} picture (rms {rest:.2f} off)"
            blocks = d @ c @ d.T
            assert np.sqrt(((small - blocks) ** 2).mean()) < 2.0, f"the {n}x{n} picture is not the area means"
    prop.__name__ = f"lowres_{n}"
    return prop


def thin(m: Made):
    _no_pictures(m)
    covered = []
    for c, o in zip(m.clean, m.out):
        assert _mass(o) < 0.75 * _mass(c), f"ink mass {_mass(o) / _mass(c):.2f} of the digit's: not thinner"
        area = (o > 127).sum() / (c > 127).sum()
        assert area < 0.75, f"ink area {area:.2f} of the digit's"
        near = ndimage.binary_dilation(c > 64, iterations=1)
        assert o[~near].sum() < 0.05 * _mass(o), "ink outside the digit's strokes"
        covered.append((ndimage.distance_transform_edt(o <= 48)[c > 127] <= 1.5).mean())
    assert min(covered) > 0.5 and np.mean(covered) > 0.85, f"the thin line does not follow the strokes {covered}"


def thick(m: Made):
    _no_pictures(m)
    for c, o in zip(m.clean, m.out):
        assert (o >= c - 1).all(), "growing strokes keeps every ink pixel"
        area = (o > 127).sum() / (c > 127).sum()
        assert area > 1.4, f"ink area {area:.2f} of the digit's: not thicker"
        to_ink = ndimage.distance_transform_edt(c <= 127)
        assert (to_ink[o > 127] <= 2.5).all(), "ink grew more than 2 px from the strokes"
        assert (o[(to_ink > 0) & (to_ink <= 1.0)] > 127).mean() > 0.9, "the strokes' rim is not inked"


# photos: what the pictures show, before the preprocessing

def _photo_pictures(m: Made):
    assert len(m.pictures) == len(m.out), f"{len(m.pictures)} pictures sent through the preprocessing"
    assert all(p.shape == (112, 112) for p in m.pictures), "photos are 112x112"
    u = _bilinear_matrix(28, 112)
    for c, p in zip(m.clean, m.pictures):  # one at a time: a wrong picture stops the check early
        up = u @ c @ u.T  # the digit at the photo's scale
        flat = p - ndimage.grey_closing(p, size=(25, 25))  # the paper taken away, whatever its lighting
        assert _corr(-flat, up) > 0.85, "the picture does not show the digit"
        paper = ndimage.median_filter(p, 5)[ndimage.distance_transform_edt(up < 10) > 6]
        yield p, up, paper


def _defocus(p, up) -> float:
    """The Gaussian blur (sigma, in pixels of the page) of the digit that best matches the page."""
    sigmas = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0)
    return sigmas[int(np.argmax([_corr(-p, ndimage.gaussian_filter(up, g)) for g in sigmas]))]


def _jpeg_blocks(p):
    """Mean |step| across 8x8 block borders over mean |step| inside blocks (rows and columns)."""
    d = np.abs(np.diff(p, axis=1))
    across = d[:, 7::8][:, :13].mean() + np.abs(np.diff(p, axis=0))[7::8, :][:13].mean()
    inside_cols = [k for k in range(111) if k % 8 != 7]
    inside = d[:, inside_cols].mean() + np.abs(np.diff(p, axis=0))[inside_cols, :].mean()
    return across / inside


def _photo(lighting: bool, blur: bool, jpeg: bool, grey: bool):
    """A phone photo at 112x112: grey paper or white, lit evenly or not, defocused (sigma 2) or not, JPEG or not."""
    def prop(m: Made):
        sigmas = []
        for p, up, paper in _photo_pictures(m):
            level = np.median(paper)
            span = np.percentile(paper, 97) - np.percentile(paper, 3)
            contrast = level - np.percentile(p, 1)
            if grey:
                assert lighting or 130 < level < 200, f"paper {level:.0f}: grey paper is 0.55-0.75"
                assert contrast < (150 if lighting else 120), f"ink {contrast:.0f} levels under the paper: grey photos have low contrast"
            else:
                assert lighting or level > 225, f"paper {level:.0f}: white paper is 0.92-1.0"
                assert contrast > 140, f"ink only {contrast:.0f} levels under the paper"
            if lighting:
                assert span > 30, f"paper varies {span:.0f} levels: no lighting gradient"
            else:
                assert span < 20, f"paper varies {span:.0f} levels on an evenly lit page"
            blocks = _jpeg_blocks(p)
            assert (blocks > 1.3) == jpeg, f"8x8 block steps {blocks:.2f}x the steps inside blocks"
            sigmas.append(_defocus(p, up))
        sigma = float(np.median(sigmas))
        assert (sigma >= 1.25) == blur, f"best-matching blur sigma {sigma} (the defocus is 2 px)"
    return prop


def canvas(m: Made):
    assert len(m.pictures) == len(m.out), f"{len(m.pictures)} pictures sent through the preprocessing"
    widths = []
    for c, p in zip(m.clean, m.pictures):
        assert p.shape == (280, 280), "the canvas is 280x280"
        assert p.max() == 255 and (p == 255).mean() > 0.6, "white page"
        assert p.min() == 17, "#111 ink"
        full = p <= 20
        grey = (p > 20) & (p < 250)
        # a round pen: strokes of one width; anti-aliasing only in a narrow rim around them
        # (drawn at 112x112 and scaled up 2.5 times: the rim is up to 2.5 px of 112 wide)
        assert (ndimage.distance_transform_edt(~full)[grey] <= 7.0).all(), "grey pixels away from the strokes"
        radius = ndimage.distance_transform_edt(p < 136)  # the stroke's edge at half ink
        ridge = (radius >= 3) & (radius >= ndimage.maximum_filter(radius, size=3))
        width = 2 * np.median(radius[ridge]) - 1  # distances run to the first pixel centre outside
        widths.append(width)
        assert 13 <= width <= 23, f"stroke {width:.1f} px wide (the pen is 14-22)"
        lo, hi = np.percentile(radius[ridge], [25, 75])
        assert hi / lo < 1.2, "stroke width varies along the strokes (not one pen)"
        assert _corr(ndimage.zoom(full.astype(float), 0.1, order=1), c) > 0.4, "the drawing is not the digit"
    assert np.ptp(widths) > 1.5, "every drawing has the same pen (14-22 px drawn at random)"


PROPERTIES = {
    "shot_noise": shot_noise, "impulse_noise": impulse_noise, "glass_blur": glass_blur, "motion_blur": motion_blur,
    "shear": shear, "scale": scale, "rotate": rotate, "brightness": brightness, "translate": translate,
    "stripe": stripe, "fog": fog, "spatter": spatter, "dotted_line": dotted_line, "zigzag": zigzag,
    "canny_edges": canny_edges, "lowres-8": _lowres(8), "lowres-10": _lowres(10), "lowres-14": _lowres(14),
    "thin": thin, "thick": thick,
    "photo-lighting": _photo(True, False, False, False), "photo-blur": _photo(False, True, False, False),
    "photo-jpeg": _photo(False, False, True, False), "photo-grey": _photo(False, False, False, True),
    "photo": _photo(True, True, True, True), "canvas": canvas,
}


# ----------------------------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def digits(data_root):
    return load_dataset("mnist:test", subset=12, seed=0).images.numpy()


def test_every_corruption_has_a_property():
    assert set(PROPERTIES) == set(CORRUPTIONS)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corruption_does_what_it_says(digits, name, seed):
    PROPERTIES[name](make(digits, name, seed))


@pytest.fixture(scope="module")
def made_by_each(digits):
    return {name: make(digits, name) for name in CORRUPTIONS}


def _holds(prop, made) -> bool:
    try:
        prop(made)
    except AssertionError:
        return False
    return True


def test_each_property_rejects_every_other_corruption(made_by_each):
    """Every swap of one corruption for another (650 of them) turns its property test red."""
    passing = [(name, other) for name, prop in PROPERTIES.items() for other, made in made_by_each.items()
               if other != name and _holds(prop, made)]
    assert not passing, f"(property, output it accepts): {passing}"


def test_a_clean_digit_has_none_of_the_properties(digits):
    made = Made(digits.astype(np.float64), digits.astype(np.float64), again=digits.astype(np.float64))
    assert [n for n, prop in PROPERTIES.items() if _holds(prop, made)] == []
