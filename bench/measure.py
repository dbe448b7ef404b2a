"""Run one command and report what the OS counted for it, as JSON.

Usage: ``python bench/measure.py RESULT.json -- CMD [ARGS...]``

This wrapper exists because of two facts checked on this kernel (see
``python bench/common.py --selftest``):

* ``ru_maxrss`` of a child includes the RSS high-water mark of the process it
  was forked from: ``exec`` records the pre-exec address space's peak (Linux
  ``setmax_mm_hiwater_rss`` in ``exec_mmap``), and Python's ``subprocess``
  forks/vforks from the caller. A benchmark driver that imported torch or held a
  big buffer would therefore inflate every child's peak RSS. This wrapper is a
  fresh, tiny interpreter (standard library only, ~10-15 MB), so the figure it
  reports is max(child peak, ~15 MB).
* ``/proc/<pid>/io`` disappears when the child exits, so sampling it from the
  parent misses the tail of the run. ``os.wait4`` returns the child's rusage
  at exit instead: ``ru_inblock`` is the task I/O accounting ``read_bytes`` / 512
  (bytes the child caused to be read from the block device, page-cache hits
  excluded, readahead included), summed over the child's threads and its
  waited-for descendants; ``ru_oublock`` likewise for ``write_bytes``.

The wrapper measures wall time around the child only (its own start-up is
excluded) and forwards the child's stdout/stderr untouched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def main(argv: list[str]) -> int:
    """Run ``argv[2:]`` (after ``--``), write the measurement to ``argv[0]``."""
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if len(argv) < 3 or argv[1] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    result_path, cmd = argv[0], argv[2:]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    record = {
        "rc": proc.returncode,
        "wall_s": wall,
        "read_bytes": usage.ru_inblock * 512,
        "write_bytes": usage.ru_oublock * 512,
        "maxrss_bytes": usage.ru_maxrss * 1024,
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
    }
    tmp = result_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, result_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
