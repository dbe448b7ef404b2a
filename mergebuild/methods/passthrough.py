"""Passthrough: copy one input, optionally scaled (mergekit 0.1.5)."""

from __future__ import annotations

import torch

from mergebuild.errors import InputError, SpecError
from mergebuild.methods.base import Method, ParamSpec, TensorContext
from mergebuild.methods.common import base_param


class Passthrough(Method):
    """The one input, times `scale` (per model, 1.0 = copied unchanged).

    mergekit's passthrough takes exactly one input, and a base model listed
    beside a model counts as a second one (an error). So the input is either
    the single entry of `models` (no base), or the base with `models` empty, in
    which case `scale` comes from the method-wide parameters. A base together
    with a model is refused. mergekit's `scale` defaults to "none", which is the
    same values as 1.0.
    """

    name = "passthrough"
    base_policy = "optional"
    min_models = 0
    max_models = 1
    params = (ParamSpec("scale", float, "model", default=1.0),)

    def merge(self, ctx: TensorContext) -> torch.Tensor:
        if ctx.has_base and ctx.num_models:
            raise SpecError(
                "passthrough takes exactly one input: list one model and no base, or a base and no models"
            )
        if ctx.num_models:
            x, scale = ctx.model(0), float(ctx.model_param(0, "scale"))
        elif ctx.has_base:
            x, scale = ctx.base(), float(base_param(ctx, self, "scale"))
        else:
            raise InputError(f"passthrough: no input holds {ctx.name}")
        # Multiplying by 1.0 is exact; skip the copy.
        return x if scale == 1.0 else x * scale


METHODS: tuple[type[Method], ...] = (Passthrough,)
