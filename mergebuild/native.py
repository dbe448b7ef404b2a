"""Fused host kernels in C (native.c), compiled on first use where a C compiler is found.

The merge's hot elementwise work (folding a model's kept delta into the sums,
finishing the mix, the magnitude sparsifier's bracketing pass, coding a cache
blob) is a chain of numpy and torch passes, each of which reads and writes a
chunk. These kernels do a chain in one pass: on a 2-core machine the
sparsifying methods spend most of their time there. They give the same bits
as the passes they replace (native.c says why, and the tests compare both
paths), so whether a build used them never shows in its outputs, digests or
lockfile.

The library is compiled once per source, compiler and machine type, with the
compiler named by $CC (default `cc`), into $MERGEBUILD_NATIVE_DIR (default
~/.cache/mergebuild/native), and reused by every later process. Without a
compiler, when compiling fails, or with MERGEBUILD_NATIVE=0, every caller
takes its numpy/torch path: the same results, slower.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import xxhash

_SOURCE = Path(__file__).with_name("native.c")
#: No contraction into fused multiply-adds, no fast-math: each float operation rounds once.
#: Without -fno-semantic-interposition, gcc compiles the gathering loops of a shared library
#: 6 times slower.
_FLAGS = ("-O3", "-fPIC", "-fno-semantic-interposition", "-shared", "-ffp-contract=off", "-fno-fast-math")
#: The kernels' value kinds (native.c).
_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_I64, _INT, _F32, _U32, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_uint32, ctypes.c_void_p
_U64 = ctypes.c_uint64
_SIGNATURES: dict[str, tuple[type | None, list[type]]] = {
    "mb_difference": (None, [_I64, _PTR, _INT, _PTR, _INT, _PTR]),
    "mb_fold_total_group": (None, [_I64, _INT, _PTR, _PTR, _INT, _PTR, _INT]),
    "mb_fold_signed_group": (None, [_I64, _INT, _PTR, _PTR, _INT, _PTR, _PTR, _INT, _PTR, _PTR, _INT]),
    "mb_finish_total": (None, [_I64, _PTR, _PTR, _PTR, _PTR, _INT]),
    "mb_finish_signed": (None, [_I64, _PTR, _PTR, _PTR, _PTR, _INT, _PTR, _PTR, _PTR, _PTR, _INT]),
    "mb_bracket_block": (
        None,
        [_I64, _PTR, _INT, _INT, ctypes.c_int32, _INT, ctypes.c_int32, _PTR, _INT, _PTR, _PTR, _INT]
        + [_PTR] * 7,
    ),
    "mb_encode_16": (None, [_I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR]),
    "mb_hashes_below": (None, [_U64, _U64, _I64, _U64, _PTR]),
    "mb_hash_words": (None, [_U64, _U64, _I64, _PTR]),
    "mb_masked_sums": (None, [_I64, _PTR, _PTR, _PTR, _INT, _PTR]),
    "mb_della_keys": (None, [_I64, _PTR, _INT, _PTR, _INT, _INT, _PTR]),
    "mb_della_keep": (None, [_I64, _I64, _PTR, _INT, _U64, _U64, _PTR, _PTR]),
    "mb_della_table_size": (_I64, [_I64]),
    "mb_della_mask": (_I64, [_I64, _I64, _PTR, _INT, _PTR, _INT, _U64, _U64] + [_PTR] * 10),
}
#: How many scales `masked_sums` takes.
MAX_SCALES = 4


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels (compiled now if no process did before), or None where they cannot
    be had (see the module docstring)."""
    if os.environ.get("MERGEBUILD_NATIVE", "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None
    source = _SOURCE.read_bytes()
    tag = xxhash.xxh3_64_hexdigest(source + repr((compiler, _FLAGS, platform.machine())).encode())
    directory = _library_dir()
    if directory is None:
        return None
    path = directory / f"kernels-{tag}.so"
    if not path.exists():
        try:
            directory.mkdir(parents=True, exist_ok=True)
            # Compiled under a temporary name and renamed: processes compiling at once each
            # publish a whole library, and none loads a half-written one.
            with tempfile.TemporaryDirectory(dir=directory) as work:
                built = Path(work) / path.name
                subprocess.run(
                    [compiler, *_FLAGS, "-o", str(built), str(_SOURCE)],
                    check=True,
                    capture_output=True,
                    timeout=120,
                )
                built.replace(path)
        except (OSError, subprocess.SubprocessError):
            return None
    try:
        lib = ctypes.CDLL(str(path))  # a CDLL call releases the GIL while the kernel runs
    except OSError:
        return None
    for name, (restype, argtypes) in _SIGNATURES.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    return lib


def _library_dir() -> Path | None:
    """Where compiled libraries are kept; None when there is no home directory to keep them in."""
    if os.environ.get("MERGEBUILD_NATIVE_DIR"):
        return Path(os.environ["MERGEBUILD_NATIVE_DIR"])
    try:
        return Path.home() / ".cache" / "mergebuild" / "native"
    except RuntimeError:
        return None


def usable(*tensors: torch.Tensor | None) -> bool:
    """Whether the kernels are available and take these tensors (None: an absent operand): on
    the host, contiguous, and float32, bfloat16 or float16 when floating."""
    if library() is None:
        return False
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cpu" or not t.is_contiguous():
            return False
        if t.is_floating_point() and t.dtype not in _KINDS:
            return False
    return True


def _lib() -> ctypes.CDLL:
    lib = library()
    assert lib is not None, "callers check `usable` first"
    return lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def difference(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`a - b` in float32 into `out` (all the same number of elements)."""
    _lib().mb_difference(
        out.numel(), a.data_ptr(), _KINDS[a.dtype], b.data_ptr(), _KINDS[b.dtype], out.data_ptr()
    )
    return out


class _FoldModel(ctypes.Structure):
    """One model of a fold group (native.c's FoldModel)."""

    _fields_: ClassVar = [
        ("expert", _PTR),
        ("mask", _PTR),
        ("factor", _PTR),
        ("weight", _F32),
        ("kind", _INT),
        ("bit", _U32),
    ]


#: A model of a fold group: its expert, mask, rescale factor (float32 0-d, or None), weight
#: (float32 0-d) and bit in the bit sets, each tensor the fold's elements of it.
FoldOperands = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None", torch.Tensor, int]


def _fold_models(models: Sequence[FoldOperands]) -> ctypes.Array[_FoldModel]:
    return (_FoldModel * len(models))(
        *(
            _FoldModel(
                expert.data_ptr(), mask.data_ptr(), _ptr(factor), float(weight), _KINDS[expert.dtype], bit
            )
            for expert, mask, factor, weight, bit in models
        )
    )


def fold_total(models: Sequence[FoldOperands], base: torch.Tensor, total: torch.Tensor, first: bool) -> None:
    """For each model in order: total (+)= ((expert - base) * mask [* factor]) * weight,
    elementwise (`first`: the first model sets total to that plus 0)."""
    _lib().mb_fold_total_group(
        total.numel(),
        len(models),
        _fold_models(models),
        base.data_ptr(),
        _KINDS[base.dtype],
        total.data_ptr(),
        int(first),
    )


def fold_signed(
    models: Sequence[FoldOperands],
    base: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    first: bool,
    bit_sets: tuple[torch.Tensor, torch.Tensor] | None,
) -> None:
    """For each model in order: add the positive and the negative parts of its weighted kept
    delta (as in `fold_total`) to `pos` and `neg`; with `bit_sets` (uint8 or int32), set its
    bit in the positive or the negative one where that is positive or negative."""
    pos_bits, neg_bits = bit_sets if bit_sets is not None else (None, None)
    _lib().mb_fold_signed_group(
        pos.numel(),
        len(models),
        _fold_models(models),
        base.data_ptr(),
        _KINDS[base.dtype],
        pos.data_ptr(),
        neg.data_ptr(),
        int(first),
        _ptr(pos_bits),
        _ptr(neg_bits),
        0 if pos_bits is None else pos_bits.element_size(),
    )


def finish_total(
    total: torch.Tensor, divisor: torch.Tensor | None, lam: torch.Tensor | None, base: torch.Tensor
) -> None:
    """total = total [/ divisor] [* lam] + base, elementwise, over `total`."""
    _lib().mb_finish_total(
        total.numel(), total.data_ptr(), _ptr(divisor), _ptr(lam), base.data_ptr(), _KINDS[base.dtype]
    )


def finish_signed(
    pos: torch.Tensor,
    neg: torch.Tensor,
    bit_sets: tuple[torch.Tensor, torch.Tensor] | None,
    table: torch.Tensor | None,
    divisor: torch.Tensor | None,
    lam: torch.Tensor | None,
    base: torch.Tensor,
) -> None:
    """Over `pos`: the sum of the elected sign (that of pos + neg, 0 counting as positive),
    divided by the `table` entry of that side's bit set (with `bit_sets`) or by `divisor`,
    times `lam`, plus the base."""
    pos_bits, neg_bits = bit_sets if bit_sets is not None else (None, None)
    _lib().mb_finish_signed(
        pos.numel(),
        pos.data_ptr(),
        neg.data_ptr(),
        _ptr(pos_bits),
        _ptr(neg_bits),
        0 if pos_bits is None else pos_bits.element_size(),
        _ptr(table),
        _ptr(divisor),
        _ptr(lam),
        base.data_ptr(),
        _KINDS[base.dtype],
    )


#: How many thresholds `bracket_block` counts at, and how many key ranges it gathers.
MAX_THRESHOLDS, MAX_RANGES = 4, 2


def bracket_block(
    values: np.ndarray,
    absolute: bool,
    above: int | None,
    beneath: int | None,
    mask: np.ndarray,
    thresholds: list[int],
    counted: np.ndarray,
    ranges: list[tuple[int, int]],
    at: list[np.ndarray],
    keys: list[np.ndarray],
) -> list[int]:
    """One block of the bracketing pass over float32 `values` (see native.c): `mask` (bool)
    gets key > above and key < beneath; counted[t] (int64) grows by the keys >= thresholds[t]
    (at most `MAX_THRESHOLDS`); the keys inside each range (at most `MAX_RANGES`), with their
    offsets in the block, go to keys[r] and at[r] (int32, the block's size). Returns how many
    each range holds."""
    assert len(thresholds) <= MAX_THRESHOLDS and len(ranges) <= MAX_RANGES
    limits = np.array(thresholds or [0], dtype=np.int32)
    bounds = np.array([lo for lo, _ in ranges] + [hi for _, hi in ranges] + [0], dtype=np.int32)
    found = np.zeros(MAX_RANGES, dtype=np.int64)
    pointers = [(a.ctypes.data, k.ctypes.data) for a, k in zip(at, keys, strict=True)]
    pointers += [(None, None)] * (MAX_RANGES - len(ranges))
    _lib().mb_bracket_block(
        values.size,
        values.ctypes.data,
        int(absolute),
        int(above is not None),
        0 if above is None else above,
        int(beneath is not None),
        0 if beneath is None else beneath,
        mask.ctypes.data,
        len(thresholds),
        limits.ctypes.data,
        counted.ctypes.data,
        len(ranges),
        bounds.ctypes.data,
        bounds[len(ranges) :].ctypes.data,
        *(pointer for pair in pointers for pointer in pair),
        found.ctypes.data,
    )
    return [int(f) for f in found[: len(ranges)]]


def encode_16(
    mask: np.ndarray, expert: np.ndarray, base: np.ndarray, codes: np.ndarray, escaped: np.ndarray
) -> tuple[np.ndarray, int, int]:
    """The packed `mask` (bool) and, into `codes` (int8) and `escaped` (int16, each longer than
    the kept elements), the kept elements' byte codes of their int16 bit patterns against the
    base's (see native.c); returns the packed mask, how many are kept and how many escaped."""
    packed = np.empty((mask.size + 7) // 8, dtype=np.uint8)
    counts = np.empty(2, dtype=np.int64)
    _lib().mb_encode_16(
        mask.size,
        mask.ctypes.data,
        expert.ctypes.data,
        base.ctypes.data,
        packed.ctypes.data,
        codes.ctypes.data,
        escaped.ctypes.data,
        counts.ctypes.data,
    )
    return packed, int(counts[0]), int(counts[1])


def hashes_below(key: int, start: int, bound: int, out: np.ndarray) -> None:
    """out[j] (bool) = the hash of flat index start + j of stream `key` is below `bound`
    (see `rng.keep_mask`)."""
    _lib().mb_hashes_below(key, start, out.size, bound, out.ctypes.data)


def hash_words(key: int, start: int, out: np.ndarray) -> None:
    """out[j] (uint64) = the hash of flat index start + j of stream `key`, top bit flipped
    (see `rng.uniform_words`)."""
    _lib().mb_hash_words(key, start, out.size, out.ctypes.data)


def masked_sums(values: torch.Tensor, mask: torch.Tensor, scales: list[float]) -> tuple[int, int, int, int]:
    """The integer and fraction sums of `fixed_point.masked_sums` (at most `MAX_SCALES` scales):
    whole and fraction of every value, whole and fraction of the kept ones."""
    steps = np.array(scales or [1.0], dtype=np.float32)
    sums = np.zeros(4, dtype=np.int64)
    _lib().mb_masked_sums(
        values.numel(), values.data_ptr(), mask.data_ptr(), steps.ctypes.data, len(scales), sums.ctypes.data
    )
    whole, fraction, kept_whole, kept_fraction = (int(s) for s in sums)
    return whole, fraction, kept_whole, kept_fraction


def della_keys(values: torch.Tensor, base: torch.Tensor | None, shift: int, out: np.ndarray) -> None:
    """Into `out` (int64, the values' size): the bit pattern of |values - base| (of |values|
    without a base) shifted left by `shift`, or'ed with the element's flat index."""
    _lib().mb_della_keys(
        out.size,
        values.data_ptr(),
        _KINDS[values.dtype],
        _ptr(base),
        _KINDS[base.dtype] if base is not None else 0,
        shift,
        out.ctypes.data,
    )


def della_keep(
    sorted_keys: np.ndarray, shift: int, key: int, first: int, bounds: np.ndarray, out: np.ndarray
) -> None:
    """della's mask of rows of sorted `della_keys` (2-D: rows x length) into `out` (bool, flat,
    the slice's elements): the element of rank r in its row is kept iff the word of its draw
    (index `first` + its flat index, of stream `key`) is below bounds[r] (int64)."""
    rows, length = sorted_keys.shape
    _lib().mb_della_keep(
        rows, length, sorted_keys.ctypes.data, shift, key, first, bounds.ctypes.data, out.ctypes.data
    )


def della_mask(
    values: torch.Tensor,
    base: torch.Tensor | None,
    length: int,
    key: int,
    first: int,
    bounds: np.ndarray,
    out: np.ndarray,
) -> int:
    """della's mask of whole rows of `length` elements of |values - base| (of |values| without a
    base; both flat) into `out` (bool, flat, their size), as `della_keep` makes it from the sorted
    `della_keys`, without the sort; returns how many rows (from the first) it did: it stops at a
    row of too many distinct magnitudes, whose sort is the cheaper."""
    lib = _lib()
    keys, slot, place = (np.empty(length, dtype=np.int32) for _ in range(3))
    words, distinct, spare = (np.empty(length, dtype=np.int64) for _ in range(3))
    size = lib.mb_della_table_size(length)
    table, tally = np.empty(size, dtype=np.int32), np.empty(4 * size, dtype=np.int32)
    buffers = (keys, slot, place, words, distinct, spare, table, tally)
    return lib.mb_della_mask(
        values.numel() // length,
        length,
        values.data_ptr(),
        _KINDS[values.dtype],
        _ptr(base),
        _KINDS[base.dtype] if base is not None else 0,
        key,
        first,
        bounds.ctypes.data,
        *(buffer.ctypes.data for buffer in buffers),
        out.ctypes.data,
    )
