"""Loss of the paper: the square hinge loss of an L2-SVM output layer."""

from __future__ import annotations

import torch


def hinge_targets(labels: torch.Tensor, num_classes: int, dtype=torch.float32) -> torch.Tensor:
    """One-hot targets in {-1, +1}: ``+1`` for the true class, ``-1`` elsewhere."""
    t = torch.full((labels.shape[0], num_classes), -1.0, dtype=dtype, device=labels.device)
    return t.scatter_(1, labels.long().unsqueeze(1), 1.0)


def square_hinge_loss(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``mean over batch and classes of max(0, 1 - t * y) ** 2`` with ``t`` from ``hinge_targets``
    (the original code's ``T.mean(T.sqr(T.maximum(0., 1. - target * output)))``)."""
    t = hinge_targets(labels, output.shape[1], output.dtype)
    return torch.clamp(1.0 - t * output, min=0.0).square().mean()
