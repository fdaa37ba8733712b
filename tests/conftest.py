"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread: on tiny tensors a second one adds only synchronisation, which on a
    shared, loaded machine costs several times the work itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shakespeare_root() -> Path:
    """The data folder holding tinyshakespeare/input.txt: $TOREQ_DATA or the shared one beside
    the repository."""
    root = Path(os.environ.get("TOREQ_DATA")
                or Path(__file__).resolve().parents[2] / "shared" / "data")
    if not (root / "tinyshakespeare" / "input.txt").is_file():
        pytest.skip(f"no local copy of tinyshakespeare/input.txt in {root} (set TOREQ_DATA to "
                    "a folder with it)")
    return root


@pytest.fixture(scope="session")
def shakespeare(shakespeare_root):
    """Tiny Shakespeare as a :class:`toreq.data.CharCorpus`."""
    from toreq.data import load_tiny_shakespeare

    return load_tiny_shakespeare(shakespeare_root, download=False)


@pytest.fixture(scope="session")
def mnist():
    """MNIST (the official files) from $TOREQ_DATA or the shared data beside the repository, as
    a :class:`toreq.data.ClassificationData`."""
    from toreq.data import load_mnist

    root = Path(os.environ.get("TOREQ_DATA")
                or Path(__file__).resolve().parents[2] / "shared" / "data")
    if not (root / "mnist" / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"no local copy of MNIST in {root} (set TOREQ_DATA to a folder with mnist/)")
    return load_mnist(root, download=False)
