"""Shared test fixtures. Real data comes from the data root (RETRIEVAL_DATA_ROOT or the default), fetched once."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def data_root():
    """The data root holding verified MNIST (fetched through the real source chain on a fresh machine)."""
    from retrieval.data.fetch import fetch_dataset
    from retrieval.data.specs import default_data_root

    root = default_data_root()
    fetch_dataset("mnist", root, log=lambda m: None)
    return root
