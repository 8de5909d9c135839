"""Binarization of weights: the heart of BinaryConnect.

Courbariaux, Bengio & David, "BinaryConnect: Training Deep Neural Networks with binary weights
during propagations", NIPS 2015 (arXiv:1511.00363), section 2.

Pure functions first (``hard_sigmoid``, ``binarize_deterministic``, ``binarize_stochastic``), then the
straight-through estimator (``binarize_ste``) that the layers call, then a small registry that turns
the names used in configuration (``"deterministic"``, ``"stochastic"``, ``"none"``) into objects.
"""

from __future__ import annotations

import torch

#: Names accepted wherever a binarization is chosen by string.
BINARIZATIONS = ("deterministic", "stochastic", "none")
#: Straight-through estimator variants: the paper's identity, or larq-style cancelling for |W| > H.
STE_VARIANTS = ("identity", "clipped")


def hard_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """The paper's hard sigmoid, eq. (3): ``sigma(x) = clip((x + 1) / 2, 0, 1)``."""
    return ((x + 1.0) * 0.5).clamp(0.0, 1.0)


def binarize_deterministic(w: torch.Tensor, H: float = 1.0) -> torch.Tensor:
    """Eq. (1): ``Wb = +H if W >= 0 else -H``. Zero maps to +H (unlike ``torch.sign``)."""
    return torch.where(w >= 0, H, -H).to(w.dtype)


def binarize_stochastic(
    w: torch.Tensor, H: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Eq. (2): ``Wb = +H with probability p = hard_sigmoid(W / H), else -H``.

    ``u ~ U[0, 1)`` is drawn from ``generator`` (same device as ``w``), and ``Wb = +H`` where ``u < p``:
    so ``P(Wb = +H) = p`` exactly, ``W >= H`` always gives ``+H`` and ``W <= -H`` always gives ``-H``.
    """
    p = hard_sigmoid(w.detach() / H)
    u = torch.rand(w.shape, generator=generator, device=w.device, dtype=torch.float32)
    return torch.where(u < p, H, -H).to(w.dtype)


def binarize_ste(
    w: torch.Tensor,
    mode: str = "deterministic",
    H: float = 1.0,
    ste: str = "identity",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Binarize ``w`` for the forward pass and pass the gradient straight through (Algorithm 1).

    Forward: ``Wb = binarize(W)`` with the chosen ``mode`` (``"none"`` returns ``w`` itself).
    Backward: the gradient with respect to ``Wb`` is applied to the latent ``W`` unchanged
    (``ste="identity"``, the paper), or zeroed where ``|W| > H`` (``ste="clipped"``).
    """
    if mode == "none":
        return w
    if mode == "deterministic":
        wb = binarize_deterministic(w.detach(), H)
    elif mode == "stochastic":
        wb = binarize_stochastic(w.detach(), H, generator)
    else:
        raise ValueError(f"unknown binarization {mode!r}; choose one of {', '.join(BINARIZATIONS)}")
    # ``w - w.detach()`` is exactly zero in value and has gradient one with respect to ``w``: adding it
    # to ``wb`` keeps the forward value bit-exact (+-H) and routes the gradient straight through.
    # Plain tensor ops, so torch.compile and CUDA graphs trace it without a custom autograd.Function.
    if ste == "identity":
        return wb + (w - w.detach())
    if ste == "clipped":
        return wb + (w - w.detach()) * (w.detach().abs() <= H).to(w.dtype)
    raise ValueError(f"unknown straight-through estimator {ste!r}; choose one of {', '.join(STE_VARIANTS)}")


def check_binarization(mode: str) -> str:
    """Return ``mode`` if it names a binarization, else raise a ValueError listing the known ones."""
    if mode not in BINARIZATIONS:
        raise ValueError(f"unknown binarization {mode!r}; choose one of {', '.join(BINARIZATIONS)}")
    return mode


def check_ste(ste: str) -> str:
    """Return ``ste`` if it names a straight-through estimator, else raise a ValueError."""
    if ste not in STE_VARIANTS:
        raise ValueError(f"unknown straight-through estimator {ste!r}; choose one of {', '.join(STE_VARIANTS)}")
    return ste
