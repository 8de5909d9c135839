"""Drop-in binary layers: ``BinaryLinear`` for ``nn.Linear``, ``BinaryConv2d`` for ``nn.Conv2d``.

The latent real-valued weight W stays the parameter ``weight`` (so optimizers, ``state_dict`` and
tools that walk modules keep working). Every training forward pass computes the binary weight
``Wb = binarize(W)`` and propagates with it; the gradient reaches W through the straight-through
estimator (``binarize.binarize_ste``). At test time (``module.eval()``):

- ``deterministic`` uses the binary weights (the paper);
- ``stochastic`` uses the real-valued weights (``stochastic_eval="real"``, the paper's choice), or one
  fresh sample of binary weights (``stochastic_eval="sample"``);
- ``none`` is an ordinary float layer (the paper's "no regularizer" baseline).

Pitfall: the latent weights must be clipped to [-H, H] after each update, or they grow without bound
and stop responding to gradients (a weight at +50 needs 50 units of updates before its sign can flip).
``optim.make_optimizer`` installs that clipping; if you build your own optimizer, call
``optim.clip_latent_(model)`` after every ``optimizer.step()``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .binarize import binarize_deterministic, binarize_ste, check_binarization, check_ste

STOCHASTIC_EVAL = ("real", "sample")


class _BinaryMixin:
    """Shared state and behaviour of the binary layers."""

    weight: nn.Parameter
    binarization: str
    H: float
    ste: str
    stochastic_eval: str
    generator: torch.Generator | None

    def _init_binary(self, binarization: str, H: float, ste: str, stochastic_eval: str) -> None:
        if not H > 0:
            raise ValueError(f"H must be positive, got {H}")
        if stochastic_eval not in STOCHASTIC_EVAL:
            raise ValueError(
                f"unknown stochastic_eval {stochastic_eval!r}; choose one of {', '.join(STOCHASTIC_EVAL)}"
            )
        self.binarization = check_binarization(binarization)
        self.H = float(H)
        self.ste = check_ste(ste)
        self.stochastic_eval = stochastic_eval
        self.generator = None

    @property
    def is_binary(self) -> bool:
        """True when the weight is binarized during training (``deterministic`` or ``stochastic``)."""
        return self.binarization != "none"

    def reset_latent(self) -> None:
        """Initialise the weight as the original code does: a binarized layer's latent weight uniformly in
        [-H, H]; a float layer (``binarization="none"``) Glorot-uniform in [-a, a], a = sqrt(6 / (fan_in +
        fan_out)) (Lasagne's default, which the original code's float layers keep). Biases start at zero."""
        with torch.no_grad():
            if self.is_binary:
                bound = self.H
            else:
                receptive = self.weight[0, 0].numel()
                fan_in, fan_out = self.weight.shape[1] * receptive, self.weight.shape[0] * receptive
                bound = math.sqrt(6.0 / (fan_in + fan_out))
            self.weight.uniform_(-bound, bound)
            if getattr(self, "bias", None) is not None:
                self.bias.zero_()

    def effective_weight(self) -> torch.Tensor:
        """The weight this forward pass propagates with (binary, sampled binary, or real)."""
        mode = self.binarization
        if not self.training and mode == "stochastic" and self.stochastic_eval == "real":
            mode = "none"
        return binarize_ste(self.weight, mode, self.H, self.ste, self.generator)

    def binary_weight(self) -> torch.Tensor:
        """The deterministic binary weight ``+-H`` (eq. 1), detached. For a stochastic layer this is
        ``H * sign(W)``, the weight an exported stochastic model carries."""
        return binarize_deterministic(self.weight.detach(), self.H)

    def extra_repr(self) -> str:  # pragma: no cover - formatting only
        base = super().extra_repr()  # type: ignore[misc]
        extra = f"binarization={self.binarization}, H={self.H}"
        if self.ste != "identity":
            extra += f", ste={self.ste}"
        if self.binarization == "stochastic":
            extra += f", stochastic_eval={self.stochastic_eval}"
        return f"{base}, {extra}"


class BinaryLinear(_BinaryMixin, nn.Linear):
    """``nn.Linear`` whose weight is binarized to +-H in forward and backward passes.

    Args: as ``nn.Linear`` (``bias`` defaults to False: in BinaryConnect a batch norm follows), plus
    ``binarization`` (``deterministic``, ``stochastic``, ``none``), ``H`` (the binary value, 1 in the
    paper), ``ste`` (``identity``: the paper; ``clipped``: zero gradient where |W| > H) and
    ``stochastic_eval`` (``real`` or ``sample``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        binarization: str = "deterministic",
        H: float = 1.0,
        ste: str = "identity",
        stochastic_eval: str = "real",
        device=None,
        dtype=None,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_binary(binarization, H, ste, stochastic_eval)
        self.reset_latent()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)


class BinaryConv2d(_BinaryMixin, nn.Conv2d):
    """``nn.Conv2d`` whose weight is binarized to +-H in forward and backward passes.

    Args: as ``nn.Conv2d`` (``bias`` defaults to False), plus ``binarization``, ``H``, ``ste`` and
    ``stochastic_eval`` as in ``BinaryLinear``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = False,
        padding_mode: str = "zeros",
        binarization: str = "deterministic",
        H: float = 1.0,
        ste: str = "identity",
        stochastic_eval: str = "real",
        device=None,
        dtype=None,
    ) -> None:
        nn.Conv2d.__init__(
            self, in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
            groups=groups, bias=bias, padding_mode=padding_mode, device=device, dtype=dtype,
        )
        self._init_binary(binarization, H, ste, stochastic_eval)
        self.reset_latent()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.effective_weight(), self.bias)


BINARY_LAYERS = (BinaryLinear, BinaryConv2d)


def binary_layers(model: nn.Module):
    """Yield every ``BinaryLinear``/``BinaryConv2d`` in ``model`` (binarized or not)."""
    for module in model.modules():
        if isinstance(module, BINARY_LAYERS):
            yield module


def set_generator(model: nn.Module, generator: torch.Generator | None) -> None:
    """Make every stochastic layer of ``model`` draw its binary weights from ``generator``."""
    for layer in binary_layers(model):
        layer.generator = generator


def set_stochastic_eval(model: nn.Module, stochastic_eval: str) -> None:
    """Choose, for every stochastic layer, what eval mode propagates with: ``real`` or ``sample``."""
    if stochastic_eval not in STOCHASTIC_EVAL:
        raise ValueError(f"unknown stochastic_eval {stochastic_eval!r}; choose one of {', '.join(STOCHASTIC_EVAL)}")
    for layer in binary_layers(model):
        layer.stochastic_eval = stochastic_eval
