import math

import pytest

from lightning_sparse.functional.distributions import active_counts, erdos_renyi_score, layer_densities

# A small network whose ERK/ER numbers are worked out by hand below.
SHAPES = {"a": (4, 2, 3, 3), "b": (8, 4, 3, 3), "c": (10, 8)}  # 72, 288 and 80 weights: 440 in all


def test_scores_by_hand():
    assert erdos_renyi_score((4, 2, 3, 3)) == pytest.approx(12 / 72)  # (4+2+3+3)/(4*2*3*3)
    assert erdos_renyi_score((4, 2, 3, 3), kernel=False) == pytest.approx(6 / 8)  # (4+2)/(4*2)
    assert erdos_renyi_score((10, 8)) == pytest.approx(18 / 80)


def test_erk_dense_layer_loop_by_hand():
    # s = 0.5 -> budget 220. Scores 1/6, 1/16, 9/40; sum(score * N) = 12 + 18 + 18 = 48, eps = 220/48;
    # eps * 9/40 = 1.03 > 1, so "c" becomes dense (80 weights). Again: eps = (220 - 80) / 30 = 14/3,
    # giving a = 14/3 * 1/6 = 7/9 (56 weights) and b = 14/3 * 1/16 = 7/24 (84 weights).
    densities = layer_densities(SHAPES, 0.5, "erk")
    assert densities == pytest.approx({"a": 7 / 9, "b": 7 / 24, "c": 1.0})
    assert active_counts(SHAPES, densities) == {"a": 56, "b": 84, "c": 80}


def test_er_by_hand():
    # Scores 3/4, 3/8, 9/40; sum(score * N) = 54 + 108 + 18 = 180; eps = 220/180 = 11/9, no overflow.
    densities = layer_densities(SHAPES, 0.5, "er")
    assert densities == pytest.approx({"a": 11 / 12, "b": 11 / 24, "c": 11 / 40})
    assert active_counts(SHAPES, densities) == {"a": 66, "b": 132, "c": 22}


def test_uniform_and_power_scale_zero_are_the_same_density_everywhere():
    assert layer_densities(SHAPES, 0.75, "uniform") == pytest.approx(dict.fromkeys(SHAPES, 0.25))
    assert layer_densities(SHAPES, 0.75, "erk", power_scale=0.0) == pytest.approx(dict.fromkeys(SHAPES, 0.25))


def test_power_scale_flattens_erk():
    plain = layer_densities(SHAPES, 0.9, "erk")
    half = layer_densities(SHAPES, 0.9, "erk", power_scale=0.5)
    # A smaller exponent moves density from the small, high-score layers to the large one.
    assert half["b"] > plain["b"] and half["c"] < plain["c"]


def test_fixed_densities_take_their_share_first():
    # c fixed at density 0.5 (40 weights) leaves 220 - 40 = 180 for a and b: eps = 180/30 = 6 -> a = 1.0 exactly.
    densities = layer_densities(SHAPES, 0.5, "erk", fixed_densities={"c": 0.5})
    assert densities == pytest.approx({"a": 1.0, "b": 0.375, "c": 0.5})
    assert sum(active_counts(SHAPES, densities).values()) == 220


RESNETISH = {
    "stem": (64, 3, 3, 3),
    **{f"layer{i}.conv{j}": (c, c, 3, 3) for i, c in enumerate((64, 128, 256, 512), 1) for j in (1, 2)},
    "down": (512, 256, 1, 1),
    "fc": (10, 512),
}


@pytest.mark.parametrize("distribution", ["uniform", "er", "erk"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.99, 0.999])
def test_realised_count_is_the_budget(distribution, sparsity):
    densities = layer_densities(RESNETISH, sparsity, distribution)
    assert all(0 < d <= 1 for d in densities.values())
    counts = active_counts(RESNETISH, densities)
    total = sum(math.prod(s) for s in RESNETISH.values())
    # Within one weight per layer of (1 - s) x total (the floor of 1 active weight per layer included).
    assert abs(sum(counts.values()) - (1 - sparsity) * total) <= len(RESNETISH)
    for name, shape in RESNETISH.items():
        assert counts[name] >= 1
        assert abs(counts[name] - densities[name] * math.prod(shape)) <= 1


def test_erk_gives_small_layers_more_density():
    densities = layer_densities(RESNETISH, 0.9, "erk")
    assert densities["stem"] > densities["layer1.conv1"] > densities["layer4.conv2"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(sparsity=1.0), r"in \[0, 1\)"),
        (dict(sparsity=-0.1), r"in \[0, 1\)"),
        (dict(distribution="gaussian"), "unknown distribution 'gaussian'"),
        (dict(fixed_densities={"zzz": 0.5}), "not sparse"),
        (dict(fixed_densities={"a": 0.0}), r"\(0, 1\]"),
        (dict(sparsity=0.9, fixed_densities={"b": 1.0}), "leaves nothing"),
    ],
)
def test_bad_input_says_what_to_change(kwargs, message):
    arguments = dict(shapes=SHAPES, sparsity=0.5, distribution="erk") | kwargs
    with pytest.raises(ValueError, match=message):
        layer_densities(**arguments)


def test_active_counts_sum_exactly_to_a_given_total():
    densities = dict.fromkeys(SHAPES, 1 / 3)
    counts = active_counts(SHAPES, densities, total=147)
    assert sum(counts.values()) == 147  # 24 + 96 + 26.67 -> largest remainder gives c its 27th weight
    assert counts == {"a": 24, "b": 96, "c": 27}
