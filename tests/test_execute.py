"""Executor settings."""

from __future__ import annotations

import pytest
import torch

from mergebuild.catalog import BlockGrid
from mergebuild.errors import InputError
from mergebuild.execute import READ_AHEAD_BYTES, block_stats, read_ahead_bytes
from mergebuild.methods.sparse_delta import Difference


def test_read_ahead_cap_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MERGEBUILD_READ_AHEAD", raising=False)
    assert read_ahead_bytes() == READ_AHEAD_BYTES
    monkeypatch.setenv("MERGEBUILD_READ_AHEAD", "64MiB")
    assert read_ahead_bytes() == 64 * 2**20
    monkeypatch.setenv("MERGEBUILD_READ_AHEAD", "lots")
    with pytest.raises(InputError, match="MERGEBUILD_READ_AHEAD: not a size"):
        read_ahead_bytes()


@pytest.mark.parametrize("shape", [(37, 21), (1000,), (), (0, 4), (5, 0)])
def test_block_statistics_of_a_difference_equal_those_of_the_whole_delta(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(shape, generator=g) * 0.02
    expert = (base + torch.randn(shape, generator=g) * 0.001).to(torch.bfloat16)
    grid = BlockGrid.for_shape(shape, 64)  # a few rows per block

    stats = block_stats(Difference(expert, base), grid)

    assert stats == block_stats(expert.float() - base, grid)
    assert len(stats) == len(grid.ranges())
    if shape == (37, 21):
        assert len(stats) > 1 and all(l2 > 0 and top > 0 for l2, top in stats)
