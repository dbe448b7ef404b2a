"""The registry of merge methods, by name."""

from __future__ import annotations

from mergebuild.methods import task_arithmetic
from mergebuild.methods.base import Method

_CLASSES: tuple[type[Method], ...] = (*task_arithmetic.METHODS,)

REGISTRY: dict[str, Method] = {cls.name: cls() for cls in _CLASSES}


def get_method(name: str) -> Method:
    """The method called `name`; raises KeyError when there is none."""
    return REGISTRY[name]
