"""Reading back what the PNG figures show (the tiles of an image grid, the cells of a confusion matrix), so tests
check their content, not only that a PNG exists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage


def _rgb(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB")).astype(np.int16)


def grid_tiles(path: Path) -> list[list[np.ndarray]]:
    """The picture tiles of a retrieval.grid PNG, row by row, left to right, each resampled to 28x28 uint8.

    A tile is a large, nearly square region that is not white (the dark picture inside its frame); captions and
    titles are small pieces of text. The frame (2 px at most) is cut off before resampling."""
    rgb = _rgb(path)
    regions, _ = ndimage.label(rgb.min(axis=2) < 200)
    boxes = []
    for rows, cols in ndimage.find_objects(regions):
        h, w = rows.stop - rows.start, cols.stop - cols.start
        if h >= 40 and w >= 40 and 0.8 < h / w < 1.25:
            boxes.append((rows.start, rows.stop, cols.start, cols.stop))
    boxes.sort()
    lines: list[list[tuple]] = []
    for box in boxes:  # boxes whose tops lie within a few pixels of each other form one row of the grid
        if lines and abs(box[0] - lines[-1][0][0]) <= 4:
            lines[-1].append(box)
        else:
            lines.append([box])
    grey = rgb.mean(axis=2)
    tiles = []
    for line in lines:
        row = []
        for top, bottom, left, right in sorted(line, key=lambda b: b[2]):
            inner = grey[top + 3: bottom - 3, left + 3: right - 3].clip(0, 255).astype(np.uint8)
            row.append(np.asarray(Image.fromarray(inner).resize((28, 28), Image.BOX)))
        tiles.append(row)
    return tiles


def similarity(a, b) -> float:
    """Pearson correlation of two images' pixels (1: the same picture up to brightness and contrast)."""
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / max(np.sqrt((a @ a) * (b @ b)), 1e-12))


def assert_tiles_show(tiles: list[list[np.ndarray]], expected: list[list[np.ndarray]], min_similarity=0.9):
    """Tile for tile, the grid shows the expected pictures: the same shape of rows, and each tile closer to its
    own picture than to any other picture of the grid."""
    assert [len(row) for row in tiles] == [len(row) for row in expected], "tiles per row"
    pictures = [p for row in expected for p in row]
    for i, (tile_row, picture_row) in enumerate(zip(tiles, expected)):
        for j, (tile, picture) in enumerate(zip(tile_row, picture_row)):
            own = similarity(tile, picture)
            others = [similarity(tile, p) for p in pictures if not np.array_equal(np.asarray(p), np.asarray(picture))]
            assert own >= min_similarity and own > max(others, default=-1.0), \
                f"tile {j} of row {i}: similarity {own:.3f} to its picture, up to {max(others, default=0):.3f} to others"


def heatmap_fractions(path: Path, n: int, colormap: str = "Blues") -> np.ndarray:
    """The n x n matrix a matplotlib heatmap PNG shows, read back as values in [0, 1] of `colormap` (the largest
    region of that colormap's colours is the matrix; the colour bar is the smaller one). Each cell's colour is
    the median of its coloured pixels, so the count written in it (black or white text) does not count."""
    from matplotlib import colormaps

    rgb = _rgb(path)
    lut = (np.asarray(colormaps[colormap](np.linspace(0, 1, 256)))[:, :3] * 255).astype(np.int16)
    bluish = (rgb[..., 2] - rgb[..., 0] >= 4) & (rgb.min(axis=2) < 255)
    regions, count = ndimage.label(bluish)
    sizes = ndimage.sum(bluish, regions, range(1, count + 1))
    rows, cols = ndimage.find_objects(regions)[int(np.argmax(sizes))]
    ys = np.linspace(rows.start, rows.stop, n + 1).round().astype(int)
    xs = np.linspace(cols.start, cols.stop, n + 1).round().astype(int)
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            cell = rgb[ys[i] + 2: ys[i + 1] - 2, xs[j] + 2: xs[j + 1] - 2]
            colour = np.median(cell[bluish[ys[i] + 2: ys[i + 1] - 2, xs[j] + 2: xs[j + 1] - 2]], axis=0)
            out[i, j] = np.abs(lut - colour).sum(axis=1).argmin() / 255
    return out
