"""The registry of merge methods, by name."""

from __future__ import annotations

from mergebuild.methods import (
    linear,
    model_stock,
    nearswap,
    passthrough,
    sce,
    slerp,
    spherical_mean,
    task_arithmetic,
)
from mergebuild.methods.base import Method

_CLASSES: tuple[type[Method], ...] = (
    *task_arithmetic.METHODS,
    *linear.METHODS,
    *slerp.METHODS,
    *spherical_mean.METHODS,
    *model_stock.METHODS,
    *sce.METHODS,
    *nearswap.METHODS,
    *passthrough.METHODS,
)

REGISTRY: dict[str, Method] = {cls.name: cls() for cls in _CLASSES}


def get_method(name: str) -> Method:
    """The method called `name`; raises KeyError when there is none."""
    return REGISTRY[name]
