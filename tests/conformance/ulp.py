"""Exact float comparison helpers: ulp distances and the elements a top-k tie may flip.

`ulp_diff` counts representable values between two numbers of a float dtype by
mapping bit patterns to a monotonic integer line, so it is exact (no epsilon
arithmetic) and treats +0 and -0 as equal.

`ambiguous_rank_range` finds the elements whose membership in a rank-selected
set depends on how equal values are ordered: mergekit selects by an unstable
sort, mergebuild by lowest flat index (DESIGN.md section 5), so only these
elements may legitimately differ between the two.
"""

from __future__ import annotations

import torch

_INT_VIEW = {
    torch.float32: torch.int32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.float64: torch.int64,
}


def _ordered(x: torch.Tensor) -> torch.Tensor:
    """Map a float tensor's bit patterns to int64 keys that are monotonic in its value.

    Floats are sign-magnitude: a non-negative pattern read as a signed integer already
    orders like its value; a negative one is mirrored as -(magnitude bits), so -0 and +0
    both map to 0 and adjacent representable values map to adjacent integers.
    """
    bits = x.view(_INT_VIEW[x.dtype]).to(torch.int64)
    width = x.element_size() * 8
    magnitude = bits & ((1 << (width - 1)) - 1)
    return torch.where(bits < 0, -magnitude, magnitude)


def ulp_diff(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Element-wise number of units in the last place of `dtype` between a and b (int64).

    Both tensors are first cast to `dtype` (a no-op when they already are). Two NaNs
    count as equal; a NaN against a number counts as the largest int64, so it never
    passes a tolerance.
    """
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    a, b = a.to(dtype).contiguous(), b.to(dtype).contiguous()
    diff = (_ordered(a) - _ordered(b)).abs()
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    diff = torch.where(nan_a & nan_b, torch.zeros_like(diff), diff)
    return torch.where(nan_a ^ nan_b, torch.full_like(diff, torch.iinfo(torch.int64).max), diff)


def ambiguous_rank_range(values: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Mask of elements whose selection is decided by tie-breaking.

    The selection keeps the elements of ascending ranks lo <= r < hi of `values`
    (any shape, ranked flat). An element is ambiguous when its value equals the value
    at a boundary rank and that value also occurs on the other side of the boundary,
    so different tie orders keep different elements. Returns a bool mask of
    `values`' shape.
    """
    flat = values.reshape(-1)
    n = flat.numel()
    mask = torch.zeros(n, dtype=torch.bool)
    lo, hi = max(0, lo), min(n, hi)
    if hi <= lo:
        return mask.reshape(values.shape)
    ordered = torch.sort(flat).values
    # Lower boundary: ranks lo-1 (dropped) and lo (kept) hold the same value.
    if lo > 0 and ordered[lo - 1] == ordered[lo]:
        mask |= flat == ordered[lo]
    # Upper boundary: ranks hi-1 (kept) and hi (dropped) hold the same value.
    if hi < n and ordered[hi - 1] == ordered[hi]:
        mask |= flat == ordered[hi - 1]
    return mask.reshape(values.shape)


def ambiguous_topk(values: torch.Tensor, k: int) -> torch.Tensor:
    """Ambiguous elements of 'keep the k largest values' (see `ambiguous_rank_range`)."""
    n = values.numel()
    return ambiguous_rank_range(values, n - k, n)
