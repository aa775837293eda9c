"""The data layer: IDX files, fetching MNIST/Fashion-MNIST, dataset specs and image preprocessing."""

from retrieval.data.idx import read_idx, write_idx
from retrieval.data.preprocess import load_image_file, preprocess_image
from retrieval.data.specs import ImageDataset, default_data_root, load_dataset, parse_item_spec

__all__ = [
    "ImageDataset",
    "default_data_root",
    "load_dataset",
    "load_image_file",
    "parse_item_spec",
    "preprocess_image",
    "read_idx",
    "write_idx",
]
