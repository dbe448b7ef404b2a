"""The catalog: what mergebuild knows about the content of source files.

Blocks are row ranges of a tensor on a grid fixed by the tensor's shape and the
spec's block size. Each block's digest is xxh3-128 over its raw bytes; a
tensor's `root` is the digest of its block digests (a Merkle root), and its
`content` digest is xxh3-128 over all its bytes (independent of the grid, so it
can key randomness). Digests are computed while a read that the merge needs
anyway streams the bytes, and kept in SQLite keyed by the file's stat
(path, size, mtime_ns, inode), so an unchanged file is never hashed twice.
"""

from __future__ import annotations

import math
import os
import sqlite3
import struct
from dataclasses import dataclass
from pathlib import Path

import xxhash

from mergebuild.safetensors_io import TensorInfo

SCHEMA_VERSION = 1
#: Block sizes count elements of two bytes (bf16), so the grid of a tensor does
#: not change with its storage dtype.
GRID_ELEMENT_BYTES = 2


@dataclass(frozen=True)
class BlockGrid:
    """Row ranges of a tensor: `rows_per_block` rows each, the last one shorter."""

    rows: int
    rows_per_block: int

    @classmethod
    def for_shape(cls, shape: tuple[int, ...], block_size: int) -> BlockGrid:
        rows = shape[0] if shape else 1
        row_elements = math.prod(shape[1:]) if len(shape) > 1 else 1
        per_block = max(1, block_size // max(1, row_elements * GRID_ELEMENT_BYTES))
        return cls(rows=rows, rows_per_block=min(per_block, max(rows, 1)))

    def ranges(self) -> list[tuple[int, int]]:
        """The (first row, end row) of every block; one empty block for an empty tensor."""
        if self.rows == 0:
            return [(0, 0)]
        return [
            (r, min(r + self.rows_per_block, self.rows)) for r in range(0, self.rows, self.rows_per_block)
        ]


@dataclass(frozen=True)
class TensorDigests:
    """Digests of one tensor's bytes on one grid."""

    content: bytes
    blocks: tuple[bytes, ...]
    rows_per_block: int

    @property
    def root(self) -> bytes:
        """The Merkle root over block digests, bound to the grid."""
        return xxhash.xxh3_128_digest(struct.pack("<q", self.rows_per_block) + b"".join(self.blocks))


class TensorHasher:
    """Computes a tensor's digests from its bytes, fed in order in any chunking."""

    def __init__(self, info: TensorInfo, grid: BlockGrid) -> None:
        self._content = xxhash.xxh3_128()
        self._block = xxhash.xxh3_128()
        row_bytes = info.row_bytes
        self._bounds = [end * row_bytes for _, end in grid.ranges()]
        self._grid = grid
        self._offset = 0
        self._blocks: list[bytes] = []

    def update(self, data: memoryview | bytes | bytearray) -> None:
        view = memoryview(data).cast("B")
        self._content.update(view)
        while view.nbytes:
            bound = self._bounds[len(self._blocks)]
            take = min(view.nbytes, bound - self._offset)
            self._block.update(view[:take])
            self._offset += take
            view = view[take:]
            if self._offset == bound and len(self._blocks) < len(self._bounds) - 1:
                self._blocks.append(self._block.digest())
                self._block = xxhash.xxh3_128()

    def digests(self) -> TensorDigests:
        blocks = (*self._blocks, self._block.digest())
        return TensorDigests(self._content.digest(), blocks, self._grid.rows_per_block)


def hash_bytes(info: TensorInfo, grid: BlockGrid, data: bytes | bytearray | memoryview) -> TensorDigests:
    """Digests of a tensor whose bytes are all in hand."""
    hasher = TensorHasher(info, grid)
    hasher.update(data)
    return hasher.digests()


@dataclass(frozen=True)
class FileStat:
    """What identifies a file's version without reading it."""

    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> FileStat:
        st = os.stat(path)
        return cls(st.st_size, st.st_mtime_ns, st.st_ino)


class Catalog:
    """SQLite store of tensor digests, keyed by file stat and grid."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        if self._db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
            self._db.executescript(
                f"""
                DROP TABLE IF EXISTS tensors;
                DROP TABLE IF EXISTS files;
                CREATE TABLE files (
                    id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL,
                    size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, inode INTEGER NOT NULL);
                CREATE TABLE tensors (
                    file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
                    name TEXT NOT NULL, rows_per_block INTEGER NOT NULL,
                    content BLOB NOT NULL, blocks BLOB NOT NULL,
                    PRIMARY KEY (file_id, name, rows_per_block));
                PRAGMA user_version = {SCHEMA_VERSION};
                """
            )
        self._db.execute("PRAGMA foreign_keys=ON")

    def close(self) -> None:
        self._db.close()

    def _file_id(self, path: Path, stat: FileStat, create: bool) -> int | None:
        row = self._db.execute(
            "SELECT id, size, mtime_ns, inode FROM files WHERE path = ?", (str(path),)
        ).fetchone()
        if row is not None and tuple(row[1:]) == (stat.size, stat.mtime_ns, stat.inode):
            return int(row[0])
        if not create:
            return None
        if row is not None:
            self._db.execute("DELETE FROM files WHERE id = ?", (row[0],))
        cur = self._db.execute(
            "INSERT INTO files (path, size, mtime_ns, inode) VALUES (?, ?, ?, ?)",
            (str(path), stat.size, stat.mtime_ns, stat.inode),
        )
        return int(cur.lastrowid or 0)

    def lookup(self, info: TensorInfo, grid: BlockGrid, stat: FileStat) -> TensorDigests | None:
        """Digests recorded for this tensor, if its file is unchanged since."""
        file_id = self._file_id(info.path, stat, create=False)
        if file_id is None:
            return None
        row = self._db.execute(
            "SELECT content, blocks FROM tensors WHERE file_id = ? AND name = ? AND rows_per_block = ?",
            (file_id, info.name, grid.rows_per_block),
        ).fetchone()
        if row is None:
            return None
        blocks = bytes(row[1])
        return TensorDigests(
            bytes(row[0]), tuple(blocks[i : i + 16] for i in range(0, len(blocks), 16)), grid.rows_per_block
        )

    def record(self, info: TensorInfo, stat: FileStat, digests: TensorDigests) -> None:
        """Remember a tensor's digests for the file version `stat`."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            file_id = self._file_id(info.path, stat, create=True)
            self._db.execute(
                "INSERT OR REPLACE INTO tensors VALUES (?, ?, ?, ?, ?)",
                (file_id, info.name, digests.rows_per_block, digests.content, b"".join(digests.blocks)),
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
