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


@pytest.mark.parametrize("k", range(1, 16))
def test_every_padding_bit_is_detected(k):
    """Rows of k = 1..15 bits: each padding bit of the last byte (bits k % 8 .. 7), set alone in any row of a 1-D,
    2-D or 3-D packed array, makes the check fail; the first one (bit k % 8) is the easiest to miss. The data bits
    (bits 0 .. k % 8 - 1), all set with the padding zero, pass; with k % 8 == 0 there is no padding bit at all."""
    rem = k % 8
    padding = range(rem, 8) if rem else range(0)
    assert len(padding) == packed_size(k) * 8 - k
    for layout in ((), (1,), (4,), (2, 3)):
        data_bits = pack_bits(torch.ones(*layout, k, dtype=torch.bool))  # every data bit 1, padding 0
        assert padding_bits_are_zero(data_bits, k), (layout, "all data bits set")
        assert padding_bits_are_zero(torch.zeros_like(data_bits), k), (layout, "all zero")
        rows = data_bits.view(-1, data_bits.shape[-1]).shape[0]
        for j in padding:
            for row in range(rows):
                for base in (torch.zeros_like(data_bits), data_bits):
                    bad = base.clone()
                    bad.view(-1, bad.shape[-1])[row, -1] |= 1 << j
                    assert not padding_bits_are_zero(bad, k), (layout, row, j)


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
