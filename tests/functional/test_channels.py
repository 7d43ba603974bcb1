"""Channel safety on tensors with a known answer: the per-channel floor under every drop, balanced gradient growth,
and EAST's drop-fraction floor and ceil rounding."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_sparse.functional.channels import (
    channel_counts,
    droppable_count,
    empty_channels,
    feasible_floor,
    floor_protected,
    floor_rescued,
    resolve_growth_rule,
)
from lightning_sparse.functional.criteria import (
    cosine_drop_fraction,
    gradient_grow,
    magnitude_drop,
    rigl_update,
    set_update,
    update_count,
)
from lightning_sparse.functional.dsr import dsr_prune, dsr_reallocate


def _per_channel(mask: torch.Tensor) -> list[int]:
    return channel_counts(mask).tolist()


def test_channel_counts_and_empty_channels_use_dim_0_and_treat_1d_as_one_channel() -> None:
    mask = torch.zeros(3, 2, 2, 2, dtype=torch.bool)
    mask[0, 1, 1, 0] = True
    mask[2, 0, 0, 0] = mask[2, 1, 0, 1] = True
    assert _per_channel(mask) == [1, 0, 2]
    assert int(empty_channels(mask)) == 1
    assert int(empty_channels(torch.tensor([False, False]))) == 1 and _per_channel(torch.tensor([True, True])) == [2]


def test_floor_protected_keeps_the_largest_weights_of_each_channel_ties_by_index() -> None:
    weight = torch.tensor([[0.1, -0.5, 0.2, 0.5], [0.3, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, True], [True, False, False, False], [False, False, False, False]])
    # Row 0: |-0.5| and |0.5| tie for the largest: the lower index (1) is kept with a floor of 1, both with 2.
    assert floor_protected(weight, mask, 1).nonzero().tolist() == [[0, 1], [1, 0]]
    assert floor_protected(weight, mask, 2).nonzero().tolist() == [[0, 1], [0, 3], [1, 0]]
    assert not floor_protected(weight, mask, 0).any()
    assert floor_protected(weight, mask, 10).equal(mask)  # a floor above the row length keeps everything
    assert droppable_count(mask, 1) == 3 and droppable_count(mask, 2) == 2 and droppable_count(mask, 0) == 5


@pytest.mark.parametrize("min_active", [0, 1, 2, 5])
def test_floor_rescued_equals_the_floor_applied_to_every_channel(min_active: int) -> None:
    # DSR examines only the channels its threshold would take below the floor; the result must be the full rule's.
    generator = torch.Generator().manual_seed(min_active)
    weight = torch.randn(16, 4, 3, 3, generator=generator).round(decimals=1)  # rounding makes ties
    mask = torch.rand(16, 4, 3, 3, generator=generator) < 0.15
    mask[3] = False  # an empty channel
    dropped = mask & (weight.abs() < 0.8)
    expected = dropped & ~floor_protected(weight, mask, min_active)
    assert floor_rescued(weight, mask, dropped, min_active).equal(expected)
    assert floor_rescued(weight.abs(), mask, dropped, min_active).equal(expected)  # magnitudes work as well


def test_magnitude_drop_with_a_floor_never_empties_a_channel() -> None:
    # Channel 1's only weight is the smallest of the layer: without a floor it is dropped first.
    weight = torch.tensor([[0.5, 0.4, 0.3, 0.2], [0.01, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, True], [True, False, False, False]])
    assert _per_channel(magnitude_drop(weight, mask, 2)) == [3, 0]
    assert _per_channel(magnitude_drop(weight, mask, 2, min_active_per_channel=1)) == [2, 1]
    assert magnitude_drop(weight, mask, 3, 1)[0].tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match="only 3 are above the floor"):
        magnitude_drop(weight, mask, 4, 1)


def _inflated_layer() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4 output channels of 25 positions; channel 0 is empty and its gradient is the others' pattern x 100.

    Every channel's gradient has the same shape (a permutation of 1..25), as a uniformly BatchNorm-inflated channel
    would, so under channel-balanced growth the channels are exact equals.
    """
    pattern = torch.randperm(25, generator=torch.Generator().manual_seed(0)).float() + 1.0
    grad = torch.stack([pattern * 100.0, pattern * 1.0, pattern * 0.5, pattern * 2.0])
    mask = torch.zeros(4, 25, dtype=torch.bool)
    mask[1:, 0] = True  # one active weight in channels 1..3 (its position has the pattern's value there)
    weight = torch.where(mask, torch.ones_like(grad), torch.zeros_like(grad))
    return weight, grad, mask


def test_global_growth_lets_an_inflated_empty_channel_take_all_the_growth() -> None:
    """The failure mode itself (RigL's rule): the 100x gradients win every one of the 8 grown positions."""
    _, grad, mask = _inflated_layer()
    grown = gradient_grow(grad, mask, 8) & ~mask
    assert _per_channel(grown) == [8, 0, 0, 0]


@pytest.mark.parametrize("rule", ["channel_normalized", "channel_capped"])
def test_balanced_growth_gives_an_inflated_empty_channel_no_more_than_its_share(rule: str) -> None:
    _, grad, mask = _inflated_layer()
    grown = gradient_grow(grad, mask, 8, rule=rule) & ~mask
    # 8 positions over 4 channels: the inflated channel takes its share, 2, and so does every other channel.
    assert _per_channel(grown) == [2, 2, 2, 2]
    # Within a channel the largest gradients still win: channel 0's two largest pattern values.
    top_two = torch.topk(grad[0], 2).indices.sort().values.tolist()
    assert grown[0].nonzero().flatten().tolist() == top_two


def test_channel_capped_growth_lifts_the_cap_for_channels_without_room() -> None:
    grad = torch.tensor([[9.0, 8.0, 7.0, 6.0], [5.0, 4.0, 3.0, 2.0]])
    mask = torch.tensor([[False, False, False, False], [True, True, True, False]])
    # 3 to grow, 2 channels: the even cap of 2 leaves only 2 + 1 = 3 candidates, just enough.
    grown = gradient_grow(grad, mask, 3, rule="channel_capped") & ~mask
    assert grown.nonzero().tolist() == [[0, 0], [0, 1], [1, 3]]
    # 4 to grow: channel 1 has room for 1, so the cap rises to 3.
    grown = gradient_grow(grad, mask, 4, rule="channel_capped") & ~mask
    assert _per_channel(grown) == [3, 1]


def test_channel_normalized_growth_gives_zero_score_to_an_all_zero_channel() -> None:
    grad = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    mask = torch.zeros(2, 2, dtype=torch.bool)
    assert gradient_grow(grad, mask, 1, rule="channel_normalized").nonzero().tolist() == [[1, 1]]


def test_rigl_update_with_a_floor_keeps_every_channel_and_the_count() -> None:
    weight, grad, mask = _inflated_layer()
    weight[1:, 0] = torch.tensor([0.01, 0.02, 0.03])
    mask[1, 1:6] = True
    weight[1, 1:6] = 1.0
    # 9 active: drop fraction 0.5 -> 4. With a floor of 1 only channel 1's weights beyond its largest are droppable.
    before = _per_channel(mask)
    update = rigl_update(weight, grad, mask, 0.5, min_active_per_channel=1, growth_rule="channel_capped")
    assert int(update.mask.sum()) == int(mask.sum())
    after = _per_channel(update.mask)
    assert all(count >= min(1, was) for count, was in zip(after, before))
    assert int(update.dropped.sum()) == int(update.grown.sum()) == 4
    assert update.dropped[2:, 0].sum() == 0  # channels 2 and 3 keep their only weight
    assert update.dropped[1, 0]  # channel 1's smallest weight is above the floor (a 1.0 is its largest)
    # Without the floor the three smallest weights, each a channel's last, go first.
    plain = rigl_update(weight, grad, mask, 0.5)
    assert plain.dropped[1:, 0].all()


def test_rigl_update_with_a_floor_swaps_at_most_the_weights_above_it() -> None:
    weight = torch.tensor([[0.5, 0.0], [0.4, 0.0], [0.3, 0.2]])
    mask = weight != 0
    grad = torch.ones(3, 2)
    # Fraction 1.0 asks for all 4, but only channel 2's second weight is above the floor: 1 is swapped, and
    # regrown at the first of the tied gradients.
    update = rigl_update(weight, grad, mask, 1.0, min_active_per_channel=1)
    assert update.dropped.nonzero().tolist() == [[2, 1]] and update.grown.nonzero().tolist() == [[0, 1]]


def test_set_update_with_a_floor_never_empties_a_channel() -> None:
    weight = torch.tensor([[0.01, 0.0, 0.0, 0.0], [0.9, 0.8, 0.7, 0.0], [0.02, 0.0, 0.0, 0.0]])
    mask = weight != 0
    generator = torch.Generator().manual_seed(0)
    update = set_update(weight, mask, 0.4, generator, min_active_per_channel=1)  # k = floor(0.4 x 5) = 2
    assert update.dropped.nonzero().tolist() == [[1, 1], [1, 2]]
    assert int(update.grown.sum()) == 2 and int(update.mask.sum()) == 5
    plain = set_update(weight, mask, 0.4, torch.Generator().manual_seed(0))
    assert plain.dropped.nonzero().tolist() == [[0, 0], [2, 0]]


def test_dsr_threshold_prune_keeps_the_floor_of_every_channel() -> None:
    first = torch.tensor([[0.001, 0.002, 0.5, 0.0, 0.0, 0.0], [0.003, 0.0, 0.0, 0.0, 0.0, 0.0]])
    second = torch.tensor([[0.0001, 0.0002, 0.0, 0.0], [0.0003, 0.0004, 0.0, 0.0]])
    masks = [first != 0, second != 0]
    kept, pruned = dsr_prune([first, second], masks, threshold=0.01, min_active_per_channel=1)
    # Everything below H goes, except each channel's largest weight.
    assert kept[0].nonzero().tolist() == [[0, 2], [1, 0]]
    assert kept[1].nonzero().tolist() == [[0, 1], [1, 1]]
    assert int(pruned[0].sum()) == 2 and int(pruned[1].sum()) == 2
    kept_plain, _ = dsr_prune([first, second], masks, threshold=0.01)
    assert _per_channel(kept_plain[0]) == [1, 0] and int(kept_plain[1].sum()) == 1  # DSR's rule empties channels
    result = dsr_reallocate(
        [first, second], masks, 0.01, 4, generator=torch.Generator().manual_seed(0), min_active_per_channel=1
    )
    assert result.num_pruned == result.num_grown == 4
    assert all(int(empty_channels(mask)) == 0 for mask in result.masks)


def test_feasible_floor_lowers_the_floor_only_as_far_as_the_count_requires() -> None:
    mask = torch.tensor([[True, True, True, False], [True, True, False, False], [True, False, False, False]])
    assert feasible_floor(mask, 3, 1) == 1  # 6 active, 3 above a floor of 1
    assert feasible_floor(mask, 4, 2) == 0  # a floor of 2 leaves 1, of 1 leaves 3: only 0 allows 4
    assert feasible_floor(mask, 1, 2) == 2
    with pytest.raises(ValueError, match="only 6 active"):
        feasible_floor(mask, 7, 1)


def test_growth_rule_defaults_follow_the_floor() -> None:
    assert resolve_growth_rule(None, 0) == "global"
    assert resolve_growth_rule(None, 1) == "channel_normalized"
    assert resolve_growth_rule("channel_capped", 0) == "channel_capped"
    with pytest.raises(ValueError, match="unknown growth rule"):
        resolve_growth_rule("largest", 1)


def test_cosine_drop_fraction_with_east_floor_by_hand() -> None:
    # f(t) = 0.005 + (0.5 - 0.005) / 2 x (1 + cos(pi t / T)), T = 1000.
    assert cosine_drop_fraction(0, 1000, 0.5, floor=0.005) == pytest.approx(0.5)
    assert cosine_drop_fraction(250, 1000, 0.5, floor=0.005) == pytest.approx(0.005 + 0.2475 * (1 + math.sqrt(0.5)))
    assert cosine_drop_fraction(500, 1000, 0.5, floor=0.005) == pytest.approx(0.2525)
    assert cosine_drop_fraction(1000, 1000, 0.5, floor=0.005) == 0.005
    assert cosine_drop_fraction(1200, 1000, 0.5, floor=0.005) == 0.005  # the floor holds after T
    # docs/algorithms.md §3e's values for E = 250 epochs: about 0.33 at epoch 100 and 0.079 at 187.
    assert cosine_drop_fraction(100, 250, 0.5, floor=0.005) == pytest.approx(0.3290, abs=1e-4)
    assert cosine_drop_fraction(187, 250, 0.5, floor=0.005) == pytest.approx(0.0786, abs=1e-4)
    assert cosine_drop_fraction(1000, 1000, 0.3) == 0.0  # RigL's schedule is unchanged
    with pytest.raises(ValueError, match="floor"):
        cosine_drop_fraction(0, 10, 0.3, floor=0.4)


def test_update_count_rounds_up_with_ceil() -> None:
    assert update_count(10, 0.005) == 0 and update_count(10, 0.005, "ceil") == 1
    assert update_count(3, 0.25) == 0 and update_count(3, 0.25, "ceil") == 1
    assert update_count(10, 0.3, "ceil") == 3  # 0.3 x 10 = 3.0000000000000004 must not round up to 4
    assert update_count(100, 0.29, "ceil") == 29 == update_count(100, 0.29)
    assert update_count(0, 0.5, "ceil") == 0
    with pytest.raises(ValueError, match="rounding"):
        update_count(10, 0.5, "round")


def test_rigl_update_with_ceil_swaps_at_least_one_weight() -> None:
    weight = torch.tensor([0.5, 0.4, 0.3, 0.0, 0.0])
    grad = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.5])
    mask = weight != 0
    assert rigl_update(weight, grad, mask, 0.05).grown.sum() == 0  # floor(0.15) = 0
    update = rigl_update(weight, grad, mask, 0.05, rounding="ceil")  # ceil(0.15) = 1
    assert update.dropped.tolist() == [False, False, True, False, False]
    assert update.grown.tolist() == [False, False, False, True, False]
