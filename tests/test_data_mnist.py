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


def test_labels_beyond_9_are_refused_without_checksum(data_root, tmp_path):
    raw = _copy(data_root, tmp_path)
    with gzip.open(raw / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01\x00\x00\x27\x10" + bytes(9_999) + b"\xff")  # 10,000 labels, the last 255
    with pytest.raises(DataError, match="holds labels up to 255; MNIST's are 0 to 9"):
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


def test_center_preprocessing_subtracts_the_training_pixel_means(mnist, data_root):
    """`preprocess="center"` (the original mnist.py's pylearn2 MNIST(center=True)): pixels in [0, 1] minus the
    per-pixel mean of the training split, the same means for every split."""
    c = load_dataset("mnist", data_root, download=False, preprocess="center")
    raw = [(s + 1) / 2 for s in (mnist.train_x, mnist.val_x, mnist.test_x)]  # [-1, 1] back to [0, 1]
    mean = raw[0].double().mean(dim=0)
    for got, r in zip((c.train_x, c.val_x, c.test_x), raw, strict=True):
        torch.testing.assert_close(got.double(), r.double() - mean, atol=1e-6, rtol=0)
    assert c.train_x.double().mean(dim=0).abs().max() < 1e-6  # centred on the training split
    assert c.val_x.double().mean(dim=0).abs().max() > 1e-3  # not on its own
    assert torch.equal(c.train_y, mnist.train_y) and torch.equal(c.test_y, mnist.test_y)
    with pytest.raises(ConfigError, match="MNIST preprocess must be one of symmetric, center, got 'gcn'"):
        load_dataset("mnist", data_root, download=False, preprocess="gcn")


def test_unknown_dataset_option_is_named_with_the_known_ones(data_root):
    with pytest.raises(ConfigError, match="dataset 'mnist' has no option 'foo'; its options: verify, preprocess$"):
        load_dataset("mnist", data_root, foo=1)
