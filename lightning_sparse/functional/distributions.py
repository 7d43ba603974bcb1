"""Per-layer density distributions: uniform, Erdős–Rényi (ER) and Erdős–Rényi-Kernel (ERK).

Given the shapes of the sparse tensors and a global sparsity ``s``, these functions decide how many
weights each tensor keeps. ERK follows RigL's exact procedure (Evci et al. 2020, `rigl/sparse_utils.py`;
docs/algorithms.md §3b): a layer whose density would exceed 1 becomes dense and epsilon is solved again, until no
layer overflows. The total number of active weights is ``(1 - s)`` times the total size of the sparse tensors.

No Lightning import: these are pure functions usable without a Trainer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Real

DISTRIBUTIONS = ("uniform", "er", "erk")


def _validate_sparsity(sparsity: float, what: str = "sparsity") -> None:
    if not isinstance(sparsity, Real) or isinstance(sparsity, bool):
        raise TypeError(f"{what} must be a float in [0, 1), got {sparsity!r}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"{what} must be in [0, 1) (fraction of weights set to zero; 0.9 keeps 10%), got {sparsity}")


def erdos_renyi_score(shape: Sequence[int], kernel: bool = True) -> float:
    """Raw Erdős–Rényi score of one tensor: ``sum(dims) / prod(dims)`` (docs/algorithms.md §3b).

    With ``kernel=True`` (ERK) a conv weight ``(c_out, c_in, k_h, k_w)`` scores
    ``(c_out + c_in + k_h + k_w) / (c_out * c_in * k_h * k_w)``. With ``kernel=False`` (plain ER) only the
    fan-out and fan-in count: ``(c_out + c_in) / (c_out * c_in)``. A linear weight ``(out, in)`` scores the
    same either way.

    Args:
        shape: the tensor's shape; at least 2-D for ER, any non-empty shape for ERK.
        kernel: include the kernel dimensions (ERK) or not (ER).

    Returns:
        The raw score (larger means denser).
    """
    dims = [int(d) for d in shape]
    if not dims or any(d <= 0 for d in dims):
        raise ValueError(f"cannot score a tensor of shape {tuple(dims)}: every dimension must be positive")
    if not kernel:
        if len(dims) < 2:
            raise ValueError(f"ER needs a tensor with fan-out and fan-in (>= 2-D), got shape {tuple(dims)}")
        dims = dims[:2]
    return sum(dims) / math.prod(dims)


def layer_densities(
    shapes: Mapping[str, Sequence[int]],
    sparsity: float,
    distribution: str = "erk",
    *,
    power_scale: float = 1.0,
    fixed_densities: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Density of each sparse tensor for a target global sparsity.

    Args:
        shapes: tensor name -> shape, for every tensor that gets a mask.
        sparsity: target global sparsity ``s`` in [0, 1); the total number of active weights is
            ``(1 - s) * sum(numel)`` over all tensors in ``shapes``.
        distribution: ``"uniform"`` (every tensor at density ``1 - s``), ``"er"`` or ``"erk"``.
        power_scale: exponent applied to the raw ER/ERK scores (RigL's ``erk_power_scale``; 1.0 = plain ERK,
            0.0 = uniform).
        fixed_densities: tensor name -> density for tensors whose density is fixed by the user. They take
            their share of the global budget first and are left out of the epsilon fit (docs/algorithms.md §3b).

    Returns:
        Tensor name -> density in (0, 1], in the order of ``shapes``.

    Raises:
        ValueError: for an unknown distribution, an empty ``shapes``, a sparsity outside [0, 1), a fixed
            density outside (0, 1] or naming an unknown tensor, or fixed densities that alone need more
            weights than the global budget allows.

    Example::

        >>> layer_densities({"a": (4, 4), "b": (100, 100)}, 0.5, "erk")["a"]
        1.0
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; choose one of {', '.join(DISTRIBUTIONS)}")
    _validate_sparsity(sparsity)
    if (
        isinstance(power_scale, bool)
        or not isinstance(power_scale, Real)
        or not (math.isfinite(power_scale) and power_scale >= 0)
    ):
        raise ValueError(f"power_scale must be a finite number >= 0, got {power_scale!r}")
    if not shapes:
        raise ValueError("no tensors to distribute a sparsity over (shapes is empty)")
    fixed = dict(fixed_densities or {})
    unknown = sorted(set(fixed) - set(shapes))
    if unknown:
        raise ValueError(f"fixed_densities names tensors that are not sparse: {unknown}")
    for name, density in fixed.items():
        if not 0.0 < density <= 1.0:
            raise ValueError(f"fixed density of {name!r} must be in (0, 1], got {density}")

    sizes = {name: math.prod(int(d) for d in shape) for name, shape in shapes.items()}
    budget = (1.0 - sparsity) * sum(sizes.values())
    budget -= sum(fixed[name] * sizes[name] for name in fixed)
    free = [name for name in shapes if name not in fixed]
    if budget < -1e-6 or (budget <= 0 and free):
        raise ValueError(
            f"the fixed densities need {sum(fixed[n] * sizes[n] for n in fixed):.0f} active weights, which leaves "
            f"nothing of the global budget of {(1.0 - sparsity) * sum(sizes.values()):.0f} for the other tensors; "
            "lower the fixed densities or the global sparsity"
        )

    densities: dict[str, float] = dict(fixed)
    if distribution == "uniform" or power_scale == 0.0:
        free_size = sum(sizes[name] for name in free)
        density = min(1.0, budget / free_size) if free_size else 1.0
        densities.update({name: density for name in free})
        return {name: densities[name] for name in shapes}

    kernel = distribution == "erk"
    scores = {name: erdos_renyi_score(shapes[name], kernel=kernel) ** power_scale for name in free}
    dense: set[str] = set()
    # Each pass either stops or makes at least one more layer dense, so there are at most len(free) passes.
    for _ in range(len(free)):
        # epsilon * sum(score_l * N_l) over the still-sparse layers = what the budget leaves for them.
        remaining_budget = budget - sum(sizes[name] for name in dense)
        divisor = sum(scores[name] * sizes[name] for name in free if name not in dense)
        epsilon = remaining_budget / divisor
        sparse_scores = {name: scores[name] for name in free if name not in dense}
        largest = max(sparse_scores.values())
        if epsilon * largest <= 1.0:
            break
        # RigL: every layer with the maximal score becomes dense, then epsilon is solved again.
        dense.update(name for name, score in sparse_scores.items() if score >= largest)
        if len(dense) == len(free):
            break
    for name in free:
        densities[name] = 1.0 if name in dense else epsilon * scores[name]
    return {name: densities[name] for name in shapes}


def active_counts(
    shapes: Mapping[str, Sequence[int]],
    densities: Mapping[str, float],
    total: int | None = None,
    *,
    min_active: int = 1,
) -> dict[str, int]:
    """Whole numbers of active weights per tensor whose sum is exactly ``total``.

    Each tensor first gets ``floor(density * numel)``; the remaining weights go one each to the tensors with
    the largest fractional parts (largest-remainder rounding), so every tensor is within one weight of
    ``density * numel`` and the sum is exact. Tensors are never emptied: each keeps at least ``min_active``
    weights (a layer with no weight cuts the network); what that floor adds is taken back from the largest
    counts, so the sum stays ``total`` unless ``total`` is smaller than ``min_active`` per tensor.

    Args:
        shapes: tensor name -> shape.
        densities: tensor name -> density in [0, 1], for every tensor of ``shapes``.
        total: the exact total to reach; defaults to ``round(sum(density * numel))``.
        min_active: the fewest active weights a tensor may keep.

    Returns:
        Tensor name -> number of active weights.
    """
    missing = sorted(set(shapes) - set(densities))
    if missing:
        raise ValueError(f"no density given for tensors {missing}")
    sizes = {name: math.prod(int(d) for d in shape) for name, shape in shapes.items()}
    exact = {name: densities[name] * sizes[name] for name in shapes}
    if total is None:
        total = round(sum(exact.values()))
    if not 0 <= total <= sum(sizes.values()):
        raise ValueError(f"cannot place {total} active weights in tensors holding {sum(sizes.values())}")
    counts = {name: min(sizes[name], math.floor(value + 1e-9)) for name, value in exact.items()}
    remainder = total - sum(counts.values())
    if remainder < 0:
        raise ValueError(f"the densities already ask for {sum(counts.values())} weights, more than total={total}")
    order = {name: index for index, name in enumerate(shapes)}
    by_fraction = sorted(
        (name for name in shapes if counts[name] < sizes[name]),
        key=lambda name: (-(exact[name] - counts[name]), order[name]),
    )
    for name in by_fraction[:remainder]:
        counts[name] += 1
    for name in shapes:
        counts[name] = max(counts[name], min(min_active, sizes[name]))
    # The floor can add up to ``min_active`` weights per tiny tensor at extreme sparsity: take them back from
    # the largest counts, so the sum stays exactly ``total`` whenever that is possible.
    excess = sum(counts.values()) - total
    for name in sorted(counts, key=lambda n: (-counts[n], order[n])):
        if excess <= 0:
            break
        take = min(excess, counts[name] - min(min_active, sizes[name]))
        counts[name] -= take
        excess -= take
    return counts
