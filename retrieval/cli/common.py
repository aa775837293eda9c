"""Options and helpers shared by the CLI modules."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import typer

from retrieval.data import SPEC_HELP

DataRootOption = typer.Option(
    None, "--root", envvar="RETRIEVAL_DATA_ROOT",
    help="Data root for MNIST/Fashion-MNIST (default: ~/.cache/retrieval/data).",
    show_default=False,
)
SpecHelp = f"Dataset spec: {SPEC_HELP}."
ClassesOption = typer.Option(None, "--classes", help="Keep only these classes (comma-separated names, e.g. 0,4,5,8).")
ExcludeOption = typer.Option(None, "--exclude", help="Drop these classes (comma-separated names).")
SubsetOption = typer.Option(None, "--subset", help="Take a seeded random subset of this many images.")
SeedOption = typer.Option(0, "--seed", help="Seed for every random choice.")
DeviceOption = typer.Option("auto", "--device", help="auto (cuda when available), cpu, cuda or cuda:N.")
IndexCheckpointOption = typer.Option(
    None, "--checkpoint", help="Tower checkpoint to use instead of the one named in the index (same fingerprint)."
)
PrecisionOption = typer.Option(
    "auto", "--precision", metavar="auto|fp32|bf16",
    help="The tower's arithmetic: auto (bf16 where the device has native bfloat16 units, else fp32; an index's "
         "own precision when embedding queries or additions for it), fp32, or bf16 (autocast; embeddings stay fp32).",
)
BatchSizeOption = typer.Option(
    None, "--batch-size", min=1, help="Images per embedding batch (default: 256 on CPU, 4096 on a GPU).",
    show_default=False,
)


def log(msg: str) -> None:
    """A line for the user on stderr (through the library's logger, so --quiet silences it too)."""
    logging.getLogger("retrieval.cli").info(msg)


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


def root_or_default(root: Optional[Path]) -> Path:
    from retrieval.data.specs import default_data_root

    return Path(root) if root else default_data_root()
