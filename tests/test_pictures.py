"""Picture families (retrieval.data.pictures): each renders deterministically for a seed, as the kind of file it
says (format, size, mode), and looks like what it imitates (scans touch the frame, canvas strokes are the page's
round pen)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from retrieval.data import pictures
from retrieval.data.specs import load_dataset
from retrieval.errors import UsageError


@pytest.fixture(scope="module")
def digits(data_root):
    ds = load_dataset("mnist:test", subset=3, seed=0)
    return ds.images.numpy(), ds.label_names()


@pytest.fixture(scope="module")
def rendered(digits):
    """Every family's picture of the first digit for seeds 0 and 1, and seed 0 again."""
    images, labels = digits
    return {f: [pictures.render(images[0], f, s, label=labels[0]) for s in (0, 1, 0)] for f in pictures.FAMILIES}


def test_every_family_is_deterministic_for_a_seed_and_differs_between_seeds(rendered):
    for family, (a, b, again) in rendered.items():
        assert a == again, family
        assert a.data != b.data, family


FORMATS = {"scan": ("JPEG", "L"), "canvas": ("PNG", "RGBA"), "photo": ("JPEG", "RGB"), "lined": ("JPEG", "L"),
           "screenshot": ("PNG", "RGB"), "mnist-c": ("PNG", "L")}


def test_each_family_is_the_file_it_says(rendered):
    for family, (pic, other, _) in rendered.items():
        for p in (pic, other):
            img = p.open()
            fmt, mode = FORMATS[pictures.FAMILIES[family]]
            assert (img.format, img.mode, img.size) == (fmt, mode, p.size), family
            assert p.suffix == {"JPEG": ".jpg", "PNG": ".png"}[fmt]
            w, h = img.size
            if family.startswith("scan-") and family != "scan-thick":
                assert w == h and 64 <= w <= 300, family
            elif family == "scan-thick":
                assert (w, h) == (64, 64)
            elif family in ("canvas-mouse", "canvas-finger"):
                assert (w, h) == (280, 280)
            elif family == "canvas-560":
                assert (w, h) == (560, 560)
            elif family in ("photo-1024", "photo-far", "photo-shadow"):
                assert (w, h) == (1024, 768)
            elif family == "photo-3000":
                assert (w, h) == (3000, 4000)
            elif family == "lined":
                assert w == h and 200 <= w <= 320
            elif family.startswith("mnistc-"):
                assert w == h and w % 28 == 0 and 56 <= w <= 280, family
    sizes = {rendered[f][i].size for f in pictures.FAMILIES if f.startswith("scan-") for i in (0, 1)}
    assert len(sizes) > 3  # sizes drawn at random


def test_scans_have_their_ink_touching_the_frame(digits):
    images, _ = digits
    for family in ("scan-8", "scan-14", "scan-20", "scan-thick"):
        for seed, digit in enumerate(images):
            a = np.asarray(pictures.render(digit, family, seed).open(), float)
            paper, ink = np.percentile(a, 90), a.min()
            dark = a < (paper + ink) / 2
            rows, cols = dark.any(axis=1), dark.any(axis=0)
            assert (rows[:3].any() and rows[-3:].any()) or (cols[:3].any() and cols[-3:].any()), (family, seed)
            assert 120 < paper < 250, "grey paper"


@pytest.mark.parametrize("family, pen", [("canvas-mouse", 18), ("canvas-finger", 18), ("canvas-560", 36)])
def test_canvas_exports_are_the_pages_round_pen(digits, family, pen):
    images, _ = digits
    for seed, digit in enumerate(images):
        img = pictures.render(digit, family, seed).open()
        assert np.asarray(img.getchannel("A")).min() == 255  # the page paints its canvas white: opaque
        a = np.asarray(img.convert("L"), float)
        assert a.max() == 255 and a.min() == 17  # #111 on white
        full, grey = a <= 20, (a > 20) & (a < 250)
        # anti-aliased as a browser draws: grey only in a rim about a pixel wide around the strokes
        assert (ndimage.distance_transform_edt(~full)[grey] <= 2.0).all()
        radius = ndimage.distance_transform_edt(a < 136)  # the stroke's edge at half ink
        ridge = (radius >= 3) & (radius >= ndimage.maximum_filter(radius, size=3))
        width = 2 * np.median(radius[ridge]) - 1
        assert abs(width - pen) <= 0.15 * pen, (seed, width)


def test_photos_are_light_paper_with_dark_ink_and_uneven_light(rendered):
    for family in ("photo-1024", "photo-3000", "photo-far", "photo-shadow"):
        grey = np.asarray(rendered[family][0].open().convert("L").reduce(8), float)
        assert grey.min() < 0.6 * np.median(grey)  # the ink
        blocks = [b.mean() for row in np.array_split(grey, 4) for b in np.array_split(row, 4, axis=1)]
        assert max(blocks) - min(blocks) > 15  # a gradient or a shadow


def test_a_hard_light_casts_a_sharp_shadow():
    """photo-shadow's shadow changes the paper's level across a few pixels; photo-1024's across 4-10% of the page
    (the pages drawn without a digit, grain taken off by a median filter, at 1/4 scale)."""
    blank = np.zeros((28, 28), np.uint8)

    def steepest(family: str) -> float:
        return float(np.mean([max(np.abs(np.diff(g, axis=0)).max(), np.abs(np.diff(g, axis=1)).max()) for g in (
            ndimage.median_filter(np.asarray(pictures.render(blank, family, seed).open().convert("L").reduce(4),
                                             float), 5) for seed in range(6))]))

    assert steepest("photo-shadow") > 2 * steepest("photo-1024")


def test_screenshots_draw_the_label_and_need_it(digits):
    images, labels = digits
    assert pictures.render(images[0], "screenshot", 0, label=labels[0]).open().mode == "RGB"
    with pytest.raises(UsageError, match="label"):
        pictures.render(images[0], "screenshot", 0)


def test_bad_input_is_refused(digits):
    images, _ = digits
    with pytest.raises(UsageError, match="unknown picture family 'nope'"):
        pictures.render(images[0], "nope", 0)
    with pytest.raises(UsageError, match="uint8 28x28"):
        pictures.render(images[0].astype(np.float32), "scan-8", 0)


def test_every_family_has_an_array_counterpart_and_held_out_families_exist():
    from retrieval.data.corrupt import CORRUPTIONS

    assert set(pictures.ARRAY_COUNTERPART) == set(pictures.FAMILIES)
    assert all(v is None or v in CORRUPTIONS for v in pictures.ARRAY_COUNTERPART.values())
    assert pictures.HELD_OUT and pictures.HELD_OUT < set(pictures.FAMILIES)
