"""NearSwap: take the model's value where it is close to the base's (mergekit 0.1.5)."""

from __future__ import annotations

import torch

from mergebuild.methods.base import Method, ParamSpec, TensorContext
from mergebuild.methods.common import require_models

#: |base - model| is clamped to at least this before dividing.
DIFF_MIN = 1e-6


class NearSwap(Method):
    """out = w model + (1 - w) base with w = clamp(t / |base - model|, 0, 1) per element.

    Elements whose difference is at most `t` become the model's; farther ones
    move towards it by t / |difference|. Parameters: `t` (method-wide,
    required; t <= 0 gives the base).

    Base: required; `models` holds exactly one model. A tensor held by the base
    alone is the base, as in mergekit.
    """

    name = "nearswap"
    base_policy = "required"
    min_models = 1
    max_models = 1
    params = (ParamSpec("t", float, "method"),)

    def merge(self, ctx: TensorContext) -> torch.Tensor:
        base = ctx.base()
        if ctx.num_models == 0:
            return base
        require_models(ctx, self.name, 1, 1)
        model = ctx.model(0)
        t = float(ctx.param("t"))
        # mergekit writes t / diff, which torch evaluates as reciprocal(diff) * t;
        # the same two roundings keep the results bit-identical.
        share = ((base - model).abs().clamp(min=DIFF_MIN).reciprocal() * t).clamp(0, 1)
        return share * model + (1 - share) * base


METHODS: tuple[type[Method], ...] = (NearSwap,)
