"""The comparison helpers are the suite's measuring stick: check them against definitions."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conformance.cases import Case, evaluate, layer_t, resolve
from tests.conformance.ulp import ambiguous_rank_range, ambiguous_topk, ulp_diff

finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_adjacent_values_are_one_ulp_apart(dtype: torch.dtype) -> None:
    x = torch.tensor([1.0, -1.0, 0.0, 3.5e-3, -7.0], dtype=dtype)
    up = torch.nextafter(x, torch.full_like(x, math.inf))
    assert ulp_diff(x, up, dtype).tolist() == [1] * 5
    two_up = torch.nextafter(up, torch.full_like(x, math.inf))
    assert ulp_diff(two_up, x, dtype).tolist() == [2] * 5


def test_signed_zeros_and_crossing_zero() -> None:
    zero, neg_zero = torch.tensor([0.0]), torch.tensor([-0.0])
    assert int(ulp_diff(zero, neg_zero, torch.float32)) == 0
    tiny = torch.nextafter(zero, torch.tensor([1.0]))
    # The smallest positive and smallest negative subnormals are two steps apart.
    assert int(ulp_diff(tiny, -tiny, torch.float32)) == 2


def test_nan_handling() -> None:
    a = torch.tensor([math.nan, math.nan, 1.0])
    b = torch.tensor([math.nan, 1.0, 1.0])
    assert ulp_diff(a, b, torch.float32).tolist() == [0, torch.iinfo(torch.int64).max, 0]


@settings(max_examples=200, deadline=None)
@given(finite32, finite32)
def test_ulp_diff_counts_representable_steps(a: float, b: float) -> None:
    ta, tb = torch.tensor([a]), torch.tensor([b])
    n = int(ulp_diff(ta, tb, torch.float32))
    assert n >= 0
    assert (n == 0) == (a == b)
    if 0 < n <= 50:
        # Walking n steps from the smaller reaches the larger exactly.
        lo, hi = (ta, tb) if a < b else (tb, ta)
        for _ in range(n):
            lo = torch.nextafter(lo, torch.tensor([math.inf]))
        assert lo.item() == hi.item()


def test_bf16_diff_uses_bf16_steps() -> None:
    a = torch.tensor([1.0])
    b = torch.tensor([1.0 + 2**-7])  # exactly one bf16 ulp above 1
    assert int(ulp_diff(a, b, torch.bfloat16)) == 1
    assert int(ulp_diff(a, b, torch.float32)) == 2**16


def test_ambiguous_topk_marks_only_straddling_ties() -> None:
    v = torch.tensor([5.0, 3.0, 3.0, 3.0, 1.0])
    # Keep 2: the kth value 3 is tied three ways, two of them are dropped.
    assert ambiguous_topk(v, 2).tolist() == [False, True, True, True, False]
    # Keep 4: all three 3s are kept, so no tie decides anything.
    assert not ambiguous_topk(v, 4).any()
    # Keep 1: 5 is unique.
    assert not ambiguous_topk(v, 1).any()


def test_ambiguous_rank_range_checks_both_boundaries() -> None:
    v = torch.tensor([1.0, 1.0, 2.0, 4.0, 4.0, 9.0])
    # Keep ascending ranks 1..3 (values 1, 2, 4): both boundaries split a tie.
    assert ambiguous_rank_range(v, 1, 4).tolist() == [True, True, False, True, True, False]
    assert not ambiguous_rank_range(v, 2, 5).any()
    assert not ambiguous_rank_range(v, 3, 3).any()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=30), st.data())
def test_ambiguous_topk_matches_brute_force(values: list[int], data: st.DataObject) -> None:
    """An element is ambiguous iff some stable order keeps it and another drops it."""
    v = torch.tensor(values, dtype=torch.float32)
    k = data.draw(st.integers(1, len(values)))
    order_low_first = sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]
    order_high_first = sorted(range(len(values)), key=lambda i: (-values[i], -i))[:k]
    # Those two tie orders are the extremes: anything kept by one only is ambiguous,
    # and every element of a straddling tie group is dropped by some order.
    differs = set(order_low_first) ^ set(order_high_first)
    mask = ambiguous_topk(v, k)
    assert all(mask[i] for i in differs)
    kth = sorted(values, reverse=True)[k - 1]
    straddles = sum(x > kth for x in values) + sum(x == kth for x in values) > k
    assert mask.tolist() == [straddles and x == kth for x in values]


def test_case_resolution_follows_mergekit() -> None:
    case = Case(
        "x",
        "llama",
        "ties",
        ((0, {"density": [{"filter": "mlp", "value": 0.2}]}),),
        {"density": [0.1, 0.9]},
    )
    assert resolve(case, 0, "density", "model.layers.0.mlp.up_proj.weight", 0.0) == 0.2
    # No per-model rule matches: method-wide gradient at t.
    assert resolve(case, 0, "density", "model.layers.3.self_attn.q_proj.weight", 1.0) == 0.9
    assert layer_t("llama", "model.layers.3.mlp.up_proj.weight", 4) == 1.0
    assert layer_t("llama", "lm_head.weight", 4) == 0.0
    assert layer_t("bert", "encoder.layer.1.output.dense.weight", 2) == 1.0
    assert evaluate([0.2, 0.8, 0.5], "n", 0.5) == pytest.approx(0.8)
    assert evaluate([{"filter": "x", "value": 1}], "abc", 0.0) is None
