"""Parameter resolution: gradients over layers, filter rules, layer positions."""

from __future__ import annotations

import pytest

from mergebuild.params import interpolate, layer_index, layer_position, resolve
from mergebuild.spec import FilterRule


def test_layer_index_for_llama_and_bert_names() -> None:
    assert layer_index("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_index("encoder.layer.3.attention.self.query.weight") == 3
    assert layer_index("model.embed_tokens.weight") is None
    assert layer_index("lm_head.weight") is None


def test_layer_position() -> None:
    assert layer_position("model.layers.0.x", 5) == 0.0
    assert layer_position("model.layers.4.x", 5) == 1.0
    assert layer_position("model.layers.2.x", 5) == 0.5
    assert layer_position("model.norm.weight", 5) == 0.0
    # A single layer sits at t = 1, as in mergekit.
    assert layer_position("model.layers.0.x", 1) == 1.0


@pytest.mark.parametrize(
    ("gradient", "t", "expected"),
    [
        ([0.2, 0.8], 0.0, 0.2),
        ([0.2, 0.8], 1.0, 0.8),
        ([0.2, 0.8], 0.5, 0.5),
        ([0.0, 1.0, 0.0], 0.25, 0.5),
        ([0.7], 0.3, 0.7),
    ],
)
def test_interpolate(gradient: list[float], t: float, expected: float) -> None:
    assert interpolate(gradient, t) == pytest.approx(expected)


def test_filters_first_match_wins_and_may_hold_gradients() -> None:
    rules = [
        FilterRule(filter="self_attn", value=0.1),
        FilterRule(filter="mlp", value=[0.0, 1.0]),
        FilterRule(value=0.9),
    ]
    assert resolve(rules, "model.layers.1.self_attn.q_proj.weight", 0.5) == 0.1
    assert resolve(rules, "model.layers.1.mlp.up_proj.weight", 0.25) == pytest.approx(0.25)
    assert resolve(rules, "model.norm.weight", 0.0) == 0.9
    assert resolve([FilterRule(filter="mlp", value=1.0)], "model.norm.weight", 0.0) is None
    assert resolve([FilterRule(filter="*", value=2.0)], "anything", 0.0) == 2.0


def test_scalars_pass_through() -> None:
    assert resolve(True, "x", 0.3) is True
    assert resolve(0.5, "x", 0.3) == 0.5
