"""`retrieval index build|add|info` and `retrieval query`: Faiss indexes of a tower's embeddings, and lookups."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from retrieval.cli import app
from retrieval.cli.common import (
    BatchSizeOption, ClassesOption, DataRootOption, DeviceOption, ExcludeOption, IndexCheckpointOption,
    PrecisionOption, SeedOption, SpecHelp, SubsetOption,
    log, print_json,
)

index_app = typer.Typer(
    help="Build, extend and inspect Faiss indexes of a trained tower's embeddings.", no_args_is_help=True
)
app.add_typer(index_app, name="index")

DataOption = typer.Option(..., "--data", help=f"{SpecHelp} Repeat --data to combine several.")


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
    train_size: Optional[int] = typer.Option(
        None, "--train-size", min=1,
        help="Train IVF/PQ/OPQ indexes on a seeded sample of this many vectors (default: 39 per centroid of the "
             "largest k-means, Faiss's minimum, e.g. 159,744 for IVF4096; a warning says when there are fewer).",
        show_default=False,
    ),
    on_disk: bool = typer.Option(
        False, "--on-disk",
        help="IVF indexes only: keep the inverted lists in a file of the index folder, memory-mapped when searched, "
             "so an index larger than memory can be built (in blocks) and searched.",
    ),
    chunk_size: Optional[int] = typer.Option(
        None, "--chunk-size", min=1,
        help="Images read and embedded at a time (default 16,384): memory holds the tower, the index and one chunk.",
        show_default=False,
    ),
    dist_timeout: Optional[float] = typer.Option(
        None, "--dist-timeout", min=0.001, metavar="SECONDS",
        help="Under torchrun: how long a process waits for the others before the job fails with a message "
             "(default 300).", show_default=False,
    ),
    batch_size: Optional[int] = BatchSizeOption,
    device: str = DeviceOption,
    precision: str = PrecisionOption,
    root: Optional[Path] = DataRootOption,
    classes: Optional[str] = ClassesOption,
    exclude: Optional[str] = ExcludeOption,
    subset: Optional[int] = SubsetOption,
    seed: int = SeedOption,
    json_out: bool = typer.Option(
        False, "--json",
        help='Print {"folder", "meta", "label_counts", "seconds"} (as `index info --json`, with the build time) '
             "instead of the folder.",
    ),
) -> None:
    """Embed a dataset with a trained tower and save a Faiss index of it (prints the index folder).

    The folder carries a copy of the tower (weights, sidecar, model card: a few MB at most), so it can be copied
    anywhere (cp -r, rsync, tar) and queried there without the run folder.

    Several processes or machines: torchrun --nproc-per-node N -m retrieval index build ... (each process embeds
    its share of the images; rank 0 merges the shares with Faiss, writes the folder and prints; the index is the
    one a single process builds).
    """
    import time

    from retrieval.distributed import is_follower
    from retrieval.logs import setup_cli_logging
    from retrieval.workflows import Compute, Selection, build_index

    follower = is_follower()  # a process of a torchrun launch other than rank 0: warnings and errors only
    if follower:
        setup_cli_logging(-1)
    start = time.perf_counter()
    index = build_index(
        checkpoint, Selection(data, root, classes, exclude, subset, seed), out, factory=factory, metric=metric,
        prototypes=prototypes, search_params=search_params, train_size=train_size, on_disk=on_disk,
        chunk_size=chunk_size, compute=Compute(device, batch_size, precision), dist_timeout=dist_timeout,
    )
    if index is None:
        return
    if json_out:
        print_json({"folder": str(index.folder), "meta": index.meta, "label_counts": index.label_counts(),
                    "seconds": round(time.perf_counter() - start, 3)})
    else:
        print(index.folder)


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
    precision: str = PrecisionOption,
    root: Optional[Path] = DataRootOption,
    classes: Optional[str] = ClassesOption,
    exclude: Optional[str] = ExcludeOption,
    subset: Optional[int] = SubsetOption,
    seed: int = SeedOption,
) -> None:
    """Embed more images with the index's own tower and append them with new ids (new classes are added)."""
    from retrieval.workflows import Compute, Selection, add_to_index

    add_to_index(index, Selection(data, root, classes, exclude, subset, seed), checkpoint=checkpoint,
                 compute=Compute(device, batch_size, precision))
    print(index)


@index_app.command("info")
def info(
    folder: Path = typer.Argument(..., help="Index folder."),
    json_out: bool = typer.Option(False, "--json", help="Print the metadata and per-label counts as JSON."),
) -> None:
    """Show an index's metadata (factory, metric, tower, data, ...), its size on disk and in memory, and how many
    vectors each label has."""
    from retrieval.data.specs import filters_text
    from retrieval.index import index_sizes, load_index

    index = load_index(folder)
    counts = index.label_counts()
    meta = index.meta
    sizes = index_sizes(index)
    if json_out:
        print_json({"folder": str(folder), "meta": meta, "label_counts": counts, "sizes": sizes})
        return
    from retrieval.index import IndexFolder, tower_files

    tower = meta.get("tower") or {}
    checkpoint = tower.get("checkpoint")
    copied = tower_files(meta)
    if copied:
        here = not IndexFolder(folder).missing_tower_files(meta)
        tower_row = ("tower files", ", ".join(copied.values()) + ("" if here else "  (missing from the folder)"))
        checkpoint_row = ("built from", str(checkpoint))
    else:
        present = "" if checkpoint and Path(checkpoint).exists() else "  (missing)"
        tower_row = ("checkpoint", f"{checkpoint}{present}")
        checkpoint_row = ("note", "written by an earlier version: the folder does not carry its tower; rebuild it")
    rows = [
        ("folder", str(folder)),
        ("vectors", f"{len(index):,}" + ("  (one prototype per class)" if meta.get("prototypes") else "")),
        ("factory", meta["factory"] + ("  (inverted lists on disk)" if meta.get("on_disk") else "")
         + (f"  (trained on {meta['train_size']:,} vectors)" if meta.get("train_size") else "")),
        ("metric", meta["metric"]),
        ("dimension", str(meta["dimension"])),
        ("search params", meta.get("search_params") or "(Faiss defaults)"),
        ("size on disk", f"{_bytes(sizes['disk']['total'])}  ("
                         + ", ".join(f"{k} {_bytes(v)}" for k, v in sizes["disk"].items() if k != "total") + ")"),
        ("in memory", f"about {_bytes(sizes['memory']['total'])} loaded"
                      + (f"; the inverted lists ({_bytes(sizes['mapped'])}) stay on disk, memory-mapped and paged in "
                         "as searched" if sizes["mapped"] else "")),
        ("tower", f"{tower.get('name')} ({tower.get('embedding_size')}-d), fingerprint {str(tower.get('fingerprint'))[:12]}"),
        tower_row,
        checkpoint_row,
        ("preprocessing", str(meta.get("preprocessing"))),
        ("created", f"{meta.get('created')} by retrieval {meta.get('tool_version')} (faiss {meta.get('faiss_version')})"),
    ]
    if meta.get("tuned"):
        rows.insert(6, ("tuned", _tuned_row(meta["tuned"])))
    if meta.get("updated"):
        rows.append(("updated", meta["updated"]))
    for entry in meta.get("data", []):
        filters = f"  ({filters_text(entry['filters'])})" if entry.get("filters") else ""
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


@index_app.command("tune")
def tune(
    index: Path = typer.Option(..., "--index", help="Index folder to tune."),
    queries: str = typer.Option(..., "--queries", help=f"Query images. {SpecHelp}"),
    k: int = typer.Option(10, "--k", "-k", min=1, help="recall@k is measured against exact search."),
    recall: float = typer.Option(0.95, "--recall", min=0.0, max=1.0, help="The recall@k the setting must reach."),
    grid: Optional[List[str]] = typer.Option(
        None, "--grid",
        help="Values to try for one Faiss search parameter, e.g. --grid nprobe=8,16,32 --grid k_factor_rf=2,4 "
             "(default: nprobe 1..nlist, efSearch 16..512, k_factor_rf 1..1,024, as the index has them).",
    ),
    subset: Optional[int] = typer.Option(1000, "--subset", help="Take a seeded random subset of this many queries."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Timed runs per setting (the median is kept)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Measure and print, but store nothing."),
    json_out: bool = typer.Option(False, "--json", help="Print the measurements and the choice as JSON."),
    checkpoint: Optional[Path] = IndexCheckpointOption,
    batch_size: Optional[int] = BatchSizeOption,
    device: str = DeviceOption,
    root: Optional[Path] = DataRootOption,
    classes: Optional[str] = ClassesOption,
    exclude: Optional[str] = ExcludeOption,
    seed: int = SeedOption,
) -> None:
    """Measure recall@k against exact search and queries/s for a grid of search parameters, and store the fastest
    setting that reaches --recall as the index's search parameters (`retrieval query` and the service use them).

    Exits 1 when no setting of the grid reaches the recall (nothing is stored).
    """
    from retrieval.tune import parse_grid
    from retrieval.workflows import Compute, Selection, tune_index

    result = tune_index(index, Selection(queries, root, classes, exclude, subset, seed), k=k, target_recall=recall,
                        grid=parse_grid(grid) if grid else None, store=not dry_run, repeats=repeats,
                        compute=Compute(device, batch_size), checkpoint=checkpoint)
    chosen = result.chosen
    if json_out:
        print_json({"index": str(index), "k": result.k, "target_recall": recall, "queries": result.queries,
                    "settings": [r.to_json() for r in result.results],
                    "chosen": chosen.to_json() if chosen else None, "stored": result.stored})
    else:
        width = max(len(r.search_params) for r in result.results)
        print(f"{'search params':<{width}}  recall@{result.k}  queries/s  ms/query")
        for r in result.results:
            mark = "  <- chosen" if chosen is not None and r.search_params == chosen.search_params else ""
            print(f"{r.search_params:<{width}}  {r.recall:9.4f}  {r.queries_per_s:9,.0f}  {r.latency_ms:8.3f}{mark}")
    if chosen is None:
        best = max(result.results, key=lambda r: r.recall)
        log(f"no setting reaches recall@{result.k} >= {recall} (best {best.recall:.4f} with {best.search_params}); "
            "nothing stored: try a larger --grid, or an index with more lists probed or a refine stage")
        raise typer.Exit(1)
    log(f"{'stored' if result.stored else 'would store (--dry-run)'} search params {chosen.search_params} in "
        f"{index}: recall@{result.k} {chosen.recall:.4f}, {chosen.queries_per_s:,.0f} queries/s")


def _bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _tuned_row(tuned: dict) -> str:
    return (f"{tuned.get('search_params')}: recall@{tuned.get('k')} {tuned.get('recall'):.4f} (target "
            f"{tuned.get('target_recall')}), {tuned.get('queries_per_s'):,.0f} queries/s on {tuned.get('queries')}")


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
    checkpoint: Optional[Path] = IndexCheckpointOption,
    search_params: Optional[str] = typer.Option(
        None, "--search-params",
        help="Faiss search parameters for these queries instead of the index's stored ones (`index info`), by "
             "Faiss's names: nprobe=64 (IVF), efSearch=128 (HNSW), k_factor_rf=8 (refine), e.g. nprobe=64,k_factor_rf=8.",
    ),
    batch_size: Optional[int] = BatchSizeOption,
    device: str = DeviceOption,
    precision: str = PrecisionOption,
    root: Optional[Path] = DataRootOption,
) -> None:
    """Find the nearest indexed images of each query and predict its label (majority of the k neighbours).

    Pictures of your own become MNIST-style 28x28 images first (grey, inverted when light, cropped, centred).

    Unreadable inputs are reported and the others still answered; the exit code is then 1.
    """
    from retrieval.query import format_result
    from retrieval.workflows import Compute, query as run

    answers = run(index, paths, k, max_distance=max_distance, checkpoint=checkpoint, grid=grid, root=root,
                  search_params=search_params, compute=Compute(device, batch_size, precision))
    if json_out:
        print_json([r.to_json() for r in answers.results])
    else:
        for r in answers.results:
            if r.error is None:
                print(format_result(r, answers.max_distance))
    if answers.failed:  # each one was logged by the library
        log(f"{len(answers.failed)} of {len(answers.results)} queries could not be answered")
        raise typer.Exit(1)
