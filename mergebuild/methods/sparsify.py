"""Sparsifiers for task-vector deltas (DESIGN.md section 5, step 2).

Each returns a boolean keep-mask of the delta's shape. Ties at a selection
threshold are broken by flat index, so the mask is a pure function of the
values, unlike an unstable sort: magnitude keeps the lowest indices among
elements tied with the k-th largest; breadcrumbs ranks tied elements in
ascending order by index (at the top boundary the lowest indices are kept, at
the bottom boundary the lowest indices are dropped).
"""

from __future__ import annotations

import torch


def _stable_ranks(w: torch.Tensor, boundary: torch.Tensor) -> torch.Tensor:
    """Ascending stable rank (0-based) of the elements of flat `w` equal to `boundary`.

    Elements not equal to `boundary` get -1. Rank = #(w < boundary) + position
    among the equal elements in flat-index order.
    """
    eq = w == boundary
    below = int((w < boundary).sum())
    ranks = torch.cumsum(eq, dim=0, dtype=torch.int64) - 1 + below
    return torch.where(eq, ranks, torch.full_like(ranks, -1))


def keep_rank_range(magnitudes: torch.Tensor, lo_rank: int, hi_rank: int) -> torch.Tensor:
    """Mask of the elements whose stable ascending rank r satisfies lo_rank <= r < hi_rank.

    Uses two order statistics (kthvalue) instead of a full sort; elements tied
    with a boundary value are resolved by flat index.
    """
    w = magnitudes.reshape(-1)
    n = w.numel()
    if hi_rank <= lo_rank or n == 0:
        return torch.zeros(magnitudes.shape, dtype=torch.bool)
    lo = torch.kthvalue(w, lo_rank + 1).values
    hi = torch.kthvalue(w, hi_rank).values
    keep = (w > lo) & (w < hi)
    for boundary in (lo, hi) if lo != hi else (lo,):
        ranks = _stable_ranks(w, boundary)
        keep |= (ranks >= lo_rank) & (ranks < hi_rank)
    return keep.reshape(magnitudes.shape)


def magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = max(1, int(density * n)) largest |delta|; of the elements tied
    with the k-th largest, those with the lowest flat index."""
    w = delta.abs().reshape(-1)
    n = w.numel()
    k = max(1, int(density * n))
    threshold = torch.kthvalue(w, n - k + 1).values
    keep = w > threshold
    room = k - int(keep.sum())
    tied = w == threshold
    keep |= tied & (torch.cumsum(tied, dim=0) <= room)
    return keep.reshape(delta.shape)


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Drop the int(gamma * n) largest |delta| and enough of the smallest to keep int(density * n)."""
    n = delta.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bottom = max(0, n - target - n_top)
    return keep_rank_range(delta.abs(), n_bottom, n_bottom + target)


def random(uniforms: torch.Tensor, density: float) -> torch.Tensor:
    """Keep each element with probability `density` (DARE)."""
    return uniforms < density


def della(delta: torch.Tensor, uniforms: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Keep each element with a probability that rises linearly with its |delta| rank in its row.

    Rows are taken along dimension 1 (a 1-D or 0-d tensor is one row). The smallest
    magnitude of a row is kept with probability density - epsilon, the largest
    with density + epsilon; a row of one element with probability density.
    """
    mags = delta.abs() if delta.dim() >= 2 else delta.abs().reshape(1, -1)
    mags = mags.movedim(1, -1)
    length = mags.shape[-1]
    order = torch.argsort(mags, dim=-1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(length).expand_as(order))
    if length > 1:
        rank_norm = ranks.to(torch.float64) / (length - 1)
    else:
        rank_norm = torch.full(ranks.shape, 0.5, dtype=torch.float64)
    probs = (density - epsilon) + rank_norm * (2 * epsilon)
    probs = probs.movedim(-1, 1)
    return uniforms < probs.reshape(delta.shape)


def rescale_l1(delta: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Scale `kept` (the masked delta) so its L1 norm equals the delta's; skip tiny norms."""
    before = delta.abs().sum()
    after = kept.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return kept
    return kept * (before / after)
