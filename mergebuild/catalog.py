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
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import xxhash

if TYPE_CHECKING:
    from mergebuild.safetensors_io import TensorInfo

SCHEMA_VERSION = 2
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


_T = TypeVar("_T")
#: How long a build waits for another's hold on the catalog.
_BUSY_SECONDS = 600


def _when_unlocked(statement: Callable[[], _T]) -> _T:
    """Run `statement`, again while SQLite says the database is locked, for up to `_BUSY_SECONDS`.

    A build that opens the catalog while another is recovering its write-ahead log (or
    switching it on) gets "database is locked" at once: SQLite does not call the busy
    handler there (seen when two builds started on one cache together)."""
    deadline = time.monotonic() + _BUSY_SECONDS
    while True:
        try:
            return statement()
        except sqlite3.OperationalError as e:
            if not _locked(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _locked(error: sqlite3.DatabaseError) -> bool:
    """Whether SQLite refused because another connection holds the database."""
    return isinstance(error, sqlite3.OperationalError) and "locked" in str(error)


class Catalog:
    """The cache's SQLite index.

    Tables: source files by stat (-> tensor digests and the file's lock
    digest), per-block delta statistics, content-addressed blobs (size and last
    use, for LRU eviction), results (an output tensor or a per-expert sparse
    delta, by node key, pointing into a blob), node key records (for
    `explain`), and published output files by stat (for the up-to-date check).
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, timeout=_BUSY_SECONDS, isolation_level=None, check_same_thread=False)
        self._db.execute(f"PRAGMA busy_timeout = {_BUSY_SECONDS * 1000}")
        _when_unlocked(lambda: self._db.execute("PRAGMA journal_mode=WAL"))
        self._db.execute("PRAGMA synchronous=NORMAL")
        try:
            # Not a corrupt catalog, only a busy one: a lock must not move it aside.
            version = _when_unlocked(lambda: self._db.execute("PRAGMA user_version").fetchone()[0])
            if version != SCHEMA_VERSION:
                self._create()
        except sqlite3.DatabaseError as e:
            if _locked(e):
                raise  # held for longer than a build waits: busy, not corrupt
            # A corrupt catalog is only a cache: start a fresh one beside it.
            self._db.close()
            raise CatalogCorrupt(f"{path}: {e}") from e
        self._db.execute("PRAGMA foreign_keys=ON")

    def _create(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            # Another build may have created the schema while this one waited.
            if self._db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                for table in ("tensors", "files", "stats", "blobs", "results", "records", "published"):
                    self._db.execute(f"DROP TABLE IF EXISTS {table}")
                self._db.execute(
                    "CREATE TABLE files (id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, "
                    "size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, inode INTEGER NOT NULL, digest TEXT)"
                )
                self._db.execute(
                    "CREATE TABLE tensors (file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE, "
                    "name TEXT NOT NULL, rows_per_block INTEGER NOT NULL, content BLOB NOT NULL, "
                    "blocks BLOB NOT NULL, PRIMARY KEY (file_id, name, rows_per_block))"
                )
                self._db.execute(
                    "CREATE TABLE stats (expert BLOB NOT NULL, base BLOB NOT NULL, l2 REAL NOT NULL, "
                    "max_abs REAL NOT NULL, PRIMARY KEY (expert, base))"
                )
                self._db.execute(
                    "CREATE TABLE blobs (digest TEXT PRIMARY KEY, size INTEGER NOT NULL, "
                    "last_used INTEGER NOT NULL)"
                )
                self._db.execute(
                    "CREATE TABLE results (key TEXT PRIMARY KEY, blob TEXT NOT NULL, "
                    "offset INTEGER NOT NULL, nbytes INTEGER NOT NULL, digest TEXT NOT NULL)"
                )
                self._db.execute("CREATE TABLE records (key TEXT PRIMARY KEY, record TEXT NOT NULL)")
                self._db.execute(
                    "CREATE TABLE published (path TEXT PRIMARY KEY, size INTEGER NOT NULL, "
                    "mtime_ns INTEGER NOT NULL, inode INTEGER NOT NULL, digest TEXT NOT NULL)"
                )
                self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (IMMEDIATE: concurrent builds queue here, never interleave)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException:
            # A failed COMMIT (a full disk) has already rolled back: keep its error, not ROLLBACK's.
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def query(self, sql: str, args: tuple = ()) -> list[tuple]:
        return self._db.execute(sql, args).fetchall()

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
        if row is None or len(row[0]) != 16 or len(row[1]) % 16:
            return None
        blocks = bytes(row[1])
        return TensorDigests(
            bytes(row[0]), tuple(blocks[i : i + 16] for i in range(0, len(blocks), 16)), grid.rows_per_block
        )

    def record(self, info: TensorInfo, stat: FileStat, digests: TensorDigests) -> None:
        """Remember a tensor's digests for the file version `stat`."""
        with self.transaction():
            file_id = self._file_id(info.path, stat, create=True)
            self._db.execute(
                "INSERT OR REPLACE INTO tensors VALUES (?, ?, ?, ?, ?)",
                (file_id, info.name, digests.rows_per_block, digests.content, b"".join(digests.blocks)),
            )

    def forget_file(self, path: Path) -> None:
        """Drop what the catalog knows about a file (it does not describe the file's bytes)."""
        with self.transaction():
            self._db.execute("DELETE FROM files WHERE path = ?", (str(path),))

    def file_digest(self, path: Path, stat: FileStat) -> str | None:
        """The lock digest recorded for a source file, if it is unchanged since."""
        row = self._db.execute(
            "SELECT size, mtime_ns, inode, digest FROM files WHERE path = ?", (str(path),)
        ).fetchone()
        if row is None or tuple(row[:3]) != (stat.size, stat.mtime_ns, stat.inode):
            return None
        return row[3]

    def record_file_digest(self, path: Path, stat: FileStat, digest: str) -> None:
        with self.transaction():
            file_id = self._file_id(path, stat, create=True)
            self._db.execute("UPDATE files SET digest = ? WHERE id = ?", (digest, file_id))

    def block_stats(self, expert: bytes, base: bytes) -> tuple[float, float] | None:
        """(L2 norm, max |delta|) of an expert block against a base block, if known."""
        row = self._db.execute(
            "SELECT l2, max_abs FROM stats WHERE expert = ? AND base = ?", (expert, base)
        ).fetchone()
        return None if row is None else (float(row[0]), float(row[1]))

    def record_block_stats(self, rows: list[tuple[bytes, bytes, float, float]]) -> None:
        with self.transaction():
            self._db.executemany("INSERT OR REPLACE INTO stats VALUES (?, ?, ?, ?)", rows)

    def record_key(self, key: str, record: str) -> None:
        with self.transaction():
            self._db.execute("INSERT OR REPLACE INTO records VALUES (?, ?)", (key, record))

    def key_record(self, key: str) -> str | None:
        row = self._db.execute("SELECT record FROM records WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def published(self, path: Path) -> tuple[FileStat, str] | None:
        """The stat and digest of an output file as mergebuild published it."""
        row = self._db.execute(
            "SELECT size, mtime_ns, inode, digest FROM published WHERE path = ?", (str(path),)
        ).fetchone()
        return None if row is None else (FileStat(row[0], row[1], row[2]), str(row[3]))

    def record_published(self, entries: list[tuple[Path, FileStat, str]]) -> None:
        with self.transaction():
            self._db.executemany(
                "INSERT OR REPLACE INTO published VALUES (?, ?, ?, ?, ?)",
                [(str(p), s.size, s.mtime_ns, s.inode, d) for p, s, d in entries],
            )


class CatalogCorrupt(Exception):
    """The catalog file is not a readable SQLite database."""
