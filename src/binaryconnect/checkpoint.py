"""Files of a run: atomic writes, and model files in safetensors (tensors and JSON only, no pickle).

A write goes to a temporary file in the destination folder, is flushed and fsynced, then renamed over
the final name: an interrupted write leaves the previous file intact and never a partial file under
the final name. Loading never unpickles anything: safetensors holds raw tensors and a JSON header.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import CheckpointError

MODEL_FORMAT = "binaryconnect-model"
MODEL_FORMAT_VERSION = "1"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same folder, fsync, rename, fsync folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_safetensors_header(data: bytes, path: str | os.PathLike = "<bytes>") -> dict:
    """The JSON header of a safetensors blob; raise CheckpointError if it is truncated or malformed."""
    if len(data) < 8:
        raise CheckpointError(f"{path} is truncated ({len(data)} bytes): not a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise CheckpointError(f"{path} is truncated: its header claims {n} bytes, the file has {len(data) - 8}")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} has a corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header (not a JSON object)")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > len(data):
        raise CheckpointError(f"{path} is truncated: tensors need {8 + n + end} bytes, the file has {len(data)}")
    return header


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    """Save ``tensors`` with string ``metadata`` as safetensors, atomically. Returns the file size."""
    data = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)
    return len(data)


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a safetensors file: ``(tensors, metadata)``; clear CheckpointError on any defect."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    data = path.read_bytes()
    header = read_safetensors_header(data, path)
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own error type
        raise CheckpointError(f"{path} is not a valid safetensors file ({exc})") from None
    return tensors, dict(header.get("__metadata__") or {})


def save_model(path: str | os.PathLike, model: torch.nn.Module, config: dict, **extra: str) -> int:
    """Save ``model.state_dict()`` with the run's configuration in the metadata."""
    metadata = {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, "config": json.dumps(config),
                **extra}
    return save_tensors(path, model.state_dict(), metadata)


def load_model_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict, dict[str, str]]:
    """``(state_dict, config, metadata)`` of a model file written by ``save_model``."""
    tensors, metadata = load_tensors(path)
    if metadata.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{path} is not a binaryconnect model file (format {metadata.get('format')!r})")
    if metadata.get("format_version") != MODEL_FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has model format version {metadata.get('format_version')!r}; "
            f"this binaryconnect reads version {MODEL_FORMAT_VERSION}"
        )
    try:
        config = json.loads(metadata["config"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} has no readable configuration in its metadata ({exc})") from None
    return tensors, config, metadata
