"""slerp and nuslerp: spherical interpolation of two tensors."""

from __future__ import annotations

import math

import pytest
import torch

from .conftest import assert_as_accurate_as, assert_ulps, family, independent, mergekit_merge, run, scale_of


def slerp_reference(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Great-circle interpolation of the flattened tensors, in float64."""
    x, y = a.double().reshape(-1), b.double().reshape(-1)
    nx, ny = x.norm(), y.norm()
    cos = float((x / (nx if nx > 1e-8 else 1)) @ (y / (ny if ny > 1e-8 else 1)))
    cos = max(-1.0, min(1.0, cos))
    if abs(cos) > 0.9995:
        out = (1 - t) * x + t * y
    else:
        theta = math.acos(cos)
        out = (math.sin((1 - t) * theta) * x + math.sin(t * theta) * y) / math.sin(theta)
    return out.reshape(a.shape)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0, 1.5, -0.2])
@pytest.mark.parametrize("related", [True, False], ids=["family", "independent"])
def test_slerp_matches_formula_and_mergekit(shape: tuple[int, ...], t: float, related: bool) -> None:
    if related:
        base, (model,) = family(shape, 1)
    else:
        base, model = independent(shape, 2)
    out = run("slerp", base, [model], {"t": t})
    torch.testing.assert_close(out.double(), slerp_reference(base, model, t), rtol=1e-5, atol=1e-6)
    oracle = mergekit_merge("slerp", [base, model], {"t": t}, base_index=0)
    assert_ulps(out, oracle, scale_of(base, model))


def test_slerp_endpoints() -> None:
    base, model = independent((6, 5), 2)
    assert_ulps(run("slerp", base, [model], {"t": 0.0}), base, scale_of(base))
    assert_ulps(run("slerp", base, [model], {"t": 1.0}), model, scale_of(model))


@pytest.mark.parametrize("factor", [2.0, -3.0, 1.0])
def test_slerp_is_a_lerp_for_parallel_tensors(factor: float) -> None:
    (base,) = independent((7, 3), 1)
    model = base * factor
    out = run("slerp", base, [model], {"t": 0.25})
    assert_ulps(out, 0.75 * base + 0.25 * model, scale_of(base, model))


def test_slerp_with_a_zero_tensor() -> None:
    (model,) = independent((9,), 1)
    base = torch.zeros(9)
    out = run("slerp", base, [model], {"t": 0.4})
    # cos = 0: coefficients sin(0.6 pi/2) and sin(0.4 pi/2).
    assert_ulps(out, math.sin(0.4 * math.pi / 2) * model, scale_of(model))
    assert_ulps(out, mergekit_merge("slerp", [base, model], {"t": 0.4}, base_index=0))


def test_slerp_passes_a_lone_input_through() -> None:
    (base,) = independent((4,), 1)
    assert torch.equal(run("slerp", base, [], {"t": 0.5}), base)


def nuslerp_reference(
    t: float, a: torch.Tensor, b: torch.Tensor, row_wise: bool, flatten: bool
) -> torch.Tensor:
    """Row by row slerp in float64; exactly (anti)parallel rows are lerped."""
    x, y = a.double(), b.double()
    if flatten:
        x, y = x.reshape(1, -1), y.reshape(1, -1)
    elif row_wise:
        x, y = x.transpose(0, -1), y.transpose(0, -1)
    rows_x, rows_y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    out = torch.empty_like(rows_x)
    for i, (p, q) in enumerate(zip(rows_x, rows_y, strict=True)):
        cos = float((p / p.norm().clamp(min=1e-7)) @ (q / q.norm().clamp(min=1e-7)))
        cos = max(-1.0, min(1.0, cos))
        if 1 - cos * cos <= 1e-12:
            out[i] = (1 - t) * p + t * q
        else:
            theta = math.acos(cos)
            out[i] = (math.sin((1 - t) * theta) * p + math.sin(t * theta) * q) / math.sin(theta)
    out = out.reshape(x.shape)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(a.shape)


NUSLERP_SETTINGS = [(True, False), (False, False), (False, True)]


@pytest.mark.parametrize(("flatten", "row_wise"), NUSLERP_SETTINGS)
@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.3, 0.7), (2.0, -0.5), (1.0, -1.0)])
@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp_matches_formula_and_mergekit(
    shape: tuple[int, ...],
    flatten: bool,
    row_wise: bool,
    weights: tuple[float, float],
    with_base: bool,
) -> None:
    base, models = family(shape, 2) if with_base else (None, independent(shape, 2))
    shared = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    per_model = [{"weight": w} for w in weights]
    out = run("nuslerp", base, models, shared, per_model)

    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    if base is None:
        expected = nuslerp_reference(t, models[0], models[1], row_wise, flatten)
    else:
        deltas = [m.double() - base.double() for m in models]
        expected = base.double() + nuslerp_reference(t, *deltas, row_wise, flatten)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-6)

    params = {"weight": list(weights), **shared}
    if base is None:
        oracle = mergekit_merge("nuslerp", models, params)
    else:
        oracle = mergekit_merge("nuslerp", [base, *models], params, base_index=0)
    assert_as_accurate_as(out, oracle, expected, scale_of(base, *models))


def test_nuslerp_lerps_exactly_parallel_rows() -> None:
    a = torch.tensor([[1.0, 2.0, 3.0], [1.0, 0.0, 0.0]])
    b = torch.tensor([[2.0, 4.0, 6.0], [0.0, 1.0, 0.0]])
    shared = {"nuslerp_flatten": False}
    out = run("nuslerp", None, [a, b], shared, [{"weight": 3.0}, {"weight": 1.0}])
    assert_ulps(out[0], 0.75 * a[0] + 0.25 * b[0], 6.0)
    half_angle = math.pi / 2 * 0.25
    assert_ulps(out[1], torch.tensor([math.cos(half_angle), math.sin(half_angle), 0.0]))


def test_nuslerp_zero_deltas_give_the_base() -> None:
    (base,) = independent((5, 4), 1)
    out = run("nuslerp", base, [base.clone(), base.clone()], {}, [{"weight": 1.0}] * 2)
    assert torch.equal(out, base)


def test_slerp_on_a_large_tensor_is_as_accurate_as_mergekit() -> None:
    # Over a million elements a float32 norm or dot product is several ulps off the
    # exact one, and which ulps depends on the thread count; ours are fixed-point sums.
    base, (model,) = family((1100, 1000), 1)
    out = run("slerp", base, [model], {"t": 0.4})
    oracle = mergekit_merge("slerp", [base, model], {"t": 0.4}, base_index=0)
    assert_as_accurate_as(out, oracle, slerp_reference(base, model, 0.4), scale_of(base, model), ulps=1)
