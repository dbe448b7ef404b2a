"""The threads a method spreads one tensor's independent parts over.

della's mask, the L1 rescale's sums and the random masks walk a delta in parts
(slices of rows, blocks) that do not depend on one another. numpy's sorts and
ufuncs and torch's ops release the GIL, so the parts of one tensor run side by
side on threads: the thread that merges would otherwise be the build's critical
path while the other cores wait (della's masks took 127 s of CPU time on it in a
630M x 8 build of 176 s). Results are gathered by part, never by which thread
finished first, so they do not depend on the thread count.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Generic, TypeVar

import torch

_Part = TypeVar("_Part")
_Result = TypeVar("_Result")
_Buffers = TypeVar("_Buffers")

_threads = max(1, len(os.sched_getaffinity(0)))
#: Set on the pool's threads: a part that splits its own work does it in order there
#: (waiting on the pool from inside it could leave no thread to run what it waits for).
_inside = threading.local()


def set_jobs(count: int) -> None:
    """Use `count` threads for CPU arithmetic: a tensor's parts are spread over `count` threads
    (1: the calling thread does them in order), and torch's ops use half as many each, since
    two threads run them at once (the method's and the fold's)."""
    global _threads
    if count < 1:
        raise ValueError(f"thread count must be at least 1, got {count}")
    _threads = count
    torch.set_num_threads(max(1, count // 2))


def jobs() -> int:
    """The threads for CPU arithmetic (`set_jobs`; default: the cores this process may use)."""
    return _threads


def _mark_inside() -> None:
    _inside.active = True


@functools.cache
def _pool(count: int) -> ThreadPoolExecutor:
    # One pool per count for the process: threads made per tensor would each give glibc a
    # new arena to keep freed memory in.
    return ThreadPoolExecutor(count, thread_name_prefix="mergebuild-part", initializer=_mark_inside)


def map_parts(work: Callable[[_Part], _Result], parts: Sequence[_Part]) -> list[_Result]:
    """`[work(part) for part in parts]`, the parts run on up to the `set_jobs` count of threads at once.

    `work` must be safe to run concurrently with itself on different parts. The first
    exception (in the parts' order) is raised once every part has ended, so no part is still
    writing into shared output when the caller sees it.
    """
    count = min(_threads, len(parts))
    if count <= 1 or getattr(_inside, "active", False):
        return [work(part) for part in parts]
    futures = [_pool(_threads).submit(work, part) for part in parts]
    errors = [future.exception() for future in futures]  # waits for every part
    for error in errors:
        if error is not None:
            raise error
    return [future.result() for future in futures]


class Scratch(Generic[_Buffers]):
    """Buffers that the parts of one tensor reuse: a running part holds one set, made when no
    set is free, so there are as many sets as parts ever ran at once. A fresh temporary per
    part would fault its pages in again, and frees and allocations interleaved from several
    threads fragment the heap: della's 630M x 8 build peaked at 2.1 to 2.2 GB of RSS with
    fresh temporaries, at 1.9 GB with reused ones."""

    def __init__(self, make: Callable[[], _Buffers]) -> None:
        self._make = make
        self._free: list[_Buffers] = []  # list.append and list.pop are atomic

    @contextmanager
    def held(self) -> Iterator[_Buffers]:
        """A set of buffers for the caller alone until the block ends."""
        try:
            buffers = self._free.pop()
        except IndexError:
            buffers = self._make()
        try:
            yield buffers
        finally:
            self._free.append(buffers)
