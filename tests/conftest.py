"""Shared test fixtures.

Tests never touch the user's data cache: before any test runs, RETRIEVAL_DATA_ROOT points at a data root of the
test run's own (a fresh temporary folder, fetched once through the real source chain, or the folder named by
RETRIEVAL_TEST_DATA to reuse a verified copy between runs), so library calls with the default root, CLI calls in
the test process and CLI subprocesses all read it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import pytest

_OWN_ROOT: list[Path] = []


def pytest_configure(config):
    explicit = os.environ.get("RETRIEVAL_TEST_DATA")
    if explicit:
        root = Path(explicit).expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
    else:
        root = Path(tempfile.mkdtemp(prefix="retrieval-test-data-"))
        _OWN_ROOT.append(root)
    os.environ["RETRIEVAL_DATA_ROOT"] = str(root)


def pytest_unconfigure(config):
    for root in _OWN_ROOT:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def data_root():
    """The test run's data root holding verified MNIST (fetched through the real source chain when missing)."""
    from retrieval.data.fetch import fetch_dataset
    from retrieval.data.specs import default_data_root

    root = default_data_root()
    fetch_dataset("mnist", root)
    return root


@pytest.fixture
def debian_fashion_mnist():
    """The folder of Debian's dataset-fashion-mnist package. Where it is not installed the test is skipped,
    naming the package, or fails when RETRIEVAL_REQUIRE_FASHION_MNIST is set (CI installs it)."""
    from retrieval.data.fetch import DEBIAN_FASHION_DIR, FASHION_MNIST

    missing = [name for name in FASHION_MNIST.checksums if not (DEBIAN_FASHION_DIR / name).is_file()]
    if missing:
        what = (f"Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist): no "
                f"{', '.join(missing)} in {DEBIAN_FASHION_DIR}")
        if os.environ.get("RETRIEVAL_REQUIRE_FASHION_MNIST"):
            pytest.fail(f"{what}, but RETRIEVAL_REQUIRE_FASHION_MNIST is set")
        pytest.skip(f"{what} (set RETRIEVAL_REQUIRE_FASHION_MNIST=1 to fail instead)")
    return DEBIAN_FASHION_DIR


@pytest.fixture
def log_messages(caplog):
    """A function returning the library's log messages (INFO and up) so far in the test, as strings."""
    caplog.set_level(logging.INFO, logger="retrieval")
    return lambda: [record.getMessage() for record in caplog.records if record.name.startswith("retrieval")]


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (tiny batches: fastest, and the same on every machine, so runs compare
    bit for bit); modules use it with pytestmark = pytest.mark.usefixtures("one_thread")."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def untrained_run(tmp_path_factory, data_root):
    """A run folder holding an untrained default tower, seeded (torch.manual_seed(0)): the same weights in every
    module, and neighbours far from perfect, so metrics are not trivially 1."""
    import torch

    from retrieval.checkpoint import save_checkpoint
    from retrieval.towers import build_tower

    base = tmp_path_factory.mktemp("untrained-run")
    torch.manual_seed(0)
    save_checkpoint(base / "best", build_tower("default"))
    return base
