"""The cache directory: the catalog plus content-addressed blobs, with LRU eviction.

Layout: `<cache>/catalog.sqlite` and `<cache>/blobs/ab/<xxh3-128 hex>`. A blob
is written to a temporary file and renamed, so it appears whole or not at all;
its name is the digest of its bytes. Results (an output tensor, a per-expert
sparse delta) point into blobs by node key. A result is used only after the
bytes read back hash to the digest recorded with it: a missing, truncated or
altered blob is a miss, reported and recomputed, never copied into an output.

Published output files are adopted as blobs by hard link (no second write):
the next build reads reused output tensors straight out of them.
"""

from __future__ import annotations

import fcntl
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from mergebuild.catalog import Catalog, CatalogCorrupt
from mergebuild.direct_io import SequentialFile
from mergebuild.freshness import CATALOG_NAME

BLOBS = "blobs"
#: A blob's row: its size, and now as its last use.
_TOUCH_BLOB = (
    "INSERT INTO blobs VALUES (?, ?, ?) ON CONFLICT(digest) DO UPDATE SET "
    "size = excluded.size, last_used = excluded.last_used"
)
#: A result's row: (key, blob, offset, nbytes, digest).
_PUT_RESULT = "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?)"
#: Default size cap; `MERGEBUILD_CACHE_MAX` or `gc --max-size` override it.
DEFAULT_MAX_BYTES = 50 * 2**30


@dataclass(frozen=True)
class Result:
    """Where a cached result's bytes are: a range of a blob, and their expected digest."""

    blob: str
    offset: int
    nbytes: int
    digest: str


@dataclass
class CacheEvents:
    """What the cache noticed during a build, for the summary."""

    hits: int = 0
    misses: int = 0
    bad_blobs: list[str] = field(default_factory=list)
    bytes_read: int = 0


@dataclass(frozen=True)
class GcReport:
    """What `gc` removed (or would remove)."""

    removed: int
    removed_bytes: int
    kept: int
    kept_bytes: int


#: A part of a blob's bytes (a numpy array's are `memoryview(array)`).
BlobPiece = bytes | bytearray | memoryview


class Cache:
    """The cache directory: catalog and blobs. Every other stage asks this."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blob_dir = root / BLOBS
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.events = CacheEvents()
        self.catalog = _open_catalog(root / CATALOG_NAME)

    def close(self) -> None:
        self.catalog.close()

    def _path(self, digest: str) -> Path:
        return self.blob_dir / digest[:2] / digest

    # -- blobs -----------------------------------------------------------------

    def write_blob(self, pieces: Sequence[BlobPiece]) -> tuple[str, int]:
        """Write a blob's file, the concatenation of `pieces`; return (digest, size). Its catalog
        row comes with `record_blobs`, from the thread that owns the catalog; any thread may
        call this. The pieces are hashed and written one by one, never joined: joining
        hundreds of MB into one bytes object would hold the GIL all the while."""
        hasher = xxhash.xxh3_128()
        size = 0
        for piece in pieces:
            hasher.update(piece)
            size += memoryview(piece).nbytes
        digest = hasher.hexdigest()
        path = self._path(digest)
        if not path.is_file() or path.stat().st_size != size:
            path.parent.mkdir(exist_ok=True)
            temp = path.with_name(f".{digest}.{uuid.uuid4().hex[:8]}.tmp")
            try:
                with SequentialFile(temp) as f:
                    for piece in pieces:
                        f.write(piece)
                os.replace(temp, path)
            except OSError:
                temp.unlink(missing_ok=True)
                raise
        return digest, size

    def record_blobs(self, written: list[tuple[str, str, int]]) -> None:
        """Catalog rows for blobs written by `write_blob`: (result key, digest, size) each."""
        now = time.time_ns()
        with self.catalog.transaction() as db:
            for key, digest, size in written:
                db.execute(_TOUCH_BLOB, (digest, size, now))
                db.execute(_PUT_RESULT, (key, digest, 0, size, digest))

    def adopt(self, path: Path, digest: str) -> bool:
        """Make an existing file (a published output shard) a blob under `digest`, by hard link.

        Returns False when the file cannot be linked (another filesystem): it is then simply
        not cached; copying would double the write of every build.
        """
        target = self._path(digest)
        if not target.is_file():
            target.parent.mkdir(exist_ok=True)
            temp = target.with_name(f".{digest}.{uuid.uuid4().hex[:8]}.tmp")
            try:
                os.link(path, temp)
                os.replace(temp, target)
            except OSError:
                temp.unlink(missing_ok=True)
                return False
        self._touch(digest, target.stat().st_size)
        return True

    def _touch(self, digest: str, size: int) -> None:
        with self.catalog.transaction() as db:
            db.execute(_TOUCH_BLOB, (digest, size, time.time_ns()))

    def read(self, result: Result) -> bytes | None:
        """A result's bytes, or None (a miss) if the blob is gone or does not hash as recorded."""
        path = self._path(result.blob)
        try:
            with open(path, "rb") as f:
                f.seek(result.offset)
                data = f.read(result.nbytes)
        except OSError:
            data = None
        if data is None or len(data) != result.nbytes or xxhash.xxh3_128_hexdigest(data) != result.digest:
            self.events.bad_blobs.append(result.blob)
            self.events.misses += 1
            self._forget_blob(result.blob)
            return None
        self.events.hits += 1
        self.events.bytes_read += len(data)
        self._touch(result.blob, path.stat().st_size)
        return data

    def _forget_blob(self, digest: str) -> None:
        """Drop a blob that failed its check, and every result pointing into it."""
        self._path(digest).unlink(missing_ok=True)
        with self.catalog.transaction() as db:
            db.execute("DELETE FROM results WHERE blob = ?", (digest,))
            db.execute("DELETE FROM blobs WHERE digest = ?", (digest,))

    # -- results ---------------------------------------------------------------

    def result(self, key: str) -> Result | None:
        """Where the result of node `key` is cached, if it is (its bytes are checked on read)."""
        rows = self.catalog.query("SELECT blob, offset, nbytes, digest FROM results WHERE key = ?", (key,))
        if not rows:
            return None
        blob, offset, nbytes, digest = rows[0]
        if not self._path(blob).is_file():
            return None
        return Result(blob, int(offset), int(nbytes), str(digest))

    def record_results(self, entries: list[tuple[str, Result]]) -> None:
        with self.catalog.transaction() as db:
            db.executemany(_PUT_RESULT, [(key, r.blob, r.offset, r.nbytes, r.digest) for key, r in entries])

    # -- eviction ----------------------------------------------------------------

    def size(self) -> int:
        return int(self.catalog.query("SELECT COALESCE(SUM(size), 0) FROM blobs")[0][0])

    def gc(self, max_bytes: int, dry_run: bool = False) -> GcReport:
        """Evict least-recently-used blobs until the blobs total at most `max_bytes`."""
        rows = self.catalog.query("SELECT digest, size FROM blobs ORDER BY last_used DESC, digest")
        kept = kept_bytes = 0
        doomed: list[tuple[str, int]] = []
        for digest, size in rows:
            if kept_bytes + size <= max_bytes:
                kept += 1
                kept_bytes += size
            else:
                doomed.append((digest, size))
        if not dry_run:
            for digest, _ in doomed:
                self._forget_blob(digest)
            self._remove_strays({d for d, _ in rows} - {d for d, _ in doomed})
        return GcReport(len(doomed), sum(s for _, s in doomed), kept, kept_bytes)

    def _remove_strays(self, known: set[str]) -> None:
        """Delete files under blobs/ the catalog does not list (temp files of killed builds)."""
        cutoff = time.time() - 3600
        for sub in self.blob_dir.iterdir():
            if not sub.is_dir():
                continue
            for path in sub.iterdir():
                stray = path.name not in known
                # A temp file may belong to a build running now; only old ones are debris.
                if stray and (not path.name.endswith(".tmp") or path.stat().st_mtime < cutoff):
                    path.unlink(missing_ok=True)


def _open_catalog(path: Path) -> Catalog:
    """Open the catalog; a corrupt one is moved aside (it is only a cache) and started afresh."""
    try:
        return Catalog(path)
    except CatalogCorrupt:
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(path, aside)
        for suffix in ("-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        return Catalog(path)


def max_cache_bytes() -> int:
    """The cache size cap: $MERGEBUILD_CACHE_MAX (e.g. '20GB') or the default."""
    from mergebuild.spec import env_size

    return env_size("MERGEBUILD_CACHE_MAX", DEFAULT_MAX_BYTES)


@contextmanager
def exclusive(root: Path, name: str, on_wait: Callable[[str], None] | None) -> Iterator[None]:
    """Hold an exclusive lock named `name` (a spec's path) under the cache, waiting if another
    process holds it: two builds of one spec never interleave their lockfile updates."""
    locks = root / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    fd = os.open(locks / f"{xxhash.xxh3_64_hexdigest(name.encode())}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait(f"another build of {name} is running; waiting for it to finish")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
