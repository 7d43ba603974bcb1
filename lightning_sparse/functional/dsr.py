"""Dynamic Sparse Reparameterization (Mostafa & Wang, ICML 2019): global-threshold prune, proportional regrowth.

Pure tensor functions (no Lightning) implementing docs/algorithms.md §2a step by step:

1. :func:`dsr_prune` removes every active weight with |w| < H, H one global threshold;
2. :func:`allocate_growth` shares the freed count among layers in proportion to their surviving weights R_l;
3. :func:`grow_random` activates that many positions per layer uniformly at random, skipping just-pruned ones;
4. :func:`adapt_threshold` halves or doubles H so the next prune count lands near the target Np.

:func:`dsr_reallocate` chains the four. The functions select mask positions only; zeroing inactive weights
(and, optionally, the momentum of grown positions, docs/algorithms.md §2d.2) is the caller's job.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_sparse.functional.channels import floor_rescued
from lightning_sparse.functional.criteria import random_grow

__all__ = [
    "DSRResult",
    "adapt_threshold",
    "allocate_growth",
    "dsr_prune",
    "dsr_reallocate",
    "grow_random",
]


def _check_masks(masks: Sequence[Tensor], name: str = "masks") -> None:
    if len(masks) == 0:
        raise ValueError(f"`{name}` is empty; pass one boolean mask per sparse layer.")
    for index, mask in enumerate(masks):
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            found = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
            raise TypeError(f"`{name}[{index}]` must be a bool tensor, got {found}.")


def _check_paired(reference: Sequence[Tensor], other: Sequence[Tensor], name: str) -> None:
    if len(other) != len(reference):
        raise ValueError(f"`{name}` has {len(other)} entries but there are {len(reference)} masks.")
    for index, (mask, tensor) in enumerate(zip(reference, other)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"`{name}[{index}]` must be a torch.Tensor, got {type(tensor).__name__}.")
        if tensor.shape != mask.shape:
            raise ValueError(
                f"`{name}[{index}]` has shape {tuple(tensor.shape)} but mask {index} has shape {tuple(mask.shape)}."
            )


def dsr_prune(
    weights: Sequence[Tensor], masks: Sequence[Tensor], threshold: float, min_active_per_channel: int = 0
) -> tuple[list[Tensor], list[Tensor]]:
    """Prune every active weight whose magnitude is strictly below one global threshold H.

    Mostafa & Wang 2019, docs/algorithms.md §2a step (1) and §2d.5. A layer is never emptied: if all its active
    weights fall below H, the one with the largest |w| is kept (lowest flat index on ties). Thresholding
    only, no sort; no host synchronisation. With ``min_active_per_channel = m > 0`` the ``m`` largest-|w|
    weights of every output channel are kept whatever H (examined only in the channels H would take below the
    floor; docs/troubleshooting.md).

    Args:
        weights: One weight tensor per sparse layer.
        masks: One boolean mask per layer, same shapes as ``weights``; True = active.
        threshold: The global magnitude threshold H (>= 0). ``|w| == H`` is kept.
        min_active_per_channel: The floor of active weights per output channel (dim 0); 0 = none (DSR's rule).

    Returns:
        ``(kept_masks, pruned_masks)``: the masks after pruning, and the positions pruned in this step.

    Raises:
        TypeError: If a mask is not boolean.
        ValueError: If the lists differ in length or shapes, or ``threshold`` is negative or not finite.

    Example:
        >>> kept, pruned = dsr_prune([torch.tensor([0.5, -0.001, 0.002])], [torch.ones(3, dtype=torch.bool)], 0.002)
        >>> kept[0], pruned[0]
        (tensor([ True, False,  True]), tensor([False,  True, False]))
    """
    _check_masks(masks)
    _check_paired(masks, weights, "weights")
    if not math.isfinite(threshold) or threshold < 0:
        raise ValueError(f"`threshold` must be a finite number >= 0, got {threshold}.")
    pruned_masks: list[Tensor] = []
    survivor_counts: list[Tensor] = []
    for weight, mask in zip(weights, masks):
        # float32 at least, so H is not rounded to half precision in the comparison.
        magnitude = weight.detach().abs().to(torch.promote_types(weight.dtype, torch.float32))
        pruned = mask & (magnitude < threshold)
        if min_active_per_channel:
            pruned = floor_rescued(magnitude, mask, pruned, min_active_per_channel)
        pruned_masks.append(pruned)
        survivor_counts.append((torch.count_nonzero(mask) - torch.count_nonzero(pruned)).cpu())
    # One host sync for all layers; the (rare) layers that would be emptied are then rescued one by one.
    for index in torch.nonzero(torch.stack(survivor_counts) == 0).flatten().tolist():
        mask, pruned = masks[index], pruned_masks[index]
        if not bool(mask.any()):
            continue
        # Keep the active weight of largest |w| (argmax returns the first maximum).
        magnitude = weights[index].detach().abs().to(torch.promote_types(weights[index].dtype, torch.float32))
        scores = torch.where(mask, magnitude, torch.full_like(magnitude, -math.inf)).reshape(-1)
        rescued = torch.zeros_like(mask).reshape(-1)
        rescued[scores.argmax()] = True
        pruned_masks[index] = pruned & ~rescued.reshape(mask.shape)
    kept_masks = [mask ^ pruned for mask, pruned in zip(masks, pruned_masks)]  # pruned is a subset of mask
    return kept_masks, pruned_masks


def adapt_threshold(threshold: float, num_pruned: int, target: int, tolerance: float = 0.1) -> float:
    """Multiplicatively adapt the global DSR threshold towards the target prune count Np.

    Mostafa & Wang 2019, docs/algorithms.md §2a step (3): H / 2 if more than (1 + delta) * Np weights were pruned,
    2 * H if fewer than (1 - delta) * Np, unchanged inside the band (both band edges count as inside).

    Args:
        threshold: The current threshold H (> 0).
        num_pruned: K, the number of weights pruned at this reallocation (>= 0).
        target: Np, the target number of prunes per reallocation (>= 0).
        tolerance: delta, the fractional tolerance (>= 0); the paper uses 0.1.

    Returns:
        The threshold to use at the next reallocation.

    Raises:
        ValueError: If ``threshold <= 0`` or not finite, or ``num_pruned``, ``target`` or ``tolerance`` is negative.

    Example:
        >>> adapt_threshold(1e-3, 30_000, 20_000)
        0.0005
    """
    if not math.isfinite(threshold) or threshold <= 0:
        raise ValueError(f"`threshold` must be a finite number > 0 (H is adapted multiplicatively), got {threshold}.")
    if num_pruned < 0 or target < 0:
        raise ValueError(f"`num_pruned` and `target` must be >= 0, got {num_pruned} and {target}.")
    if tolerance < 0:
        raise ValueError(f"`tolerance` must be >= 0, got {tolerance}.")
    upper = (1.0 + tolerance) * target
    lower = (1.0 - tolerance) * target
    # isclose keeps the band edges inside despite binary rounding, e.g. (1 + 0.1) * 10 == 11.000000000000002.
    if num_pruned > upper and not math.isclose(num_pruned, upper, rel_tol=1e-9):
        return threshold / 2.0
    if num_pruned < lower and not math.isclose(num_pruned, lower, rel_tol=1e-9):
        return threshold * 2.0
    return threshold


def _check_counts(tensor: Tensor, name: str) -> None:
    if not isinstance(tensor, Tensor) or tensor.dim() != 1:
        raise ValueError(f"`{name}` must be a 1-D tensor with one entry per layer.")
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise TypeError(f"`{name}` must be an integer tensor (e.g. int64), got {tensor.dtype}.")
    if bool((tensor < 0).any()):
        raise ValueError(f"`{name}` must be >= 0 everywhere, got {tensor.tolist()}.")


def _apportion(amount: int, weights: Tensor, generator: torch.Generator | None) -> Tensor:
    """Largest-remainder (Hamilton) apportionment of ``amount`` in proportion to integer ``weights``.

    Exact integer arithmetic: the quota of layer l is amount * w_l / W; everyone gets the floor, and the leftover
    units go to the largest remainders, ties broken in a random order drawn from ``generator``. Layers with
    weight 0 get 0.
    """
    total_weight = int(weights.sum())
    scaled = amount * weights
    shares = scaled // total_weight
    remainders = scaled % total_weight
    leftover = amount - int(shares.sum())
    if leftover > 0:
        draw_device = generator.device if generator is not None else torch.device("cpu")
        random_order = torch.randperm(weights.numel(), generator=generator, device=draw_device).cpu()
        by_remainder = torch.argsort(remainders[random_order], descending=True, stable=True)
        shares[random_order[by_remainder[:leftover]]] += 1
    return shares


def allocate_growth(
    total: int, survivors: Tensor, free_slots: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """Share ``total`` regrown weights among layers in proportion to their surviving weights, within free slots.

    Mostafa & Wang 2019, docs/algorithms.md §2a step (2) and §2d.5. Each pass apportions what is left to the layers
    that still have free slots, in proportion to survivors R_l, by largest remainder (ties in random order drawn
    from ``generator``; DSR's code instead gives the whole rounding remainder to one random layer). Layers whose
    share exceeds their free slots are filled, and their shortfall goes round again. Every pass either places
    everything or fills at least one layer, so there are at most L passes.

    Layers with zero survivors get nothing while a layer with survivors has room; once every such layer is full,
    the rest is shared among the remaining open layers in proportion to their free slots.

    Args:
        total: Number of weights to regrow (K, the number pruned), >= 0.
        survivors: int64 tensor [L], R_l = active weights per layer after pruning.
        free_slots: int64 tensor [L], positions each layer may grow into (inactive, not pruned this step).
        generator: Source of randomness for tie-breaking; None uses torch's default generator.

    Returns:
        int64 tensor [L] on ``survivors``' device with ``result <= free_slots`` and ``result.sum() == total``.

    Raises:
        TypeError: If ``survivors`` or ``free_slots`` is not an integer tensor.
        ValueError: If shapes differ, any count is negative, or ``total > free_slots.sum()``.

    Example:
        >>> allocate_growth(10, torch.tensor([1, 3, 6]), torch.tensor([0, 100, 100]))
        tensor([0, 3, 7])
    """
    if isinstance(total, bool) or not isinstance(total, int):
        raise TypeError(f"`total` must be an int, got {type(total).__name__}.")
    if total < 0:
        raise ValueError(f"`total` must be >= 0, got {total}.")
    _check_counts(survivors, "survivors")
    _check_counts(free_slots, "free_slots")
    if survivors.shape != free_slots.shape:
        raise ValueError(
            f"`survivors` {tuple(survivors.shape)} and `free_slots` {tuple(free_slots.shape)} must have one entry "
            "per layer each."
        )
    survivors_cpu = survivors.detach().to("cpu", torch.int64)
    capacity = free_slots.detach().to("cpu", torch.int64).clone()
    available = int(capacity.sum())
    if total > available:
        raise ValueError(
            f"Cannot regrow {total} weights: the layers have only {available} free positions in total "
            "(inactive and not pruned in this step). Lower the density or the number of weights pruned."
        )
    allocation = torch.zeros_like(capacity)
    remaining = total
    for _ in range(capacity.numel()):
        if remaining == 0:
            break
        open_layers = capacity > 0
        weights = survivors_cpu * open_layers
        if int(weights.sum()) == 0:
            weights = capacity
        placed = torch.minimum(_apportion(remaining, weights, generator), capacity)
        allocation += placed
        capacity -= placed
        remaining -= int(placed.sum())
    if remaining != 0:  # unreachable: each pass places everything or fills a layer
        raise RuntimeError(f"allocate_growth left {remaining} weights unplaced; please report this bug.")
    return allocation.to(survivors.device)


def grow_random(
    masks: Sequence[Tensor],
    excluded: Sequence[Tensor] | None,
    counts: Tensor,
    generator: torch.Generator | None = None,
    free_slots: Tensor | None = None,
) -> list[Tensor]:
    """Activate exactly ``counts[l]`` uniformly random inactive, non-excluded positions in each layer l.

    DSR's growth step (docs/algorithms.md §2a step (2)); one :func:`~lightning_sparse.functional.criteria.random_grow`
    per layer, drawing from the same ``generator`` in layer order.

    Args:
        masks: One boolean mask per layer; True = active.
        excluded: One boolean mask per layer of positions that must not be grown (DSR: the positions pruned in
            this step), or None.
        counts: Integer tensor [L] of positions to activate per layer.
        generator: Source of randomness; a seeded generator makes the result reproducible.
        free_slots: Integer tensor [L] of each layer's inactive, non-excluded positions, when already known
            (as in :func:`dsr_reallocate`); saves a pass over every mask. Must be exact.

    Returns:
        The new masks (new tensors).

    Raises:
        ValueError: If lengths or shapes differ, or a count exceeds the layer's candidates.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> [int(m.sum()) for m in grow_random([torch.zeros(5, dtype=torch.bool)] * 2, None, torch.tensor([1, 4]), g)]
        [1, 4]
    """
    _check_masks(masks)
    if excluded is not None:
        _check_masks(excluded, "excluded")
        _check_paired(masks, excluded, "excluded")
    _check_counts(counts, "counts")
    if counts.numel() != len(masks):
        raise ValueError(f"`counts` has {counts.numel()} entries but there are {len(masks)} masks.")
    known_free = [None] * len(masks) if free_slots is None else free_slots.tolist()
    new_masks = []
    for index, (mask, count) in enumerate(zip(masks, counts.tolist())):
        layer_excluded = None if excluded is None else excluded[index]
        try:
            new_masks.append(
                random_grow(mask, count, generator, excluded=layer_excluded, num_candidates=known_free[index])
            )
        except ValueError as error:
            raise ValueError(f"Layer {index}: {error}") from error
    return new_masks


@dataclass
class DSRResult:
    """Outcome of one DSR reallocation (:func:`dsr_reallocate`).

    Attributes:
        masks: New mask per layer.
        pruned: Positions pruned in this step, per layer.
        grown: Positions activated in this step, per layer (new weights should start at 0).
        num_pruned: K, total number of pruned weights.
        num_grown: Total number of grown weights (equal to ``num_pruned``).
        threshold: The adapted threshold H for the next reallocation.
    """

    masks: list[Tensor]
    pruned: list[Tensor]
    grown: list[Tensor]
    num_pruned: int
    num_grown: int
    threshold: float


def dsr_reallocate(
    weights: Sequence[Tensor],
    masks: Sequence[Tensor],
    threshold: float,
    target_pruned: int,
    tolerance: float = 0.1,
    generator: torch.Generator | None = None,
    min_active_per_channel: int = 0,
) -> DSRResult:
    """One complete DSR reallocation: prune, allocate, regrow at random, adapt the threshold.

    Mostafa & Wang 2019, docs/algorithms.md §2a (REALLOCATE) with the ordering of §2d.6. The total number of active
    weights is unchanged; per-layer counts drift towards layers with many survivors.

    Args:
        weights: One weight tensor per sparse layer.
        masks: One boolean mask per layer; True = active.
        threshold: The current global threshold H (> 0).
        target_pruned: Np, the target number of prunes per reallocation.
        tolerance: delta, the fractional tolerance of the target band.
        generator: Source of randomness for allocation tie-breaks and growth.
        min_active_per_channel: The prune keeps this many weights in every output channel
            (:func:`dsr_prune`); 0 = DSR's rule.

    Returns:
        A :class:`DSRResult`.

    Raises:
        ValueError: On malformed inputs, or if there are fewer free positions (inactive, not just pruned) than
            pruned weights, i.e. the layers are too dense to reallocate.

    Example:
        >>> result = dsr_reallocate([torch.tensor([0.5, 0.0001, 0.0, 0.0])], [torch.tensor([True, True, False, False])],
        ...                         threshold=1e-3, target_pruned=1, generator=torch.Generator().manual_seed(0))
        >>> result.num_pruned, result.num_grown, int(result.masks[0].sum())
        (1, 1, 2)
    """
    kept, pruned = dsr_prune(weights, masks, threshold, min_active_per_channel)
    survivors = torch.stack([torch.count_nonzero(mask) for mask in kept]).to("cpu", torch.int64)
    pruned_counts = torch.stack([torch.count_nonzero(mask) for mask in pruned]).to("cpu", torch.int64)
    free_slots = torch.tensor([mask.numel() for mask in kept], dtype=torch.int64) - survivors - pruned_counts
    num_pruned = int(pruned_counts.sum())
    counts = allocate_growth(num_pruned, survivors, free_slots, generator)
    new_masks = grow_random(kept, pruned, counts, generator, free_slots=free_slots)
    grown = [new ^ old for new, old in zip(new_masks, kept)]  # kept is a subset of new: one pass, not two
    num_grown = int(counts.sum())
    # grow_random activates exactly counts[l] new positions per layer, so the total is unchanged by construction.
    assert num_grown == num_pruned, f"DSR regrew {num_grown} weights for {num_pruned} pruned."
    return DSRResult(
        masks=new_masks,
        pruned=pruned,
        grown=grown,
        num_pruned=num_pruned,
        num_grown=num_grown,
        threshold=adapt_threshold(threshold, num_pruned, target_pruned, tolerance),
    )
