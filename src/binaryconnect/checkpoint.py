"""Files of a run: atomic writes, model files and training checkpoints in safetensors (no pickle).

A write goes to a temporary file in the destination folder, is flushed and fsynced, then renamed over
the final name, and the folder is fsynced: an interrupted write leaves the previous file intact and
never a partial file under the final name (a crash may leave a ``.<name>.*.tmp`` file beside it, which
``remove_stale_temp_files`` clears).

Loading never unpickles anything: safetensors holds raw tensors and a JSON header, and everything that
is not a tensor (configuration, progress, optimizer hyper-parameters) is JSON in its metadata. Random
generator states are ``uint8`` tensors (``torch.Generator.get_state()``). Files are written with their
metadata in sorted order, so equal contents give byte-identical files.

A training checkpoint (``checkpoint.safetensors`` in a run directory) holds tensors under prefixes:

    model.<name>       the latent weights and batch-norm state (``model.state_dict()``)
    optimizer.<i>.<k>  optimizer state tensor ``k`` of parameter ``i`` (Adam: step, exp_avg, exp_avg_sq)
    rng.<name>         generator states (shuffle, binarize, augment, torch; cuda: PyTorch's default CUDA
                       generator, when training on a GPU)
    progress.<name>    the permutation of the epoch in progress and its running loss sum
    best.<name>        the best-validation model so far

and, in the metadata key ``state``, JSON: epoch, step, best validation error, metrics history,
configuration, optimizer hyper-parameters (see ``train.py``).
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
CHECKPOINT_FORMAT = "binaryconnect-checkpoint"
CHECKPOINT_FORMAT_VERSION = "1"
CHECKPOINT_NAME = "checkpoint.safetensors"


def new_file_mode() -> int:
    """The permissions a new file gets under the process's umask (``0o666 & ~umask``): ``mkstemp`` creates
    its files 0600, readable by their owner alone, and a file written through it keeps that unless told."""
    try:  # Linux >= 4.7 reports it without changing it (os.umask would, for a moment, in every thread)
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0)
        os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same folder, fsync, rename, fsync folder.
    The file gets the permissions of any new file (``new_file_mode``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, new_file_mode())
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


#: The names of ``atomic_write_bytes``'s temp files (``.<name>.<random>.tmp``).
TEMP_FILES = ".*.tmp"


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the ``.<name>.*.tmp`` files a crash in ``atomic_write_bytes`` left in ``folder``."""
    stale = [p for p in Path(folder).glob(TEMP_FILES) if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _refuse_pickle(data: bytes, path) -> None:
    """Refuse a zip (``torch.save``) or pickle file by its signature. A safetensors file's first 8 bytes are
    its header's length, which can begin with the same bytes as a pickle (0x80 0x02-0x05: a header of 640,
    896, 1152 or 1408 bytes, modulo 65536): a blob whose length and JSON header read well is not refused."""
    if len(data) >= 9 and data[8:9] == b"{":
        (n,) = struct.unpack("<Q", data[:8])
        if 8 + n <= len(data) and data[8 : 8 + n].rstrip(b" ").endswith(b"}"):  # a JSON object (space-padded)
            return  # ends where the length says
    if data[:4] == b"PK\x03\x04" or (data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        raise CheckpointError(
            f"{path} looks like a pickle or torch.save file, not safetensors: binaryconnect never unpickles "
            "files (loading a pickle can run arbitrary code); use a file binaryconnect wrote"
        )


#: The largest header the safetensors format allows.
_MAX_HEADER = 100_000_000


def _kind_of(data: bytes) -> str:
    """What a file that is not safetensors looks like, from its first bytes, for an error message."""
    for signature, kind in ((b"\x93NUMPY", "a NumPy .npy array"), (b"\x89PNG", "a PNG image"),
                            (b"%PDF", "a PDF document"), (b"\x1f\x8b", "a gzip file")):
        if data.startswith(signature):
            return f"it is {kind}"
    if data.lstrip()[:1] in (b"{", b"["):
        return "it looks like JSON text"
    return "its first bytes are no safetensors header"


def read_safetensors_header(data: bytes, path: str | os.PathLike = "<bytes>", size: int | None = None) -> dict:
    """The JSON header of a safetensors blob; raise CheckpointError if it is truncated or malformed.

    ``data`` holds at least the header; ``size`` is the whole file's size when ``data`` is only its start.
    """
    _refuse_pickle(data, path)
    size = len(data) if size is None else size
    if len(data) < 8:
        raise CheckpointError(f"{path} is truncated ({len(data)} bytes): not a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    # a length the file cannot hold, and no JSON object after it or more than safetensors allows (100 MB)
    if n > len(data) - 8 and (n > _MAX_HEADER or (len(data) > 8 and data[8:9] != b"{")):
        raise CheckpointError(f"{path} is not a safetensors file ({_kind_of(data)}): give a file binaryconnect wrote "
                              "(a run's model.safetensors or checkpoint.safetensors, or a packed .bcnn)")
    if n > len(data) - 8:
        raise CheckpointError(f"{path} is truncated: its header claims {n} bytes, the file has {len(data) - 8}")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} has a corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header (not a JSON object)")
    try:
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError):
        raise CheckpointError(f"{path} has a corrupt safetensors header (bad tensor entry)") from None
    if 8 + n + end > size:
        raise CheckpointError(f"{path} is truncated: tensors need {8 + n + end} bytes, the file has {size}")
    return header


def serialize_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes with the metadata in sorted key order (the library writes it in hash order,
    which differs between processes), so that equal contents give byte-identical files."""
    data = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"] = dict(sorted((header.get("__metadata__") or {}).items()))
    header = {"__metadata__": header.pop("__metadata__"), **header}
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    encoded += b" " * (-len(encoded) % 8)  # tensor data stays 8-byte aligned, as the library writes it
    return struct.pack("<Q", len(encoded)) + encoded + data[8 + n :]


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    """Save ``tensors`` with string ``metadata`` as safetensors, atomically. Returns the file size."""
    data = serialize_tensors(tensors, metadata)
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


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a safetensors file, reading only its header (cheap on large files)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) == 8:
            (n,) = struct.unpack("<Q", head)
            head += f.read(min(n, size))
    return dict(read_safetensors_header(head, path, size=size).get("__metadata__") or {})


def _check_format(path, metadata: dict[str, str], name: str, version: str, what: str) -> None:
    if metadata.get("format") != name:
        raise CheckpointError(f"{path} is not a binaryconnect {what} (format {metadata.get('format')!r})")
    if metadata.get("format_version") != version:
        raise CheckpointError(
            f"{path} has {what} format version {metadata.get('format_version')!r}; this binaryconnect reads "
            f"version {version}"
        )


def save_model(path: str | os.PathLike, model: torch.nn.Module, config: dict, **extra: str) -> int:
    """Save ``model.state_dict()`` with the run's configuration in the metadata."""
    return save_tensors(path, model.state_dict(), model_metadata(config, **extra))


def model_metadata(config: dict, **extra: str) -> dict[str, str]:
    """The metadata ``save_model`` writes: format, version, the configuration as JSON, and ``extra``."""
    return {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION,
            "config": json.dumps(config, sort_keys=True), **extra}


def load_model_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict, dict[str, str]]:
    """``(state_dict, config, metadata)`` of a model file written by ``save_model``."""
    tensors, metadata = load_tensors(path)
    _check_format(path, metadata, MODEL_FORMAT, MODEL_FORMAT_VERSION, "model file")
    try:
        config = json.loads(metadata["config"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} has no readable configuration in its metadata ({exc})") from None
    return tensors, config, metadata


# --- training checkpoints ---


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor], state: dict) -> int:
    """Save a training checkpoint atomically: ``tensors`` and the JSON-serializable ``state``."""
    metadata = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_FORMAT_VERSION,
                "state": json.dumps(state, sort_keys=True)}
    return save_tensors(path, tensors, metadata)


def _checkpoint_state(path, metadata: dict[str, str]) -> dict:
    _check_format(path, metadata, CHECKPOINT_FORMAT, CHECKPOINT_FORMAT_VERSION, "checkpoint")
    try:
        state = json.loads(metadata["state"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} has no readable training state in its metadata ({exc})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} has a training state that is not a JSON object")
    return state


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, state)`` of a checkpoint written by ``save_checkpoint``."""
    tensors, metadata = load_tensors(path)
    return tensors, _checkpoint_state(path, metadata)


def read_checkpoint_state(path: str | os.PathLike) -> dict:
    """The JSON state of a checkpoint, reading only the file's header."""
    return _checkpoint_state(path, read_metadata(path))


def with_prefix(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in tensors.items()}


def strip_prefix(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of ``tensors`` whose name starts with ``prefix``, without it."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """``optimizer.state_dict()`` as named tensors ``"<param index>.<key>"`` plus a JSON-able rest
    (hyper-parameters of each group, non-tensor per-parameter values)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict] = {}
    for index, values in sd["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value
            else:
                plain.setdefault(str(index), {})[key] = value
    # a learning rate held as a tensor (CUDA graphs, cudagraph.py) is stored as the number it holds
    groups = [{k: v.item() if torch.is_tensor(v) else v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "state": plain}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], plain: dict) -> None:
    """Load what ``optimizer_to_tensors`` produced into ``optimizer`` (built for the same parameters)."""
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, values in plain.get("state", {}).items():
        state.setdefault(int(index), {}).update(values)
    fresh = optimizer.state_dict()["param_groups"]
    saved = plain.get("param_groups", [])
    if len(saved) != len(fresh) or any(
        len(s["params"]) != len(f["params"]) for s, f in zip(saved, fresh, strict=True)
    ):
        raise CheckpointError("the checkpoint's optimizer state does not match the model's parameters")
    # JSON turned tuples (Adam's betas) into lists: give them back their type. ``capturable`` is how this
    # process runs the optimizer (CUDA graphs or not), not part of the run's state: keep the fresh one's
    groups = [{k: tuple(v) if isinstance(f.get(k), tuple) else v for k, v in s.items()}
              for s, f in zip(saved, fresh, strict=True)]
    for s, f in zip(groups, fresh, strict=True):
        if "capturable" in f:
            s["capturable"] = f["capturable"]
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"the checkpoint's optimizer state cannot be loaded ({exc})") from None
    # A file holds contiguous tensors; a parameter may not be (channels-last convolutions): give each
    # per-parameter state its parameter's strides, as the optimizer creates them (fused Adam on CUDA
    # refuses params and states of different layouts)
    for group in optimizer.param_groups:
        for param in group["params"]:
            values = optimizer.state.get(param, {})
            for key, value in values.items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    values[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)
