"""Data augmentation on whole batches, on the training device (beyond the paper: its recipes use none).

``RandomCropFlip`` is a ``Splits.train_transform``: ``transform(x, generator) -> x`` for a batch
``x`` of shape ``(B, C, H, W)`` on any device, drawing its randomness from ``generator`` (a generator
on the same device), with no Python loop over examples. The standard CIFAR-10 augmentation: zero-pad
by 4 pixels, take a random 32 x 32 crop, flip horizontally with probability 1/2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError

#: Names accepted by ``make_augmentation``.
AUGMENTATIONS = ("none", "crop", "crop-flip")


def crop_flip(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor,
              padding: int) -> torch.Tensor:
    """Deterministic core of ``RandomCropFlip``: for each example ``b``, the ``H x W`` window at
    (``top[b]``, ``left[b]``) of ``x[b]`` zero-padded by ``padding`` on every side, mirrored left-right
    where ``flip[b]``. Offsets lie in ``[0, 2 * padding]``; offset ``padding`` is the identity crop."""
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding)) if padding else x
    rows = top.view(b, 1) + torch.arange(h, device=x.device).view(1, h)  # (B, H)
    cols = left.view(b, 1) + torch.arange(w, device=x.device).view(1, w)  # (B, W)
    # Mirroring the crop's columns is the horizontal flip of the cropped image.
    cols = torch.where(flip.view(b, 1), cols.flip(1), cols)
    batch = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    chan = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return padded[batch, chan, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]


class RandomCropFlip:
    """Random crop with zero padding and (optionally) random horizontal flip of a batch, on its device.

    Offsets are uniform on ``{0, ..., 2 * padding}`` in each direction, independently per example;
    the flip is a fair coin per example. Preserves dtype and memory format of the values, not strides.
    """

    def __init__(self, padding: int = 4, flip: bool = True) -> None:
        if padding < 0:
            raise ConfigError(f"crop padding must be >= 0, got {padding}")
        self.padding = int(padding)
        self.flip = bool(flip)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        b = x.shape[0]
        top = torch.randint(0, 2 * self.padding + 1, (b,), generator=generator, device=x.device)
        left = torch.randint(0, 2 * self.padding + 1, (b,), generator=generator, device=x.device)
        if self.flip:
            flip = torch.rand(b, generator=generator, device=x.device) < 0.5
        else:
            flip = torch.zeros(b, dtype=torch.bool, device=x.device)
        return crop_flip(x, top, left, flip, self.padding)

    def __repr__(self) -> str:
        return f"RandomCropFlip(padding={self.padding}, flip={self.flip})"


def make_augmentation(name: str, padding: int = 4) -> RandomCropFlip | None:
    """``none`` -> None; ``crop`` -> random crop; ``crop-flip`` -> random crop and horizontal flip."""
    if name not in AUGMENTATIONS:
        raise ConfigError(f"unknown augmentation {name!r}; choose one of {', '.join(AUGMENTATIONS)}")
    if name == "none":
        return None
    return RandomCropFlip(padding=padding, flip=name == "crop-flip")
