"""Argument checks shared by every callback's ``__init__``: one place for the messages a user sees.

Every check takes the value and the argument's name, returns the value in its canonical Python type (so a
``numpy.float32`` sparsity becomes a ``float`` and a ``numpy.int64`` seed an ``int``), and raises a ``TypeError``
for a value of the wrong kind or a ``ValueError`` for one out of range, naming the argument and what to pass
instead. Closed sets of strings are ``typing.Literal`` aliases, so that LightningCLI / jsonargparse checks them
when the config is parsed and ``--help`` lists the choices; :func:`check_choice` repeats the check for Python
callers. No Lightning import.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any, Literal, get_args

__all__ = [
    "CycleShape",
    "Distribution",
    "GrowthRule",
    "Method",
    "Rounding",
    "check_choice",
    "check_int",
    "check_patterns",
    "check_real",
    "check_seed",
    "check_sparsity",
]

Distribution = Literal["uniform", "er", "erk"]
"""How a density budget is shared among tensors (docs/algorithms.md §3b)."""

CycleShape = Literal["cosine", "triangular"]
"""The shapes of EAST's density cycles (docs/algorithms.md §3e)."""

Method = Literal["dsr", "set", "rigl"]
"""The topology-update methods of DynamicReallocation (docs/algorithms.md §2a, §4a, §4b)."""

GrowthRule = Literal["global", "channel_normalized", "channel_capped"]
"""How gradient growth ranks candidate positions (lightning_sparse.functional.channels.GROWTH_RULES)."""

Rounding = Literal["floor", "ceil"]
"""How a drop fraction becomes a count: RigL's and SET's floor, EAST's code's ceil (docs/algorithms.md §3a)."""

_SEED_RANGE = (0, 2**64)  # torch.Generator.manual_seed accepts [0, 2**64) (and negatives wrapped; we refuse those)


def check_choice(value: Any, name: str, choices: Any) -> str:
    """Check that ``value`` is one of the strings of the ``Literal`` type ``choices``.

    Raises:
        ValueError: naming the choices.
    """
    allowed = get_args(choices)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in allowed)}, got {value!r}")
    return value


def check_int(value: Any, name: str, *, minimum: int | None = None, what: str = "") -> int:
    """An integer (``int`` or any ``numbers.Integral`` such as ``numpy.int64``; not a bool) ``>= minimum``.

    Raises:
        TypeError: for a bool, a float or a non-number.
        ValueError: below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}{what}, got {value}")
    return value


def check_real(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    what: str = "",
) -> float:
    """A finite real number (``int``, ``float``, ``numpy.float32``, ...; not a bool) within the given bounds.

    Args:
        value: the value.
        name: the argument's name, for the message.
        low, high: the bounds (``None``: unbounded).
        low_open, high_open: whether the bound itself is excluded.
        what: a few words on what the number means, added to the range error.

    Returns:
        ``float(value)``.

    Raises:
        TypeError: for a bool or a non-number.
        ValueError: for ``nan``, an infinity, or a value out of range.
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if not math.isfinite(value) or too_low or too_high:
        left = "(-inf" if low is None else ("(" if low_open else "[") + f"{low:g}"
        right = "inf)" if high is None else f"{high:g}" + (")" if high_open else "]")
        raise ValueError(f"{name} must be in {left}, {right}{what}, got {value}")
    return value


def check_sparsity(value: Any, name: str = "sparsity") -> float:
    """A sparsity in [0, 1): the fraction of weights that are zero (any real number type)."""
    return check_real(
        value, name, low=0.0, high=1.0, high_open=True, what=" (fraction of weights set to zero; 0.9 keeps 10%)"
    )


def check_seed(value: Any, name: str = "seed") -> int:
    """A seed torch's generators accept: an integer in [0, 2**64).

    Raises:
        TypeError: for a bool, a float or a string (``0.5``, ``"a"``).
        ValueError: out of range (``-1``, ``2**70``).
    """
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int in [0, 2**64), got {value!r} ({type(value).__name__})")
    value = int(value)
    if not _SEED_RANGE[0] <= value < _SEED_RANGE[1]:
        raise ValueError(f"{name} must be in [0, 2**64) (what torch.Generator.manual_seed accepts), got {value}")
    return value


def check_patterns(value: Any, name: str) -> list[str] | None:
    """Glob patterns over parameter names: ``None``, one pattern as a string, or a list of strings.

    One string is one pattern (``"net.conv*"``), never split into characters.

    Raises:
        TypeError: for anything else, or a list holding a non-string.
    """
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Sequence) or not all(isinstance(item, str) for item in value):
        raise TypeError(f'{name} must be a glob pattern or a list of them, e.g. ["layer*.conv*.weight"], got {value!r}')
    return list(value) or None
