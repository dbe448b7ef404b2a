"""Small helpers shared by the methods that are not task arithmetic.

They cover two things mergekit does around its kernels rather than inside them:
handing an optional tensor held by a single input straight through, and giving
the base a value for a per-model parameter when a method treats the base as one
more input.
"""

from __future__ import annotations

import torch

from mergebuild.errors import InputError, SpecError
from mergebuild.methods.base import Method, Scalar, TensorContext


def sole_input(ctx: TensorContext) -> torch.Tensor | None:
    """The tensor itself when exactly one input (base or model) holds it, else None.

    mergekit passes such optional tensors (present in one checkpoint only)
    through unchanged for slerp, nuslerp and nearswap instead of merging them.
    """
    if ctx.num_models + int(ctx.has_base) != 1:
        return None
    return ctx.base() if ctx.has_base else ctx.model(0)


def require_models(ctx: TensorContext, method: str, low: int, high: int | None = None) -> None:
    """Refuse a tensor held by fewer (or more) models than the method can merge.

    The spec-level count is checked before the build; this catches a tensor that
    some experts lack, which a method with a fixed arity cannot merge.
    """
    if ctx.num_models < low or (high is not None and ctx.num_models > high):
        wanted = f"exactly {low}" if low == high else f"at least {low}"
        raise InputError(
            f"{method}: tensor {ctx.name} is held by {ctx.num_models} model(s); it needs {wanted}"
        )


def base_param(ctx: TensorContext, method: Method, name: str) -> Scalar:
    """The base's value of a per-model parameter: the method-wide value, else the default.

    The base has no entry in `models`, so it can only take the method-wide
    setting, which is where mergekit looks for it too. A required parameter
    without a method-wide value is the user's error.
    """
    try:
        value = ctx.param(name)
    except KeyError:
        spec = method.param_spec(name)
        value = spec.default if spec is not None else None
    if value is None:
        raise SpecError(
            f"{method.name}: the base takes part as an input, so `{name}` must be set in the "
            "method-wide `parameters` (the base has no per-model entry)"
        )
    return value
