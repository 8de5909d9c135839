"""SVHN (the paper's section 3.4), from the official ``.mat`` files, as preprocessed tensors.

The official format (``torchvision.datasets.SVHN``): ``train_32x32.mat``, ``test_32x32.mat`` and
``extra_32x32.mat``, MATLAB v5 files holding ``X`` (uint8, ``32 x 32 x 3 x N``: row, column, channel,
example) and ``y`` (uint8 ``N x 1``, digits 1..9 and **10 for the digit 0**, mapped here to label 0).
Files are looked up in ``<root>/SVHN/`` then ``<root>/``, their MD5s checked against the official ones
(torchvision's values) before parsing, and downloaded into ``<root>/SVHN/`` when missing,
``download=True`` and online. Reading ``.mat`` files needs SciPy (``scipy.io.loadmat``).

Splits, as in the paper's data (pylearn2's ``SVHN('splitted_train')`` / ``'valid'`` of Goodfellow et
al.'s maxout networks): the validation set is class-balanced, ``val_size / 10`` examples per digit;
with ``extra=True`` (training on train + extra, as the paper did) two thirds of each digit's share come
from train and one third from extra (400 + 200 per digit for the paper's 6,000), else all from train.
The examples are drawn with a fixed seed; the rest of train (and extra) is the training set, in a fixed
pseudo-random order. Preprocessing: the paper's GCN (L2 norm ``gcn_scale``, 1 as in pylearn2) then LCN
(``gcn-lcn``; ``gcn-lcn-pylearn2`` is pylearn2's variant of LCN), or any of ``preprocess.PREPROCESSINGS``.
No augmentation in the paper (``augment="crop"`` is offered; horizontal flips change digits, so
``crop-flip`` is a poor choice here).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .._values import is_int
from ..errors import ConfigError, DataError
from . import Splits, download_file, file_digest, register_dataset
from .cifar import build_splits

#: split -> (file name, official MD5, URL), as in torchvision.datasets.SVHN.
FILES = {
    "train": ("train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373", "http://ufldl.stanford.edu/housenumbers/train_32x32.mat"),
    "test": ("test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3", "http://ufldl.stanford.edu/housenumbers/test_32x32.mat"),
    "extra": ("extra_32x32.mat", "a93ce644f1a588dc4d68dda5feec44a7", "http://ufldl.stanford.edu/housenumbers/extra_32x32.mat"),
}
SPLIT_SEED = 0


def read_mat(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 3, 32, 32)`` uint8 and labels int64 in 0..9 (10 -> 0) of one official SVHN file."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError("reading SVHN's .mat files needs SciPy: pip install scipy") from None
    try:
        mat = loadmat(str(path))
        x, y = mat["X"], mat["y"]
    except Exception as exc:
        raise DataError(f"{path} is not an SVHN .mat file (MATLAB v5 with X and y): {exc}") from None
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DataError(f"{path}: X is {x.dtype} {x.shape}, expected uint8 32 x 32 x 3 x N")
    y = np.asarray(y).reshape(-1)
    if len(y) != x.shape[3]:
        raise DataError(f"{path}: {x.shape[3]} images but {len(y)} labels")
    if len(y) == 0:
        raise DataError(f"{path} holds no images")
    if len(y) and (y.min() < 1 or y.max() > 10):
        raise DataError(f"{path}: labels must lie in 1..10 (10 is the digit 0), found {y.min()}..{y.max()}")
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1)))  # (N, C, H, W)
    labels = torch.from_numpy(y.astype(np.int64) % 10)  # 10 means the digit 0
    return images, labels


def _locate(root: Path, splits: list[str], download: bool) -> dict[str, Path]:
    folder = root / "SVHN"
    found: dict[str, Path] = {}
    for split in splits:
        name, md5, url = FILES[split]
        for candidate in (folder / name, root / name):
            if candidate.is_file():
                found[split] = candidate
                break
        else:
            if not download:
                continue
            try:
                found[split] = download_file(url, folder, name, md5)
            except Exception as exc:  # network errors come in many types
                raise DataError(f"SVHN {name} is missing from {folder} and could not be downloaded ({exc}). Put "
                                "the official .mat files there, or point --data-dir at the folder holding SVHN/."
                                ) from None
    missing = [FILES[s][0] for s in splits if s not in found]
    if missing:
        without_extra = (" Or train without it: --dataset-option extra=false (the svhn-* recipes use it, as the "
                         "paper did)." if missing == [FILES["extra"][0]] else "")
        raise DataError(f"SVHN not found: {folder} (or {root}) lacks {', '.join(missing)}. Put the official .mat "
                        "files in <data-dir>/SVHN/, point --data-dir / BINARYCONNECT_DATA at the folder holding "
                        "SVHN/, or allow downloading." + without_extra)
    return found


def _balanced_pick(y: torch.Tensor, per_class: int, seed: int, where: str) -> torch.Tensor:
    """Indices of ``per_class`` examples of each label 0..9 of ``y``, drawn with ``seed``; sorted."""
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        if len(idx) < per_class:
            raise ConfigError(f"SVHN {where} has {len(idx)} examples of digit {c}, fewer than the {per_class} "
                              "the validation set takes: lower --val-size")
        picked.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return torch.cat(picked).sort().values


def _without(n: int, idx: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[idx] = False
    return keep.nonzero().flatten()


def split_train_val(parts: dict[str, tuple[torch.Tensor, torch.Tensor]], val_size: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Training images then the ``val_size`` validation images, one tensor (the last ``val_size`` are
    validation), from ``parts`` = ``{"train": (x, y)}`` or ``{"train": ..., "extra": ...}``."""
    if val_size % 10:
        raise ConfigError(f"SVHN's validation set is class-balanced: val_size must be a multiple of 10, got {val_size}")
    per_class = val_size // 10
    shares = {"train": per_class} if "extra" not in parts else {"train": per_class - per_class // 3,
                                                                  "extra": per_class // 3}
    train_x, train_y, val_x, val_y = [], [], [], []
    for i, (name, (x, y)) in enumerate(parts.items()):
        pick = _balanced_pick(y, shares[name], SPLIT_SEED + i, name)
        rest = _without(len(y), pick)
        val_x.append(x[pick])
        val_y.append(y[pick])
        train_x.append(x[rest])
        train_y.append(y[rest])
    tx, ty = torch.cat(train_x), torch.cat(train_y)
    order = torch.randperm(len(tx), generator=torch.Generator().manual_seed(SPLIT_SEED))
    return torch.cat([tx[order], *val_x]), torch.cat([ty[order], *val_y])


@register_dataset("svhn")
def load_svhn(
    root: Path,
    val_size: int = 6_000,
    download: bool = True,
    extra: bool = False,
    preprocess: str = "gcn-lcn",
    gcn_scale: float = 1.0,
    zca_bias: float = 0.1,
    lcn_kernel: int = 7,
    lcn_sigma: float = 2.0,
    lcn_threshold: float = 1e-4,
    augment: str = "none",
    verify: bool = True,
    cache: bool = True,
) -> Splits:
    """SVHN as ``Splits``: train (+ extra when ``extra=True``) minus a class-balanced validation set of
    ``val_size`` examples; the 26,032 test images. Preprocessing ``gcn-lcn`` (the paper) by default."""
    root = Path(root)
    if not is_int(val_size) or val_size < 10:
        raise ConfigError(f"SVHN val_size must be a positive multiple of 10, got {val_size!r}")
    splits = ["train", "test"] + (["extra"] if extra else [])
    paths = _locate(root, splits, download)
    digests = {}
    for split in splits:
        name, md5, _ = FILES[split]
        digests[split] = file_digest(paths[split], "md5")
        if verify and digests[split] != md5:
            raise DataError(f"checksum mismatch for {paths[split]}: expected md5 {md5}, got {digests[split]}. The "
                            "file is corrupt or not the official release: delete it and download it again.")
    fingerprint = ",".join(f"{s}:{d}" for s, d in sorted(digests.items())) + f"|val={val_size}"

    def decode() -> dict[str, torch.Tensor]:
        parts = {s: read_mat(paths[s]) for s in splits if s != "test"}
        train_x, train_y = split_train_val(parts, val_size)
        test_x, test_y = read_mat(paths["test"])
        return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}

    return build_splits("svhn" + ("+extra" if extra else ""), fingerprint, decode, val_size=val_size,
                        preprocess=preprocess, gcn_scale=gcn_scale, zca_bias=zca_bias, augment=augment,
                        cache=cache, num_classes=10, lcn_kernel=lcn_kernel, lcn_sigma=lcn_sigma,
                        lcn_threshold=lcn_threshold)
