"""Shared benchmark helpers: page-cache eviction, measured child runs, specs, tables.

How the figures are measured (``python bench/common.py --selftest`` re-checks
each point on the running kernel):

* Cold cache: before every measured run, ``evict`` syncs, then for every input
  file (and the tool's cache directory) opens it, ``fsync``s it and calls
  ``posix_fadvise(POSIX_FADV_DONTNEED)`` over the whole file. ``resident_bytes``
  (``mincore(2)`` through ctypes) confirms the pages are gone.
* Wall time, bytes read, bytes written and peak RSS come from
  ``bench/measure.py``, a tiny wrapper process that spawns the command and reaps
  it with ``os.wait4``: wall time around the child; ``ru_inblock * 512`` =
  bytes read from the block device (the kernel's ``read_bytes`` I/O accounting:
  page-cache hits are free, readahead counts), ``ru_oublock * 512`` = bytes
  written; ``ru_maxrss`` = peak RSS. All include the child's threads and the
  descendants it waited for. The wrapper is needed because a child's
  ``ru_maxrss`` inherits the high-water RSS of whatever process forked it (so a
  driver that imported torch would inflate it), and ``/proc/<pid>/io`` vanishes
  at exit.
* Durability: a tool may leave its output in dirty pages (mergekit does not
  fsync). After the child exits, ``run_measured`` fsyncs the output files and
  reports that time separately as ``sync_s``; tables compare ``wall_s + sync_s``
  (the I/O floor fsyncs inside its own wall time).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import math
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RUNS_ROOT = Path("/tmp/mb-bench-runs")
MEASURE = BENCH_DIR / "measure.py"
IO_FLOOR = BENCH_DIR / "io_floor.py"


class BenchError(RuntimeError):
    """A measured command failed."""


# --------------------------------------------------------------------------- files


def files_under(paths: Iterable[Path | str]) -> list[Path]:
    """Regular files at or below ``paths`` (missing paths are skipped), sorted."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.is_file() and not q.is_symlink())
    return out


def total_size(paths: Iterable[Path | str]) -> int:
    """Bytes in the regular files at or below ``paths``."""
    return sum(p.stat().st_size for p in files_under(paths))


def evict(paths: Iterable[Path | str]) -> int:
    """Drop the page cache of every file at or below ``paths``; return their bytes.

    Runs ``sync`` first so no dirty page (from an earlier run's output) is left to
    be written back during the next measurement.
    """
    os.sync()
    total = 0
    for p in files_under(paths):
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total


def warm(paths: Iterable[Path | str]) -> int:
    """Read every file at or below ``paths`` so it sits in the page cache."""
    buf = bytearray(16 << 20)
    total = 0
    for p in files_under(paths):
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def resident_bytes(path: Path | str) -> int:
    """Bytes of ``path`` currently in the page cache (``mincore``; touches nothing)."""
    size = os.path.getsize(path)
    if size == 0:
        return 0
    page = mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed")
        try:
            pages = (size + page - 1) // page
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            return sum(b & 1 for b in bytes(vec)) * page
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def remove(*paths: Path | str) -> None:
    """Delete files or directory trees if present."""
    for p in map(Path, paths):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def fsync_tree(paths: Iterable[Path | str]) -> float:
    """fsync every file at or below ``paths``; return the seconds it took."""
    start = time.perf_counter()
    for p in files_under(paths):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return time.perf_counter() - start


# --------------------------------------------------------------------- measurement


@dataclass
class Measurement:
    """What one measured run cost (numbers from ``bench/measure.py``)."""

    label: str
    rc: int
    wall_s: float
    read_bytes: int
    write_bytes: int
    maxrss_bytes: int
    user_s: float = 0.0
    sys_s: float = 0.0
    sync_s: float = 0.0
    stdout: str = field(default="", repr=False)
    stderr: str = field(default="", repr=False)

    @property
    def total_s(self) -> float:
        """Wall time until the output is durable (process wall + output fsync)."""
        return self.wall_s + self.sync_s

    def summary_json(self) -> dict[str, Any] | None:
        """The last JSON object the command printed on stdout, if any."""
        return parse_json_output(self.stdout)

    def to_json(self) -> dict[str, Any]:
        """Numbers only, for results files."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("stdout", "stderr")}


def run_measured(
    cmd: Sequence[str | Path],
    *,
    label: str,
    log_dir: Path,
    evict_paths: Iterable[Path | str] = (),
    warm_paths: Iterable[Path | str] = (),
    sync_paths: Iterable[Path | str] = (),
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> Measurement:
    """Run ``cmd`` cold and measured.

    Evicts ``evict_paths`` from the page cache (after warming ``warm_paths``, for
    inputs that should count as already cached), runs the command under
    ``bench/measure.py`` with stdout/stderr captured to ``log_dir/<label>.*``, then
    fsyncs ``sync_paths`` and records that time as ``sync_s``.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
    result = log_dir / f"{safe}.measure.json"
    out_path, err_path = log_dir / f"{safe}.stdout", log_dir / f"{safe}.stderr"
    remove(result)
    evict(evict_paths)
    if warm_paths:
        warm(warm_paths)
    full_env = {**os.environ, **(env or {})}
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.run(
            [sys.executable, "-S", str(MEASURE), str(result), "--", *map(str, cmd)],
            stdout=out,
            stderr=err,
            cwd=cwd,
            env=full_env,
            check=False,
        )
    if proc.returncode != 0 or not result.exists():
        raise BenchError(f"{label}: measurement wrapper failed (rc {proc.returncode})")
    rec = json.loads(result.read_text())
    sync_s = fsync_tree(sync_paths) if rec["rc"] == 0 else 0.0
    m = Measurement(
        label=label,
        sync_s=sync_s,
        stdout=out_path.read_text(errors="replace"),
        stderr=err_path.read_text(errors="replace"),
        **rec,
    )
    if check and m.rc != 0:
        tail = "\n".join(m.stderr.strip().splitlines()[-15:])
        raise BenchError(f"{label}: exit code {m.rc}; stderr tail:\n{tail}")
    return m


def median_measurement(runs: Sequence[Measurement]) -> Measurement:
    """Median of every number over ``runs``, except ``maxrss_bytes``: the maximum."""
    if not runs:
        raise ValueError("no runs")
    med = {
        name: statistics.median(getattr(r, name) for r in runs)
        for name in ("wall_s", "sync_s", "read_bytes", "write_bytes", "user_s", "sys_s")
    }
    return replace(
        runs[-1], rc=max(r.rc for r in runs), maxrss_bytes=max(r.maxrss_bytes for r in runs), **med
    )


def alternate(
    runners: dict[str, Callable[[int], Measurement]], repeats: int
) -> tuple[dict[str, list[Measurement]], dict[str, str]]:
    """Run every runner ``repeats`` times, interleaved and rotated.

    Repeat r runs the runners starting at index r mod n (ABC, BCA, CAB, ...), so
    no tool is always first or always after the same neighbour; slow drift of the
    machine (other load, thermal) spreads over all tools. A runner that raises
    ``BenchError`` is reported, recorded in the returned errors and dropped from
    later repeats; the others go on.
    """
    names = list(runners)
    results: dict[str, list[Measurement]] = {n: [] for n in names}
    errors: dict[str, str] = {}
    for r in range(repeats):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            if name in errors:
                continue
            try:
                results[name].append(runners[name](r))
            except BenchError as e:
                errors[name] = str(e)
                print(f"error: {e}", file=sys.stderr, flush=True)
    return results, errors


def measure_io_floor(
    inputs: Sequence[Path], out_size: int, work_dir: Path, label: str = "io_floor", direct: bool = False
) -> Measurement:
    """The I/O floor: read ``inputs`` once (with O_DIRECT when ``direct``), write and fsync
    ``out_size`` bytes (cold)."""
    out = work_dir / "io_floor.out"
    remove(out)
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        return run_measured(
            [
                sys.executable,
                IO_FLOOR,
                *(["--direct"] if direct else []),
                "--out",
                out,
                "--size",
                str(out_size),
                *inputs,
            ],
            label=label,
            log_dir=work_dir / "logs",
            evict_paths=inputs,
        )
    finally:
        remove(out)


def warm_up_tools(commands: Iterable[Sequence[str | Path]]) -> None:
    """Run each command once, unmeasured, so its libraries sit in the page cache."""
    for cmd in commands:
        subprocess.run(list(map(str, cmd)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


# ------------------------------------------------------------------------- tools


def mergekit_cmd(config: Path, out_dir: Path, seed: int = 0) -> list[str | Path]:
    """mergekit 0.1.5's ``mergekit-yaml`` on CPU (tokenizer copy off: the family has none)."""
    return [
        sys.executable,
        "-m",
        "mergekit.scripts.run_yaml",
        config,
        out_dir,
        "--random-seed",
        str(seed),
        "--no-copy-tokenizer",
        "--quiet",
    ]


def mergebuild_cmd(spec: Path, cache_dir: Path, *extra: str, sub: str = "build") -> list[str | Path]:
    """``python -m mergebuild <sub> SPEC --cache-dir DIR --json``."""
    return [sys.executable, "-m", "mergebuild", sub, spec, "--cache-dir", cache_dir, "--json", *extra]


def mergebuild_status() -> tuple[bool, str]:
    """Whether ``python -m mergebuild build --help`` works, and why not."""
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "mergebuild", "build", "--help"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False, "`python -m mergebuild build --help` timed out"
    if proc.returncode == 0:
        return True, ""
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return False, lines[-1] if lines else f"exit code {proc.returncode}"


def parse_json_output(text: str) -> dict[str, Any] | None:
    """The JSON object printed on stdout: the whole text, else the last line that parses."""
    text = text.strip()
    if not text:
        return None
    try:
        obj = json.loads(text)
        return obj if isinstance(obj, dict) else None
    except ValueError:
        pass
    start = text.rfind("\n{")
    while start != -1:
        try:
            obj = json.loads(text[start + 1 :])
            return obj if isinstance(obj, dict) else None
        except ValueError:
            start = text.rfind("\n{", 0, start)
    for line in reversed(text.splitlines()):
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def find_key(obj: Any, names: Sequence[str]) -> Any:
    """The value of the first of ``names`` found anywhere in nested ``obj`` (BFS), or None."""
    for name in names:
        queue = [obj]
        while queue:
            cur = queue.pop(0)
            if isinstance(cur, dict):
                if name in cur and cur[name] is not None:
                    return cur[name]
                queue += list(cur.values())
            elif isinstance(cur, list):
                queue += cur
    return None


#: Keys looked up in ``mergebuild build --json`` output (first found wins).
SUMMARY_READ_KEYS = ("bytes_read", "read_bytes", "input_bytes_read", "read")
SUMMARY_EXPERT_READ_KEYS = ("expert_bytes_read", "model_bytes_read", "bytes_read_experts")
SUMMARY_BOUND_KEYS = ("error_bound", "bound", "omitted_bound", "omitted_update_bound")


# ------------------------------------------------------------------------ merges

#: Method-wide parameters per method (same values for both tools).
METHOD_PARAMETERS: dict[str, dict[str, Any]] = {
    "linear": {"normalize": True},
    "task_arithmetic": {"lambda": 1.0},
    "ties": {"lambda": 1.0},
    "dare_ties": {"lambda": 1.0},
    "dare_linear": {"lambda": 1.0},
    "breadcrumbs": {"lambda": 1.0},
    "della": {"lambda": 1.0},
}
#: Per-model parameters besides ``weight``.
MODEL_PARAMETERS: dict[str, dict[str, Any]] = {
    "linear": {},
    "task_arithmetic": {},
    "ties": {"density": 0.5},
    "dare_ties": {"density": 0.5},
    "dare_linear": {"density": 0.5},
    "breadcrumbs": {"density": 0.9, "gamma": 0.01},
    "della": {"density": 0.5, "epsilon": 0.15},
}
ALL_METHODS = tuple(METHOD_PARAMETERS)
RANDOM_METHODS = frozenset({"dare_ties", "dare_linear", "della"})


def comma_list(kind: Callable[[str], Any] = str) -> Callable[[str], list[Any]]:
    """An argparse type: comma-separated items, blanks dropped, each passed through `kind`."""

    def parse(text: str) -> list[Any]:
        return [kind(item.strip()) for item in text.split(",") if item.strip()]

    return parse


def method_list(text: str) -> list[str]:
    """An argparse type: comma-separated method names, checked against ALL_METHODS."""
    methods = comma_list()(text)
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown methods {unknown}; known: {list(ALL_METHODS)}")
    return methods


def uses_base(method: str) -> bool:
    """Whether the method reads a base model (every method here except linear)."""
    return method != "linear"


def default_weight(i: int, k: int) -> float:
    """Weights that differ per expert (no symmetric ties) and sum to about 1."""
    return round((1.0 + 0.1 * (i % 5)) / max(1, k), 4)


@dataclass
class Merge:
    """One merge, tool-neutral: turned into a mergebuild spec or a mergekit config."""

    method: str
    base: Path | None
    models: list[tuple[Path, dict[str, Any]]]
    parameters: dict[str, Any]
    output: Path
    seed: int = 0
    budget: dict[str, Any] | None = None

    @classmethod
    def default(cls, method: str, base: Path, experts: Sequence[Path], output: Path, seed: int = 0) -> Merge:
        """The benchmark's standard parameters for ``method``."""
        k = len(experts)
        models = [
            (p, {"weight": default_weight(i, k), **MODEL_PARAMETERS[method]}) for i, p in enumerate(experts)
        ]
        return cls(
            method=method,
            base=base if uses_base(method) else None,
            models=models,
            parameters=dict(METHOD_PARAMETERS[method]),
            output=output,
            seed=seed,
        )

    def inputs(self) -> list[Path]:
        """Model directories this merge reads."""
        return ([self.base] if self.base else []) + [p for p, _ in self.models]

    def mergebuild_spec(self) -> dict[str, Any]:
        """The spec per DESIGN.md section 2 (plain JSON, absolute paths)."""
        spec: dict[str, Any] = {"method": self.method}
        if self.base is not None:
            spec["base"] = str(self.base)
        spec["models"] = [{"path": str(p), "parameters": dict(params)} for p, params in self.models]
        spec["parameters"] = dict(self.parameters)
        spec.update(dtype="bfloat16", seed=self.seed, output=str(self.output))
        if self.budget is not None:
            spec["budget"] = dict(self.budget)
        return spec

    def mergekit_config(self) -> dict[str, Any]:
        """The mergekit 0.1.5 YAML config (as a dict; JSON is valid YAML)."""
        if self.budget is not None and self.budget.get("fraction", 1.0) != 1.0:
            raise ValueError("mergekit has no read budget")
        cfg: dict[str, Any] = {"merge_method": self.method}
        if self.base is not None:
            cfg["base_model"] = str(self.base)
        cfg.update(dtype="float32", out_dtype="bfloat16", parameters=dict(self.parameters))
        cfg["models"] = [{"model": str(p), "parameters": dict(params)} for p, params in self.models]
        return cfg


def write_json(path: Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (also valid YAML for mergekit)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
    return path


def model_files(model_dirs: Iterable[Path]) -> list[Path]:
    """Every file of the given model directories (what a tool may read)."""
    return files_under(model_dirs)


def safetensors_bytes(model_dir: Path) -> int:
    """Bytes of a model directory's safetensors files."""
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


# ------------------------------------------------------------------ tensor compare


def iter_tensors(model_dir: Path) -> Iterator[tuple[str, Any]]:
    """Yield (name, float32 tensor) of a model directory, one tensor at a time."""
    from safetensors import safe_open

    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, st.get_tensor(name).float()


def _tensor_index(model_dir: Path) -> dict[str, Path]:
    from safetensors import safe_open

    index: dict[str, Path] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118
                index[name] = f
    return index


def relative_deviation(a_dir: Path, b_dir: Path, ref_dir: Path | None) -> float:
    """``||a - b|| / ||b - ref||`` over all tensors (``||b||`` when ``ref`` is None).

    Streams tensor by tensor (memory: a few tensors), sums in float64.
    """
    import torch
    from safetensors import safe_open

    a_index, ref_index = _tensor_index(a_dir), _tensor_index(ref_dir) if ref_dir else {}
    num = den = 0.0
    for name, b in iter_tensors(b_dir):
        with safe_open(str(a_index[name]), framework="pt") as st:
            a = st.get_tensor(name).float()
        num += float(torch.sum((a - b).double() ** 2))
        if ref_dir is not None:
            with safe_open(str(ref_index[name]), framework="pt") as st:
                r = st.get_tensor(name).float()
            den += float(torch.sum((b - r).double() ** 2))
        else:
            den += float(torch.sum(b.double() ** 2))
    return math.sqrt(num) / math.sqrt(den) if den > 0 else float("nan")


def update_norm(out_dir: Path, base_dir: Path) -> float:
    """``||out - base||`` over all tensors (float64)."""
    import torch
    from safetensors import safe_open

    base_index = _tensor_index(base_dir)
    total = 0.0
    for name, t in iter_tensors(out_dir):
        with safe_open(str(base_index[name]), framework="pt") as st:
            total += float(torch.sum((t - st.get_tensor(name).float()).double() ** 2))
    return math.sqrt(total)


# ------------------------------------------------------------------------ tables


def fmt_bytes(n: float | None) -> str:
    """Human bytes with binary units."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "n/a"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def fmt_s(s: float | None) -> str:
    """Seconds with sensible precision."""
    if s is None or math.isnan(s):
        return "n/a"
    return f"{s:.2f}" if s < 100 else f"{s:.0f}"


def fmt_ratio(x: float | None, suffix: str = "x") -> str:
    """A ratio like ``1.23x``; n/a for missing."""
    if x is None or math.isnan(x) or math.isinf(x):
        return "n/a"
    return f"{x:.3g}{suffix}"


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is 0."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table, padded to read as plain text too."""
    rows = [[str(c).replace("|", "\\|") for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def machine_line() -> str:
    """One line describing the machine (cores, RAM, kernel) for result headers."""
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    u = os.uname()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} cores, {fmt_bytes(mem)} RAM, {u.sysname} {u.release}, "
        f"load average {load} (other work on the machine skews wall times)"
    )


def add_common_args(parser: argparse.ArgumentParser, name: str) -> None:
    """Options every benchmark script shares (repeats, work dir, tool switches)."""
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=RUNS_ROOT / name,
        help=f"outputs, caches, specs and logs (default {RUNS_ROOT / name})",
    )
    parser.add_argument("--skip-mergekit", action="store_true", help="do not run mergekit")
    parser.add_argument("--skip-mergebuild", action="store_true", help="do not run mergebuild")
    parser.add_argument(
        "--mergebuild-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `mergebuild build` (repeatable), e.g. --jobs=2",
    )


def last_line(text: str) -> str:
    """The last non-empty line of an error message."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[-1] if lines else ""


def save_results(path: Path, obj: Any) -> None:
    """Write the raw results (every repeat) as JSON next to the logs."""
    write_json(path, obj)
    print(f"\nraw results: {path}")


# ----------------------------------------------------------------------- selftest


def selftest() -> int:
    """Check, on this kernel, that eviction and the counters behave as documented."""
    ok = True
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        d = Path(tmp)
        data = d / "data.bin"
        size = 128 << 20
        with open(data, "wb") as f:
            for _ in range(size // (1 << 20)):
                f.write(os.urandom(1 << 20))
        print(f"resident after write:          {fmt_bytes(resident_bytes(data))}")
        evict([data])
        res = resident_bytes(data)
        print(f"resident after evict:          {fmt_bytes(res)}")
        ok &= res < size // 100
        reader = [
            sys.executable,
            "-S",
            "-c",
            "import sys\nb=bytearray(1<<20)\nf=open(sys.argv[1],'rb',buffering=0)\nwhile f.readinto(b): pass",
            str(data),
        ]
        cold = run_measured(reader, label="cold", log_dir=d, evict_paths=[data])
        hot = run_measured(reader, label="warm", log_dir=d)
        print(
            f"cold read of {fmt_bytes(size)}: read_bytes {cold.read_bytes} "
            f"({cold.read_bytes / size:.3f} of size), wall {cold.wall_s:.3f} s"
        )
        print(f"warm read of {fmt_bytes(size)}: read_bytes {hot.read_bytes}, wall {hot.wall_s:.3f} s")
        ok &= abs(cold.read_bytes - size) <= size // 50 and hot.read_bytes < size // 100
        mm = [
            sys.executable,
            "-S",
            "-c",
            "import sys,mmap\nf=open(sys.argv[1],'rb')\n"
            "m=mmap.mmap(f.fileno(),0,access=mmap.ACCESS_READ)\n"
            "s=sum(m[i] for i in range(0,len(m),4096))",
            str(data),
        ]
        cold_mm = run_measured(mm, label="mmap", log_dir=d, evict_paths=[data])
        print(f"cold mmap touch: read_bytes {cold_mm.read_bytes} ({cold_mm.read_bytes / size:.3f} of size)")
        ok &= abs(cold_mm.read_bytes - size) <= size // 20
        part = [
            sys.executable,
            "-S",
            "-c",
            "import os,sys\nfd=os.open(sys.argv[1],os.O_RDONLY)\nos.pread(fd, 8<<20, 64<<20)",
            str(data),
        ]
        cold_part = run_measured(part, label="pread", log_dir=d, evict_paths=[data])
        print(
            f"cold pread of 8 MiB: read_bytes {fmt_bytes(cold_part.read_bytes)} (readahead may add a little)"
        )
        ok &= (8 << 20) <= cold_part.read_bytes <= (10 << 20)
        alloc = [sys.executable, "-S", "-c", "b = bytearray(300 << 20); b[::4096] = b'x' * (len(b) // 4096)"]
        rss = run_measured(alloc, label="rss", log_dir=d)
        print(f"child touching 300 MiB: peak RSS {fmt_bytes(rss.maxrss_bytes)}")
        ok &= 300 << 20 <= rss.maxrss_bytes <= 400 << 20
        ballast = bytearray(512 << 20)
        ballast[::4096] = b"x" * (len(ballast) // 4096)
        direct = subprocess.Popen(["true"])
        _, _, usage = os.wait4(direct.pid, 0)
        wrapped = run_measured(["true"], label="true", log_dir=d)
        del ballast
        print(
            f"`true` spawned directly by a 512 MiB driver: ru_maxrss "
            f"{fmt_bytes(usage.ru_maxrss * 1024)} (inherited high-water mark); via "
            f"measure.py: {fmt_bytes(wrapped.maxrss_bytes)}"
        )
        ok &= wrapped.maxrss_bytes < 64 << 20
        out = d / "written.bin"
        wr = run_measured(
            [
                sys.executable,
                "-S",
                "-c",
                "import os,sys\nf=open(sys.argv[1],'wb')\nf.write(b'x'*(64<<20))\n"
                "f.flush(); os.fsync(f.fileno())",
                str(out),
            ],
            label="write",
            log_dir=d,
        )
        print(f"write+fsync of 64 MiB: write_bytes {fmt_bytes(wr.write_bytes)}")
        ok &= wr.write_bytes >= 64 << 20
    print("selftest:", "OK" if ok else "FAILED")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    """CLI: ``--selftest`` checks the measurement method on this machine."""
    parser = argparse.ArgumentParser(
        description="Benchmark helpers; run --selftest to check "
        "page-cache eviction and the OS counters on this kernel."
    )
    parser.add_argument("--selftest", action="store_true", help="run the measurement self-test")
    args = parser.parse_args(argv)
    if args.selftest:
        return selftest()
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
