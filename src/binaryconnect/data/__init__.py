"""Datasets as device-resident tensors.

Each loader returns a ``Splits``: train / validation / test tensors already preprocessed, ready to be
moved to the training device once and sliced into batches there (no per-sample Python loading).
The data root comes from ``--data-dir``, else the environment variable ``BINARYCONNECT_DATA``, else
``./data``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .._values import is_int, is_number
from ..errors import ConfigError, DataError

ENV_DATA_ROOT = "BINARYCONNECT_DATA"


@dataclass
class Splits:
    """Preprocessed tensors of one dataset: inputs float32, labels int64."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    #: Optional augmentation applied to every training batch on the device: ``(x, generator) -> x``.
    train_transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    def to(self, device) -> Splits:
        return replace(self, **{k: getattr(self, k).to(device) for k in _TENSORS})

    def subset_train(self, n: int) -> Splits:
        """The same splits with only the first ``n`` training examples."""
        return replace(self, train_x=self.train_x[:n], train_y=self.train_y[:n])


_TENSORS = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")


def resolve_data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """``data_dir`` if given, else ``$BINARYCONNECT_DATA``, else ``./data``."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    return Path(os.environ.get(ENV_DATA_ROOT) or "data").expanduser()


def run_data_roots(given: str | None, recorded, working_dir: str | None = None) -> list[str | None]:
    """The data roots to try, in order, for a command on an existing run (evaluate, export, predict,
    ``--resume``): ``given`` (its ``--data-dir``) alone if any; else the run's own ``data_dir`` (``recorded``)
    wherever that folder exists (a relative one in the working folder, then in ``working_dir``, the folder
    the run was started from), then None: ``$BINARYCONNECT_DATA``, else ``./data`` (``resolve_data_root``).
    A run trained on another machine, whose folder is not here, so falls back to this machine's setting."""
    if given is not None:
        return [given]
    roots: list[str | None] = []
    if isinstance(recorded, str) and recorded:
        path = Path(recorded).expanduser()
        places = [path] if path.is_absolute() else [path] + ([Path(working_dir) / path] if working_dir else [])
        roots = list(dict.fromkeys(str(p) for p in places if p.is_dir()))
    return [*roots, None]


def load_run_dataset(name: str, given: str | None, recorded, working_dir: str | None = None, **kwargs) -> Splits:
    """``load_dataset`` for a command on an existing run, from the first of ``run_data_roots`` that holds the
    data: a folder of the run's name that exists but holds other data gives way to the next. If none does,
    the error of the first place tried, naming the others."""
    roots = run_data_roots(given, recorded, working_dir)
    errors = []
    for root in roots:
        try:
            return load_dataset(name, root, working_dir=working_dir, **kwargs)
        except DataError as exc:
            errors.append(exc)
    missing = ""  # the run's own folder, when it is not here at all
    if given is None and isinstance(recorded, str) and recorded and len(roots) == 1:
        missing = f" (the run's data folder {recorded} is not here)"
    if len(errors) == 1:
        raise DataError(f"{errors[0]}{missing}") from errors[0]
    others = ", ".join(str(r) if r is not None else f"the default root {resolve_data_root()}" for r in roots[1:])
    raise DataError(f"{errors[0]} (also tried {others}: {' '.join(str(errors[-1]).split())})") from errors[0]


def file_digest(path: Path, algorithm: str = "md5") -> str:
    """Hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_checksum(path: Path, expected: str, algorithm: str = "md5") -> None:
    """Raise a DataError naming the file, the expected and the actual digest when they differ."""
    actual = file_digest(path, algorithm)
    if actual != expected:
        raise DataError(
            f"checksum mismatch for {path}: expected {algorithm} {expected}, got {actual}. "
            "The file is corrupt or not the official release: delete it and download it again."
        )


def download_file(url: str, folder: Path, filename: str, md5: str) -> Path:
    """Download ``url`` to ``folder / filename`` through ``torchvision.datasets.utils.download_url``
    (MD5-verified), into a temporary name renamed into place only once complete and verified, so a
    failed, corrupt or interrupted download leaves nothing under ``filename``, nor the folders it created
    for it. Errors propagate."""
    import tempfile

    from torchvision.datasets.utils import download_url

    folder = Path(folder)
    created = [f for f in (folder, *folder.parents) if not f.exists()]  # deepest first
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{filename}.", suffix=".part", dir=folder)
    os.close(fd)
    done = False
    try:
        download_url(url, str(folder), filename=Path(tmp).name, md5=md5)
        os.replace(tmp, folder / filename)
        done = True
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        for made in created if not done else ():
            try:
                made.rmdir()  # only while empty: another file put there meanwhile stays, and so does its folder
            except OSError:
                break
    return folder / filename


_LOADERS: dict[str, Callable[..., Splits]] = {}


def register_dataset(name: str):
    def decorator(fn):
        _LOADERS[name] = fn
        return fn

    return decorator


def list_datasets() -> list[str]:
    return sorted(_LOADERS)


def load_dataset(name: str, root: str | os.PathLike | None = None, *, working_dir: str | None = None,
                 **kwargs) -> Splits:
    """Load dataset ``name`` from ``root`` (see ``resolve_data_root``) as preprocessed CPU tensors.

    A relative path option (an ImageFolder tree's ``path``) is looked up under ``root``, then in the working
    folder; ``working_dir``, the folder a run was started from (its config.json records it), is a third place,
    so that a run is evaluated, exported and resumed from any folder."""
    check_dataset_options(name, kwargs)
    root = resolve_data_root(root)
    if working_dir is not None:
        kwargs = _located(name, kwargs, root, Path(working_dir))
    return _LOADERS[name](root, **kwargs)


def _located(name: str, kwargs: dict, root: Path, working_dir: Path) -> dict:
    """``kwargs`` with each relative path found neither under ``root`` nor in the working folder, but in
    ``working_dir``, made absolute there."""
    parameters = inspect.signature(_LOADERS[name]).parameters
    located = dict(kwargs)
    for key, value in kwargs.items():
        if not (_is_path_option(parameters[key]) and isinstance(value, str)):
            continue
        path = Path(value).expanduser()
        if not path.is_absolute() and not (root / path).exists() and not path.exists() \
                and (working_dir / path).exists():
            located[key] = str(working_dir / path)
    return located


def _is_path_option(parameter: inspect.Parameter) -> bool:
    """A loader parameter that names a file or folder: ``str | None``, None by default (ImageFolder's path)."""
    return parameter.default is None and "str" in str(parameter.annotation)


def caches(name: str, kwargs: dict) -> bool:
    """Whether dataset ``name``, loaded with the options ``kwargs``, is read from the preprocessed-tensor cache
    (``cache.cached_tensors``) once built: its loader takes a ``cache`` option, not set to False there."""
    loader = _LOADERS.get(name)
    return (loader is not None and "cache" in inspect.signature(loader).parameters
            and kwargs.get("cache", True) is not False)


#: A loader's parameters that training options set (--data-dir, --val-size, --no-download), not listed as
#: dataset options: the configuration refuses them as such (``TrainConfig.validate``).
_TRAINING_OPTIONS = ("root", "val_size", "download")


def dataset_options(name: str) -> list[str]:
    """The options of dataset ``name`` (``--dataset-option``); none for an unknown dataset."""
    loader = _LOADERS.get(name)
    return [] if loader is None else [p for p in inspect.signature(loader).parameters
                                      if p not in _TRAINING_OPTIONS]


def check_dataset_options(name: str, kwargs: dict) -> None:
    """Raise a ConfigError unless dataset ``name`` has every option of ``kwargs``, each of its default's type."""
    try:
        parameters = inspect.signature(_LOADERS[name]).parameters
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(list_datasets())}") from None
    unknown = sorted(set(kwargs) - set(parameters) - {"root"})
    if unknown:
        options = [p for p in parameters if p not in _TRAINING_OPTIONS]
        raise ConfigError(f"dataset {name!r} has no option {', '.join(map(repr, unknown))}; its options: "
                          f"{', '.join(options)}")
    for key, value in kwargs.items():  # each option of the type of its default: "False" is not false
        _check_option_type(name, key, value, parameters[key])


def _check_option_type(dataset: str, key: str, value, parameter: inspect.Parameter) -> None:
    default = parameter.default
    kind = type(default)
    if _is_path_option(parameter):  # a path: 2024 or true on the command line is JSON
        if value is None or isinstance(value, str):
            return
        raise ConfigError(f"dataset {dataset!r} option {key} must be a string, got {value!r} (on the command "
                          f"line a value that reads as JSON is taken as JSON: write the path as a JSON string, "
                          f"--dataset-option '{key}=\"...\"', or start it with ./)")
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = is_int(value)
    elif kind is float:
        ok = is_number(value)
    elif kind is str:
        ok = isinstance(value, str)
    else:
        return
    if not ok:
        raise ConfigError(f"dataset {dataset!r} option {key} must be {kind.__name__} like its default "
                          f"{json.dumps(default)}, got {value!r} (on the command line: --dataset-option "
                          f"{key}={json.dumps(default)})")


from . import cifar, mnist, svhn  # noqa: E402,F401  (registers the loaders)
