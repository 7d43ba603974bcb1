"""Output-channel views of sparse masks: empty channels, a floor of active weights per channel, balanced growth.

Pure tensor functions (no Lightning) behind the channel-safe topology updates (docs/troubleshooting.md, "channel
collapse"). An *output channel* of a sparse tensor is a slice along dim 0 (a conv's output channel, a linear layer's
output feature); a tensor with fewer than 2 dimensions is one channel.

Why the channel matters at extreme sparsity: an output channel with no active weight feeds zero variance into a
train-mode BatchNorm, whose backward divides by ``sqrt(var + eps)``, so the dense gradient at that channel's
inactive positions is inflated by up to ``1 / sqrt(eps)``. Ranked globally by ``|grad|`` (RigL's growth, EAST's
cyclic growth), those positions capture most of the growth, while magnitude drop keeps removing the smallest weights
everywhere and empties more channels. Two remedies, used together by the callbacks:

* a *floor* (:func:`floor_protected`): the ``min_active`` largest-magnitude active weights of every output channel
  are never dropped, so a topology update cannot empty a channel;
* *channel-balanced growth* (:data:`GROWTH_RULES`): scores are compared within each channel's own scale
  (``"channel_normalized"``) or each channel's share of the growth is capped (``"channel_capped"``), so a channel
  with inflated gradients takes no more than its share.

Ties are broken by position (lowest flat index first), so results are identical on CPU and CUDA.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "CHANNEL_SAFE_GROWTH",
    "GROWTH_RULES",
    "check_min_active_per_channel",
    "resolve_growth_rule",
    "channel_counts",
    "droppable_count",
    "empty_channels",
    "feasible_floor",
    "floor_protected",
    "floor_rescued",
    "growth_candidates",
    "growth_scores",
]

GROWTH_RULES = ("global", "channel_normalized", "channel_capped")
"""How gradient growth ranks candidate positions.

* ``"global"``: the largest ``|grad|`` over the whole tensor (RigL, Evci et al. 2020; the rule before channel
  safety);
* ``"channel_normalized"``: ``|grad|`` divided by the mean ``|grad|`` over the candidate positions of its output
  channel, then the largest over the tensor: every channel's scores are on the same scale, so a uniformly inflated
  channel (BatchNorm over an empty or near-empty channel) has no advantage;
* ``"channel_capped"``: the largest ``|grad|`` over the tensor, with at most ``c`` grown positions per output
  channel, ``c`` the smallest cap that can place the whole count (``ceil(count / channels)`` when every channel has
  room).
"""


CHANNEL_SAFE_GROWTH = "channel_normalized"
"""The growth rule the callbacks use when the floor is on and no rule is given (chosen by measurement:
``benchmarks/results/channel_safety.md``)."""


def check_min_active_per_channel(min_active: int) -> int:
    """Validate a floor of active weights per output channel (an int >= 0) and return it.

    Raises:
        TypeError: for a bool or a non-int.
        ValueError: for a negative value.
    """
    if isinstance(min_active, bool) or not isinstance(min_active, int):
        raise TypeError(f"`min_active_per_channel` must be an int, got {type(min_active).__name__}.")
    if min_active < 0:
        raise ValueError(f"`min_active_per_channel` must be >= 0 (0 turns the floor off), got {min_active}.")
    return min_active


_check_min_active = check_min_active_per_channel


def resolve_growth_rule(rule: str | None, min_active: int) -> str:
    """The growth rule to use: ``rule`` if given, else :data:`CHANNEL_SAFE_GROWTH` with a floor and ``"global"``
    (RigL's rule) without one, so that ``min_active_per_channel=0`` alone restores the published behaviour.

    Raises:
        ValueError: for a rule not in :data:`GROWTH_RULES`.
    """
    if rule is None:
        return CHANNEL_SAFE_GROWTH if min_active > 0 else "global"
    _check_rule(rule)
    return rule


def _check_rule(rule: str) -> None:
    if rule not in GROWTH_RULES:
        raise ValueError(f"unknown growth rule {rule!r}; choose one of {', '.join(repr(r) for r in GROWTH_RULES)}.")


def _rows(tensor: Tensor) -> Tensor:
    """``tensor`` as ``[channels, positions per channel]`` (one row for a tensor with fewer than 2 dimensions)."""
    if tensor.dim() >= 2:
        return tensor.reshape(tensor.shape[0], -1)
    return tensor.reshape(1, -1)


def channel_counts(mask: Tensor) -> Tensor:
    """Active positions per output channel (int64 tensor ``[channels]``, on the mask's device).

    Example:
        >>> channel_counts(torch.tensor([[True, False], [False, False], [True, True]]))
        tensor([1, 0, 2])
    """
    # A uint8 view summed in int32 is ~6x faster on the CPU than summing bools (which accumulates in int64).
    return _rows(mask).view(torch.uint8).sum(dim=1, dtype=torch.int32).long()


def empty_channels(mask: Tensor) -> Tensor:
    """Number of output channels with no active position, as a 0-d int64 tensor (no host synchronisation).

    Example:
        >>> int(empty_channels(torch.tensor([[True, False], [False, False], [False, False]])))
        2
    """
    return (channel_counts(mask) == 0).sum()


def floor_protected(weight: Tensor, mask: Tensor, min_active: int) -> Tensor:
    """The active positions a drop must keep: the ``min_active`` largest ``|w|`` of each output channel.

    A channel with at most ``min_active`` active weights keeps all of them. Ties in ``|w|`` are broken by position
    (lowest index kept). ``min_active = 0`` protects nothing.

    Args:
        weight: The layer's weight, same shape as ``mask``.
        mask: Boolean mask; True = active.
        min_active: The floor of active weights per output channel (>= 0).

    Returns:
        A new boolean tensor of ``mask``'s shape, True at protected (active) positions.

    Example:
        >>> w = torch.tensor([[0.1, 0.5, 0.2], [0.3, 0.0, 0.0]])
        >>> floor_protected(w, torch.tensor([[True, True, True], [True, False, False]]), 1)
        tensor([[False,  True, False],
                [ True, False, False]])
    """
    _check_min_active(min_active)
    if weight.shape != mask.shape:
        raise ValueError(f"`weight` has shape {tuple(weight.shape)} but the mask has shape {tuple(mask.shape)}.")
    if min_active == 0:
        return torch.zeros_like(mask)
    rows_mask = _rows(mask)
    # abs() returns a new tensor, so filling it in place leaves the weight untouched.
    scores = _rows(weight.detach()).abs().to(torch.promote_types(weight.dtype, torch.float32))
    scores.masked_fill_(~rows_mask, -math.inf)
    protected = torch.zeros_like(rows_mask)
    # ``min_active`` argmax passes instead of a per-channel sort: the floor is a few weights, and a full sort of every
    # row made DSR's update cost several dense training steps (issue 14). argmax returns the first maximum, so ties
    # keep the lowest index on every device.
    for _ in range(min(min_active, rows_mask.shape[1])):
        best = scores.argmax(dim=1, keepdim=True)
        protected.scatter_(1, best, True)
        scores.scatter_(1, best, -math.inf)
    return (protected & rows_mask).reshape(mask.shape)


def floor_rescued(weight: Tensor, mask: Tensor, dropped: Tensor, min_active: int) -> Tensor:
    """``dropped`` less the positions the floor keeps: ``dropped & ~floor_protected(weight, mask, min_active)``.

    A drop chosen by its own rule (DSR's threshold) only needs the floor in the channels it would take below
    ``min_active`` active weights; in every other channel the ``min_active`` largest ``|w|`` survive anyway. So only
    those channels are examined, which makes the floor nearly free when the drop leaves every channel enough weights.

    Args:
        weight: The layer's weight (or its magnitude), same shape as ``mask``.
        mask: Boolean mask; True = active.
        dropped: Boolean mask of the active positions the rule would drop (a subset of ``mask``).
        min_active: The floor of active weights per output channel (>= 0).

    Returns:
        A new boolean tensor of ``mask``'s shape: the positions to drop.

    Example:
        >>> w = torch.tensor([[0.1, 0.5, 0.2], [0.3, 0.0, 0.0]])
        >>> mask = torch.tensor([[True, True, True], [True, False, False]])
        >>> floor_rescued(w, mask, torch.tensor([[True, True, False], [True, False, False]]), 1)
        tensor([[ True,  True, False],
                [False, False, False]])
    """
    _check_min_active(min_active)
    rows_mask, rows_dropped = _rows(mask), _rows(dropped).clone()
    if min_active == 0:
        return rows_dropped.reshape(dropped.shape)
    active = channel_counts(rows_mask)
    at_risk = torch.nonzero(active - channel_counts(rows_dropped) < active.clamp(max=min_active)).flatten()
    if at_risk.numel():
        kept = floor_protected(_rows(weight)[at_risk], rows_mask[at_risk], min_active)
        rows_dropped[at_risk] &= ~kept
    return rows_dropped.reshape(dropped.shape)


def droppable_count(mask: Tensor, min_active: int) -> int:
    """How many active weights a drop may remove without taking a channel below ``min_active``.

    Example:
        >>> droppable_count(torch.tensor([[True, True, True], [True, False, False]]), 1)
        2
    """
    _check_min_active(min_active)
    counts = channel_counts(mask)
    return int(counts.sum() - counts.clamp(max=min_active).sum())


def feasible_floor(mask: Tensor, count: int, min_active: int) -> int:
    """The largest floor ``<= min_active`` that still lets a drop remove exactly ``count`` weights.

    A density schedule must reach its target count; when ``min_active`` per channel leaves too few droppable
    weights, the floor is lowered for this drop only as far as the count requires (0 at worst).

    Raises:
        ValueError: if ``count`` exceeds the active weights.

    Example:
        >>> feasible_floor(torch.tensor([[True, True, True], [True, True, False]]), 3, 2)
        1
    """
    _check_min_active(min_active)
    counts = channel_counts(mask)
    total = int(counts.sum())
    if count > total:
        raise ValueError(f"Cannot drop {count} weights from a layer with only {total} active weights.")
    for floor in range(min_active, 0, -1):
        if total - int(counts.clamp(max=floor).sum()) >= count:
            return floor
    return 0


def growth_scores(grad: Tensor, candidates: Tensor, rule: str) -> Tensor:
    """Scores by which gradient growth ranks candidate positions (larger = grown first), float32 or wider.

    Args:
        grad: Dense gradient of the layer's weight.
        candidates: Boolean mask of the positions that may grow.
        rule: One of :data:`GROWTH_RULES`. ``"channel_capped"`` ranks by ``|grad|`` like ``"global"``; its cap is
            applied by :func:`growth_candidates`.

    Returns:
        A tensor of ``grad``'s shape; only the values at candidate positions are meaningful.
    """
    _check_rule(rule)
    magnitude = grad.detach().abs().to(torch.promote_types(grad.dtype, torch.float32))
    if rule != "channel_normalized":
        return magnitude
    rows = _rows(magnitude)
    rows_candidates = _rows(candidates)
    total = torch.where(rows_candidates, rows, torch.zeros_like(rows)).sum(dim=1, keepdim=True)
    mean = total / rows_candidates.sum(dim=1, keepdim=True).clamp(min=1)
    # A channel whose candidates all have zero gradient keeps score 0 (0 / 0 would be NaN).
    normalised = torch.where(mean > 0, rows / mean.clamp(min=torch.finfo(rows.dtype).tiny), torch.zeros_like(rows))
    return normalised.reshape(grad.shape)


def _rank_in_channel(scores: Tensor, eligible: Tensor) -> Tensor:
    """Rank (0 = best) of each eligible position within its channel by descending score, ties by lowest index."""
    rows_scores = torch.where(eligible, scores, torch.full_like(scores, -math.inf))
    order = torch.sort(rows_scores, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return ranks


def growth_candidates(scores: Tensor, candidates: Tensor, count: int, rule: str) -> Tensor:
    """The positions gradient growth may pick ``count`` from under ``rule`` (a boolean tensor of ``scores``' shape).

    ``"global"`` and ``"channel_normalized"``: every candidate. ``"channel_capped"``: the ``c`` best-scoring
    candidates of each output channel (ties by lowest index), with ``c`` the smallest cap that leaves at least
    ``count`` of them, so taking the ``count`` largest scores among them gives each channel at most ``c``.

    Example:
        >>> s = torch.tensor([[9.0, 8.0, 7.0], [1.0, 2.0, 0.5]])
        >>> growth_candidates(s, torch.ones(2, 3, dtype=torch.bool), 2, "channel_capped")
        tensor([[ True, False, False],
                [False,  True, False]])
    """
    _check_rule(rule)
    if rule != "channel_capped" or count <= 0:
        return candidates
    rows_candidates = _rows(candidates)
    room = rows_candidates.sum(dim=1)
    cap = max(1, math.ceil(count / max(int((room > 0).sum()), 1)))
    while int(room.clamp(max=cap).sum()) < count:  # some channels have less room than the even share
        cap += 1
    ranks = _rank_in_channel(_rows(scores), rows_candidates)
    return (rows_candidates & (ranks < cap)).reshape(candidates.shape)
