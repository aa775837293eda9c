"""What users bring that MNIST-C lacks, on whole float batches (N, 28, 28) in [0, 1]; each takes (x, rng): low
resolution, stroke width, the digit as a phone photo and as the web canvas draws it (the last two through the
query preprocessing, as an uploaded picture gets it; retrieval.data.corrupt registers them)."""

from __future__ import annotations

import io

import numpy as np

from retrieval.data.corruptions.image_ops import distance_to, downsample, gauss, skeleton, upsample
from retrieval.errors import RetrievalError


def lowres(size):
    def op(x, rng):
        return upsample(downsample(x, size), 28)
    op.__doc__ = f"area-downsampled to {size}x{size}, bilinear back to 28x28"
    return op


def thin(x, rng):
    sk = skeleton(x, 4)
    ink = np.clip(2.5 - distance_to(sk), 0, 1)  # a 5-px line at 4x: 1.25 px at 28x28
    return downsample(ink, 28) * x.max(axis=(1, 2), keepdims=True)


def thick(x, rng):
    big = upsample(x, 112)
    ink = np.clip(6.5 - distance_to(big > 0.5), 0, 1)  # grown by 6 px at 4x: 1.5 px at 28x28
    return np.maximum(downsample(ink, 28), x)


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


def photo(lighting: bool, blur: bool, jpeg: bool, grey: bool):
    def op(x, rng):
        from PIL import Image

        n, size = len(x), 112
        ink = np.clip(upsample(x, size), 0, 1)
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
            page = gauss(page.astype(np.float32), 2.0)
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
    sk = skeleton(x, 4)  # 112x112
    pen = rng.uniform(5.6, 8.8, n)[:, None, None]  # pen width at 112: 14-22 px on the 280 canvas (the web pad: 18)
    ink = np.clip(pen / 2 + 0.5 - distance_to(sk), 0, 1)
    pictures = 255.0 - (255.0 - 17.0) * upsample(ink, 280)  # #111 ink on white, as retrieval/web draws
    return _preprocessed(list(pictures))
