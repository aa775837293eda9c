"""The data layer: IDX files, fetching MNIST/Fashion-MNIST, dataset specs and image preprocessing.

The names below are loaded on first use (PEP 562), so importing the package (as `retrieval --help` does, for
SPEC_HELP) does not import torch.
"""

from __future__ import annotations

import importlib

SPEC_HELP = (
    "mnist:train, mnist:test, fashion-mnist:train, fashion-mnist:test, "
    "idx:DIR (one IDX image/label pair in DIR), folder:DIR (DIR/<label>/*.png|jpg|...) "
    "or mnist-c:test/NAME (MNIST test corrupted: fog, lowres-8, thick, photo, canvas...; retrieval.data.corrupt)"
)

_EXPORTS = {
    "read_idx": "idx", "write_idx": "idx",
    "load_image_file": "preprocess", "preprocess_image": "preprocess",
    "ImageDataset": "specs", "default_data_root": "specs", "load_dataset": "specs", "parse_item_spec": "specs",
}
__all__ = ["SPEC_HELP", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"retrieval.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
