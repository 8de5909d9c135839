"""The paper's permutation-invariant MNIST network (section 3.1).

Input (784) -> 3 x [BinaryLinear(1024) -> BatchNorm -> ReLU] -> BinaryLinear(10) -> BatchNorm, trained
with the square hinge loss (an L2-SVM output layer). Batch norm: epsilon 1e-4, momentum 0.15 (the
original code's ``alpha``). Width, depth and which layers are binarized are configurable.
"""

from __future__ import annotations

import math

from torch import nn

from ..layers import BinaryLinear
from . import forward_options, register_model


class BinaryMLP(nn.Module):
    """Multilayer perceptron of binary dense layers, each followed by batch norm."""

    def __init__(
        self,
        in_features: int = 784,
        num_classes: int = 10,
        hidden: int = 1024,
        depth: int = 3,
        binarization: str = "deterministic",
        H: float = 1.0,
        ste: str = "identity",
        stochastic_eval: str = "real",
        binarize_first: bool = True,
        binarize_last: bool = True,
        bn_eps: float = 1e-4,
        bn_momentum: float = 0.15,
    ) -> None:
        super().__init__()
        if min(in_features, num_classes, hidden) < 1 or depth < 0:
            raise ValueError(
                f"impossible MLP shape: in_features={in_features}, hidden={hidden}, depth={depth}, "
                f"num_classes={num_classes} (sizes must be >= 1, depth >= 0)"
            )
        widths = [in_features] + [hidden] * depth + [num_classes]
        n_layers = len(widths) - 1
        layers: list[nn.Module] = [nn.Flatten()]
        for i in range(n_layers):
            binarized = (i > 0 or binarize_first) and (i < n_layers - 1 or binarize_last)
            layers.append(
                BinaryLinear(widths[i], widths[i + 1], bias=False,
                             binarization=binarization if binarized else "none",
                             H=H, ste=ste, stochastic_eval=stochastic_eval)
            )
            layers.append(nn.BatchNorm1d(widths[i + 1], eps=bn_eps, momentum=bn_momentum))
            if i < n_layers - 1:
                layers.append(nn.ReLU(inplace=True))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


@register_model("mlp")
def mlp(input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10, **kwargs) -> BinaryMLP:
    """The paper's MNIST MLP (3 x 1024 hidden units by default) for inputs of ``input_shape``."""
    return BinaryMLP(in_features=math.prod(input_shape), num_classes=num_classes, **kwargs)


forward_options(mlp, BinaryMLP, computed=("in_features",))  # options checked by name before building
