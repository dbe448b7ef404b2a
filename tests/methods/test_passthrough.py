"""passthrough: exactly one input, optionally scaled."""

from __future__ import annotations

import pytest
import torch

from mergebuild.errors import SpecError

from .conftest import family, mergekit_merge, run


def test_one_model_is_copied() -> None:
    _, (model,) = family((4, 5), 1)
    assert torch.equal(run("passthrough", None, [model]), model)


@pytest.mark.parametrize("scale", [0.5, -2.0, 0.0])
def test_scale_multiplies_and_matches_mergekit(scale: float) -> None:
    _, (model,) = family((4, 5), 1)
    out = run("passthrough", None, [model], {}, [{"scale": scale}])
    assert torch.equal(out, model * scale)
    assert torch.equal(out, mergekit_merge("passthrough", [model], {"scale": [scale]}))
    assert torch.equal(mergekit_merge("passthrough", [model], {}), model)


def test_a_lone_base_is_the_input_with_the_method_wide_scale() -> None:
    base, _ = family((6,), 0)
    assert torch.equal(run("passthrough", base, []), base)
    assert torch.equal(run("passthrough", base, [], {"scale": 3.0}), base * 3.0)


def test_a_base_beside_a_model_is_refused() -> None:
    base, models = family((3,), 1)
    with pytest.raises(SpecError, match="exactly one input"):
        run("passthrough", base, models)
