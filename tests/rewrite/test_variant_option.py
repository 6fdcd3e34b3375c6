"""VariantOption: conversion of CLI strings and the bounds it enforces (minimum / maximum, inclusive / exclusive)."""
import math

import pytest

from rewrite.variant import VariantOption


def _number(**bounds):
    return VariantOption("x", 0.5, float, "a number", **bounds)


@pytest.mark.parametrize("bounds, accepted, refused", [
    ({"minimum": 0.0}, [0.0, 3.0], [-1e-9]),
    ({"minimum": 0.0, "exclusive": True}, [1e-9], [0.0, -1.0]),
    ({"maximum": 1.0}, [1.0, -5.0], [1.0 + 1e-9]),
    ({"maximum": 1.0, "maximum_exclusive": True}, [0.999], [1.0, 2.0]),
    ({"minimum": 0.0, "maximum": 1.0}, [0.0, 0.5, 1.0], [-0.1, 1.1]),
])
def test_bounds(bounds, accepted, refused):
    option = _number(**bounds)
    for value in accepted:
        assert option.convert(value) == value
        assert option.convert(repr(value)) == value  # the CLI spelling
    for value in refused:
        with pytest.raises(ValueError, match=r"option x=.*must be (>|>=|<|<=) "):
            option.convert(value)


def test_maximum_message_names_bound_and_option():
    with pytest.raises(ValueError, match=r"option x=2: must be <= 1$"):
        VariantOption("x", 0, int, "an int", maximum=1).convert(2)
    with pytest.raises(ValueError, match=r"option x=1.0: must be < 1$"):
        _number(maximum=1.0, maximum_exclusive=True).convert(1.0)


def test_non_numbers_and_non_finite_refused():
    option = _number(minimum=0.0, maximum=1.0)
    for bad in ("abc", True, math.nan, math.inf):
        with pytest.raises(ValueError, match="option x="):
            option.convert(bad)
