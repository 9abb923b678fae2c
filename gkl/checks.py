"""Checks of the numbers a user types (a config key, a function argument), made once where the
number enters; every message reads ``<name> must be <valid range>, got <value>``."""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any


def _range(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high}"
    return ""


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    hint: str = "",
) -> Any:
    """Return ``value`` if it is a finite number (an integer with ``integer``) within the range
    ``low``..``high`` (bounds included unless ``*_open``); else a ``ValueError`` that names
    ``name``, the value and the valid range, followed by ``hint``. Booleans are not numbers."""
    kind = "an integer" if integer else "a finite number"
    is_number = not isinstance(value, bool) and isinstance(value, Integral if integer else Real)
    finite = is_number and (integer or math.isfinite(float(value)))
    in_range = finite and not (
        (low is not None and (value <= low if low_open else value < low))
        or (high is not None and (value >= high if high_open else value > high))
    )
    if not in_range:
        bounds = _range(low, high, low_open, high_open)
        # A finite number of the right kind is only out of range: name the range alone.
        rule = bounds if finite and not integer else f"{kind} {bounds}".strip()
        raise ValueError(f"{name} must be {rule}, got {value!r}{hint}")
    return value


def check_positive_number(name: str, value: Any, hint: str = "") -> Any:
    """A finite number > 0 (a temperature, a learning rate)."""
    return check_number(name, value, low=0, low_open=True, hint=hint)


def check_non_negative_number(name: str, value: Any, hint: str = "") -> Any:
    """A finite number >= 0 (a loss weight: 0 switches the term off)."""
    return check_number(name, value, low=0, hint=hint)


def check_count(name: str, value: Any, minimum: int = 1, hint: str = "") -> Any:
    """An integer >= ``minimum`` (a batch size, a number of classes or steps)."""
    return check_number(name, value, low=minimum, integer=True, hint=hint)
