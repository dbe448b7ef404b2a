"""Spreading a tensor's independent parts over threads."""

from __future__ import annotations

import threading
import time

import pytest

from mergebuild import parallel
from tests.conftest import jobs


def test_results_come_in_the_parts_order_whatever_finishes_first() -> None:
    def slow_first(part: int) -> int:
        time.sleep(0.05 if part == 0 else 0)
        return part * part

    with jobs(3):
        assert parallel.map_parts(slow_first, range(7)) == [p * p for p in range(7)]


def test_parts_run_on_several_threads_at_once() -> None:
    # Three parts that each wait for the other two: they finish only if they run together.
    barrier = threading.Barrier(3, timeout=10)
    with jobs(3):
        names = parallel.map_parts(lambda _: (barrier.wait(), threading.current_thread().name)[1], range(3))
    assert len(set(names)) == 3


def test_one_job_runs_the_parts_in_order_on_the_calling_thread() -> None:
    seen: list[tuple[int, str]] = []
    with jobs(1):
        parallel.map_parts(lambda part: seen.append((part, threading.current_thread().name)), range(4))
    assert seen == [(part, threading.current_thread().name) for part in range(4)]


def test_a_part_that_splits_its_own_work_does_it_in_order() -> None:
    # Two parts, each splitting into two on a pool of two threads: waiting on the pool from
    # inside it would deadlock, so the inner parts run on the part's own thread.
    def outer(part: int) -> list[tuple[int, str]]:
        return parallel.map_parts(
            lambda inner: (part * 10 + inner, threading.current_thread().name), range(2)
        )

    with jobs(2):
        results = parallel.map_parts(outer, range(2))
    assert [[value for value, _ in inner] for inner in results] == [[0, 1], [10, 11]]
    assert all(inner[0][1] == inner[1][1] != threading.current_thread().name for inner in results)


def test_the_first_error_is_raised_once_every_part_has_ended() -> None:
    ended: list[int] = []

    def work(part: int) -> None:
        if part in (1, 2):
            raise ValueError(f"part {part}")
        time.sleep(0.05)
        ended.append(part)

    with jobs(2), pytest.raises(ValueError, match="part 1"):
        parallel.map_parts(work, range(5))
    assert sorted(ended) == [0, 3, 4]


def test_jobs_must_be_at_least_one() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        parallel.set_jobs(0)
