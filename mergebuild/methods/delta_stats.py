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

import bisect
import math

import torch

from mergebuild.catalog import BlockGrid
from mergebuild.methods.sparse_delta import Difference, flat_part

#: Elements per piece (a block boundary also ends one). A method's chunks end on
#: multiples of it; 2 MiB of float32 stays in the CPU's cache while its norm and
#: extremes are taken.
STATS_PIECE = 1 << 19


class DeltaStats:
    """(L2 norm, max |delta|) of each block of a delta on `grid`, gathered from chunks of the
    delta's flat elements (or of their magnitudes: the statistics are the same) that start
    and end on multiples of `STATS_PIECE` (the last one at the end), each element once, in
    any order and from any thread.

    A block's L2 norm is the square root of the sum, in float64 and in flat order, of
    its pieces' squared float32 norms; its max |delta| is exact.
    """

    def __init__(self, grid: BlockGrid, numel: int) -> None:
        row_size = numel // grid.rows if grid.rows else 0
        #: Where each block starts, and the end of the last one.
        self._bounds = [start * row_size for start, _ in grid.ranges()] + [numel]
        self._numel = numel
        #: Per piece: its elements [start, stop), its block, and a float32 (norm, min, max)
        #: on the delta's device. (Appending is atomic under the GIL.)
        self._pieces: list[tuple[int, int, int, torch.Tensor]] = []

    def add(self, start: int, values: torch.Tensor) -> None:
        """Flat elements [start, start + len(values)) of the delta (float32)."""
        end = start + values.numel()
        if start % STATS_PIECE or (end % STATS_PIECE and end != self._numel) or end > self._numel:
            raise AssertionError(f"delta statistics fed elements [{start}, {end}) of {self._numel}")
        at = start
        block = bisect.bisect_right(self._bounds, at) - 1
        while at < end:
            while self._bounds[block + 1] <= at:
                block += 1
            stop = min(end, self._bounds[block + 1], (at // STATS_PIECE + 1) * STATS_PIECE)
            piece = values[at - start : stop - start]
            low, high = torch.aminmax(piece)
            stats = torch.stack([torch.linalg.vector_norm(piece), low, high])
            self._pieces.append((at, stop, block, stats))
            at = stop

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
        pieces = sorted(self._pieces, key=lambda piece: piece[0])
        ends = [0] + [stop for _, stop, _, _ in pieces]
        if [start for start, _, _, _ in pieces] != ends[:-1] or ends[-1] != self._numel:
            raise AssertionError(f"delta statistics not fed each of the {self._numel} elements once")
        squares = [0.0] * (len(self._bounds) - 1)
        tops = [0.0] * len(squares)
        values = torch.stack([v for _, _, _, v in pieces]).tolist() if pieces else []
        for (_, _, block, _), (norm, low, high) in zip(pieces, values, strict=True):
            squares[block] += norm * norm
            tops[block] = max(tops[block], -low, high)
        return [(math.sqrt(s), top) for s, top in zip(squares, tops, strict=True)]


def block_stats(delta: torch.Tensor | Difference, grid: BlockGrid) -> list[tuple[float, float]]:
    """(L2 norm, max |delta|) of each block of `delta` on `grid`, as `DeltaStats` gathers them."""
    stats = DeltaStats(grid, delta.numel())
    stats.add_all(delta)
    return stats.result()
