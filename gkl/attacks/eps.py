"""Parsing of perturbation budgets written as numbers or fractions such as ``"8/255"``."""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass

_INT = re.compile(r"^[+-]?\d+$")
_SAME = 1e-6  # tolerance for "equal": float32 round-off of k/255 (<= 6e-8) counts as equal


def parse_number(value: float | int | str, name: str = "value") -> float:
    """Parse a finite, non-negative number given as int, float or string ``"a"`` / ``"a/b"``."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TypeError(f"{name} must be a number or a string like '8/255', got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        try:
            if "/" in text:
                num, den = (float(part) for part in text.split("/"))
                if den == 0:
                    raise ZeroDivisionError
                number = num / den
            else:
                number = float(text)
        except (ValueError, ZeroDivisionError):
            raise ValueError(
                f"cannot parse {name}={value!r}; use a number or a fraction like '8/255'"
            ) from None
    else:
        number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if number < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return number


def as_k_over_255(value: float) -> int | None:
    """k if ``value`` equals k/255 (to 1e-6, i.e. up to float32 round-off), else ``None``."""
    k = round(value * 255)
    return k if abs(value - k / 255) <= _SAME else None


def _abbreviates_k_over_255(value: float) -> int | None:
    """k if ``value`` is k/255 rounded or truncated to its 3 or more decimals (``0.031``,
    ``0.0313``, ``0.016``), else ``None``. Round numbers with 1-2 decimals (0.05, 0.1) are meant
    as written."""
    text = repr(value)
    if "e" in text or "." not in text:
        return None
    decimals = len(text.split(".")[1])
    if decimals < 3:
        return None
    k = round(value * 255)
    if k == 0 or as_k_over_255(value) is not None:
        return None
    scale = 10**decimals
    exact = k / 255
    if value in (round(exact, decimals), math.floor(exact * scale) / scale):
        return k
    return None


def parse_eps(value: float | int | str, *, norm: str = "Linf", name: str = "eps") -> float:
    """Parse a perturbation budget; for ``norm="Linf"`` it is in [0, 1] pixel units.

    Integers >= 1 (``8``) are taken as 0-255 units and rejected ("write 8/255"). For Linf, values
    > 1 are rejected, and a decimal that abbreviates some k/255 (``0.031`` for
    ``8/255 = 0.031373``: k/255 rounded or truncated to 3 or more decimals) raises a
    ``UserWarning``; round values such as 0.05 or 0.1 do not. L2/L1 budgets are only checked
    to be >= 0.
    """
    number = parse_number(value, name)
    is_integer = isinstance(value, int) or (isinstance(value, str) and _INT.match(value.strip()))
    if is_integer and number >= 1:
        raise ValueError(
            f"{name}={value!r} looks like 0-255 pixel units; {name} is in [0,1] pixel units: "
            f"write {int(number)}/255"
        )
    if norm != "Linf":
        return number
    if number > 1:
        raise ValueError(
            f"{name}={value!r}: eps is in [0,1] pixel units; did you mean {number:g}/255?"
        )
    k = _abbreviates_k_over_255(number)
    if k is not None:
        warnings.warn(
            f"{name}={number:g} differs from {k}/255={k / 255:.6f}; "
            f"write {name}: {k}/255 if that is what you meant",
            UserWarning,
            stacklevel=2,
        )
    return number


THREAT_NORMS = ("Linf", "L2")


@dataclass(frozen=True)
class ThreatModel:
    """A parsed perturbation budget: ``eps`` (a float, [0, 1] pixel units for Linf) and ``norm``.

    Build it with :meth:`parse` where the user types the budget (a config, a command line);
    attacks and evaluation then take ``threat.eps`` as a plain float and never parse again.
    """

    eps: float
    norm: str = "Linf"

    @classmethod
    def parse(cls, eps: float | int | str, norm: str = "Linf", name: str = "eps") -> ThreatModel:
        """:func:`parse_eps` (``"8/255"`` accepted, ``8`` refused, ``0.031`` warns) plus the
        norm check (``Linf`` or ``L2``)."""
        if norm not in THREAT_NORMS:
            raise ValueError(f"unknown norm {norm!r}; valid choices: {list(THREAT_NORMS)}")
        return cls(parse_eps(eps, norm=norm, name=name), norm)

    def __str__(self) -> str:
        """RobustBench's notation: ``"8/255"`` for Linf budgets k/255, else the decimal."""
        k = as_k_over_255(self.eps)
        return f"{k}/255" if self.norm == "Linf" and k is not None else f"{self.eps:g}"


def check_budget(value: float, *, norm: str = "Linf", name: str = "eps") -> float:
    """An attack's check of an already parsed budget: a finite float >= 0 (<= 1 for Linf).

    Strings such as ``"8/255"`` are refused here: they are parsed once, where the user types
    them (:meth:`ThreatModel.parse`), and attacks take the resulting float.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"{name}={value!r}: attacks take a parsed float; parse what the user typed once "
            f"with ThreatModel.parse({value!r}).eps"
        )
    number = float(value)
    if norm == "Linf" and number > 1:
        raise ValueError(
            f"{name}={value!r} must be in [0, 1] pixel units; write {number:g}/255 if you meant "
            "0-255 units"
        )
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name}={value!r} must be a finite number >= 0")
    return number
