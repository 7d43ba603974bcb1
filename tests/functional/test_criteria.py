"""Tests for lightning_sparse.functional.criteria (SET §4b, RigL §4a)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_sparse.functional.criteria import (
    MaskUpdate,
    cosine_drop_fraction,
    gradient_grow,
    magnitude_drop,
    random_grow,
    rigl_update,
    set_update,
)
from lightning_sparse.functional.dsr import grow_random
from tests.helpers import DEVICES
from tests.helpers import bool_tensor as _bool
from tests.helpers import generator as _gen

# --- magnitude_drop --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_magnitude_drop_removes_smallest_active(device: str) -> None:
    weight = torch.tensor([0.5, -0.1, 0.0, 0.3, -0.2], device=device)
    mask = _bool([True, True, False, True, True]).to(device)
    new = magnitude_drop(weight, mask, 2)
    # The inactive zero at index 2 is not a candidate; -0.1 and -0.2 are the smallest active magnitudes.
    assert new.cpu().tolist() == [True, False, False, True, False]
    assert mask.cpu().tolist() == [True, True, False, True, True], "input mask must not be modified"


@pytest.mark.parametrize("device", DEVICES)
def test_magnitude_drop_breaks_ties_by_lowest_index(device: str) -> None:
    weight = torch.tensor([[0.1, -0.1], [0.1, 0.5]], device=device)
    new = magnitude_drop(weight, torch.ones(2, 2, dtype=torch.bool, device=device), 2)
    assert new.cpu().tolist() == [[False, False], [True, True]]


def test_magnitude_drop_handles_zero_count_and_full_count() -> None:
    weight, mask = torch.tensor([0.3, 0.2, 0.1]), _bool([True, False, True])
    same = magnitude_drop(weight, mask, 0)
    assert torch.equal(same, mask) and same is not mask
    assert magnitude_drop(weight, mask, 2).tolist() == [False, False, False]
    with pytest.raises(ValueError, match="only 2 active"):
        magnitude_drop(weight, mask, 3)
    with pytest.raises(ValueError, match=">= 0"):
        magnitude_drop(weight, mask, -1)


def test_magnitude_drop_can_drop_an_infinite_weight_without_touching_inactive() -> None:
    weight = torch.tensor([math.inf, 0.0, math.inf])
    assert magnitude_drop(weight, _bool([True, False, True]), 2).tolist() == [False, False, False]


# --- gradient_grow ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_grow_picks_largest_abs_grad_among_inactive(device: str) -> None:
    grad = torch.tensor([0.9, -0.2, 0.7, -0.8, 0.1], device=device)
    mask = _bool([True, False, False, False, False]).to(device)
    assert gradient_grow(grad, mask, 2).cpu().tolist() == [True, False, True, True, False]
    excluded = _bool([False, False, False, True, False]).to(device)
    assert gradient_grow(grad, mask, 2, excluded).cpu().tolist() == [True, True, True, False, False]


def test_gradient_grow_breaks_ties_by_lowest_index_and_checks_count() -> None:
    grad = torch.tensor([0.0, 0.4, -0.4, 0.4])
    assert gradient_grow(grad, _bool([True, False, False, False]), 2).tolist() == [True, True, True, False]
    with pytest.raises(ValueError, match="only 3 inactive"):
        gradient_grow(grad, _bool([True, False, False, False]), 4)
    with pytest.raises(ValueError, match="shape"):
        gradient_grow(torch.zeros(3), _bool([True, False, False, False]), 1)


# --- random_grow -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_random_grow_never_picks_active_or_excluded(device: str) -> None:
    mask = torch.zeros(6, 5, dtype=torch.bool, device=device)
    mask[0] = True
    excluded = torch.zeros_like(mask)
    excluded[1] = True
    for seed in range(5):
        new = random_grow(mask, 7, _gen(seed), excluded=excluded)
        grown = new & ~mask
        assert int(grown.sum()) == 7
        assert bool(new[0].all()) and not bool(grown[1].any())


def test_random_grow_matches_layerwise_dsr_growth_and_is_seeded() -> None:
    mask = torch.zeros(200, dtype=torch.bool)
    mask[::3] = True
    single = random_grow(mask, 9, _gen(5))
    assert torch.equal(single, random_grow(mask, 9, _gen(5)))
    assert torch.equal(single, grow_random([mask], None, torch.tensor([9]), _gen(5))[0])
    assert not torch.equal(single, random_grow(mask, 9, _gen(6)))


def test_random_grow_is_roughly_uniform() -> None:
    mask = _bool([True, False, False, False, False])
    generator = _gen(0)
    hits = torch.zeros(5)
    for _ in range(400):
        hits += (random_grow(mask, 1, generator) & ~mask).float()
    assert hits[0] == 0
    assert bool(((hits[1:] > 60) & (hits[1:] < 140)).all()), hits.tolist()


@pytest.mark.parametrize("count", [3, 40])  # 3 of 60 candidates: rejection draws; 40 of 60: randperm
def test_random_grow_both_samplers_give_uniform_pairs_and_exact_counts(count: int) -> None:
    # 100 positions: 20 active, 20 excluded, 60 candidates. Each candidate must be picked with probability
    # count / 60, whichever sampler random_grow uses for this count.
    mask = torch.zeros(100, dtype=torch.bool)
    mask[:20] = True
    excluded = torch.zeros(100, dtype=torch.bool)
    excluded[20:40] = True
    generator = _gen(1)
    hits = torch.zeros(100)
    trials = 600
    for _ in range(trials):
        new = random_grow(mask, count, generator, excluded=excluded)
        assert int((new & ~mask).sum()) == count and not (new & excluded).any() and torch.equal(new & mask, mask)
        hits += (new & ~mask).float()
    expected = trials * count / 60
    assert hits[:40].sum() == 0
    assert bool(((hits[40:] - expected).abs() < 5 * expected**0.5).all()), hits[40:].tolist()


def test_random_grow_rejects_count_above_candidates() -> None:
    with pytest.raises(ValueError, match="only 1 inactive"):
        random_grow(_bool([True, False, False]), 2, _gen(), excluded=_bool([False, True, False]))


# --- cosine_drop_fraction --------------------------------------------------------------------------------------


def test_cosine_drop_fraction_values() -> None:
    assert cosine_drop_fraction(0, 100) == pytest.approx(0.3)
    assert cosine_drop_fraction(50, 100) == pytest.approx(0.15)
    assert cosine_drop_fraction(100, 100) == 0.0
    assert cosine_drop_fraction(250, 100) == 0.0
    assert cosine_drop_fraction(25, 100, initial=0.5) == pytest.approx(0.25 * (1 + math.sqrt(0.5)))


def test_cosine_drop_fraction_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="end_step"):
        cosine_drop_fraction(0, 0)
    with pytest.raises(ValueError, match="step"):
        cosine_drop_fraction(-1, 10)
    with pytest.raises(ValueError, match="initial"):
        cosine_drop_fraction(0, 10, initial=1.5)


# --- set_update / rigl_update ----------------------------------------------------------------------------------


def test_set_update_drops_smallest_and_regrows_elsewhere() -> None:
    weight = torch.tensor([0.5, -0.1, 0.0, 0.3, 0.0, 0.0])
    mask = _bool([True, True, False, True, False, False])
    update = set_update(weight, mask, 0.34, _gen())  # k = floor(0.34 * 3) = 1
    assert isinstance(update, MaskUpdate)
    assert update.dropped.tolist() == [False, True, False, False, False, False]
    assert int(update.grown.sum()) == 1
    assert not bool(update.grown[[0, 1, 3]].any()), "SET grows only where the mask was inactive before"
    assert int(update.mask.sum()) == 3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_set_and_rigl_keep_nnz(device: str, fraction: float) -> None:
    torch.manual_seed(0)
    weight = torch.randn(8, 4, 3, 3, device=device)
    grad = torch.randn(8, 4, 3, 3, device=device)
    mask = torch.rand(8, 4, 3, 3, device=device) < 0.3
    nnz = int(mask.sum())
    k = math.floor(fraction * nnz)
    for update in (set_update(weight, mask, fraction, _gen()), rigl_update(weight, grad, mask, fraction)):
        assert int(update.mask.sum()) == nnz
        assert torch.equal(update.dropped, mask & ~update.mask)
        assert torch.equal(update.grown, update.mask & ~mask)
        assert int(update.dropped.sum()) == int(update.grown.sum()) <= k
    assert int(set_update(weight, mask, fraction, _gen()).grown.sum()) == k


def test_update_count_floors_decimal_products_correctly() -> None:
    mask = torch.ones(100, dtype=torch.bool)
    mask = torch.cat([mask, torch.zeros(100, dtype=torch.bool)])
    weight = torch.arange(200, dtype=torch.float32)
    # 0.29 * 100 == 28.999999999999996 in binary; the intended k is 29.
    assert int(set_update(weight, mask, 0.29, _gen()).dropped.sum()) == 29


def test_rigl_update_grows_largest_grad_among_not_kept() -> None:
    weight = torch.tensor([0.5, -0.1, 0.0, 0.3, 0.0, 0.0])
    grad = torch.tensor([0.0, 0.05, 0.9, 0.0, -0.4, 0.2])
    mask = _bool([True, True, False, True, False, False])
    update = rigl_update(weight, grad, mask, 0.67)  # k = floor(0.67 * 3) = 2: drop indices 1 and 3
    assert update.mask.tolist() == [True, False, True, False, True, False]
    assert update.dropped.tolist() == [False, True, False, True, False, False]
    assert update.grown.tolist() == [False, False, True, False, True, False]


def test_rigl_update_may_regrow_just_dropped_positions() -> None:
    weight = torch.tensor([0.5, -0.1, 0.0, 0.3, 0.0, 0.0])
    grad = torch.tensor([0.0, 5.0, 0.9, 0.0, 0.1, 0.0])
    mask = _bool([True, True, False, True, False, False])
    update = rigl_update(weight, grad, mask, 0.67)
    # Index 1 is dropped and regrown (largest |grad|): it is in neither net set and keeps its value.
    assert update.mask.tolist() == [True, True, True, False, False, False]
    assert update.dropped.tolist() == [False, False, False, True, False, False]
    assert update.grown.tolist() == [False, False, True, False, False, False]


def test_updates_reject_bad_fraction_and_too_dense_set() -> None:
    weight, mask = torch.tensor([0.1, 0.2, 0.3]), _bool([True, True, False])
    with pytest.raises(ValueError, match="drop_fraction"):
        set_update(weight, mask, 1.5, _gen())
    with pytest.raises(ValueError, match="drop_fraction"):
        rigl_update(weight, weight, mask, -0.1)
    with pytest.raises(ValueError, match="only 1 inactive"):
        set_update(weight, mask, 1.0, _gen())  # k = 2 but only one position was inactive before
