"""Type checks of numbers given by users or peers: a bool is never a number here, numpy scalars are."""

import numbers
from typing import Any

__all__ = ["is_count", "is_integer", "is_number"]


def is_number(value: Any) -> bool:
    """A real number (int, float, a numpy integer or float), not a bool; NaN and inf included."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_integer(value: Any) -> bool:
    """An integer (int or a numpy integer), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_count(value: Any) -> bool:
    """An integer of at least 1 (not a bool)."""
    return is_integer(value) and value >= 1
