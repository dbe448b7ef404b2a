"""Per-block statistics of a task vector (delta = expert - base), which read budgets rank by.

The catalog keeps (L2 norm, max |delta|) for each block of an expert against a
base. A build gathers them from the delta its method makes anyway, which the
method streams over a chunk at a time (`DeltaStats`), and `mergebuild index`
from a whole delta (`block_stats`). Both cut the delta into the same pieces:
at every multiple of `STATS_PIECE` elements and at every block boundary. A
piece's norm and extremes do not depend on who made them or in what chunks, so
neither do a block's statistics.
"""

from __future__ import annotations

import math

import torch

from mergebuild.catalog import BlockGrid
from mergebuild.methods.sparse_delta import Difference, flat_part

#: Elements per piece (a block boundary also ends one). A method's chunks end on
#: multiples of it; 2 MiB of float32 stays in the CPU's cache while its norm and
#: extremes are taken.
STATS_PIECE = 1 << 19


class DeltaStats:
    """(L2 norm, max |delta|) of each block of a delta on `grid`, gathered from the delta's
    flat elements fed in order, in chunks that end on multiples of `STATS_PIECE` (the last
    one at the end).

    A block's L2 norm is the square root of the sum, in float64 and in order, of
    its pieces' squared float32 norms; its max |delta| is exact.
    """

    def __init__(self, grid: BlockGrid, numel: int) -> None:
        row_size = numel // grid.rows if grid.rows else 0
        #: Where each block starts, and the end of the last one.
        self._bounds = [start * row_size for start, _ in grid.ranges()] + [numel]
        self._numel = numel
        self._next = 0
        self._block = 0
        #: Per piece: its block, and a float32 (norm, min, max) on the delta's device.
        self._pieces: list[tuple[int, torch.Tensor]] = []

    def add(self, start: int, values: torch.Tensor) -> None:
        """Flat elements [start, start + len(values)) of the delta (float32, contiguous)."""
        end = start + values.numel()
        if start != self._next or (end % STATS_PIECE and end != self._numel):
            raise AssertionError(f"delta statistics fed elements [{start}, {end}) after {self._next}")
        at = start
        while at < end:
            while self._bounds[self._block + 1] <= at:
                self._block += 1
            stop = min(end, self._bounds[self._block + 1], (at // STATS_PIECE + 1) * STATS_PIECE)
            piece = values[at - start : stop - start]
            low, high = torch.aminmax(piece)
            self._pieces.append((self._block, torch.stack([torch.linalg.vector_norm(piece), low, high])))
            at = stop
        self._next = end

    def add_all(self, delta: torch.Tensor | Difference) -> None:
        """Every element of `delta` (a Difference is made a piece at a time)."""
        numel = delta.numel()
        made = isinstance(delta, Difference)
        flat = delta if made else delta.reshape(-1)
        size = min(numel, STATS_PIECE)
        buffer = torch.empty(size, dtype=torch.float32, device=delta.device) if made else None
        for start in range(0, numel, STATS_PIECE):
            part = slice(start, min(start + STATS_PIECE, numel))
            self.add(start, flat_part(flat, part, None if buffer is None else buffer[: part.stop - start]))

    def result(self) -> list[tuple[float, float]]:
        """(L2 norm, max |delta|) of every block; (0, 0) for a block with no elements."""
        if self._next != self._numel:
            raise AssertionError(f"delta statistics fed {self._next} of {self._numel} elements")
        squares = [0.0] * (len(self._bounds) - 1)
        tops = [0.0] * len(squares)
        values = torch.stack([v for _, v in self._pieces]).tolist() if self._pieces else []
        for (block, _), (norm, low, high) in zip(self._pieces, values, strict=True):
            squares[block] += norm * norm
            tops[block] = max(tops[block], -low, high)
        return [(math.sqrt(s), top) for s, top in zip(squares, tops, strict=True)]


def block_stats(delta: torch.Tensor | Difference, grid: BlockGrid) -> list[tuple[float, float]]:
    """(L2 norm, max |delta|) of each block of `delta` on `grid`, as `DeltaStats` gathers them."""
    stats = DeltaStats(grid, delta.numel())
    stats.add_all(delta)
    return stats.result()
