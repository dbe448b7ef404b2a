"""The interface every merge method implements.

A method merges one output tensor at a time. It sees its inputs through a
`TensorContext`, which reads source tensors on demand (as float32, one call one
read), hands out parameters already resolved for this tensor (gradients and
filter rules applied, per-model values falling back to method-wide ones), and
provides position-keyed randomness. A method returns the merged tensor in
float32; the executor casts it to the output dtype once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal, Protocol

import torch

if TYPE_CHECKING:
    from mergebuild import rng
    from mergebuild.methods.delta_stats import DeltaStats
    from mergebuild.methods.sparse_delta import SparseDelta

Scalar = float | int | bool

#: Where a parameter may be written: per model (falling back to the method-wide
#: value) or only method-wide.
ParamScope = Literal["model", "method"]

#: Whether a method needs `base`, may use one, or ignores it.
BasePolicy = Literal["required", "optional"]


@dataclass(frozen=True)
class ParamSpec:
    """A parameter a method accepts; `default=None` means the user must set it."""

    name: str
    kind: type[float] | type[int] | type[bool]
    scope: ParamScope
    default: Scalar | None = None
    #: Allowed range for numbers: (low, high, low_inclusive, high_inclusive).
    bounds: tuple[float, float, bool, bool] | None = None

    def check(self, value: Scalar) -> str | None:
        """Return why `value` is not acceptable, or None when it is."""
        if self.kind is bool:
            return None if isinstance(value, bool) else "must be true or false"
        if isinstance(value, bool) or not isinstance(value, int | float):
            return "must be a number"
        if self.kind is int and not float(value).is_integer():
            return "must be a whole number"
        if self.bounds is not None:
            low, high, low_in, high_in = self.bounds
            above = value >= low if low_in else value > low
            below = value <= high if high_in else value < high
            if not (above and below):
                left, right = "[" if low_in else "(", "]" if high_in else ")"
                return f"must be in {left}{low:g}, {high:g}{right}"
        return None


class TensorContext(Protocol):
    """What a method sees of one output tensor."""

    #: The tensor's name, e.g. "model.layers.3.self_attn.q_proj.weight".
    name: str
    #: The tensor's shape (all inputs share it).
    shape: tuple[int, ...]
    #: Number of models in the spec's `models` list that hold this tensor.
    num_models: int
    #: Whether a base model takes part in this tensor.
    has_base: bool

    def base(self) -> torch.Tensor:
        """The base tensor as float32 (reads it; call once)."""
        ...

    def stored_base(self) -> torch.Tensor:
        """The base tensor as stored when that is a 16-bit float, else as float32 (as `base`);
        read like `base`: instead of it, not besides it. The caller must not overwrite it.
        For a method whose ops with a float32 operand promote it (exactly), so that a 16-bit
        base is never held as float32 whole."""
        ...

    def model(self, i: int) -> torch.Tensor:
        """Model i's tensor as float32 (reads it; call once per model): a tensor the caller
        owns and may overwrite."""
        ...

    def stored_model(self, i: int) -> torch.Tensor:
        """Model i's tensor in its storage dtype (float32 when a read budget assembles it
        from blocks and base rows), read like `model`: instead of it, not besides it. For a
        method that keeps the expert as stored and lets an op with a float32 operand promote it."""
        ...

    def param(self, name: str) -> Scalar:
        """A method-wide parameter, resolved for this tensor."""
        ...

    def model_param(self, i: int, name: str) -> Scalar:
        """Model i's value of a per-model parameter, resolved for this tensor."""
        ...

    def draws(self, i: int) -> rng.Draws:
        """Model i's draws: uniforms in [0, 1), one per flat element of its tensor, asked for as
        int64 words (`rng.uniform_words`, on the host) by flat element range: a draw is below
        probability p iff its word is below `rng.word_bounds(p)`.

        Each draw is a pure function of (seed, model i's tensor digest, tensor
        name, flat element index), so it never depends on schedule, block size or
        how the elements are asked for. It may be called from several threads at once.
        """
        ...

    def keep_mask(self, i: int, density: float) -> torch.Tensor:
        """Bool mask of shape `shape`: whether each draw (`draws`) is below `density`."""
        ...

    def omitted(self, i: int) -> bool:
        """Whether model i's tensor is left out by a read budget (none of its blocks is
        allocated): it then stands for the base, a zero delta, and is never read."""
        ...

    def delta_stats(self, i: int) -> DeltaStats | None:
        """Where a method that makes model i's whole delta against the base anyway feeds it
        (every element once, in chunks that end on `STATS_PIECE` multiples), so the executor
        keeps its block statistics for budgets;
        None when they are not wanted (known already, or a budget cut the expert down)."""
        ...

    def expert_work(
        self, i: int, recipe: Mapping[str, Scalar | str], compute: Callable[[], SparseDelta]
    ) -> SparseDelta:
        """Model i's per-expert result (a sparsified delta against the base).

        `recipe` is everything besides the expert's and the base's tensors that
        decides it. The executor returns the cached result of the same recipe on
        the same tensors (and seed), or calls `compute` and caches what it returns.
        """
        ...


class Method(ABC):
    """A merge method: a name, its parameters, and how it merges one tensor."""

    name: ClassVar[str]
    #: Bump when the arithmetic changes: it is part of every cache key.
    version: ClassVar[int] = 1
    base_policy: ClassVar[BasePolicy] = "required"
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None
    params: ClassVar[tuple[ParamSpec, ...]] = ()
    #: Whether a read budget applies: the method adds per-expert deltas against a base,
    #: so an unread expert block can stand for a zero delta.
    budgeted: ClassVar[bool] = False
    #: Whether merges draw random numbers (the spec's seed matters).
    draws: ClassVar[bool] = False

    @abstractmethod
    def merge(self, ctx: TensorContext) -> torch.Tensor:
        """Merge one tensor; return float32 of shape `ctx.shape`."""

    def start_merge(self, ctx: TensorContext) -> Future[torch.Tensor]:
        """Merge one tensor, whose future is `merge`'s result. A method that finishes its
        tensors on a thread of its own may return before that ends, so that the executor
        starts on the next tensor meanwhile (`ctx` stays alive until the future is done).
        By default the tensor is merged here."""
        return finished(self.merge(ctx))

    def check_params(self, shared: dict[str, Scalar], per_model: list[dict[str, Scalar]]) -> str | None:
        """Return why a combination of resolved values is invalid (beyond each
        parameter's own bounds), or None. Called once per tensor at compile time."""
        return None

    def expert_recipe(
        self, param: Callable[[str], Scalar], model_param: Callable[[str], Scalar]
    ) -> dict[str, Scalar | str] | None:
        """The recipe of a model's per-expert work (see `TensorContext.expert_work`), given
        its resolved parameters; None when the method does no per-expert work for it."""
        return None

    def rows_independent(
        self, param: Callable[[str], Scalar], model_params: Sequence[Callable[[str], Scalar]]
    ) -> bool:
        """Whether, with these resolved parameters, each row of the merged tensor depends only
        on the same row of every input (no whole-tensor statistics): a read budget then
        computes only the rows its allocated blocks cover and takes the base's elsewhere."""
        return False

    def param_spec(self, name: str) -> ParamSpec | None:
        """The spec of parameter `name`, or None if this method does not take it."""
        return next((p for p in self.params if p.name == name), None)


def finished(tensor: torch.Tensor) -> Future[torch.Tensor]:
    """A future that is already done, with `tensor`."""
    done: Future[torch.Tensor] = Future()
    done.set_result(tensor)
    return done


#: int8_mask is accepted for mergekit compatibility and has no effect on results.
INT8_MASK = ParamSpec("int8_mask", bool, "method", default=False)
WEIGHT = ParamSpec("weight", float, "model", default=None)
