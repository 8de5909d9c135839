"""binaryconnect: train and deploy neural networks with binary weights (BinaryConnect, NIPS 2015)."""

__version__ = "0.1.0"

from .binarize import binarize_deterministic, binarize_ste, binarize_stochastic, hard_sigmoid  # noqa: E402
from .layers import BinaryConv2d, BinaryLinear  # noqa: E402
from .losses import square_hinge_loss  # noqa: E402
from .models import create_model, list_models  # noqa: E402
from .optim import clip_latent_, glorot_lr_scale, make_optimizer, param_groups  # noqa: E402

__all__ = [
    "BinaryConv2d", "BinaryLinear", "binarize_deterministic", "binarize_stochastic", "binarize_ste",
    "clip_latent_", "create_model", "glorot_lr_scale", "hard_sigmoid", "list_models", "make_optimizer",
    "param_groups", "square_hinge_loss",
]
