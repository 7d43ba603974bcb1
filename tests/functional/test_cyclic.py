"""Tests for lightning_sparse.functional.cyclic (EAST cyclic sparsity, docs/algorithms.md §3e)."""

from __future__ import annotations

import pytest

from lightning_sparse.functional.cyclic import cycle_lengths, cycle_position, cyclic_density


def test_cosine_density_matches_east_example() -> None:
    # ResNet-34 / CIFAR-10 at 99.9% sparsity: d' = 0.00190, d_max = 3 d'.
    d_min = 0.0019035
    expected = {0.0: 0.00190, 0.25: 0.00381, 0.5: 0.00571, 0.75: 0.00381}
    for position, density in expected.items():
        assert cyclic_density(position, d_min, 3 * d_min) == pytest.approx(density, abs=5e-6)


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ("cosine", [0.1, 0.1 + 0.4 * 0.5 * (1 - 0.5**0.5), 0.3, 0.5, 0.3, 0.1]),
        ("triangular", [0.1, 0.2, 0.3, 0.5, 0.3, 0.1]),
    ],
)
def test_density_shapes(shape: str, expected: list[float]) -> None:
    positions = [0.0, 0.125, 0.25, 0.5, 0.75, 1.0]
    values = [cyclic_density(p, 0.1, 0.5, shape) for p in positions]
    assert values == pytest.approx(expected)


def test_density_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="position"):
        cyclic_density(1.5, 0.1, 0.5)
    with pytest.raises(ValueError, match="d_min <= d_max"):
        cyclic_density(0.5, 0.5, 0.1)
    with pytest.raises(ValueError, match="d_min <= d_max"):
        cyclic_density(0.5, 0.0, 0.1)
    with pytest.raises(ValueError, match="shape"):
        cyclic_density(0.5, 0.1, 0.5, shape="sine")


def test_cycle_lengths() -> None:
    assert cycle_lengths(50, 2, 1.0) == [50, 50]
    assert cycle_lengths(50, 2, 2.0) == [50, 100]
    assert cycle_lengths(4, 3, 1.5) == [4, 6, 9]
    assert cycle_lengths(10, 0, 2.0) == []
    with pytest.raises(ValueError, match="first"):
        cycle_lengths(0, 2, 1.0)
    with pytest.raises(ValueError, match="multiplier"):
        cycle_lengths(10, 2, 0.0)


@pytest.mark.parametrize(
    ("step", "expected"),
    [(0, (0, 0.0)), (25, (0, 0.5)), (49, (0, 0.98)), (50, (1, 0.0)), (75, (1, 0.25)), (149, (1, 0.99)), (150, None)],
)
def test_cycle_position(step: int, expected: tuple[int, float] | None) -> None:
    result = cycle_position(step, [50, 100])
    if expected is None:
        assert result is None
    else:
        assert result[0] == expected[0]
        assert result[1] == pytest.approx(expected[1])


def test_cycle_position_rejects_bad_inputs() -> None:
    assert cycle_position(0, []) is None
    with pytest.raises(ValueError, match="step"):
        cycle_position(-1, [10])
    with pytest.raises(ValueError, match="cycle length"):
        cycle_position(5, [0, 10])
