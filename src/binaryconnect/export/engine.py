"""Inference on a packed network: the compiled kernels on the packed bits, or a pure PyTorch fallback.

``load_packed("model.bcnn")`` returns a ``PackedModel``; ``model(x)`` gives the logits of a float
batch ``[B, *input_shape]`` and ``model.predict(x)`` the classes.

Engines:

- ``native``: the compiled kernels (``native.py``) read the packed bits directly. A binary layer computes
  ``y_o = scale_o * (sum_{s_ok=+1} x_k - sum_{s_ok=-1} x_k) + offset_o`` with additions only: tables
  of the signed sums of 4 (or 8) inputs, built with one addition per entry and looked up with the
  half-bytes (or bytes) of weights, or masked additions for a single column; the folded batch norm's
  ``scale`` is the only multiplication, and the following ReLU is fused. Activations are kept
  feature-major ([features, batch] or [channels, batch, height, width]) so that a vector register
  holds one feature for many examples or pixels; convolutions gather their input tiles directly
  (no im2col buffer).
- ``torch``: pure PyTorch, for machines without a C++ compiler and as a reference. The bits are
  unpacked once, at load, to +-1 float32 weights used with ``F.linear``/``F.conv2d`` (so it does use
  multiplications and 32x the memory); results agree with ``native`` to float32 rounding. Exceptions:
  an infinite input gives ``native`` NaN where ``torch``, float32 PyTorch and the C source export give
  +-inf, and a finite input beyond half float32's largest value (about 1.7e38) can give it +-inf, NaN or
  finite nonsense where float32 PyTorch's sums stay finite or become NaN (its tables and single columns double
  a sum, then subtract another: inf - inf);
  ``PackedModel`` refuses both kinds of input, and NaN, with ``DataError`` on either engine (one
  ``torch.aminmax`` pass over each batch: about 2 us for an MNIST image), and so does ``binaryconnect predict``
  before running anything (``tools.read_inputs``). Finite inputs within that range whose sums overflow deeper
  in the network give the engines' logits as they are.
- ``auto`` (default): ``native`` if the kernels build here, else ``torch`` with a warning.

The default comes from ``$BINARYCONNECT_ENGINE`` when set; an ``engine=`` argument wins over it.
Threads: ``torch.get_num_threads()`` at call time, unless ``threads=`` is given.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError
from . import native
from .format import PackedNetwork, layer_fan_in, layer_shapes, read_packed
from .pack import unpack_bits

ENGINES = ("auto", "native", "torch")
ENV_ENGINE = "BINARYCONNECT_ENGINE"

#: The largest input magnitude the native engine takes: half float32's largest value (about 1.7e38). Beyond it
#: its sums (doubled, then another subtracted) overflow where float32 PyTorch's do not.
HALF_FLOAT32_MAX = float(torch.finfo(torch.float32).max) / 2


def resolve_engine(engine: str | None = None) -> str:
    """``native`` or ``torch`` for ``engine`` (``None``: ``$BINARYCONNECT_ENGINE``, else ``auto``)."""
    name = engine or os.environ.get(ENV_ENGINE) or "auto"
    if name not in ENGINES:
        raise ConfigError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    if name == "torch":
        return "torch"
    try:
        native.load()
        return "native"
    except native.NativeUnavailable as exc:
        if name == "native":
            raise
        warnings.warn(f"binaryconnect: compiled kernels unavailable ({exc}); using the slower pure PyTorch "
                      "engine", RuntimeWarning, stacklevel=3)
        return "torch"


@dataclass
class _Step:
    kind: str  # flatten | binary | float | affine | relu | maxpool2d
    layer: dict
    index: int  # position in the file's architecture
    relu: bool = False  # a following ReLU fused into this step
    weight: torch.Tensor | None = None  # torch engine: +-1 or float weights; native: float layers
    bits: torch.Tensor | None = None  # native: the packed rows [N][Kg]
    # scale, offset: a linear/conv/affine layer's; for a maxpool2d (native engine) the batch norm after it, fused
    scale: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    desc: object = None  # native: the kernel's layer descriptor (input shape, weights, scale, offset, ReLU)
    out_chw: tuple[int, int, int] = (0, 0, 0)  # native: output channels, height, width


def _conv2d_scaled(x: torch.Tensor, step: _Step) -> torch.Tensor:
    """``scale_o * conv2d(x, weight)_o + offset_o`` of a ``[B, C, H, W]`` batch (the weights float or +-1)."""
    layer = step.layer
    x = F.conv2d(x, step.weight, stride=layer["stride"], padding=layer["padding"], dilation=layer["dilation"])
    return x * step.scale[:, None, None] + step.offset[:, None, None]


def _affine(x: torch.Tensor, step: _Step, dim: int) -> torch.Tensor:
    """``scale_c * x + offset_c`` with the channel (feature) ``c`` along dimension ``dim`` of ``x``."""
    shape = [1] * x.dim()
    shape[dim] = -1
    return x * step.scale.view(shape) + step.offset.view(shape)


class PackedModel:
    """A packed network ready to run. ``engine``: ``auto``, ``native`` or ``torch``."""

    def __init__(self, net: PackedNetwork, engine: str | None = None, threads: int | None = None):
        self.net = net
        self.engine = resolve_engine(engine)
        self.threads = threads
        self.kernels = native.load() if self.engine == "native" else None
        self.input_shape = tuple(net.input_shape)
        self.num_classes = net.num_classes
        self.shapes = layer_shapes(net.layers, self.input_shape)
        self.steps = self._plan()

    @property
    def isa(self) -> str | None:
        """The instruction set of the native kernels (``None`` for the torch engine)."""
        return self.kernels.isa if self.kernels is not None else None

    def _plan(self) -> list[_Step]:
        steps: list[_Step] = []
        for i, layer in enumerate(self.net.layers):
            kind = layer["type"]
            fuses = ("binary", "float", "affine") + (("maxpool2d",) if self.engine == "native" else ())
            if kind == "relu" and steps and steps[-1].kind in fuses and not steps[-1].relu:
                steps[-1].relu = True
                continue
            if (kind == "affine" and self.engine == "native" and steps and steps[-1].kind == "maxpool2d"
                    and steps[-1].scale is None and not steps[-1].relu):
                # the batch norm after a pooling: applied by the pooling kernel, in the same pass
                steps[-1].scale = self.net.tensor(i, "scale").contiguous()
                steps[-1].offset = self.net.tensor(i, "offset").contiguous()
                continue
            step = _Step("binary" if kind in ("linear", "conv2d") and layer["binary"] else
                         "float" if kind in ("linear", "conv2d") else kind, layer, i)
            if kind in ("linear", "conv2d", "affine"):
                step.scale = self.net.tensor(i, "scale").contiguous()
                step.offset = self.net.tensor(i, "offset").contiguous()
            if step.kind == "binary":
                bits = self.net.tensor(i, "weight_bits")
                if self.engine == "native":
                    step.bits = bits
                else:
                    signs = unpack_bits(bits, layer_fan_in(layer)).to(torch.float32) * 2 - 1
                    if kind == "conv2d":
                        signs = signs.view(layer["out_channels"], layer["in_channels"], *layer["kernel_size"])
                    step.weight = signs.contiguous()
            elif step.kind == "float":
                step.weight = self.net.tensor(i, "weight").contiguous()
            steps.append(step)
        if self.engine == "native":
            for step in steps:
                if step.kind == "binary":
                    self._describe(step, *self.shapes[step.index])
        return steps

    def _describe(self, step: _Step, shape_in: tuple[int, ...], shape_out: tuple[int, ...]) -> None:
        layer = step.layer
        if layer["type"] == "linear":  # a 1x1 convolution on a 1x1 image whose batch is the columns
            c, h, w, geometry = shape_in[0], 1, 1, ((1, 1), (1, 1), (0, 0), (1, 1))
            step.out_chw = (shape_out[0], 1, 1)
        else:
            (c, h, w), geometry = shape_in, (layer["kernel_size"], layer["stride"], layer["padding"], layer["dilation"])
            step.out_chw = tuple(shape_out)
        step.desc = self.kernels.layer(c, h, w, *geometry, step.bits, step.scale, step.offset, step.relu)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` (float32) of a batch ``[B, *input_shape]`` (or of one example)."""
        x = torch.as_tensor(x)
        if x.dim() == len(self.input_shape):
            x = x.unsqueeze(0)
        if tuple(x.shape[1:]) != self.input_shape:
            raise ConfigError(f"input of shape {list(x.shape)} does not match the model's input shape "
                              f"[batch, {', '.join(map(str, self.input_shape))}]")
        if x.shape[0] == 0:
            return torch.empty(0, self.num_classes, dtype=torch.float32)
        x = x.detach().to("cpu", torch.float32).contiguous()
        check_input(x)
        if self.engine == "native":
            return self._forward_native(x)
        return self._forward_torch(x)

    def predict(self, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """Predicted classes (int64) of ``x``, in batches."""
        if len(x) == 0:
            return torch.empty(0, dtype=torch.int64)
        return torch.cat([self.forward(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])

    # ---- pure PyTorch: batch-major, weights unpacked at load ----
    def _forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            layer = step.layer
            if step.kind == "flatten":
                x = x.reshape(x.shape[0], -1)
            elif step.kind in ("binary", "float"):
                if layer["type"] == "linear":
                    x = F.linear(x, step.weight) * step.scale + step.offset
                else:
                    x = _conv2d_scaled(x, step)
            elif step.kind == "affine":
                x = _affine(x, step, 1)
            elif step.kind == "relu":
                x = x.clamp_min(0)
            elif step.kind == "maxpool2d":
                x = F.max_pool2d(x, layer["kernel_size"], layer["stride"], layer["padding"])
            if step.relu:
                x = x.clamp_min(0)
        return x.reshape(x.shape[0], -1)

    # ---- compiled kernels: feature-major activations ----
    def _forward_native(self, x: torch.Tensor) -> torch.Tensor:
        threads = self.threads or torch.get_num_threads()
        batch = x.shape[0]
        layout = "batch"  # batch: [B, *shape]; fm: [F, B]; cb: [C, B, H, W]
        for step in self.steps:
            layer = step.layer
            kind = layer["type"]
            if step.kind == "flatten":
                if layout == "cb":
                    x, layout = x.permute(1, 0, 2, 3).reshape(batch, -1).t().contiguous(), "fm"
                elif layout == "batch":
                    x = x.reshape(batch, -1)
            elif step.kind == "binary":
                if kind == "linear" and layout != "fm":
                    x, layout = x.reshape(batch, -1).t().contiguous(), "fm"
                elif kind == "conv2d" and layout == "batch":
                    x, layout = x.transpose(0, 1).contiguous(), "cb"
                n, oh, ow = step.out_chw
                shape = (n, batch, oh, ow) if kind == "conv2d" else (n, batch)
                out = torch.empty(shape, dtype=torch.float32)  # whatever torch's default dtype
                x = self.kernels.forward(step.desc, x, batch, out, threads)
                continue  # relu fused
            elif step.kind == "float":
                if kind == "linear":
                    if layout == "batch":
                        x, layout = x.reshape(batch, -1).t().contiguous(), "fm"
                    x = torch.mm(step.weight, x) * step.scale[:, None] + step.offset[:, None]
                else:
                    if layout == "cb":
                        x, layout = x.transpose(0, 1).contiguous(), "batch"
                    x = _conv2d_scaled(x, step)
            elif step.kind == "affine":
                x = _affine(x, step, 1 if layout == "batch" else 0)
            elif step.kind == "relu":
                x = x.clamp_min(0)
            elif step.kind == "maxpool2d":
                if layout == "cb":  # one pass: pooling, the batch norm after it (if any) and the ReLU (if any)
                    x = self.kernels.maxpool2d(x, layer["kernel_size"], layer["stride"], layer["padding"],
                                               step.scale, step.offset, step.relu, threads)
                    continue
                x = F.max_pool2d(x, layer["kernel_size"], layer["stride"], layer["padding"])
                if step.scale is not None:
                    x = _affine(x, step, 1)  # layout "batch" (a pooling of the input, or after a float conv)
            if step.relu:
                x = x.clamp_min_(0)
        if layout == "fm":
            x = x.t()
        elif layout == "cb":
            x = x.transpose(0, 1)
        return x.reshape(batch, -1).contiguous()


def check_input(x: torch.Tensor, name: str = "input") -> None:
    """Raise ``DataError`` if the float32 batch ``x`` (``[B, ...]``, B >= 1) holds NaN, infinities (a float64
    value beyond float32's range becomes one) or values beyond ``HALF_FLOAT32_MAX``, naming the examples and
    ``name``. One ``torch.aminmax`` pass, NaN propagated: about 2 us for an MNIST image."""
    low, high = torch.aminmax(x)
    if -HALF_FLOAT32_MAX <= low.item() and high.item() <= HALF_FLOAT32_MAX:
        return
    flat = x.reshape(len(x), -1)
    finite = torch.isfinite(flat)
    if not finite.all():
        what, bad, must = ("NaN or infinite values (or values beyond float32's range)", ~finite.all(1),
                           "a packed model takes finite inputs, preprocessed as its training data were")
    else:
        what, bad, must = (f"values beyond +-{HALF_FLOAT32_MAX:.3g} (half float32's largest), where the native "
                           "engine's sums overflow,", (flat.abs() > HALF_FLOAT32_MAX).any(1),
                           "inputs must be preprocessed as the model's training data were")
    rows = bad.nonzero().flatten().tolist()
    raise DataError(f"{name} holds {what} in example{'s' * (len(rows) > 1)} {', '.join(map(str, rows[:5]))}"
                    f"{' ...' if len(rows) > 5 else ''} of {len(x)} (counted from 0): {must}")


def load_packed(path: str | os.PathLike, engine: str | None = None, threads: int | None = None) -> PackedModel:
    """Load and validate a ``.bcnn`` file and prepare it for inference."""
    return PackedModel(read_packed(Path(path)), engine=engine, threads=threads)
