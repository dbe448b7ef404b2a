"""Shared helpers for method tests: an in-memory TensorContext and tolerance checks.

Test modules import these directly (`from .conftest import ...`); the package
layout of tests/methods makes that a plain relative import.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest
import torch

from mergebuild import rng
from mergebuild.catalog import BlockGrid
from mergebuild.methods import get_method
from mergebuild.methods.base import Method, Scalar
from mergebuild.methods.delta_stats import DeltaStats
from mergebuild.methods.sparse_delta import SparseDelta

#: The tensor name every fake context uses unless told otherwise.
NAME = "model.layers.0.mlp.up_proj.weight"
#: float32's machine epsilon (distance from 1.0 to the next float).
F32_EPS = 2.0**-23


def digest(i: int) -> bytes:
    """A fixed 16-byte stand-in for model i's tensor digest."""
    return hashlib.blake2b(f"model-{i}".encode(), digest_size=16).digest()


#: The block size of the statistics FakeContext gathers.
STATS_BLOCK_BYTES = 4096


class FakeContext:
    """A TensorContext over in-memory tensors and parameter dicts.

    Reads hand out float32 copies and are counted: a second read of the same
    input fails the test, as the interface allows one read per input.
    Parameters resolve like the real compiler: per-model value, else the
    method-wide one, else the method's default (KeyError when required).
    """

    def __init__(
        self,
        method: Method,
        base: torch.Tensor | None,
        models: Sequence[torch.Tensor],
        shared: Mapping[str, Scalar] | None = None,
        per_model: Sequence[Mapping[str, Scalar]] | None = None,
        *,
        name: str = NAME,
        seed: int = 0,
    ) -> None:
        self.method = method
        self._base = base
        self._models = list(models)
        self.shared = dict(shared or {})
        self.per_model = [dict(p) for p in (per_model or [{} for _ in self._models])]
        assert len(self.per_model) == len(self._models)
        first = base if base is not None else self._models[0]
        self.name = name
        self.shape = tuple(first.shape)
        self.num_models = len(self._models)
        self.has_base = base is not None
        self.seed = seed
        self.reads: Counter[str] = Counter()
        #: The block statistics handed to the method, by model.
        self.stats: dict[int, DeltaStats] = {}
        for tensor in self._models:
            assert tuple(tensor.shape) == self.shape

    def _read(self, key: str, tensor: torch.Tensor, stored: bool = False) -> torch.Tensor:
        self.reads[key] += 1
        assert self.reads[key] == 1, f"{key} read twice"
        return tensor.clone() if stored else tensor.to(torch.float32).clone()

    def base(self) -> torch.Tensor:
        assert self._base is not None, "base() without a base"
        return self._read("base", self._base)

    def stored_base(self) -> torch.Tensor:
        assert self._base is not None, "stored_base() without a base"
        return self._read("base", self._base, stored=self._base.element_size() == 2)

    def model(self, i: int) -> torch.Tensor:
        return self._read(f"model{i}", self._models[i])

    def stored_model(self, i: int) -> torch.Tensor:
        return self._read(f"model{i}", self._models[i], stored=True)

    def param(self, name: str) -> Scalar:
        spec = self.method.param_spec(name)
        assert spec is not None, f"{self.method.name} does not declare {name}"
        if name in self.shared:
            return self.shared[name]
        if spec.default is None:
            raise KeyError(name)
        return spec.default

    def model_param(self, i: int, name: str) -> Scalar:
        spec = self.method.param_spec(name)
        assert spec is not None and spec.scope == "model", f"{name} is not per-model"
        if name in self.per_model[i]:
            return self.per_model[i][name]
        return self.param(name)

    def omitted(self, i: int) -> bool:
        return False

    def delta_stats(self, i: int) -> DeltaStats | None:
        if self._base is None:
            return None
        # Blocks of a few rows: a tensor's statistics span several.
        self.stats[i] = DeltaStats(BlockGrid.for_shape(self.shape, STATS_BLOCK_BYTES), math.prod(self.shape))
        return self.stats[i]

    def expert_work(
        self, i: int, recipe: Mapping[str, Scalar | str], compute: Callable[[], SparseDelta]
    ) -> SparseDelta:
        return compute()

    def keep_mask(self, i: int, density: float) -> torch.Tensor:
        key = rng.stream_key(self.seed, digest(i), self.name)
        return rng.keep_mask(key, 0, math.prod(self.shape), density).reshape(self.shape)

    def draws(self, i: int) -> rng.Draws:
        return rng.Draws(rng.stream_key(self.seed, digest(i), self.name))


def resolved(ctx: FakeContext) -> tuple[dict[str, Scalar], list[dict[str, Scalar]]]:
    """The (shared, per_model) values check_params sees, resolved like the compiler."""
    shared: dict[str, Scalar] = {}
    per_model: list[dict[str, Scalar]] = [{} for _ in range(ctx.num_models)]
    for spec in ctx.method.params:
        # A required parameter left unset has no method-wide value to show.
        with contextlib.suppress(KeyError):
            shared[spec.name] = ctx.param(spec.name)
        if spec.scope == "model":
            for i in range(ctx.num_models):
                per_model[i][spec.name] = ctx.model_param(i, spec.name)
    return shared, per_model


def run(
    method: str,
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor],
    shared: Mapping[str, Scalar] | None = None,
    per_model: Sequence[Mapping[str, Scalar]] | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Merge one tensor with the registered `method`, checking the interface on the way.

    Every given value passes its ParamSpec, check_params accepts the resolved
    values, and the result is float32 of the inputs' shape.
    """
    impl = get_method(method)
    ctx = FakeContext(impl, base, models, shared, per_model, **kwargs)
    for name, value in [*ctx.shared.items(), *(kv for p in ctx.per_model for kv in p.items())]:
        spec = impl.param_spec(name)
        assert spec is not None, f"{method} does not declare {name}"
        assert spec.check(value) is None, f"{name}={value}: {spec.check(value)}"
    problem = impl.check_params(*resolved(ctx))
    assert problem is None, problem
    out = impl.merge(ctx)
    assert out.dtype == torch.float32
    assert tuple(out.shape) == ctx.shape
    return out


def assert_ulps(actual: torch.Tensor, expected: torch.Tensor, scale: float = 1.0, ulps: float = 4) -> None:
    """Equal up to a few float32 ulps, relative to each value and to the inputs' `scale`.

    The absolute part covers values that come out of a cancellation, whose
    rounding error is that of the (larger) operands.
    """
    torch.testing.assert_close(
        actual,
        expected.to(actual.dtype),
        rtol=ulps * F32_EPS,
        atol=ulps * F32_EPS * scale,
    )


def assert_as_accurate_as(
    actual: torch.Tensor, oracle: torch.Tensor, reference: torch.Tensor, scale: float, ulps: float = 4
) -> None:
    """Each element of `actual` is as close to the float64 `reference` as the oracle's is, up to
    a few float32 ulps of the inputs' `scale` (each result's own last roundings).

    For methods whose whole-tensor statistics mergebuild sums exactly and mergekit in
    float32: their outputs differ by mergekit's rounding, so neither equals the other to an
    ulp, but mergebuild's must not be the less accurate."""
    reference = reference.double()
    ours = (actual.double() - reference).abs()
    theirs = (oracle.double() - reference).abs()
    allowed = theirs + ulps * F32_EPS * scale
    worst = int(torch.argmax(ours - allowed))
    assert bool((ours <= allowed).all()), (
        f"flat index {worst}: off the float64 result by {ours.reshape(-1)[worst]:.3g}, "
        f"mergekit by {theirs.reshape(-1)[worst]:.3g}"
    )


def scale_of(*tensors: torch.Tensor | None) -> float:
    """The largest magnitude among the given tensors (for `assert_ulps`)."""
    return max(float(t.abs().max()) for t in tensors if t is not None and t.numel())


def family(
    shape: tuple[int, ...],
    count: int,
    *,
    seed: int = 0,
    spread: float = 0.02,
    step: float = 0.002,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and `count` fine-tunes of it, like an LLM family (small deltas)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen) * spread
    models = [base + torch.randn(shape, generator=gen) * step for _ in range(count)]
    return base, models


def independent(shape: tuple[int, ...], count: int, *, seed: int = 0) -> list[torch.Tensor]:
    """`count` unrelated standard normal tensors."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(count)]


def mergekit_merge(
    method: str,
    tensors: Sequence[torch.Tensor],
    parameters: Mapping[str, Any],
    base_index: int | None = None,
) -> torch.Tensor:
    """mergekit 0.1.5's own result for one tensor group, computed in float32 (the oracle)."""
    from mergekit.merge_methods.api import merge_tensors

    return merge_tensors(
        [t.to(torch.float32) for t in tensors],
        method,
        parameters=dict(parameters),
        base_index=base_index,
        dtype=torch.float32,
    )


SHAPES = [(12, 20), (33,), (3, 4, 5)]


@pytest.fixture(params=SHAPES, ids=lambda s: "x".join(map(str, s)))
def shape(request: pytest.FixtureRequest) -> tuple[int, ...]:
    """A few tensor shapes: a matrix, a vector and a 3-D tensor."""
    return request.param
