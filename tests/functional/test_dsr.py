"""Tests for lightning_sparse.functional.dsr (DSR, docs/algorithms.md §2a)."""

from __future__ import annotations

import pytest
import torch

from lightning_sparse.functional.dsr import (
    DSRResult,
    adapt_threshold,
    allocate_growth,
    dsr_prune,
    dsr_reallocate,
    grow_random,
)
from tests.helpers import DEVICES
from tests.helpers import bool_tensor as _bool
from tests.helpers import generator as _gen

# --- dsr_prune -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_prune_is_strict_and_ignores_inactive(device: str) -> None:
    weight = torch.tensor([0.5, -0.001, 0.002, 0.0015, 0.0], device=device)
    mask = _bool([True, True, True, True, False]).to(device)
    kept, pruned = dsr_prune([weight], [mask], threshold=0.002)
    # |w| == H (index 2) survives; the inactive zero (index 4) is not counted as pruned.
    assert kept[0].cpu().tolist() == [True, False, True, False, False]
    assert pruned[0].cpu().tolist() == [False, True, False, True, False]
    assert mask.cpu().tolist() == [True, True, True, True, False], "input mask must not be modified"


def test_prune_uses_one_global_threshold_across_layers() -> None:
    weights = [torch.tensor([[0.01, 0.2], [0.003, 0.5]]), torch.tensor([0.004, 0.006, 0.1])]
    masks = [torch.ones(2, 2, dtype=torch.bool), torch.ones(3, dtype=torch.bool)]
    kept, pruned = dsr_prune(weights, masks, threshold=0.005)
    assert kept[0].tolist() == [[True, True], [False, True]]
    assert kept[1].tolist() == [False, True, True]
    assert sum(int(p.sum()) for p in pruned) == 2


@pytest.mark.parametrize("device", DEVICES)
def test_prune_never_empties_a_layer(device: str) -> None:
    weights = [
        torch.tensor([0.0001, -0.0005, 0.0003, 0.9], device=device),  # index 3 inactive: may not be "kept"
        torch.tensor([0.0003, -0.0003], device=device),  # tie: lowest index kept
        torch.tensor([0.0001, 0.5], device=device),  # normal layer, unaffected
        torch.tensor([0.0, 0.0], device=device),  # already empty: stays empty
    ]
    masks = [
        _bool([True, True, True, False]).to(device),
        _bool([True, True]).to(device),
        _bool([True, True]).to(device),
        _bool([False, False]).to(device),
    ]
    kept, pruned = dsr_prune(weights, masks, threshold=1e-3)
    assert [k.cpu().tolist() for k in kept] == [
        [False, True, False, False],
        [True, False],
        [False, True],
        [False, False],
    ]
    assert [p.cpu().tolist() for p in pruned] == [
        [True, False, True, False],
        [False, True],
        [True, False],
        [False, False],
    ]


def test_prune_rejects_bad_inputs() -> None:
    w, m = torch.zeros(3), torch.ones(3, dtype=torch.bool)
    with pytest.raises(ValueError, match="threshold"):
        dsr_prune([w], [m], -1.0)
    with pytest.raises(ValueError, match="shape"):
        dsr_prune([torch.zeros(4)], [m], 1e-3)
    with pytest.raises(ValueError, match="entries"):
        dsr_prune([w, w], [m], 1e-3)
    with pytest.raises(TypeError, match="bool"):
        dsr_prune([w], [m.float()], 1e-3)


# --- adapt_threshold -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_pruned", "expected"),
    [(23, 0.5e-3), (22, 1e-3), (20, 1e-3), (18, 1e-3), (17, 2e-3), (0, 2e-3)],
)
def test_threshold_halves_doubles_or_stays_at_band_edges(num_pruned: int, expected: float) -> None:
    assert adapt_threshold(1e-3, num_pruned, target=20, tolerance=0.1) == expected


def test_threshold_band_edges_survive_float_rounding() -> None:
    # (1 + 0.1) * 10 == 11.000000000000002 in binary; 11 is still on the band edge.
    assert adapt_threshold(1.0, 11, target=10) == 1.0
    assert adapt_threshold(1.0, 9, target=10) == 1.0
    assert adapt_threshold(1.0, 12, target=10) == 0.5
    assert adapt_threshold(1.0, 8, target=10) == 2.0


def test_threshold_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="threshold"):
        adapt_threshold(0.0, 5, 10)
    with pytest.raises(ValueError, match="tolerance"):
        adapt_threshold(1e-3, 5, 10, tolerance=-0.1)
    with pytest.raises(ValueError, match=">= 0"):
        adapt_threshold(1e-3, -1, 10)


# --- allocate_growth -------------------------------------------------------------------------------------------


def test_allocation_is_proportional_to_survivors() -> None:
    counts = allocate_growth(10, torch.tensor([1, 3, 6]), torch.tensor([100, 100, 100]), _gen())
    assert counts.tolist() == [1, 3, 6]
    assert counts.dtype == torch.int64


def test_allocation_rounds_by_largest_remainder() -> None:
    # quotas 10*3/9 = 3.33 and 10*6/9 = 6.67: the unit left over goes to the larger remainder.
    assert allocate_growth(10, torch.tensor([1, 3, 6]), torch.tensor([0, 100, 100]), _gen()).tolist() == [0, 3, 7]


def test_allocation_redistributes_shortfall_of_full_layers() -> None:
    # Pass 1: shares [5, 3, 2], layer 0 capped at 2 -> 3 left. Pass 2: 3 * [3, 2] / 5 = [1.8, 1.2] -> [2, 1].
    counts = allocate_growth(10, torch.tensor([5, 3, 2]), torch.tensor([2, 100, 100]), _gen())
    assert counts.tolist() == [2, 5, 3]


def test_allocation_fills_every_slot_when_total_equals_free() -> None:
    counts = allocate_growth(7, torch.tensor([9, 1, 4]), torch.tensor([1, 4, 2]), _gen())
    assert counts.tolist() == [1, 4, 2]


def test_allocation_needs_one_pass_per_capped_layer_and_terminates() -> None:
    survivors = torch.tensor([100, 100, 100, 100, 1])
    counts = allocate_growth(50, survivors, torch.tensor([1, 1, 1, 1, 100]), _gen())
    assert counts.tolist() == [1, 1, 1, 1, 46]


def test_allocation_gives_zero_survivor_layers_only_the_shortfall() -> None:
    assert allocate_growth(1, torch.tensor([0, 2]), torch.tensor([5, 5]), _gen()).tolist() == [0, 1]
    # Layer 1 can take only 1; the other 3 must go to layer 0 although it has no survivors.
    assert allocate_growth(4, torch.tensor([0, 2]), torch.tensor([5, 1]), _gen()).tolist() == [3, 1]
    # No survivors anywhere: shared in proportion to free slots.
    assert allocate_growth(6, torch.tensor([0, 0]), torch.tensor([10, 20]), _gen()).tolist() == [2, 4]


def test_allocation_rejects_total_above_free_slots() -> None:
    with pytest.raises(ValueError, match="only 3 free positions"):
        allocate_growth(4, torch.tensor([1, 1]), torch.tensor([1, 2]), _gen())
    with pytest.raises(TypeError, match="integer"):
        allocate_growth(1, torch.tensor([1.0, 1.0]), torch.tensor([1, 2]), _gen())
    with pytest.raises(ValueError, match=">= 0"):
        allocate_growth(1, torch.tensor([1, -1]), torch.tensor([1, 2]), _gen())


def test_allocation_tie_break_is_seeded_and_fair() -> None:
    survivors, free = torch.tensor([1, 1, 1]), torch.tensor([5, 5, 5])
    first = allocate_growth(2, survivors, free, _gen(3))
    assert sorted(first.tolist()) == [0, 1, 1]
    assert torch.equal(first, allocate_growth(2, survivors, free, _gen(3)))
    winners = {int(allocate_growth(1, survivors, free, _gen(seed)).argmax()) for seed in range(40)}
    assert winners == {0, 1, 2}


# --- grow_random -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_grow_random_exact_counts_and_never_active_or_excluded(device: str) -> None:
    masks = [torch.zeros(8, 8, dtype=torch.bool, device=device), torch.zeros(30, dtype=torch.bool, device=device)]
    masks[0][:, :2] = True
    masks[1][:10] = True
    excluded = [torch.zeros_like(masks[0]), torch.zeros_like(masks[1])]
    excluded[0][:, 2:4] = True
    excluded[1][10:20] = True
    counts = torch.tensor([32, 10])  # exactly all candidates of both layers
    new = grow_random(masks, excluded, counts, _gen())
    for old, exc, grown_mask, count in zip(masks, excluded, new, counts.tolist()):
        grown = grown_mask & ~old
        assert grown_mask.device == old.device
        assert int(grown.sum()) == count
        assert bool((grown_mask | ~old).all()), "active positions must stay active"
        assert not bool((grown & exc).any()), "excluded positions must never be grown"
    assert bool(new[1][20:].all())


def test_grow_random_is_deterministic_given_the_seed() -> None:
    masks = [torch.zeros(1000, dtype=torch.bool), torch.zeros(10, 10, dtype=torch.bool)]
    counts = torch.tensor([10, 5])
    first = grow_random(masks, None, counts, _gen(7))
    again = grow_random(masks, None, counts, _gen(7))
    other = grow_random(masks, None, counts, _gen(8))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])


def test_grow_random_rejects_count_above_candidates() -> None:
    masks = [torch.zeros(4, dtype=torch.bool), _bool([True, False, False, False])]
    with pytest.raises(ValueError, match="Layer 1"):
        grow_random(masks, None, torch.tensor([1, 4]), _gen())


# --- dsr_reallocate --------------------------------------------------------------------------------------------


def _two_layer_example() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    weights = [torch.tensor([0.5, 0.0001, 0.3, 0.0, 0.0, 0.0]), torch.tensor([0.0002, 0.7, 0.0, 0.0])]
    masks = [_bool([True, True, True, False, False, False]), _bool([True, True, False, False])]
    return weights, masks


def test_reallocate_prunes_regrows_proportionally_and_keeps_total() -> None:
    weights, masks = _two_layer_example()
    result = dsr_reallocate(weights, masks, threshold=1e-3, target_pruned=2, generator=_gen())
    assert isinstance(result, DSRResult)
    assert result.num_pruned == result.num_grown == 2
    assert [p.tolist() for p in result.pruned] == [
        [False, True, False, False, False, False],
        [True, False, False, False],
    ]
    # survivors [2, 1], quotas 2*[2, 1]/3 = [1.33, 0.67]: floors [1, 0], the spare unit to the larger remainder.
    assert [int(g.sum()) for g in result.grown] == [1, 1]
    assert [int(m.sum()) for m in result.masks] == [3, 2]
    for old, pruned, grown, new in zip(masks, result.pruned, result.grown, result.masks):
        assert not bool((grown & pruned).any()), "just-pruned positions must not be regrown"
        assert not bool((grown & old).any()), "grown positions were inactive before"
        assert torch.equal(new, (old & ~pruned) | grown)
    assert result.threshold == 1e-3  # 2 pruned == target


def test_reallocate_adapts_threshold_after_growth() -> None:
    weights, masks = _two_layer_example()
    assert dsr_reallocate(weights, masks, 1e-3, target_pruned=10, generator=_gen()).threshold == 2e-3
    assert dsr_reallocate(weights, masks, 1e-3, target_pruned=1, tolerance=0.5, generator=_gen()).threshold == 5e-4


def test_reallocate_is_deterministic_given_the_seed() -> None:
    torch.manual_seed(0)
    weights = [torch.randn(16, 8, 3, 3) * 0.01, torch.randn(10, 16) * 0.01]
    masks = [torch.rand(16, 8, 3, 3) < 0.2, torch.rand(10, 16) < 0.2]
    first = dsr_reallocate(weights, masks, 5e-3, 100, generator=_gen(1))
    again = dsr_reallocate(weights, masks, 5e-3, 100, generator=_gen(1))
    assert first.num_pruned > 0
    assert all(torch.equal(a, b) for a, b in zip(first.masks, again.masks))
    assert sum(int(m.sum()) for m in first.masks) == sum(int(m.sum()) for m in masks)


def test_reallocate_raises_when_too_dense_to_regrow() -> None:
    weights = [torch.tensor([0.0001, 0.5])]
    with pytest.raises(ValueError, match="free positions"):
        dsr_reallocate(weights, [_bool([True, True])], 1e-3, 1, generator=_gen())
