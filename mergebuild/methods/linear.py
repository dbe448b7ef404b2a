"""Linear merging: a weighted sum of whole tensors (mergekit `linear`)."""

from __future__ import annotations

import torch

from mergebuild.errors import InputError, SpecError
from mergebuild.methods.base import WEIGHT, Method, ParamSpec, TensorContext
from mergebuild.methods.common import base_param

#: Elements of a 16-bit input promoted to float32 at a time (2 MiB: they stay in the CPU's
#: cache for the multiply-add). Elementwise, so the bits are the whole tensor's.
_CHUNK = 1 << 19


class Linear(Method):
    """out = sum_i w_i x_i, divided by sum_i w_i when `normalize` (default true).

    Parameters: `weight` (per model, required), `normalize` (method-wide, true).

    Base: optional. mergekit ignores the base role for linear but appends a base
    model that is not among `models` to the inputs, so a listed base is averaged
    in like one more expert, after the models, with the method-wide `weight`
    (the base has no per-model entry; without a method-wide weight the merge is
    refused, as mergekit refuses a missing weight). Without a base it is a plain
    weighted average of the models.

    With `normalize` and weights that sum to exactly zero mergekit divides by
    zero and writes inf/NaN; mergebuild refuses that instead.
    """

    name = "linear"
    base_policy = "optional"
    min_models = 1
    params = (WEIGHT, ParamSpec("normalize", bool, "method", default=True))

    def merge(self, ctx: TensorContext) -> torch.Tensor:
        weights: list[float] = []
        total: torch.Tensor | None = None
        scratch: torch.Tensor | None = None
        # Fold one input at a time, in mergekit's input order (models, then base).
        count = ctx.num_models + int(ctx.has_base)
        for i in range(count):
            if i < ctx.num_models:
                weight = float(ctx.model_param(i, "weight"))
                x = ctx.stored_model(i)
            else:
                weight = float(base_param(ctx, self, "weight"))
                x = ctx.stored_base()
            weights.append(weight)
            if total is None:
                total = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
            if x.dtype != torch.float32 and scratch is None:
                scratch = torch.empty(min(x.numel(), _CHUNK), dtype=torch.float32, device=x.device)
            _add_weighted(total, x, torch.tensor(weight, dtype=torch.float32, device=x.device), scratch)
        if total is None:
            raise InputError(f"linear: no input holds {ctx.name}")
        if ctx.param("normalize"):
            divisor = torch.tensor(weights, dtype=torch.float32).sum()
            if divisor == 0:
                raise SpecError(
                    f"linear: the weights for {ctx.name} sum to zero, so `normalize` "
                    "would divide by zero; set normalize: false or change a weight"
                )
            total = total.div_(divisor)
        return total


def _add_weighted(
    total: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, scratch: torch.Tensor | None
) -> None:
    """`total.addcmul_(x.float(), weight)`: one fused multiply-add per input, mergekit's
    accumulation, so the sums round identically. An input stored in 16 bits is promoted
    (exactly) a chunk at a time into `scratch`, not into a float32 copy of the whole input."""
    if x.dtype == torch.float32:
        total.addcmul_(x, weight)
        return
    assert scratch is not None
    flat_total, flat_x = total.reshape(-1), x.reshape(-1)
    for start in range(0, flat_x.numel(), _CHUNK):
        part = slice(start, min(start + _CHUNK, flat_x.numel()))
        promoted = scratch[: part.stop - start].copy_(flat_x[part])
        flat_total[part].addcmul_(promoted, weight)


METHODS: tuple[type[Method], ...] = (Linear,)
