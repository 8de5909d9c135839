"""The paper's convolutional networks for CIFAR-10 and SVHN (sections 3.3 and 3.4).

CIFAR-10: ``(2 x 128C3) - MP2 - (2 x 256C3) - MP2 - (2 x 512C3) - MP2 - (2 x 1024FC) - 10SVM``;
SVHN: the same with half the convolution channels (64, 128, 256), still 2 x 1024 FC. Every
convolution and dense layer is binarized (``BinaryConv2d`` / ``BinaryLinear``, no bias: a batch norm
follows each), 3 x 3 convolutions with padding 1, batch norm with epsilon 1e-4 and momentum 0.1 (the
original code's ``alpha`` for batch size 50), ReLU, and a batch-normalised 10-unit output trained with
the square hinge loss.

Where the batch norm sits follows the original code (MatthieuCourbariaux/BinaryConnect, ``cifar10.py``
and ``svhn.py`` at commit 2b2a03f): the first convolution of each pair is followed by BN and ReLU;
the second by max pooling, *then* BN and ReLU (``conv -> MaxPool2D -> BatchNorm(rectify)``). That is the
``bn_after_pool=True`` default here; ``False`` puts BN and ReLU before the pooling instead.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..layers import BinaryConv2d, BinaryLinear
from . import forward_options, register_model

#: Convolution channels of the paper's networks.
CIFAR10_CHANNELS = (128, 256, 512)
SVHN_CHANNELS = (64, 128, 256)


class BinaryConvNet(nn.Module):
    """VGG-like network of binary 3x3 convolutions in pairs, each pair followed by 2x2 max pooling,
    then binary dense layers; batch norm after every binary layer, ReLU after all but the last.

    Args: ``input_shape`` ``(C, H, W)`` with H and W divisible by ``2 ** len(channels)``;
    ``channels`` per stage; ``convs_per_stage`` (2); ``hidden`` units of each of ``fc_depth`` dense
    layers (1024, 2); ``binarization``, ``H``, ``ste``, ``stochastic_eval`` as in ``layers``;
    ``bn_eps``, ``bn_momentum`` (PyTorch convention: ``running = (1 - m) running + m batch``);
    ``bn_after_pool`` (True: the original code's order).
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (3, 32, 32),
        num_classes: int = 10,
        channels: Sequence[int] = CIFAR10_CHANNELS,
        convs_per_stage: int = 2,
        hidden: int = 1024,
        fc_depth: int = 2,
        binarization: str = "deterministic",
        H: float = 1.0,
        ste: str = "identity",
        stochastic_eval: str = "real",
        bn_eps: float = 1e-4,
        bn_momentum: float = 0.1,
        bn_after_pool: bool = True,
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"convnet needs images (C, H, W), got input shape {tuple(input_shape)}")
        c, h, w = (int(v) for v in input_shape)
        channels = [int(v) for v in channels]
        if not channels or min(channels) < 1 or convs_per_stage < 1 or hidden < 1 or fc_depth < 0 or num_classes < 1:
            raise ValueError(f"impossible convnet shape: channels={channels}, convs_per_stage={convs_per_stage}, "
                             f"hidden={hidden}, fc_depth={fc_depth}, num_classes={num_classes}")
        factor = 2 ** len(channels)
        if h % factor or w % factor:
            raise ValueError(f"input {h}x{w} is not divisible by {factor} (one 2x2 pooling per stage of {channels})")
        binary = dict(binarization=binarization, H=H, ste=ste, stochastic_eval=stochastic_eval)

        def bn2d(n: int) -> nn.BatchNorm2d:
            return nn.BatchNorm2d(n, eps=bn_eps, momentum=bn_momentum)

        layers: list[nn.Module] = []
        in_ch = c
        for out_ch in channels:
            for i in range(convs_per_stage):
                layers.append(BinaryConv2d(in_ch, out_ch, 3, padding=1, bias=False, **binary))
                in_ch = out_ch
                if i < convs_per_stage - 1:
                    layers += [bn2d(out_ch), nn.ReLU(inplace=True)]
                elif bn_after_pool:
                    layers += [nn.MaxPool2d(2), bn2d(out_ch), nn.ReLU(inplace=True)]
                else:
                    layers += [bn2d(out_ch), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        widths = [in_ch * (h // factor) * (w // factor)] + [hidden] * fc_depth + [num_classes]
        head: list[nn.Module] = [nn.Flatten()]
        for i in range(len(widths) - 1):
            head.append(BinaryLinear(widths[i], widths[i + 1], bias=False, **binary))
            head.append(nn.BatchNorm1d(widths[i + 1], eps=bn_eps, momentum=bn_momentum))
            if i < len(widths) - 2:
                head.append(nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(*head)

    def forward(self, x):
        return self.classifier(self.features(x))


@register_model("convnet")
def convnet(input_shape: tuple[int, ...] = (3, 32, 32), num_classes: int = 10, **kwargs) -> BinaryConvNet:
    """The paper's CIFAR-10 network by default; ``channels=(64, 128, 256)`` gives its SVHN network."""
    return BinaryConvNet(input_shape=input_shape, num_classes=num_classes, **kwargs)


forward_options(convnet, BinaryConvNet)  # options checked by name before building
