"""sce: select by variance, weight by mean squared delta, erase sign disagreements."""

from __future__ import annotations

import pytest
import torch

from mergebuild.methods.sce import select_mask

from .conftest import assert_ulps, family, mergekit_merge, run, scale_of


def top_k_lowest_index(values: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k largest values; among equal values the lowest flat index wins."""
    flat = values.reshape(-1).tolist()
    order = sorted(range(len(flat)), key=lambda j: (-flat[j], j))
    mask = torch.zeros(len(flat), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.reshape(values.shape)


def reference(base: torch.Tensor, models: list[torch.Tensor], topk: float) -> torch.Tensor:
    """SCE in float64."""
    b = base.double()
    deltas = torch.stack([m.double() - b for m in models])
    if topk < 1:
        variance = deltas.var(dim=0, unbiased=False)
        k = int(int((variance != 0).sum()) * topk)
        deltas = deltas * top_k_lowest_index(variance, k)
    energy = deltas.pow(2).reshape(len(models), -1).mean(dim=1)
    total = float(energy.sum())
    weights = energy / total if abs(total) >= 1e-6 else torch.full_like(energy, 1 / len(models))
    weights = weights.reshape(-1, *([1] * base.dim()))
    elected = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).double()
    kept = weights * (deltas.sign() == elected)
    return b + (deltas * kept).sum(dim=0) / kept.sum(dim=0).clamp(min=1e-6)


@pytest.mark.parametrize("topk", [1.0, 0.5, 0.1, 0.0])
@pytest.mark.parametrize("count", [1, 2, 4])
def test_matches_formula_and_mergekit(shape: tuple[int, ...], topk: float, count: int) -> None:
    base, models = family(shape, count, seed=count)
    # Deltas of different sizes give the models different weights.
    models = [base + (m - base) * (i + 1) for i, m in enumerate(models)]
    out = run("sce", base, models, {"select_topk": topk})
    torch.testing.assert_close(out.double(), reference(base, models, topk), rtol=1e-5, atol=1e-7)
    oracle = mergekit_merge("sce", [base, *models], {"select_topk": topk}, base_index=0)
    assert_ulps(out, oracle, scale_of(base, *models))


def test_zero_deltas_give_the_base() -> None:
    base, _ = family((5, 4), 0)
    for topk in (1.0, 0.5):
        out = run("sce", base, [base.clone(), base.clone()], {"select_topk": topk})
        assert torch.equal(out, base)


def test_zero_variance_elements_are_not_counted_for_selection() -> None:
    base = torch.zeros(10)
    a = torch.zeros(10)
    b = torch.zeros(10)
    a[:4] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # 4 nonzero variances: topk 0.5 keeps 2, the largest two.
    out = run("sce", base, [a, b], {"select_topk": 0.5})
    assert torch.equal(out.nonzero().reshape(-1), torch.tensor([2, 3]))
    oracle = mergekit_merge("sce", [base, a, b], {"select_topk": 0.5}, base_index=0)
    assert_ulps(out, oracle, 4.0)


def test_variance_ties_keep_the_lowest_flat_index() -> None:
    deltas = torch.tensor([[1.0, -1.0, 1.0, 0.5, 1.0], [-1.0, 1.0, -1.0, 0.5, -1.0]])
    mask = select_mask(deltas, 0.5)
    # Variances are 1, 1, 1, 0, 1: four nonzero, keep two, lowest indices first.
    assert mask.tolist() == [True, True, False, False, False]


def test_sign_election_drops_the_minority() -> None:
    base = torch.zeros(2)
    a = torch.tensor([1.0, -1.0])
    b = torch.tensor([-0.5, -1.0])
    out = run("sce", base, [a, b])
    # Element 0: sum 0.5 >= 0 elects +, only a survives; element 1: both agree.
    assert_ulps(out, torch.tensor([1.0, -1.0]))


def test_single_model_is_the_model() -> None:
    base, (model,) = family((3, 3), 1)
    assert_ulps(run("sce", base, [model]), model, scale_of(model))


def test_a_tensor_held_by_the_base_alone_is_the_base() -> None:
    base, _ = family((4,), 0)
    assert torch.equal(run("sce", base, []), base)


def test_with_variance_ties_only_the_selection_rule_differs_from_mergekit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # bf16-like deltas on a coarse grid: many variances tie at the threshold.
    # (With these seeds our lowest-index rule and torch.topk pick differently.)
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(8, 16, generator=gen) * 0.02
    models = [base + torch.randint(-3, 4, (8, 16), generator=gen) * 2.0**-9 for _ in range(3)]
    oracle = mergekit_merge("sce", [base, *models], {"select_topk": 0.5}, base_index=0)

    def topk_selection(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
        # mergekit's selection: whatever torch.topk returns among ties.
        variance = torch.var(deltas, dim=0, unbiased=False)
        k = int(torch.count_nonzero(variance) * fraction)
        mask = torch.zeros(variance.numel(), dtype=torch.bool)
        mask[torch.topk(variance.reshape(-1), k).indices] = True
        return mask.reshape(variance.shape)

    monkeypatch.setattr("mergebuild.methods.sce.select_mask", topk_selection)
    out = run("sce", base, models, {"select_topk": 0.5})
    assert_ulps(out, oracle, scale_of(base, *models))
