"""Model Stock: interpolate between the base and the mean of the models (mergekit 0.1.5)."""

from __future__ import annotations

import torch

from mergebuild.errors import InputError
from mergebuild.methods.base import Method, ParamSpec, TensorContext
from mergebuild.methods.fixed_point import row_dots, row_norms, row_sums

#: Norm products are clamped to at least this before dividing.
NORM_PRODUCT_MIN = 1e-6
#: Where |1 + (k - 1) cos| is below this, t is 0 (the base is kept).
SINGULAR_EPS = 1e-6


def stock_ratio(offsets: list[torch.Tensor]) -> torch.Tensor:
    """t = k cos / (1 + (k - 1) cos), cos the mean pairwise cosine of the k offsets.

    Cosines are taken along the last dimension, so flat offsets give one t and
    rows give one t per row (shape (..., 1)). t is 0 where the denominator
    vanishes: no finite estimate exists there, and mergekit keeps the base. Norms, dot
    products and the mean are fixed-point sums (`fixed_point`): the same bits on any
    thread count or device.
    """
    cosines = []
    for i, first in enumerate(offsets):
        for second in offsets[i + 1 :]:
            norms = row_norms(first).float() * row_norms(second).float()
            dot = row_dots(first, second).float()
            cosines.append((dot / norms.clamp(min=NORM_PRODUCT_MIN)).clamp(-1, 1))
    cos = (row_sums(torch.stack(cosines, dim=-1)) / len(cosines)).float().unsqueeze(-1)
    k = len(offsets)
    denominator = 1 + (k - 1) * cos
    singular = denominator.abs() < SINGULAR_EPS
    denominator = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos), (k * cos) / denominator)


class ModelStock(Method):
    """out = t mean(x_i) + (1 - t) base, t from the mean pairwise cosine of the deltas.

    Parameters: `filter_wise` (method-wide, false): with it, t is computed per
    vector along the last dimension (a 1-D tensor is one vector) instead of over
    the whole flattened tensor.

    Base: required; at least two models. A tensor held by the base alone is the
    base (mergekit's handling of optional tensors); one held by fewer than two
    models is refused (mergekit would leave it out of the output).
    """

    name = "model_stock"
    # 2: norms, dot products and energies are fixed-point sums, the same on any machine.
    version = 2
    base_policy = "required"
    min_models = 2
    params = (ParamSpec("filter_wise", bool, "method", default=False),)

    def merge(self, ctx: TensorContext) -> torch.Tensor:
        base = ctx.base()
        if ctx.num_models == 0:
            return base
        if ctx.num_models < 2:
            raise InputError(
                f"model_stock: tensor {ctx.name} is held by {ctx.num_models} model; it needs at least 2"
            )
        if ctx.param("filter_wise"):
            origin = base.unsqueeze(0) if base.dim() <= 1 else base
        else:
            origin = base.reshape(-1)
        total: torch.Tensor | None = None
        offsets = []
        for i in range(ctx.num_models):
            x = ctx.model(i).reshape(origin.shape)
            # Sum the raw tensors (not the offsets) for the mean, as mergekit does.
            total = x.clone() if total is None else total.add_(x)
            offsets.append(x - origin)
        assert total is not None
        t = stock_ratio(offsets)
        del offsets
        mean = total.div_(ctx.num_models)
        return (t * mean + (1 - t) * origin).reshape(ctx.shape)


METHODS: tuple[type[Method], ...] = (ModelStock,)
