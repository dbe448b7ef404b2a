"""Sparsifiers for task-vector deltas (DESIGN.md section 5, step 2).

Each returns a boolean keep-mask of the delta's shape. Ties at a selection
threshold are broken by flat index, so the mask is a pure function of the
values, unlike an unstable sort: magnitude keeps the lowest indices among
elements tied with the k-th largest; breadcrumbs ranks tied elements in
ascending order by index (at the top boundary the lowest indices are kept, at
the bottom boundary the lowest indices are dropped).

How thresholds are found (float32, float16 and bfloat16 inputs of at least
`_SMALL` elements; the others take a kthvalue path with the same results, which
is also what the tests compare against): finite floats map to int32 keys that
order like the values (for |x|, the float32 bit pattern with the sign cleared).

On the host, one pass usually does it all. A sample of the keys (short runs of
contiguous elements at seeded positions) brackets each wanted rank by a key
range that the rank seldom falls outside. The pass writes the mask of every
element outside the brackets, counts how many lie below each, and gathers the
elements inside them (their keys and flat indices: a few percent of the tensor).
The exact order statistics then come from a sort of those candidates, and only
their mask bits are written afterwards. A lower bound alone (magnitude) whose
bracket would gather too much sits in a heavy tie (bf16 deltas tie by the
thousand): one pass then counts the keys below and equal to the sample's key
there, per block, writing the tied ones kept, and only the blocks holding ties
the bound drops are made again. The sample decides only the speed: when a
bracket misses its rank, or a tie is not where the sample put it, the radix
select below runs instead, with the same result. The
comparisons are numpy's, several times faster per element than torch's with
boolean outputs. A 32000 x 1536 bf16 delta's magnitude mask: 2.3 ns per element
on one thread, against 9.2 for the radix select.

Otherwise (a GPU, or a bracket that missed) an order statistic is a two-level
radix select: a histogram of the keys' high 16 bits (bincount) locates the bin
holding the wanted rank, and a histogram of the low 16 bits of that bin's
elements (picked out of each block) gives the exact key, with how many elements
lie below it and tie with it. A last pass writes the mask, switching from
keeping tied elements to dropping them (or back) after the right number of them
in flat-index order. Each pass (of either way) streams the input in blocks of
`_BLOCK` elements through reused buffers, so no full-size temporary is
allocated (only the mask), no full-length cumsum or sort runs, and the input is
read one to three times. The input may be a `Difference`
(expert - base), whose blocks are then made as they are read: the delta is
never whole in memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from fractions import Fraction
from typing import NamedTuple

import numpy as np
import torch

from mergebuild import native, parallel, rng
from mergebuild.methods.delta_stats import STATS_PIECE, DeltaStats
from mergebuild.methods.fixed_point import masked_sums
from mergebuild.methods.sparse_delta import Difference, flat_part

#: Dtypes whose values convert to float32 exactly (so float32 keys order them).
_KEYED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Elements per block of the streaming passes: big enough that the per-op overhead
#: vanishes (a 4096 x 1536 magnitude mask: 5.5 ns per element on one thread against 11 ns
#: with 32K-element blocks), small enough that the buffers stay in the last-level cache.
_BLOCK = 1 << 20
assert _BLOCK % STATS_PIECE == 0, "the rescale feeds block statistics whole blocks"
#: Below this many elements, kthvalue and a cumsum cost less than the radix select's
#: fixed work (bincounts and scans of 2^15 + 2^16 counters, about 0.3 ms).
_SMALL = 1 << 15
#: The bracketing sample: `_RUNS` runs of `_RUN` contiguous elements (contiguous, so the
#: sample costs a few cache misses per run; many runs, so a pattern along rows or columns
#: averages out). A tensor of at most `_RUNS * _RUN` elements is its own sample.
_RUNS, _RUN = 2048, 8
#: A bracket's half-width around the sample's quantile, in standard deviations of that
#: quantile (for a uniform sample), plus two sample elements. On the benchmark family's
#: bf16 deltas 1 to 3 % of brackets miss (a pass wasted); wider ones gather more ties.
_SIGMAS = 3.0
#: Brackets that would gather more than this share of the elements (a heavy tie near the
#: threshold) are not worth gathering: the radix select runs instead.
_MAX_BRACKET_SHARE = 1 / 4
_INT32 = np.iinfo(np.int32)


class _OrderStat(NamedTuple):
    """The key at one ascending rank, with how many keys are below it and equal to it."""

    key: int
    below: int
    equal: int


class _Bound(NamedTuple):
    """One side of a kept range: keys strictly inside are kept, keys outside dropped. Keys
    equal to `key` are kept iff `tied_in`, except that after the first `flip_after` of
    them in flat-index order (0: never) the rest get the opposite."""

    key: int
    tied_in: bool
    flip_after: int = 0


class _Keys:
    """The int32 keys of a float tensor, computed block by block into one reused buffer.

    With `absolute` the keys order like |x|: the float32 bit pattern of |x|.
    Otherwise like x (finite): +m for x >= 0 and -m for x < 0, m the bit pattern
    of |x|, so -0.0 and +0.0 share the key 0.
    """

    def __init__(self, x: torch.Tensor | Difference, absolute: bool, stats: DeltaStats | None = None) -> None:
        self.source = x
        self.n = x.numel()
        self.absolute = absolute
        #: Fed each element's float32 value once, in the first pass that reaches it.
        self.stats = stats
        self.fed = 0
        size = min(_BLOCK, self.n)
        self.buf = torch.empty(size, dtype=torch.int32, device=x.device)
        self.aux = torch.empty(0 if absolute else size, dtype=torch.int32, device=x.device)
        # Where a block is converted to float32 (or, of a Difference, made).
        self.f32 = None
        if isinstance(x, Difference) or x.dtype != torch.float32:
            self.f32 = torch.empty(size, dtype=torch.float32, device=x.device)

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (start, keys of flat elements start .. start + len(keys) - 1); the keys
        tensor is overwritten by the next block."""
        for lo in range(0, self.n, _BLOCK):
            yield lo, self.block_at(lo)

    def block_at(self, lo: int) -> torch.Tensor:
        """The keys of the block that starts at flat element `lo` (a multiple of `_BLOCK`),
        in the reused buffer."""
        values = self.values_at(lo)
        m = values.numel()
        return _key_values(values, self.absolute, self.buf[:m], self.aux[:m])

    def values_at(self, lo: int) -> torch.Tensor:
        """The float32 values of the block that starts at flat element `lo` (a multiple of
        `_BLOCK`), contiguous: a view of a float32 tensor, else in a reused buffer."""
        part = slice(lo, min(lo + _BLOCK, self.n))
        m = part.stop - lo
        values = flat_part(self.source, part, self.f32[:m] if self.f32 is not None else None)
        if self.stats is not None and lo == self.fed:
            self.stats.add(lo, values)
            self.fed = part.stop
        return values

    def sample(self) -> np.ndarray:
        """The sorted keys of a sample of the elements (see `_RUNS`): at seeded positions, so
        the same tensor always gets the same sample."""
        runs = self.n // _RUN
        if runs <= _RUNS:
            index = torch.arange(self.n, device=self.buf.device)
        else:
            picked = np.sort(np.random.default_rng(self.n).choice(runs, _RUNS, replace=False))
            flat_index = (picked[:, None] * _RUN + np.arange(_RUN)).reshape(-1)
            index = torch.from_numpy(flat_index).to(self.buf.device)
        source = self.source
        if isinstance(source, Difference):
            # The same values as `difference` makes: both operands promote to float32 exactly.
            values = source.expert.reshape(-1)[index].float() - source.base.reshape(-1)[index].float()
        else:
            values = source.reshape(-1)[index].float()
        size = values.numel()
        aux = torch.empty(0 if self.absolute else size, dtype=torch.int32, device=values.device)
        keys = _key_values(values, self.absolute, torch.empty_like(values, dtype=torch.int32), aux)
        return np.sort(keys.cpu().numpy())


def _key_values(values: torch.Tensor, absolute: bool, out: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
    """The int32 keys of float32 `values` (see `_Keys`) into `out`; `aux` (int32, the same
    size) is scratch for signed keys."""
    bits = values.view(torch.int32)
    if absolute:
        return torch.bitwise_and(bits, 0x7FFFFFFF, out=out)
    sign = torch.bitwise_right_shift(bits, 31, out=aux)  # -1 if negative
    torch.bitwise_and(sign, 0x7FFFFFFF, out=out)
    out ^= bits  # negative: -1 - m (the low 31 bits flipped)
    out -= sign  # negative: -m
    return out


def _select(keys: _Keys, ranks: list[int]) -> list[_OrderStat]:
    """Order statistics of `keys` at the given ascending 0-based ranks (radix select)."""
    offset = 0 if keys.absolute else 1 << 15  # high halves in [-2^15, 2^15) -> [0, 2^16)
    size = (1 << 15) + 2 * offset
    hist = torch.zeros(size, dtype=torch.int64, device=keys.buf.device)
    high_buf = torch.empty_like(keys.buf)
    for _, block in keys:
        high = torch.bitwise_right_shift(block, 16, out=high_buf[: block.numel()])
        if offset:
            high += offset
        hist += torch.bincount(high, minlength=size)
    cum = hist.cumsum(0)
    rank_bins = [int(torch.searchsorted(cum, rank, right=True)) for rank in ranks]  # first cum > rank
    bins = {b: int(cum[b]) - int(hist[b]) for b in rank_bins}  # bin -> number of keys in lower bins
    # Level 2: the low halves of the keys in each wanted bin (a small share of them).
    low_hists = {b: torch.zeros(1 << 16, dtype=torch.int64, device=hist.device) for b in bins}
    for _, block in keys:
        high = torch.bitwise_right_shift(block, 16, out=high_buf[: block.numel()])
        for b, low_hist in low_hists.items():
            in_bin = block[high == b - offset]
            low_hist += torch.bincount(in_bin.sub_((b - offset) << 16), minlength=1 << 16)
    stats = []
    for rank, b in zip(ranks, rank_bins, strict=True):
        low_hist = low_hists[b]
        low_cum = low_hist.cumsum(0)
        low = int(torch.searchsorted(low_cum, rank - bins[b], right=True))
        below = bins[b] + int(low_cum[low]) - int(low_hist[low])
        stats.append(_OrderStat(((b - offset) << 16) + low, below, int(low_hist[low])))
    return stats


class _Bracket(NamedTuple):
    """The elements whose keys lie in a key range (inclusive), gathered around one wanted rank."""

    below: int  # how many keys are below the range
    index: np.ndarray  # the flat indices of the elements inside, ascending
    keys: np.ndarray  # their keys

    def order_stat(self, rank: int) -> _OrderStat | None:
        """The order statistic at ascending `rank`, or None when the bracket missed it. Every
        key equal to one inside the bracket is inside it, so its tie count is complete."""
        j = rank - self.below
        if not 0 <= j < self.keys.size:
            return None
        # A sort, not np.partition: on keys with heavy ties (bf16 deltas) introselect takes
        # 20 times as long as numpy's vectorized sort.
        ordered = np.sort(self.keys)
        key = ordered[j]
        first, end = np.searchsorted(ordered, key, "left"), np.searchsorted(ordered, key, "right")
        return _OrderStat(int(key), self.below + int(first), int(end - first))

    def write(self, mask: np.ndarray, bound: _Bound, lower: bool) -> None:
        """Write the mask bits of the bracket's elements for `bound`, its lower or upper bound
        (the other bound, if any, lies on the far side of every key here)."""
        inside = np.greater(self.keys, bound.key) if lower else np.less(self.keys, bound.key)
        tied = np.flatnonzero(self.keys == bound.key)
        inside[tied] = bound.tied_in
        if bound.flip_after:
            inside[tied[bound.flip_after :]] = not bound.tied_in
        mask[self.index] = inside


def _bracket_keys(sample: np.ndarray, rank: int, n: int) -> tuple[int, int]:
    """The key range that holds the key at ascending `rank` of `n`, by the sorted sample."""
    m = sample.size
    q = (rank + 0.5) / n
    half = _SIGMAS * math.sqrt(q * (1 - q) / m) + 2 / m
    lo, hi = math.floor((q - half) * m), math.ceil((q + half) * m)
    return (
        int(sample[min(lo, m - 1)]) if lo > 0 else int(_INT32.min),
        int(sample[max(hi, 0)]) if hi < m - 1 else int(_INT32.max),
    )


BoundsOf = Callable[[_OrderStat | None, _OrderStat | None], tuple[_Bound | None, _Bound | None]]


def _rank_bounded_mask(
    keys: _Keys, lower_rank: int | None, upper_rank: int | None, bounds_of: BoundsOf
) -> torch.Tensor:
    """Flat mask of the keys inside the bounds that `bounds_of` makes from the order
    statistics at `lower_rank` and `upper_rank` (None: that side is unbounded)."""
    if lower_rank is None and upper_rank is None:
        return torch.ones(keys.n, dtype=torch.bool, device=keys.buf.device)
    if keys.buf.device.type == "cpu":
        mask = _bracketed_mask(keys, lower_rank, upper_rank, bounds_of)
        if mask is not None:
            return mask
    ranks = [r for r in (lower_rank, upper_rank) if r is not None]
    stats = dict(zip(ranks, _select(keys, ranks), strict=True))
    lower, upper = bounds_of(
        None if lower_rank is None else stats[lower_rank], None if upper_rank is None else stats[upper_rank]
    )
    return _bounded_mask(keys, lower, upper)


def _bracketed_mask(
    keys: _Keys, lower_rank: int | None, upper_rank: int | None, bounds_of: BoundsOf
) -> torch.Tensor | None:
    """`_rank_bounded_mask` in one pass over bracketed ranks (see the module docstring), or None
    when a bracket misses its rank or would gather too much."""
    n = keys.n
    sample = keys.sample()
    lower = None if lower_rank is None else _bracket_keys(sample, lower_rank, n)
    upper = None if upper_rank is None else _bracket_keys(sample, upper_rank, n)
    if lower is not None and upper is not None and lower[1] >= upper[0]:
        return None  # a rank range too narrow for two brackets
    # (rank, key range, is the lower bound) of each bracket.
    sides = [
        (rank, keys_range, is_lower)
        for rank, keys_range, is_lower in ((lower_rank, lower, True), (upper_rank, upper, False))
        if rank is not None and keys_range is not None
    ]
    if native.library() is not None:
        return _bracketed_mask_native(keys, sample, sides, bounds_of)
    ranges = [keys_range for _, keys_range, _ in sides]
    in_sample = sum(
        np.searchsorted(sample, hi, "right") - np.searchsorted(sample, lo, "left") for lo, hi in ranges
    )
    if in_sample > _MAX_BRACKET_SHARE * sample.size:
        if lower_rank is not None and upper_rank is None:
            return _tied_mask(keys, lower_rank, sample, bounds_of)
        return None
    limit = _MAX_BRACKET_SHARE * n + sample.size
    index_dtype = np.int32 if n <= _INT32.max else np.int64  # half the gathered bytes
    mask = torch.empty(n, dtype=torch.bool)
    out = mask.numpy()
    size = keys.buf.numel()
    ge, le = np.empty(size, dtype=bool), np.empty(size, dtype=bool)
    at_least = [0] * len(ranges)
    found: list[tuple[list[np.ndarray], list[np.ndarray]]] = [([], []) for _ in ranges]
    gathered = 0
    for start, block in keys:
        k = block.numpy()
        m = k.size
        dst = out[start : start + m]
        # Strictly between the brackets: kept whatever the exact bounds turn out to be.
        if lower is not None:
            np.greater(k, lower[1], out=dst)
        if upper is not None:
            if lower is None:
                np.less(k, upper[0], out=dst)
            else:
                dst &= np.less(k, upper[0], out=ge[:m])
        for j, (lo, hi) in enumerate(ranges):
            inside = np.greater_equal(k, lo, out=ge[:m])
            at_least[j] += int(np.count_nonzero(inside))
            inside &= np.less_equal(k, hi, out=le[:m])
            index = np.flatnonzero(inside)
            found[j][1].append(k[index])
            index += start
            found[j][0].append(index.astype(index_dtype))
            gathered += index.size
        if gathered > limit:
            return None
    brackets = [
        _Bracket(n - at_least[j], np.concatenate(found[j][0]), np.concatenate(found[j][1]))
        for j in range(len(ranges))
    ]
    stats: dict[bool, _OrderStat] = {}
    for (rank, _, is_lower), bracket in zip(sides, brackets, strict=True):
        stat = bracket.order_stat(rank)
        if stat is None:
            return None
        stats[is_lower] = stat
    lower_bound, upper_bound = bounds_of(stats.get(True), stats.get(False))
    for (_, _, is_lower), bracket in zip(sides, brackets, strict=True):
        bound = lower_bound if is_lower else upper_bound
        assert bound is not None
        bracket.write(out, bound, is_lower)
    return mask


#: One bracket: its rank, its key range (inclusive), and whether it is the lower bound's.
_Side = tuple[int, tuple[int, int], bool]


def _bracketed_mask_native(
    keys: _Keys, sample: np.ndarray, sides: list[_Side], bounds_of: BoundsOf
) -> torch.Tensor | None:
    """`_bracketed_mask` by the native kernel, which also counts ties: a bracket that the sample
    puts on one key (bf16 deltas tie by the million, most of all at 0) is counted, not
    gathered. Its ties are written kept, and only the blocks holding ties the bound drops
    are made again, to clear them (as `_tied_mask` does)."""
    n = keys.n
    tied = [lo == hi for _, (lo, hi), _ in sides]
    in_sample = sum(
        np.searchsorted(sample, hi, "right") - np.searchsorted(sample, lo, "left")
        for (_, (lo, hi), _), is_tied in zip(sides, tied, strict=True)
        if not is_tied
    )
    if in_sample > _MAX_BRACKET_SHARE * sample.size:
        if len(sides) == 1 and sides[0][2]:
            return _tied_mask(keys, sides[0][0], sample, bounds_of)
        return None
    # What the kernel counts and gathers: for a tied key K, the keys >= K and >= K + 1; for a
    # bracket, the keys >= its low end, and its keys. Per side, its first threshold and its
    # range (-1: none).
    thresholds: list[int] = []
    ranges: list[tuple[int, int]] = []
    first: list[tuple[int, int]] = []
    above = beneath = None
    for (_, (lo, hi), is_lower), is_tied in zip(sides, tied, strict=True):
        first.append((len(thresholds), -1 if is_tied else len(ranges)))
        thresholds += [lo, lo + 1] if is_tied else [lo]
        if not is_tied:
            ranges.append((lo, hi))
        # Strictly beyond the bracket (or from the tie on): kept whatever the bounds are.
        if is_lower:
            above = lo - 1 if is_tied else hi
        else:
            beneath = lo + 1 if is_tied else lo
    size = keys.buf.numel()
    at = [np.empty(size, dtype=np.int32) for _ in ranges]
    inside_keys = [np.empty(size, dtype=np.int32) for _ in ranges]
    counted = np.zeros(len(thresholds), dtype=np.int64)
    limit = _MAX_BRACKET_SHARE * n + sample.size
    index_dtype = np.int32 if n <= _INT32.max else np.int64  # half the gathered bytes
    mask = torch.empty(n, dtype=torch.bool)
    out = mask.numpy()
    found: list[tuple[list[np.ndarray], list[np.ndarray]]] = [([], []) for _ in ranges]
    gathered = 0
    counted_by_block = []  # per block, the running counts
    for start in range(0, n, _BLOCK):
        values = keys.values_at(start).numpy()
        dst = out[start : start + values.size]
        sizes = native.bracket_block(
            values, keys.absolute, above, beneath, dst, thresholds, counted, ranges, at, inside_keys
        )
        counted_by_block.append(counted.copy())
        for r, found_here in enumerate(sizes):
            found[r][1].append(inside_keys[r][:found_here].copy())
            found[r][0].append(at[r][:found_here].astype(index_dtype) + index_dtype(start))
            gathered += found_here
        if gathered > limit:
            return None
    stats: dict[bool, _OrderStat] = {}
    brackets: dict[bool, _Bracket] = {}
    for (rank, (lo, _), is_lower), (t, r) in zip(sides, first, strict=True):
        if r < 0:
            at_key, above_key = int(counted[t]), int(counted[t + 1])
            below, equal = n - at_key, at_key - above_key
            stat = _OrderStat(lo, below, equal) if below <= rank < below + equal else None
        else:
            indices, bracket_keys = (np.concatenate(parts) for parts in found[r])
            brackets[is_lower] = _Bracket(n - int(counted[t]), indices, bracket_keys)
            stat = brackets[is_lower].order_stat(rank)
        if stat is None:
            return None
        stats[is_lower] = stat
    bounds = dict(zip((True, False), bounds_of(stats.get(True), stats.get(False)), strict=True))
    for (_, _, is_lower), (t, r) in zip(sides, first, strict=True):
        bound = bounds[is_lower]
        assert bound is not None
        if r >= 0:
            brackets[is_lower].write(out, bound, is_lower)
            continue
        # Per block, the keys equal to the tied key: those >= K less those >= K + 1.
        running = np.array([block[t] - block[t + 1] for block in counted_by_block])
        _clear_ties(keys, out, bound, stats[is_lower].equal, [int(c) for c in np.diff(running, prepend=0)])
    return mask


def _clear_ties(keys: _Keys, out: np.ndarray, bound: _Bound, equal: int, tied: list[int]) -> None:
    """Clear the mask bits of the keys equal to `bound.key` that the bound drops, all of them
    written kept; `tied[b]` of the `equal` ties are in block b. Tie t (in flat-index order)
    gets `tied_in` if t < flip_after (or flip_after is 0), else the opposite: only the blocks
    holding ties to clear are made again."""
    if bound.tied_in:
        first, last = (bound.flip_after, equal) if bound.flip_after else (equal, equal)
    else:
        first, last = 0, bound.flip_after or equal
    eq = np.empty(keys.buf.numel(), dtype=bool)
    seen = 0
    for b, count in enumerate(tied):
        if seen + count > first and seen < last and count:
            start = b * _BLOCK
            k = keys.block_at(start).numpy()
            at = np.flatnonzero(np.equal(k, bound.key, out=eq[: k.size]))
            out[start + at[max(first - seen, 0) : last - seen]] = False
        seen += count


def _tied_mask(keys: _Keys, rank: int, sample: np.ndarray, bounds_of: BoundsOf) -> torch.Tensor | None:
    """`_rank_bounded_mask` of a lower rank alone that the (sorted) sample puts in a heavy tie at
    its key of that rank (too many elements to gather), or None when `rank` is not among the
    keys equal to that key.

    One pass writes `keys >= key` and counts, per block, the keys equal to `key`; the
    order statistic is then known. The bound keeps or drops tied elements by their order
    among the ties, so only the blocks holding ties it drops are made again, to clear
    them. Two passes at most, against the radix select's three.
    """
    n = keys.n
    key = int(sample[min(sample.size - 1, (rank * sample.size) // n)])
    mask = torch.empty(n, dtype=torch.bool)
    out = mask.numpy()
    eq = np.empty(keys.buf.numel(), dtype=bool)
    at_least = 0
    tied: list[int] = []  # per block, the keys equal to `key`
    for start, block in keys:
        k = block.numpy()
        dst = out[start : start + k.size]
        at_least += int(np.count_nonzero(np.greater_equal(k, key, out=dst)))
        tied.append(int(np.count_nonzero(np.equal(k, key, out=eq[: k.size]))))
    equal, below = sum(tied), n - at_least
    if not below <= rank < below + equal:
        return None
    bound, _ = bounds_of(_OrderStat(key, below, equal), None)
    assert bound is not None
    _clear_ties(keys, out, bound, equal, tied)
    return mask


def _bounded_mask(keys: _Keys, lower: _Bound | None, upper: _Bound | None) -> torch.Tensor:
    """Flat mask of the keys inside the bounds (see _Bound), in one streaming pass."""
    out = torch.empty(keys.n, dtype=torch.bool, device=keys.buf.device)
    bounds = [b for b in (lower, upper) if b is not None]
    if not bounds:
        return out.fill_(True)
    ops = (torch.gt, torch.ge) if lower is not None else (torch.lt, torch.le)
    if lower is not None and upper is not None:
        ops += (torch.lt, torch.le)
    # Per bound: are tied keys kept now, and how many ties are left before that flips.
    mode = [b.tied_in for b in bounds]
    left = [b.flip_after for b in bounds]
    eq = torch.empty(keys.buf.shape, dtype=torch.bool, device=out.device)
    tmp = torch.empty(keys.buf.shape, dtype=torch.bool, device=out.device)
    for lo, block in keys:
        m = block.numel()
        # Block offsets where a bound's tie mode flips, found by counting ties.
        flips = []
        for i, b in enumerate(bounds):
            if left[i] <= 0:
                continue
            tied = torch.eq(block, b.key, out=eq[:m])
            count = int(torch.count_nonzero(tied))
            if count < left[i]:
                left[i] -= count
                continue
            flips.append((int(torch.nonzero(tied)[left[i] - 1, 0]) + 1, i))
            left[i] = 0
        start = 0
        for stop, i in [*sorted(flips), (m, -1)]:
            if stop > start:
                seg, dst = block[start:stop], out[lo + start : lo + stop]
                ops[mode[0]](seg, bounds[0].key, out=dst)
                if len(bounds) == 2:
                    dst &= ops[2 + mode[1]](seg, bounds[1].key, out=tmp[: stop - start])
            if i >= 0:
                mode[i] = not mode[i]
            start = stop
    return out


def _whole(x: torch.Tensor | Difference) -> torch.Tensor:
    return x.whole() if isinstance(x, Difference) else x


def _rank_range(
    x: torch.Tensor | Difference, lo_rank: int, hi_rank: int, absolute: bool, stats: DeltaStats | None = None
) -> torch.Tensor:
    """keep_rank_range of x, or of |x| when `absolute`; `stats` (if any) is fed every element."""
    n = x.numel()
    lo_rank, hi_rank = max(lo_rank, 0), min(hi_rank, n)
    if hi_rank <= lo_rank:
        if stats is not None:
            stats.add_all(x)
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    if x.dtype not in _KEYED_DTYPES or n < _SMALL:
        values = _whole(x)
        if stats is not None:
            stats.add(0, values.reshape(-1))
        return _keep_rank_range_by_kthvalue(values.abs() if absolute else values, lo_rank, hi_rank)

    def bounds_of(low: _OrderStat | None, high: _OrderStat | None) -> tuple[_Bound | None, _Bound | None]:
        lower = upper = None
        if low is not None:
            # Of the elements tied at the key of rank lo_rank, the first lo_rank - below
            # (0 .. equal - 1) rank below lo_rank: out, the rest in.
            drop = lo_rank - low.below
            lower = _Bound(low.key, tied_in=drop == 0, flip_after=drop)
        if high is not None:
            # Of those tied at the key of rank hi_rank - 1, the first hi_rank - below
            # (1 .. equal) rank below hi_rank: in, the rest out.
            keep = hi_rank - high.below
            upper = _Bound(high.key, tied_in=True, flip_after=keep if keep < high.equal else 0)
        return lower, upper

    keys = _Keys(x, absolute, stats)
    lower_rank = lo_rank if lo_rank > 0 else None
    upper_rank = hi_rank - 1 if hi_rank < n else None
    return _rank_bounded_mask(keys, lower_rank, upper_rank, bounds_of).reshape(x.shape)


def _stable_ranks(w: torch.Tensor, boundary: torch.Tensor) -> torch.Tensor:
    """Ascending stable rank (0-based) of the elements of flat `w` equal to `boundary`.

    Elements not equal to `boundary` get -1. Rank = #(w < boundary) + position
    among the equal elements in flat-index order.
    """
    eq = w == boundary
    below = int((w < boundary).sum())
    ranks = torch.cumsum(eq, dim=0, dtype=torch.int64) - 1 + below
    return torch.where(eq, ranks, torch.full_like(ranks, -1))


def _keep_rank_range_by_kthvalue(magnitudes: torch.Tensor, lo_rank: int, hi_rank: int) -> torch.Tensor:
    """keep_rank_range for dtypes without int32 keys (e.g. float64): two kthvalue calls."""
    w = magnitudes.reshape(-1)
    lo = torch.kthvalue(w, lo_rank + 1).values
    hi = torch.kthvalue(w, hi_rank).values
    keep = (w > lo) & (w < hi)
    for boundary in (lo, hi) if lo != hi else (lo,):
        ranks = _stable_ranks(w, boundary)
        keep |= (ranks >= lo_rank) & (ranks < hi_rank)
    return keep.reshape(magnitudes.shape)


def keep_rank_range(magnitudes: torch.Tensor, lo_rank: int, hi_rank: int) -> torch.Tensor:
    """Mask of the elements whose stable ascending rank r satisfies lo_rank <= r < hi_rank.

    Values must be finite; elements tied with a boundary value are resolved by
    flat index (see the module docstring for how the boundaries are found).
    """
    return _rank_range(magnitudes, lo_rank, hi_rank, absolute=False)


def magnitude(
    delta: torch.Tensor | Difference, density: float, stats: DeltaStats | None = None
) -> torch.Tensor:
    """Keep the k = max(1, int(density * n)) largest |delta|; of the elements tied
    with the k-th largest, those with the lowest flat index. `stats` (if any) is fed
    every element of the delta, from the pass that makes the mask."""
    n = delta.numel()
    k = max(1, int(density * n))
    if k >= n:
        if stats is not None:
            stats.add_all(delta)
        return torch.ones(delta.shape, dtype=torch.bool, device=delta.device)
    if delta.dtype not in _KEYED_DTYPES or n < _SMALL:
        whole = _whole(delta)
        if stats is not None:
            stats.add(0, whole.reshape(-1))
        w = whole.abs().reshape(-1)
        threshold = torch.kthvalue(w, n - k + 1).values
        keep = w > threshold
        room = k - int(keep.sum())
        tied = w == threshold
        keep |= tied & (torch.cumsum(tied, dim=0) <= room)
        return keep.reshape(delta.shape)

    def bounds_of(stat: _OrderStat | None, _: _OrderStat | None) -> tuple[_Bound | None, None]:
        assert stat is not None
        room = k - (n - stat.below - stat.equal)  # how many of the tied elements are kept: 1 .. equal
        return _Bound(stat.key, tied_in=True, flip_after=room if room < stat.equal else 0), None

    keys = _Keys(delta, absolute=True, stats=stats)
    return _rank_bounded_mask(keys, n - k, None, bounds_of).reshape(delta.shape)


def magnitude_outliers(
    delta: torch.Tensor | Difference, density: float, gamma: float, stats: DeltaStats | None = None
) -> torch.Tensor:
    """Drop the int(gamma * n) largest |delta| and enough of the smallest to keep int(density * n);
    `stats` (if any) is fed every element of the delta."""
    n = delta.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bottom = max(0, n - target - n_top)
    return _rank_range(delta, n_bottom, n_bottom + target, absolute=True, stats=stats)


#: Uniform draws of a tensor's flat elements `part`, as a flat tensor of int64 words
#: (`rng.uniform_words`).
UniformWords = Callable[[slice], torch.Tensor]


def della(
    delta: torch.Tensor | Difference, words: UniformWords, density: float, epsilon: float
) -> torch.Tensor:
    """Keep each element with a probability that rises linearly with its |delta| rank in its row.

    Rows are taken along dimension 1 (a 1-D or 0-d tensor is one row). The smallest
    magnitude of a row is kept with probability density - epsilon, the largest
    with density + epsilon; a row of one element with probability density.
    Tied magnitudes rank by position in the row. An element is kept when its
    uniform draw (from `words`, asked for the flat elements of one slice of rows
    at a time, from several threads at once) is below its probability: when its
    word is below the probability's bound (`rng.word_bounds`), one bound per rank.
    Draws from a stream (`rng.Draws`) of a 2-D (or 1-D) tensor on the host go to the
    native kernels where they are built, which hash each element's draw themselves, so
    no words are made, gathered or put back: a row of repeated magnitudes is ranked by
    counting its distinct ones, any other sorted (`_della_rows_fused`).
    """
    shape = tuple(delta.shape) if len(delta.shape) >= 2 else (1, delta.numel())
    keep = torch.empty(shape, dtype=torch.bool, device=delta.device)
    # Rows are independent: slices of the leading dimension of about `_BLOCK` elements keep
    # the sort's int64 temporaries and the words a slice's size, a `Difference` is made a
    # slice at a time, never whole, and the slices run on the merge's threads side by side.
    row_size = math.prod(shape[1:])
    step = max(1, _BLOCK // max(1, row_size))
    size = min(step, shape[0]) * row_size
    bounds = _della_bounds(shape[1], density, epsilon, delta.device)
    # On the host the keys of float32, float16 and bfloat16 deltas sort in reused buffers.
    on_host = delta.device.type == "cpu" and delta.dtype in _KEYED_DTYPES
    scratch = parallel.Scratch(lambda: _DellaBuffers.of_size(size))
    operands = _della_operands(delta) if on_host and len(delta.shape) <= 2 else None
    fused = operands is not None and isinstance(words, rng.Draws)

    def mask_rows(start: int) -> None:
        stop = min(start + step, shape[0])
        part = slice(start * row_size, stop * row_size)
        rows_shape = (stop - start, *shape[1:])
        if fused:
            assert operands is not None and isinstance(words, rng.Draws)
            _della_rows_fused(operands, part, shape[1], words, bounds, keep[start:stop])
            return
        row_words = words(part).to(delta.device).reshape(rows_shape)
        if not on_host:
            rows = flat_part(delta, part).reshape(rows_shape)
            _della_rows(rows, row_words, bounds, keep[start:stop])
            return
        with scratch.held() as buffers:
            rows = flat_part(delta, part, buffers.values[: part.stop - part.start]).view(rows_shape)
            _della_rows_on_host(rows, row_words, bounds, keep[start:stop], buffers)

    parallel.map_parts(mask_rows, range(0, shape[0], step))
    return keep.reshape(delta.shape)


def _della_bounds(length: int, density: float, epsilon: float, device: torch.device) -> torch.Tensor:
    """The word bound of the keep probability of each ascending |delta| rank in a row of
    `length` elements: density - epsilon + 2 epsilon * rank / (length - 1), in float64
    (density for a row of one)."""
    if length > 1:
        rank_norm = torch.arange(length, dtype=torch.float64) / (length - 1)
    else:
        rank_norm = torch.full((1,), 0.5, dtype=torch.float64)
    return rng.word_bounds((density - epsilon) + rank_norm * (2 * epsilon)).to(device)


class _DellaBuffers(NamedTuple):
    """Working space for della's mask of one slice of rows on the host."""

    values: torch.Tensor  # float32: the slice's delta, then its keys
    positions: torch.Tensor  # int64: 0, 1, 2, ...
    order: torch.Tensor  # int64
    words: torch.Tensor  # int64
    kept: torch.Tensor  # bool

    @classmethod
    def of_size(cls, size: int) -> _DellaBuffers:
        values, order, words, kept = (
            torch.empty(size, dtype=dtype) for dtype in (torch.float32, torch.int64, torch.int64, torch.bool)
        )
        return cls(values, torch.arange(size), order, words, kept)


def _della_rows(rows: torch.Tensor, words: torch.Tensor, bounds: torch.Tensor, out: torch.Tensor) -> None:
    """Write della's mask of `rows` (at least 2-D, rows along dimension 1), given their draws'
    `words` and the bound of each rank, into `out` (bool, rows' shape)."""
    if rows.dtype in _KEYED_DTYPES:
        keys = rows.to(torch.float32).view(torch.int32).bitwise_and(0x7FFFFFFF).movedim(1, -1)
        order = torch.sort(keys, dim=-1, stable=True).indices
    else:
        order = torch.argsort(rows.abs().movedim(1, -1), dim=-1, stable=True)
    length = order.shape[-1]
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(length, device=rows.device).expand_as(order))
    torch.lt(words.movedim(1, -1), torch.take(bounds, ranks), out=out.movedim(1, -1))


def _della_rows_on_host(
    rows: torch.Tensor, words: torch.Tensor, bounds: torch.Tensor, out: torch.Tensor, buffers: _DellaBuffers
) -> None:
    """`_della_rows` on the host, where `rows` is `buffers.values` (overwritten) and the
    temporaries are the buffers'. The rows' elements are visited in sorted order: each
    draw's word is gathered beside its rank's bound, and the comparisons scattered back
    (numpy's take and put cost a fraction of torch's scatter of ranks and take of
    bounds by rank)."""
    n = rows.numel()
    moved = rows.movedim(1, -1).shape
    length = moved[-1]
    # The int32 keys of |delta| sort faster than the floats, in the same order.
    keys = rows.view(torch.int32).bitwise_and_(0x7FFFFFFF).movedim(1, -1)
    # Flat indices (in the moved layout) of each row's elements in ascending |delta| order.
    order = _stable_order(keys, buffers.positions, buffers.order[:n].view(moved))
    flat_index = order.numpy().reshape(-1, length)
    # The words in the moved layout, flat (a view for 2-D rows).
    flat_words = words.movedim(1, -1).contiguous().numpy().reshape(-1)
    # Every index is in range: "clip" clips nothing and, unlike "raise", writes `out` directly.
    sorted_words = buffers.words[:n].numpy().reshape(-1, length)
    np.take(flat_words, flat_index, out=sorted_words, mode="clip")
    kept = np.less(sorted_words, bounds.numpy(), out=buffers.kept[:n].numpy().reshape(-1, length))
    target = out.movedim(1, -1)
    moved_out = target if target.is_contiguous() else torch.empty(moved, dtype=torch.bool)
    # An index array's assignment: a third of np.put's time.
    moved_out.numpy().reshape(-1)[flat_index] = kept
    if moved_out is not target:
        target.copy_(moved_out)


def _della_operands(delta: torch.Tensor | Difference) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The flat (values, base) the native kernels make della's keys of (`native.della_keys`),
    or None when they do not take them."""
    values, base = (delta.expert, delta.base) if isinstance(delta, Difference) else (delta, None)
    if not native.usable(values, base):
        return None
    return values.reshape(-1), None if base is None else base.reshape(-1)


def _della_rows_fused(
    operands: tuple[torch.Tensor, torch.Tensor | None],
    part: slice,
    length: int,
    draws: rng.Draws,
    bounds: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """`_della_rows` of flat elements `part` (whole rows of `length`) by the native kernels, into
    `out` (bool, contiguous). Rows of repeated magnitudes (16-bit models' deltas) are ranked
    by counting their distinct keys (`native.della_mask`); a run of rows from one that has too
    many is sorted (`_della_rows_sorted`) and the counting tried again after it; runs with no
    row counted between them double, as a float32 delta's rows all have too many."""
    values, base = operands
    flat_out, bound_words = out.numpy().reshape(-1), bounds.numpy()
    row, run_rows = 0, _SORTED_RUN
    rows = (part.stop - part.start) // length
    while row < rows:
        start = part.start + row * length
        rest = slice(start, part.stop)
        counted = native.della_mask(
            values[rest],
            None if base is None else base[rest],
            length,
            draws.key,
            draws.first + start,
            bound_words,
            flat_out[row * length :],
        )
        row += counted
        run_rows = run_rows if counted == 0 else _SORTED_RUN
        if row < rows:
            run = slice(row * length, min(row + run_rows, rows) * length)
            _della_rows_sorted(operands, part.start, run, length, draws, bound_words, flat_out[run])
            row, run_rows = run.stop // length, 2 * run_rows


#: The rows `_della_rows_fused` sorts first from one of many distinct magnitudes.
_SORTED_RUN = 16


def _della_rows_sorted(
    operands: tuple[torch.Tensor, torch.Tensor | None],
    origin: int,
    run: slice,
    length: int,
    draws: rng.Draws,
    bounds: np.ndarray,
    out: np.ndarray,
) -> None:
    """della's mask of flat elements `run` (whole rows of `length`, from flat element `origin`
    of the operands) into `out` (bool, flat, their size) by the native kernels: the sort keys
    (as `_stable_order` makes them), numpy's sort of each row, then each element's draw hashed
    and compared with its rank's bound."""
    values, base = operands
    part = slice(origin + run.start, origin + run.stop)
    n = part.stop - part.start
    shift = max(1, (n - 1).bit_length())
    assert shift <= 32, "a 31-bit key and the index fit an int64"
    keys = np.empty(n, dtype=np.int64)
    native.della_keys(values[part], None if base is None else base[part], shift, keys)
    ordered = keys.reshape(-1, length)
    ordered.sort(axis=-1)
    native.della_keep(ordered, shift, draws.key, draws.first + part.start, bounds, out)


def _stable_order(keys: torch.Tensor, positions: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The flat indices of non-negative int32 `keys` (into a contiguous tensor of their shape),
    each row (along the last dimension) in the order a stable ascending sort gives, written
    into `out` (int64, contiguous, keys' shape); `positions` (int64) holds 0, 1, 2, ...,
    at least as many. It is a plain value sort: each key with its flat index in the low bits
    is unique and orders like (key, index) within a row, so the sorted values' low bits are
    the order. On one thread numpy's SIMD sort of those int64 values (in place) takes 5 ns
    per element against 40 for torch's stable argsort (rows of 1536)."""
    n = keys.numel()
    bits = max(1, (n - 1).bit_length())
    assert bits <= 32, "a 31-bit key and the index fit an int64"
    out.copy_(keys).bitwise_left_shift_(bits).bitwise_or_(positions[:n].view(keys.shape))
    ordered = out.numpy()
    ordered.sort(axis=-1)
    np.bitwise_and(ordered, (1 << bits) - 1, out=ordered)
    return out


def rescale_factor(
    delta: torch.Tensor | Difference, mask: torch.Tensor, stats: DeltaStats | None = None
) -> torch.Tensor | None:
    """The factor that gives the kept delta (`delta * mask`) the L1 norm `delta` had (float32,
    0-d, on the delta's device; None when either norm is below 1e-7: no rescale; NaN when
    the delta is not finite). With `stats`, the delta's magnitudes are fed to them on the way.

    The norms are summed in fixed point (`fixed_point.masked_sums`), so the factor's bits do not
    depend on the thread count, the CPU's vector width or the device, as a float sum's do.
    The delta is read `_BLOCK` elements at a time (a `Difference` is never made whole), the
    blocks on the merge's threads side by side."""
    n = delta.numel()
    size = min(n, _BLOCK)
    flat_mask = mask.reshape(-1)
    scratch = parallel.Scratch(
        lambda: (
            torch.empty(size, dtype=torch.float32, device=delta.device),
            torch.empty(size, dtype=torch.float32, device=delta.device),
            torch.empty(size, dtype=torch.int32, device=delta.device),
        )
    )

    def sums_of(start: int) -> tuple[Fraction, Fraction] | None:
        part = slice(start, min(start + _BLOCK, n))
        with scratch.held() as buffers:
            values, kept, fixed = (buffer[: part.stop - part.start] for buffer in buffers)
            magnitudes = flat_part(delta, part, values).abs_()
            if stats is not None:
                stats.add(start, magnitudes)
            return masked_sums(magnitudes, flat_mask[part], kept, fixed)

    # Every block is read, for `stats`, even after one that is not finite.
    sums = parallel.map_parts(sums_of, range(0, n, _BLOCK))
    finite = all(block is not None for block in sums)
    before = sum((block[0] for block in sums if block is not None), Fraction(0))
    after = sum((block[1] for block in sums if block is not None), Fraction(0))
    if not finite:
        # An overflowed delta: a NaN factor makes the merged tensor fail its finite check.
        return torch.tensor(math.nan, dtype=torch.float32, device=delta.device)
    if before < 1e-7 or after < 1e-7:
        return None
    return torch.tensor(float(before / after), dtype=torch.float32, device=delta.device)
