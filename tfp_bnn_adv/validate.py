"""Boundary checks for every public argument, in one message style.

Each check takes the value and the argument's name, returns the value in its
canonical Python type, and raises before any work starts:

* ``TypeError`` when the value has the wrong type:
  ``"<name> must be an int, got 2.5 (float)."``
* ``ValueError`` when it has the right type but is out of range:
  ``"<name> must be >= 1, got 0."``

Bools are refused wherever a number is asked (``True`` is an ``int`` to
Python, never a count to a user); numpy scalars are accepted. Checks that
need a module's own types (labels against a network's classes, inputs against
its input shape) live beside those types and use these for their scalars.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any, Iterable, Sequence

import numpy as np

__all__ = ["integer", "positive_int", "optional_positive_int", "int_sequence",
           "real", "positive_real", "nonnegative_real", "fraction", "choice",
           "seed_int", "instance", "directory", "type_name"]

# Seeds that ``tf.random`` and ``numpy`` both accept as one int32 word.
SEED_LIMIT = 2**31


def type_name(value: Any) -> str:
    """The name shown for ``value``'s type in messages."""
    return type(value).__name__


def _is_int(value) -> bool:
    return isinstance(value, (numbers.Integral, np.integer)) and not isinstance(
        value, (bool, np.bool_))


def _is_real(value) -> bool:
    return isinstance(value, (numbers.Real, np.floating, np.integer)) and (
        not isinstance(value, (bool, np.bool_)))


def _range_error(name: str, value, minimum, maximum, min_open=False,
                 max_open=False) -> ValueError:
    if minimum is not None and maximum is not None:
        lo, hi = "(" if min_open else "[", ")" if max_open else "]"
        what = f"in {lo}{minimum}, {maximum}{hi}"
    elif minimum is not None:
        what = f"> {minimum}" if min_open else f">= {minimum}"
    else:
        what = f"< {maximum}" if max_open else f"<= {maximum}"
    return ValueError(f"{name} must be {what}, got {value!r}.")


def integer(value, name: str, *, minimum: int | None = None,
            maximum: int | None = None) -> int:
    """``value`` as a Python int in ``[minimum, maximum]`` (bounds optional)."""
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {value!r} "
                        f"({type_name(value)}).")
    if (minimum is not None and value < minimum) or (
            maximum is not None and value > maximum):
        raise _range_error(name, value, minimum, maximum)
    return int(value)


def positive_int(value, name: str) -> int:
    """``value`` as an int ``>= 1``."""
    return integer(value, name, minimum=1)


def optional_positive_int(value, name: str) -> int | None:
    """``None``, or ``value`` as an int ``>= 1``."""
    return None if value is None else positive_int(value, name)


def int_sequence(values: Iterable, name: str, *, minimum: int = 1,
                 allow_empty: bool = False) -> tuple[int, ...]:
    """A sequence of ints ``>= minimum`` as a tuple (a bare int is refused)."""
    if isinstance(values, (str, bytes)) or not isinstance(
            values, (Sequence, np.ndarray)):
        raise TypeError(f"{name} must be a sequence of ints, got {values!r} "
                        f"({type_name(values)}).")
    out = tuple(integer(v, f"{name}[{i}]", minimum=minimum)
                for i, v in enumerate(values))
    if not out and not allow_empty:
        raise ValueError(f"{name} must not be empty, got {values!r}.")
    return out


def real(value, name: str, *, minimum: float | None = None,
         maximum: float | None = None, min_open: bool = False,
         max_open: bool = False) -> float:
    """``value`` as a finite float, optionally within bounds.

    ``min_open`` / ``max_open`` make a bound exclusive.
    """
    if not _is_real(value):
        raise TypeError(f"{name} must be a real number, got {value!r} "
                        f"({type_name(value)}).")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    if minimum is not None and (v <= minimum if min_open else v < minimum):
        raise _range_error(name, value, minimum, maximum, min_open, max_open)
    if maximum is not None and (v >= maximum if max_open else v > maximum):
        raise _range_error(name, value, minimum, maximum, min_open, max_open)
    return v


def positive_real(value, name: str) -> float:
    """``value`` as a finite float ``> 0``."""
    if not _is_real(value):
        raise TypeError(f"{name} must be a real number, got {value!r} "
                        f"({type_name(value)}).")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
    return float(value)


def nonnegative_real(value, name: str) -> float:
    """``value`` as a finite float ``>= 0``."""
    if not _is_real(value):
        raise TypeError(f"{name} must be a real number, got {value!r} "
                        f"({type_name(value)}).")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}.")
    return float(value)


def fraction(value, name: str) -> float:
    """``value`` as a float in ``[0, 1)`` (a held-out share, say)."""
    return real(value, name, minimum=0.0, maximum=1.0, max_open=True)


def value_range(value, name: str = "clip", *, optional: bool = True
                ) -> tuple[float, float] | None:
    """A data range ``(low, high)`` with ``low < high`` (``None`` if
    ``optional``), as floats."""
    if value is None and optional:
        return None
    try:
        lo, hi = value
    except (TypeError, ValueError):
        what = "None or a pair" if optional else "a pair"
        raise TypeError(f"{name} must be {what} (low, high), got "
                        f"{value!r}.") from None
    lo, hi = real(lo, f"{name}[0]"), real(hi, f"{name}[1]")
    if not lo < hi:
        raise ValueError(f"{name} must satisfy low < high, got {value!r}.")
    return lo, hi


def choice(value, choices: Sequence, name: str):
    """``value`` if it is one of ``choices`` (compared by equality)."""
    is_bool = isinstance(value, (bool, np.bool_))
    try:
        ok = value in choices
    except TypeError:  # an unhashable value against a set of choices
        ok = False
    # False == 0 and True == 1: a bool counts only where a choice is a bool.
    if not ok or (is_bool and not any(isinstance(c, bool) for c in choices)):
        raise ValueError(f"{name} must be one of {tuple(choices)}, got "
                         f"{value!r}.")
    return value


def seed_int(value, name: str = "seed") -> int:
    """An integer seed in ``[0, 2**31)``."""
    return integer(value, name, minimum=0, maximum=SEED_LIMIT - 1)


def instance(value, cls: type | tuple[type, ...], name: str):
    """``value`` if it is an instance of ``cls``, else a TypeError."""
    if not isinstance(value, cls):
        want = (" or ".join(c.__name__ for c in cls) if isinstance(cls, tuple)
                else cls.__name__)
        raise TypeError(f"{name} must be a {want}, got {type_name(value)}.")
    return value


def directory(path, name: str, *, optional: bool = False) -> str | None:
    """``path`` if it is a writable directory or can become one.

    Nothing is created. ``path`` need not exist; then its nearest existing
    ancestor must be a writable directory.

    Args:
      path: a ``str`` or ``os.PathLike``; ``None`` only if ``optional``.
      name: what to call it in the message (``"checkpoint_dir"``,
        ``"--output_dir"``).
      optional: whether ``None`` (no directory) is allowed.

    Returns:
      ``os.fspath(path)``, or ``None``.

    Raises:
      TypeError: if ``path`` is not a path (or ``None`` when optional).
      ValueError: if it is empty, is an existing file, lies under one, or
        its nearest existing ancestor is not writable; the message names
        ``name``, ``path`` and the offending ancestor.
    """
    if path is None and optional:
        return None
    if not isinstance(path, (str, os.PathLike)):
        alt = " or None" if optional else ""
        raise TypeError(f"{name} must be a directory path{alt}, got {path!r} "
                        f"({type_name(path)}).")
    path = os.fspath(path)
    if not path:
        raise ValueError(f"{name} must be a non-empty directory path, got "
                         "''.")
    probe = os.path.abspath(path)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        what = ("is an existing file" if probe == os.path.abspath(path)
                else f"lies under {probe!r}, an existing file")
        raise ValueError(f"{name}={path!r} cannot be a directory: it {what}.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{name}={path!r}: {probe!r} is not writable.")
    return path
