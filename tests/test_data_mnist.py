"""MNIST loading: splits, preprocessing, checksum and format errors."""

import gzip
import shutil

import pytest
import torch

from binaryconnect.data import load_dataset
from binaryconnect.errors import ConfigError, DataError


def test_splits_and_preprocessing(mnist):
    assert mnist.train_x.shape == (50_000, 1, 28, 28) and mnist.val_x.shape == (10_000, 1, 28, 28)
    assert mnist.test_x.shape == (10_000, 1, 28, 28) and mnist.num_classes == 10
    assert mnist.train_x.dtype == torch.float32 and mnist.train_y.dtype == torch.int64
    assert mnist.train_x.min() == -1.0 and mnist.train_x.max() == 1.0  # pixels scaled to [-1, 1]
    # official label counts: the training set has 5923 zeros, the test set 980
    assert (torch.cat([mnist.train_y, mnist.val_y]) == 0).sum() == 5923
    assert (mnist.test_y == 0).sum() == 980
    assert mnist.train_y[:5].tolist() == [5, 0, 4, 1, 9]  # the first official training labels


def _copy(data_root, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    shutil.copytree(data_root / "MNIST" / "raw", raw)
    for f in raw.iterdir():
        f.chmod(0o644)
    return raw


def test_flipped_byte_fails_checksum_naming_the_file(data_root, tmp_path):
    raw = _copy(data_root, tmp_path)
    path = raw / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01
    path.write_bytes(bytes(data))
    expected = r"t10k-labels-idx1-ubyte.gz: expected md5 ec29112dd5afa0611ce80d1b7f02629c, got [0-9a-f]{32}"
    with pytest.raises(DataError, match=expected):
        load_dataset("mnist", tmp_path, download=False)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(DataError, match="lacks train-images-idx3-ubyte.gz, .*t10k-labels-idx1-ubyte.gz"):
        load_dataset("mnist", tmp_path, download=False)
    assert not (tmp_path / "MNIST").exists()  # nothing created


def test_malformed_archive_is_reported_without_checksum(data_root, tmp_path):
    raw = _copy(data_root, tmp_path)
    with gzip.open(raw / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01\x00\x00\x27\x10" + bytes(10))  # header promises 10,000 labels, has 10
    with pytest.raises(DataError, match="its header promises 10000"):
        load_dataset("mnist", tmp_path, download=False, verify=False)


def test_bad_validation_size(data_root):
    with pytest.raises(ConfigError, match="val_size"):
        load_dataset("mnist", data_root, download=False, val_size=60_000)
    for bad in (True, 1.5, "100"):  # True is an int to Python, not a size
        with pytest.raises(ConfigError, match="val_size"):
            load_dataset("mnist", data_root, download=False, val_size=bad)


def test_unknown_dataset():
    with pytest.raises(DataError, match="known datasets: .*mnist"):
        load_dataset("imagenet", "/nonexistent")
