"""Block statistics of a delta: the same from any chunking, and what their definition says."""

from __future__ import annotations

import math

import pytest
import torch

from mergebuild.catalog import BlockGrid
from mergebuild.methods import delta_stats
from mergebuild.methods.delta_stats import DeltaStats, block_stats
from mergebuild.methods.sparse_delta import Difference


def _delta(shape: tuple[int, ...], seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g) * 0.02
    expert = (base + torch.randn(shape, generator=g) * 0.001).to(torch.bfloat16)
    return expert, base


@pytest.mark.parametrize("shape", [(37, 21), (1000,), (), (0, 4), (5, 0)])
def test_block_statistics_of_a_difference_equal_those_of_the_whole_delta(shape: tuple[int, ...]) -> None:
    expert, base = _delta(shape)
    grid = BlockGrid.for_shape(shape, 64)  # a few rows per block

    stats = block_stats(Difference(expert, base), grid)

    assert stats == block_stats(expert.float() - base, grid)
    assert len(stats) == len(grid.ranges())
    if shape == (37, 21):
        assert len(stats) > 1 and all(l2 > 0 and top > 0 for l2, top in stats)


@pytest.mark.parametrize("piece", [16, 100, 1 << 19])
def test_block_statistics_are_each_blocks_norm_and_largest_magnitude(
    monkeypatch: pytest.MonkeyPatch, piece: int
) -> None:
    monkeypatch.setattr(delta_stats, "STATS_PIECE", piece)
    expert, base = _delta((53, 30))
    delta = expert.float() - base
    grid = BlockGrid.for_shape(delta.shape, 400)  # 6 rows (180 elements) a block

    stats = block_stats(delta, grid)

    rows = delta.reshape(53, -1)
    for (l2, top), (start, end) in zip(stats, grid.ranges(), strict=True):
        block = rows[start:end]
        assert l2 == pytest.approx(float(torch.linalg.vector_norm(block.double())), rel=1e-6)
        assert top == float(block.abs().max())
    if piece >= delta.numel():  # one piece a block: the block's float32 norm itself
        assert [l2 for l2, _ in stats] == [
            float(torch.linalg.vector_norm(rows[a:b])) for a, b in grid.ranges()
        ]


@pytest.mark.parametrize("chunk_pieces", [1, 2, 5])
def test_statistics_fed_in_chunks_equal_those_of_the_whole_delta(
    monkeypatch: pytest.MonkeyPatch, chunk_pieces: int
) -> None:
    monkeypatch.setattr(delta_stats, "STATS_PIECE", 64)
    expert, base = _delta((41, 33))
    delta = (expert.float() - base).reshape(-1)
    grid = BlockGrid.for_shape((41, 33), 500)  # blocks end inside pieces
    stats = DeltaStats(grid, delta.numel())
    step = 64 * chunk_pieces
    for start in range(0, delta.numel(), step):
        stats.add(start, delta[start : start + step].clone())  # a scratch copy, as a fold's

    assert stats.result() == block_stats(delta.reshape(41, 33), grid)


def test_chunks_may_come_in_any_order_but_must_cover_each_piece_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(delta_stats, "STATS_PIECE", 64)
    delta = torch.ones(300)
    stats = DeltaStats(BlockGrid.for_shape((300,), 1 << 20), 300)
    with pytest.raises(AssertionError):
        stats.add(0, delta[:100])  # would split a piece between two chunks
    stats.add(192, delta[192:])
    stats.add(0, delta[:128])
    with pytest.raises(AssertionError):
        stats.result()  # elements 128 to 191 are missing
    stats.add(128, delta[128:192])
    [(l2, top)] = stats.result()
    assert l2 == pytest.approx(math.sqrt(300), rel=1e-7) and top == 1.0
    stats.add(64, delta[64:128])
    with pytest.raises(AssertionError):
        stats.result()  # a piece twice
