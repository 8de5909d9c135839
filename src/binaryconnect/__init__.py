"""binaryconnect: train and deploy neural networks with binary weights (BinaryConnect, NIPS 2015).

The public names below are imported on first use, so that ``import binaryconnect`` (and the command line,
which installs its Ctrl-C handling before PyTorch loads) does not wait for PyTorch to import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    ".binarize": ("binarize_deterministic", "binarize_ste", "binarize_stochastic", "hard_sigmoid"),
    ".layers": ("BinaryConv2d", "BinaryLinear", "binarize_modules_"),
    ".losses": ("square_hinge_loss",),
    ".models": ("create_model", "list_models"),
    ".optim": ("clip_latent_", "glorot_lr_scale", "make_optimizer", "param_groups"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = [
    "BinaryConv2d", "BinaryLinear", "binarize_deterministic", "binarize_modules_", "binarize_stochastic",
    "binarize_ste", "clip_latent_", "create_model", "glorot_lr_scale", "hard_sigmoid", "list_models",
    "make_optimizer", "param_groups", "square_hinge_loss",
]

if TYPE_CHECKING:
    from .binarize import binarize_deterministic, binarize_ste, binarize_stochastic, hard_sigmoid
    from .layers import BinaryConv2d, BinaryLinear, binarize_modules_
    from .losses import square_hinge_loss
    from .models import create_model, list_models
    from .optim import clip_latent_, glorot_lr_scale, make_optimizer, param_groups


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
