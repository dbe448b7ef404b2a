"""Cheap checks on whole tensors."""

from __future__ import annotations

import torch

#: Dtypes whose plain sum() is an IEEE reduction that a NaN or Inf always reaches.
_SUM_CHECKED = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def all_finite(t: torch.Tensor) -> bool:
    """True iff no element of `t` is NaN or +-Inf; same answer as bool(torch.isfinite(t).all()).

    A sum reduction allocates nothing and reads the tensor once: a NaN or Inf
    element makes the sum NaN or Inf (IEEE addition propagates both; Inf + -Inf
    is NaN). A non-finite sum can also come from overflow of finite values (a
    float16 sum beyond 65504, say), so only then the exact elementwise check
    runs. Integer and bool tensors are always finite.
    """
    if not (t.is_floating_point() or t.is_complex()):
        return True
    if t.dtype in _SUM_CHECKED and bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())
