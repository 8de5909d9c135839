"""MNIST, permutation invariant (the paper's section 3.1).

Reads the four official gzip files from ``<root>/MNIST/raw/`` (the layout of
``torchvision.datasets.MNIST``), verifies their MD5 checksums before parsing, and parses the IDX format
directly from the archives, so a read-only data folder works. Missing files are downloaded through
``torchvision.datasets.utils.download_url`` (checksum-verified) when ``download=True`` and online.

Preprocessing: ``preprocess="symmetric"`` (default, as the project's specification and the authors'
later BinaryNet code): pixels scaled to [-1, 1]. ``preprocess="center"``: what BinaryConnect's own
``mnist.py`` does through pylearn2's ``MNIST(center=True)``: pixels scaled to [0, 1], then the per-pixel
mean subtracted (here the mean of the training split, applied to every split; pylearn2 took the 60,000
training images' mean for train and validation and the test set's own mean for the test set). The last
``val_size`` (10,000) training images are held out for validation.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from .._values import is_int
from ..errors import ConfigError, DataError
from . import Splits, download_file, register_dataset, verify_checksum

MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
FILES = {
    "train_images": ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    "train_labels": ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
    "test_images": ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
    "test_labels": ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
}


def _download(raw: Path, filename: str, md5: str) -> None:
    errors = []
    for mirror in MIRRORS:
        try:
            download_file(mirror + filename, raw, filename, md5)
            return
        except Exception as exc:  # network errors come in many types
            errors.append(f"{mirror}: {exc}")
    raise DataError(f"could not download {filename}: " + "; ".join(errors))


def _locate(root: Path, download: bool) -> dict[str, Path]:
    raw = root / "MNIST" / "raw"
    missing = [name for name, _ in FILES.values() if not (raw / name).is_file()]
    if missing and download:
        created = [p for p in (raw, raw.parent, root) if not p.exists()]
        raw.mkdir(parents=True, exist_ok=True)
        for name, md5 in FILES.values():
            if not (raw / name).is_file():
                try:
                    _download(raw, name, md5)
                except DataError as exc:
                    for folder in created:  # leave no empty folders behind
                        if folder.is_dir() and not any(folder.iterdir()):
                            folder.rmdir()
                    raise DataError(
                        f"MNIST is missing from {raw} and could not be downloaded ({exc}). "
                        f"Put the official files {', '.join(n for n, _ in FILES.values())} there, "
                        "or point --data-dir / BINARYCONNECT_DATA at a folder holding MNIST/raw/."
                    ) from None
        missing = []
    if missing:
        raise DataError(
            f"MNIST not found: {raw} lacks {', '.join(missing)}. Put the four official files "
            f"({', '.join(n for n, _ in FILES.values())}) in <data-dir>/MNIST/raw/, point --data-dir or "
            "BINARYCONNECT_DATA at the folder that holds MNIST/, or allow downloading."
        )
    return {key: raw / name for key, (name, _) in FILES.items()}


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path} is not a readable gzip file ({exc}); delete it and download it again") from None
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is truncated: {len(data)} bytes, shorter than its IDX header")
    got_magic, *dims = struct.unpack(">" + "I" * (1 + ndim), data[:header])
    if got_magic != magic:
        raise DataError(f"{path} is not an IDX file of the expected kind (magic {got_magic}, expected {magic})")
    count = int(np.prod(dims))
    if len(data) != header + count:
        raise DataError(f"{path} has {len(data) - header} data bytes, its header promises {count}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


#: Names accepted for MNIST's ``preprocess`` option (see the module docstring).
PREPROCESS = ("symmetric", "center")


def _images(path: Path) -> torch.Tensor:
    x = torch.from_numpy(_read_idx(path, 2051, 3).copy())
    return x.float().div_(255.0).unsqueeze(1)  # [0, 1], shape (N, 1, 28, 28)


def _labels(path: Path) -> torch.Tensor:
    labels = _read_idx(path, 2049, 1)
    if labels.size and labels.max() > 9:  # uint8: never below 0
        raise DataError(f"{path} holds labels up to {int(labels.max())}; MNIST's are 0 to 9: the file is damaged "
                        "(its checksum would have said so without --dataset-option verify=false)")
    return torch.from_numpy(labels.astype(np.int64))


@register_dataset("mnist")
def load_mnist(root: Path, val_size: int = 10_000, download: bool = True, verify: bool = True,
               preprocess: str = "symmetric") -> Splits:
    """MNIST as ``Splits``: train = the first ``60000 - val_size`` images, validation = the rest."""
    if not is_int(val_size):  # before any reading
        raise ConfigError(f"val_size must be a positive integer, got {val_size!r}")
    if preprocess not in PREPROCESS:
        raise ConfigError(f"MNIST preprocess must be one of {', '.join(PREPROCESS)}, got {preprocess!r}")
    paths = _locate(Path(root), download)
    if verify:
        for key, (_, md5) in FILES.items():
            verify_checksum(paths[key], md5)
    x, y = _images(paths["train_images"]), _labels(paths["train_labels"])
    tx, ty = _images(paths["test_images"]), _labels(paths["test_labels"])
    if len(x) != len(y) or len(tx) != len(ty):
        raise DataError(f"MNIST images and labels disagree in count under {paths['train_images'].parent}")
    if not 0 < val_size < len(x):
        raise ConfigError(f"val_size must be between 1 and {len(x) - 1}, got {val_size}")
    n = len(x) - val_size
    if preprocess == "symmetric":
        x, tx = x.mul_(2.0).sub_(1.0), tx.mul_(2.0).sub_(1.0)
    else:
        mean = x[:n].double().mean(dim=0).float()  # per pixel, training split only
        x, tx = x.sub_(mean), tx.sub_(mean)
    return Splits(x[:n], y[:n], x[n:], y[n:], tx, ty, num_classes=10)
