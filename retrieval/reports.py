"""Evaluation reports: metrics.json, a Markdown summary and PNG plots, written as one folder atomically.

    write_report("reports/mnist-test", metrics, iq, context)

Plots: recall@k and precision@k against k, the confusion matrix of the nearest neighbour's class, the worst
failures (queries whose nearest neighbour has another label, closest first, beside their neighbours) and a 2-D
PCA projection of the query embeddings coloured by class. Drawn with matplotlib's Agg canvas (no display).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from retrieval.errors import RetrievalError, UsageError
from retrieval.fsutil import atomic_write_json, atomic_write_text, ensure_writable_dir

logger = logging.getLogger(__name__)

REPORT_FILES = ("metrics.json", "summary.md", "recall_at_k.png", "confusion_matrix.png", "failures.png",
                "embeddings_pca.png")
MAX_FAILURE_ROWS = 10
FAILURE_NEIGHBOURS = 6
MAX_PROJECTED_POINTS = 5000


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _save(fig, path: Path) -> None:
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight")


def plot_recall_curve(metrics, path: Path, title: str = "") -> None:
    """recall@k and precision@k against k (log2 axis), with MAP@R and R-precision in the legend."""
    ks = list(metrics.ks)
    fig = _figure(5.5, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(ks, [metrics.recall[k] for k in ks], "o-", label="recall@k")
    ax.plot(ks, [metrics.precision[k] for k in ks], "s--", label="precision@k")
    ax.axhline(metrics.map_at_r, color="#888888", lw=1, ls=":", label=f"MAP@R = {metrics.map_at_r:.4f}")
    if len(ks) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel("k (nearest references)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title or f"{metrics.n_scored:,} queries, R-precision {metrics.r_precision:.4f}", fontsize=9)
    _save(fig, path)


def plot_confusion(metrics, path: Path, title: str = "") -> None:
    """Rows: query class; columns: class of its nearest neighbour; colour: fraction of the row; counts written
    in the cells when there are few classes."""
    counts = metrics.confusion
    used = np.flatnonzero(counts.sum(0) + counts.sum(1) > 0)
    counts = counts[np.ix_(used, used)]
    names = [metrics.classes[i] for i in used]
    n = len(names)
    rows = counts.sum(1, keepdims=True)
    frac = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    size = min(12.0, 2.5 + 0.45 * n)
    fig = _figure(size + 1.0, size)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the row")
    ticks = np.arange(n)
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xticklabels(names, rotation=90 if max(map(len, names)) > 3 else 0, fontsize=8)
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xlabel("class of the nearest neighbour")
    ax.set_ylabel("query class")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if frac[i, j] > 0.5 else "black")
    ax.set_title(title or "confusion matrix (1-NN)", fontsize=9)
    _save(fig, path)


def pca_2d(x: np.ndarray) -> np.ndarray:
    """Project onto the two principal components (scikit-learn's exact PCA; deterministic signs: each component's
    largest loading positive). Fewer than two samples or dimensions give zero columns."""
    from sklearn.decomposition import PCA

    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"pca_2d expects a 2-d array, got shape {x.shape}")
    n_components = min(2, x.shape[0] - 1, x.shape[1]) if len(x) > 1 else 0
    out = np.zeros((len(x), 2))
    if n_components <= 0:
        return out
    pca = PCA(n_components=n_components, svd_solver="full").fit(x)
    components = pca.components_
    signs = np.sign(components[np.arange(len(components)), np.abs(components).argmax(1)])
    out[:, :n_components] = (x - pca.mean_) @ (components * signs[:, None]).T
    return out


def plot_projection(embeddings, labels, classes: Sequence[str], path: Path, title: str = "", seed: int = 0,
                    max_points: int = MAX_PROJECTED_POINTS) -> None:
    """Scatter of a PCA projection of (at most max_points, seeded) embeddings, coloured by label."""
    embeddings = np.asarray(embeddings)
    labels = np.asarray(labels)
    if len(embeddings) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(embeddings), max_points, replace=False))
        embeddings, labels = embeddings[keep], labels[keep]
    xy = pca_2d(embeddings)
    present = np.unique(labels)
    cmap_name = "tab10" if len(present) <= 10 else "tab20"
    from matplotlib import colormaps

    cmap = colormaps[cmap_name]
    fig = _figure(6.5, 5.5)
    ax = fig.add_subplot(1, 1, 1)
    for i, c in enumerate(present):
        sel = labels == c
        ax.scatter(xy[sel, 0], xy[sel, 1], s=4, alpha=0.6, color=cmap(i % cmap.N), label=str(classes[c]),
                   linewidths=0)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    if len(present) <= 20:
        ax.legend(markerscale=3, fontsize=7, loc="best", frameon=False)
    ax.set_title(title or f"query embeddings, PCA ({len(xy):,} points)", fontsize=9)
    _save(fig, path)


def failure_rows(metrics, iq, root=None, max_rows: int = MAX_FAILURE_ROWS, neighbours: int = FAILURE_NEIGHBOURS):
    """GridRows for the scored queries whose nearest neighbour has another label, closest mistakes first."""
    from retrieval.grid import BAD, GOOD, GridCell, GridRow, SourceImages

    wrong = np.flatnonzero(metrics.scored & ~metrics.nn_correct & (metrics.neighbor_ids[:, 0] >= 0))
    wrong = wrong[np.argsort(metrics.neighbor_distances[wrong, 0], kind="stable")][:max_rows]
    sources = SourceImages(root)
    classes = metrics.classes
    rows = []
    for i in wrong.tolist():
        true = classes[metrics.query_labels[i]]
        nn = classes[metrics.neighbor_labels[i, 0]]
        name = os.path.basename(iq.dataset.sources[i]) if os.sep in iq.dataset.sources[i] else iq.dataset.sources[i]
        cells = []
        for j in range(min(neighbours, metrics.neighbor_ids.shape[1])):
            nid = int(metrics.neighbor_ids[i, j])
            if nid < 0:
                break
            label = classes[metrics.neighbor_labels[i, j]]
            source = iq.index.sources_of([nid])[0]
            cells.append(GridCell(sources.get(source), f"{label}  d={metrics.neighbor_distances[i, j]:.3f}\n#{nid}",
                                  GOOD if label == true else BAD))
        rows.append(GridRow(GridCell(iq.dataset.images[i], f"{name}\ntrue {true} → {nn}", BAD), cells))
    return rows


def summary_markdown(metrics, context: dict, figures: Sequence[str]) -> str:
    from retrieval.metrics import METRIC_DEFINITIONS

    ks = metrics.ks
    lines = ["# Retrieval evaluation", ""]
    for key, value in context.items():
        lines.append(f"- **{key}**: {value}")
    lines += [
        f"- **queries**: {metrics.n_queries:,} ({metrics.n_scored:,} scored, {metrics.n_lone:,} lone: no reference "
        "of their class, left out of the averages)",
        f"- **references**: {metrics.n_references:,}",
        "",
        "| metric | " + " | ".join(f"k={k}" for k in ks) + " |",
        "|---|" + "---:|" * len(ks),
        "| recall@k | " + " | ".join(f"{metrics.recall[k]:.4f}" for k in ks) + " |",
        "| precision@k | " + " | ".join(f"{metrics.precision[k]:.4f}" for k in ks) + " |",
        "",
        f"**MAP@R** {metrics.map_at_r:.4f} · **R-precision** {metrics.r_precision:.4f} · "
        f"**1-NN accuracy** {metrics.precision[ks[0]] if ks[0] == 1 else float('nan'):.4f}",
        "",
        "## Per class",
        "",
        "| class | queries | 1-NN accuracy | MAP@R | R-precision |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in metrics.per_class.items():
        lines.append(f"| {name} | {row['queries']:,} | {row['nn_accuracy']:.4f} | {row['map@r']:.4f} | "
                     f"{row['r_precision']:.4f} |")
    if figures:
        lines += ["", "## Figures", ""]
        for name in figures:
            lines += [f"![{name}]({name})", ""]
    lines += ["## Definitions", ""] + [f"- {d}" for d in METRIC_DEFINITIONS] + [""]
    return "\n".join(lines)


def _prepare_output(out: Path) -> None:
    """Refuse to replace anything but a previous report (or an empty folder)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f"`report` {out} exists and is not a folder")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in REPORT_FILES)
    if foreign:
        raise UsageError(
            f"`report` {out} holds other files ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
            "choose a new or empty folder, or a previous report folder to replace it"
        )


def write_report(out, metrics, iq, context: dict, *, payload: dict | None = None, root=None,
                 seed: int = 0) -> list[Path]:
    """Write metrics.json (`payload`, default context + metrics), summary.md (context as a list, then the
    metrics) and the plots into `out`: built in a temporary sibling folder, then put in place atomically (a
    previous report there is exchanged with it, then deleted), so a failure or a crash at any moment leaves the
    previous report or the new one, whole."""
    out = Path(out)
    _restore_interrupted_swap(out)
    _prepare_output(out)
    parent = ensure_writable_dir(out.parent if str(out.parent) else Path("."), "report parent folder")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    try:
        figures = []
        plot_recall_curve(metrics, tmp / "recall_at_k.png")
        figures.append("recall_at_k.png")
        plot_confusion(metrics, tmp / "confusion_matrix.png")
        figures.append("confusion_matrix.png")
        rows = failure_rows(metrics, iq, root=root)
        if rows:
            from retrieval.grid import render_grid

            render_grid(rows, tmp / "failures.png",
                        title=f"worst failures: {len(rows)} closest wrong nearest neighbours (of "
                              f"{int((metrics.scored & ~metrics.nn_correct).sum()):,})")
            figures.append("failures.png")
        else:
            logger.info("no failures to draw: every scored query's nearest neighbour has its label")
        plot_projection(iq.embeddings, metrics.query_labels, metrics.classes, tmp / "embeddings_pca.png", seed=seed)
        figures.append("embeddings_pca.png")
        atomic_write_json(tmp / "metrics.json", payload if payload is not None else {**context, **metrics.to_json()})
        atomic_write_text(tmp / "summary.md", summary_markdown(metrics, context, figures))
        # mkdtemp makes a private (0700) folder; a report is meant to be read (its files already get the usual
        # permissions: atomic writes apply the umask, as savefig does)
        os.chmod(tmp, 0o755)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [out / name for name in ("metrics.json", "summary.md", *figures)]


# renameat2(2): exchange two paths atomically (Linux 3.15+, glibc 2.28+; most local filesystems).
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without renameat2 (old glibc, some musl builds)
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def exchange_paths(a, b) -> bool:
    """Atomically swap what the paths `a` and `b` name (both must exist): renameat2(RENAME_EXCHANGE).

    Returns False, changing nothing, where the system cannot (not Linux, no renameat2 in libc, a kernel or a
    filesystem without RENAME_EXCHANGE: ENOSYS/EINVAL); raises OSError for any other failure."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(os.fspath(a)), _AT_FDCWD, os.fsencode(os.fspath(b)), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err), os.fspath(a), None, os.fspath(b))


def _restore_interrupted_swap(out: Path) -> None:
    """Where a crash between the two renames of the fallback swap left no report at `out` but the previous one
    in its `.old` sibling, put that back (the newest, should there be several)."""
    if os.path.lexists(out) or not out.parent.is_dir():
        return
    prefix = f".{out.name}."
    olds = [p for p in out.parent.iterdir()
            if p.name.startswith(prefix) and p.name.endswith(".tmp.old") and p.is_dir() and not p.is_symlink()]
    if olds:
        newest = max(olds, key=lambda p: p.stat().st_mtime)
        os.replace(newest, out)


def _swap_into_place(new: Path, out: Path) -> None:
    """Put the folder `new` at `out`. A folder already at `out` is exchanged with `new` in one atomic step, so
    `out` always holds a whole report, then deleted; without renameat2 it is moved aside to a `.old` sibling
    first (a crash between the two renames is repaired by the next write_report: _restore_interrupted_swap)."""
    if not out.exists():
        os.replace(new, out)
        return
    if exchange_paths(new, out):
        shutil.rmtree(new, ignore_errors=True)  # `new` now names the previous report
        return
    old = new.with_name(new.name + ".old")
    os.replace(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def check_report_target(out) -> None:
    """Fail early (before long work) when `out` cannot take a report."""
    out = Path(out)
    _restore_interrupted_swap(out)
    _prepare_output(out)
    parent = next((p for p in out.parents if p.exists()), Path("."))  # the nearest folder that exists
    if not parent.is_dir():
        raise UsageError(f"`report` {out}: {parent} is not a folder")
    if not os.access(parent, os.W_OK):
        raise RetrievalError(f"`report` {out}: {parent} is not writable")
