"""Shared argument checks: each returns the value or raises InvalidArgument naming the parameter.

``bool`` is an ``int`` in Python; a number check that let ``True`` through would accept ``bits=True``.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

from qrobust.errors import invalid


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(name: str, value, *, minimum: int | None = None, maximum: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise invalid(name, value, "must be a whole number")
    if minimum is not None and value < minimum:
        raise invalid(name, value, f"must be >= {minimum}")
    if maximum is not None and value > maximum:
        raise invalid(name, value, f"must be <= {maximum}")
    return value


def check_number(name: str, value, *, minimum: float | None = None, maximum: float | None = None) -> float:
    """A finite real number (not a bool) within the bounds, as a float."""
    if not is_number(value) or not math.isfinite(value):
        raise invalid(name, value, "must be a finite number")
    if minimum is not None and value < minimum:
        raise invalid(name, value, f"must be >= {minimum:g}")
    if maximum is not None and value > maximum:
        raise invalid(name, value, f"must be <= {maximum:g}")
    return float(value)


def check_choice(name: str, value, options: Iterable[str]) -> str:
    options = tuple(options)
    if value not in options:
        raise invalid(name, value, f"must be one of {', '.join(options)}")
    return value
