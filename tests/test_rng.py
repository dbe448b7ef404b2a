"""mergebuild/rng.py: the blockwise hash gives the same stream as the plain formula."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergebuild import rng
from tests.conftest import jobs

FAST = settings(max_examples=60, deadline=None, database=None, derandomize=True)


def reference_uniform(key: int, start: int, count: int) -> torch.Tensor:
    """SplitMix64's finalizer in Python integers, one index at a time: the oracle."""
    mask = (1 << 64) - 1
    values = []
    for j in range(start, start + count):
        x = (key + j * 0x9E3779B97F4A7C15) & mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        x ^= x >> 31
        values.append((x >> 11) * 2.0**-53)
    return torch.tensor(values, dtype=torch.float64)


keys = st.one_of(st.sampled_from([0, 1, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1))
starts = st.one_of(st.integers(0, 1000), st.integers(0, 2**62))
counts = st.integers(0, 300)
chunks = st.sampled_from([1, 2, 7, 64, rng._CHUNK])
#: Elements per thread's part (`rng._PART`): draws do not depend on how they are split.
parts = st.sampled_from([1, 5, 64, rng._PART])
densities = st.one_of(
    st.sampled_from([0.0, -0.5, 2.0**-53, 1e-300, 0.5, 1 - 2.0**-53, 1.0, 1.5, math.inf, math.nan]),
    st.floats(0.0, 1.0),
)


def test_known_values() -> None:
    # Pinned: lockfiles and conformance results depend on these exact draws.
    u = rng.uniform(0x0123456789ABCDEF, 5, 3)
    assert u.dtype == torch.float64
    assert u.tolist() == [0.00488739672125682, 0.08099885568132692, 0.7226006426794261]
    assert u.tolist() == reference_uniform(0x0123456789ABCDEF, 5, 3).tolist()
    assert rng.uniform(0, 0, 0).shape == (0,)


@FAST
@given(key=keys, start=starts, count=counts, chunk=chunks, part=parts)
def test_uniform_matches_the_reference(key: int, start: int, count: int, chunk: int, part: int) -> None:
    with mock.patch.object(rng, "_CHUNK", chunk), mock.patch.object(rng, "_PART", part), jobs(3):
        u = rng.uniform(key, start, count)
    assert u.dtype == torch.float64
    assert torch.equal(u, reference_uniform(key, start, count))


@FAST
@given(key=keys, start=starts, count=counts, chunk=chunks, part=parts, density=densities)
def test_keep_mask_is_uniform_below_density(
    key: int, start: int, count: int, chunk: int, part: int, density: float
) -> None:
    with mock.patch.object(rng, "_CHUNK", chunk), mock.patch.object(rng, "_PART", part), jobs(3):
        mask = rng.keep_mask(key, start, count, density)
    assert mask.dtype == torch.bool
    assert torch.equal(mask, reference_uniform(key, start, count) < density)


@pytest.mark.parametrize("offset", [-1, 0, 1])
def test_keep_mask_and_word_bounds_at_the_exact_threshold(offset: int) -> None:
    # Densities one ulp around a drawn value: the comparison is strict and exact.
    key, count = 12345, 1000
    u = reference_uniform(key, 0, count)
    value = float(u[17])
    density = math.nextafter(value, math.inf if offset > 0 else -math.inf) if offset else value
    below = rng.uniform_words(key, 0, count) < rng.word_bounds(torch.tensor([density], dtype=torch.float64))
    for mask in (rng.keep_mask(key, 0, count, density), below):
        assert torch.equal(mask, u < density)
        assert bool(mask[17]) == (offset > 0)


probabilities = st.one_of(
    st.sampled_from([0.0, 2.0**-53, 1e-300, 0.5, 1 - 2.0**-53]), st.floats(0.0, 1.0, exclude_max=True)
)


@FAST
@given(key=keys, start=starts, count=counts, chunk=chunks, part=parts, p=probabilities)
def test_uniform_words_are_below_a_bound_iff_the_uniforms_are_below_its_probability(
    key: int, start: int, count: int, chunk: int, part: int, p: float
) -> None:
    with mock.patch.object(rng, "_CHUNK", chunk), mock.patch.object(rng, "_PART", part), jobs(3):
        words = rng.uniform_words(key, start, count)
    assert words.dtype == torch.int64
    u = reference_uniform(key, start, count)
    # The words order like the uniforms (ties among words only split equal uniforms).
    order = torch.argsort(words, stable=True)
    assert bool((u[order].diff() >= 0).all())
    bound = rng.word_bounds(torch.tensor([p], dtype=torch.float64))
    assert torch.equal(words < bound, u < p)


@pytest.mark.parametrize("p", [-1e-300, 1.0, math.nan])
def test_word_bounds_refuse_probabilities_outside_zero_to_one(p: float) -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        rng.word_bounds(torch.tensor([0.5, p], dtype=torch.float64))


def test_streams_are_position_keyed() -> None:
    # A slice of the stream is the stream of the slice: no dependence on blocking.
    whole = rng.uniform(99, 0, 1000)
    assert torch.equal(rng.uniform(99, 300, 400), whole[300:700])
    assert torch.equal(rng.keep_mask(99, 300, 400, 0.3), whole[300:700] < 0.3)
    assert torch.equal(rng.uniform_words(99, 300, 400), rng.uniform_words(99, 0, 1000)[300:700])
