"""Generalized task arithmetic: task_arithmetic, ties, dare_*, breadcrumbs*, della*.

Per tensor: delta_i = model_i - base; sparsify each delta with its own density;
multiply by its weight; with consensus keep only entries whose sign matches the
elected sign of the weighted sum; optionally normalize by the summed weights of
what was kept; scale by lambda; add to the base. See DESIGN.md section 5.

Memory does not grow with the number of models: models are folded in one at a
time into a handful of accumulators, and the consensus is resolved at the end
(the elected sign picks the positive or the negative partial sums).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from mergebuild.methods import sparsify
from mergebuild.methods.base import INT8_MASK, WEIGHT, Method, ParamSpec, Scalar, TensorContext
from mergebuild.methods.sparse_delta import SparseDelta

Sparsifier = Literal["magnitude", "random", "magnitude_outliers", "della"]

_DENSITY = ParamSpec("density", float, "model", default=1.0, bounds=(0.0, 1.0, False, True))
_GAMMA = ParamSpec("gamma", float, "model", default=0.01, bounds=(0.0, 1.0, True, False))
_EPSILON = ParamSpec("epsilon", float, "model", default=0.15, bounds=(0.0, 1.0, True, False))
_LAMBDA = ParamSpec("lambda", float, "method", default=1.0)


@dataclass
class _Fold:
    """Running sums over models. With consensus: positive and negative parts kept apart."""

    total: torch.Tensor
    pos: torch.Tensor | None = None
    neg: torch.Tensor | None = None
    pos_weight: torch.Tensor | None = None
    neg_weight: torch.Tensor | None = None


class TaskArithmeticFamily(Method):
    """One member of the family, fixed by its consensus, sparsifier and defaults."""

    budgeted = True
    consensus: ClassVar[bool] = False
    sparsifier: ClassVar[Sparsifier | None] = None
    default_normalize: ClassVar[bool] = False
    default_rescale: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        params = [
            WEIGHT,
            _DENSITY,
            ParamSpec("normalize", bool, "method", default=cls.default_normalize),
            ParamSpec("rescale", bool, "method", default=cls.default_rescale),
            _LAMBDA,
            INT8_MASK,
        ]
        if cls.sparsifier == "magnitude_outliers":
            params.append(_GAMMA)
        if cls.sparsifier == "della":
            params.append(_EPSILON)
        cls.params = tuple(params)

    def check_params(self, shared: dict[str, Scalar], per_model: list[dict[str, Scalar]]) -> str | None:
        if self.sparsifier != "della":
            return None
        for values in per_model:
            density, epsilon = float(values["density"]), float(values["epsilon"])
            if density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
                return f"della needs density ± epsilon inside (0, 1), got {density} ± {epsilon}"
        return None

    def expert_recipe(
        self, param: Callable[[str], Scalar], model_param: Callable[[str], Scalar]
    ) -> dict[str, Scalar | str] | None:
        """Everything besides the expert and base tensors that decides a model's sparse delta;
        None when the model's delta is used whole (no per-expert work to cache)."""
        density = float(model_param("density"))
        if self.sparsifier is None or density >= 1:
            return None
        recipe: dict[str, Scalar | str] = {
            "sparsifier": self.sparsifier,
            "density": density,
            "rescale": bool(param("rescale")),
        }
        if self.sparsifier == "magnitude_outliers":
            recipe["gamma"] = float(model_param("gamma"))
        if self.sparsifier == "della":
            recipe["epsilon"] = float(model_param("epsilon"))
        return recipe

    def weighted_delta(self, ctx: TensorContext, i: int, base: torch.Tensor) -> torch.Tensor:
        """Model i's delta, sparsified (and L1-rescaled) when the method says so, times its weight."""
        weight = torch.tensor(float(ctx.model_param(i, "weight")), dtype=torch.float32)
        recipe = self.expert_recipe(ctx.param, lambda name: ctx.model_param(i, name))
        if recipe is None or base.numel() == 0:
            delta = ctx.model(i) - base
            ctx.note_delta(i, delta)
            return delta * weight
        density = float(recipe["density"])
        fresh: list[torch.Tensor] = []

        def compute() -> SparseDelta:
            model = ctx.model(i)
            delta = model - base
            ctx.note_delta(i, delta)
            mask = self._mask(ctx, i, delta, density)
            # kept_delta's expression with `delta` already computed: the same values, one pass less.
            kept = torch.where(mask, delta, torch.zeros((), dtype=torch.float32))
            factor = sparsify.l1_factor(delta, kept) if recipe["rescale"] else None
            fresh.append(kept * factor if factor is not None else kept)
            return SparseDelta(mask, model, factor)

        sparse = ctx.expert_work(i, recipe, compute)
        return (fresh[0] if fresh else sparse.delta(base)) * weight

    def _mask(self, ctx: TensorContext, i: int, delta: torch.Tensor, density: float) -> torch.Tensor:
        if self.sparsifier == "magnitude":
            return sparsify.magnitude(delta, density)
        if self.sparsifier == "magnitude_outliers":
            return sparsify.magnitude_outliers(delta, density, float(ctx.model_param(i, "gamma")))
        if self.sparsifier == "random":
            return ctx.keep_mask(i, density)
        return sparsify.della(delta, ctx.uniform(i), density, float(ctx.model_param(i, "epsilon")))

    def merge(self, ctx: TensorContext) -> torch.Tensor:
        base = ctx.base()
        if ctx.num_models == 0:
            return base
        fold: _Fold | None = None
        weight_sum = torch.zeros((), dtype=torch.float32)
        for i in range(ctx.num_models):
            weight = torch.tensor(float(ctx.model_param(i, "weight")), dtype=torch.float32)
            weighted = self.weighted_delta(ctx, i, base)
            weight_sum += weight
            fold = self._add(fold, weighted, weight)
        assert fold is not None
        mixed, divisor = self._resolve(fold, weight_sum)
        if ctx.param("normalize"):
            mixed = mixed / divisor
        lam = float(ctx.param("lambda"))
        if lam != 1:
            mixed = mixed * torch.tensor(lam, dtype=torch.float32)
        return base + mixed

    def _add(self, fold: _Fold | None, weighted: torch.Tensor, weight: torch.Tensor) -> _Fold:
        if not self.consensus:
            if fold is None:
                return _Fold(total=weighted.clone())
            fold.total += weighted
            return fold
        if fold is None:
            fold = _Fold(
                total=torch.zeros_like(weighted),
                pos=torch.zeros_like(weighted),
                neg=torch.zeros_like(weighted),
                pos_weight=torch.zeros_like(weighted),
                neg_weight=torch.zeros_like(weighted),
            )
        assert fold.pos is not None and fold.neg is not None
        assert fold.pos_weight is not None and fold.neg_weight is not None
        fold.total += weighted
        # clamp keeps a value or gives +0, as where(sign, value, 0) would: same sums, fewer passes.
        fold.pos += weighted.clamp(min=0)
        fold.neg += weighted.clamp(max=0)
        fold.pos_weight.add_(weighted > 0, alpha=float(weight))
        fold.neg_weight.add_(weighted < 0, alpha=float(weight))
        return fold

    def _resolve(self, fold: _Fold, weight_sum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixed delta and the divisor used by `normalize`."""
        if not self.consensus:
            divisor = weight_sum if weight_sum.abs() >= 1e-8 else torch.ones(())
            return fold.total, divisor
        assert fold.pos is not None and fold.neg is not None
        assert fold.pos_weight is not None and fold.neg_weight is not None
        elected_positive = fold.total >= 0
        mixed = torch.where(elected_positive, fold.pos, fold.neg)
        divisor = torch.where(elected_positive, fold.pos_weight, fold.neg_weight)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
        return mixed, divisor


class TaskArithmetic(TaskArithmeticFamily):
    name = "task_arithmetic"


class Ties(TaskArithmeticFamily):
    name = "ties"
    consensus = True
    sparsifier = "magnitude"
    default_normalize = True


class DareLinear(TaskArithmeticFamily):
    name = "dare_linear"
    sparsifier = "random"
    default_rescale = True


class DareTies(TaskArithmeticFamily):
    name = "dare_ties"
    consensus = True
    sparsifier = "random"
    default_rescale = True


class Breadcrumbs(TaskArithmeticFamily):
    name = "breadcrumbs"
    sparsifier = "magnitude_outliers"


class BreadcrumbsTies(TaskArithmeticFamily):
    name = "breadcrumbs_ties"
    consensus = True
    sparsifier = "magnitude_outliers"


class Della(TaskArithmeticFamily):
    name = "della"
    consensus = True
    sparsifier = "della"
    default_normalize = True
    default_rescale = True


class DellaLinear(TaskArithmeticFamily):
    name = "della_linear"
    sparsifier = "della"
    default_rescale = True


METHODS: tuple[type[Method], ...] = (
    TaskArithmetic,
    Ties,
    DareLinear,
    DareTies,
    Breadcrumbs,
    BreadcrumbsTies,
    Della,
    DellaLinear,
)
