"""Block grid, digests and the catalog's stat cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

from mergebuild.catalog import BlockGrid, Catalog, FileStat, TensorHasher, hash_bytes
from mergebuild.publish import tensor_bytes
from mergebuild.safetensors_io import SafetensorsFile


def test_grid_counts_two_byte_elements() -> None:
    grid = BlockGrid.for_shape((100, 64), block_size=64 * 2 * 10)
    assert grid.rows_per_block == 10
    assert grid.ranges()[0] == (0, 10) and grid.ranges()[-1] == (90, 100)
    assert BlockGrid.for_shape((7,), 1 << 20).ranges() == [(0, 7)]
    assert BlockGrid.for_shape((), 1 << 20).ranges() == [(0, 1)]
    assert BlockGrid.for_shape((0, 3), 1 << 20).ranges() == [(0, 0)]
    # A row larger than the block size still makes one-row blocks.
    assert BlockGrid.for_shape((3, 10**6), 1024).rows_per_block == 1


@given(chunks=st.lists(st.integers(1, 500), min_size=1, max_size=20), rows=st.integers(1, 40))
def test_digests_do_not_depend_on_how_bytes_arrive(chunks: list[int], rows: int) -> None:
    t = torch.arange(rows * 9, dtype=torch.float32).reshape(rows, 9)
    info = _info(t)
    grid = BlockGrid.for_shape(info.shape, 9 * 2 * 3)
    data = tensor_bytes(t)
    whole = hash_bytes(info, grid, data)
    hasher = TensorHasher(info, grid)
    offset = 0
    for size in chunks * (len(data) // max(1, sum(chunks)) + 1):
        if offset >= len(data):
            break
        hasher.update(memoryview(data)[offset : offset + size])
        offset += size
    assert hasher.digests() == whole
    assert len(whole.blocks) == len(grid.ranges())


def test_content_digest_is_grid_independent_but_root_is_not() -> None:
    t = torch.randn(64, 8)
    info = _info(t)
    a = hash_bytes(info, BlockGrid.for_shape(info.shape, 8 * 2 * 4), tensor_bytes(t))
    b = hash_bytes(info, BlockGrid.for_shape(info.shape, 8 * 2 * 16), tensor_bytes(t))
    assert a.content == b.content
    assert a.root != b.root
    c = hash_bytes(info, BlockGrid.for_shape(info.shape, 8 * 2 * 4), tensor_bytes(t + 1))
    # Changing every row changes every block.
    assert all(x != y for x, y in zip(a.blocks, c.blocks, strict=True))


def _info(t: torch.Tensor):  # type: ignore[no-untyped-def]
    from mergebuild.safetensors_io import DTYPE_NAMES, TensorInfo

    return TensorInfo("t", Path("x"), DTYPE_NAMES[t.dtype], tuple(t.shape), 0, t.numel() * t.element_size())


def test_catalog_remembers_until_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(10, 4)}, path)
    info = SafetensorsFile.open(path).tensors["w"]
    grid = BlockGrid.for_shape(info.shape, 16)
    digests = hash_bytes(info, grid, path.read_bytes()[info.start : info.end])
    catalog = Catalog(tmp_path / "cache" / "catalog.sqlite")
    stat = FileStat.of(path)
    assert catalog.lookup(info, grid, stat) is None
    catalog.record(info, stat, digests)
    assert catalog.lookup(info, grid, stat) == digests
    # Another grid is another entry.
    assert catalog.lookup(info, BlockGrid.for_shape(info.shape, 32), stat) is None
    catalog.close()
    reopened = Catalog(tmp_path / "cache" / "catalog.sqlite")
    assert reopened.lookup(info, grid, stat) == digests
    os.utime(path, ns=(stat.mtime_ns + 10**9, stat.mtime_ns + 10**9))
    assert reopened.lookup(info, grid, FileStat.of(path)) is None


@pytest.mark.parametrize("version", [0, 99])
def test_catalog_of_another_schema_version_is_rebuilt(tmp_path: Path, version: int) -> None:
    import sqlite3

    db = tmp_path / "catalog.sqlite"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE files (x)")
    con.execute(f"PRAGMA user_version = {version}")
    con.commit()
    con.close()
    Catalog(db).close()
    tables = {r[0] for r in sqlite3.connect(db).execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"files", "tensors", "stats", "blobs", "results", "records", "published"}


def test_a_catalog_locked_while_it_opens_is_waited_for_not_moved_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SQLite answers "database is locked" at once, without its busy handler, to a connection
    # that opens a catalog while another recovers its write-ahead log.
    import sqlite3

    from mergebuild import catalog as catalog_module

    db = tmp_path / "cache" / "catalog.sqlite"
    Catalog(db).close()
    refusals = {"PRAGMA journal_mode=WAL": 2, "PRAGMA user_version": 1}

    class Busy:
        def __init__(self, connection: sqlite3.Connection) -> None:
            self.connection = connection

        def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
            if refusals.get(sql, 0):
                refusals[sql] -= 1
                raise sqlite3.OperationalError("database is locked")
            return self.connection.execute(sql, *args)

        def __getattr__(self, name: str) -> object:
            return getattr(self.connection, name)

    connect = sqlite3.connect
    monkeypatch.setattr(catalog_module.sqlite3, "connect", lambda *a, **k: Busy(connect(*a, **k)))
    reopened = Catalog(db)
    assert refusals == {"PRAGMA journal_mode=WAL": 0, "PRAGMA user_version": 0}
    assert reopened.path == db and list(db.parent.glob("*.corrupt-*")) == []
    reopened.close()
