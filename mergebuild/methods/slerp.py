"""Spherical interpolation between two tensors: slerp and nuslerp (mergekit 0.1.5)."""

from __future__ import annotations

import math

import torch

from mergebuild.methods.base import WEIGHT, Method, ParamSpec, TensorContext
from mergebuild.methods.common import require_models, sole_input
from mergebuild.methods.fixed_point import row_dots, row_norms

#: slerp falls back to lerp when the tensors are this close to (anti)parallel.
SLERP_DOT_THRESHOLD = 0.9995
#: slerp treats a norm at or below this as zero (the tensor is left unscaled).
SLERP_NORM_EPS = 1e-8
#: nuslerp clamps vector norms to at least this before normalizing.
NUSLERP_NORM_EPS = 1e-7
#: nuslerp lerps where 1 - cos^2 is at most this (float32 makes it cos = ±1).
NUSLERP_COLINEAR_EPS = 1e-8**2


def slerp_coefficients(t: float, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair (c_a, c_b) with slerp(a, b, t) = c_a a + c_b b, for flat a and b.

    They depend only on the angle between a and b, a whole-tensor statistic. Its
    norms and dot product are fixed-point sums (`fixed_point`), so the coefficients'
    bits do not depend on the thread count or device, as a float32 sum's would.
    """
    t32 = torch.tensor(t, dtype=torch.float32)
    # A (near) zero tensor is used as is; its cosine with anything is ~0.
    scale = 1.0
    for norm in (float(row_norms(a)), float(row_norms(b))):
        scale *= norm if norm > SLERP_NORM_EPS else 1.0
    cos = torch.tensor(float(row_dots(a, b)) / scale, dtype=torch.float32).clamp(-1, 1)
    if cos.abs() > SLERP_DOT_THRESHOLD:
        return 1 - t32, t32
    theta = torch.acos(cos)
    sin_theta = torch.sin(theta)
    return torch.sin((1 - t32) * theta) / sin_theta, torch.sin(t32 * theta) / sin_theta


class Slerp(Method):
    """Spherical interpolation from the base (t = 0) to the one model (t = 1).

    Parameters: `t` (method-wide, required; any real, gradients allowed).

    Base: required; `models` holds exactly one model. The flattened tensors are
    interpolated along the great circle through them, with their own norms (the
    coefficients come from the angle only); where |cos| > 0.9995 it is a lerp.
    A tensor held by only one of the two inputs is passed through, as mergekit
    does for optional tensors.
    """

    name = "slerp"
    # 2: norms, dot products and energies are fixed-point sums, the same on any machine.
    version = 2
    base_policy = "required"
    min_models = 1
    max_models = 1
    params = (ParamSpec("t", float, "method"),)

    def merge(self, ctx: TensorContext) -> torch.Tensor:
        single = sole_input(ctx)
        if single is not None:
            return single
        require_models(ctx, self.name, 1, 1)
        t = float(ctx.param("t"))
        a = ctx.base().reshape(-1)
        b = ctx.model(0).reshape(-1)
        if a.numel() == 0:
            return a.reshape(ctx.shape)
        coef_a, coef_b = slerp_coefficients(t, a, b)
        return (coef_a * a + coef_b * b).reshape(ctx.shape)


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool, flatten: bool) -> torch.Tensor:
    """Slerp of v0 (t = 0) to v1 (t = 1) over whole tensors or over vectors of them.

    With `flatten` the whole tensor is one vector; otherwise each vector along the
    last dimension, or with `row_wise` along the first, is interpolated alone.
    Unlike `slerp`, exactly (anti)parallel vectors are the only lerp case. Norms and
    cosines are fixed-point sums (`fixed_point`): their bits do not depend on threads.
    """
    shape = v0.shape
    if flatten or v0.dim() == 0:
        x0, x1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        x0, x1 = v0.transpose(0, -1), v1.transpose(0, -1)
    else:
        x0, x1 = v0, v1
    u0 = x0 / _vector_norms(x0).clamp(min=NUSLERP_NORM_EPS)
    u1 = x1 / _vector_norms(x1).clamp(min=NUSLERP_NORM_EPS)
    cos = row_dots(u0, u1).float().unsqueeze(-1).clamp(-1, 1)
    colinear = (1 - cos.square()) <= NUSLERP_COLINEAR_EPS
    # acos(±1) = 0 or pi would divide by sin = 0 below; the lerp replaces those.
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    spherical = (torch.sin((1 - t) * theta) * x0 + torch.sin(t * theta) * x1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * x0 + t * x1, spherical)
    if row_wise and not flatten and v0.dim() > 0:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def _vector_norms(x: torch.Tensor) -> torch.Tensor:
    """float32 norms along the last dimension, keeping it (fixed-point sums)."""
    return row_norms(x).float().unsqueeze(-1)


class NuSlerp(Method):
    """Slerp between two models, with t taken from their weights (mergekit `nuslerp`).

    Parameters: `weight` (per model, required), `nuslerp_flatten` (method-wide,
    true: one interpolation over the whole tensor), `nuslerp_row_wise`
    (method-wide, false: without flatten, interpolate along the first dimension
    instead of the last). t = w_2 / (w_1 + w_2), or 0.5 when |w_1 + w_2| < 1e-6.

    Base: optional; `models` holds exactly two models. With a base the deltas
    are interpolated and added back to it (the base is the origin, not an
    input). A tensor held by only one input is passed through.
    """

    name = "nuslerp"
    # 2: norms, dot products and energies are fixed-point sums, the same on any machine.
    version = 2
    base_policy = "optional"
    min_models = 2
    max_models = 2
    params = (
        WEIGHT,
        ParamSpec("nuslerp_row_wise", bool, "method", default=False),
        ParamSpec("nuslerp_flatten", bool, "method", default=True),
    )

    def merge(self, ctx: TensorContext) -> torch.Tensor:
        single = sole_input(ctx)
        if single is not None:
            return single
        require_models(ctx, self.name, 2, 2)
        w0, w1 = (float(ctx.model_param(i, "weight")) for i in range(2))
        total = w0 + w1
        t = 0.5 if math.fabs(total) < 1e-6 else w1 / total
        row_wise, flatten = bool(ctx.param("nuslerp_row_wise")), bool(ctx.param("nuslerp_flatten"))
        if not ctx.has_base:
            return nuslerp(t, ctx.model(0), ctx.model(1), row_wise, flatten)
        base = ctx.base()
        d0 = ctx.model(0) - base
        d1 = ctx.model(1) - base
        return base + nuslerp(t, d0, d1, row_wise, flatten)


METHODS: tuple[type[Method], ...] = (Slerp, NuSlerp)
