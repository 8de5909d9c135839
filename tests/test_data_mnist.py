"""MNIST loading: splits, preprocessing, checksum and format errors."""

import gzip
import shutil
import struct

import numpy as np
import pytest
import torch

from binaryconnect.data import Splits, load_dataset
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


# ---------------------------------------------------------------------------------------------------
# small generated IDX files (verify=False): the split's boundaries and the labels' range, in milliseconds


def _write_idx(path, magic: int, array: np.ndarray) -> None:
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">" + "I" * (1 + array.ndim), magic, *array.shape) + array.astype(np.uint8).tobytes())


def _tiny_mnist(root, n_train=12, n_test=3, train_labels=None):
    """Official-format files of ``n_train`` / ``n_test`` 2 x 3 images: image ``k``'s first pixel is ``20 k`` (so
    images can be told apart), its others random, with pixels 0 and 255 present; labels ``k % 10``."""
    rng = np.random.default_rng(0)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 2, 3)).astype(np.uint8)
        x[:, 0, 0] = 20 * np.arange(n)
        x[0, 1, 1], x[0, 1, 2] = 0, 255
        y = np.arange(n) % 10 if split == "t10k" or train_labels is None else np.asarray(train_labels)
        _write_idx(raw / f"{split}-images-idx3-ubyte.gz", 2051, x)
        _write_idx(raw / f"{split}-labels-idx1-ubyte.gz", 2049, y)
        images[split] = (x, y)
    return images


def test_generated_split_holds_out_the_last_images_with_their_labels(tmp_path):
    """train = the first ``N - val_size`` images, validation = the last ``val_size``, each with its own label;
    every split's pixels ``v / 127.5 - 1`` (0 -> -1, 255 -> 1), labels int64."""
    files = _tiny_mnist(tmp_path)
    (x, y), (tx, ty) = files["train"], files["t10k"]
    s = load_dataset("mnist", tmp_path, val_size=5, download=False, verify=False)
    scaled = lambda a: torch.from_numpy(a).float().unsqueeze(1) / 127.5 - 1  # noqa: E731
    for got, want in ((s.train_x, scaled(x[:7])), (s.val_x, scaled(x[7:])), (s.test_x, scaled(tx))):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert s.train_y.tolist() == y[:7].tolist() and s.val_y.tolist() == y[7:].tolist()
    assert s.test_y.tolist() == ty.tolist() == [0, 1, 2]
    assert s.train_x[0, 0, 1, 1] == -1.0 and s.train_x[0, 0, 1, 2] == 1.0 and s.val_y.dtype == torch.int64
    one = load_dataset("mnist", tmp_path, val_size=11, download=False, verify=False)  # the largest: 1 training image
    assert len(one.train_x) == 1 and one.val_y.tolist() == y[1:].tolist()
    for bad in (0, -1, 12):
        with pytest.raises(ConfigError, match=f"val_size must be between 1 and 11, got {bad}"):
            load_dataset("mnist", tmp_path, val_size=bad, download=False, verify=False)


def test_label_9_is_read_and_10_refused(tmp_path):
    """The labels' bound at its edge: 9 is a digit, 10 is not (the test above refuses 255, far from it)."""
    _tiny_mnist(tmp_path / "a", train_labels=[9] * 12)
    assert load_dataset("mnist", tmp_path / "a", val_size=2, download=False, verify=False).train_y.tolist() == [9] * 10
    _tiny_mnist(tmp_path / "b", train_labels=[0] * 11 + [10])
    with pytest.raises(DataError, match="holds labels up to 10; MNIST's are 0 to 9"):
        load_dataset("mnist", tmp_path / "b", val_size=2, download=False, verify=False)


def test_subset_train_and_to_keep_every_split(tmp_path):
    """``subset_train(n)`` (``--train-subset``) keeps the first ``n`` training images and their labels, nothing
    else changed; ``to(device)`` moves all six tensors (the meta device: no data, but a device of its own)."""
    _tiny_mnist(tmp_path)
    s = load_dataset("mnist", tmp_path, val_size=5, download=False, verify=False)
    sub = s.subset_train(3)
    assert isinstance(sub, Splits) and sub.num_classes == 10
    assert torch.equal(sub.train_x, s.train_x[:3]) and torch.equal(sub.train_y, s.train_y[:3])
    for name in ("val_x", "val_y", "test_x", "test_y"):
        assert getattr(sub, name) is getattr(s, name)
    moved = s.to("meta")
    for name in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        assert getattr(moved, name).device.type == "meta" and getattr(moved, name).shape == getattr(s, name).shape
    assert s.train_x.device.type == "cpu"  # a copy: the original stays


def test_run_data_roots_of_an_older_run_with_a_relative_data_dir(tmp_path, monkeypatch):
    """Runs recorded before data_dir was made absolute: a relative one is looked for in the working folder,
    then in the folder the run was started from; places that are not folders are left out; the default
    root (None) comes last; a --data-dir given is the only place."""
    from binaryconnect.data import run_data_roots

    started, here = tmp_path / "started", tmp_path / "here"
    (started / "d").mkdir(parents=True)
    here.mkdir()
    monkeypatch.chdir(here)
    assert run_data_roots(None, "d", str(started)) == [str(started / "d"), None]
    (here / "d").mkdir()
    assert run_data_roots(None, "d", str(started)) == ["d", str(started / "d"), None]
    assert run_data_roots(None, str(tmp_path / "gone"), str(started)) == [None]
    assert run_data_roots("given", "d", str(started)) == ["given"]
    assert run_data_roots(None, None, None) == [None]
