"""multislerp and karcher: weighted means of many tensors on the hypersphere."""

from __future__ import annotations

import math

import pytest
import torch

from .conftest import assert_ulps, family, independent, mergekit_merge, run, scale_of


def multislerp_reference(
    base: torch.Tensor | None,
    models: list[torch.Tensor],
    weights: list[float],
    normalize: bool,
    eps: float,
) -> torch.Tensor:
    """Tangent-space barycentre of the (delta) directions, in float64."""
    origin = base.double().reshape(-1) if base is not None else 0.0
    xs = [m.double().reshape(-1) - origin for m in models]
    w = [x / sum(weights) for x in weights] if normalize else list(weights)
    norms = [float(x.norm()) for x in xs]
    units = [x / (n + eps) for x, n in zip(xs, norms, strict=True)]
    pole = sum(wi * u for wi, u in zip(w, units, strict=True))
    assert isinstance(pole, torch.Tensor)
    pole = pole / pole.norm()
    tangent = sum(wi * (u - float(u @ pole) * pole) for wi, u in zip(w, units, strict=True))
    assert isinstance(tangent, torch.Tensor)
    length = float(tangent.norm()) + eps
    direction = pole * math.cos(length) + tangent * (math.sin(length) / length)
    out = direction * sum(wi * n for wi, n in zip(w, norms, strict=True)) + origin
    return out.reshape(models[0].shape)


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.5, 0.2, 1.1], [1.0, 2.0, -0.5]])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("with_base", [True, False])
def test_multislerp_matches_formula_and_mergekit(
    shape: tuple[int, ...], weights: list[float], normalize: bool, with_base: bool
) -> None:
    base, models = family(shape, 3) if with_base else (None, independent(shape, 3))
    shared = {"normalize_weights": normalize}
    out = run("multislerp", base, models, shared, [{"weight": w} for w in weights])
    expected = multislerp_reference(base, models, weights, normalize, 1e-8)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-6)
    params = {"weight": weights, **shared}
    if base is None:
        oracle = mergekit_merge("multislerp", models, params)
    else:
        oracle = mergekit_merge("multislerp", [base, *models], params, base_index=0)
    assert_ulps(out, oracle, scale_of(base, *models))


def test_multislerp_eps_is_used() -> None:
    base, models = family((10,), 2)
    params = {"eps": 1e-3}
    out = run("multislerp", base, models, params, [{"weight": 1.0}, {"weight": 3.0}])
    expected = multislerp_reference(base, models, [1.0, 3.0], True, 1e-3)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-7)
    oracle = mergekit_merge("multislerp", [base, *models], {"weight": [1.0, 3.0], "eps": 1e-3}, base_index=0)
    assert_ulps(out, oracle, scale_of(base, *models))


def test_multislerp_one_model_is_returned_as_is() -> None:
    base, (model,) = family((3, 4), 1)
    assert torch.equal(run("multislerp", base, [model], {}, [{"weight": 0.3}]), model)


def test_multislerp_two_antipodal_deltas_fall_back_to_the_weighted_sum() -> None:
    base, (model,) = family((6,), 1)
    opposite = 2 * base - model
    out = run("multislerp", base, [model, opposite], {}, [{"weight": 1.0}] * 2)
    assert_ulps(out, base, scale_of(base, model))
    oracle = mergekit_merge("multislerp", [base, model, opposite], {"weight": [1.0, 1.0]}, base_index=0)
    assert_ulps(out, oracle, scale_of(base, model))


def test_multislerp_without_a_mean_direction_takes_the_weighted_sum() -> None:
    # mergekit raises here (three inputs); mergebuild falls back as for two.
    a, b = independent((5,), 2)
    per_model = [{"weight": 1.0}, {"weight": 1.0}, {"weight": 0.0}]
    out = run("multislerp", None, [a, -a, b], {}, per_model)
    assert_ulps(out, torch.zeros(5), scale_of(a))


@pytest.mark.parametrize("count", [2, 3, 4])
def test_multislerp_of_unchanged_tensors_is_the_base(count: int) -> None:
    base, _ = family((6, 3), 0)
    models = [base.clone() for _ in range(count)]
    out = run("multislerp", base, models, {}, [{"weight": 1.0}] * count)
    assert torch.equal(out, base)


def test_multislerp_refuses_weights_summing_to_zero() -> None:
    from mergebuild.methods import get_method

    method = get_method("multislerp")
    problem = method.check_params({"normalize_weights": True}, [{"weight": 1.0}, {"weight": -1.0}])
    assert problem is not None
    assert method.check_params({"normalize_weights": False}, [{"weight": 1.0}, {"weight": -1.0}]) is None


def karcher_reference(tensors: list[torch.Tensor], tol: float = 1e-5) -> torch.Tensor:
    """The equally weighted Karcher mean direction, iterated to convergence, times the mean norm."""
    xs = [t.double().reshape(-1) for t in tensors]
    norms = [float(x.norm()) for x in xs]
    units = [x / n for x, n in zip(xs, norms, strict=True) if n > tol]
    mean = sum(units) / len(units)
    assert isinstance(mean, torch.Tensor)
    mean = mean / mean.norm()
    for _ in range(200):
        step = torch.zeros_like(mean)
        for u in units:
            cos = max(-1.0, min(1.0, float(mean @ u)))
            theta = math.acos(cos)
            if theta > 1e-12:
                step += (theta / math.sin(theta)) * (u - cos * mean) / len(units)
        length = float(step.norm())
        if length < 1e-12:
            break
        mean = math.cos(length) * mean + math.sin(length) * step / length
        mean = mean / mean.norm()
    return (mean * (sum(norms) / len(norms))).reshape(tensors[0].shape)


@pytest.mark.parametrize("count", [2, 3, 5])
@pytest.mark.parametrize("with_base", [True, False])
def test_karcher_matches_formula_and_mergekit(shape: tuple[int, ...], count: int, with_base: bool) -> None:
    base, models = family(shape, count, spread=0.02, step=0.01)
    if not with_base:
        base = None
    out = run("karcher", base, models)
    inputs = [*models, base] if base is not None else models
    expected = karcher_reference(inputs)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-6)
    oracle = mergekit_merge("karcher", inputs, {})
    assert_ulps(out, oracle, scale_of(*inputs))


@pytest.mark.parametrize(("max_iter", "tol"), [(0, 1e-5), (1, 1e-5), (3, 1e-3), (50, 0.0)])
def test_karcher_iteration_settings_match_mergekit(max_iter: int, tol: float) -> None:
    inputs = independent((8, 6), 3)
    out = run("karcher", None, inputs, {"max_iter": max_iter, "tol": tol})
    oracle = mergekit_merge("karcher", inputs, {"max_iter": max_iter, "tol": tol})
    assert_ulps(out, oracle, scale_of(*inputs), ulps=8)


def test_karcher_single_input_is_returned_as_is() -> None:
    (model,) = independent((4, 4), 1)
    assert torch.equal(run("karcher", None, [model]), model)


def test_karcher_zero_inputs_give_zero_and_zero_norms_count_in_the_scale() -> None:
    zeros = [torch.zeros(3, 5), torch.zeros(3, 5)]
    assert torch.equal(run("karcher", None, zeros), torch.zeros(3, 5))
    (model,) = independent((3, 5), 1)
    out = run("karcher", None, [model, torch.zeros(3, 5)])
    # The zero input has no direction, but halves the mean norm.
    assert_ulps(out, model / 2, scale_of(model))
    assert_ulps(out, mergekit_merge("karcher", [model, torch.zeros(3, 5)], {}), scale_of(model))


def test_karcher_opposite_inputs_match_mergekit() -> None:
    (a,) = independent((7,), 1)
    out = run("karcher", None, [a, -a])
    oracle = mergekit_merge("karcher", [a, -a], {})
    torch.testing.assert_close(out, oracle, equal_nan=True)
