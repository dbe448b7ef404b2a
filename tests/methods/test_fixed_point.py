"""Fixed-point sums: exact to a float64 rounding, and the same bits on any thread count."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from mergebuild.methods.fixed_point import BLOCK, row_dots, row_norms, row_sums

from .conftest import family, run

THREAD_COUNTS = (1, 3, 4)


@contextmanager
def threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def exact_dot(x: torch.Tensor, y: torch.Tensor) -> float:
    """The dot product of float32 vectors, rounded once (products are exact in float64)."""
    return math.fsum((x.double() * y.double()).tolist())


def test_dots_are_the_exact_sum_rounded_once() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 5000, generator=gen) * torch.logspace(-20, 20, 5000)
    y = torch.randn(4, 5000, generator=gen)
    got = row_dots(x, y)
    for i in range(4):
        assert got[i].item() == pytest.approx(exact_dot(x[i], y[i]), rel=2**-50)


def test_a_row_longer_than_a_block_sums_its_blocks_in_order() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(BLOCK + 12345, generator=gen)
    assert row_sums(x).item() == pytest.approx(math.fsum(x.double().tolist()), rel=2**-48)
    assert row_norms(x).item() == pytest.approx(math.sqrt(exact_dot(x, x)), rel=2**-48)


def test_sums_do_not_depend_on_the_thread_count() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3_000_000, generator=gen)
    y = torch.randn(3_000_000, generator=gen)
    rows = x.reshape(1000, 3000)
    results = []
    for count in THREAD_COUNTS:
        with threads(count):
            results.append((row_dots(x, y), row_norms(x), row_sums(rows)))
    for other in results[1:]:
        for got, want in zip(other, results[0], strict=True):
            assert torch.equal(got, want)


def test_large_and_tiny_values_neither_overflow_nor_vanish() -> None:
    big = torch.tensor([3e38, 3e38, -3e38])
    assert row_dots(big, big).item() == pytest.approx(3 * 9e76, rel=1e-6)
    tiny = torch.tensor([1e-45, 1e-45])
    assert row_sums(tiny).item() == 2 * torch.tensor(1e-45).item()
    assert row_norms(torch.tensor([1e-30, 1e-30])).item() == pytest.approx(math.sqrt(2) * 1e-30, rel=1e-6)


def test_a_row_that_is_not_finite_sums_to_nan() -> None:
    rows = torch.tensor([[1.0, float("inf")], [float("nan"), 2.0], [3.0, 4.0]])
    got = row_norms(rows)
    assert math.isnan(got[0]) and math.isnan(got[1])
    assert got[2].item() == 5.0


def test_shapes_scalars_and_empty_rows() -> None:
    assert row_sums(torch.tensor(2.5)).shape == ()
    assert row_sums(torch.tensor(2.5)).item() == 2.5
    assert torch.equal(row_sums(torch.zeros(2, 0)), torch.zeros(2, dtype=torch.float64))
    assert row_sums(torch.ones(2, 3, 4)).shape == (2, 3)
    assert torch.equal(
        row_dots(torch.ones(2, 3, 4), torch.full((2, 3, 4), 2.0)), torch.full((2, 3), 8.0).double()
    )


# Each method whose coefficients come from whole-tensor statistics, on a tensor large
# enough (2M elements) that torch splits a float reduction between threads.
STATISTIC_MERGES: list[tuple[str, int, Mapping[str, Any], list[Mapping[str, Any]] | None, bool]] = [
    ("slerp", 1, {"t": 0.4}, None, True),
    ("nuslerp", 2, {}, [{"weight": 0.3}, {"weight": 0.7}], True),
    ("nuslerp", 2, {"nuslerp_flatten": False, "nuslerp_row_wise": True}, [{"weight": 1.0}] * 2, False),
    ("multislerp", 3, {}, [{"weight": 1.0}, {"weight": 0.5}, {"weight": 0.25}], True),
    ("karcher", 3, {}, None, False),
    ("model_stock", 3, {}, None, True),
    ("sce", 3, {}, None, True),
]


@pytest.mark.parametrize(
    ("method", "count", "shared", "per_model", "with_base"),
    STATISTIC_MERGES,
    ids=[f"{m[0]}-{i}" for i, m in enumerate(STATISTIC_MERGES)],
)
def test_methods_with_whole_tensor_statistics_give_the_same_bits_on_any_thread_count(
    method: str,
    count: int,
    shared: Mapping[str, Any],
    per_model: list[Mapping[str, Any]] | None,
    with_base: bool,
) -> None:
    base, models = family((1024, 2048), count, seed=4)
    outputs = []
    for threads_used in THREAD_COUNTS:
        with threads(threads_used):
            outputs.append(run(method, base if with_base else None, models, shared, per_model))
    for other in outputs[1:]:
        assert torch.equal(other, outputs[0])
