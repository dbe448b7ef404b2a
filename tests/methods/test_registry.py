"""Every method is registered and declares exactly mergekit 0.1.5's parameters."""

from __future__ import annotations

import pytest

from mergebuild.methods import REGISTRY

#: The methods mergebuild implements (mergekit's ram, ramplus_tl and arcee_fusion are not).
EXPECTED = {
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "linear",
    "slerp",
    "nuslerp",
    "multislerp",
    "karcher",
    "model_stock",
    "sce",
    "nearswap",
    "passthrough",
}

#: Deliberate differences in declared defaults: mergekit's "no scale" is 1.0 here.
DEFAULT_OVERRIDES = {("passthrough", "scale"): 1.0}

#: (base_policy, min_models, max_models): mergekit's contract with the base counted apart.
CONTRACTS = {
    "linear": ("optional", 1, None),
    "slerp": ("required", 1, 1),
    "nuslerp": ("optional", 2, 2),
    "multislerp": ("optional", 1, None),
    "karcher": ("optional", 1, None),
    "model_stock": ("required", 2, None),
    "sce": ("required", 1, None),
    "nearswap": ("required", 1, 1),
    "passthrough": ("optional", 0, 1),
}


def test_registry_holds_every_method() -> None:
    assert set(REGISTRY) == EXPECTED


def test_the_methods_that_draw_random_numbers_say_so() -> None:
    assert {name for name, method in REGISTRY.items() if method.draws} == {
        "dare_linear",
        "dare_ties",
        "della",
        "della_linear",
    }


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parameters_match_mergekit(name: str) -> None:
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import MISSING, ParameterScope

    theirs = {p.name: p for p in registry.get(name).spec.parameters}
    ours = {p.name: p for p in REGISTRY[name].params}
    assert set(ours) == set(theirs)
    for pname, spec in ours.items():
        other = theirs[pname]
        expected_scope = "method" if other.scope == ParameterScope.SHARED else "model"
        assert spec.scope == expected_scope, pname
        default = None if other.default is MISSING else other.default
        default = DEFAULT_OVERRIDES.get((name, pname), default)
        assert spec.default == default, pname
        if spec.default is not None:
            assert type(spec.default) is spec.kind, pname
            assert spec.check(spec.default) is None, pname


@pytest.mark.parametrize("name", sorted(CONTRACTS))
def test_input_contracts(name: str) -> None:
    method = REGISTRY[name]
    assert (method.base_policy, method.min_models, method.max_models) == CONTRACTS[name]
