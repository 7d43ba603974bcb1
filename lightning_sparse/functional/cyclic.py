"""EAST cyclic sparsity: the global density target over a sequence of cycles.

Pure functions implementing docs/algorithms.md §3e (Li et al. 2024, as in the authors' ES2 code): within each cycle the
density rises from the budget ``d_min`` to ``d_max`` at mid-cycle and falls back, so the network grows for the
first half and prunes for the second. After the last cycle training continues at the budget density. The step
unit (optimizer steps or epochs) is the caller's choice, as long as it is used consistently.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["cycle_lengths", "cycle_position", "cyclic_density"]

_SHAPES = ("cosine", "triangular")


def cyclic_density(position: float, d_min: float, d_max: float, shape: str = "cosine") -> float:
    """Density target at ``position`` p within a cycle.

    docs/algorithms.md §3e: cosine ``d_min + (d_max - d_min) * 0.5 * (1 - cos(2*pi*p))``, triangular
    ``d_min + (d_max - d_min) * (1 - |2p - 1|)``. Both start and end at ``d_min`` and peak at ``d_max`` at p = 0.5.

    Args:
        position: p in [0, 1], the fraction of the current cycle elapsed.
        d_min: The budget density d' (> 0).
        d_max: The peak density, ``d_min <= d_max <= 1`` (EAST uses 3 * d').
        shape: ``"cosine"`` (EAST default) or ``"triangular"``.

    Returns:
        The target global density.

    Raises:
        ValueError: If ``position`` is outside [0, 1], the densities are out of order or range, or ``shape`` is
            unknown.

    Example:
        >>> round(cyclic_density(0.5, 0.0019, 0.0057), 6)
        0.0057
    """
    if not 0.0 <= position <= 1.0:
        raise ValueError(f"`position` must be in [0, 1], got {position}.")
    if not 0.0 < d_min <= d_max <= 1.0:
        raise ValueError(f"Densities must satisfy 0 < d_min <= d_max <= 1, got d_min={d_min}, d_max={d_max}.")
    if shape == "cosine":
        rise = 0.5 * (1.0 - math.cos(2.0 * math.pi * position))
    elif shape == "triangular":
        rise = 1.0 - abs(2.0 * position - 1.0)
    else:
        raise ValueError(f"`shape` must be one of {_SHAPES}, got {shape!r}.")
    return d_min + (d_max - d_min) * rise


def cycle_lengths(first: int, cycles: int, multiplier: float = 1.0) -> list[int]:
    """Lengths of the cycles: ``first * multiplier**c`` for c = 0 .. cycles - 1, rounded to integers.

    docs/algorithms.md §3e: ES2's ``cyclic_length`` (50 epochs), ``num_cycles`` (2) and ``cyclic_length_multiplier``
    (default 1.0; an earlier ES2 version hard-coded 2.0).

    Args:
        first: Length of the first cycle (>= 1).
        cycles: Number of cycles (>= 0).
        multiplier: Growth factor of each later cycle (> 0).

    Returns:
        The cycle lengths, each at least 1.

    Raises:
        ValueError: If an argument is out of range.

    Example:
        >>> cycle_lengths(50, 2, 2.0)
        [50, 100]
    """
    if first < 1:
        raise ValueError(f"`first` cycle length must be >= 1, got {first}.")
    if cycles < 0:
        raise ValueError(f"`cycles` must be >= 0, got {cycles}.")
    if not multiplier > 0:
        raise ValueError(f"`multiplier` must be > 0, got {multiplier}.")
    return [max(1, round(first * multiplier**cycle)) for cycle in range(cycles)]


def cycle_position(step: int, cycle_lengths: Sequence[int]) -> tuple[int, float] | None:
    """Which cycle ``step`` falls in and how far into it.

    Cycles run back to back from step 0 (docs/algorithms.md §3e).

    Args:
        step: Current step (>= 0), in the same unit as ``cycle_lengths``.
        cycle_lengths: Length of each cycle (each >= 1), e.g. from :func:`cycle_lengths`.

    Returns:
        ``(cycle_index, position)`` with position p in [0, 1), or None once ``step`` is past the last cycle.

    Raises:
        ValueError: If ``step`` is negative or a cycle length is < 1.

    Example:
        >>> cycle_position(75, [50, 100])
        (1, 0.25)
    """
    if step < 0:
        raise ValueError(f"`step` must be >= 0, got {step}.")
    start = 0
    for index, length in enumerate(cycle_lengths):
        if length < 1:
            raise ValueError(f"Every cycle length must be >= 1, got {list(cycle_lengths)}.")
        if step < start + length:
            return index, (step - start) / length
        start += length
    return None
