"""Bit packing: exact round trips for any shape, the documented bit order, zero padding bits."""

import pytest
import torch

from binaryconnect.binarize import binarize_deterministic
from binaryconnect.export.pack import pack_bits, pack_signs, packed_size, padding_bits_are_zero, unpack_bits

SHAPES = [(1,), (7,), (8,), (9,), (16,), (17,), (3, 1), (5, 13), (4, 784), (10, 1023), (2, 3, 27), (6, 2, 5, 64),
          (1, 1152), (0, 5)]


@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_is_exact(shape):
    bits = torch.rand(shape) < 0.5
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*shape[:-1], packed_size(shape[-1]))
    assert torch.equal(unpack_bits(packed, shape[-1]), bits)
    assert padding_bits_are_zero(packed, shape[-1])


def test_bit_order_is_lsb_first():
    # element 8g + i is bit i (value 1 << i) of byte g
    bits = torch.zeros(1, 11, dtype=torch.bool)
    bits[0, [0, 3, 7, 8, 10]] = True
    assert pack_bits(bits).tolist() == [[1 + 8 + 128, 1 + 4]]


def test_bytes_against_a_python_oracle():
    bits = torch.rand(9, 37) < 0.3
    expected = [[sum(1 << i for i in range(8) if 8 * g + i < 37 and bits[r, 8 * g + i]) for g in range(5)]
                for r in range(9)]
    assert pack_bits(bits).tolist() == expected


def test_all_ones_and_all_zeros():
    assert pack_bits(torch.ones(2, 12, dtype=torch.bool)).tolist() == [[255, 15]] * 2
    assert pack_bits(torch.zeros(2, 12, dtype=torch.bool)).tolist() == [[0, 0]] * 2


def test_padding_bits_check_detects_set_padding():
    packed = pack_bits(torch.ones(3, 10, dtype=torch.bool))
    assert padding_bits_are_zero(packed, 10)
    packed[1, -1] |= 1 << 5
    assert not padding_bits_are_zero(packed, 10)
    assert padding_bits_are_zero(pack_bits(torch.ones(3, 16, dtype=torch.bool)), 16)  # no padding at all


def test_pack_signs_follows_equation_one():
    # eq. (1): +H where W >= 0 (zero included), -H elsewhere; conv rows flatten (c, dy, dx)
    w = torch.randn(4, 3, 3, 3)
    w[0, 0, 0, 0] = 0.0
    packed = pack_signs(w)
    signs = unpack_bits(packed, 27).float() * 2 - 1
    assert torch.equal(signs.view_as(w), binarize_deterministic(w, 1.0))


def test_bad_inputs_are_rejected():
    with pytest.raises(TypeError):
        pack_bits(torch.ones(3))
    with pytest.raises(TypeError):
        unpack_bits(torch.ones(3, 2), 12)
    with pytest.raises(ValueError, match="does not hold 17 bits"):
        unpack_bits(torch.zeros(3, 2, dtype=torch.uint8), 17)
