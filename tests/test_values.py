"""The type checks for values read from JSON, the command line and files: bools are not numbers here."""

from __future__ import annotations

import math

import pytest

from binaryconnect._values import is_finite_number, is_int, is_number


@pytest.mark.parametrize("value, integer, number, finite", [
    (0, True, True, True),
    (-3, True, True, True),
    (2**70, True, True, True),
    (10**400, True, True, False),  # no float holds it (math.isfinite would raise OverflowError)
    (1.0, False, True, True),
    (1e-300, False, True, True),
    (math.nan, False, True, False),
    (math.inf, False, True, False),
    (-math.inf, False, True, False),
    (True, False, False, False),  # bool is a subclass of int: JSON's true must not pass as 1
    (False, False, False, False),
    ("1", False, False, False),
    (None, False, False, False),
    ([1], False, False, False),
])
def test_checks(value, integer, number, finite):
    assert (is_int(value), is_number(value), is_finite_number(value)) == (integer, number, finite)
