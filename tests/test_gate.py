"""The digit-or-not gate (issue 26): its non-digit sources (retrieval/data/nondigits.py) and the gate itself
(retrieval/gate.py) on real data, real fonts and real training."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.data import nondigits as nd

pytestmark = pytest.mark.usefixtures("one_thread")

DIGITS_OF_SCRIPTS = "0123456789" "٠٣۵" "०३९" "০৩" "૩" "೩" "๐๓" "〇一二三四五六七八九十百千万" "ⅫⅣ½²"


def test_no_digit_of_any_script_and_no_look_alike_is_a_negative():
    for ch in DIGITS_OF_SCRIPTS:
        assert nd.is_digit_char(ch), ch
        assert not nd.allowed_char(ch), ch
    for ch in "OoDQIl|!ZzSsgqbGB":
        assert not nd.allowed_char(ch), ch
    for ch in "AKMwx@#&?あカ漢ψЖक":
        assert nd.allowed_char(ch), ch


def test_hershey_records_parse_and_digit_positions_are_left_out():
    # '!' of Hershey's futural.jhf: two strokes (a bar and a dot)
    glyph = nd.parse_jhf("12345  9MWRFRT RRYQZR[SZRY\n")[0]
    assert [len(s) for s in glyph] == [2, 5]
    marks = {ch for _, ch, _ in nd.hershey_glyphs()}
    assert marks and not marks & set("0123456789") and not marks & nd.LOOK_ALIKES
    assert all(nd.allowed_char(ch) for ch in marks)


def test_svg_paths_of_kanjivg_become_polylines():
    lines = nd.svg_path_points("M10,20c1,2,3,4,5,6L30,40M0,0h5v5z", per_curve=4)
    assert len(lines) == 2
    np.testing.assert_allclose(lines[0][0], [10, 20])
    np.testing.assert_allclose(lines[0][4], [15, 26])  # the curve's end, relative to its start
    np.testing.assert_allclose(lines[0][-1], [30, 40])
    np.testing.assert_allclose(lines[1], [[0, 0], [5, 0], [5, 5], [0, 0]])


@pytest.mark.parametrize("source", nd.SOURCES)
def test_sources_render_deterministically_for_a_seed_and_hold_no_digit(source, data_root):
    folder = data_root / nd.FOLDER
    for f in folder.glob(f"{nd._cache_name(source, 12, 5)}.*") if folder.is_dir() else ():
        f.unlink()  # rendered here, not read from an earlier run's cache
    first = nd.load_source(source, 12, seed=5, root=data_root)
    assert first.images.shape == (12, 28, 28) and first.images.dtype == np.uint8
    assert (first.images.reshape(12, -1).max(1) > 0).sum() >= 6  # ink (synthetic blank pages have none)
    if source not in ("synthetic", "animal-mnist"):
        assert all(nd.allowed_char(m) for m in first.marks), first.marks
    cached = nd.load_source(source, 12, seed=5, root=data_root)
    np.testing.assert_array_equal(cached.images, first.images)
    for f in folder.glob(f"{nd._cache_name(source, 12, 5)}.*"):
        f.unlink()
    again = nd.load_source(source, 12, seed=5, root=data_root)
    np.testing.assert_array_equal(again.images, first.images)
    assert again.marks == first.marks
    other = nd.load_source(source, 12, seed=6, root=data_root)
    assert not np.array_equal(other.images, first.images)


def test_a_damaged_cached_set_is_made_again(data_root):
    first = nd.load_source("hershey", 6, seed=11, root=data_root)
    path = data_root / nd.FOLDER / f"{nd._cache_name('hershey', 6, 11)}.npz"
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    again = nd.load_source("hershey", 6, seed=11, root=data_root)
    np.testing.assert_array_equal(again.images, first.images)


def test_train_and_selection_sources_share_no_font_package():
    train, selection = set(nd.FONT_SPLIT["fonts-train"]), set(nd.FONT_SPLIT["fonts-selection"])
    assert not train & selection
    assert not set(nd.SPLITS["train"]) & set(nd.SPLITS["selection"])
    for group in nd.FONT_SPLIT:
        assert not any("dejavu" in str(f).lower() or "liberation" in str(f).lower() for _, f in nd.font_files(group))
