"""Process-wide tuning of memory for large tensors.

`use_huge_pages` (what the CLI does): torch backs large CPU tensors with 2 MiB
transparent huge pages, so a fresh temporary costs one page fault per 2 MiB on
first touch instead of one per 4 KiB. On this kind of machine that makes an
elementwise op into a fresh 200 MB tensor about 3x faster (20 ms against 60 ms),
with the same peak RSS.

`use_one_arena` (what the CLI does): every thread allocates from glibc's main
heap. By default glibc gives threads that allocate at once arenas of their own,
and memory one thread frees there is kept for that arena: the reader, folding
and blob-coding threads each kept their own high-water mark, which cost della on
a 619M x 8 family 0.16 GiB of peak RSS (2.18 -> 2.02 GiB) and no time. The
threads allocate a few large blocks per tensor, so they hardly contend for the
one lock.

`tune_allocator` (an experiment the kernel benchmark can switch on):
glibc serves every allocation above M_MMAP_THRESHOLD (at most 32 MiB by its
dynamic rule) with a fresh mmap and unmaps it on free. Merge kernels allocate
tens to hundreds of MiB per temporary, so each temporary costs a page fault per
4 KiB page on first touch: on a small machine that is often more than the
arithmetic. `tune_allocator` raises the mmap threshold so such blocks come from
the heap, and the trim threshold so freed blocks stay mapped for reuse.

Costs: freed memory is kept (up to `trim_threshold` at the top of the heap, and
any holes below it) instead of going back to the OS, and heap fragmentation can
raise peak RSS when tensor sizes vary. The setting applies to the main heap
only: threads that glibc gives their own arena still mmap blocks above 64 MiB
unless `single_arena` puts every thread on the main heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def use_huge_pages() -> None:
    """Ask torch to align large CPU allocations to 2 MiB and advise huge pages for them
    (torch reads $THP_MEM_ALLOC_ENABLE once, at its first allocation: call this before
    importing torch). A setting already in the environment is left as it is."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def _glibc() -> ctypes.CDLL | None:
    """The process's C library if it is glibc (it has gnu_get_libc_version), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    return libc


def use_one_arena() -> bool:
    """Put every thread's allocations on glibc's main heap (see the module docstring). Call it
    before other threads allocate. Returns True if glibc accepted it, False elsewhere (a
    no-op on other C libraries and platforms)."""
    libc = _glibc()
    return libc is not None and libc.mallopt(_M_ARENA_MAX, 1) == 1


def tune_allocator(
    mmap_threshold: int = 1 << 30, trim_threshold: int = (1 << 31) - 1, single_arena: bool = False
) -> bool:
    """Keep large blocks on the glibc heap for reuse (see the module docstring).

    Blocks up to `mmap_threshold` bytes come from the heap; up to
    `trim_threshold` bytes of free memory at its top stay mapped. With
    `single_arena`, all threads share the main arena (call this before other
    threads allocate). Call once, early (e.g. at CLI start); calling again is
    harmless. Returns True if glibc accepted every setting, False elsewhere (a
    no-op on other C libraries and platforms).
    """
    for value in (mmap_threshold, trim_threshold):
        if not 0 <= value < 1 << 31:
            raise ValueError(f"mallopt takes a C int, got {value}")
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
    ok &= libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
    if single_arena:
        ok &= libc.mallopt(_M_ARENA_MAX, 1) == 1
    return bool(ok)
