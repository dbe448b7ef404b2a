"""nearswap: out = w model + (1 - w) base, w = clamp(t / |base - model|, 0, 1)."""

from __future__ import annotations

import pytest
import torch

from .conftest import assert_ulps, family, independent, mergekit_merge, run, scale_of


def reference(base: torch.Tensor, model: torch.Tensor, t: float) -> torch.Tensor:
    a, b = base.double(), model.double()
    w = (t / (a - b).abs().clamp(min=1e-6)).clamp(0, 1)
    return w * b + (1 - w) * a


@pytest.mark.parametrize("t", [0.0, 1e-4, 0.001, 0.5, 10.0, -1.0])
@pytest.mark.parametrize("related", [True, False], ids=["family", "independent"])
def test_matches_formula_and_mergekit(shape: tuple[int, ...], t: float, related: bool) -> None:
    if related:
        base, (model,) = family(shape, 1)
    else:
        base, model = independent(shape, 2)
    out = run("nearswap", base, [model], {"t": t})
    torch.testing.assert_close(out.double(), reference(base, model, t), rtol=1e-6, atol=1e-7)
    oracle = mergekit_merge("nearswap", [base, model], {"t": t}, base_index=0)
    assert_ulps(out, oracle, scale_of(base, model), ulps=1)


def test_close_elements_swap_and_far_ones_move_partly() -> None:
    base = torch.tensor([0.0, 0.0, 0.0, 1.0])
    model = torch.tensor([0.05, -0.1, 1.0, 1.0])
    out = run("nearswap", base, [model], {"t": 0.1})
    # |diff| <= t: the model's value; |diff| = 1: 10% of the way; equal: unchanged.
    assert_ulps(out, torch.tensor([0.05, -0.1, 0.1, 1.0]))


def test_a_tensor_held_by_the_base_alone_is_the_base() -> None:
    base, _ = family((4,), 0)
    assert torch.equal(run("nearswap", base, [], {"t": 0.5}), base)
