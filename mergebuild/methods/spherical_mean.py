"""Weighted means on the hypersphere of many tensors: multislerp and karcher (mergekit 0.1.5).

Both hold every input at once: the mean direction must be known before any
input can be projected against it. Their norms and dot products are fixed-point
sums (`fixed_point`), whose bits do not depend on the thread count or device.
"""

from __future__ import annotations

import math

import torch

from mergebuild.errors import InputError
from mergebuild.methods.base import WEIGHT, Method, ParamSpec, Scalar, TensorContext
from mergebuild.methods.common import require_models
from mergebuild.methods.fixed_point import row_dots, row_norms, row_sums

_NONNEGATIVE = (0.0, math.inf, True, False)


class MultiSlerp(Method):
    """Barycentric interpolation of the models on a hypersphere (mergekit `multislerp`).

    Each flattened delta (model - base, or the model itself without a base) is
    divided by (its norm + eps); the weighted mean of these unit vectors, once
    normalized, is the pole of a tangent plane; the weighted mean of the tangent
    projections is mapped back with the exponential map and scaled by the
    weighted mean of the norms.

    Parameters: `weight` (per model, required), `normalize_weights` (method-wide,
    true: divide the weights by their sum), `eps` (method-wide, 1e-8).

    Base: optional, the origin of the sphere (not an input). One model is
    returned as is. When the weighted mean of the unit vectors has norm < eps
    there is no direction to interpolate around; mergekit then returns the
    weighted sum (of the deltas, plus the base) for two models but raises for
    three or more. mergebuild takes the weighted sum for any count: the common
    case is a tensor no expert changed (all deltas zero, e.g. shared
    embeddings), which must come out as the base rather than stop the build.
    Weights that sum to zero with `normalize_weights` are refused before the
    build (mergekit would divide by zero).
    """

    name = "multislerp"
    # 2: norms, dot products and energies are fixed-point sums, the same on any machine.
    version = 2
    base_policy = "optional"
    min_models = 1
    params = (
        WEIGHT,
        ParamSpec("normalize_weights", bool, "method", default=True),
        ParamSpec("eps", float, "method", default=1e-8, bounds=_NONNEGATIVE),
    )

    def check_params(self, shared: dict[str, Scalar], per_model: list[dict[str, Scalar]]) -> str | None:
        weights = [float(values["weight"]) for values in per_model]
        if len(weights) > 1 and shared.get("normalize_weights", True) and sum(weights) == 0:
            return "multislerp with normalize_weights needs weights that do not sum to zero"
        return None

    def merge(self, ctx: TensorContext) -> torch.Tensor:
        require_models(ctx, self.name, 1)
        if ctx.num_models == 1:
            return ctx.model(0)
        eps = float(ctx.param("eps"))
        base = ctx.base() if ctx.has_base else None
        rows: torch.Tensor | None = None
        for i in range(ctx.num_models):
            x = ctx.model(i)
            if rows is None:
                size = (ctx.num_models, math.prod(ctx.shape))
                rows = torch.empty(size, dtype=torch.float32, device=x.device)
            rows[i] = (x if base is None else x - base).reshape(-1)
        assert rows is not None
        weights = torch.tensor(
            [float(ctx.model_param(i, "weight")) for i in range(ctx.num_models)],
            dtype=torch.float32,
            device=rows.device,
        )
        if ctx.param("normalize_weights"):
            weights = weights / row_sums(weights).float()
        column = weights.unsqueeze(-1)

        norms = row_norms(rows).float().unsqueeze(-1)
        units = rows / (norms + eps)
        pole = (units * column).sum(dim=0)
        pole_norm = row_norms(pole).float()
        if pole_norm < eps:
            # No mean direction: fall back to the weighted sum of the deltas.
            out = rows[0] * weights[0]
            for i in range(1, ctx.num_models):
                out = out + rows[i] * weights[i]
        else:
            pole = pole / pole_norm
            # Project onto the tangent plane at the pole and average there.
            along = row_dots(units, pole.expand_as(units)).float().unsqueeze(-1)
            tangent = ((units - along * pole) * column).sum(dim=0)
            length = row_norms(tangent).float() + eps
            direction = pole * torch.cos(length) + tangent * (torch.sin(length) / length)
            out = direction * row_sums(norms.squeeze(-1) * weights).float()
        out = out.reshape(ctx.shape)
        return out if base is None else out + base


class Karcher(Method):
    """The weighted Karcher (Riemannian) mean of the inputs' directions (mergekit `karcher`).

    Every input weighs 1/n. The mean direction starts at the normalized mean of
    the unit vectors and moves along the mean of the log maps until the step is
    below `tol` or `max_iter` steps were taken; the result has the mean of the
    inputs' norms. Inputs with norm <= `tol` are left out of the direction (but
    their norm still counts); if all are, the result is zero.

    Parameters: `max_iter` (method-wide, 10), `tol` (method-wide, 1e-5).

    Base: optional. mergekit ignores the base role for karcher but appends a
    base model that is not among `models` to the inputs, so a listed base is one
    more input (after the models) with the same 1/n weight. One input is
    returned as is.
    """

    name = "karcher"
    # 2: norms, dot products and energies are fixed-point sums, the same on any machine.
    version = 2
    base_policy = "optional"
    min_models = 1
    params = (
        ParamSpec("max_iter", int, "method", default=10, bounds=_NONNEGATIVE),
        ParamSpec("tol", float, "method", default=1e-5, bounds=_NONNEGATIVE),
    )

    def merge(self, ctx: TensorContext) -> torch.Tensor:
        count = ctx.num_models + int(ctx.has_base)
        if count == 0:
            raise InputError(f"karcher: no input holds {ctx.name}")
        if count == 1:
            return ctx.model(0) if ctx.num_models else ctx.base()
        tol = float(ctx.param("tol"))
        alpha = 1.0 / count
        # Keep only the unit directions (and norms), one input read at a time.
        norms: list[torch.Tensor] = []
        kept: list[torch.Tensor] = []
        for i in range(count):
            x = ctx.model(i) if i < ctx.num_models else ctx.base()
            norm = row_norms(x.reshape(-1)).float()
            norms.append(norm)
            if float(norm) > tol:
                kept.append(x / norm)
            del x
        scale = torch.zeros_like(norms[0])
        for norm in norms:
            scale = scale + alpha * norm
        if not kept:
            return torch.zeros(ctx.shape, dtype=torch.float32, device=scale.device)
        # Renormalize the 1/n weights over the kept inputs the way mergekit does
        # (in float64, by summation), so the float32 share rounds the same.
        share = alpha / sum([alpha] * len(kept))
        direction = _karcher_direction(kept, share, int(ctx.param("max_iter")), tol)
        return scale * direction


def _karcher_direction(units: list[torch.Tensor], share: float, max_iter: int, tol: float) -> torch.Tensor:
    """The Karcher mean of unit tensors, each weighing `share`, by Riemannian gradient steps."""
    mean = torch.zeros_like(units[0])
    for unit in units:
        mean += share * unit
    mean_norm = row_norms(mean.reshape(-1)).float()
    # Opposite directions cancel: start from the first one instead.
    mean = units[0].clone() if float(mean_norm) < tol else mean / mean_norm
    for _ in range(max_iter):
        step = torch.zeros_like(mean)
        for unit in units:
            cos = row_dots(mean.reshape(-1), unit.reshape(-1)).float().clamp(-1.0, 1.0)
            theta = torch.arccos(cos)
            if float(theta) < tol:
                continue
            # Log map of `unit` at `mean`: the tangent towards it, of length theta.
            step += share * (theta / torch.sin(theta)) * (unit - cos * mean)
        step_norm = row_norms(step.reshape(-1)).float()
        if float(step_norm) < tol:
            break
        mean = torch.cos(step_norm) * mean + torch.sin(step_norm) * (step / step_norm)
        length = row_norms(mean.reshape(-1)).float()
        if float(length) > tol:
            mean = mean / length
    return mean


METHODS: tuple[type[Method], ...] = (MultiSlerp, Karcher)
