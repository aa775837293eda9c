"""PNGs decoded by libpng (imagecodecs) give Pillow's pixels; every PNG it cannot take exactly is left to Pillow."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.data.preprocess import _plain_png, load_image_file, preprocess_image
from retrieval.errors import RetrievalError


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _after_header(png: bytes, chunk: bytes) -> bytes:
    return png[:33] + chunk + png[33:]  # signature (8) + IHDR (25)


def _png(img: Image.Image, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **params)
    return buf.getvalue()


def _pillow(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


@pytest.fixture(scope="module")
def drawing() -> Image.Image:
    """An RGBA picture with smooth strokes, noise and a gradient (rows that PNG filters each differently)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:120, 0:150]
    grey = (np.hypot(yy - 60, xx - 75) * 2 + rng.integers(0, 40, yy.shape)).clip(0, 255)
    rgba = np.stack([grey, grey[::-1], 255 - grey, np.where(xx < 100, 255, grey)], -1).astype(np.uint8)
    return Image.fromarray(rgba)


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA"])
@pytest.mark.parametrize("params", [{}, {"compress_level": 0}, {"compress_level": 9}, {"optimize": True}])
def test_plain_pngs_decode_to_pillows_pixels(drawing, mode, params):
    data = _png(drawing.convert(mode), **params)
    for variant in (data, _after_header(data, _chunk(b"gAMA", struct.pack(">I", 30000))),
                    _after_header(data, _chunk(b"sRGB", b"\x00"))):
        decoded = _plain_png(Image.open(io.BytesIO(variant)))
        assert decoded is not None, "an 8-bit PNG of a plain mode is decoded by libpng"
        want = _pillow(variant)
        assert decoded.mode == want.mode and decoded.size == want.size
        assert np.array_equal(np.asarray(decoded), np.asarray(want))


@pytest.mark.parametrize("size", [(150, 120), (100, 90)])  # reduced before the ink is looked for, and not
def test_an_opaque_rgba_png_is_its_colour_and_preprocessed_as_pillows(drawing, size):
    opaque = drawing.resize(size)
    opaque.putalpha(255)
    data = _png(opaque)
    decoded, want = _plain_png(Image.open(io.BytesIO(data))), _pillow(data)
    assert decoded.mode == "RGBX" and want.mode == "RGBA"
    assert np.array_equal(np.asarray(decoded.convert("RGB")), np.asarray(want.convert("RGB")))
    assert torch.equal(preprocess_image(decoded), preprocess_image(want))


def test_other_pngs_are_left_to_pillow(drawing):
    grey = drawing.convert("L")
    exif = Image.Exif()
    exif[0x0112] = 6
    h, w = 20, 30
    rows = np.random.default_rng(1).integers(0, 65535, (h, w, 3)).astype(">u2")
    sixteen_bit = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                   + _chunk(b"IDAT", zlib.compress(b"".join(b"\x00" + r.tobytes() for r in rows)))
                   + _chunk(b"IEND", b""))
    others = {
        "palette": _png(drawing.convert("P")),
        "one bit": _png(grey.convert("1")),
        "transparency key": _png(grey, transparency=0),
        "EXIF orientation": _png(grey, exif=exif),
        "16 bits a channel": sixteen_bit,
    }
    assert _pillow(sixteen_bit).mode == "RGB"  # a mode libpng's path takes, but not its bit depth
    for what, data in others.items():
        assert _plain_png(Image.open(io.BytesIO(data))) is None, what


def test_a_damaged_png_is_refused_as_pillow_refuses_it(drawing, tmp_path):
    data = bytearray(_png(drawing.convert("L")))
    data[len(data) // 2] ^= 0xFF  # inside IDAT: its CRC no longer holds
    assert _plain_png(Image.open(io.BytesIO(bytes(data)))) is None
    path = tmp_path / "damaged.png"
    path.write_bytes(bytes(data[: len(data) * 3 // 4]))
    with pytest.raises(RetrievalError, match="damaged.png: cannot decode image"):
        load_image_file(path)
    path.write_bytes(bytes(data))
    with pytest.raises(RetrievalError, match="damaged.png: cannot decode image"):
        load_image_file(path)
