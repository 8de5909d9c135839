"""SVHN on small files generated in the exact official format (MATLAB v5 .mat, X uint8 32x32x3xN,
y uint8 Nx1, label 10 meaning the digit 0): layout, labels, the class-balanced validation split,
train + extra, checksums, preprocessing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from scipy.io import loadmat, savemat

from binaryconnect.data import cache as cache_mod
from binaryconnect.data import load_dataset, svhn
from binaryconnect.data.preprocess import preprocess_splits
from binaryconnect.errors import ConfigError, DataError


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv(cache_mod.ENV_CACHE, str(tmp_path / "cache"))


def _write_mat(path: Path, n_per_digit: int, source: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An official-format file: ``n_per_digit`` images of each digit, shuffled. Pixel (0, 0) of channel 0
    holds ``source`` and pixels (0, 1), (0, 2) of channel 0 the example's index (base 256), so that tests
    can tell every image apart after loading."""
    rng = np.random.default_rng(seed)
    n = 10 * n_per_digit
    x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
    x[0, 0, 0, :] = source
    x[0, 1, 0, :] = np.arange(n) % 256
    x[0, 2, 0, :] = np.arange(n) // 256
    y = rng.permutation(np.repeat(np.arange(1, 11), n_per_digit)).astype(np.uint8).reshape(n, 1)  # 10 = digit 0
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(path, {"X": x, "y": y}, format="5")
    return x, y


@pytest.fixture
def svhn_root(tmp_path) -> Path:
    root = tmp_path / "data"
    _write_mat(root / "SVHN" / "train_32x32.mat", 6, source=1, seed=0)
    _write_mat(root / "SVHN" / "test_32x32.mat", 2, source=2, seed=1)
    _write_mat(root / "SVHN" / "extra_32x32.mat", 4, source=3, seed=2)
    return root


def _ids(x: torch.Tensor) -> list[tuple[int, int]]:
    """(source, index) of each image loaded with preprocess='none' (pixels v / 127.5 - 1)."""
    px = ((x[:, 0, 0, :3] + 1) * 127.5).round().long()
    return [(int(s), int(a) + 256 * int(b)) for s, a, b in px]


@pytest.fixture
def torchvision_svhn(monkeypatch):
    """torchvision's SVHN reader, with its MD5 check (which generated files cannot pass) switched off."""
    monkeypatch.setattr(torchvision.datasets.SVHN, "_check_integrity", lambda self: True)
    return torchvision.datasets.SVHN


def test_generated_files_are_in_the_official_format(svhn_root, torchvision_svhn):
    mat = loadmat(svhn_root / "SVHN" / "train_32x32.mat")
    assert mat["X"].dtype == np.uint8 and mat["X"].shape == (32, 32, 3, 60)
    assert mat["y"].dtype == np.uint8 and mat["y"].shape == (60, 1) and set(mat["y"].flat) == set(range(1, 11))
    ds = torchvision_svhn(str(svhn_root / "SVHN"), split="train", download=False)  # torchvision reads them
    assert len(ds) == 60


def test_layout_and_label_10_is_digit_0(svhn_root, torchvision_svhn):
    x, y = svhn.read_mat(svhn_root / "SVHN" / "train_32x32.mat")
    raw = loadmat(svhn_root / "SVHN" / "train_32x32.mat")
    assert x.shape == (60, 3, 32, 32) and x.dtype == torch.uint8
    n, c, i, j = 17, 2, 5, 30
    assert x[n, c, i, j] == raw["X"][i, j, c, n]
    assert y.tolist() == [v % 10 for v in raw["y"].flatten().tolist()]
    assert (y == 0).sum() == 6 and y.max() == 9
    ds = torchvision_svhn(str(svhn_root / "SVHN"), split="train", download=False)
    assert np.array_equal(ds.data, x.numpy()) and np.array_equal(ds.labels, y.numpy())  # as torchvision reads


def test_train_only_split(svhn_root):
    s = load_dataset("svhn", svhn_root, val_size=20, download=False, verify=False, preprocess="none")
    assert s.train_x.shape == (40, 3, 32, 32) and s.val_x.shape == (20, 3, 32, 32)
    assert s.test_x.shape == (20, 3, 32, 32) and s.num_classes == 10
    assert torch.bincount(s.val_y, minlength=10).tolist() == [2] * 10  # class-balanced
    train_ids, val_ids = _ids(s.train_x), _ids(s.val_x)
    assert {src for src, _ in train_ids + val_ids} == {1}
    assert sorted(train_ids + val_ids) == [(1, k) for k in range(60)]  # every training image exactly once
    _, y = svhn.read_mat(svhn_root / "SVHN" / "train_32x32.mat")
    assert [int(y[k]) for _, k in train_ids] == s.train_y.tolist()  # images keep their labels
    assert [int(y[k]) for _, k in val_ids] == s.val_y.tolist()
    assert {src for src, _ in _ids(s.test_x)} == {2}


def test_train_plus_extra(svhn_root):
    """train + extra minus a validation set with two thirds of each digit's share from train and one
    third from extra (the paper's 400 + 200 per digit, here 2 + 1)."""
    s = load_dataset("svhn", svhn_root, val_size=30, extra=True, download=False, verify=False, preprocess="none")
    assert len(s.train_x) == 60 + 40 - 30 and len(s.val_x) == 30
    val_ids, train_ids = _ids(s.val_x), _ids(s.train_x)
    assert sum(src == 1 for src, _ in val_ids) == 20 and sum(src == 3 for src, _ in val_ids) == 10
    assert torch.bincount(s.val_y, minlength=10).tolist() == [3] * 10
    every = sorted(train_ids + val_ids)
    assert every == sorted([(1, k) for k in range(60)] + [(3, k) for k in range(40)])
    sources = [src for src, _ in train_ids]
    assert sources != sorted(sources)  # train and extra mixed in the training order
    again = load_dataset("svhn", svhn_root, val_size=30, extra=True, download=False, verify=False,
                         preprocess="none", cache=False)
    assert torch.equal(again.train_x, s.train_x) and torch.equal(again.val_y, s.val_y)  # fixed seed


def test_gcn_lcn_default_preprocessing(svhn_root):
    s = load_dataset("svhn", svhn_root, val_size=20, download=False, verify=False)
    raw = load_dataset("svhn", svhn_root, val_size=20, download=False, verify=False, preprocess="none")
    to_u8 = lambda t: ((t + 1) * 127.5).round().to(torch.uint8)  # noqa: E731
    train, [val, test] = preprocess_splits(to_u8(raw.train_x), [to_u8(raw.val_x), to_u8(raw.test_x)], "gcn-lcn",
                                           gcn_scale=1.0)
    torch.testing.assert_close(s.train_x, train)
    torch.testing.assert_close(s.val_x, val)
    torch.testing.assert_close(s.test_x, test)
    assert s.train_x.dtype == torch.float32 and torch.isfinite(s.train_x).all()


def test_checksums_and_constants(svhn_root):
    with pytest.raises(DataError, match="checksum mismatch .*train_32x32.mat: expected md5 e26dedcc"):
        load_dataset("svhn", svhn_root, val_size=20, download=False)
    tv = torchvision.datasets.SVHN.split_list
    assert svhn.FILES == {split: (name, md5, url) for split, (url, name, md5) in tv.items()}


def test_failed_download_leaves_no_empty_svhn_folder(tmp_path, monkeypatch):
    """Offline, a download of SVHN fails: the data root keeps no empty SVHN/ folder (nor a partial file)
    that the next run, or a person, would take for a download in place."""
    import torchvision.datasets.utils as tv_utils

    def offline(url, root, filename=None, md5=None):
        (Path(root) / filename).write_bytes(b"partial")
        raise OSError("network is unreachable")

    monkeypatch.setattr(tv_utils, "download_url", offline)
    with pytest.raises(DataError, match="could not be downloaded .*network is unreachable"):
        load_dataset("svhn", tmp_path / "root", download=True)
    assert not (tmp_path / "root").exists()
    (tmp_path / "root" / "SVHN").mkdir(parents=True)  # a folder that was there before stays, emptied of nothing
    (tmp_path / "root" / "SVHN" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="could not be downloaded"):
        load_dataset("svhn", tmp_path / "root", download=True)
    assert [f.name for f in (tmp_path / "root" / "SVHN").iterdir()] == ["notes.txt"]


def test_missing_and_malformed_files(svhn_root, tmp_path):
    with pytest.raises(DataError, match="lacks train_32x32.mat, test_32x32.mat"):
        load_dataset("svhn", tmp_path / "empty", download=False)
    (svhn_root / "SVHN" / "extra_32x32.mat").unlink()
    with pytest.raises(DataError, match="lacks extra_32x32.mat.* Or train without it: --dataset-option extra=false"):
        load_dataset("svhn", svhn_root, extra=True, download=False, verify=False)
    bad = tmp_path / "bad.mat"
    savemat(bad, {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[0], [5]], np.uint8)})
    with pytest.raises(DataError, match="labels must lie in 1..10"):
        svhn.read_mat(bad)
    savemat(bad, {"X": np.zeros((28, 28, 3, 2), np.uint8), "y": np.array([[1], [5]], np.uint8)})
    with pytest.raises(DataError, match="expected uint8 32 x 32 x 3 x N"):
        svhn.read_mat(bad)
    savemat(bad, {"X": np.zeros((32, 32, 3, 0), np.uint8), "y": np.zeros((0, 1), np.uint8)})
    with pytest.raises(DataError, match="bad.mat holds no images"):
        svhn.read_mat(bad)
    bad.write_bytes(b"garbage")
    with pytest.raises(DataError, match="not an SVHN .mat file"):
        svhn.read_mat(bad)


def test_validation_size_rules(svhn_root):
    with pytest.raises(ConfigError, match="multiple of 10"):
        load_dataset("svhn", svhn_root, val_size=25, download=False, verify=False)
    with pytest.raises(ConfigError, match="got True"):
        load_dataset("svhn", svhn_root, val_size=True, download=False, verify=False)
    with pytest.raises(ConfigError, match="fewer than the 7"):
        load_dataset("svhn", svhn_root, val_size=70, download=False, verify=False)


@pytest.mark.slow
def test_svhn_recipe_runs_end_to_end(svhn_root, tmp_path):
    """svhn-stochastic with its data options (GCN + LCN, train + extra) on the generated files, a narrow net."""
    from binaryconnect.checkpoint import read_checkpoint_state
    from binaryconnect.config import recipe_config
    from binaryconnect.train import evaluate, fit, load_run

    config = recipe_config("svhn-stochastic", model_kwargs={"channels": [4, 8, 8], "hidden": 16}, epochs=2,
                           batch_size=10, device="cpu", val_size=30, data_dir=str(svhn_root), download=False,
                           dataset_kwargs={"verify": False})
    assert config.dataset_kwargs == {"preprocess": "gcn-lcn", "extra": True, "verify": False}
    logged: list[str] = []
    summary = fit(config, tmp_path / "run", progress=False, log=lambda *a, **k: logged.append(" ".join(map(str, a))))
    # train (60) + extra (40) minus 30 validation images, the 20 test images; 70 // 10 = 7 steps an epoch, 2 epochs
    assert "70 train / 30 val / 20 test" in logged[0]
    assert read_checkpoint_state(tmp_path / "run" / "checkpoint.safetensors")["global_step"] == 2 * 7
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(np.isfinite(r["train_loss"]) and r["train_loss"] > 0 for r in records)
    # the labels of the generated files are random, so no error can be expected to fall (measured validation /
    # test error: 0.93 / 0.95 after epoch 1, 0.90 / 0.90 after epoch 2, the best). What can be checked: the
    # summary reports the best-validation epoch (ties: the later) and its errors, and the saved model is that
    # epoch's: evaluated again on the run's own (GCN + LCN) splits it gives the same errors
    best = max(r["epoch"] for r in records if r["val_error"] == min(q["val_error"] for q in records))
    assert summary["best_epoch"] == best and summary["test_error"] == records[best - 1]["test_error"]
    assert summary["best_val_error"] == records[best - 1]["val_error"]
    data = load_dataset("svhn", svhn_root, val_size=30, extra=True, download=False, verify=False)
    model, run_config = load_run(tmp_path / "run")
    assert evaluate(model, data.test_x, data.test_y, run_config.eval_batch_size)[0] == summary["test_error"]
    assert evaluate(model, data.val_x, data.val_y, run_config.eval_batch_size)[0] == summary["best_val_error"]


def test_extra_share_when_the_per_digit_count_is_not_a_multiple_of_3(svhn_root):
    """val_size 40: 4 per digit, ``4 - 4 // 3 = 3`` from train and ``4 // 3 = 1`` from extra, so exactly
    val_size validation images, class-balanced (the paper's 600 per digit, 400 + 200, divides evenly)."""
    s = load_dataset("svhn", svhn_root, val_size=40, extra=True, download=False, verify=False, preprocess="none",
                     cache=False)
    assert len(s.val_x) == 40 and len(s.train_x) == 100 - 40
    assert torch.bincount(s.val_y, minlength=10).tolist() == [4] * 10
    sources = [src for src, _ in _ids(s.val_x)]
    assert sources.count(1) == 30 and sources.count(3) == 10


def test_the_validation_set_may_take_every_example_of_a_digit(tmp_path):
    """A share equal to a digit's count is enough (``fewer than`` refuses only fewer): extra with 2 examples
    of each digit gives all of them to val_size 60 (6 per digit: 4 from train, 2 from extra)."""
    root = tmp_path / "d"
    _write_mat(root / "SVHN" / "train_32x32.mat", 6, source=1, seed=0)
    _write_mat(root / "SVHN" / "test_32x32.mat", 1, source=2, seed=1)
    _write_mat(root / "SVHN" / "extra_32x32.mat", 2, source=3, seed=2)
    s = load_dataset("svhn", root, val_size=60, extra=True, download=False, verify=False, preprocess="none",
                     cache=False)
    assert len(s.train_x) == 20 and {src for src, _ in _ids(s.train_x)} == {1}
    assert sorted(k for src, k in _ids(s.val_x) if src == 3) == list(range(20))  # every extra image


def test_cached_decoding_is_keyed_by_the_validation_size(svhn_root):
    """The decoded entry already holds the class-balanced validation set at its end, so it depends on val_size:
    loading val_size 20 and then 30 with the cache gives the 30 a fresh split (3 per digit), the one an
    uncached load gives."""
    load_dataset("svhn", svhn_root, val_size=20, download=False, verify=False, preprocess="none")
    s = load_dataset("svhn", svhn_root, val_size=30, download=False, verify=False, preprocess="none")
    assert torch.bincount(s.val_y, minlength=10).tolist() == [3] * 10
    fresh = load_dataset("svhn", svhn_root, val_size=30, download=False, verify=False, preprocess="none",
                         cache=False)
    for name in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        assert torch.equal(getattr(s, name), getattr(fresh, name)), name


def test_lcn_options_reach_the_preprocessing_and_the_cache_key(svhn_root):
    """lcn_kernel 5, lcn_sigma 1 and lcn_threshold 0.5 (each unlike its default) give the data
    ``preprocess_splits`` with them gives, also after a cached load with the defaults (the options are in the
    key: no stale entry read back)."""
    default = load_dataset("svhn", svhn_root, val_size=20, download=False, verify=False)
    raw = load_dataset("svhn", svhn_root, val_size=20, download=False, verify=False, preprocess="none")
    to_u8 = lambda t: ((t + 1) * 127.5).round().to(torch.uint8)  # noqa: E731
    options = {"lcn_kernel": 5, "lcn_sigma": 1.0, "lcn_threshold": 0.5}
    s = load_dataset("svhn", svhn_root, val_size=20, download=False, verify=False, **options)
    train, [val, test] = preprocess_splits(to_u8(raw.train_x), [to_u8(raw.val_x), to_u8(raw.test_x)], "gcn-lcn",
                                           gcn_scale=1.0, **options)
    torch.testing.assert_close(s.train_x, train)
    torch.testing.assert_close(s.val_x, val)
    torch.testing.assert_close(s.test_x, test)
    assert (s.test_x - default.test_x).abs().max() > 0.01


def test_labels_beyond_10_are_refused(tmp_path):
    """1..10 are SVHN's labels (10: the digit 0); 11 is not one, nor 0 (tested above)."""
    bad = tmp_path / "bad.mat"
    savemat(bad, {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[10], [11]], np.uint8)})
    with pytest.raises(DataError, match=r"labels must lie in 1..10 \(10 is the digit 0\), found 10..11"):
        svhn.read_mat(bad)
    savemat(bad, {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[10], [1]], np.uint8)})
    labels = svhn.read_mat(bad)[1]
    assert labels.tolist() == [0, 1] and labels.dtype == torch.int64
