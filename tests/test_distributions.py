import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import sparseopt
from sparseopt.masks.distributions import active_counts, layer_densities, uniform_densities

# ResNet-20 (CIFAR) weight shapes: stem, 3 stages x 3 blocks x 2 convs, 1x1 shortcuts, fc.
RESNET20_SHAPES = (
    [(16, 3, 3, 3)]
    + [(16, 16, 3, 3)] * 6
    + [(32, 16, 3, 3)] + [(32, 32, 3, 3)] * 5 + [(32, 16, 1, 1)]
    + [(64, 32, 3, 3)] + [(64, 64, 3, 3)] * 5 + [(64, 32, 1, 1)]
    + [(10, 64)]
)


def erk_by_bisection(shapes, sparsity):
    """Independent formulation: d_l = min(1, eps * raw_l), eps by bisection on the total."""
    numel = np.array([math.prod(s) for s in shapes], dtype=np.float64)
    raw = np.array([sum(s) / math.prod(s) for s in shapes])
    target = (1 - sparsity) * numel.sum()
    lo, hi = 0.0, 1.0 / raw.min() + 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if (np.minimum(1.0, mid * raw) * numel).sum() < target:
            lo = mid
        else:
            hi = mid
    return np.minimum(1.0, lo * raw)


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9, 0.95, 0.97, 0.99])
def test_erk_matches_independent_calculation(sparsity):
    ours = np.array(sparseopt.erk_densities(RESNET20_SHAPES, sparsity))
    ref = erk_by_bisection(RESNET20_SHAPES, sparsity)
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-12)
    numel = np.array([math.prod(s) for s in RESNET20_SHAPES])
    assert (ours * numel).sum() == pytest.approx((1 - sparsity) * numel.sum(), rel=1e-12)


def test_erk_small_layers_become_dense_at_moderate_sparsity():
    d = sparseopt.erk_densities(RESNET20_SHAPES, 0.5)
    assert d[0] == 1.0 and d[-1] == 1.0  # stem and fc: highest ERK score
    assert all(0 < x <= 1 for x in d)


def test_er_ignores_kernel_dims_and_power_scale_zero_is_uniform():
    shapes = [(16, 3, 3, 3), (64, 64, 3, 3)]
    er = sparseopt.erk_densities(shapes, 0.99, kernel=False)  # no layer capped at density 1
    raw = [(16 + 3) / (16 * 3), (64 + 64) / (64 * 64)]
    assert er[0] / er[1] == pytest.approx(raw[0] / raw[1])
    flat = sparseopt.erk_densities(shapes, 0.9, power_scale=0.0)
    assert flat == pytest.approx([0.1, 0.1])


def test_uniform_and_custom():
    assert uniform_densities([(4, 4), (8, 8)], 0.75) == [0.25, 0.25]
    d = layer_densities(["a", "b"], [(4, 4), (8, 8)], 0.5, "custom", custom={"a": 0.1, "b": 0.9})
    assert d == pytest.approx([0.9, 0.1])


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "x"])
def test_sparsity_outside_range_is_rejected(bad):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        sparseopt.erk_densities([(4, 4)], bad)


def test_unknown_distribution_and_bad_custom_maps():
    with pytest.raises(ValueError, match="unknown distribution 'erkk'.*uniform"):
        layer_densities(["a"], [(4, 4)], 0.5, "erkk")
    with pytest.raises(ValueError, match="missing layers \\['b'\\]"):
        layer_densities(["a", "b"], [(4, 4), (4, 4)], 0.5, "custom", custom={"a": 0.5})
    with pytest.raises(ValueError, match="unknown layers \\['c'\\]"):
        layer_densities(["a"], [(4, 4)], 0.5, "custom", custom={"a": 0.5, "c": 0.5})
    with pytest.raises(ValueError, match="needs a per-layer map"):
        layer_densities(["a"], [(4, 4)], 0.5, "custom")


shapes_st = st.lists(
    st.one_of(
        st.tuples(st.integers(1, 64), st.integers(1, 64)),
        st.tuples(st.integers(1, 32), st.integers(1, 32), st.sampled_from([1, 3, 5]), st.sampled_from([1, 3, 5])),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(shapes=shapes_st, sparsity=st.floats(0.0, 0.99), dist=st.sampled_from(["uniform", "er", "erk"]))
@example(shapes=[(10, 23)], sparsity=0.25, dist="er")  # a budget of 172.5: float noise picks the side of the tie
def test_integer_counts_exact(shapes, sparsity, dist):
    names = [f"l{i}" for i in range(len(shapes))]
    densities = layer_densities(names, shapes, sparsity, dist)
    numels = [math.prod(s) for s in shapes]
    counts = active_counts(numels, densities)
    target = round((1 - sparsity) * sum(numels))
    for c, d, n in zip(counts, densities, numels):
        assert 1 <= c <= n
        assert abs(c - d * n) <= 1.0 + 1e-9 or c == 1
    # Exact unless a layer had to be raised to its minimum of one weight, or the budget is a tie at .5, where
    # the densities' last bit (0.7500000000000001 * 230) decides the rounding.
    tie = abs((1 - sparsity) * sum(numels) % 1 - 0.5) < 1e-9
    assert abs(sum(counts) - target) <= sum(1 for c, d, n in zip(counts, densities, numels) if d * n < 1) + tie
