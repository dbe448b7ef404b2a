"""Every method merges 0-d tensors (a checkpoint may hold scalar parameters)."""

from __future__ import annotations

import pytest
import torch

from mergebuild.methods.base import Scalar

from .conftest import assert_ulps, mergekit_merge, run

BASE = torch.tensor(0.5)
MODELS = [torch.tensor(0.7), torch.tensor(0.2), torch.tensor(0.9)]

#: method -> (uses base, number of models, shared params, per-model params)
CASES: dict[str, tuple[bool, int, dict[str, Scalar], dict[str, Scalar]]] = {
    "task_arithmetic": (True, 3, {}, {"weight": 0.5}),
    "ties": (True, 3, {}, {"weight": 0.5, "density": 0.5}),
    "breadcrumbs": (True, 3, {}, {"weight": 0.5, "density": 1.0}),
    "breadcrumbs_ties": (True, 3, {}, {"weight": 0.5, "density": 1.0}),
    "dare_linear": (True, 3, {}, {"weight": 0.5, "density": 1.0}),
    "dare_ties": (True, 3, {}, {"weight": 0.5, "density": 1.0}),
    "linear": (False, 3, {}, {"weight": 0.5}),
    "slerp": (True, 1, {"t": 0.3}, {}),
    "nuslerp": (True, 2, {"nuslerp_flatten": False}, {"weight": 1.0}),
    "multislerp": (True, 3, {}, {"weight": 1.0}),
    "karcher": (True, 3, {}, {}),
    "model_stock": (True, 3, {"filter_wise": True}, {}),
    "sce": (True, 3, {"select_topk": 0.5}, {}),
    "nearswap": (True, 1, {"t": 0.1}, {}),
    "passthrough": (False, 1, {"scale": 2.0}, {}),
}


@pytest.mark.parametrize("method", sorted(CASES))
def test_scalar_tensors_merge_like_mergekit(method: str) -> None:
    with_base, count, shared, per_model = CASES[method]
    base = BASE if with_base else None
    models = MODELS[:count]
    out = run(method, base, models, shared, [dict(per_model) for _ in models])
    params: dict[str, object] = dict(shared)
    params.update({k: [v] * count for k, v in per_model.items()})
    if method == "karcher":
        oracle = mergekit_merge(method, [*models, BASE], params)
    elif base is None:
        oracle = mergekit_merge(method, models, params)
    else:
        oracle = mergekit_merge(method, [BASE, *models], params, base_index=0)
    assert_ulps(out, oracle)


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_on_a_scalar_tensor(method: str) -> None:
    per_model = [{"weight": 1.0, "density": 0.5}]
    out = run(method, BASE, MODELS[:1], {}, per_model)
    assert out.shape == ()
