"""corrlab's exceptions and the small argument checks that raise them.

Every check names the argument, what was received and what was expected, so a
researcher reading the message knows what to change.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

__all__ = [
    "CorrlabError",
    "ShapeError",
    "ValueRangeError",
    "FormatError",
    "WeightsNotFoundError",
    "describe",
    "check_shape",
    "check_finite",
    "check_choice",
    "check_positive_pair",
]


class CorrlabError(ValueError):
    """Base class of every error corrlab raises on bad input."""


class ShapeError(CorrlabError):
    """An array or tensor has the wrong shape."""


class ValueRangeError(CorrlabError):
    """A value is outside its allowed range (or not finite)."""


class FormatError(CorrlabError):
    """A file on disk is truncated, foreign or of an unknown version."""


class WeightsNotFoundError(CorrlabError, FileNotFoundError):
    """Model weights are not available locally (and cannot be downloaded)."""


def describe(x: Any) -> str:
    """Short description of a value for error messages: type, shape, dtype."""
    if isinstance(x, torch.Tensor):
        return f"torch.Tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    if isinstance(x, np.ndarray):
        return f"numpy array of shape {x.shape} and dtype {x.dtype}"
    if isinstance(x, (list, tuple)):
        return f"{type(x).__name__} of length {len(x)}"
    r = repr(x)
    return f"{type(x).__name__} {r[:80]}"


def check_shape(name: str, x: Any, shape: Sequence[int | None], expected: str | None = None) -> None:
    """Raise :class:`ShapeError` unless ``x.shape`` matches ``shape`` (``None`` = any size)."""
    if not hasattr(x, "shape"):
        raise ShapeError(f"{name}: expected an array of shape {expected or tuple(shape)}, got {describe(x)}")
    s = tuple(x.shape)
    ok = len(s) == len(shape) and all(e is None or e == a for e, a in zip(shape, s))
    if not ok:
        want = expected or "(" + ", ".join("*" if e is None else str(e) for e in shape) + ")"
        raise ShapeError(f"{name}: expected shape {want}, got {describe(x)}")


def check_finite(name: str, x: Any) -> None:
    """Raise :class:`ValueRangeError` if ``x`` holds NaN or infinite values."""
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        n_bad = int((~torch.isfinite(t)).sum())
        raise ValueRangeError(f"{name}: expected finite values, got {n_bad} non-finite entries in {describe(x)}")


def is_positive_number(value: Any) -> bool:
    """True for an int or float that is positive and finite (False for bools, NaN, infinity and anything else)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value < float("inf")


def is_nonnegative_number(value: Any) -> bool:
    """True for an int or float that is >= 0 and finite (False for bools, NaN, infinity and anything else)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 <= value < float("inf")


def check_positive_pair(name: str, value: Any) -> tuple[int, int]:
    """``value`` as a pair of positive ints (e.g. a token grid or an image size); raise :class:`CorrlabError`
    for anything else (:class:`ValueRangeError` for a pair that is not positive or not integral)."""
    try:
        a, b = (int(x) for x in value)
    except (TypeError, ValueError):
        raise CorrlabError(f"{name}: expected a pair of positive integers, got {describe(value)}") from None
    if a <= 0 or b <= 0 or (a, b) != tuple(value):
        raise ValueRangeError(f"{name}: expected a pair of positive integers, got {tuple(value)!r}")
    return a, b


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise :class:`CorrlabError` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise CorrlabError(f"{name}: expected one of {list(choices)}, got {value!r}")
