"""Small helpers that make config validation errors name the value and the allowed range."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def check_range(
    name: str,
    value: float,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_inclusive: bool = True,
    hi_inclusive: bool = True,
) -> None:
    """Raise ``ValueError`` naming ``name``, ``value`` and the allowed range when out of range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r} must be a number")
    if value != value:  # NaN
        raise ValueError(f"{name}={value!r} must be a finite number")
    ok_lo = lo is None or (value >= lo if lo_inclusive else value > lo)
    ok_hi = hi is None or (value <= hi if hi_inclusive else value < hi)
    if ok_lo and ok_hi:
        return
    left = "(-inf" if lo is None else ("[" if lo_inclusive else "(") + f"{lo:g}"
    right = "inf)" if hi is None else f"{hi:g}" + ("]" if hi_inclusive else ")")
    raise ValueError(f"{name}={value!r} is out of range; allowed: {left}, {right}")


def check_int(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r} must be an integer")
    check_range(name, value, lo, hi)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    options = list(choices)
    if value not in options:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of: {', '.join(map(str, options))}")
