"""Bit packing of binary weights: 8 signs per byte, exact for any shape.

The sign of the binary weight ``Wb = +H if W >= 0 else -H`` (eq. 1 of the paper; for a stochastic layer
the exported ``H * sign(W)``) is one bit: 1 for ``+H``, 0 for ``-H``. ``pack_bits`` packs the last
dimension, least significant bit first: bit ``i`` (value ``1 << i``) of byte ``g`` holds element
``8 * g + i``. When the last dimension ``K`` is not a multiple of 8 the last byte is padded with
zero bits, so a tensor ``[..., K]`` becomes ``[..., ceil(K / 8)]`` uint8 and ``unpack_bits(pack_bits(b),
K)`` returns ``b`` exactly.
"""

from __future__ import annotations

import torch

_BIT_VALUES = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)


def packed_size(k: int) -> int:
    """Bytes that hold ``k`` bits: ``ceil(k / 8)``."""
    return (k + 7) // 8


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor ``[..., K]`` into uint8 ``[..., ceil(K / 8)]``, LSB first, zero padding bits."""
    if bits.dtype != torch.bool:
        raise TypeError(f"pack_bits expects a bool tensor, got {bits.dtype}")
    if bits.dim() == 0:
        raise ValueError("pack_bits needs at least one dimension")
    k = bits.shape[-1]
    kg = packed_size(k)
    padded = torch.zeros(*bits.shape[:-1], kg * 8, dtype=torch.uint8, device=bits.device)
    padded[..., :k] = bits
    groups = padded.view(*bits.shape[:-1], kg, 8)
    # Each byte is a sum of distinct powers of two: at most 255, exact in uint8.
    return (groups * _BIT_VALUES.to(bits.device)).sum(-1, dtype=torch.uint8).contiguous()


def unpack_bits(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: uint8 ``[..., ceil(k / 8)]`` -> bool ``[..., k]`` (padding bits dropped)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_bits expects a uint8 tensor, got {packed.dtype}")
    if packed.dim() == 0 or packed.shape[-1] != packed_size(k):
        raise ValueError(f"unpack_bits: last dimension {tuple(packed.shape)[-1:]} does not hold {k} bits "
                         f"(expected {packed_size(k)} bytes)")
    bits = (packed.unsqueeze(-1) & _BIT_VALUES.to(packed.device)) != 0
    return bits.reshape(*packed.shape[:-1], packed.shape[-1] * 8)[..., :k]


def padding_bits_are_zero(packed: torch.Tensor, k: int) -> bool:
    """True when the bits past ``k`` in the last byte of every row are 0 (as ``pack_bits`` writes them)."""
    rem = k % 8
    if rem == 0 or packed.numel() == 0:
        return True
    return bool((packed[..., -1] >> rem).eq(0).all())


def pack_signs(weight: torch.Tensor) -> torch.Tensor:
    """Binary weights of a latent weight ``[out, ...]``, packed: row ``o`` holds ``W[o].flatten() >= 0``.

    That is eq. (1): ``+H`` (bit 1) where ``W >= 0``, ``-H`` (bit 0) elsewhere; for a convolution the
    row is the PyTorch flattening ``(c, dy, dx)`` of ``W[o]``.
    """
    return pack_bits(weight.detach().reshape(weight.shape[0], -1) >= 0)
