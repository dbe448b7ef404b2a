"""Conformance cases: one merge described once, rendered as a mergekit config and a mergebuild spec.

Parameter names and value forms (scalars, gradients, filter rules) are the same
in both tools, so a case holds them verbatim. The tie exclusion is computed here
from the inputs with mergekit's parameter semantics, written independently of
mergebuild's resolver (a test must not trust the code it checks):

- a gradient [v0, ..., vm] read at t: linear interpolation at t * m;
- t = i / (n - 1) for a tensor of layer i of n (n = 1: t = 1); every tensor
  outside the layers (embeddings, final norm, lm_head, pooler) gets t = 0;
- filter rules: the first rule whose filter is a substring of the tensor name
  (or has no filter, or '*') wins; if none matches, the next scope is tried;
- scopes in order: the model's own parameters, then the method-wide ones, then
  the method's default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tests.conformance.ulp import ambiguous_rank_range, ambiguous_topk
from tests.families import Family

#: Family name -> (layer-name pattern, number of layers). Kept in step with conftest.py.
LAYER_PATTERNS = {
    "llama": re.compile(r"^model\.layers\.(\d+)\."),
    "llama32": re.compile(r"^model\.layers\.(\d+)\."),
    "unchanged": re.compile(r"^model\.layers\.(\d+)\."),
    "bert": re.compile(r"^encoder\.layer\.(\d+)\."),
}

#: Method -> how it sparsifies by rank (decides which elements ties may flip).
_RANK_SPARSIFIER = {
    "ties": "magnitude",
    "breadcrumbs": "magnitude_outliers",
    "breadcrumbs_ties": "magnitude_outliers",
}

#: mergekit's defaults for the parameters the tie exclusion reads.
_DEFAULTS = {"density": 1.0, "gamma": 0.01, "select_topk": 1.0}


@dataclass(frozen=True)
class Case:
    """One merge compared between mergekit and mergebuild."""

    id: str
    family: str
    method: str
    #: (expert index, that model's parameters), in input order.
    models: tuple[tuple[int, dict[str, Any]], ...]
    parameters: dict[str, Any] = field(default_factory=dict)
    base: bool = True
    out_dtype: str = "bfloat16"
    #: The method mergekit runs, when it differs (a deterministic twin of a random method).
    oracle_method: str | None = None
    #: Upper bound on the fraction of elements a tie at a top-k threshold may flip.
    max_ambiguous: float = 0.001
    #: The inputs are built to tie at a threshold (the case checks the exclusion is used).
    expect_ties: bool = False

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.out_dtype)

    def mergekit_models(self, family: Family) -> list[tuple[Path, dict[str, Any]]]:
        return [(family.experts[i], params) for i, params in self.models]

    def spec(self, family: Family, output: Path) -> dict[str, Any]:
        """The equivalent mergebuild merge (DESIGN.md section 2) as plain JSON."""
        spec: dict[str, Any] = {
            "method": self.method,
            "models": [
                {"path": str(family.experts[i]), **({"parameters": p} if p else {})} for i, p in self.models
            ],
            "dtype": self.out_dtype,
            "seed": 0,
            "output": str(output),
        }
        if self.base:
            spec["base"] = str(family.base)
        if self.parameters:
            spec["parameters"] = self.parameters
        return spec


def evaluate(setting: Any, name: str, t: float) -> Any:
    """A setting's value for tensor `name` at layer position t; None if no filter matches."""
    if isinstance(setting, list) and setting and isinstance(setting[0], dict):
        for rule in setting:
            flt = rule.get("filter")
            if flt is None or flt == "*" or flt in name:
                return evaluate(rule["value"], name, t)
        return None
    if isinstance(setting, list):
        if any(isinstance(v, bool) for v in setting):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    return setting


def layer_t(family: str, name: str, num_layers: int) -> float:
    """mergekit's layer position of a tensor (0 outside the layers)."""
    m = LAYER_PATTERNS[family].match(name)
    if m is None:
        return 0.0
    return int(m.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0


def resolve(case: Case, model: int | None, key: str, name: str, t: float) -> Any:
    """Parameter `key` for tensor `name`: the model's own setting, then method-wide, then default."""
    scopes = [case.models[model][1]] if model is not None else []
    scopes.append(case.parameters)
    for scope in scopes:
        if key in scope:
            value = evaluate(scope[key], name, t)
            if value is not None:
                return value
    return _DEFAULTS[key]


#: Methods that L1-rescale kept deltas unless told otherwise.
_RESCALED_BY_DEFAULT = ("dare_ties", "dare_linear", "della", "della_linear")


def rescale_slack(
    case: Case, name: str, base: torch.Tensor, experts: list[torch.Tensor], num_layers: int
) -> torch.Tensor | None:
    """For a case that L1-rescales: per element, how far the two tools may drift apart
    because their rescale factors round differently, else None.

    mergebuild sums the norms exactly and rounds the ratio once; mergekit sums them in
    float32, in an order that depends on the thread count, a few ulps off the exact sums.
    The factors may then differ in their last places, which moves each rescaled delta by
    that many ulps of itself, and `base + sum` rounds once more. The slack is four ulps
    (float32) of |base| plus the weighted deltas' magnitudes times 1/density (a bound on
    the factor for these cases' densities)."""
    if not bool(case.parameters.get("rescale", case.method in _RESCALED_BY_DEFAULT)):
        return None
    if not base.is_floating_point():
        return None
    t = layer_t(case.family, name, num_layers)
    b = base.float()
    moved = torch.zeros_like(b)
    for i, expert in enumerate(experts):
        weight = abs(float(resolve(case, i, "weight", name, t)))
        density = float(resolve(case, i, "density", name, t))
        moved += (expert.float() - b).abs() * (weight / density)
    return 4 * _ulp(b.abs() + moved)


#: Methods whose coefficients come from whole-tensor float sums (norms, dot products,
#: energies): mergebuild sums them in fixed point, mergekit in float32.
_WHOLE_TENSOR_STATISTICS = ("slerp", "nuslerp", "multislerp", "karcher", "model_stock", "sce")


def statistic_slack(case: Case, base: torch.Tensor, experts: list[torch.Tensor]) -> torch.Tensor | None:
    """For a method with whole-tensor statistics: per element, how far the two tools may drift.

    mergekit's float32 sums are a few ulps off the exact ones that mergebuild rounds once
    (and which ulps depends on its thread count). The coefficients made from them then
    differ in their last places, which moves each element by a few ulps of the terms it
    is made of, however small the element itself after cancellation. The slack is 16
    ulps (float32) of |base| (when the case has one) plus the inputs' magnitudes; the
    largest drift seen across the cases was 12. Accuracy against a float64 evaluation is
    checked per method in tests/methods (`assert_as_accurate_as`)."""
    if case.method not in _WHOLE_TENSOR_STATISTICS or not base.is_floating_point():
        return None
    scale = base.float().abs() if case.base else torch.zeros(base.shape)
    for expert in experts:
        scale += expert.float().abs()
    return 16 * _ulp(scale)


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """The float32 spacing above each (non-negative) element."""
    return torch.nextafter(x, torch.tensor(float("inf"))) - x


def ambiguous_elements(
    case: Case,
    name: str,
    base: torch.Tensor,
    experts: list[torch.Tensor],
    num_layers: int,
) -> torch.Tensor:
    """Elements of tensor `name` whose result may depend on tie order at a top-k threshold.

    `experts` are the case's input tensors in case order. Computed in float32 from the
    inputs, as both tools compute deltas.
    """
    mask = torch.zeros(base.shape, dtype=torch.bool)
    if not base.is_floating_point():
        return mask
    t = layer_t(case.family, name, num_layers)
    deltas = [e.float() - base.float() for e in experts]
    kind = _RANK_SPARSIFIER.get(case.oracle_method or case.method)
    n = base.numel()
    for i, delta in enumerate(deltas):
        density = float(resolve(case, i, "density", name, t))
        if kind is None or density >= 1:
            continue
        if kind == "magnitude":
            tie = ambiguous_topk(delta.abs(), max(1, int(density * n)))
        else:
            gamma = float(resolve(case, i, "gamma", name, t))
            target = int(density * n)
            bottom = max(0, n - target - int(gamma * n))
            tie = ambiguous_rank_range(delta.abs(), bottom, bottom + target)
        # Keeping or dropping a zero delta changes nothing: it adds nothing, has no sign
        # for the consensus and no L1 mass for rescale. Only nonzero ties matter.
        mask |= tie & (delta != 0)
    if case.method == "sce":
        topk = float(resolve(case, None, "select_topk", name, t))
        if 0 < topk < 1:
            var = torch.var(torch.stack(deltas), dim=0, unbiased=False)
            k = int(int(torch.count_nonzero(var)) * topk)
            if k > 0:
                mask |= ambiguous_topk(var.abs(), k)
    return mask
