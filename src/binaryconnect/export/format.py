"""The packed model file (``.bcnn``): a safetensors file, 1 bit per binary weight, no pickle.

A safetensors file is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON, then the raw
tensor data; loading it can never run code. Ours holds, in the JSON's ``__metadata__`` (all values
strings):

- ``format`` = ``"binaryconnect-packed"``, ``format_version`` = ``"1"``;
- ``architecture``: a JSON list of layers, in the order they apply (see ``LAYER_KEYS``);
- ``input_shape`` (JSON list, one example, e.g. ``[1, 28, 28]``) and ``num_classes``;
- ``source`` (JSON object: model, binarization, dataset ... ; informational) and optionally ``config``
  (the training configuration, informational).

Layer ``i`` owns the tensors ``layers.{i}.<name>``:

- ``linear`` / ``conv2d`` with ``"binary": true``: ``weight_bits`` uint8 ``[out, ceil(K / 8)]`` where
  ``K = in_features`` or ``in_channels * kh * kw``; bit ``j`` (value ``1 << j``) of byte ``g`` of row
  ``o`` is weight ``k = 8 g + j`` of output ``o``, 1 for ``+1`` and 0 for ``-1``; for a convolution
  ``k = (c * kh + dy) * kw + dx``; padding bits (``k >= K``) are 0. With ``"binary": false``:
  ``weight`` float32 ``[out, in]`` or ``[out, in_channels, kh, kw]``. Both also have ``scale`` and
  ``offset`` float32 ``[out]``:  ``y_o = scale_o * sum_k s_ok x_k + offset_o``, ``s_ok`` the +-1 signs
  (or the float weights). ``scale`` carries H and the folded batch norm, ``offset`` the bias and the
  batch norm's shift.
- ``affine`` (a batch norm that could not be folded): ``scale``, ``offset`` float32 ``[channels]``,
  ``y = scale_c * x + offset_c`` on channel (feature) ``c``.
- ``flatten``, ``relu``, ``maxpool2d``: no tensors.

``PackedNetwork.from_bytes`` validates everything and raises ``PackedFormatError`` with one clear line.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as st_load

from .._values import is_finite_number, is_int
from ..checkpoint import atomic_write_bytes, read_safetensors_header, serialize_tensors
from ..errors import CheckpointError
from .pack import packed_size, padding_bits_are_zero

FORMAT = "binaryconnect-packed"
FORMAT_VERSION = "1"
SUFFIX = ".bcnn"

#: Keys of each layer type in ``architecture`` (beyond ``type``) and the tensors it owns.
LAYER_KEYS: dict[str, tuple[str, ...]] = {
    "flatten": (),
    "linear": ("in_features", "out_features", "binary", "binarization", "H"),
    "conv2d": ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "binary",
               "binarization", "H"),
    "affine": ("channels",),
    "relu": (),
    "maxpool2d": ("kernel_size", "stride", "padding"),
}
LAYER_TYPES = tuple(LAYER_KEYS)


class PackedFormatError(CheckpointError):
    """A packed model file that is truncated, of an unknown version, or inconsistent."""


def _pair(value, name: str, layer: str, minimum: int) -> tuple[int, int]:
    if (not isinstance(value, list) or len(value) != 2
            or not all(is_int(v) and v >= minimum for v in value)):
        raise ValueError(f"{layer}: {name} must be a list of two integers >= {minimum}, got {value!r}")
    return value[0], value[1]


def _count(value, name: str, layer: str) -> int:
    if not is_int(value) or value < 1:
        raise ValueError(f"{layer}: {name} must be a positive integer, got {value!r}")
    return value


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    """``floor((size + 2 padding - dilation (kernel - 1) - 1) / stride) + 1`` (PyTorch's convention)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def expected_tensors(index: int, layer: dict) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Name -> (dtype, shape) of the tensors layer ``index`` must own."""
    p = f"layers.{index}."
    kind = layer["type"]
    if kind in ("linear", "conv2d"):
        out = layer["out_features"] if kind == "linear" else layer["out_channels"]
        if kind == "linear":
            k, float_shape = layer["in_features"], (out, layer["in_features"])
        else:
            kh, kw = layer["kernel_size"]
            k, float_shape = layer["in_channels"] * kh * kw, (out, layer["in_channels"], kh, kw)
        weight = ({p + "weight_bits": (torch.uint8, (out, packed_size(k)))} if layer["binary"]
                  else {p + "weight": (torch.float32, float_shape)})
        return {**weight, p + "scale": (torch.float32, (out,)), p + "offset": (torch.float32, (out,))}
    if kind == "affine":
        c = layer["channels"]
        return {p + "scale": (torch.float32, (c,)), p + "offset": (torch.float32, (c,))}
    return {}


def layer_fan_in(layer: dict) -> int:
    """Inputs per output of a linear or conv2d layer: ``in_features`` or ``in_channels * kh * kw``."""
    if layer["type"] == "linear":
        return layer["in_features"]
    kh, kw = layer["kernel_size"]
    return layer["in_channels"] * kh * kw


def check_layer(index: int, layer) -> dict:
    """Validate one ``architecture`` entry; raise ValueError naming what is wrong."""
    name = f"layer {index}"
    if not isinstance(layer, dict) or not isinstance(layer.get("type"), str) or layer["type"] not in LAYER_KEYS:
        kind = layer.get("type") if isinstance(layer, dict) else layer
        raise ValueError(f"{name} has unknown type {kind!r}; known types: {', '.join(LAYER_TYPES)}")
    kind = layer["type"]
    name = f"layer {index} ({kind})"
    missing = [k for k in LAYER_KEYS[kind] if k not in layer]
    extra = sorted(set(layer) - set(LAYER_KEYS[kind]) - {"type"})
    if missing or extra:
        raise ValueError(f"{name} has missing keys {missing} / unknown keys {extra}")
    if kind in ("linear", "conv2d"):
        if kind == "linear":
            _count(layer["in_features"], "in_features", name)
            _count(layer["out_features"], "out_features", name)
        else:
            _count(layer["in_channels"], "in_channels", name)
            _count(layer["out_channels"], "out_channels", name)
            _pair(layer["kernel_size"], "kernel_size", name, 1)
            _pair(layer["stride"], "stride", name, 1)
            _pair(layer["padding"], "padding", name, 0)
            _pair(layer["dilation"], "dilation", name, 1)
        if not isinstance(layer["binary"], bool):
            raise ValueError(f"{name}: binary must be true or false, got {layer['binary']!r}")
        if not isinstance(layer["binarization"], str):
            raise ValueError(f"{name}: binarization must be a string, got {layer['binarization']!r}")
        h = layer["H"]
        if layer["binary"] and not (is_finite_number(h) and h > 0):
            raise ValueError(f"{name}: H must be a positive number, got {h!r}")
    elif kind == "affine":
        _count(layer["channels"], "channels", name)
    elif kind == "maxpool2d":
        kh, kw = _pair(layer["kernel_size"], "kernel_size", name, 1)
        _pair(layer["stride"], "stride", name, 1)
        ph, pw = _pair(layer["padding"], "padding", name, 0)
        if 2 * ph > kh or 2 * pw > kw:
            raise ValueError(f"{name}: padding {layer['padding']} exceeds half the kernel {layer['kernel_size']}")
    return layer


def layer_shapes(layers: list[dict], input_shape: tuple[int, ...]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(input shape, output shape) of every layer for one example; ValueError where they disagree."""
    shapes = []
    shape = tuple(input_shape)
    for i, layer in enumerate(layers):
        kind = layer["type"]
        name = f"layer {i} ({kind})"
        if kind == "flatten":
            out = (math.prod(shape),)
        elif kind == "linear":
            if shape != (layer["in_features"],):
                raise ValueError(f"{name} expects {layer['in_features']} input features but receives shape "
                                 f"{list(shape)}")
            out = (layer["out_features"],)
        elif kind in ("conv2d", "maxpool2d"):
            if len(shape) != 3:
                raise ValueError(f"{name} expects a [channels, height, width] input but receives shape {list(shape)}")
            if kind == "conv2d" and shape[0] != layer["in_channels"]:
                raise ValueError(f"{name} expects {layer['in_channels']} input channels but receives {shape[0]}")
            dil = layer.get("dilation", [1, 1])
            oh, ow = (conv_output_size(shape[1 + d], layer["kernel_size"][d], layer["stride"][d],
                                       layer["padding"][d], dil[d]) for d in range(2))
            if oh < 1 or ow < 1:
                raise ValueError(f"{name}: input {list(shape)} is smaller than the kernel {layer['kernel_size']}")
            out = (layer["out_channels"] if kind == "conv2d" else shape[0], oh, ow)
        elif kind == "affine":
            if not shape or shape[0] != layer["channels"]:
                raise ValueError(f"{name} has {layer['channels']} channels but receives shape {list(shape)}")
            out = shape
        else:  # relu
            out = shape
        shapes.append((shape, out))
        shape = out
    return shapes


@dataclass
class PackedNetwork:
    """A packed network in memory: what a ``.bcnn`` file holds."""

    layers: list[dict]
    tensors: dict[str, torch.Tensor]
    input_shape: tuple[int, ...]
    num_classes: int
    source: dict = field(default_factory=dict)
    config: dict | None = None

    def tensor(self, index: int, name: str) -> torch.Tensor:
        return self.tensors[f"layers.{index}.{name}"]

    def metadata(self) -> dict[str, str]:
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "architecture": json.dumps(self.layers, sort_keys=True),
            "input_shape": json.dumps(list(self.input_shape)),
            "num_classes": str(self.num_classes),
            "source": json.dumps(self.source, sort_keys=True),
        }
        if self.config is not None:
            meta["config"] = json.dumps(self.config, sort_keys=True)
        return meta

    def validate(self, where: str = "<memory>") -> PackedNetwork:
        """Check layers, tensor names, dtypes, shapes, finiteness and padding bits; PackedFormatError if not."""
        try:
            if not isinstance(self.layers, list) or not self.layers:
                raise ValueError("architecture must be a non-empty list of layers")
            if (not isinstance(self.input_shape, tuple) or not self.input_shape
                    or not all(is_int(d) and d > 0 for d in self.input_shape)):
                raise ValueError(f"input_shape must be a list of positive integers, got {self.input_shape!r}")
            if not is_int(self.num_classes) or self.num_classes < 1:
                raise ValueError(f"num_classes must be a positive integer, got {self.num_classes!r}")
            for i, layer in enumerate(self.layers):
                check_layer(i, layer)
            shapes = layer_shapes(self.layers, self.input_shape)
            if shapes[-1][1] != (self.num_classes,):
                raise ValueError(f"the last layer outputs shape {list(shapes[-1][1])}, not the {self.num_classes} "
                                 "classes the file declares")
        except ValueError as exc:
            raise PackedFormatError(f"{where}: {exc}") from None
        expected: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for i, layer in enumerate(self.layers):
            expected.update(expected_tensors(i, layer))
        missing = [n for n in expected if n not in self.tensors]
        if missing:
            raise PackedFormatError(f"{where} is missing tensors: {', '.join(missing)}")
        extra = sorted(set(self.tensors) - set(expected))
        if extra:
            raise PackedFormatError(f"{where} has unexpected tensors: {', '.join(extra)}")
        for name, (dtype, shape) in expected.items():
            t = self.tensors[name]
            if t.dtype != dtype:
                raise PackedFormatError(f"{where}: tensor {name} has dtype {t.dtype}, expected {dtype}")
            if tuple(t.shape) != shape:
                raise PackedFormatError(f"{where}: tensor {name} has shape {list(t.shape)}, expected {list(shape)}")
            if dtype.is_floating_point and not bool(torch.isfinite(t).all()):
                raise PackedFormatError(f"{where}: tensor {name} holds NaN or Inf values")
        for i, layer in enumerate(self.layers):
            if layer["type"] in ("linear", "conv2d") and layer["binary"]:
                if not padding_bits_are_zero(self.tensor(i, "weight_bits"), layer_fan_in(layer)):
                    raise PackedFormatError(f"{where}: tensor layers.{i}.weight_bits has nonzero padding bits "
                                            f"(bits past the {layer_fan_in(layer)} weights of a row must be 0)")
        return self

    def to_bytes(self) -> bytes:
        """The file's bytes (safetensors; metadata keys sorted, so equal networks give identical bytes)."""
        return serialize_tensors(self.tensors, self.metadata())

    def save(self, path: str | os.PathLike) -> int:
        """Validate, then write ``path`` atomically; return its size in bytes."""
        self.validate(str(path))
        data = self.to_bytes()
        atomic_write_bytes(path, data)
        return len(data)

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "<bytes>") -> PackedNetwork:
        """Parse and validate the bytes of a packed file."""
        try:
            header = read_safetensors_header(data, where)
        except PackedFormatError:
            raise
        except CheckpointError as exc:
            raise PackedFormatError(str(exc)) from None
        (n,) = struct.unpack("<Q", data[:8])
        try:
            end = 8 + n + max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (TypeError, KeyError, IndexError):
            raise PackedFormatError(f"{where} has a corrupt safetensors header (bad data_offsets)") from None
        if len(data) > end:
            raise PackedFormatError(f"{where} has {len(data) - end} bytes past the end of its tensors: corrupt, or "
                                    "not a file binaryconnect wrote")
        meta = header.get("__metadata__") or {}
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            fmt = meta.get("format") if isinstance(meta, dict) else None
            raise PackedFormatError(f"{where} is not a binaryconnect packed model (format {fmt!r}, expected "
                                    f"{FORMAT!r}); make one with `binaryconnect export RUN_DIR -o model{SUFFIX}`")
        if meta.get("format_version") != FORMAT_VERSION:
            raise PackedFormatError(f"{where} has packed format version {meta.get('format_version')!r}; this "
                                    f"binaryconnect reads version {FORMAT_VERSION}: upgrade binaryconnect or "
                                    "export the model again")
        try:
            layers = json.loads(meta["architecture"])
            input_shape = json.loads(meta["input_shape"])
            num_classes = int(meta["num_classes"])
            source = json.loads(meta.get("source", "{}"))
            config = json.loads(meta["config"]) if "config" in meta else None
        except (KeyError, ValueError, TypeError) as exc:
            raise PackedFormatError(f"{where} has unreadable metadata ({type(exc).__name__}: {exc})") from None
        if not isinstance(input_shape, list):
            raise PackedFormatError(f"{where}: input_shape must be a list of positive integers, got {input_shape!r}")
        if not isinstance(source, dict):
            raise PackedFormatError(f"{where}: source must be a JSON object, got {source!r}")
        try:
            tensors = st_load(data)
        except Exception as exc:  # safetensors raises its own error types
            raise PackedFormatError(f"{where} is not a valid safetensors file ({exc})") from None
        return cls(layers, tensors, tuple(input_shape), num_classes,
                   source if isinstance(source, dict) else {}, config).validate(where)

    @classmethod
    def load(cls, path: str | os.PathLike) -> PackedNetwork:
        path = Path(path)
        if not path.is_file():
            raise PackedFormatError(f"{path} does not exist (or is not a file)")
        return cls.from_bytes(path.read_bytes(), str(path))


def read_packed(path: str | os.PathLike) -> PackedNetwork:
    """Load and validate a packed model file."""
    return PackedNetwork.load(path)
