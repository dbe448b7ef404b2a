"""Generalized task arithmetic: task_arithmetic, ties, dare_*, breadcrumbs*, della*.

Per tensor: delta_i = model_i - base; sparsify each delta with its own density;
multiply by its weight; with consensus keep only entries whose sign matches the
elected sign of the weighted sum; optionally normalize by the summed weights of
what was kept; scale by lambda; add to the base. See DESIGN.md section 5.

Memory does not grow with the number of models: models are folded in one at a
time into a handful of accumulators, and the consensus is resolved at the end
(the elected sign picks the positive or the negative partial sums). A sparsified
model reaches the fold as its sparse delta (mask, expert as stored, factor), and
the fold makes its weighted kept delta a chunk at a time: no float32 copy of a
model's delta waits for the fold. A model used whole reaches it as its expert
and base (`_Whole`), and the fold makes its weighted delta a chunk at a time
too, gathering the delta's block statistics for budgets on the way.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch

from mergebuild import native
from mergebuild.methods import sparsify
from mergebuild.methods.base import (
    INT8_MASK,
    WEIGHT,
    Method,
    ParamSpec,
    Scalar,
    TensorContext,
    finished,
)
from mergebuild.methods.delta_stats import STATS_PIECE, DeltaStats
from mergebuild.methods.sparse_delta import Difference, SparseDelta, difference, kept_delta

Sparsifier = Literal["magnitude", "random", "magnitude_outliers", "della"]

_DENSITY = ParamSpec("density", float, "model", default=1.0, bounds=(0.0, 1.0, False, True))
_GAMMA = ParamSpec("gamma", float, "model", default=0.01, bounds=(0.0, 1.0, True, False))
_EPSILON = ParamSpec("epsilon", float, "model", default=0.15, bounds=(0.0, 1.0, True, False))
_LAMBDA = ParamSpec("lambda", float, "method", default=1.0)


#: Up to this many models, which models' weights a consensus keeps per element is a bit
#: set, and the divisor comes from a table of the weight sums of all 2^K subsets.
_MAX_BIT_MODELS = 16
#: Elements a consensus fold clamps (and looks divisors up for) at a time: the size of its
#: scratch buffers. At 2 MiB per float32 buffer a chunk's temporaries stay in the CPU's
#: cache between the fold's passes: a fold of four 16000 x 1536 models takes 230 ms against
#: 330 with chunks of 4M elements (one thread). A multiple of `STATS_PIECE`.
_CLAMP_CHUNK = 1 << 19
assert _CLAMP_CHUNK % STATS_PIECE == 0


#: Bytes of models' sparse deltas that may wait for the fold (about 3 per element: the mask
#: and the expert as stored). Up to this, two models wait, so sparsifying the next one need
#: not wait for each fold to end; the thread that merges waited 4.5 s of a 45 s 630M x 8
#: ties build for folds inside a tensor. A larger tensor (the embeddings) waits for one.
_FOLD_QUEUE_BYTES = 32 << 20


def _folds_ahead(numel: int) -> int:
    """How many models of a tensor of `numel` elements may wait for the fold at once."""
    return 2 if 3 * numel <= _FOLD_QUEUE_BYTES else 1


def _chunks(numel: int) -> Iterator[slice]:
    """Consecutive slices of `_CLAMP_CHUNK` elements (the last one shorter) covering `numel`."""
    for start in range(0, numel, _CLAMP_CHUNK):
        yield slice(start, min(start + _CLAMP_CHUNK, numel))


def _compare(chunk: torch.Tensor, positive: bool, out: torch.Tensor) -> torch.Tensor:
    """`chunk > 0` (or `< 0`, not `positive`) into bool `out`, both contiguous. On the host
    numpy compares: 0.15 ns per element against 0.43 for torch with a boolean output."""
    if chunk.device.type == "cpu":
        (np.greater if positive else np.less)(chunk.numpy(), 0, out=out.numpy())
        return out
    return (torch.gt if positive else torch.lt)(chunk, 0, out=out)


def _pick(elected: torch.Tensor, if_true: torch.Tensor, if_false: torch.Tensor, out: torch.Tensor) -> None:
    """`torch.where(elected, if_true, if_false)` into `out` (which may be `if_true`, not
    `if_false`), all contiguous and of one size. On the host as bit operations on the values'
    bit patterns, `f ^ ((t ^ f) & -elected)`: 0.5 ns per float32 element against 3.5 for
    torch.where, whose branch per element the elected signs mispredict half the time."""
    if out.device.type != "cpu":
        torch.where(elected, if_true, if_false, out=out)
        return
    bits = np.uint8 if out.element_size() == 1 else np.int32
    t, f, o = (x.numpy().view(bits) for x in (if_true, if_false, out))
    np.bitwise_xor(t, f, out=o)
    o &= np.negative(elected.numpy().astype(bits))  # all ones where elected
    o ^= f


@functools.cache
def _folder() -> ThreadPoolExecutor:
    """The one thread that folds models in (one for the process: a thread per tensor would
    also give glibc a new arena to keep freed memory in)."""
    return ThreadPoolExecutor(1, thread_name_prefix="mergebuild-fold")


@dataclass(frozen=True)
class _Whole:
    """Model i's weighted delta, `difference(expert, base) * weight`, made a chunk at a time;
    with `stats`, the delta's block statistics are gathered on the way."""

    expert: torch.Tensor
    base: torch.Tensor
    weight: torch.Tensor
    stats: DeltaStats | None

    def chunk(self, part: slice, out: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
        """Flat elements `part` of the weighted delta, written to `out` (their size). The
        difference and the product are elementwise, so the bits are the whole tensor's."""
        delta = difference(self.expert.reshape(-1)[part], self.base.reshape(-1)[part], out)
        if self.stats is not None:
            self.stats.add(part.start, delta)
        return delta.mul_(self.weight)


@dataclass(frozen=True)
class _Kept:
    """Model i's weighted kept delta, `kept_delta(...) * weight`, made a chunk at a time."""

    sparse: SparseDelta
    base: torch.Tensor
    weight: torch.Tensor

    def chunk(self, part: slice, out: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
        """Flat elements `part` of the weighted kept delta, written to `out` (their size;
        `scratch` too). `kept_delta` is elementwise, so the bits are the whole tensor's."""
        sparse = self.sparse
        expert, mask = sparse.expert.reshape(-1)[part], sparse.mask.reshape(-1)[part]
        base = self.base.reshape(-1)[part]
        return kept_delta(mask, expert, base, sparse.factor, out, scratch).mul_(self.weight)


@dataclass(frozen=True)
class _Finish:
    """What turns the mixed delta into the merged tensor, elementwise (so a chunk at a time):
    divided by the kept weights when normalizing, times lambda, plus the base."""

    normalize: bool
    #: The divisor of a normalized mix that does not track kept weights: every model's
    #: weight, summed in model order (1 where that is below 1e-8 in magnitude).
    weight_sum: torch.Tensor
    lam: torch.Tensor | None  # float32 0-d; None for 1
    base: torch.Tensor

    def apply(self, mixed: torch.Tensor, divisor: torch.Tensor | None, part: slice) -> None:
        """Finish `mixed`, flat elements `part` of the mix, in place."""
        if divisor is not None:
            mixed.div_(divisor)
        if self.lam is not None:
            mixed.mul_(self.lam)
        mixed.add_(self.base.reshape(-1)[part])


class _Fold:
    """Running sums over models, folded in one at a time in model order, a chunk of
    `_CLAMP_CHUNK` elements at a time.

    Without consensus only the total. With consensus only the positive and the
    negative parts, each summed in model order: the elected sign is that of
    their sum (the weighted sum, added up positives first), so no running total
    is kept (a tensor's size in float32 less, and a pass less per model).
    When the result is normalized, they also track which models
    took part on each side: as bit sets for up to `_MAX_BIT_MODELS` models (the
    divisor is then looked up in a table of subset sums, added in model order,
    which is exactly what running float sums give), else as running float sums.
    A model comes as a `_Whole` or a `_Kept`, whose chunks the fold makes in a
    scratch buffer.
    """

    def __init__(self, consensus: bool, weights: list[float], track_weights: bool) -> None:
        self.consensus = consensus
        self.weights = [torch.tensor(w, dtype=torch.float32) for w in weights]
        self.track_weights = consensus and track_weights
        self.use_bits = len(weights) <= _MAX_BIT_MODELS
        self.total: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None
        self.neg: torch.Tensor | None = None
        self.pos_weight: torch.Tensor | None = None
        self.neg_weight: torch.Tensor | None = None
        #: Where a model's signs are flagged, a chunk at a time.
        self.flags: torch.Tensor | None = None
        #: Where a later model's negative part is clamped to, a chunk at a time.
        self.scratch: torch.Tensor | None = None
        #: Where a model's chunk is made.
        self.kept: torch.Tensor | None = None
        #: Where the elected signs of a chunk are flagged.
        self.elected: torch.Tensor | None = None
        #: The divisors by kept bit set (see `_subset_sums`), made on first use.
        self.table: torch.Tensor | None = None

    def add(self, group: Sequence[tuple[int, _Whole | _Kept]], finish: _Finish | None = None) -> None:
        """Fold in the weighted deltas of `group` (model i and its delta, in model order), made a
        chunk at a time; with `finish` (the group holds the last model) each chunk of the sums
        is then turned into the merged tensor's (see `result`). Each chunk takes the group's
        models in turn, so the sums are the same as from one model at a time; where one kernel
        folds them (`_fuses`), a tile of the sums stays in the CPU's cache from one model to
        the next.

        The sums start at zero, and `0 + x` is `x + 0` (IEEE: both turn -0 into +0), so
        the first model's sums are its own values plus 0, without zeroed buffers.
        """
        like = group[0][1].base
        first = self.total is None and self.pos is None
        if first:
            if self.consensus:
                self.pos = torch.empty_like(like, dtype=torch.float32)
                self.neg = torch.empty_like(self.pos)
            else:
                self.total = torch.empty_like(like, dtype=torch.float32)
            if self.track_weights:
                self._start_weights(like)
        kept = [
            (i, weighted) for i, weighted in group if isinstance(weighted, _Kept) and self._fuses(weighted)
        ]
        for part in _chunks(like.numel()):
            if len(kept) == len(group):
                self._add_chunk_fused(kept, part, first)
            else:
                size = part.stop - part.start
                for index, (i, weighted) in enumerate(group):
                    # The scratch buffer is free again before `_add_chunk` clamps into it.
                    chunk = self._buffer("kept", like)[:size], self._buffer("scratch", like)[:size]
                    self._add_chunk(i, part, weighted.chunk(part, *chunk), first and index == 0)
            if finish is not None:
                self._finish_chunk(part, finish)
        if finish is not None:
            if self.consensus:
                self.total = self.pos
            self.pos = self.neg = self.pos_weight = self.neg_weight = None

    def result(self) -> torch.Tensor:
        """The merged tensor, once the last model was folded in with its `_Finish`: over the
        total (with consensus, the positive sums), chunk by chunk while each chunk of the
        sums was still in the CPU's cache."""
        assert self.total is not None
        return self.total

    def _buffer(
        self,
        name: Literal["kept", "scratch", "elected"],
        like: torch.Tensor,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """The scratch buffer `name`, a chunk's size (made on first use)."""
        buf = getattr(self, name)
        if buf is None:
            buf = torch.empty(min(like.numel(), _CLAMP_CHUNK), dtype=dtype, device=like.device)
            setattr(self, name, buf)
        return buf

    def _fuses(self, weighted: _Kept) -> bool:
        """Whether a kept delta's chunks are made and folded in by a native kernel (see
        `mergebuild.native`; the same bits as `_add_chunk`): where its kept weights, if
        tracked, are bit sets."""
        if self.track_weights and not self.use_bits:
            return False
        sparse = weighted.sparse
        return native.usable(sparse.expert, sparse.mask, weighted.base, sparse.factor)

    def _add_chunk_fused(self, kept: list[tuple[int, _Kept]], part: slice, first: bool) -> None:
        """`_add_chunk` of flat elements `part` of the weighted kept deltas of `kept` (model i
        and its delta, in model order), made and folded in by one native kernel."""
        models = [
            (
                weighted.sparse.expert.reshape(-1)[part],
                weighted.sparse.mask.reshape(-1)[part],
                weighted.sparse.factor,
                weighted.weight,
                1 << i,
            )
            for i, weighted in kept
        ]
        like = kept[0][1].base
        assert all(weighted.base is like for _, weighted in kept), "one base for the tensor"
        base = like.reshape(-1)[part]
        if not self.consensus:
            assert self.total is not None
            native.fold_total(models, base, self.total.reshape(-1)[part], first)
            return
        assert self.pos is not None and self.neg is not None
        pos, neg = self.pos.reshape(-1)[part], self.neg.reshape(-1)[part]
        native.fold_signed(models, base, pos, neg, first, self._bit_sets(part))

    def _bit_sets(self, part: slice) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Flat elements `part` of the positive and negative bit sets, when they are tracked."""
        if not (self.track_weights and self.use_bits):
            return None
        assert self.pos_weight is not None and self.neg_weight is not None
        return self.pos_weight.reshape(-1)[part], self.neg_weight.reshape(-1)[part]

    def _add_chunk(self, i: int, part: slice, chunk: torch.Tensor, first: bool) -> None:
        """Fold flat elements `part` of model i's weighted delta (`chunk`, overwritten)."""
        if not self.consensus:
            assert self.total is not None
            total = self.total.reshape(-1)[part]
            if first:
                torch.add(chunk, 0.0, out=total)
            else:
                total += chunk
            return
        if self.track_weights:
            self._track(i, part, chunk)
        assert self.pos is not None and self.neg is not None
        pos, neg = self.pos.reshape(-1)[part], self.neg.reshape(-1)[part]
        # clamp keeps a value or gives +0, as where(sign, value, 0) would: same sums, fewer passes.
        if first:
            torch.clamp(chunk, max=0, out=neg).add_(0.0)
            torch.clamp(chunk, min=0, out=pos).add_(0.0)
            return
        neg += torch.clamp(chunk, max=0, out=self._buffer("scratch", chunk)[: chunk.numel()])
        pos += chunk.clamp_(min=0)

    def _start_weights(self, like: torch.Tensor) -> None:
        dtype = torch.float32 if not self.use_bits else torch.uint8 if len(self.weights) <= 8 else torch.int32
        self.pos_weight = torch.zeros_like(like, dtype=dtype)
        self.neg_weight = torch.zeros_like(like, dtype=dtype)
        self.flags = torch.empty(min(like.numel(), _CLAMP_CHUNK), dtype=torch.bool, device=like.device)

    def _track(self, i: int, part: slice, chunk: torch.Tensor) -> None:
        """Add model i's weight (or bit) where its weighted delta (flat elements `part`) is
        positive, or negative."""
        assert self.pos_weight is not None and self.neg_weight is not None and self.flags is not None
        alpha = (1 << i) if self.use_bits else float(self.weights[i])
        flags = self.flags[: chunk.numel()]
        self.pos_weight.reshape(-1)[part].add_(_compare(chunk, positive=True, out=flags), alpha=alpha)
        self.neg_weight.reshape(-1)[part].add_(_compare(chunk, positive=False, out=flags), alpha=alpha)

    def _finish_chunk(self, part: slice, finish: _Finish) -> None:
        """Turn flat elements `part` of the sums into the merged tensor's, over the total
        (with consensus, over the positive sums).

        With consensus the elected sign (that of the positive plus the negative sum, 0
        counting as positive) picks the positive or the negative sum, and, when
        normalizing, the weights of the models kept on that side; without, a normalized
        total is divided by all models' weights.
        """
        divisor: torch.Tensor | None = finish.weight_sum if finish.normalize else None
        base = finish.base.reshape(-1)[part]
        if not self.consensus:
            assert self.total is not None
            total = self.total.reshape(-1)[part]
            if native.usable(total, base):
                native.finish_total(total, divisor, finish.lam, base)
            else:
                finish.apply(total, divisor, part)
            return
        assert self.pos is not None and self.neg is not None
        pos, neg = self.pos.reshape(-1)[part], self.neg.reshape(-1)[part]
        if native.usable(pos, base) and not (self.track_weights and not self.use_bits):
            table = None
            if self.track_weights:
                divisor, table = None, self._divisor_table(pos.device)
            native.finish_signed(pos, neg, self._bit_sets(part), table, divisor, finish.lam, base)
            return
        # The scratch buffer is free again: the chunk was folded in.
        weighted_sum = torch.add(pos, neg, out=self._buffer("scratch", pos)[: pos.numel()])
        elected = self._buffer("elected", pos, torch.bool)[: pos.numel()]
        if pos.device.type == "cpu":
            np.greater_equal(weighted_sum.numpy(), 0, out=elected.numpy())
        else:
            torch.ge(weighted_sum, 0, out=elected)
        _pick(elected, pos, neg, pos)
        if self.track_weights:
            divisor = self._kept_weight(part, elected)
        finish.apply(pos, divisor, part)

    def _kept_weight(self, part: slice, elected: torch.Tensor) -> torch.Tensor:
        """The summed weights of the models kept on the elected side of flat elements `part`
        (0 replaced by 1), in the scratch buffer."""
        assert self.pos_weight is not None and self.neg_weight is not None
        chosen = self.pos_weight.reshape(-1)[part]
        _pick(elected, chosen, self.neg_weight.reshape(-1)[part], chosen)
        if not self.use_bits:
            return chosen.masked_fill_(chosen == 0, 1.0)
        # numpy's take indexes with the bit sets as they are (it converts the indices to
        # int64 first). Every bit set is an index of the table, so "clip" clips nothing;
        # unlike "raise", it does not copy `out`. A GPU indexes with index_select.
        divisors = self._buffer("scratch", chosen)[: chosen.numel()]
        table = self._divisor_table(chosen.device)
        if chosen.device.type == "cpu":
            np.take(table.numpy(), chosen.numpy(), out=divisors.numpy(), mode="clip")
        else:
            torch.index_select(table, 0, chosen.long(), out=divisors)
        return divisors

    def _divisor_table(self, device: torch.device) -> torch.Tensor:
        """The divisors by kept bit set (`_subset_sums`) on `device`, made on first use."""
        if self.table is None:
            table = self._subset_sums()
            self.table = table if device.type == "cpu" else table.to(device)
        return self.table

    def _subset_sums(self) -> torch.Tensor:
        """Entry b: the float32 sum, in model order, of the weights of the models in bit
        set b; 1 where that is 0 (nothing kept, or weights that cancel)."""
        subsets = torch.arange(1 << len(self.weights))
        sums = torch.zeros(subsets.shape, dtype=torch.float32)
        for i, weight in enumerate(self.weights):
            sums = torch.where((subsets >> i) & 1 == 1, sums + weight, sums)
        return torch.where(sums == 0, torch.ones_like(sums), sums)


class TaskArithmeticFamily(Method):
    """One member of the family, fixed by its consensus, sparsifier and defaults."""

    # 2: under a budget, rows that no model's allocated block covers are the base's bits.
    # 3: the L1 rescale factor comes from fixed-point sums, the same on any machine.
    # 4: the elected sign is that of the positive sum plus the negative sum.
    version = 4
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
        cls.draws = cls.sparsifier in ("random", "della")

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

    def rows_independent(
        self, param: Callable[[str], Scalar], model_params: Sequence[Callable[[str], Scalar]]
    ) -> bool:
        # Only sparsifiers look at the whole tensor (top-k thresholds, L1 rescaling);
        # signs, consensus and normalization are per element.
        return all(self.expert_recipe(param, model_param) is None for model_param in model_params)

    def weighted_delta(
        self, ctx: TensorContext, i: int, base: torch.Tensor, weight: torch.Tensor
    ) -> _Whole | _Kept:
        """Model i's delta, sparsified (and L1-rescaled) when the method says so, times its
        weight (float32, 0-d), as the fold makes it a chunk at a time."""
        recipe = self.expert_recipe(ctx.param, lambda name: ctx.model_param(i, name))
        if recipe is None or base.numel() == 0:
            return _Whole(ctx.stored_model(i), base, weight, ctx.delta_stats(i))
        density = float(recipe["density"])

        def compute() -> SparseDelta:
            model = ctx.stored_model(i)
            # The sparsifiers, the rescale's sums and the block statistics stream over the
            # delta: made a block (or della's slice of rows) at a time, it is never whole.
            delta = Difference(model, base)
            stats = ctx.delta_stats(i)
            # The block statistics ride along a pass over the delta that is made anyway: the
            # rescale's, else the mask's.
            mask = self._mask(ctx, i, delta, density, None if recipe["rescale"] else stats)
            # Only the rescale factor is taken from the delta (and, on the way, its block
            # statistics): the fold makes the kept delta from the mask and the expert as
            # stored, as from a cached one.
            factor = sparsify.rescale_factor(delta, mask, stats) if recipe["rescale"] else None
            return SparseDelta(mask, model, factor)

        return _Kept(ctx.expert_work(i, recipe, compute), base, weight)

    def _mask(
        self,
        ctx: TensorContext,
        i: int,
        delta: torch.Tensor | Difference,
        density: float,
        stats: DeltaStats | None,
    ) -> torch.Tensor:
        """Model i's keep-mask; `stats` (if any) is fed every element of the delta, by the
        magnitude sparsifiers' own first pass, else by a pass of its own."""
        if self.sparsifier == "magnitude":
            return sparsify.magnitude(delta, density, stats)
        if self.sparsifier == "magnitude_outliers":
            return sparsify.magnitude_outliers(delta, density, float(ctx.model_param(i, "gamma")), stats)
        if stats is not None:
            stats.add_all(delta)
        if self.sparsifier == "random":
            return ctx.keep_mask(i, density)
        return sparsify.della(delta, ctx.draws(i), density, float(ctx.model_param(i, "epsilon")))

    def merge(self, ctx: TensorContext) -> torch.Tensor:
        return self.start_merge(ctx).result()

    def start_merge(self, ctx: TensorContext) -> Future[torch.Tensor]:
        """Fold the models in on the fold thread; the future ends with the last fold, which also
        finishes the merged tensor. A tensor whose models wait for the fold one at a time
        (`_folds_ahead`) ends before this returns: only a small tensor's sums are still alive
        while the next tensor starts."""
        if ctx.num_models == 0:
            return finished(ctx.base())
        # The base stays as stored: every use promotes it a chunk at a time (a float32 copy
        # of a 16-bit base would hold 2 more bytes per element for the whole merge).
        base = ctx.stored_base()
        weights = [float(ctx.model_param(i, "weight")) for i in range(ctx.num_models)]
        normalize = bool(ctx.param("normalize"))
        fold = _Fold(self.consensus, weights, track_weights=normalize)
        weight_sum = torch.zeros((), dtype=torch.float32)
        for weight in fold.weights:
            weight_sum += weight
        lam = float(ctx.param("lambda"))
        finish = _Finish(
            normalize,
            weight_sum if weight_sum.abs() >= 1e-8 else torch.ones(()),
            None if lam == 1 else torch.tensor(lam, dtype=torch.float32),
            base,
        )
        # A zero delta (a model a budget left out) stays zero through every sparsifier and
        # adds nothing to any sum: skipping it gives the same bits, without the work.
        folded = [i for i in range(ctx.num_models) if not ctx.omitted(i)]
        if not folded:
            mixed = torch.zeros_like(base, dtype=torch.float32)
            untracked = normalize and not fold.track_weights
            finish.apply(mixed.reshape(-1), finish.weight_sum if untracked else None, slice(None))
            return finished(mixed)
        # Models are folded in on a second thread while the next models are read and
        # sparsified (torch releases the GIL): folds stay in model order, one group at a time,
        # and up to `_folds_ahead` groups wait for theirs. Where two models may wait, they are
        # folded in twos, which moves the sums through memory half as often. The last fold
        # also finishes the merged tensor, a chunk at a time.
        folder = _folder()
        ahead = _folds_ahead(base.numel())
        pending: collections.deque[Future[None]] = collections.deque()
        group: list[tuple[int, _Whole | _Kept]] = []
        try:
            for i in folded:
                group.append((i, self.weighted_delta(ctx, i, base, fold.weights[i])))
                if len(group) < ahead and i != folded[-1]:
                    continue
                while len(pending) >= ahead:
                    pending.popleft().result()
                pending.append(folder.submit(fold.add, group, finish if i == folded[-1] else None))
                # The fold owns the group now: holding it here too would keep its models alive
                # while the next ones are made.
                group = []
        except BaseException:
            # Every fold ends before an error is raised (a fold's own first): none is left
            # writing into sums that nothing will read.
            wait(pending)
            for folding in pending:
                folding.result()
            raise
        # The fold thread runs its tasks in order: this one runs once every fold has ended.
        merged = folder.submit(_folded, list(pending), fold)
        if ahead == 1:
            wait([merged])
        return merged


def _folded(folds: list[Future[None]], fold: _Fold) -> torch.Tensor:
    """The merged tensor, once `folds` (all ended) raised nothing."""
    for ended in folds:
        ended.result()
    return fold.result()


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
