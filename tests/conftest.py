"""Shared fixtures. Real datasets come from $BINARYCONNECT_DATA, else ../shared/data beside the checkout.

A missing dataset fails the test (CI must not pass by skipping): set BINARYCONNECT_DATA to the folder
holding MNIST/raw/ and cifar10-jpeg.tar.gz.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _data_root() -> Path:
    env = os.environ.get("BINARYCONNECT_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = _data_root()
    if not (root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"MNIST not found under {root}: set BINARYCONNECT_DATA to the folder holding MNIST/raw/")
    return root


@pytest.fixture(scope="session")
def mnist(data_root):
    """The real MNIST splits (CPU tensors), loaded once per session."""
    from binaryconnect.data import load_dataset

    return load_dataset("mnist", data_root, download=False)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Run the test with one torch thread (bit-identical comparisons assume a fixed thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
