"""PNG grids: one row per query, the query image then its neighbours, each captioned (label, distance).

Reusable beyond `retrieval query --grid`: build GridRows yourself (e.g. the worst failures of an evaluation) and
call render_grid. SourceImages turns index sources ("mnist:train[12]", an image path) back into pictures.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from retrieval.data.preprocess import load_image_file
from retrieval.data.specs import DatasetCache, parse_item_spec
from retrieval.errors import RetrievalError, UsageError
from retrieval.fsutil import atomic_path, ensure_writable_dir

GOOD, BAD, NEUTRAL = "#1a7f37", "#cf222e", "#222222"


@dataclass
class GridCell:
    image: torch.Tensor | np.ndarray | None  # uint8 (28, 28); None draws an empty tile
    caption: str
    color: str = NEUTRAL


@dataclass
class GridRow:
    query: GridCell
    neighbors: list[GridCell] = field(default_factory=list)


class SourceImages:
    """Resolve index sources to uint8 28x28 images: dataset items, image files; None for anything else
    (class prototypes, files that moved)."""

    def __init__(self, root=None, datasets: DatasetCache | None = None):
        self.datasets = datasets or DatasetCache(root)
        self._files: dict[str, torch.Tensor | None] = {}

    def get(self, source: str) -> torch.Tensor | None:
        item = parse_item_spec(source)
        if item is not None:
            try:
                return self.datasets.item(*item)[0]
            except RetrievalError:
                return None
        if source not in self._files:
            try:
                self._files[source] = load_image_file(source) if Path(source).is_file() else None
            except RetrievalError:
                self._files[source] = None
        return self._files[source]


def _short(text: str, width: int = 18) -> str:
    if os.sep in text or "/" in text:
        text = os.path.basename(text.rstrip("/" + os.sep)) or text
    return text if len(text) <= width else text[: width - 1] + "…"


def query_grid_rows(results, sources: SourceImages) -> list[GridRow]:
    """QueryResults -> GridRows. With a known true label (dataset items), neighbours of that label are green,
    others red, and the query caption is green/red by whether the prediction is right."""
    rows = []
    for r in results:
        if r.error is not None:
            continue
        caption = f"{_short(r.query)}\n→ {r.label}"
        color = NEUTRAL
        if r.true_label is not None:
            caption += f" (true {r.true_label})"
            color = GOOD if r.label == r.true_label else BAD
        cells = []
        for n in r.neighbors:
            ncolor = NEUTRAL if r.true_label is None else (GOOD if n.label == r.true_label else BAD)
            cells.append(GridCell(sources.get(n.source), f"{n.label}  d={n.distance:.3f}\n#{n.id}", ncolor))
        rows.append(GridRow(GridCell(r.image, caption, color), cells))
    return rows


def check_grid_target(path: str | os.PathLike) -> None:
    """Fail early (before long work) when `path` cannot take a PNG grid."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UsageError(f"`grid` {path}: expected a .png file name")
    ensure_writable_dir(path.parent, "`grid` folder")


def render_grid(rows: Sequence[GridRow], path: str | os.PathLike, title: str | None = None,
                max_rows: int = 100) -> int:
    """Write a PNG (atomically) with one row per GridRow; returns the number of rows drawn (at most max_rows)."""
    from matplotlib.figure import Figure

    path = Path(path)
    check_grid_target(path)
    rows = list(rows)[:max_rows]
    if not rows:
        raise RetrievalError(f"{path}: nothing to draw (no answered queries)")
    ncols = max(len(r.neighbors) for r in rows)
    cell_w, cell_h = 1.05, 1.45
    top_in = 0.65 if title else 0.35  # room above the first row's captions (and for the title)
    height = cell_h * len(rows) + top_in
    fig = Figure(figsize=(cell_w * (ncols + 1.3), height))
    grid = fig.add_gridspec(len(rows), ncols + 2, width_ratios=[1.0, 0.3] + [1.0] * ncols,
                            left=0.01, right=0.99, bottom=0.05 / height, top=1 - top_in / height,
                            wspace=0.08, hspace=0.42)
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.08 / height, va="top")
    for i, row in enumerate(rows):
        _draw(fig.add_subplot(grid[i, 0]), row.query, bold=True)
        for j, cell in enumerate(row.neighbors):
            _draw(fig.add_subplot(grid[i, j + 2]), cell)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    return len(rows)


def _draw(ax, cell: GridCell, bold: bool = False) -> None:
    image = cell.image
    if image is None:
        ax.imshow(np.full((28, 28), 235, np.uint8), cmap="gray", vmin=0, vmax=255)
        ax.text(14, 14, "no image", ha="center", va="center", fontsize=6, color="#666666")
    else:
        image = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(cell.color)
        spine.set_linewidth(2.0 if cell.color != NEUTRAL else 0.5)
    ax.set_title(cell.caption, fontsize=6.5, color=cell.color, fontweight="bold" if bold else "normal", pad=2)
