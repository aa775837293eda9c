"""`retrieval index build|add|info` and `retrieval query`: Faiss indexes of a tower's embeddings, and lookups."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from retrieval.cli import app
from retrieval.cli.common import (
    ClassesOption, DataRootOption, ExcludeOption, SeedOption, SpecHelp, SubsetOption, log, print_json,
    root_or_default,
)
from retrieval.errors import UsageError

index_app = typer.Typer(
    help="Build, extend and inspect Faiss indexes of a trained tower's embeddings.", no_args_is_help=True
)
app.add_typer(index_app, name="index")

DataOption = typer.Option(..., "--data", help=f"{SpecHelp} Repeat --data to combine several.")
BatchSizeOption = typer.Option(
    None, "--batch-size", min=1, help="Images per embedding batch (default: 256 on CPU, 4096 on a GPU).",
    show_default=False,
)
DeviceOption = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto (cuda when available).")


def resolve_device(name: str) -> str:
    import torch

    name = name.strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device: unknown device {name!r}; expected cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu")
    return str(device)


@index_app.command("build")
def build(
    checkpoint: Path = typer.Option(
        ..., "--checkpoint", help="A training run folder (its best, else last checkpoint) or a .safetensors file."
    ),
    data: List[str] = DataOption,
    out: Optional[Path] = typer.Option(
        None, "--out", help="Index folder; default indexes/<run>-<data>. An index already there is replaced atomically."
    ),
    factory: str = typer.Option(
        "Flat", "--factory",
        help="Faiss index_factory string: Flat (exact), HNSW32, IVF256,Flat, IVF256,PQ16, ... "
             "IVF/PQ indexes are trained on the data (Faiss wants ~39 vectors per centroid).",
    ),
    metric: str = typer.Option("ip", "--metric", help="ip (inner product, cosine on unit vectors) or l2."),
    search_params: Optional[str] = typer.Option(
        None, "--search-params",
        help="Faiss query-time parameters stored with the index, e.g. nprobe=32 or efSearch=128 "
             "(default: nprobe = nlist/16 (at least 8) for IVF, efSearch=64 for HNSW).",
    ),
    prototypes: bool = typer.Option(
        False, "--prototypes",
        help="Store one vector per class (the re-normalised mean embedding) instead of every image: few-shot "
             "classification from a folder:DIR of a few labelled pictures per class.",
    ),
    batch_size: Optional[int] = BatchSizeOption,
    device: str = DeviceOption,
    root: Optional[Path] = DataRootOption,
    classes: Optional[str] = ClassesOption,
    exclude: Optional[str] = ExcludeOption,
    subset: Optional[int] = SubsetOption,
    seed: int = SeedOption,
) -> None:
    """Embed a dataset with a trained tower and save a Faiss index of it (prints the index folder)."""
    from retrieval.index import build_index_folder, default_index_name

    if out is None:
        out = Path("indexes") / default_index_name(
            checkpoint, data, classes=classes, exclude=exclude, subset=subset, prototypes=prototypes
        )
    index = build_index_folder(
        checkpoint, data, out, factory=factory, metric=metric, prototypes=prototypes, batch_size=batch_size,
        device=resolve_device(device), root=root_or_default(root), classes=classes, exclude=exclude,
        subset=subset, seed=seed, search_params=search_params, log=log,
    )
    log(f"index: {len(index):,} vectors of {index.dimension} dims, {index.meta['factory']} ({index.metric}), "
        f"{len(index.label_counts())} classes -> {out}")
    print(out)


@index_app.command("add")
def add(
    index: Path = typer.Option(..., "--index", help="Index folder to extend."),
    data: List[str] = DataOption,
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint",
        help="Use this checkpoint instead of the one named in the index metadata (it must hold the same tower: "
             "the fingerprints must match).",
    ),
    batch_size: Optional[int] = BatchSizeOption,
    device: str = DeviceOption,
    root: Optional[Path] = DataRootOption,
    classes: Optional[str] = ClassesOption,
    exclude: Optional[str] = ExcludeOption,
    subset: Optional[int] = SubsetOption,
    seed: int = SeedOption,
) -> None:
    """Embed more images with the index's own tower and append them with new ids (new classes are added)."""
    from retrieval.index import add_to_index_folder

    idx, new_ids = add_to_index_folder(
        index, data, checkpoint=checkpoint, batch_size=batch_size, device=resolve_device(device),
        root=root_or_default(root), classes=classes, exclude=exclude, subset=subset, seed=seed, log=log,
    )
    log(f"added {len(new_ids):,} vectors (ids {new_ids[0]}..{new_ids[-1]}); the index now holds {len(idx):,}")
    if idx.meta.get("calibration"):
        log("note: the index has a calibrated distance threshold measured before this addition; "
            "recalibrate it if its contents changed much")
    print(index)


@index_app.command("info")
def info(
    folder: Path = typer.Argument(..., help="Index folder."),
    json_out: bool = typer.Option(False, "--json", help="Print the metadata and per-label counts as JSON."),
) -> None:
    """Show an index's metadata (factory, metric, tower, data, ...) and how many vectors each label has."""
    from retrieval.index import load_index

    index = load_index(folder)
    counts = index.label_counts()
    meta = index.meta
    if json_out:
        print_json({"folder": str(folder), "meta": meta, "label_counts": counts})
        return
    tower = meta.get("tower") or {}
    checkpoint = tower.get("checkpoint")
    present = "" if checkpoint and Path(checkpoint).exists() else "  (missing)"
    rows = [
        ("folder", str(folder)),
        ("vectors", f"{len(index):,}" + ("  (one prototype per class)" if meta.get("prototypes") else "")),
        ("factory", meta["factory"]),
        ("metric", meta["metric"]),
        ("dimension", str(meta["dimension"])),
        ("search params", meta.get("search_params") or "(Faiss defaults)"),
        ("tower", f"{tower.get('name')} ({tower.get('embedding_size')}-d), fingerprint {str(tower.get('fingerprint'))[:12]}"),
        ("checkpoint", f"{checkpoint}{present}"),
        ("preprocessing", str(meta.get("preprocessing"))),
        ("created", f"{meta.get('created')} by retrieval {meta.get('tool_version')} (faiss {meta.get('faiss_version')})"),
    ]
    if meta.get("updated"):
        rows.append(("updated", meta["updated"]))
    for entry in meta.get("data", []):
        filters = f"  {entry['filters']}" if entry.get("filters") else ""
        rows.append(("data", f"{entry.get('spec')}: {entry.get('images', '?'):,} images{filters}"))
    calibration = meta.get("calibration")
    if calibration:
        rows.append(("calibration", ", ".join(f"{k}={v}" for k, v in calibration.items())))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print(f"labels ({len(counts)}):")
    name_width = max([len(c) for c in counts] + [5])
    for name, n in counts.items():
        print(f"  {name:>{name_width}}  {n:8,d}")


@app.command("query")
def query(
    paths: List[str] = typer.Argument(
        ..., help="Image files, folders (every image inside, recursively) or dataset items such as mnist:test[123].",
        show_default=False,
    ),
    index: Path = typer.Option(..., "--index", help="Index folder (from `retrieval index build`)."),
    k: int = typer.Option(5, "--k", "-k", min=1, help="Neighbours per query (the whole index if larger)."),
    json_out: bool = typer.Option(
        False, "--json", help='Print a JSON list of {"query", "label", "neighbors": [{"id", "label", "distance", "source"}]}.'
    ),
    grid: Optional[Path] = typer.Option(None, "--grid", help="Also write a PNG of each query beside its neighbours."),
    max_distance: Optional[float] = typer.Option(
        None, "--max-distance", min=0.0,
        help="Answer 'unknown' when the nearest neighbour is farther than this (default: the calibrated threshold "
             "stored in the index, if any).",
    ),
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", help="Tower checkpoint to use instead of the one named in the index (same fingerprint)."
    ),
    batch_size: Optional[int] = BatchSizeOption,
    device: str = DeviceOption,
    root: Optional[Path] = DataRootOption,
) -> None:
    """Find the nearest indexed images of each query and predict its label (majority of the k neighbours).

    Pictures of your own become MNIST-style 28x28 images first (grey, inverted when light, cropped, centred).

    Unreadable inputs are reported and the others still answered; the exit code is then 1.
    """
    from retrieval.query import Searcher, format_result, resolve_query_inputs

    if grid is not None:  # fail before answering anything, not after
        from retrieval.fsutil import ensure_writable_dir

        if grid.suffix.lower() != ".png":
            raise UsageError(f"--grid {grid}: expected a .png file name")
        ensure_writable_dir(grid.parent, "--grid folder")
    searcher = Searcher.open(index, device=resolve_device(device), checkpoint=checkpoint,
                             max_distance=max_distance, batch_size=batch_size)
    k_used, note = searcher.effective_k(k)
    if note:
        log(note)
    data_root = root_or_default(root)
    inputs = resolve_query_inputs(paths, root=data_root, log=log)
    results = searcher.query_inputs(inputs, k_used)
    failed = [r for r in results if r.error is not None]
    if json_out:
        print_json([r.to_json() for r in results])
    else:
        for r in results:
            if r.error is None:
                print(format_result(r, searcher.max_distance))
    for r in failed:
        log(f"error: {r.error}")
    if grid is not None:
        from retrieval.grid import SourceImages, query_grid_rows, render_grid

        rows = query_grid_rows(results, SourceImages(data_root))
        if rows:
            drawn = render_grid(rows, grid, title=f"{Path(index).name}: {k_used} nearest neighbours")
            log(f"wrote {grid}" + (f" (first {drawn} of {len(rows)} queries)" if drawn < len(rows) else ""))
        else:
            log(f"no grid written to {grid}: no query was answered")
    if failed:
        log(f"{len(failed)} of {len(results)} queries could not be answered")
        raise typer.Exit(1)
