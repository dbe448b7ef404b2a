"""Resolving a spec's parameter values for one tensor.

A value is a scalar, a gradient (numbers spread evenly over [0, 1], read at the
tensor's layer position), or a list of filter rules (first rule whose filter is
a substring of the tensor name wins; a rule without filter, or with '*', matches
anything).
"""

from __future__ import annotations

import re

from mergebuild.methods.base import Scalar
from mergebuild.spec import FilterRule, ParamValue

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The transformer layer a tensor belongs to (e.g. 'model.layers.3.mlp...' -> 3)."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def layer_position(name: str, num_layers: int) -> float:
    """t = i / (n - 1) for a tensor of layer i of n (1 when n is 1, as mergekit does);
    0 for tensors outside the layers (embeddings, final norm, lm_head)."""
    index = layer_index(name)
    if index is None:
        return 0.0
    if num_layers <= 1:
        return 1.0
    return min(index, num_layers - 1) / (num_layers - 1)


def interpolate(gradient: list[float], t: float) -> float:
    """Linear interpolation of values spread evenly on [0, 1], at t."""
    x = t * (len(gradient) - 1)
    i0 = int(x)
    i1 = min(len(gradient) - 1, i0 + 1)
    frac = x - i0
    return (1 - frac) * float(gradient[i0]) + frac * float(gradient[i1])


def resolve(value: ParamValue, name: str, t: float) -> Scalar | None:
    """The value for tensor `name` at layer position t; None when no filter rule matches."""
    if isinstance(value, list) and value and isinstance(value[0], FilterRule):
        for rule in value:
            assert isinstance(rule, FilterRule)
            if rule.filter is None or rule.filter == "*" or rule.filter in name:
                return resolve(rule.value, name, t)
        return None
    if isinstance(value, list):
        return interpolate([float(v) for v in value], t)
    return value
