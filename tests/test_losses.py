"""The square hinge loss against a hand computation."""

import torch

from binaryconnect.losses import hinge_targets, square_hinge_loss


def test_targets_are_plus_minus_one():
    t = hinge_targets(torch.tensor([2, 0]), 3)
    assert torch.equal(t, torch.tensor([[-1.0, -1.0, 1.0], [1.0, -1.0, -1.0]]))


def test_square_hinge_by_hand():
    out = torch.tensor([[0.5, -2.0, 1.5], [0.2, 0.9, -0.3]])
    labels = torch.tensor([0, 1])
    # row 0, t = (+1, -1, -1): max(0, 1-0.5)^2 = 0.25, max(0, 1-2)^2 = 0, max(0, 1+1.5)^2 = 6.25
    # row 1, t = (-1, +1, -1): max(0, 1+0.2)^2 = 1.44, max(0, 1-0.9)^2 = 0.01, max(0, 1-0.3)^2 = 0.49
    expected = (0.25 + 0 + 6.25 + 1.44 + 0.01 + 0.49) / 6
    assert abs(square_hinge_loss(out, labels).item() - expected) < 1e-6


def test_gradient_by_hand():
    out = torch.tensor([[0.5, -2.0]], requires_grad=True)
    square_hinge_loss(out, torch.tensor([0])).backward()
    # d/dy of mean(max(0, 1 - t y)^2) = -2 t max(0, 1 - t y) / N, N = 2
    assert torch.allclose(out.grad, torch.tensor([[-2 * 0.5 / 2, 0.0]]))
