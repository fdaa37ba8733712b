"""Argument validators shared by every layer: one message format, naming the argument.

Each returns the (normalised) value or raises ``ValueError``/``TypeError`` with
``"<name> must be <what is accepted>, got <value>"``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

__all__ = [
    "check_choice", "check_finite_float", "check_fraction", "check_nonnegative_float",
    "check_positive_float", "check_positive_int", "check_nonnegative_int", "refuse_unknown",
]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive_int(name: str, value: Any, *, allow_none: bool = False) -> int | None:
    """An int >= 1 (or None when ``allow_none``)."""
    if value is None and allow_none:
        return None
    if not _is_int(value) or value < 1:
        expected = "a positive int or None" if allow_none else "a positive int"
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return int(value)


def check_nonnegative_int(name: str, value: Any) -> int:
    """An int >= 0."""
    if not _is_int(value) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)


def check_finite_float(name: str, value: Any) -> float:
    """Any finite real number."""
    if not _is_real(value) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite float, got {value!r}")
    return float(value)


def check_positive_float(name: str, value: Any) -> float:
    """A finite real number > 0."""
    if not _is_real(value) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite float > 0, got {value!r}")
    return float(value)


def check_nonnegative_float(name: str, value: Any) -> float:
    """A finite real number >= 0."""
    if not _is_real(value) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
    return float(value)


def check_fraction(name: str, value: Any) -> float:
    """A real number in ``[0, 1)`` (damping: the weight the old state keeps)."""
    if not _is_real(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """One of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def refuse_unknown(what: str, given: Iterable[str], known: Iterable[str]) -> None:
    """Raises ``TypeError`` naming every setting of ``given`` that is not in ``known``: a
    misspelt setting is an error, never silently ignored."""
    known = set(known)
    unknown = sorted(set(given) - known)
    if unknown:
        raise TypeError(f"{what}: unknown setting(s) {', '.join(map(repr, unknown))}; "
                        f"accepted: {', '.join(sorted(known))}")
