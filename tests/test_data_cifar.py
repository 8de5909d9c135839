"""CIFAR-10 and ImageFolder loading: the official python-batch format (generated files in the exact
format), the JPEG copy's checksum, ImageFolder trees as folders and archives, the tensor cache (a second
load reads it, a changed source invalidates it), batch augmentation, and a short training run on a few
hundred real images of the JPEG copy that lowers the loss."""

from __future__ import annotations

import io
import json
import math
import pickle
import re
import shutil
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from binaryconnect.checkpoint import read_checkpoint_state
from binaryconnect.config import recipe_config
from binaryconnect.data import cache as cache_mod
from binaryconnect.data import cifar, download_file, load_dataset
from binaryconnect.data.augment import RandomCropFlip, crop_flip, make_augmentation
from binaryconnect.errors import ConfigError, DataError
from helpers import make_image_tree, png_bytes


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    """Every test gets its own empty dataset cache."""
    monkeypatch.setenv(cache_mod.ENV_CACHE, str(tmp_path / "cache"))


def _entries(tmp_path: Path) -> list[str]:
    folder = tmp_path / "cache"
    return sorted(p.name.split("-")[0] for p in folder.glob("*.safetensors")) if folder.is_dir() else []


# ---------------------------------------------------------------------------------------------------
# official python batches


def _official_batches(n: int = 6, seed: int = 0) -> dict[str, dict]:
    rng = np.random.default_rng(seed)
    return {name: {"batch_label": f"batch {name}", "labels": rng.integers(0, 10, n).tolist(),
                   "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                   "filenames": [f"{name}_{i}.png" for i in range(n)]}
            for name in [*cifar.TRAIN_BATCHES, *cifar.TEST_BATCHES]}


def _write_official(root: Path, batches: dict[str, dict]) -> Path:
    folder = root / cifar.OFFICIAL_FOLDER
    folder.mkdir(parents=True)
    for name, batch in batches.items():
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return folder


def test_official_constants_match_torchvision(data_root):
    tv = torchvision.datasets.CIFAR10
    assert cifar.TRAIN_BATCHES == dict(tv.train_list) and cifar.TEST_BATCHES == dict(tv.test_list)
    assert (cifar.OFFICIAL_URL, cifar.OFFICIAL_ARCHIVE_MD5, cifar.OFFICIAL_FOLDER) == (tv.url, tv.tgz_md5,
                                                                                      tv.base_folder)
    sums = dict(line.split()[::-1] for line in (data_root / "SHA256SUMS").read_text().splitlines() if line)
    assert sums[cifar.JPEG_ARCHIVE] == cifar.JPEG_ARCHIVE_SHA256


def test_official_format_layout_and_split(tmp_path):
    batches = _official_batches(n=6)
    _write_official(tmp_path, batches)
    s = load_dataset("cifar10", tmp_path, val_size=8, download=False, verify=False, preprocess="none",
                     source="official")
    train = np.concatenate([batches[n]["data"] for n in cifar.TRAIN_BATCHES])
    labels = np.concatenate([batches[n]["labels"] for n in cifar.TRAIN_BATCHES])
    assert s.train_x.shape == (22, 3, 32, 32) and s.val_x.shape == (8, 3, 32, 32) and s.test_x.shape == (6, 3, 32, 32)
    # row layout: 1024 red, then 1024 green, then 1024 blue values, each plane row-major; [-1, 1] scaling
    k, c, i, j = 5, 2, 7, 30
    assert s.train_x[k, c, i, j].item() == pytest.approx(train[k, c * 1024 + i * 32 + j] / 127.5 - 1, abs=1e-6)
    # the validation set is the official order's last val_size training images (the original code)
    torch.testing.assert_close(s.val_x, torch.from_numpy(train[-8:].reshape(-1, 3, 32, 32)).float() / 127.5 - 1)
    assert s.train_y.tolist() == labels[:22].tolist() and s.val_y.tolist() == labels[22:].tolist()
    assert s.test_y.tolist() == batches["test_batch"]["labels"] and s.num_classes == 10
    assert s.train_transform is None


def test_official_archive_reads_like_the_folder(tmp_path):
    batches = _official_batches(n=4, seed=1)
    folder = _write_official(tmp_path / "a", batches)
    (tmp_path / "b").mkdir()
    with tarfile.open(tmp_path / "b" / cifar.OFFICIAL_ARCHIVE, "w:gz") as tar:
        tar.add(folder, arcname=cifar.OFFICIAL_FOLDER)
    kw = dict(val_size=4, download=False, verify=False, preprocess="gcn", source="official", cache=False)
    a, b = load_dataset("cifar10", tmp_path / "a", **kw), load_dataset("cifar10", tmp_path / "b", **kw)
    for name in ("train_x", "train_y", "val_x", "test_x", "test_y"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not (tmp_path / "b" / cifar.OFFICIAL_FOLDER).exists()  # read in memory, nothing extracted


def test_official_checksums_are_verified(tmp_path):
    _write_official(tmp_path, _official_batches(n=2))
    with pytest.raises(DataError, match="checksum mismatch for CIFAR-10 data_batch_1: expected md5 c99cafc1"):
        load_dataset("cifar10", tmp_path, val_size=2, download=False, source="official")


def test_official_parser_refuses_foreign_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with pytest.raises(DataError, match="refusing"):
        cifar.parse_batch(pickle.dumps({"data": Evil(), "labels": []}), "data_batch_1")
    with pytest.raises(DataError, match="uint8 N x 3072"):
        cifar.parse_batch(pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}), "x")
    with pytest.raises(DataError, match="labels outside"):
        cifar.parse_batch(pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": [10]}), "x")


def test_missing_cifar_names_what_to_do(tmp_path):
    with pytest.raises(DataError, match="cifar-10-python.tar.gz.*cifar10-jpeg.tar.gz"):
        load_dataset("cifar10", tmp_path, download=False)
    with pytest.raises(DataError, match="official CIFAR-10 not found"):
        load_dataset("cifar10", tmp_path, download=False, source="official")
    with pytest.raises(ConfigError, match="source"):
        load_dataset("cifar10", tmp_path, download=False, source="png")


def test_failed_download_leaves_no_partial_archive(tmp_path, monkeypatch):
    """A download that writes part of the archive and then fails (network error, wrong MD5) must leave
    nothing under the archive's name, where the next run would take it for the real one."""
    import torchvision.datasets.utils as tv_utils

    def partial_then_fail(url, root, filename=None, md5=None):
        (Path(root) / filename).write_bytes(b"\x1f\x8b partial")
        raise RuntimeError("connection reset")

    monkeypatch.setattr(tv_utils, "download_url", partial_then_fail)
    with pytest.raises(DataError, match="could not be downloaded.*connection reset"):
        load_dataset("cifar10", tmp_path, download=True, source="official")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == []

    payload = b"the archive"

    def complete(url, root, filename=None, md5=None):
        (Path(root) / filename).write_bytes(payload)

    monkeypatch.setattr(tv_utils, "download_url", complete)
    path = download_file(cifar.OFFICIAL_URL, tmp_path / "d", cifar.OFFICIAL_ARCHIVE, cifar.OFFICIAL_ARCHIVE_MD5)
    assert path == tmp_path / "d" / cifar.OFFICIAL_ARCHIVE and path.read_bytes() == payload
    assert [p.name for p in (tmp_path / "d").iterdir()] == [cifar.OFFICIAL_ARCHIVE]


# ---------------------------------------------------------------------------------------------------
# ImageFolder trees and the cache


def test_imagefolder_labels_order_and_split(tmp_path):
    tree = make_image_tree(tmp_path / "tree")
    s = load_dataset("imagefolder", tmp_path, path="tree", val_size=3, preprocess="none", cache=False)
    assert s.num_classes == 3 and s.train_x.shape == (15, 3, 8, 8) and s.val_x.shape == (3, 3, 8, 8)
    # every training image appears once, with its class index (sorted class names), in a fixed mixed order
    decoded = {}
    for ci, c in enumerate(("cat", "dog", "emu")):
        for f in sorted((tree / "train" / c).iterdir()):
            img = np.asarray(Image.open(f)).transpose(2, 0, 1)
            decoded[img.tobytes()] = ci
    got = torch.cat([s.train_x, s.val_x]).add(1).mul(127.5).round().to(torch.uint8)
    labels = torch.cat([s.train_y, s.val_y]).tolist()
    assert {img.numpy().tobytes(): y for img, y in zip(got, labels, strict=True)} == decoded
    assert labels != sorted(labels)  # shuffled with a fixed seed: the split mixes the classes
    assert s.test_y.tolist() == [0, 0, 1, 1, 2, 2]
    again = load_dataset("imagefolder", tmp_path, path=str(tree), val_size=3, preprocess="none", cache=False)
    assert torch.equal(again.train_y, s.train_y) and torch.equal(again.train_x, s.train_x)


def test_imagefolder_cache_hit_and_invalidation(tmp_path, monkeypatch):
    tree = make_image_tree(tmp_path / "tree")
    calls = []
    real = cifar.read_image_folder

    def counting(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(cifar, "read_image_folder", counting)
    kw = dict(path=str(tree), val_size=3, preprocess="gcn-zca")
    first = load_dataset("imagefolder", tmp_path, **kw)
    assert len(calls) == 1 and _entries(tmp_path) == ["decoded", "splits"]
    second = load_dataset("imagefolder", tmp_path, **kw)
    assert len(calls) == 1  # read from the cache: nothing decoded
    for name in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        assert torch.equal(getattr(first, name), getattr(second, name))
    assert second.num_classes == 3

    load_dataset("imagefolder", tmp_path, **{**kw, "preprocess": "gcn"})  # new preprocessing: decoded reused
    assert len(calls) == 1 and _entries(tmp_path) == ["decoded", "splits", "splits"]

    victim = tree / "train" / "dog" / "002.png"  # a changed source: a new key, decoded again
    victim.write_bytes(png_bytes(999))
    third = load_dataset("imagefolder", tmp_path, **kw)
    assert len(calls) == 2 and not torch.equal(third.train_x, first.train_x)
    load_dataset("imagefolder", tmp_path, **kw, cache=False)
    assert len(calls) == 3


def test_corrupt_cache_entry_is_rebuilt(tmp_path):
    built = []

    def build():
        built.append(1)
        return {"x": torch.arange(6.0)}

    t, hit = cache_mod.cached_tensors("splits", {"a": 1}, build)
    assert not hit and torch.equal(t["x"], torch.arange(6.0))
    assert cache_mod.cached_tensors("splits", {"a": 1}, build)[1] and len(built) == 1
    path = next((tmp_path / "cache").glob("splits-*.safetensors"))
    path.write_bytes(path.read_bytes()[:40])  # truncated
    with pytest.warns(UserWarning, match="unreadable cache entry"):
        t, hit = cache_mod.cached_tensors("splits", {"a": 1}, build)
    assert not hit and len(built) == 2 and torch.equal(t["x"], torch.arange(6.0))
    assert cache_mod.cached_tensors("splits", {"a": 1}, build)[1]
    assert cache_mod.cache_key({"a": 1}) != cache_mod.cache_key({"a": 2})
    assert not list((tmp_path / "cache").rglob("*.tmp")) and not list((tmp_path / "cache").rglob(".tmp*"))


def test_imagefolder_archive_and_unsafe_members(tmp_path):
    tree = make_image_tree(tmp_path / "tree")
    archive = tmp_path / "tree.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname="top")
    a = load_dataset("imagefolder", tmp_path, path=str(archive), val_size=3, preprocess="none", cache=False)
    b = load_dataset("imagefolder", tmp_path, path=str(tree), val_size=3, preprocess="none", cache=False)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)

    for bad in ("top/../../evil/train/cat/x.png", "/abs/train/cat/x.png"):
        evil = tmp_path / "evil.tar"
        with tarfile.open(evil, "w") as tar:
            data = png_bytes(1)
            info = tarfile.TarInfo(bad)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        with pytest.raises(DataError, match="refusing the archive member"):
            load_dataset("imagefolder", tmp_path, path=str(evil), cache=False)
    assert not (tmp_path.parent / "evil").exists()

    twice = tmp_path / "twice.tar"  # a member listed twice (tar -r), or two trees: refused, not both kept
    with tarfile.open(twice, "w") as tar:
        tar.add(tree, arcname="top")
        tar.add(tree / "train" / "cat", arcname="top/train/cat")
    with pytest.raises(DataError, match=r"holds train/cat/\S+ more than once \(6 repeated images\)"):
        load_dataset("imagefolder", tmp_path, path=str(twice), cache=False)
    with tarfile.open(twice, "w") as tar:
        tar.add(tree, arcname="a")
        tar.add(tree, arcname="b")
    with pytest.raises(DataError, match=r"holds several ImageFolder trees \(train/ and test/ under 'a', 'b'\)"):
        load_dataset("imagefolder", tmp_path, path=str(twice), cache=False)
    other = make_image_tree(tmp_path / "other", classes=("bird", "fox"))  # no file name in common with tree's
    with tarfile.open(twice, "w") as tar:  # two trees, nothing repeated: one merged dataset before
        tar.add(tree, arcname="v1")
        tar.add(other, arcname="deeper/v2")
    with pytest.raises(DataError, match="holds several ImageFolder trees"):
        load_dataset("imagefolder", tmp_path, path=str(twice), cache=False)


def test_files_that_are_not_images_by_their_extension_are_named(tmp_path):
    """A class folder's .gif (not a readable extension) is skipped with a warning naming it, folder or archive;
    a tree of nothing else is refused with the extensions that are read."""
    tree = make_image_tree(tmp_path / "tree")
    (tree / "train" / "cat" / "extra.gif").write_bytes(b"GIF89a")
    archive = tmp_path / "tree.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(tree, arcname="top")
    for source, name in ((tree, "train/cat/extra.gif"), (archive, "top/train/cat/extra.gif")):
        expected = f"skipped 1 files that are not images by their extension \\(e.g. {name}\\)"
        with pytest.warns(UserWarning, match=expected):
            load_dataset("imagefolder", tmp_path, path=str(source), val_size=3, preprocess="none", cache=False)
    gifs = tmp_path / "gifs"
    for split in ("train", "test"):
        for c in ("a", "b"):
            (gifs / split / c).mkdir(parents=True)
            (gifs / split / c / "x.gif").write_bytes(b"GIF89a")
    with pytest.raises(DataError, match=r"images end in \.jpg, .*; it holds 4 files of other extensions in class "
                                        r"folders, e\.g\. train/a/x\.gif"):
        load_dataset("imagefolder", tmp_path, path=str(gifs), cache=False)


def test_an_image_that_cannot_be_decoded_is_named_by_its_place_in_the_folder_or_archive(tmp_path):
    tree = make_image_tree(tmp_path / "tree")
    (tree / "train" / "cat" / "zz.png").write_bytes(b"not an image")
    archive = tmp_path / "tree.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(tree, arcname="top")
    with pytest.raises(DataError, match=f"cannot decode the image {tree}/train/cat/zz.png"):
        load_dataset("imagefolder", tmp_path, path=str(tree), cache=False)
    with pytest.raises(DataError, match=f"cannot decode the image {archive}:top/train/cat/zz.png"):
        load_dataset("imagefolder", tmp_path, path=str(archive), cache=False)


@pytest.mark.parametrize("compression", ["", "gz"])
def test_an_archive_cut_between_two_members_is_refused(tmp_path, compression):
    """tarfile reads an archive cut at a member's header (an interrupted copy) as a complete, shorter one: the
    missing end-of-archive marker is what tells, and the load stops instead of training on part of the data."""
    tree = make_image_tree(tmp_path / "tree")
    whole = tmp_path / "whole.tar"
    with tarfile.open(whole, "w") as tar:
        tar.add(tree, arcname="top")
    with tarfile.open(whole) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
    cut = members[len(members) // 2].offset  # the header of a file in the middle
    data = whole.read_bytes()[:cut]
    broken = tmp_path / ("cut.tar.gz" if compression else "cut.tar")
    if compression:
        import gzip

        data = gzip.compress(data)
    broken.write_bytes(data)
    full = load_dataset("imagefolder", tmp_path, path=str(whole), val_size=3, preprocess="none", cache=False)
    assert len(full.train_x) + len(full.val_x) + len(full.test_x) == len(members)
    with pytest.raises(DataError, match=r"is truncated: it stops after [\d,]+ bytes of tar data"):
        load_dataset("imagefolder", tmp_path, path=str(broken), val_size=3, preprocess="none", cache=False)


def test_imagefolder_errors(tmp_path):
    tree = make_image_tree(tmp_path / "tree")
    (tree / "train" / "cat" / "big.png").write_bytes(png_bytes(5, size=(9, 8)))
    with pytest.raises(DataError, match=r"all images of an ImageFolder dataset \(train and test\) must have one size"):
        load_dataset("imagefolder", tmp_path, path=str(tree), val_size=2, cache=False)
    (tree / "train" / "cat" / "big.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="cannot decode the image .*big.png"):
        load_dataset("imagefolder", tmp_path, path=str(tree), val_size=2, cache=False)
    with pytest.raises(DataError, match="not found"):
        load_dataset("imagefolder", tmp_path, path="nowhere")
    with pytest.raises(ConfigError, match="needs a path"):
        load_dataset("imagefolder", tmp_path)
    small = make_image_tree(tmp_path / "small", n_train=1)
    with pytest.raises(ConfigError, match="val_size must be between 1 and 2"):
        load_dataset("imagefolder", tmp_path, path=str(small), val_size=3, cache=False)
    with pytest.raises(ConfigError, match="val_size must be int like its default 5000, got True"):
        load_dataset("imagefolder", tmp_path, path=str(small), val_size=True, cache=False)


def test_jpeg_copy_source_is_checksummed(tmp_path, monkeypatch):
    """The cifar10 loader's JPEG path on a tiny archive in the same layout (the real one is tested by
    the training test below and by its checksum against SHA256SUMS)."""
    tree = make_image_tree(tmp_path / "t", classes=cifar.CLASSES, n_train=1, n_test=1)
    root = tmp_path / "root"
    root.mkdir()
    with tarfile.open(root / cifar.JPEG_ARCHIVE, "w:gz") as tar:
        tar.add(tree, arcname="cifar10-jpeg")
    with pytest.raises(DataError, match="checksum mismatch .* expected sha256 b0d1c7f9"):
        load_dataset("cifar10", root, download=False)
    monkeypatch.setattr(cifar, "JPEG_ARCHIVE_SHA256", cifar.file_digest(root / cifar.JPEG_ARCHIVE, "sha256"))
    monkeypatch.setattr(cifar, "_warned_jpeg", False)
    with pytest.warns(UserWarning, match="JPEG-degraded copy"):
        s = load_dataset("cifar10", root, download=False, val_size=2, preprocess="gcn", augment="crop-flip")
    assert s.train_x.shape == (8, 3, 8, 8) and s.test_y.tolist() == list(range(10))
    assert isinstance(s.train_transform, RandomCropFlip)


# ---------------------------------------------------------------------------------------------------
# augmentation


def _crop_flip_loop(x, top, left, flip, p):
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    out = torch.empty_like(x)
    h, w = x.shape[2:]
    for b in range(len(x)):
        crop = padded[b, :, top[b] : top[b] + h, left[b] : left[b] + w]
        out[b] = crop.flip(2) if flip[b] else crop
    return out


def test_crop_flip_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 6, 5, generator=g)
    top, left = torch.randint(0, 5, (64,), generator=g), torch.randint(0, 5, (64,), generator=g)
    flip = torch.rand(64, generator=g) < 0.5
    torch.testing.assert_close(crop_flip(x, top, left, flip, 2), _crop_flip_loop(x, top, left, flip, 2),
                               rtol=0, atol=0)
    same = crop_flip(x, torch.full((64,), 2), torch.full((64,), 2), torch.zeros(64, dtype=torch.bool), 2)
    assert torch.equal(same, x)


def test_random_crop_flip_statistics():
    """Offsets uniform on {0..2p}, flips a fair coin: each frequency within 4.5 sigma of its expectation."""
    n, p = 20_000, 2
    g = torch.Generator().manual_seed(1)
    ones = torch.ones(n, 1, 4, 4)
    out = RandomCropFlip(padding=p, flip=False)(ones, g)
    rows = out[:, 0].sum(dim=2) > 0  # which output rows come from the image (not the zero padding)
    first = rows.float().argmax(dim=1)
    last = 3 - rows.flip(1).float().argmax(dim=1)
    top = torch.where(first > 0, p - first, p + (3 - last))  # top offset recovered from the zero rows
    counts = torch.bincount(top, minlength=2 * p + 1).double()
    expected, sigma = n / (2 * p + 1), (n * (1 / 5) * (4 / 5)) ** 0.5
    assert (counts - expected).abs().max() < 4.5 * sigma
    ramp = torch.arange(4.0).expand(n, 1, 4, 4).contiguous()
    flipped = RandomCropFlip(padding=0, flip=True)(ramp, g)[:, 0, 0, 0] == 3
    assert abs(flipped.double().mean().item() - 0.5) < 4.5 * (0.25 / n) ** 0.5
    assert not (RandomCropFlip(padding=0, flip=False)(ramp, g)[:, 0, 0, 0] == 3).any()
    assert make_augmentation("none") is None and make_augmentation("crop").flip is False
    with pytest.raises(ConfigError, match="crop-flip"):
        make_augmentation("mixup")


# ---------------------------------------------------------------------------------------------------
# a short run on real images


@pytest.fixture(scope="session")
def cifar_jpeg_subset(data_root, tmp_path_factory) -> Path:
    """An ImageFolder tree of the JPEG copy's first 40 training and 10 test images of each class."""
    archive = data_root / cifar.JPEG_ARCHIVE
    if not archive.is_file():
        pytest.fail(f"{archive} not found: set BINARYCONNECT_DATA to the folder holding cifar10-jpeg.tar.gz")
    out = tmp_path_factory.mktemp("cifar_subset")
    quota = {"train": 40, "test": 10}
    taken: dict[tuple[str, str], int] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for m in tar:
            parts = Path(m.name).parts
            if not m.isfile() or len(parts) != 4:
                continue
            _, split, cls, name = parts
            if taken.get((split, cls), 0) < quota[split]:
                taken[(split, cls)] = taken.get((split, cls), 0) + 1
                (out / split / cls).mkdir(parents=True, exist_ok=True)
                (out / split / cls / name).write_bytes(tar.extractfile(m).read())
    assert len(taken) == 20 and sum(taken.values()) == 500
    return out


@pytest.fixture(scope="module")
def cifar_subset_splits(cifar_jpeg_subset):
    """The subset preprocessed as the paper's CIFAR-10 recipe (GCN + ZCA fitted on its 300 training images)."""
    data = load_dataset("imagefolder", path=str(cifar_jpeg_subset), val_size=100, preprocess="gcn-zca", cache=False)
    assert data.train_x.shape == (300, 3, 32, 32) and data.num_classes == 10
    return data


@pytest.mark.slow
@pytest.mark.parametrize("binarization", ["deterministic", "stochastic"])
def test_short_cifar_run_lowers_the_loss(cifar_subset_splits, tmp_path, binarization):
    """The paper's CIFAR-10 pipeline (GCN + ZCA, convnet of the same shape at 1/16 of the width, square
    hinge loss, Adam, Glorot LR scales, clipping) on 400 real JPEG-copy images: the training loss falls."""
    from binaryconnect.train import evaluate, fit, load_run

    data = cifar_subset_splits
    config = recipe_config(f"cifar10-{binarization}", model_kwargs={"channels": [8, 16, 32], "hidden": 64},
                           epochs=10, batch_size=50, device="cpu", val_size=100, lr_start=3e-3, lr_end=1e-3)
    logged: list[str] = []
    summary = fit(config, tmp_path / "run", progress=False, log=lambda *a, **k: logged.append(" ".join(map(str, a))),
                  data=data)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in records]
    # it trained on the 300 training images: 300 // 50 = 6 steps an epoch, 10 epochs
    assert "300 train / 100 val / 100 test" in logged[0]
    assert read_checkpoint_state(tmp_path / "run" / "checkpoint.safetensors")["global_step"] == 10 * 6
    # measured, seed 0 (the test's) and seeds 1-5, on a 2-vCPU AVX2 AMD EPYC: deterministic 1.84 -> 0.94 in 10
    # epochs (last/first 0.51; seeds 1-5 at most 0.58), stochastic 1.92 -> 1.39 (0.73; at most 0.74)
    assert [r["epoch"] for r in records] == list(range(1, 11)) and all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.85 * losses[0]
    # the summary's test error is that of the best-validation epoch (ties: the later), and the model file holds
    # that epoch's model: evaluated again on the test images it gives the same error. 10 epochs on 300 images do
    # not generalise (the 100 test images stay near the chance level), so there is no threshold on it, and which
    # epoch is best on 100 validation images is close to chance too. The deterministic model fits its training
    # images whichever epoch that is: measured training error in eval mode 0.43 for seed 0's best model (epoch
    # 10), 0.52-0.66 for seeds 1-5 (epochs 7-10), against 0.91 untrained. (An earlier 4-epoch version measured
    # 0.74 for seed 0 on an AVX-512 CPU and 0.88 on the AVX2 one, where epoch 1 came out best; 0.76-0.88 over
    # seeds, too close to its 0.84 threshold.) The stochastic one, evaluated with its real-valued weights, does
    # not yet (0.88-0.91), so it gets no such check
    best = max(r["epoch"] for r in records if r["val_error"] == min(q["val_error"] for q in records))
    assert summary["best_epoch"] == best and summary["test_error"] == records[best - 1]["test_error"]
    model, run_config = load_run(tmp_path / "run")
    assert evaluate(model, data.test_x, data.test_y, run_config.eval_batch_size)[0] == summary["test_error"]
    if binarization == "deterministic":
        assert evaluate(model, data.train_x, data.train_y)[0] < 0.80  # measured 0.43 (seeds 1-5: at most 0.66)


def test_cli_trains_and_evaluates_an_imagefolder_run(tmp_path, capsys):
    """`binaryconnect train` with the data options, then `evaluate` with the run's own preprocessing:
    the test error it prints is the one the run recorded."""
    from binaryconnect.cli import main

    tree = make_image_tree(tmp_path / "tree", n_train=8, n_test=4)
    run = tmp_path / "run"
    argv = ["train", "cifar10-deterministic", "--dataset", "imagefolder", "--dataset-option", f"path={tree}",
            "--dataset-option", "cache=false", "--preprocess", "gcn", "--augment", "crop-flip", "--val-size", "6",
            "--hidden", "32", "--epochs", "1", "--batch-size", "6", "--device", "cpu", "--no-progress", "-q",
            "-o", str(run)]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    config = json.loads((run / "config.json").read_text())["config"]
    assert config["dataset"] == "imagefolder" and config["model_kwargs"]["hidden"] == 32
    assert config["dataset_kwargs"] == {"preprocess": "gcn", "path": str(tree), "cache": False, "augment": "crop-flip"}
    assert main(["evaluate", str(run), "--device", "cpu", "--json", "--split", "both"]) == 0
    result = json.loads(capsys.readouterr().out.strip())
    assert result["test_error"] == summary["test_error"]
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "cifar10-float", "--dataset-option", "oops", "-o", str(tmp_path / "x")])
    assert exit_info.value.code == 2 and "expected KEY=VALUE, got 'oops'" in capsys.readouterr().err


def test_a_run_on_a_relative_imagefolder_path_is_evaluated_exported_and_resumed_from_another_folder(
        tmp_path, monkeypatch, capsys):
    """The tree's path, relative to the folder the run was started from, is kept as given (resumes and sweeps
    compare it); `evaluate`, `export --evaluate`, `predict` and `train --resume` run from elsewhere find the
    tree through the working folder the run recorded. A path found nowhere names the places looked in."""
    from binaryconnect.cli import main

    project, elsewhere, empty_root = tmp_path / "project", tmp_path / "elsewhere", tmp_path / "no-data"
    for folder in (project, elsewhere, empty_root):
        folder.mkdir()
    make_image_tree(project / "tree", n_train=8, n_test=4)
    monkeypatch.setenv("BINARYCONNECT_DATA", str(empty_root))
    monkeypatch.chdir(project)
    run = tmp_path / "run"
    assert main(["train", "cifar10-deterministic", "--dataset", "imagefolder", "--dataset-option", "path=tree",
                 "--dataset-option", "cache=false", "--preprocess", "gcn", "--val-size", "6", "--hidden", "32",
                 "--epochs", "1", "--batch-size", "6", "--device", "cpu", "--no-progress", "-q", "-o", str(run)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    info = json.loads((run / "config.json").read_text())
    assert info["config"]["dataset_kwargs"]["path"] == "tree"
    assert info["environment"]["working_dir"] == str(project)

    monkeypatch.chdir(elsewhere)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the data the run was trained on: no warning
        assert main(["evaluate", str(run), "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test_error"] == summary["test_error"]
    assert main(["export", str(run), "--evaluate", "--json"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["model_test_error"] == summary["test_error"] and exported["agreement"] == 1.0
    assert main(["predict", str(run / "model.bcnn"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test_error"] == exported["packed_test_error"]
    assert main(["train", "--resume", str(run), "--epochs", "2", "--no-progress", "-q"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["epochs"] == 2

    make_image_tree(elsewhere / "tree", classes=("cat", "dog", "emu"), n_train=9, n_test=4)  # other images, same
    with pytest.warns(UserWarning, match=r"the imagefolder data found are not those the run was trained on"):
        assert main(["evaluate", str(run), "--device", "cpu", "--json"]) == 0  # name, found first: a warning
    capsys.readouterr()
    for name in ("evaluate", "predict"):  # the packed file records the data too
        target = run / "model.bcnn" if name == "predict" else run
        with pytest.warns(UserWarning, match="not those the run was trained on"):
            main([name, str(target), "--json"])
        capsys.readouterr()
    shutil.rmtree(elsewhere / "tree")

    (project / "tree").rename(project / "moved")  # found nowhere now: the message says where it looked
    assert main(["evaluate", str(run), "--device", "cpu"]) == 2
    assert re.search(rf"ImageFolder source tree not found \(looked for under the data root "
                     rf"{re.escape(str(empty_root))} and in {re.escape(str(elsewhere))}\)", capsys.readouterr().err)


def test_imagefolder_skips_hidden_files_and_reads_links_as_a_folder_does(tmp_path):
    tree = make_image_tree(tmp_path / "tree", n_train=4, n_test=2)
    (tree / "train" / ".ipynb_checkpoints").mkdir()  # a hidden folder is no class
    (tree / "train" / ".ipynb_checkpoints" / "000.png").write_bytes(png_bytes(7))
    (tree / "train" / "cat" / "._000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS metadata
    (tree / "train" / "dog" / "004.png").symlink_to("000.png")  # a linked image (relative: a tar can hold it)
    (tree / "train" / "dog" / "005.png").symlink_to("nowhere.png")  # dangling: no data
    folder = load_dataset("imagefolder", tmp_path, path="tree", val_size=2, preprocess="none", cache=False)
    assert folder.num_classes == 3 and len(folder.train_x) + len(folder.val_x) == 13
    with tarfile.open(tmp_path / "tree.tar", "w") as tar:  # symlinks stored as links
        tar.add(tree, arcname="tree")
    archive = load_dataset("imagefolder", tmp_path, path="tree.tar", val_size=2, preprocess="none", cache=False)
    assert len(archive.train_x) == len(folder.train_x)
    for name in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        assert torch.equal(getattr(archive, name), getattr(folder, name)), name


def test_imagefolder_refuses_other_sizes_across_splits_and_16_bit_images(tmp_path):
    tree = make_image_tree(tmp_path / "tree", n_train=3, n_test=1)
    for f in (tree / "test").rglob("*.png"):
        f.write_bytes(png_bytes(1, size=(16, 16)))
    with pytest.raises(DataError, match=r"is \(16, 16\) pixels, .* is \(8, 8\): all images of an ImageFolder "
                                        r"dataset \(train and test\) must have one size"):
        load_dataset("imagefolder", tmp_path, path="tree", val_size=1, preprocess="none", cache=False)
    deep = make_image_tree(tmp_path / "deep", n_train=3, n_test=1)
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(buffer, format="PNG")  # mode I;16
    (deep / "train" / "cat" / "000.png").write_bytes(buffer.getvalue())
    with pytest.raises(DataError, match=r"cannot decode the image .*cat/000.png \(I;16 pixels; convert the image "
                                        r"to 8 bits per channel\)"):
        load_dataset("imagefolder", tmp_path, path="deep", val_size=1, preprocess="none", cache=False)


def test_a_linked_class_folder_changes_the_fingerprint_when_its_images_change(tmp_path):
    real = make_image_tree(tmp_path / "real", n_train=2, n_test=1)
    view = tmp_path / "view"
    (view / "train").mkdir(parents=True)
    (view / "train" / "cat").symlink_to(real / "train" / "cat", target_is_directory=True)
    (view / "train" / "loop").symlink_to(view / "train", target_is_directory=True)  # a cycle ends the walk
    before = cache_mod.source_fingerprint(view)
    (real / "train" / "cat" / "000.png").write_bytes(png_bytes(99, size=(8, 8)) + b"\0")  # other bytes, other size
    assert cache_mod.source_fingerprint(view) != before


def test_a_cache_write_removes_what_killed_writers_left(tmp_path):
    """Writes happen in the cache folder's own subfolder: what a killed writer left there (ours and safetensors'
    temporary files) goes after an hour, as do earlier versions' temporary entries in the folder itself. Nothing
    else: the cache folder may be shared (other programs' .tmp files, another tool's safetensors backups)."""
    import os
    import time

    folder = tmp_path / "cache"
    writing = folder / cache_mod.WRITING_FOLDER
    writing.mkdir(parents=True)
    old = time.time() - cache_mod.STALE_TEMP_SECONDS - 60
    key = "0123456789abcdef" * 2
    left = [writing / f"splits-{key}.safetensors.x1y2.tmp", writing / ".tmpq7W8z0",  # ours, safetensors'
            folder / f"decoded-{key}.safetensors.abc.tmp"]  # an earlier version's, in the folder itself
    recent = writing / f"splits-{key}.safetensors.z3.tmp"  # perhaps a live writer's: kept
    others = [folder / "report.tmp", folder / ".tmp_session", folder / ".tmpAbC123", folder / "notes.txt",
              folder / "my-model.safetensors.backup.tmp", folder / ".model.safetensors.k2j3h4.tmp"]
    for f in [*left, recent, *others]:
        f.write_bytes(b"partial")
    for f in [*left, *others]:
        os.utime(f, (old, old))
    cache_mod.cached_tensors("splits", {"a": 3}, lambda: {"x": torch.zeros(2)})
    assert not any(f.exists() for f in left) and recent.exists() and all(f.exists() for f in others)
    assert [p.name for p in writing.iterdir()] == [recent.name]  # the write itself left nothing behind
    assert (folder / f"splits-{cache_mod.cache_key({'a': 3})}.safetensors").is_file()


def test_a_cache_entry_damaged_after_it_was_written_is_rebuilt(tmp_path):
    """One flipped byte in an entry's tensor data (its header intact): the CRC-32 check finds it, the entry is
    rebuilt with a warning, and the tensors returned are the built ones, not the damaged ones."""
    built = []

    def build():
        built.append(1)
        return {"x": torch.arange(1000, dtype=torch.float32), "y": torch.arange(10)}

    first, hit = cache_mod.cached_tensors("splits", {"a": 5}, build)
    entry = tmp_path / "cache" / f"splits-{cache_mod.cache_key({'a': 5})}.safetensors"
    data = bytearray(entry.read_bytes())
    data[-3] ^= 0x10  # in the last tensor's bytes
    entry.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="do not match their checksums"):
        again, hit = cache_mod.cached_tensors("splits", {"a": 5}, build)
    assert not hit and built == [1, 1] and all(torch.equal(again[k], first[k]) for k in first)
    third, hit = cache_mod.cached_tensors("splits", {"a": 5}, build)  # the rebuilt entry is read back
    assert hit and built == [1, 1] and all(torch.equal(third[k], first[k]) for k in first)


def test_a_cache_folder_that_cannot_be_entered_is_skipped_with_a_warning(tmp_path, monkeypatch):
    """Python < 3.12 raises PermissionError from ``is_file`` in a folder this user may not enter: the data
    are built without the cache, with a warning, instead of the run failing."""
    real = Path.is_file

    def is_file(self):
        if self.parent == tmp_path / "cache":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "is_file", is_file)
    with pytest.warns(UserWarning, match="cannot use the dataset cache"):
        t, hit = cache_mod.cached_tensors("splits", {"a": 6}, lambda: {"x": torch.ones(2)})
    assert not hit and torch.equal(t["x"], torch.ones(2))


# ---------------------------------------------------------------------------------------------------
# cache keys, fingerprints, augmentation details (mutants that survived)


def test_preprocessed_cache_is_keyed_by_the_validation_size(tmp_path):
    """The preprocessed entry holds train / validation already split (and ZCA fitted on that train): a load
    with another val_size must not read it back. val_size 3 then 4, both cached: the second has 4 validation
    images and equals an uncached load."""
    tree = make_image_tree(tmp_path / "tree")
    kw = dict(path=str(tree), preprocess="gcn-zca")
    load_dataset("imagefolder", tmp_path, val_size=3, **kw)
    s = load_dataset("imagefolder", tmp_path, val_size=4, **kw)
    fresh = load_dataset("imagefolder", tmp_path, val_size=4, cache=False, **kw)
    assert len(s.val_x) == 4 and len(s.train_x) == 14
    for name in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        assert torch.equal(getattr(s, name), getattr(fresh, name)), name


def test_folder_fingerprint_sees_a_size_a_time_and_a_name(tmp_path):
    """A folder's fingerprint covers each file's relative path, size and modification time: each alone
    changes it (a grown file with its old time restored; the same bytes with a new time; a renamed file, which
    keeps size and time, yet reorders the dataset). Unchanged, it is the same."""
    import os

    tree = make_image_tree(tmp_path / "tree", n_train=2, n_test=1)
    fp = cache_mod.source_fingerprint
    victim = tree / "train" / "cat" / "001.png"
    before, stat = fp(tree), victim.stat()
    assert fp(tree) == before
    data = victim.read_bytes()
    victim.write_bytes(data + b"\0")
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert fp(tree) != before  # size only
    victim.write_bytes(data)
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert fp(tree) == before  # back as it was
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert fp(tree) != before  # time only
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    victim.rename(tree / "train" / "cat" / "007.png")
    assert fp(tree) != before  # name only


def test_a_cache_entry_is_read_only_under_its_own_key(tmp_path, monkeypatch):
    """The key's JSON stored in an entry is checked on reading: an entry found under another key's name (a
    copied file, a key collision) is rebuilt, not returned. And ``CACHE_FORMAT`` is part of the key: a new
    format ignores the old entries."""
    import shutil

    built = []

    def build(value):
        return lambda: built.append(value) or {"x": torch.full((3,), float(value))}

    cache_mod.cached_tensors("splits", {"a": 1}, build(1))
    folder = tmp_path / "cache"
    shutil.copy(folder / f"splits-{cache_mod.cache_key({'a': 1})}.safetensors",
                folder / f"splits-{cache_mod.cache_key({'a': 2})}.safetensors")
    t, hit = cache_mod.cached_tensors("splits", {"a": 2}, build(2))
    assert not hit and built == [1, 2] and torch.equal(t["x"], torch.full((3,), 2.0))
    old_key = cache_mod.cache_key({"a": 1})
    monkeypatch.setattr(cache_mod, "CACHE_FORMAT", cache_mod.CACHE_FORMAT + 1)
    assert cache_mod.cache_key({"a": 1}) != old_key
    t, hit = cache_mod.cached_tensors("splits", {"a": 1}, build(3))
    assert not hit and built == [1, 2, 3] and torch.equal(t["x"], torch.full((3,), 3.0))


def _offsets(out: torch.Tensor, size: int, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(top, left) offsets of crops of an all-ones ``size x size`` image, recovered from its zero rows and columns."""
    def along(mask):
        first = mask.float().argmax(dim=1)
        last = size - 1 - mask.flip(1).float().argmax(dim=1)
        return torch.where(first > 0, p - first, p + (size - 1 - last))

    plane = out[:, 0]
    return along(plane.sum(dim=2) > 0), along(plane.sum(dim=1) > 0)


def test_random_crop_offsets_are_uniform_and_independent_in_both_directions():
    """The joint (top, left) distribution is uniform on the 5 x 5 offsets of padding 2: 20,000 crops, each of
    the 25 cells' counts within 4.5 sigma of n / 25 (sigma = sqrt(n (1/25) (24/25)) = 28); top and left drawn
    separately (a shared offset would leave the 20 off-diagonal cells empty)."""
    n, p = 20_000, 2
    out = RandomCropFlip(padding=p, flip=False)(torch.ones(n, 1, 4, 4), torch.Generator().manual_seed(2))
    top, left = _offsets(out, 4, p)
    counts = torch.bincount(top * (2 * p + 1) + left, minlength=(2 * p + 1) ** 2).double()
    cells = (2 * p + 1) ** 2
    sigma = (n * (1 / cells) * (1 - 1 / cells)) ** 0.5
    assert (counts - n / cells).abs().max() < 4.5 * sigma
    # the recovery itself, on crop_flip with known offsets
    known = torch.arange(cells)
    got = _offsets(crop_flip(torch.ones(cells, 1, 4, 4), known // 5, known % 5, torch.zeros(cells, dtype=torch.bool),
                             p), 4, p)
    assert got[0].tolist() == (known // 5).tolist() and got[1].tolist() == (known % 5).tolist()


def test_augmentation_draws_only_from_its_generator():
    """Offsets and flips all come from the generator passed (saved with a checkpoint, so that a resumed run
    augments as the uninterrupted one): two generators of one seed give the same batch whatever the global RNG,
    which the augmentation leaves untouched. 64 examples: a draw from elsewhere differs with probability ~1."""
    x = torch.randn(64, 3, 5, 5)
    aug = RandomCropFlip(padding=2, flip=True)
    torch.manual_seed(1)
    state = torch.get_rng_state()
    first = aug(x, torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(2)
    assert torch.equal(aug(x, torch.Generator().manual_seed(3)), first)
    assert not torch.equal(aug(x, torch.Generator().manual_seed(4)), first)


def test_make_augmentation_passes_the_padding_on():
    crop = make_augmentation("crop", padding=2)
    assert (crop.padding, crop.flip) == (2, False)
    flip = make_augmentation("crop-flip", padding=0)
    assert (flip.padding, flip.flip) == (0, True)
    assert make_augmentation("crop-flip").padding == 4  # the standard CIFAR-10 augmentation


def test_float_dataset_options_take_integers_but_not_booleans():
    """``gcn_scale=1`` (what ``--dataset-option gcn_scale=1`` parses to) is a float option's value; ``True`` is
    not a number there, though Python counts it as an int."""
    from binaryconnect.data import check_dataset_options

    check_dataset_options("cifar10", {"gcn_scale": 1, "zca_bias": 0})
    check_dataset_options("svhn", {"lcn_sigma": 2, "lcn_threshold": 1e-3})
    with pytest.raises(ConfigError, match="option gcn_scale must be float like its default 55.0, got True"):
        check_dataset_options("cifar10", {"gcn_scale": True})


def test_a_path_option_that_reads_as_json_is_refused_with_how_to_quote_it(tmp_path, capsys, monkeypatch):
    """``--dataset-option path=2024`` parses as the JSON number 2024: one line saying how to pass it as a
    string (before: a TypeError traceback); quoted, the folder named 2024 is read."""
    from binaryconnect.cli import main
    from binaryconnect.data import check_dataset_options

    how = r"as a JSON string, --dataset-option 'path=\"\.\.\.\"', or start it with \./\)"
    with pytest.raises(ConfigError, match=r"option path must be a string, got 2024 .*" + how):
        check_dataset_options("imagefolder", {"path": 2024})
    with pytest.raises(ConfigError, match=r"got True .*" + how):
        check_dataset_options("imagefolder", {"path": True})
    check_dataset_options("imagefolder", {"path": "2024"})
    make_image_tree(tmp_path / "2024")
    monkeypatch.chdir(tmp_path)
    common = ["train", "mnist-deterministic", "--dataset", "imagefolder", "--preprocess", "none", "--val-size", "3",
              "--epochs", "1", "--batch-size", "4", "--hidden", "8", "--depth", "1", "--device", "cpu", "--no-progress"]
    assert main([*common, "--dataset-option", "path=2024", "-o", "r1"]) == 2
    err = capsys.readouterr().err
    assert "option path must be a string" in err and len(err.strip().splitlines()) == 1
    assert main([*common, "--dataset-option", 'path="2024"', "-o", "r2"]) == 0


def test_another_dataset_than_the_recipes_keeps_the_options_it_has_and_drops_the_others():
    """``svhn-deterministic --dataset imagefolder``: the recipe's preprocessing stays (the new dataset has that
    option), SVHN's ``extra`` goes (before: "dataset 'imagefolder' has no option 'extra'", an option the user
    never gave). The run keeps the recipe's name, as before (runs started so resume with the same command)."""
    config = recipe_config("svhn-deterministic", dataset="imagefolder", dataset_kwargs={"path": "x"})
    assert config.dataset_kwargs == {"preprocess": "gcn-lcn", "path": "x"}
    assert config.recipe == "svhn-deterministic"
    config = recipe_config("cifar10-augmented-stochastic", dataset="imagefolder", dataset_kwargs={"path": "x"})
    assert config.dataset_kwargs == {"preprocess": "gcn", "augment": "crop-flip", "path": "x"}
    same = recipe_config("cifar10-gcn-deterministic", dataset="cifar10")  # the recipe's own dataset: unchanged
    assert same.recipe == "cifar10-gcn-deterministic" and same.dataset_kwargs == {"preprocess": "gcn"}


def test_labels_are_int64_and_a_validation_size_of_0_is_refused(tmp_path):
    """Labels int64 (what ``Splits`` promises and cross-entropy takes) from the official batches and from an
    ImageFolder tree; val_size 0 would leave an empty validation set (the best epoch chosen on nothing)."""
    _write_official(tmp_path / "o", _official_batches(n=2))
    official = load_dataset("cifar10", tmp_path / "o", val_size=2, download=False, verify=False, preprocess="none",
                            source="official", cache=False)
    make_image_tree(tmp_path / "tree", n_train=2, n_test=1)
    folder = load_dataset("imagefolder", tmp_path, path="tree", val_size=2, preprocess="none", cache=False)
    for s in (official, folder):
        assert s.train_y.dtype == s.val_y.dtype == s.test_y.dtype == torch.int64
    with pytest.raises(ConfigError, match="val_size must be a positive integer, got 0"):
        load_dataset("imagefolder", tmp_path, path="tree", val_size=0, preprocess="none", cache=False)
