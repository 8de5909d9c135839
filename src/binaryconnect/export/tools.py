"""Helpers of the ``export``, ``predict`` and ``summary`` commands: array inputs, dataset evaluation."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .engine import PackedModel, check_input
from .format import PackedNetwork


def read_inputs(path: str | os.PathLike) -> torch.Tensor:
    """A float array from ``.npy`` (read with ``allow_pickle=False``) or a ``.safetensors`` file holding one
    tensor."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"input file {path} does not exist")
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, EOFError, OSError) as exc:
            raise DataError(f"{path} is not a plain numeric .npy array ({exc})") from None
        if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
            raise DataError(f"{path} holds {array.dtype} values, not real numbers")
        with np.errstate(over="ignore"):  # beyond float32 becomes inf, refused below with its own message
            x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))  # any byte order, long double
    elif path.suffix == ".safetensors":
        from ..checkpoint import load_tensors

        tensors, _ = load_tensors(path)
        if len(tensors) != 1:
            raise DataError(f"{path} holds {len(tensors)} tensors ({', '.join(sorted(tensors))}); expected one")
        x = next(iter(tensors.values()))
        if x.dtype == torch.bool or x.is_complex():
            raise DataError(f"{path} holds {x.dtype} values, not real numbers")
        x = x.to(torch.float32)
    else:
        raise DataError(f"cannot read inputs from {path}: use a .npy or .safetensors file")
    if x.ndim == 0 or len(x) == 0:
        raise DataError(f"{path} holds no examples (shape {list(x.shape)}); expected [N, *input_shape], N >= 1")
    check_input(x, str(path))  # before any example runs (``PackedModel`` checks each batch again)
    return x


def dataset_of(net: PackedNetwork, data_dir: str | None):
    """The dataset splits the packed network was trained on, as its ``source`` metadata names them (with a
    warning when the data found are not those, ``train.warn_if_other_data``)."""
    from ..data import load_run_dataset
    from ..train import warn_if_other_data

    source = net.source
    name = source.get("dataset")
    if not name:
        raise ConfigError("this packed file names no dataset (it was not exported from a run directory): "
                          "pass --input with the examples to classify")
    kwargs = source.get("dataset_kwargs") or {}
    if not isinstance(name, str) or not isinstance(kwargs, dict):
        raise ConfigError("this packed file's source metadata is damaged (dataset or dataset_kwargs of the wrong "
                          "type): pass --input with the examples to classify")
    kwargs = dict(kwargs)
    if source.get("val_size") is not None:
        kwargs["val_size"] = source["val_size"]
    working_dir = source.get("working_dir")  # where the run was trained: its relative paths start there
    working_dir = working_dir if isinstance(working_dir, str) else None
    config = net.config if isinstance(net.config, dict) else {}
    data = load_run_dataset(name, data_dir, config.get("data_dir"), working_dir, download=False, **kwargs)
    warn_if_other_data(data, name, config.get("train_subset"), source.get("data_fingerprint"), "the error")
    return data


def evaluate_packed(model: PackedModel, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000):
    """``(error rate, predictions)`` of ``model`` on ``(x, y)``."""
    predictions = model.predict(x, batch_size)
    return int((predictions != y.cpu()).sum()) / len(y), predictions


@torch.no_grad()
def model_predictions(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Predicted classes of a PyTorch model in eval mode, in batches (CPU int64)."""
    model.eval()
    return torch.cat([model(x[i:i + batch_size]).argmax(1).cpu() for i in range(0, len(x), batch_size)])
