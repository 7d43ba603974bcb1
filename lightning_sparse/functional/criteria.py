"""Per-layer drop and grow criteria for dynamic sparse training.

Pure tensor functions (no Lightning): each takes one layer's weight / gradient / mask and returns new boolean
masks. They implement the building blocks of docs/algorithms.md §4c: magnitude drop (SET §4b, RigL §4a), gradient
growth (RigL §4a), random growth (SET §4b, DSR §2a) and the cosine-annealed drop fraction (RigL §4a), plus the
complete per-layer SET and RigL updates.

Selections are exact: a function asked for ``count`` positions returns exactly ``count`` of them, and ties are
broken by flat index (lowest index first), so results are identical on CPU and CUDA. Masks are never modified in
place; the functions only select positions, and zeroing weights or optimizer state is left to the caller.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_sparse.functional.channels import droppable_count, floor_protected, growth_candidates, growth_scores

__all__ = [
    "ROUNDINGS",
    "MaskUpdate",
    "cosine_drop_fraction",
    "gradient_grow",
    "magnitude_drop",
    "random_grow",
    "rigl_update",
    "set_update",
    "update_count",
]

# Guards floor(fraction * nnz) against binary rounding, e.g. 0.29 * 100 == 28.999999999999996 must give 29.
_FLOOR_EPSILON = 1e-9


class MaskUpdate(NamedTuple):
    """Result of a per-layer prune-and-regrow step (SET / RigL).

    Attributes:
        mask: The new boolean mask; it has the same number of active positions as the old one.
        dropped: Positions active before and inactive after (net change; disjoint from ``grown``).
        grown: Positions inactive before and active after (net change). New weights there should start at 0.
    """

    mask: Tensor
    dropped: Tensor
    grown: Tensor


def _check_mask(mask: Tensor, name: str = "mask") -> None:
    if not isinstance(mask, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(mask).__name__}.")
    if mask.dtype != torch.bool:
        raise TypeError(f"`{name}` must be a bool tensor, got dtype {mask.dtype}; pass `{name}.bool()`.")


def _check_same_shape(tensor: Tensor, mask: Tensor, name: str) -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(tensor).__name__}.")
    if tensor.shape != mask.shape:
        raise ValueError(f"`{name}` has shape {tuple(tensor.shape)} but the mask has shape {tuple(mask.shape)}.")


def _check_count(count: int) -> None:
    if isinstance(count, bool) or not isinstance(count, int):
        raise TypeError(f"`count` must be an int, got {type(count).__name__}.")
    if count < 0:
        raise ValueError(f"`count` must be >= 0, got {count}.")


def _candidates(mask: Tensor, excluded: Tensor | None) -> Tensor:
    """Inactive positions that are not excluded."""
    if excluded is None:
        return ~mask
    _check_mask(excluded, "excluded")
    _check_same_shape(excluded, mask, "excluded")
    return ~mask & ~excluded


def _select_smallest(scores: Tensor, eligible: Tensor, count: int) -> Tensor:
    """Boolean mask of the ``count`` eligible positions with the smallest score, ties broken by lowest flat index.

    O(N) (``kthvalue`` plus a cumulative sum over the tied values), with no host synchronisation. The caller
    guarantees ``0 < count <= eligible.sum()``.
    """
    flat = scores.reshape(-1)
    # Clamp so an eligible +inf score still sorts before the +inf sentinel of ineligible positions.
    flat = torch.where(
        eligible.reshape(-1), flat.clamp(max=torch.finfo(flat.dtype).max), torch.full_like(flat, math.inf)
    )
    kth = torch.kthvalue(flat, count).values
    below = flat < kth
    at_kth = flat == kth
    needed_from_ties = count - below.sum()
    chosen = below | (at_kth & (torch.cumsum(at_kth, dim=0) <= needed_from_ties))
    return chosen.reshape(scores.shape)


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32, so half-precision magnitudes are ranked without overflow, float64 kept as is."""
    return torch.promote_types(dtype, torch.float32)


def magnitude_drop(weight: Tensor, mask: Tensor, count: int, min_active_per_channel: int = 0) -> Tensor:
    """Deactivate the ``count`` active weights with the smallest magnitude.

    The drop criterion of SET (Mocanu et al. 2018, docs/algorithms.md §4b) and RigL (Evci et al. 2020, §4a). Ties
    in |w| are broken by flat index (lowest index dropped first), which makes the result deterministic on every
    device; RigL's code uses tiny noise instead. With ``min_active_per_channel = m > 0`` the ``m`` largest-|w|
    weights of every output channel are never dropped (:func:`~lightning_sparse.functional.channels.floor_protected`;
    docs/troubleshooting.md), so the drop cannot empty a channel.

    Args:
        weight: The layer's weight (dense storage), any shape.
        mask: Boolean mask of the same shape; True = active.
        count: Number of active weights to remove, ``0 <= count <= mask.sum()`` (and, with a floor, at most
            :func:`~lightning_sparse.functional.channels.droppable_count`).
        min_active_per_channel: The floor of active weights per output channel (dim 0); 0 = no floor.

    Returns:
        The new mask (a new tensor) with exactly ``count`` fewer active positions.

    Raises:
        TypeError: If ``mask`` is not boolean or ``count`` is not an int.
        ValueError: If shapes differ or ``count`` exceeds the number of active weights (or of droppable ones).

    Example:
        >>> w = torch.tensor([0.5, -0.1, 0.0, 0.3])
        >>> magnitude_drop(w, torch.tensor([True, True, False, True]), 1)
        tensor([ True, False, False,  True])
    """
    _check_mask(mask)
    _check_same_shape(weight, mask, "weight")
    _check_count(count)
    num_active = int(torch.count_nonzero(mask))
    if count > num_active:
        raise ValueError(f"Cannot drop {count} weights from a layer with only {num_active} active weights.")
    eligible = mask
    if min_active_per_channel:
        eligible = mask & ~floor_protected(weight, mask, min_active_per_channel)
        num_eligible = int(torch.count_nonzero(eligible))
        if count > num_eligible:
            raise ValueError(
                f"Cannot drop {count} weights while keeping {min_active_per_channel} per output channel: only "
                f"{num_eligible} are above the floor. Drop fewer, or lower min_active_per_channel."
            )
    if count == 0:
        return mask.clone()
    magnitude = weight.detach().abs().to(_score_dtype(weight.dtype))
    return mask & ~_select_smallest(magnitude, eligible, count)


def gradient_grow(
    grad: Tensor, mask: Tensor, count: int, excluded: Tensor | None = None, rule: str = "global"
) -> Tensor:
    """Activate the ``count`` inactive positions with the largest gradient magnitude.

    The growth criterion of RigL (Evci et al. 2020, docs/algorithms.md §4a) and of EAST's cyclic grow phase (§3e).
    ``grad`` must be the *dense* gradient (docs/algorithms.md §1): gradients already masked to zero at inactive
    positions carry no information. Ties in |grad| are broken by flat index (lowest index first). ``rule``
    chooses how positions are compared (:data:`~lightning_sparse.functional.channels.GROWTH_RULES`): ``"global"``
    is RigL's rule; the channel-balanced rules keep an output channel with BatchNorm-inflated gradients from taking
    more than its share (docs/troubleshooting.md).

    Args:
        grad: Dense gradient of the layer's weight, same shape as ``mask``.
        mask: Boolean mask; True = active. Active positions are never selected.
        count: Number of positions to activate.
        excluded: Optional boolean mask of inactive positions that must not be grown.
        rule: ``"global"``, ``"channel_normalized"`` or ``"channel_capped"``.

    Returns:
        The new mask (a new tensor) with exactly ``count`` more active positions.

    Raises:
        TypeError: If a mask is not boolean or ``count`` is not an int.
        ValueError: If shapes differ or ``count`` exceeds the number of candidate positions.

    Example:
        >>> g = torch.tensor([0.9, -0.2, 0.7, -0.8])
        >>> gradient_grow(g, torch.tensor([True, False, False, False]), 2)
        tensor([ True, False,  True,  True])
    """
    _check_mask(mask)
    _check_same_shape(grad, mask, "grad")
    _check_count(count)
    candidates = _candidates(mask, excluded)
    num_candidates = int(torch.count_nonzero(candidates))
    if count > num_candidates:
        raise ValueError(
            f"Cannot grow {count} weights: the layer has only {num_candidates} inactive, non-excluded positions."
        )
    if count == 0:
        return mask.clone()
    if rule == "global":
        neg_magnitude = -grad.detach().abs().to(_score_dtype(grad.dtype))
        return mask | _select_smallest(neg_magnitude, candidates, count)
    scores = growth_scores(grad, candidates, rule)
    return mask | _select_smallest(-scores, growth_candidates(scores, candidates, count, rule), count)


def random_grow(
    mask: Tensor,
    count: int,
    generator: torch.Generator | None = None,
    excluded: Tensor | None = None,
    num_candidates: int | None = None,
) -> Tensor:
    """Activate ``count`` positions drawn uniformly at random among inactive, non-excluded positions.

    The growth criterion of SET (docs/algorithms.md §4b) and DSR (§2a). Drawing is a ``randperm`` over the candidate
    list, so every subset of size ``count`` is equally likely. The random numbers are drawn on the generator's
    device (CPU when ``generator`` is None, which uses torch's default generator) and the chosen indices are
    moved to ``mask``'s device, so a CPU generator with a given seed picks the same positions for CPU and CUDA
    masks.

    Args:
        mask: Boolean mask; True = active.
        count: Number of positions to activate.
        generator: Source of randomness; pass a seeded ``torch.Generator`` for reproducible results.
        excluded: Optional boolean mask of inactive positions that must not be grown (e.g. just-pruned ones).
        num_candidates: the number of inactive, non-excluded positions, when the caller already knows it (DSR
            does, from its prune); saves a full pass over the mask. Must be exact.

    Returns:
        The new mask (a new tensor) with exactly ``count`` more active positions.

    Raises:
        TypeError: If a mask is not boolean or ``count`` is not an int.
        ValueError: If shapes differ or ``count`` exceeds the number of candidate positions.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> int(random_grow(torch.zeros(10, dtype=torch.bool), 3, g).sum())
        3
    """
    _check_mask(mask)
    _check_count(count)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"`generator` must be a torch.Generator or None, got {type(generator).__name__}.")
    candidates = _candidates(mask, excluded)
    if num_candidates is None:
        num_candidates = int(torch.count_nonzero(candidates))
    if count > num_candidates:
        raise ValueError(
            f"Cannot grow {count} weights: the layer has only {num_candidates} inactive, non-excluded positions."
        )
    new_mask = mask.clone()
    if count == 0:
        return new_mask
    draw_device = generator.device if generator is not None else torch.device("cpu")
    if count * _SPARSE_DRAW_RATIO <= num_candidates:
        chosen = _draw_distinct_candidates(candidates.reshape(-1), num_candidates, count, generator, draw_device)
    else:
        candidate_index = torch.nonzero(candidates.reshape(-1)).squeeze(1)
        picks = torch.randperm(num_candidates, generator=generator, device=draw_device)[:count]
        chosen = candidate_index[picks.to(mask.device)]
    new_mask.view(-1)[chosen] = True
    return new_mask


# random_grow draws positions one by one with rejection when it needs at most 1/4 of the candidates: O(count) work
# instead of a randperm over every candidate (1.2 s for ResNet-50's 22M inactive positions on a CPU).
_SPARSE_DRAW_RATIO = 4


def _draw_distinct_candidates(
    candidates: Tensor, num_candidates: int, count: int, generator: torch.Generator | None, draw_device: torch.device
) -> Tensor:
    """Flat indices of ``count`` distinct candidate positions, a uniformly random subset.

    Draws positions i.i.d. uniformly over the whole tensor and keeps those that are candidates, so the kept draws
    are i.i.d. uniform over the candidates. By symmetry, the set of distinct kept values is a uniformly random
    subset of the candidates given its size, and a uniformly random ``count``-subset of it (one small ``randperm``)
    is therefore a uniformly random ``count``-subset of the candidates. Deterministic given the generator's state.
    """
    numel = candidates.numel()
    distinct = torch.empty(0, dtype=torch.int64, device=candidates.device)
    while distinct.numel() < count:
        missing = count - distinct.numel()
        # Enough draws for the expected rejections and repeats, plus a margin; rarely more than one round.
        num_draws = int(missing * numel / num_candidates * 1.3) + 64
        draws = torch.randint(0, numel, (num_draws,), generator=generator, device=draw_device).to(candidates.device)
        distinct = torch.unique(torch.cat([distinct, draws[candidates[draws]]]))
    keep = torch.randperm(distinct.numel(), generator=generator, device=draw_device)[:count]
    return distinct[keep.to(distinct.device)]


def cosine_drop_fraction(step: int, end_step: int, initial: float = 0.3, floor: float = 0.0) -> float:
    """Cosine-annealed drop fraction ``f(t) = floor + (initial - floor)/2 * (1 + cos(pi * t / T_end))``.

    With ``floor = 0`` this is RigL's schedule (Evci et al. 2020, docs/algorithms.md §4a; the default ``initial`` is
    RigL's alpha = 0.3), 0 from ``end_step`` on. EAST's code anneals 0.5 to a floor of 0.005 over the whole run
    (``initial=0.5, floor=0.005``, docs/algorithms.md §3a, §3e), and keeps the floor from ``end_step`` on.

    Args:
        step: Current training step t (>= 0).
        end_step: T_end, the step at which the fraction reaches ``floor`` (> 0).
        initial: The fraction alpha at step 0, in [0, 1].
        floor: The fraction at and after ``end_step``, in [0, ``initial``].

    Returns:
        The drop fraction at ``step``.

    Raises:
        ValueError: If ``step < 0``, ``end_step <= 0``, ``initial`` is outside [0, 1] or ``floor`` outside
            [0, ``initial``].

    Example:
        >>> cosine_drop_fraction(50, 100, 0.3)
        0.15
        >>> cosine_drop_fraction(50, 100, 0.5, floor=0.005)
        0.2525
    """
    if step < 0:
        raise ValueError(f"`step` must be >= 0, got {step}.")
    if end_step <= 0:
        raise ValueError(f"`end_step` must be > 0, got {end_step}.")
    if not 0.0 <= initial <= 1.0:
        raise ValueError(f"`initial` drop fraction must be in [0, 1], got {initial}.")
    if not 0.0 <= floor <= initial:
        raise ValueError(f"`floor` of the drop fraction must be in [0, initial={initial}], got {floor}.")
    if step >= end_step:
        return floor
    return floor + (initial - floor) / 2.0 * (1.0 + math.cos(math.pi * step / end_step))


ROUNDINGS = ("floor", "ceil")
"""How a drop fraction becomes a count: RigL's and SET's ``floor(f * nnz)``, or EAST's code's ``ceil(f * nnz)``."""


def update_count(nnz: int, drop_fraction: float, rounding: str = "floor") -> int:
    """The number of weights to replace: ``floor(drop_fraction * nnz)`` or ``ceil(drop_fraction * nnz)``.

    RigL and SET round down (docs/algorithms.md §4a, §4b); EAST's code rounds up (§3a), so every layer swaps at least one
    weight at every update while the fraction is above 0. Both are guarded against binary rounding
    (``0.29 * 100`` gives 29 either way).

    Raises:
        ValueError: for a fraction outside [0, 1] or an unknown rounding.

    Example:
        >>> update_count(10, 0.005), update_count(10, 0.005, "ceil"), update_count(100, 0.29, "ceil")
        (0, 1, 29)
    """
    if not 0.0 <= drop_fraction <= 1.0:
        raise ValueError(f"`drop_fraction` must be in [0, 1], got {drop_fraction}.")
    if rounding == "floor":
        return math.floor(drop_fraction * nnz + _FLOOR_EPSILON)
    if rounding == "ceil":
        return math.ceil(drop_fraction * nnz - _FLOOR_EPSILON)
    raise ValueError(f"`rounding` must be one of {ROUNDINGS}, got {rounding!r}.")


def _update_count(mask: Tensor, drop_fraction: float, rounding: str = "floor") -> int:
    """k = floor (or ceil) of drop_fraction * nnz for one layer."""
    return update_count(int(torch.count_nonzero(mask)), drop_fraction, rounding)


def _net_update(old_mask: Tensor, new_mask: Tensor) -> MaskUpdate:
    return MaskUpdate(mask=new_mask, dropped=old_mask & ~new_mask, grown=new_mask & ~old_mask)


def set_update(
    weight: Tensor,
    mask: Tensor,
    drop_fraction: float,
    generator: torch.Generator | None = None,
    min_active_per_channel: int = 0,
) -> MaskUpdate:
    """One SET prune-and-regrow step for one layer, as re-implemented by DSR (docs/algorithms.md §4b, §2b).

    Drops k = floor(drop_fraction * nnz) active weights with the smallest |w|, then activates k positions drawn
    uniformly at random among the positions that were inactive before the update (the just-dropped ones are
    excluded). The layer's number of active weights is unchanged. With a floor of ``m`` active weights per output
    channel, the ``m`` largest-|w| weights of each channel are kept and k is at most the number above the floor.

    Args:
        weight: The layer's weight.
        mask: Boolean mask of the same shape; True = active.
        drop_fraction: The fraction zeta of active weights to replace, in [0, 1].
        generator: Source of randomness for the regrowth (see :func:`random_grow`).
        min_active_per_channel: The floor of active weights per output channel; 0 = none (SET's rule).

    Returns:
        ``MaskUpdate(mask, dropped, grown)``; ``dropped`` and ``grown`` are disjoint and of equal size k.

    Raises:
        ValueError: If ``drop_fraction`` is outside [0, 1], or the layer has fewer than k inactive positions
            (it is too dense to regrow without reusing the just-dropped ones).

    Example:
        >>> w = torch.tensor([0.5, -0.1, 0.0, 0.3])
        >>> update = set_update(w, torch.tensor([True, True, False, True]), 0.34, torch.Generator().manual_seed(0))
        >>> update.dropped, update.grown
        (tensor([False,  True, False, False]), tensor([False, False,  True, False]))
    """
    _check_mask(mask)
    count = _update_count(mask, drop_fraction)
    if min_active_per_channel:
        count = min(count, droppable_count(mask, min_active_per_channel))
    kept = magnitude_drop(weight, mask, count, min_active_per_channel)
    new_mask = random_grow(kept, count, generator, excluded=mask)
    return _net_update(mask, new_mask)


def rigl_update(
    weight: Tensor,
    grad: Tensor,
    mask: Tensor,
    drop_fraction: float,
    min_active_per_channel: int = 0,
    growth_rule: str = "global",
    rounding: str = "floor",
) -> MaskUpdate:
    """One RigL prune-and-regrow step for one layer (Evci et al. 2020, docs/algorithms.md §4a).

    Drops k = floor(drop_fraction * nnz) active weights with the smallest |w|, then activates the k positions
    with the largest |grad| among all positions not kept (the just-dropped ones are eligible; a dropped and
    regrown position appears in neither ``dropped`` nor ``grown`` and keeps its value, as in RigL's code). The
    layer's number of active weights is unchanged. The defaults are RigL's rule; the channel-safe options
    (docs/troubleshooting.md) keep ``min_active_per_channel`` weights in every output channel (k is then at most
    the number above the floor) and rank growth by ``growth_rule``; ``rounding="ceil"`` is EAST's code's count
    (docs/algorithms.md §3a).

    Args:
        weight: The layer's weight.
        grad: The dense gradient of the weight for the current minibatch.
        mask: Boolean mask; True = active.
        drop_fraction: The fraction of active weights to replace, e.g. from :func:`cosine_drop_fraction`.
        min_active_per_channel: The floor of active weights per output channel; 0 = none (RigL's rule).
        growth_rule: One of :data:`~lightning_sparse.functional.channels.GROWTH_RULES`; ``"global"`` is RigL's.
        rounding: ``"floor"`` (RigL) or ``"ceil"`` (EAST's code), see :func:`update_count`.

    Returns:
        ``MaskUpdate(mask, dropped, grown)`` with net changes; ``dropped`` and ``grown`` have equal size <= k.

    Raises:
        ValueError: If ``drop_fraction`` is outside [0, 1] or shapes differ.

    Example:
        >>> w = torch.tensor([0.5, -0.1, 0.0, 0.3])
        >>> g = torch.tensor([0.0, 0.1, 0.9, 0.0])
        >>> rigl_update(w, g, torch.tensor([True, True, False, True]), 0.34).mask
        tensor([ True, False,  True,  True])
    """
    _check_mask(mask)
    count = _update_count(mask, drop_fraction, rounding)
    if min_active_per_channel:
        count = min(count, droppable_count(mask, min_active_per_channel))
    kept = magnitude_drop(weight, mask, count, min_active_per_channel)
    new_mask = gradient_grow(grad, kept, count, rule=growth_rule)
    return _net_update(mask, new_mask)
