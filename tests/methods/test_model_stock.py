"""model_stock: t = k cos / (1 + (k - 1) cos); out = t mean(models) + (1 - t) base."""

from __future__ import annotations

import pytest
import torch

from mergebuild.errors import InputError

from .conftest import assert_ulps, family, mergekit_merge, run, scale_of


def reference(base: torch.Tensor, models: list[torch.Tensor], filter_wise: bool) -> torch.Tensor:
    """Model Stock in float64, with cosines over rows (filter_wise) or the whole tensor."""
    b = base.double()
    # One row: the whole tensor, or a vector that filter-wise treats as one filter.
    b = b if filter_wise and b.dim() >= 2 else b.reshape(1, -1)
    xs = [m.double().reshape(b.shape) for m in models]
    offsets = [x - b for x in xs]
    pairs = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            p, q = offsets[i], offsets[j]
            norm_product = (p.norm(dim=-1) * q.norm(dim=-1)).clamp(min=1e-6)
            pairs.append(((p * q).sum(dim=-1) / norm_product).clamp(-1, 1))
    cos = torch.stack(pairs).mean(dim=0).unsqueeze(-1)
    k = len(models)
    denominator = 1 + (k - 1) * cos
    t = torch.where(denominator.abs() < 1e-6, 0.0, k * cos / denominator)
    mean = sum(xs) / k
    return (t * mean + (1 - t) * b).reshape(base.shape)


@pytest.mark.parametrize("count", [2, 3, 5])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_matches_formula_and_mergekit(shape: tuple[int, ...], count: int, filter_wise: bool) -> None:
    base, models = family(shape, count, seed=count)
    # A shared direction in the deltas makes the cosines (and t) non-trivial.
    common = models[0] - base
    models = [m + 0.7 * common for m in models]
    out = run("model_stock", base, models, {"filter_wise": filter_wise})
    expected = reference(base, models, filter_wise)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-7)
    oracle = mergekit_merge("model_stock", [base, *models], {"filter_wise": filter_wise}, base_index=0)
    assert_ulps(out, oracle, scale_of(base, *models))


def test_identical_deltas_give_their_mean() -> None:
    base, (model,) = family((6, 4), 1)
    out = run("model_stock", base, [model, model.clone(), model.clone()])
    # cos = 1: t = k / k = 1.
    assert_ulps(out, model, scale_of(model))


def test_zero_deltas_give_the_base() -> None:
    base, _ = family((5, 3), 0)
    out = run("model_stock", base, [base.clone(), base.clone()])
    assert torch.equal(out, base)


def test_opposite_deltas_are_singular_and_keep_the_base() -> None:
    base, (model,) = family((8,), 1)
    opposite = 2 * base - model
    for filter_wise in (False, True):
        out = run("model_stock", base, [model, opposite], {"filter_wise": filter_wise})
        assert torch.equal(out, base)


def test_a_tensor_held_by_the_base_alone_is_the_base_and_one_model_is_refused() -> None:
    base, (model,) = family((3,), 1)
    assert torch.equal(run("model_stock", base, []), base)
    with pytest.raises(InputError, match="at least 2"):
        run("model_stock", base, [model])
