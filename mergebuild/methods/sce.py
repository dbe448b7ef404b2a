"""SCE: select, calculate, erase (mergekit `sce`, 0.1.5).

Per tensor: stack the deltas; optionally keep only the elements whose variance
across models is among the top `select_topk` fraction of the nonzero variances;
weight each model by its mean squared (selected) delta; drop entries whose sign
disagrees with the sign of the summed deltas; average what is left with those
weights; add to the base.
"""

from __future__ import annotations

import torch

from mergebuild.methods import sparsify
from mergebuild.methods.base import INT8_MASK, Method, ParamSpec, TensorContext
from mergebuild.methods.fixed_point import row_dots, row_sums

#: Below this total, the per-model weights are uniform instead of normalized.
WEIGHT_SUM_EPS = 1e-6
#: The summed weights of the kept entries are clamped to at least this.
DIVISOR_MIN = 1e-6


def select_mask(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
    """Keep the int(fraction * #nonzero variances) elements of largest variance across models.

    `deltas` is (models, *shape). Ties at the threshold keep the lowest flat
    index (mergekit leaves them to torch.topk).
    """
    variance = torch.var(deltas, dim=0, unbiased=False)
    if fraction <= 0:
        return torch.zeros_like(variance, dtype=torch.bool)
    # The product is taken in float32, as mergekit multiplies a count tensor.
    k = int(torch.count_nonzero(variance) * fraction)
    if k == 0:
        return torch.zeros_like(variance, dtype=torch.bool)
    # Ascending stable ranks of -variance: rank < k means among the k largest,
    # lower flat index first among equals.
    return sparsify.keep_rank_range(-variance, 0, k)


def model_weights(deltas: torch.Tensor) -> torch.Tensor:
    """Each model's mean squared delta over the sum of them (uniform if that is ~0).

    The squares are summed in fixed point (`fixed_point`), so the weights' bits do not
    depend on the thread count or device."""
    flat = deltas.reshape(deltas.shape[0], -1)
    energy = (row_dots(flat, flat) / max(flat.shape[1], 1)).float()
    total = float(row_sums(energy))
    if abs(total) < WEIGHT_SUM_EPS:
        return torch.full_like(energy, 1.0 / energy.shape[0])
    return energy / total


class Sce(Method):
    """SCE merging of task vectors (mergekit `sce`).

    Parameters: `select_topk` (method-wide, 1.0 = keep everything; in [0, 1]),
    `int8_mask` (accepted, no effect). There is no `weight`: models are weighted
    by their mean squared delta.

    Base: required, the origin of the deltas; at least one model (a tensor held
    by the base alone is the base, as in mergekit).

    Variances tied at the top-k threshold keep the lowest flat index (mergekit
    keeps whatever torch.topk returns). Because the model weights are computed
    from the selected deltas, such a tie can move every element of the tensor
    slightly, not only the tied ones; bf16 checkpoints make these ties common.
    """

    name = "sce"
    # 2: norms, dot products and energies are fixed-point sums, the same on any machine.
    version = 2
    base_policy = "required"
    min_models = 1
    params = (
        INT8_MASK,
        ParamSpec("select_topk", float, "method", default=1.0, bounds=(0.0, 1.0, True, True)),
    )

    def merge(self, ctx: TensorContext) -> torch.Tensor:
        base = ctx.base()
        if ctx.num_models == 0:
            return base
        deltas = torch.empty((ctx.num_models, *base.shape), dtype=torch.float32, device=base.device)
        for i in range(ctx.num_models):
            torch.sub(ctx.model(i), base, out=deltas[i])
        fraction = float(ctx.param("select_topk"))
        if fraction < 1:
            deltas *= select_mask(deltas, fraction)
        # Sign election: the sign of the summed deltas, zero counting as positive.
        elected = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0)
        agree = deltas.sign() == elected
        weights = model_weights(deltas).reshape(-1, *([1] * base.dim()))
        kept_weights = weights * agree
        merged = (deltas * kept_weights).sum(dim=0)
        return base + merged / kept_weights.sum(dim=0).clamp(min=DIVISOR_MIN)


METHODS: tuple[type[Method], ...] = (Sce,)
