"""Properties of the sparsifiers in mergebuild/methods/sparsify.py (hypothesis)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergebuild import rng
from mergebuild.methods import sparsify

#: Few distinct magnitudes, so that ties at the threshold are common.
coarse = st.lists(st.integers(-4, 4), min_size=1, max_size=120).map(
    lambda xs: torch.tensor(xs, dtype=torch.float32) * 0.25
)
#: Ordinary floats, occasionally tied.
fine = st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=1, max_size=120).map(
    lambda xs: torch.tensor(xs, dtype=torch.float32)
)
deltas = st.one_of(coarse, fine)
densities = st.floats(0.001, 1.0, exclude_min=False)

#: Derandomized (the same examples every run, so CI cannot flake) and without an
#: example database (the tests leave no files behind).
FAST = settings(max_examples=150, deadline=None, database=None, derandomize=True)


@FAST
@given(delta=deltas, density=densities)
def test_magnitude_keeps_exactly_k(delta: torch.Tensor, density: float) -> None:
    mask = sparsify.magnitude(delta, density)
    assert mask.dtype == torch.bool and mask.shape == delta.shape
    assert int(mask.sum()) == max(1, int(density * delta.numel()))


@FAST
@given(delta=deltas, density=densities)
def test_magnitude_keeps_the_largest(delta: torch.Tensor, density: float) -> None:
    mask = sparsify.magnitude(delta, density)
    mags = delta.abs()
    if (~mask).any():
        assert mags[mask].min() >= mags[~mask].max()


@pytest.mark.parametrize(
    ("values", "density", "expected"),
    [
        ([1.0, 1.0, 1.0, 1.0], 0.5, [True, True, False, False]),
        ([0.5, -2.0, 0.5, 0.5, 0.1], 0.4, [True, True, False, False, False]),
        ([3.0, 3.0, -3.0], 0.1, [True, False, False]),
    ],
)
def test_magnitude_ties_keep_the_lowest_flat_index(
    values: list[float], density: float, expected: list[bool]
) -> None:
    assert sparsify.magnitude(torch.tensor(values), density).tolist() == expected


@FAST
@given(delta=coarse, density=densities)
def test_magnitude_ties_keep_the_lowest_flat_index_property(delta: torch.Tensor, density: float) -> None:
    mask = sparsify.magnitude(delta, density)
    flat = delta.abs().tolist()
    k = max(1, int(density * len(flat)))
    order = sorted(range(len(flat)), key=lambda j: (-flat[j], j))
    expected = torch.zeros(len(flat), dtype=torch.bool)
    expected[order[:k]] = True
    assert mask.tolist() == expected.tolist()


@FAST
@given(delta=coarse, density=densities)
def test_magnitude_mask_depends_only_on_magnitudes_and_positions(delta: torch.Tensor, density: float) -> None:
    # Same magnitudes, other signs: same mask (no unstable sort involved).
    flipped = delta * torch.where(torch.arange(delta.numel()) % 2 == 0, 1.0, -1.0)
    assert torch.equal(sparsify.magnitude(delta, density), sparsify.magnitude(flipped, density))


@FAST
@given(delta=deltas, density=densities, gamma=st.floats(0.0, 0.99))
def test_breadcrumbs_count_and_kept_range(delta: torch.Tensor, density: float, gamma: float) -> None:
    n = delta.numel()
    mask = sparsify.magnitude_outliers(delta, density, gamma)
    target = int(density * n)
    assert int(mask.sum()) == target
    # Stable ascending ranks (ties by flat index): the kept block is contiguous.
    flat = delta.abs().tolist()
    order = sorted(range(n), key=lambda j: (flat[j], j))
    ranks = [0] * n
    for r, j in enumerate(order):
        ranks[j] = r
    kept_ranks = sorted(ranks[j] for j in range(n) if mask.reshape(-1)[j])
    bottom = max(0, n - target - int(gamma * n))
    assert kept_ranks == list(range(bottom, bottom + target))
    # So: the dropped top are the largest, the dropped bottom the smallest.
    top_dropped = n - bottom - target
    assert top_dropped == min(int(gamma * n), n - target)
    mags = delta.abs().reshape(-1)
    kept = mags[mask.reshape(-1)]
    if target and bottom:
        assert kept.min() >= mags[[order[r] for r in range(bottom)]].max()
    if target and top_dropped:
        assert kept.max() <= mags[[order[r] for r in range(bottom + target, n)]].min()


@FAST
@given(values=st.lists(st.integers(0, 3), min_size=2, max_size=60), lo=st.integers(0, 60))
def test_keep_rank_range_breaks_ties_by_flat_index(values: list[int], lo: int) -> None:
    w = torch.tensor(values, dtype=torch.float32)
    n = len(values)
    lo = min(lo, n - 1)
    hi = min(n, lo + 1 + (lo * 7) % n)
    mask = sparsify.keep_rank_range(w, lo, hi)
    order = sorted(range(n), key=lambda j: (values[j], j))
    expected = [False] * n
    for j in order[lo:hi]:
        expected[j] = True
    assert mask.tolist() == expected


@settings(max_examples=10, deadline=None, database=None, derandomize=True)
@given(density=st.floats(0.02, 0.98), key=st.integers(0, 2**64 - 1))
def test_random_kept_fraction_is_close_to_density(density: float, key: int) -> None:
    n = 200_000
    mask = sparsify.random(rng.uniform(key, 0, n), density)
    fraction = float(mask.sum()) / n
    assert abs(fraction - density) < 5 * math.sqrt(density * (1 - density) / n)


@FAST
@given(delta=deltas, keep=st.lists(st.booleans(), min_size=120, max_size=120))
def test_rescale_l1_preserves_the_l1_norm(delta: torch.Tensor, keep: list[bool]) -> None:
    mask = torch.tensor(keep[: delta.numel()])
    kept = delta * mask
    out = sparsify.rescale_l1(delta, kept)
    before, after = float(delta.abs().sum()), float(kept.abs().sum())
    if before < 1e-7 or after < 1e-7:
        assert torch.equal(out, kept)
    else:
        assert math.isclose(float(out.abs().sum()), before, rel_tol=1e-5)
        # Only a scale: zeros stay zero and signs stay.
        assert torch.equal(out == 0, kept == 0)
        assert torch.equal(out.sign(), kept.sign())


shapes2d = st.tuples(st.integers(1, 6), st.integers(1, 12))


@FAST
@given(
    shape=shapes2d,
    seed=st.integers(0, 1000),
    density=st.floats(0.2, 0.8),
    epsilon=st.floats(0.0, 0.19),
    u=st.floats(0.0, 1.0, exclude_max=True),
)
def test_della_keep_probability_is_monotone_in_rank(
    shape: tuple[int, int], seed: int, density: float, epsilon: float, u: float
) -> None:
    delta = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    # One uniform for every element: an element is kept iff its probability
    # exceeds u, so the mask reveals the order of the probabilities.
    mask = sparsify.della(delta, torch.full(shape, u, dtype=torch.float64), density, epsilon)
    mags = delta.abs()
    for row_mask, row_mags in zip(mask, mags, strict=True):
        if row_mask.any():
            # Everything larger than a kept element is kept.
            smallest_kept = row_mags[row_mask].min()
            assert row_mask[row_mags > smallest_kept].all()
        length = row_mags.numel()
        ranks = row_mags.argsort(stable=True).argsort()
        spread = ranks.double() / (length - 1) if length > 1 else torch.full((1,), 0.5, dtype=torch.float64)
        probs = (density - epsilon) + spread * 2 * epsilon
        # The probabilities may round differently in the last bit; only a u on
        # that boundary may then land on the other side.
        differ = row_mask != (u < probs)
        assert ((probs[differ] - u).abs() < 1e-12).all()


@settings(max_examples=5, deadline=None, database=None, derandomize=True)
@given(density=st.floats(0.3, 0.7), epsilon=st.floats(0.05, 0.25), key=st.integers(0, 2**32))
def test_della_keeps_large_magnitudes_more_often(density: float, epsilon: float, key: int) -> None:
    rows, length = 2000, 50
    delta = torch.randn(rows, length, generator=torch.Generator().manual_seed(key))
    mask = sparsify.della(delta, rng.uniform(key, 0, rows * length).reshape(rows, length), density, epsilon)
    ranks = delta.abs().argsort(dim=1).argsort(dim=1)
    low = float(mask[ranks < 10].double().mean())
    high = float(mask[ranks >= length - 10].double().mean())
    # Expected rates about density -+ 0.82 epsilon; their gap dwarfs the noise.
    assert high - low > epsilon
    assert abs(float(mask.double().mean()) - density) < 0.01
