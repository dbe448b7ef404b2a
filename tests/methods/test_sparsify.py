"""Properties of the sparsifiers in mergebuild/methods/sparsify.py (hypothesis)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from fractions import Fraction
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergebuild import native, rng
from mergebuild.catalog import BlockGrid
from mergebuild.methods import delta_stats, fixed_point, sparsify
from mergebuild.methods.delta_stats import DeltaStats, block_stats
from mergebuild.methods.sparse_delta import Difference, keep_in_place
from tests.conftest import jobs

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


def flat(uniforms: torch.Tensor) -> sparsify.UniformWords:
    """della's draws, asked for by flat element range, from a tensor of float64 uniforms in
    [0, 1): as the words of those uniforms rounded down to a multiple of 2^-53 (exact for
    `rng.uniform`'s and `torch.rand`'s)."""
    top_53 = (uniforms.reshape(-1).numpy() * 2.0**53).astype(np.uint64)
    words = torch.from_numpy(((top_53 << np.uint64(11)) ^ np.uint64(1 << 63)).view(np.int64))
    return lambda part: words[part]


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
    mask = rng.keep_mask(key, 0, n, density)
    fraction = float(mask.sum()) / n
    assert abs(fraction - density) < 5 * math.sqrt(density * (1 - density) / n)


@FAST
@given(delta=deltas, keep=st.lists(st.booleans(), min_size=120, max_size=120))
def test_rescale_preserves_the_l1_norm(delta: torch.Tensor, keep: list[bool]) -> None:
    mask = torch.tensor(keep[: delta.numel()])
    kept = delta * mask
    out = rescaled(delta, mask)
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
    mask = sparsify.della(delta, flat(torch.full(shape, u, dtype=torch.float64)), density, epsilon)
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
    mask = sparsify.della(delta, flat(rng.uniform(key, 0, rows * length)), density, epsilon)
    ranks = delta.abs().argsort(dim=1).argsort(dim=1)
    low = float(mask[ranks < 10].double().mean())
    high = float(mask[ranks >= length - 10].double().mean())
    # Expected rates about density -+ 0.82 epsilon; their gap dwarfs the noise.
    assert high - low > epsilon
    assert abs(float(mask.double().mean()) - density) < 0.01


# ----- the radix-select implementations against the sort-based originals -----
#
# The reference_* functions are the implementations the radix select replaced
# (kthvalue + full-length cumsum, argsort): simple, and the oracle here. The new
# code must return the very same masks, ties included.


def reference_keep_rank_range(magnitudes: torch.Tensor, lo_rank: int, hi_rank: int) -> torch.Tensor:
    w = magnitudes.reshape(-1)
    if hi_rank <= lo_rank or w.numel() == 0:
        return torch.zeros(magnitudes.shape, dtype=torch.bool)
    lo = torch.kthvalue(w, lo_rank + 1).values
    hi = torch.kthvalue(w, hi_rank).values
    keep = (w > lo) & (w < hi)
    for boundary in (lo, hi) if lo != hi else (lo,):
        eq = w == boundary
        ranks = torch.cumsum(eq, dim=0) - 1 + int((w < boundary).sum())
        keep |= eq & (ranks >= lo_rank) & (ranks < hi_rank)
    return keep.reshape(magnitudes.shape)


def reference_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    w = delta.abs().reshape(-1)
    n = w.numel()
    k = max(1, int(density * n))
    threshold = torch.kthvalue(w, n - k + 1).values
    keep = w > threshold
    tied = w == threshold
    keep |= tied & (torch.cumsum(tied, dim=0) <= k - int(keep.sum()))
    return keep.reshape(delta.shape)


def reference_magnitude_outliers(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    n = delta.numel()
    target = int(density * n)
    n_bottom = max(0, n - target - int(gamma * n))
    return reference_keep_rank_range(delta.abs(), n_bottom, n_bottom + target)


def reference_della(
    delta: torch.Tensor, uniforms: torch.Tensor, density: float, epsilon: float
) -> torch.Tensor:
    mags = delta.abs() if delta.dim() >= 2 else delta.abs().reshape(1, -1)
    mags = mags.movedim(1, -1)
    length = mags.shape[-1]
    order = torch.argsort(mags, dim=-1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(length).expand_as(order))
    if length > 1:
        rank_norm = ranks.to(torch.float64) / (length - 1)
    else:
        rank_norm = torch.full(ranks.shape, 0.5, dtype=torch.float64)
    probs = (density - epsilon) + rank_norm * (2 * epsilon)
    return uniforms < probs.movedim(-1, 1).reshape(delta.shape)


def rescaled(delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`delta * mask` rescaled by sparsify.rescale_factor, as the task-arithmetic family applies it."""
    factor = sparsify.rescale_factor(delta, mask)
    kept = keep_in_place(delta.clone(), mask)
    return kept if factor is None else kept.mul_(factor)


def exact_l1(x: torch.Tensor) -> Fraction:
    """The L1 norm of `x`, exactly."""
    return sum((Fraction(v) for v in x.abs().reshape(-1).tolist()), Fraction(0))


def reference_rescale_l1(delta: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """`kept` times the exact L1 ratio rounded to float32 (DESIGN.md section 5, step 3)."""
    before, after = exact_l1(delta), exact_l1(kept)
    if before < 1e-7 or after < 1e-7:
        return kept
    return kept * torch.tensor(float(before / after), dtype=torch.float32)


def narrow(x: torch.Tensor) -> bool:
    """Whether every nonzero |x| is at least 2^-38 of the largest: the rescale's fixed-point
    sums are then exact."""
    magnitudes = x.abs().double()
    nonzero = magnitudes[magnitudes > 0]
    return nonzero.numel() == 0 or bool(nonzero.min() >= magnitudes.max() * 2.0**-38)


#: Shapes from 0-d to 3-d, mostly small so that blocks of a few elements split them.
tensor_shapes = st.one_of(
    st.just(()),
    st.tuples(st.integers(1, 80)),
    st.tuples(st.integers(1, 9), st.integers(1, 12)),
    st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 4)),
)


@st.composite
def tied_tensors(draw: st.DrawFn, dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> torch.Tensor:
    """Float tensors with the ties real deltas have: bf16-rounded, many (signed) zeros,
    all-equal, a few distinct values; in float32 or another float dtype."""
    shape = draw(tensor_shapes)
    n = math.prod(shape)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["normal", "bf16", "zeros", "equal", "coarse", "huge"]))
    if kind == "normal":
        x = torch.randn(n, generator=g)
    elif kind == "bf16":
        x = (torch.randn(n, generator=g) * 0.01).to(torch.bfloat16).float()
    elif kind == "zeros":
        x = torch.randn(n, generator=g) * (torch.rand(n, generator=g) < 0.3)
        x = torch.where(torch.rand(n, generator=g) < 0.5, x, -x)  # -0.0 as well as 0.0
    elif kind == "equal":
        x = torch.full((n,), draw(st.sampled_from([0.0, -0.0, 1.0, -3.5, 1e-40])))
    elif kind == "coarse":
        x = torch.randint(-3, 4, (n,), generator=g).float() * 0.5
    else:  # extremes of the float32 range, subnormals
        x = torch.tensor([3e38, -3e38, 1e-45, -1e-45, 1.0, 0.0], dtype=torch.float32)[
            torch.randint(0, 6, (n,), generator=g)
        ]
    return x.reshape(shape).to(draw(st.sampled_from(dtypes)))


#: How order statistics are found for tensors of every size, in blocks of how many
#: elements (tiny blocks make every tie and flip cross blocks): "bracket", one pass over
#: brackets that the sample makes wide; "narrow", brackets of a few sample elements that
#: often miss, so the radix select runs after a wasted pass; "radix", the radix select
#: only (a GPU's path). None: the configuration as shipped (small tensors take the
#: kthvalue path).
blocks = st.one_of(
    st.just(None),
    st.tuples(st.sampled_from([1, 2, 3, 5, 16]), st.sampled_from(["bracket", "narrow", "radix"])),
)


@contextlib.contextmanager
def radix_path(block: tuple[int, str] | None) -> Iterator[None]:
    """With a block size and a path (see `blocks`): that path for every size."""
    if block is None:
        yield
        return
    size, path = block
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(sparsify, "_BLOCK", size))
        stack.enter_context(mock.patch.object(sparsify, "_SMALL", 0))
        if path == "narrow":
            stack.enter_context(mock.patch.object(sparsify, "_SIGMAS", 0.0))
        if path == "radix":
            stack.enter_context(mock.patch.object(sparsify, "_bracketed_mask", lambda *_: None))
        yield


KEYED = (torch.float32, torch.float32, torch.bfloat16, torch.float16, torch.float64)
EQUIV = settings(max_examples=300, deadline=None, database=None, derandomize=True)


@st.composite
def rank_densities(draw: st.DrawFn, n: int) -> float:
    return draw(st.one_of(st.sampled_from([1 / max(n, 1), 1.0, 0.5, 0.999]), st.floats(0.0, 1.0)))


@EQUIV
@given(delta=tied_tensors(KEYED), block=blocks, data=st.data())
def test_magnitude_equals_the_reference(delta: torch.Tensor, block: int, data: st.DataObject) -> None:
    density = data.draw(rank_densities(delta.numel()))
    with radix_path(block):
        mask = sparsify.magnitude(delta, density)
    assert mask.shape == delta.shape and mask.dtype == torch.bool
    assert torch.equal(mask, reference_magnitude(delta, density))


@EQUIV
@given(delta=tied_tensors(KEYED), block=blocks, gamma=st.sampled_from([0.0, 0.01, 0.1, 0.5]), data=st.data())
def test_magnitude_outliers_equals_the_reference(
    delta: torch.Tensor, block: int, gamma: float, data: st.DataObject
) -> None:
    density = data.draw(rank_densities(delta.numel()))
    with radix_path(block):
        mask = sparsify.magnitude_outliers(delta, density, gamma)
    assert mask.shape == delta.shape
    assert torch.equal(mask, reference_magnitude_outliers(delta, density, gamma))


@EQUIV
@given(values=tied_tensors(KEYED), block=blocks, data=st.data())
def test_keep_rank_range_equals_the_reference(values: torch.Tensor, block: int, data: st.DataObject) -> None:
    # Signed values (sce ranks -variance): negatives, -0.0 equal to 0.0.
    n = values.numel()
    lo = data.draw(st.integers(0, n - 1))
    hi = data.draw(st.one_of(st.just(n), st.integers(lo + 1, n)))
    with radix_path(block):
        mask = sparsify.keep_rank_range(values, lo, hi)
    assert mask.shape == values.shape
    assert torch.equal(mask, reference_keep_rank_range(values, lo, hi))
    neg = -values.abs()
    with radix_path(block):
        assert torch.equal(sparsify.keep_rank_range(neg, 0, hi), reference_keep_rank_range(neg, 0, hi))


@pytest.mark.parametrize("n", [1, 2, 3, 1000])
@pytest.mark.parametrize("value", [0.0, -0.0, 2.5])
def test_all_equal_tensors(n: int, value: float) -> None:
    # Every element ties with the threshold: the lowest flat indices win.
    delta = torch.full((n,), value)
    for density in (1 / n, 0.5, 1.0):
        k = max(1, int(density * n))
        assert sparsify.magnitude(delta, density).tolist() == [True] * k + [False] * (n - k)
    for path in ("bracket", "radix"):
        with radix_path((7, path)):
            assert torch.equal(sparsify.magnitude(delta, 0.3), reference_magnitude(delta, 0.3))
            lo, hi = n // 3, n - n // 4
            expected = reference_keep_rank_range(delta, lo, hi)
            assert torch.equal(sparsify.keep_rank_range(delta, lo, hi), expected)


def test_large_tensor_with_heavy_ties_spanning_blocks() -> None:
    # bf16 deltas (few distinct values, most of them zero) over many default-size blocks.
    g = torch.Generator().manual_seed(5)
    n = 3 * sparsify._BLOCK + 12345
    base = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
    expert = (base.float() + torch.randn(n, generator=g) * 0.0005).to(torch.bfloat16)
    delta = expert.float() - base.float()
    for density in (0.1, 0.5, 0.9):
        assert torch.equal(sparsify.magnitude(delta, density), reference_magnitude(delta, density))
        assert torch.equal(
            sparsify.magnitude_outliers(delta, density, 0.01),
            reference_magnitude_outliers(delta, density, 0.01),
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_large_delta_takes_one_bracketed_pass(dtype: torch.dtype) -> None:
    # Sampled (more elements than the sample holds), over several blocks, with and without
    # outliers: the brackets hold the ranks, so the radix select never runs.
    g = torch.Generator().manual_seed(11)
    n = 29 * 73_000  # about two blocks
    base = (torch.randn(n, generator=g) * 0.02).to(dtype)
    expert = (base.float() + torch.randn(n, generator=g) * 0.001).to(dtype)
    delta = Difference(expert.reshape(-1, 29), base.reshape(-1, 29))
    whole = delta.whole()
    with mock.patch.object(sparsify, "_select", side_effect=AssertionError("the radix select ran")):
        for density in (0.05, 0.5, 0.9):
            assert torch.equal(sparsify.magnitude(delta, density), reference_magnitude(whole, density))
            assert torch.equal(
                sparsify.magnitude_outliers(delta, density, 0.01),
                reference_magnitude_outliers(whole, density, 0.01),
            )


@pytest.mark.parametrize("density", [0.5, 0.9])
def test_a_heavy_tie_at_the_threshold_is_resolved_from_the_tie_counts(density: float) -> None:
    # Most of the delta is exactly zero and the threshold falls among the zeros: gathering
    # them would cost too much, so one pass counts the ties and the blocks whose ties are
    # dropped are made again; no radix select.
    g = torch.Generator().manual_seed(12)
    n = 3 * sparsify._BLOCK + 999
    delta = torch.randn(n, generator=g) * (torch.rand(n, generator=g) < 0.3)
    selects = mock.Mock(wraps=sparsify._select)
    tied = mock.Mock(wraps=sparsify._tied_mask)
    with mock.patch.object(sparsify, "_select", selects), mock.patch.object(sparsify, "_tied_mask", tied):
        assert torch.equal(sparsify.magnitude(delta, density), reference_magnitude(delta, density))
    # The native kernel counts a tie the sample puts on one key in its own pass.
    assert selects.call_count == 0 and tied.call_count == (0 if native.library() is not None else 1)


@pytest.mark.parametrize("lo", [0.2, 0.5, 0.69])
def test_a_lower_bound_in_a_heavy_tie_drops_the_first_tied_elements(lo: float) -> None:
    # keep_rank_range with only a lower rank: of the elements tied at it, the first ones in
    # flat order rank below it and are dropped.
    g = torch.Generator().manual_seed(13)
    n = 2 * sparsify._BLOCK + 77
    values = torch.rand(n, generator=g) * (torch.rand(n, generator=g) < 0.3)
    selects = mock.Mock(wraps=sparsify._select)
    with mock.patch.object(sparsify, "_select", selects):
        mask = sparsify.keep_rank_range(values, int(lo * n), n)
    assert torch.equal(mask, reference_keep_rank_range(values, int(lo * n), n))
    assert selects.call_count == 0


def test_a_tie_the_sample_misplaces_falls_back_to_the_radix_select(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(14)
    n = 2 * sparsify._BLOCK + 5
    delta = torch.randn(n, generator=g) * (torch.rand(n, generator=g) < 0.3)
    # A sample of one repeated key that is not at the threshold: the tie pass finds the
    # rank outside that key's ties and gives up.
    misleading = np.full(2048, int(torch.tensor(0.5).view(torch.int32)), dtype=np.int32)
    monkeypatch.setattr(sparsify._Keys, "sample", lambda self: misleading)
    selects = mock.Mock(wraps=sparsify._select)
    with mock.patch.object(sparsify, "_select", selects):
        assert torch.equal(sparsify.magnitude(delta, 0.5), reference_magnitude(delta, 0.5))
    assert selects.call_count == 1


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("shape", [(700, 3000), (9, 4000, 300), (5, 1 << 21)])
def test_della_over_slices_of_rows_equals_the_reference(shape: tuple[int, ...], threads: int) -> None:
    # Big enough that della works through several slices of rows (or, with rows longer
    # than a slice, one row at a time), with bf16 ties, on one thread or side by side.
    g = torch.Generator().manual_seed(11)
    delta = (torch.randn(shape, generator=g) * 0.001).to(torch.bfloat16).float()
    uniforms = torch.rand(shape, dtype=torch.float64, generator=g)
    with jobs(threads):
        mask = sparsify.della(delta, flat(uniforms), 0.5, 0.1)
    assert torch.equal(mask, reference_della(delta, uniforms, 0.5, 0.1))


@EQUIV
@given(
    delta=tied_tensors((torch.float32, torch.bfloat16, torch.float64)),
    seed=st.integers(0, 2**32 - 1),
    density=st.floats(0.2, 0.8),
    epsilon=st.floats(0.0, 0.19),
)
def test_della_equals_the_reference(delta: torch.Tensor, seed: int, density: float, epsilon: float) -> None:
    uniforms = torch.rand(delta.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    mask = sparsify.della(delta, flat(uniforms), density, epsilon)
    assert mask.shape == delta.shape
    assert torch.equal(mask, reference_della(delta, uniforms, density, epsilon))


@EQUIV
@given(
    delta=tied_tensors(),
    keep=st.floats(0.0, 1.0),
    seed=st.integers(0, 1000),
    piece=st.sampled_from([1, 3, 7, fixed_point._HOST_PIECE]),
)
def test_rescale_equals_the_reference(delta: torch.Tensor, keep: float, seed: int, piece: int) -> None:
    mask = torch.rand(delta.shape, generator=torch.Generator().manual_seed(seed)) < keep
    kept = delta * mask
    # The fixed-point sums' pieces (a few elements here) split a block without changing it.
    with mock.patch.object(fixed_point, "_HOST_PIECE", piece):
        out = rescaled(delta, mask)
    expected = reference_rescale_l1(delta, kept)
    assert out.dtype == expected.dtype
    if narrow(delta):
        # Bit for bit, up to the sign of a dropped element's zero (+0.0 here, the delta's
        # sign in the reference), which adding +0.0 erases as every sum over models does.
        assert torch.equal(out.add(0.0).view(torch.int32), expected.add(0.0).view(torch.int32))
    else:
        # Elements below 2^-38 of the largest lose their last bits to the fixed point.
        assert torch.allclose(out, expected, rtol=1e-6, atol=0)


@EQUIV
@given(expert=tied_tensors((torch.bfloat16, torch.float32)), block=blocks, data=st.data())
def test_rescale_and_della_of_a_difference_equal_those_of_the_whole_delta(
    expert: torch.Tensor, block: int | None, data: st.DataObject
) -> None:
    base = (torch.arange(expert.numel()) % 7 * 0.25 - 0.75).reshape(expert.shape)
    delta = expert.float() - base
    lazy = Difference(expert, base)
    mask = (
        torch.rand(delta.shape, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99)))) < 0.5
    )
    uniforms = torch.rand(delta.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with mock.patch.object(sparsify, "_BLOCK", block[0] if block else sparsify._BLOCK):
        whole, streamed = sparsify.rescale_factor(delta, mask), sparsify.rescale_factor(lazy, mask)
        assert (whole is None) == (streamed is None)
        assert whole is None or torch.equal(whole, streamed)
        della = sparsify.della(delta, flat(uniforms), 0.5, 0.2)
        assert torch.equal(sparsify.della(lazy, flat(uniforms), 0.5, 0.2), della)
        assert torch.equal(della, reference_della(delta, uniforms, 0.5, 0.2))


def test_rescale_factor_of_an_overflowed_delta_is_nan() -> None:
    # bf16 extremes whose float32 difference overflows: the NaN factor makes the merged
    # tensor fail its finite check, as it must.
    expert = torch.tensor([3e38, 1.0, -2.0]).to(torch.bfloat16)
    base = torch.tensor([-3e38, 0.5, 0.0])
    factor = sparsify.rescale_factor(Difference(expert, base), torch.tensor([True, False, True]))
    assert factor is not None and math.isnan(float(factor))


def test_rescale_factor_feeds_block_statistics_of_the_whole_delta(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sparsify, "_BLOCK", 256)
    monkeypatch.setattr(delta_stats, "STATS_PIECE", 128)
    g = torch.Generator().manual_seed(8)
    base = torch.randn(90, 20, generator=g)
    expert = (base + 0.01 * torch.randn(90, 20, generator=g)).to(torch.bfloat16)
    expert[40, 3] = 3e38  # overflows in the middle: the factor is NaN, the statistics still whole
    base[40, 3] = -3e38
    grid = BlockGrid.for_shape((90, 20), 512)
    stats = DeltaStats(grid, 1800)
    with jobs(3):  # the blocks feed them from three threads
        factor = sparsify.rescale_factor(
            Difference(expert, base), torch.rand(90, 20, generator=g) < 0.5, stats
        )
    assert factor is not None and math.isnan(float(factor))
    assert stats.result() == block_stats(expert.float() - base, grid)


def test_rescale_factor_does_not_depend_on_the_thread_count() -> None:
    # Big enough that torch splits a float sum between threads (and then rounds differently),
    # and that its blocks are summed on several threads.
    g = torch.Generator().manual_seed(5)
    delta = (torch.randn(3_000_000, generator=g) * 0.01).to(torch.bfloat16).float()
    mask = torch.rand(delta.shape, generator=g) < 0.3
    factors = []
    for count in (1, 2, 3, 4, 8):
        with jobs(count):
            factors.append(sparsify.rescale_factor(delta, mask))
    assert all(f is not None and torch.equal(f, factors[0]) for f in factors)
    # And it is the exact ratio of the two norms, rounded (math.fsum rounds each exactly).
    before, after = math.fsum(delta.abs().tolist()), math.fsum(delta[mask].abs().tolist())
    assert math.isclose(float(factors[0]), before / after, rel_tol=2**-23)


@pytest.mark.parametrize("shape", [(3, 1), (4, 2), (50, 1537), (6, 7, 300)])
def test_stable_order_is_torchs_stable_argsort_as_flat_indices(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(2)
    keys = torch.randint(0, 5, shape, generator=g, dtype=torch.int32) * 0x7FFF  # heavy ties
    keys[..., 0] = 0x7FFFFFFF  # the largest key
    moved = keys.movedim(1, -1) if keys.dim() > 2 else keys
    expected = torch.sort(moved, dim=-1, stable=True).indices
    # Each row's indices, offset by the row's first flat index.
    expected += torch.arange(0, moved.numel(), moved.shape[-1]).reshape(*moved.shape[:-1], 1)
    out = torch.full(moved.shape, -1, dtype=torch.int64)
    assert sparsify._stable_order(moved, torch.arange(moved.numel() + 3), out) is out
    assert torch.equal(out, expected)


@EQUIV
@given(expert=tied_tensors((torch.bfloat16, torch.float16, torch.float32)), block=blocks, data=st.data())
def test_a_difference_made_block_by_block_gives_the_mask_of_the_whole_delta(
    expert: torch.Tensor, block: int, data: st.DataObject
) -> None:
    # A base with few distinct values, so the differences tie as often as the experts do.
    base = (torch.arange(expert.numel()) % 7 * 0.25 - 0.75).reshape(expert.shape)
    delta = expert.float() - base
    density = data.draw(rank_densities(delta.numel()))
    gamma = data.draw(st.sampled_from([0.0, 0.01, 0.1]))
    lazy = Difference(expert, base)
    with radix_path(block):
        assert torch.equal(sparsify.magnitude(lazy, density), sparsify.magnitude(delta, density))
        assert torch.equal(
            sparsify.magnitude_outliers(lazy, density, gamma),
            sparsify.magnitude_outliers(delta, density, gamma),
        )


def _stats_fed(make_mask: Callable[[DeltaStats], torch.Tensor], numel: int, grid: BlockGrid) -> DeltaStats:
    stats = DeltaStats(grid, numel)
    make_mask(stats)
    return stats


@pytest.mark.parametrize("case", ["bracketed", "heavy tie", "small", "keep all", "outliers"])
def test_magnitude_sparsifiers_feed_each_element_to_the_block_statistics_once(case: str) -> None:
    # The statistics ride along the mask's first pass (the bracketed pass, or the pass that
    # counts a heavy tie), or the whole delta of a small tensor.
    g = torch.Generator().manual_seed(5)
    n = 999 if case == "small" else 2 * sparsify._BLOCK + 999
    base = torch.randn(n, generator=g)
    if case == "heavy tie":  # 70 % of the delta is 0, where the threshold falls
        base = base.to(torch.bfloat16).float()
        moved = base + torch.randn(n, generator=g) * (torch.rand(n, generator=g) < 0.3)
    else:
        moved = base + torch.randn(n, generator=g) * 0.01
    expert = moved.to(torch.bfloat16)
    delta = Difference(expert, base)
    grid = BlockGrid.for_shape((n,), 4 * 2**20 // 7)  # blocks that do not end on stats pieces
    expected = block_stats(delta, grid)
    density = 1.0 if case == "keep all" else 0.5
    selects = mock.Mock(wraps=sparsify._select)
    with mock.patch.object(sparsify, "_select", selects):
        if case == "outliers":
            stats = _stats_fed(lambda s: sparsify.magnitude_outliers(delta, density, 0.05, s), n, grid)
            mask = sparsify.magnitude_outliers(delta, density, 0.05)
        else:
            stats = _stats_fed(lambda s: sparsify.magnitude(delta, density, s), n, grid)
            mask = sparsify.magnitude(delta, density)
    assert stats.result() == expected
    assert selects.call_count == 0
    if case != "outliers":
        assert torch.equal(mask, reference_magnitude(delta.whole(), density))


def test_a_pass_given_up_part_way_feeds_the_rest_in_the_next() -> None:
    # A bracket that gathers too much gives up part-way; the radix select's passes then
    # feed only the elements not fed yet.
    g = torch.Generator().manual_seed(6)
    n = 3 * sparsify._BLOCK + 5
    delta = Difference(torch.randn(n, generator=g).to(torch.bfloat16), torch.randn(n, generator=g))
    grid = BlockGrid.for_shape((n,), 1 << 20)
    stats = DeltaStats(grid, n)
    keys = sparsify._Keys(delta, absolute=True, stats=stats)
    for start, _ in keys:
        if start >= sparsify._BLOCK:
            break
    assert keys.fed == 2 * sparsify._BLOCK
    for _ in range(2):
        assert sum(block.numel() for _, block in keys) == n
    assert stats.result() == block_stats(delta, grid)
