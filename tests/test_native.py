"""The native kernels: built once, optional, and bit for bit the numpy/torch passes they replace.

Each comparison runs one public function twice on the same inputs, with the
kernels and with `native.library` answering None (the path a machine without
a C compiler takes), and compares bit patterns.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import TypeVar
from unittest import mock

import numpy as np
import pytest
import torch

from mergebuild import native, rng
from mergebuild.catalog import BlockGrid
from mergebuild.methods import delta_stats, sparse_delta, sparsify, task_arithmetic
from mergebuild.methods.delta_stats import DeltaStats
from mergebuild.methods.fixed_point import masked_sums
from mergebuild.methods.sparse_delta import Difference, SparseDelta, difference, encode
from mergebuild.methods.task_arithmetic import _Finish, _Fold, _Kept

T = TypeVar("T")

built = pytest.mark.skipif(native.library() is None, reason="no C compiler here: the kernels are not built")


def both_paths(monkeypatch: pytest.MonkeyPatch, run: Callable[[], T]) -> tuple[T, T]:
    """`run()` with the kernels, then without them."""
    with_kernels = run()
    with monkeypatch.context() as m:
        m.setattr(native, "library", lambda: None)
        without = run()
    return with_kernels, without


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same bit patterns, except that any NaN equals any NaN: the kernels may carry another
    NaN payload or sign, which no output ever shows (inputs are finite, and a merge that
    makes a NaN fails)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    nan = a.isnan()
    if not torch.equal(nan, b.isnan()):
        return False
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a[~nan].view(bits), b[~nan].view(bits))


def with_specials(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """`x` (flat float32) with infinities, NaNs, signed zeros and subnormals sprinkled in."""
    x = x.clone()
    specials = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 1e-40, -3e-39])
    at = torch.randint(0, x.numel(), (3 * specials.numel(),), generator=g)
    x[at] = specials.repeat(3)
    return x


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@built
def test_every_16_bit_pattern_converts_exactly() -> None:
    patterns = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    zeros = torch.zeros(patterns.numel())
    for dtype in (torch.float16, torch.bfloat16):
        values = patterns.view(dtype)
        out = native.difference(values, zeros, torch.empty_like(zeros))
        assert same_bits(out, values.float() - zeros)


@built
@pytest.mark.parametrize("expert_dtype", DTYPES)
@pytest.mark.parametrize("base_dtype", DTYPES)
def test_difference_is_torchs(
    monkeypatch: pytest.MonkeyPatch, expert_dtype: torch.dtype, base_dtype: torch.dtype
) -> None:
    g = torch.Generator().manual_seed(1)
    expert = with_specials(torch.randn(5000, generator=g), g).to(expert_dtype)
    base = with_specials(torch.randn(5000, generator=g), g).to(base_dtype)
    fast, slow = both_paths(monkeypatch, lambda: difference(expert, base))
    assert same_bits(fast, slow)


def _fold(
    consensus: bool,
    normalize: bool,
    models: int,
    dtypes: tuple[torch.dtype, torch.dtype],
    rescale: bool,
    lam: float,
    shape: tuple[int, int],
    group: int,
) -> torch.Tensor:
    """A fold of `models` kept deltas (with infinities and NaNs among the experts), `group`
    models at a time, finished."""
    g = torch.Generator().manual_seed(models)
    expert_dtype, base_dtype = dtypes
    base = (torch.randn(shape, generator=g) * 0.02).to(base_dtype)
    weights = [float(w) for w in torch.randn(models, generator=g)]
    fold = _Fold(consensus, weights, track_weights=normalize)
    finish = _Finish(
        normalize,
        torch.tensor(sum(weights), dtype=torch.float32),
        None if lam == 1 else torch.tensor(lam),
        base,
    )
    kept = []
    for i in range(models):
        moved = base.float() + torch.randn(base.shape, generator=g) * 0.01
        expert = with_specials(moved.reshape(-1), g).reshape(base.shape).to(expert_dtype)
        mask = torch.rand(base.shape, generator=g) < 0.4
        factor = torch.tensor(1.0 + float(torch.rand((), generator=g))) if rescale else None
        kept.append((i, _Kept(SparseDelta(mask, expert, factor), base, fold.weights[i])))
    for start in range(0, models, group):
        fold.add(kept[start : start + group], finish if start + group >= models else None)
    return fold.result()


@built
@pytest.mark.parametrize("consensus", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("models", [1, 3, 10, 17])
@pytest.mark.parametrize(
    "dtypes",
    [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32), (torch.float32, torch.bfloat16)],
)
@pytest.mark.parametrize(
    ("shape", "chunk", "group"),
    [
        ((40, 75), 256, 1),  # many chunks, the last one partial
        ((40, 75), 256, 2),
        ((120, 250), 1 << 14, 3),  # chunks of two tiles, the last one of one and a part
    ],
)
def test_folds_are_the_torch_paths(
    monkeypatch: pytest.MonkeyPatch,
    consensus: bool,
    normalize: bool,
    models: int,
    dtypes: tuple[torch.dtype, torch.dtype],
    shape: tuple[int, int],
    chunk: int,
    group: int,
) -> None:
    # The kernels folding `group` models at a time, against torch's one at a time.
    monkeypatch.setattr(task_arithmetic, "_CLAMP_CHUNK", chunk)
    for rescale, lam in ((False, 1.0), (True, 0.6)):
        fast = _fold(consensus, normalize, models, dtypes, rescale, lam, shape, group)
        with monkeypatch.context() as m:
            m.setattr(native, "library", lambda: None)
            slow = _fold(consensus, normalize, models, dtypes, rescale, lam, shape, 1)
        assert same_bits(fast, slow)
        assert fast.isnan().any()  # the specials reached the sums


def _sparsified(dtype: torch.dtype, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    base = (torch.randn(300, 250, generator=g) * 0.02).to(dtype)
    # bf16 and fp16 deltas tie by the thousand near the threshold.
    expert = (base.float() + torch.randn(base.shape, generator=g) * (0.003 if signed else 0.001)).to(dtype)
    return base, expert


@built
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", [0.05, 0.3, 0.9])
def test_sparsifiers_are_the_numpy_paths(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, density: float
) -> None:
    monkeypatch.setattr(sparsify, "_BLOCK", 1 << 13)  # 75000 elements: ten blocks
    monkeypatch.setattr(delta_stats, "STATS_PIECE", 1 << 12)
    base, expert = _sparsified(dtype, signed=False)
    delta = Difference(expert, base)
    grid = BlockGrid.for_shape(tuple(base.shape), 4096)

    def masks() -> tuple[torch.Tensor, ...]:
        stats = DeltaStats(grid, base.numel())
        magnitude = sparsify.magnitude(delta, density, stats)
        return (
            torch.tensor(stats.result()),
            magnitude,
            sparsify.magnitude_outliers(delta, density, 0.02),
            sparsify.keep_rank_range(
                delta.whole(), int(0.2 * base.numel()), int((0.2 + density / 2) * base.numel())
            ),
            sparsify.magnitude(expert, density),  # a plain tensor's keys
        )

    fast, slow = both_paths(monkeypatch, masks)
    for a, b in zip(fast, slow, strict=True):
        assert same_bits(a, b)


@built
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("size", [1, 8, 1001, 5000])
@pytest.mark.parametrize("escapes", [0.0, 0.003, 0.1])
def test_blobs_are_the_numpy_paths(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, size: int, escapes: float
) -> None:
    monkeypatch.setattr(sparse_delta, "_ENCODE_CHUNK", 512)
    g = torch.Generator().manual_seed(size)
    base = (torch.randn(size, generator=g) * 0.02).to(dtype)
    delta = torch.randn(size, generator=g) * 5e-5
    delta[torch.rand(size, generator=g) < escapes] *= 4000  # escaped codes
    expert = (base.float() + delta).to(dtype)
    for share in (0.0, 0.3, 1.0):
        mask = torch.rand(size, generator=g) < share
        sparse = SparseDelta(mask, expert, None)
        fast, slow = both_paths(monkeypatch, lambda: b"".join(encode(sparse, base, dtype)))  # noqa: B023
        assert fast == slow


_WIDE_SCRIPT = """
import sys, torch
from mergebuild import rng, native
from mergebuild.methods import sparse_delta, sparsify
assert native.library() is not None
key, g = rng.stream_key(5, b"digest", "w"), torch.Generator().manual_seed(11)
delta = (torch.randn(64, 333, generator=g) * 1e-3).to(torch.bfloat16)
base = torch.randn(1000, 7, generator=g).to(torch.bfloat16)
# Mostly a few units in the last place, some far (escaped), some masks all set or all clear.
expert = base.view(torch.int16) + torch.randint(-40, 40, base.shape, generator=g, dtype=torch.int16)
expert[torch.rand(base.shape, generator=g) < 0.01] = 31_000
expert = expert.view(torch.bfloat16)
mask = torch.rand(base.shape, generator=g) < 0.6
mask[:20] = True
mask[20:40] = False
blob = b"".join(sparse_delta.encode(sparse_delta.SparseDelta(mask, expert, None), base, torch.bfloat16))
magnitudes = torch.rand(100_003, generator=g) * 1e-3
sums = [native.masked_sums(magnitudes[:n], mask.reshape(-1)[:n], [2.0**40]) for n in (5, 16, 7000)]
torch.save(
    [
        rng.uniform_words(key, 12_345, 50_001),
        rng.keep_mask(key, 777, 50_001, 0.3),
        sparsify.della(delta, rng.Draws(key, first=5), 0.5, 0.2),
        torch.frombuffer(bytearray(blob), dtype=torch.uint8),
        torch.tensor(sums),
    ],
    sys.argv[1],
)
"""


@built
def test_the_avx512_loops_are_the_portable_ones(tmp_path: Path) -> None:
    # Each process picks its loops once: one process with the choice left to the CPU, one
    # with MERGEBUILD_NATIVE_AVX512=0 (the same where the CPU has no AVX-512).
    results = []
    for setting in ("1", "0"):
        out = tmp_path / f"wide-{setting}.pt"
        env = {**os.environ, "MERGEBUILD_NATIVE_AVX512": setting}
        subprocess.run([sys.executable, "-c", _WIDE_SCRIPT, str(out)], env=env, check=True)
        results.append(torch.load(out))
    for wide, portable in zip(*results, strict=True):
        assert torch.equal(wide, portable)
    assert 0.25 < results[0][1].float().mean() < 0.35


@pytest.fixture
def fresh_library(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """The loader with no library loaded yet, compiling into an empty directory; the
    session's library is loaded again afterwards."""
    monkeypatch.setenv("MERGEBUILD_NATIVE_DIR", str(tmp_path))
    monkeypatch.delenv("MERGEBUILD_NATIVE", raising=False)
    native.library.cache_clear()
    yield tmp_path
    native.library.cache_clear()


def test_the_kernels_can_be_turned_off(fresh_library: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MERGEBUILD_NATIVE", "0")
    assert native.library() is None
    assert not native.usable(torch.zeros(3))
    assert list(fresh_library.iterdir()) == []


def test_without_a_compiler_there_are_no_kernels(
    fresh_library: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CC", "mergebuild-no-such-compiler")
    assert native.library() is None
    native.library.cache_clear()
    monkeypatch.setenv("CC", "false")  # a compiler that fails
    assert native.library() is None
    assert list(fresh_library.iterdir()) == []


@built
def test_the_library_is_compiled_once_and_reused(
    fresh_library: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert native.library() is not None
    (library,) = fresh_library.iterdir()
    assert library.suffix == ".so"
    native.library.cache_clear()

    def no_compiler(*args: object, **kwargs: object) -> None:
        raise AssertionError("compiled again")

    # What a later process does: it finds the library and compiles nothing.
    monkeypatch.setattr(native.subprocess, "run", no_compiler)
    assert native.library() is not None
    assert list(fresh_library.iterdir()) == [library]


@built
def test_a_library_that_does_not_load_means_no_kernels(
    fresh_library: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unloadable(path: str) -> None:
        raise OSError(f"{path}: invalid ELF header")

    # (Not a file overwritten: a library this process has loaded must not change under it.)
    monkeypatch.setattr(native.ctypes, "CDLL", unloadable)
    assert native.library() is None
    assert [p.suffix for p in fresh_library.iterdir()] == [".so"]  # compiled, then refused


def test_without_a_home_directory_there_are_no_kernels(
    fresh_library: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MERGEBUILD_NATIVE_DIR")

    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(native.Path, "home", staticmethod(no_home))
    assert native.library() is None


@built
def test_tensors_the_kernels_do_not_take() -> None:
    assert native.usable(
        torch.zeros(4), torch.zeros(4, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.bool), None
    )
    assert not native.usable(torch.zeros(4, dtype=torch.float64))
    assert not native.usable(torch.zeros(4, 4).t())


@built
@pytest.mark.parametrize("start", [0, 12345, (1 << 40) + 7])
def test_draws_are_the_numpy_paths(monkeypatch: pytest.MonkeyPatch, start: int) -> None:
    key = rng.stream_key(3, b"digest", "model.embed_tokens.weight")
    for density in (0.1, 0.5, 0.97):
        fast, slow = both_paths(monkeypatch, lambda: rng.keep_mask(key, start, 70_001, density))  # noqa: B023
        assert torch.equal(fast, slow)
    fast, slow = both_paths(monkeypatch, lambda: rng.uniform_words(key, start, 70_001))
    assert torch.equal(fast, slow)


@built
@pytest.mark.parametrize("top", [3.0e-2, 1.0e-30, 2.0e-44, 3.0e38, 1.0])
def test_fixed_point_sums_are_the_torch_paths(monkeypatch: pytest.MonkeyPatch, top: float) -> None:
    g = torch.Generator().manual_seed(4)
    # Magnitudes spread over many binades below the largest, so that low bits are cut too.
    values = torch.rand(40_000, generator=g) * torch.exp2(-40 * torch.rand(40_000, generator=g)) * top
    values[7] = top
    values[9] = 0.0
    mask = torch.rand(40_000, generator=g) < 0.4

    def sums() -> tuple[Fraction, Fraction] | None:
        return masked_sums(
            values.clone(), mask, torch.empty_like(values), torch.empty_like(values, dtype=torch.int32)
        )

    fast, slow = both_paths(monkeypatch, sums)
    assert fast == slow
    assert fast is not None and fast[0] > 0


@built
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(300, 250), (30_000,), (7, 1)])
def test_della_from_a_stream_is_della_from_its_words(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    monkeypatch.setattr(sparsify, "_BLOCK", 1 << 12)  # many slices of rows
    g = torch.Generator().manual_seed(5)
    base = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    expert = (base.float() + torch.randn(shape, generator=g) * 0.002).to(dtype)
    draws = rng.Draws(rng.stream_key(1, b"digest", "w"), first=4321)
    for delta in (Difference(expert, base), expert):
        fused = sparsify.della(delta, draws, 0.4, 0.2)
        # Any other callable gives the draws as words: gathered, compared, put back.
        assert torch.equal(fused, sparsify.della(delta, lambda part: draws(part), 0.4, 0.2))
        assert fused.numel() < 100 or 0.3 < fused.float().mean() < 0.5


def repeated_magnitudes(rows: int, length: int, distinct: int, g: torch.Generator) -> torch.Tensor:
    """A (rows, length) delta of at most `distinct` (at most 32) magnitudes per row, multiples
    of 2^-8 (a third of the elements zeros, signs random), as a 16-bit fine-tune's deltas have
    a few dozen to a few hundred."""
    levels = torch.cat([torch.zeros(1), (torch.randperm(31, generator=g)[: distinct - 1] + 1) * 2.0**-8])
    picks = torch.randint(0, levels.numel(), (rows, length), generator=g)
    picks[torch.rand(rows, length, generator=g) < 0.33] = 0
    signs = torch.where(torch.rand(rows, length, generator=g) < 0.5, -1.0, 1.0)
    return levels[picks] * signs


def coarse_base(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Base weights in {0, +-1/4, +-1/2}: plus a `repeated_magnitudes` delta, exact in every dtype,
    so that the expert minus the base is the delta."""
    return torch.tensor([-0.5, -0.25, 0.0, 0.25, 0.5])[torch.randint(0, 5, shape, generator=g)]


@built
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", [1, 2, 7, 64, 1001])
def test_della_ranks_repeated_magnitudes_by_counting_as_the_sort_does(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, length: int
) -> None:
    monkeypatch.setattr(sparsify, "_BLOCK", 1 << 12)  # many slices of rows
    g = torch.Generator().manual_seed(7)
    delta = repeated_magnitudes(40, length, min(32, max(2, length // 8)), g)
    base = coarse_base((40, length), g).to(dtype)
    expert = (base.float() + delta).to(dtype)
    assert torch.equal(expert.float() - base.float(), delta)
    draws = rng.Draws(rng.stream_key(2, b"digest", "w"), first=99)
    asked, done = [], []

    def della_mask(*args: object) -> int:
        asked.append(args[0].numel() // length)  # type: ignore[attr-defined]
        done.append(counted(*args))
        return done[-1]

    counted = native.della_mask
    sorted_rows = mock.Mock(wraps=sparsify._della_rows_sorted)
    monkeypatch.setattr(native, "della_mask", della_mask)
    monkeypatch.setattr(sparsify, "_della_rows_sorted", sorted_rows)
    for values in (Difference(expert, base), delta.to(dtype)):
        fused = sparsify.della(values, draws, 0.5, 0.3)
        assert torch.equal(fused, sparsify.della(values, lambda part: draws(part), 0.5, 0.3))
    # Every row was counted, none sorted.
    assert asked and done == asked and sorted_rows.call_count == 0


@built
@pytest.mark.parametrize("dtype", DTYPES)
def test_della_sorts_the_rows_of_many_magnitudes_between_counted_ones(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    g = torch.Generator().manual_seed(8)
    length = 256
    delta = repeated_magnitudes(200, length, 20, g)
    # Runs of rows of all-distinct magnitudes: one row, then 3, then 60 (more than a sorted run).
    for first, count in ((5, 1), (30, 3), (100, 60)):
        delta[first : first + count] = torch.randn(count, length, generator=g) * 1e-3
    values = delta.to(dtype)
    draws = rng.Draws(rng.stream_key(3, b"digest", "w"), first=7)
    sorted_rows = mock.Mock(wraps=sparsify._della_rows_sorted)
    monkeypatch.setattr(sparsify, "_della_rows_sorted", sorted_rows)
    fused = sparsify.della(values, draws, 0.4, 0.2)
    assert torch.equal(fused, sparsify.della(values, lambda part: draws(part), 0.4, 0.2))
    # Each run is sorted from its first row, in runs doubling from `_SORTED_RUN` rows; after a
    # run the counting takes the next row again.
    runs = [
        (call.args[2].start // length, call.args[2].stop // length) for call in sorted_rows.call_args_list
    ]
    assert runs == [(5, 21), (30, 46), (100, 116), (116, 148), (148, 200)]


@built
@pytest.mark.parametrize(
    "magnitudes", [(0.5, 1.0), (1.0, 2.0), (1.0, 1.0 + 2.0**-16), (1.0, 1.0 + 2.0**-23), (0.0, 1e-45)]
)
def test_della_counting_orders_magnitudes_that_differ_in_one_bit(
    monkeypatch: pytest.MonkeyPatch, magnitudes: tuple[float, float]
) -> None:
    # Keys differing in the top bit of one byte alone, in the low bit, in the exponent.
    g = torch.Generator().manual_seed(10)
    picks = torch.randint(0, 3, (30, 101), generator=g)
    delta = torch.tensor([0.0, *magnitudes])[picks] * torch.where(
        torch.rand(30, 101, generator=g) < 0.5, -1.0, 1.0
    )
    draws = rng.Draws(rng.stream_key(4, b"digest", "w"), first=0)
    sorted_rows = mock.Mock(wraps=sparsify._della_rows_sorted)
    monkeypatch.setattr(sparsify, "_della_rows_sorted", sorted_rows)
    fused = sparsify.della(delta, draws, 0.5, 0.45)
    assert torch.equal(fused, sparsify.della(delta, lambda part: draws(part), 0.5, 0.45))
    assert sorted_rows.call_count == 0


@built
def test_della_mask_stops_at_the_first_row_of_too_many_magnitudes() -> None:
    g = torch.Generator().manual_seed(9)
    length = 400
    delta = repeated_magnitudes(6, length, 30, g)
    delta[4] = torch.randn(length, generator=g)  # 400 distinct magnitudes: over a quarter of the row
    flat = delta.reshape(-1)
    bounds = sparsify._della_bounds(length, 0.5, 0.2, torch.device("cpu")).numpy()
    out = np.zeros(flat.numel(), dtype=np.bool_)
    assert native.della_mask(flat, None, length, 11, 0, bounds, out) == 4
    assert not out[4 * length :].any()
    assert native.della_mask(flat[5 * length :], None, length, 11, 5 * length, bounds, out[5 * length :]) == 1


@built
@pytest.mark.parametrize("lo, hi", [(0.1, 0.97), (0.3, 0.6), (0.0, 0.95), (0.2, 1.0)])
def test_tied_brackets_are_counted_with_the_numpy_paths_results(
    monkeypatch: pytest.MonkeyPatch, lo: float, hi: float
) -> None:
    # A delta whose ranks fall in heavy ties on both sides: exact zeros (40 %) and one
    # repeated large magnitude (5 %), as bf16 fine-tunes have.
    monkeypatch.setattr(sparsify, "_BLOCK", 1 << 13)
    g = torch.Generator().manual_seed(6)
    n = 90_001
    delta = torch.randn(n, generator=g).to(torch.bfloat16).float()
    delta[torch.rand(n, generator=g) < 0.4] = 0.0
    delta[torch.rand(n, generator=g) < 0.05] = -3.0
    selects = mock.Mock(wraps=sparsify._select)
    with mock.patch.object(sparsify, "_select", selects):
        fast = sparsify.keep_rank_range(delta.abs(), int(lo * n), int(hi * n))
    assert selects.call_count == 0
    with monkeypatch.context() as m:
        m.setattr(native, "library", lambda: None)
        assert torch.equal(fast, sparsify.keep_rank_range(delta.abs(), int(lo * n), int(hi * n)))
    assert int(fast.sum()) == int(hi * n) - int(lo * n)
