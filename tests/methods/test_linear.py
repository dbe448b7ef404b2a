"""linear: a weighted sum, divided by the weights' sum with `normalize`."""

from __future__ import annotations

import pytest
import torch

from mergebuild.errors import SpecError
from mergebuild.methods import linear

from .conftest import assert_ulps, family, independent, mergekit_merge, run, scale_of


def reference(tensors: list[torch.Tensor], weights: list[float], normalize: bool) -> torch.Tensor:
    total = sum(w * t.double() for w, t in zip(weights, tensors, strict=True))
    assert isinstance(total, torch.Tensor)
    return total / sum(weights) if normalize else total


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.2, 0.5, 1.3], [1.0, -0.4, 0.7]])
def test_matches_formula_and_mergekit(shape: tuple[int, ...], weights: list[float], normalize: bool) -> None:
    models = independent(shape, 3)
    per_model = [{"weight": w} for w in weights]
    out = run("linear", None, models, {"normalize": normalize}, per_model)
    torch.testing.assert_close(out.double(), reference(models, weights, normalize), rtol=1e-5, atol=1e-5)
    oracle = mergekit_merge("linear", models, {"weight": weights, "normalize": normalize})
    assert_ulps(out, oracle, scale_of(*models))


@pytest.mark.parametrize("normalize", [True, False])
def test_base_is_one_more_input_with_the_method_wide_weight(normalize: bool) -> None:
    base, models = family((8, 6), 2)
    shared = {"weight": 0.5, "normalize": normalize}
    per_model = [{"weight": 1.0}, {"weight": 2.0}]
    out = run("linear", base, models, shared, per_model)
    expected = reference([*models, base], [1.0, 2.0, 0.5], normalize)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-7)
    # mergekit appends the separately listed base after the models.
    oracle = mergekit_merge(
        "linear", [*models, base], {"weight": [1.0, 2.0, 0.5], "normalize": normalize}, base_index=2
    )
    assert_ulps(out, oracle, scale_of(base, *models))


def test_base_without_a_method_wide_weight_is_refused() -> None:
    base, models = family((4,), 1)
    with pytest.raises(SpecError, match="weight"):
        run("linear", base, models, {}, [{"weight": 1.0}])


def test_single_model() -> None:
    (model,) = independent((5, 7), 1)
    out = run("linear", None, [model], {}, [{"weight": 3.0}])
    assert_ulps(out, model, scale_of(model))
    unnormalized = run("linear", None, [model], {"normalize": False}, [{"weight": 3.0}])
    assert torch.equal(unnormalized, model * 3.0)


def test_zero_weight_sum_is_refused_only_when_normalizing() -> None:
    models = independent((4, 4), 2)
    per_model = [{"weight": 1.0}, {"weight": -1.0}]
    with pytest.raises(SpecError, match="sum to zero"):
        run("linear", None, models, {}, per_model)
    out = run("linear", None, models, {"normalize": False}, per_model)
    assert torch.equal(out, models[0] - models[1])


def test_method_wide_weight_applies_to_every_model() -> None:
    models = independent((6,), 2)
    out = run("linear", None, models, {"weight": 0.25, "normalize": False})
    torch.testing.assert_close(out, 0.25 * models[0] + 0.25 * models[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_16_bit_inputs_are_promoted_a_chunk_at_a_time_with_the_same_bits(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    monkeypatch.setattr(linear, "_CHUNK", 40)  # 403 elements: 11 chunks, the last one short
    base, models = family((13, 31), 3)
    base, models = base.to(dtype), [m.to(dtype) for m in models]
    weights = [0.7, -0.3, 1.1]
    out = run("linear", base, models, {"weight": 0.4}, [{"weight": w} for w in weights])
    # The whole-tensor statement: float32 copies, one multiply-add each, models then base.
    total = torch.zeros(13, 31)
    for w, x in zip([*weights, 0.4], [*models, base], strict=True):
        total.addcmul_(x.float(), torch.tensor(w))
    expected = total / torch.tensor([*weights, 0.4]).sum()
    assert torch.equal(out.view(torch.int32), expected.view(torch.int32))
