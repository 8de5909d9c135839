"""Type checks for values read from JSON, the command line and files (config.json, packed model headers,
dataset options, metrics). ``bool`` is a subclass of ``int`` in Python and JSON's ``true``/``false`` load as
bools, so ``isinstance(value, int)`` alone would take ``true`` for the integer 1: these checks do not."""

from __future__ import annotations

import math


def is_int(value) -> bool:
    """An integer, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """An integer or a float, not a bool (NaN and the infinities included: see ``is_finite_number``)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    """An integer or a finite float, not a bool; an integer too large for a float (past 1.8e308) is not one:
    everything that reads these numbers computes in floats."""
    try:
        return is_number(value) and math.isfinite(value)
    except OverflowError:  # math.isfinite(10**400)
        return False
