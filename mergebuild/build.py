"""The build: spec -> graph -> execute -> publish -> lockfile, for every target.

The CLI calls `build`, `verify` and `plan` and renders what they return.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergebuild import freshness, lockfile, parallel
from mergebuild import spec as spec_module
from mergebuild.cache import Cache, Result, exclusive
from mergebuild.catalog import FileStat
from mergebuild.errors import ExecutionError, InputError, LockMismatch, SpecError
from mergebuild.execute import ExecutionReport, SourceReader, compute_device, execute, index_target
from mergebuild.graph import CompiledTarget, compile_target
from mergebuild.plan import TargetPlan, plan_target
from mergebuild.publish import (
    OutputFile,
    OutputWriter,
    check_output_path,
    copy_side_files,
    discard,
    publish,
    staging_dir,
    write_behind_bytes,
)
from mergebuild.sources import CONVERTED_DIR, ModelSource
from mergebuild.spec import JsonnetArgs, Spec
from mergebuild.summary import BuildSummary, TargetSummary


@dataclass(frozen=True)
class BuildOptions:
    cache_dir: Path
    target: str | None = None
    locked: bool = False
    dry_run: bool = False
    force: bool = False
    jsonnet: JsonnetArgs = field(default_factory=JsonnetArgs)
    #: Load pickle checkpoints (weights only, converted once to safetensors in the cache).
    allow_pickle: bool = False
    #: Told when the build has to wait for another build of the same spec.
    on_wait: Callable[[str], None] | None = None
    #: Where the arithmetic runs: "cpu", "cuda" or "cuda:N" (reads and writes stay on the host).
    device: str = "cpu"
    #: Threads for CPU arithmetic (None: leave the settings as they are; the CLI passes
    #: `default_jobs()`): a tensor's independent parts are spread over this many, and torch's
    #: ops use half as many each (`parallel.set_jobs`).
    jobs: int | None = None


def default_jobs() -> int:
    """Threads for CPU arithmetic when `--jobs` is not given: the cores this process may use."""
    return max(1, len(os.sched_getaffinity(0)))


def load_spec(path: Path, args: JsonnetArgs) -> Spec:
    return spec_module.load(
        path,
        ext_vars=args.ext_vars,
        ext_codes=args.ext_codes,
        tla_vars=args.tla_vars,
        tla_codes=args.tla_codes,
    )


def _selected(spec: Spec, target: str | None) -> list[str]:
    if target is None:
        return list(spec.targets)
    if target not in spec.targets:
        raise SpecError(f"no target {target!r}; targets: {', '.join(spec.targets)}")
    return [target]


def _opener(options: BuildOptions) -> Callable[[Path], ModelSource]:
    """Open each source once per build, however many targets use it."""
    opened: dict[Path, ModelSource] = {}
    converted = options.cache_dir / CONVERTED_DIR

    def open_source(path: Path) -> ModelSource:
        if path not in opened:
            opened[path] = ModelSource.open(path, allow_pickle=options.allow_pickle, convert_dir=converted)
        return opened[path]

    return open_source


def build(spec_path: Path, options: BuildOptions) -> BuildSummary:
    """Build the spec's targets (or one), publish each output, write the lockfile."""
    started = time.perf_counter()
    device = compute_device(options.device)  # an unusable device is refused before any work
    if options.jobs is not None:
        if options.jobs < 1:
            raise InputError(f"--jobs must be at least 1, got {options.jobs}")
        parallel.set_jobs(options.jobs)
    spec = load_spec(spec_path, options.jsonnet)
    lock_file = lockfile.lock_path(spec.path)
    if options.dry_run:
        return _build(spec, options, device, lock_file, started)
    with exclusive(options.cache_dir, str(spec.path), options.on_wait):
        return _build(spec, options, device, lock_file, started)


def _build(
    spec: Spec, options: BuildOptions, device: torch.device, lock_file: Path, started: float
) -> BuildSummary:
    previous = lockfile.read_lock(lock_file)
    if options.locked:
        _check_locked_spec(spec, previous, lock_file)
    summary = BuildSummary(spec=spec.path, lockfile=lock_file, dry_run=options.dry_run)
    open_source = _opener(options)
    compiled = [compile_target(spec, name, open_source) for name in _selected(spec, options.target)]
    lock = lockfile.new_lock(spec.digest, spec.imports)
    if previous is not None and options.target is not None:
        lock["sources"].update(previous.get("sources", {}))
        lock["targets"].update(previous.get("targets", {}))
    cache = Cache(options.cache_dir)
    try:
        for target in compiled:
            stale = _staleness(spec, target, previous, cache)
            if stale is None and not options.dry_run:
                assert previous is not None
                summary.targets.append(_up_to_date(target))
                lock["targets"][target.name] = previous["targets"][target.name]
                for key in _source_keys(spec, target):
                    lock["sources"][key] = previous["sources"][key]
                continue
            target_plan = _plan(spec, target, cache, previous, options.locked)
            if options.dry_run:
                summary.targets.append(_plan_summary(target, target_plan))
                summary.targets[-1].reason = stale or ""
                summary.targets[-1].up_to_date = stale is None
                continue
            check = None
            if options.locked:
                assert previous is not None
                check = _locked_checker(target.name, previous)
            reader = SourceReader(cache, target.spec.block_size)
            try:
                target_summary, entry, sources = _build_target(
                    spec, target, target_plan, reader, options.force, check, device
                )
            except (OSError, sqlite3.OperationalError) as e:
                # A full disk or an unwritable cache: nothing was published (staging is discarded).
                detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                raise ExecutionError(f"{target.output}: cannot write: {detail}; nothing was published") from e
            target_summary.reason = stale
            summary.targets.append(target_summary)
            lock["sources"].update(sources)
            lock["targets"][target.name] = entry
    finally:
        cache.close()
    if not options.dry_run:
        lockfile.write_lock(lock_file, lock)
    summary.seconds = time.perf_counter() - started
    return summary


def _plan(
    spec: Spec, target: CompiledTarget, cache: Cache, previous: dict | None, locked: bool
) -> TargetPlan:
    entry = (previous or {}).get("targets", {}).get(target.name)
    replay = None
    if locked and target.spec.budget is not None:
        replay = (entry or {}).get("plan", {}).get("allocation")
        if replay is None:
            raise LockMismatch(f"--locked: the lockfile has no budget allocation for target {target.name!r}")
    labels = {str(s.path): _source_key(spec, s.path) for s in target.sources}
    return plan_target(target, cache, labels, entry, replay)


def _plan_summary(target: CompiledTarget, target_plan: TargetPlan) -> TargetSummary:
    summary = TargetSummary(target.name, target.output, target.method.name)
    summary.bytes_to_read = target_plan.bytes_to_read
    summary.tensors_merged = sum(n.action == "compute" for n in target_plan.nodes)
    summary.tensors_copied = sum(n.action == "copy" for n in target_plan.nodes)
    summary.tensors_reused = sum(n.action == "reuse" for n in target_plan.nodes)
    if target_plan.budget is not None:
        summary.budget_bytes = target_plan.budget.budget_bytes
        summary.allocated_bytes = target_plan.budget.allocated_bytes
        summary.bound = target_plan.budget.bound
    return summary


def _plan_record(target: CompiledTarget, target_plan: TargetPlan) -> dict:
    """The lockfile's record of the plan: the full read, or the budget and its allocation."""
    budget = target_plan.budget
    if budget is None or target.spec.budget is None:
        return {"read": "all"}
    return {
        "budget": target.spec.budget.model_dump(exclude_none=True),
        "budget_bytes": budget.budget_bytes,
        "allocated_bytes": budget.allocated_bytes,
        "full_bytes": budget.full_bytes,
        "bound": budget.bound,
        "allocation": target_plan.allocation_record,
    }


def _build_target(
    spec: Spec,
    target: CompiledTarget,
    target_plan: TargetPlan,
    reader: SourceReader,
    force: bool,
    check: Callable[[dict, dict[str, dict]], None] | None,
    device: torch.device,
) -> tuple[TargetSummary, dict, dict[str, dict]]:
    """Execute into a staging directory; `check` may veto before anything is published."""
    check_output_path(target.output, force)
    summary = _plan_summary(target, target_plan)
    staging = staging_dir(target.output)
    try:
        layout = [(node.name, node.dtype, node.shape) for node in target.nodes]
        writer = OutputWriter(
            staging,
            layout,
            target.spec.shard_size,
            target.spec.block_size,
            {"format": "pt"},
            queue_bytes=write_behind_bytes(),
        )
        try:
            report: ExecutionReport = execute(target, target_plan, reader, writer.write, device=device)
            files = writer.finish()
        except BaseException:
            writer.abort()
            raise
        tokenizer = spec.resolve(target.spec.tokenizer) if target.spec.tokenizer else None
        if tokenizer is not None and not tokenizer.is_dir():
            raise InputError(f"tokenizer: {tokenizer} is not a directory")
        files += copy_side_files(staging, target.reference.directory, tokenizer)
        entry = {
            "method": target.method.name,
            "seed": target.spec.seed,
            "block_size": target.spec.block_size,
            "output": os.path.relpath(target.output, spec.directory),
            "base": _source_key(spec, target.base.path) if target.base else None,
            "models": [_source_key(spec, m.path) for m in target.models],
            "plan": _plan_record(target, target_plan),
            "tensors": {r.name: {"digest": r.digests.root.hex(), "key": r.key} for r in report.results},
            "files": {f.name: {"size": f.size, "digest": f.digest} for f in files},
        }
        sources = _source_entries(spec, target, reader)
        if check is not None:
            check(entry, sources)
        publish(staging, target.output, force)
    except BaseException:
        discard(staging)
        raise
    _remember_output(reader.cache, target.output, files, writer.placements, report)
    summary.bytes_read = reader.counters.bytes_read
    expert_files = {str(f.path) for m in target.models for f in m.files}
    summary.expert_bytes_read = sum(n for path, n in reader.counters.by_file.items() if path in expert_files)
    summary.tensors_merged = report.count("computed")
    summary.tensors_copied = report.count("copied")
    summary.tensors_reused = report.count("reused")
    summary.expert_work_reused = report.expert_work_reused
    summary.expert_work_computed = report.expert_work_computed
    summary.cache_bytes_read = reader.cache.events.bytes_read
    summary.bad_blobs = len(reader.cache.events.bad_blobs)
    summary.bytes_written = sum(f.size for f in files)
    summary.files = [f.name for f in files]
    summary.seconds = report.seconds
    return summary, entry, sources


def _staleness(spec: Spec, target: CompiledTarget, previous: dict | None, cache: Cache) -> str | None:
    tokenizer = spec.resolve(target.spec.tokenizer) if target.spec.tokenizer else None
    return freshness.target_staleness(
        spec.directory, spec.digest, target.name, target.output, tokenizer, previous, cache.catalog
    )


def _up_to_date(target: CompiledTarget) -> TargetSummary:
    summary = TargetSummary(target.name, target.output, target.method.name, up_to_date=True)
    summary.tensors_reused = len(target.nodes)
    return summary


def _source_keys(spec: Spec, target: CompiledTarget) -> list[str]:
    return [_source_key(spec, s.path) for s in target.sources]


def _remember_output(
    cache: Cache,
    output: Path,
    files: list[OutputFile],
    placements: dict[str, tuple[str, int, int]],
    report: ExecutionReport,
) -> None:
    """Adopt the published shards as blobs (hard links), so reused tensors are read out of them,
    and record each file's stat for the next up-to-date check."""
    digests = {f.name: f.digest for f in files}
    adopted = {
        name
        for name, digest in digests.items()
        if name.endswith(".safetensors") and cache.adopt(output / name, digest)
    }
    results = []
    for r in report.results:
        file_name, offset, nbytes = placements[r.name]
        if file_name in adopted:
            results.append((r.key, Result(digests[file_name], offset, nbytes, r.digests.content.hex())))
    cache.record_results(results)
    cache.catalog.record_published([(output / f.name, FileStat.of(output / f.name), f.digest) for f in files])


def _source_key(spec: Spec, path: Path) -> str:
    return os.path.relpath(path, spec.directory)


def _source_entries(spec: Spec, target: CompiledTarget, reader: SourceReader) -> dict[str, dict]:
    """Lock entries for the target's sources: files (name, size, digest) and tensor digests."""
    entries: dict[str, dict] = {}
    for source in target.sources:
        files = {}
        tensors = {}
        for f in source.files:
            digests = [reader.digests(info) for info in f.tensors.values()]
            digest = lockfile.file_digest(f.header, [d.content for d in digests])
            files[f.path.name] = {"size": f.size, "digest": digest}
            reader.cache.catalog.record_file_digest(f.path, reader.file_stat(f.path), digest)
            tensors.update({name: d.root.hex() for name, d in zip(f.tensors, digests, strict=True)})
        entries[_source_key(spec, source.path)] = {"files": files, "tensors": dict(sorted(tensors.items()))}
    return entries


def _check_locked_spec(spec: Spec, previous: dict | None, lock_file: Path) -> None:
    if previous is None:
        raise LockMismatch(f"--locked: no lockfile at {lock_file}")
    if previous["spec"]["digest"] != spec.digest:
        raise LockMismatch("--locked: the spec evaluates differently from the lockfile")
    if previous["spec"]["imports"] != spec.imports:
        changed = lockfile.diff(previous["spec"]["imports"], spec.imports)
        raise LockMismatch(f"--locked: imported file differs from the lockfile: {changed[0]}")


def _locked_checker(name: str, previous: dict) -> Callable[[dict, dict[str, dict]], None]:
    """A check that the built target and its sources match the lockfile exactly."""
    locked_target = previous.get("targets", {}).get(name)
    if locked_target is None:
        raise LockMismatch(f"--locked: target {name!r} is not in the lockfile")
    return lambda entry, sources: _check_locked_target(name, previous, locked_target, entry, sources)


def _check_locked_target(
    name: str, previous: dict, locked_target: dict, entry: dict, sources: dict[str, dict]
) -> None:
    for key, current in sources.items():
        locked_source = previous.get("sources", {}).get(key)
        if locked_source is None:
            raise LockMismatch(f"--locked: source {key} is not in the lockfile")
        changed = lockfile.diff(locked_source, current)
        if changed:
            # Name a tensor when one differs: it says more than the file holding it.
            first = next((c for c in changed if c.startswith("tensors.")), changed[0])
            raise LockMismatch(f"--locked: source {key} differs from the lockfile at {first}")
    if entry["plan"].get("bound", 0.0) is None:
        # A replayed allocation is not re-valued (this catalog may lack the statistics):
        # the bound stays the one the lockfile recorded.
        entry["plan"]["bound"] = locked_target.get("plan", {}).get("bound")
    changed = lockfile.diff(locked_target, entry)
    if changed:
        raise ExecutionError(f"--locked: target {name!r} did not reproduce the lockfile at {changed[0]}")


@dataclass(frozen=True)
class TargetStatus:
    """A target's plan, and why it is (or is not) up to date."""

    name: str
    output: Path
    stale: str | None
    plan: TargetPlan


def plan(spec_path: Path, options: BuildOptions) -> list[TargetStatus]:
    """Plan every selected target without reading tensor bytes or writing anything."""
    spec = load_spec(spec_path, options.jsonnet)
    previous = lockfile.read_lock(lockfile.lock_path(spec.path))
    open_source = _opener(options)
    statuses = []
    cache = Cache(options.cache_dir)
    try:
        for name in _selected(spec, options.target):
            target = compile_target(spec, name, open_source)
            stale = _staleness(spec, target, previous, cache)
            statuses.append(
                TargetStatus(name, target.output, stale, _plan(spec, target, cache, previous, False))
            )
    finally:
        cache.close()
    return statuses


def index(spec_path: Path, options: BuildOptions) -> int:
    """Hash the selected targets' sources into the catalog, with delta statistics for budgets.

    Returns the bytes read (zero when the catalog already knows everything).
    """
    spec = load_spec(spec_path, options.jsonnet)
    open_source = _opener(options)
    cache = Cache(options.cache_dir)
    try:
        read = 0
        for name in _selected(spec, options.target):
            target = compile_target(spec, name, open_source)
            reader = SourceReader(cache, target.spec.block_size)
            index_target(target, reader)
            _source_entries(spec, target, reader)
            read += reader.counters.bytes_read
    finally:
        cache.close()
    return read


@dataclass
class VerifyResult:
    target: str
    output: Path
    problems: list[str]


def verify(spec_path: Path, args: JsonnetArgs, target: str | None = None) -> list[VerifyResult]:
    """Check each target's output on disk against the lockfile's file digests."""
    spec = load_spec(spec_path, args)
    lock_file = lockfile.lock_path(spec.path)
    lock = lockfile.read_lock(lock_file)
    if lock is None:
        raise InputError(f"no lockfile at {lock_file}; build first")
    results = []
    for name in _selected(spec, target):
        entry = lock["targets"].get(name)
        output = spec.resolve(spec.targets[name].output)
        if entry is None:
            results.append(VerifyResult(name, output, ["not in the lockfile"]))
            continue
        problems = []
        for file_name, expected in sorted(entry["files"].items()):
            path = output / file_name
            if not path.is_file():
                problems.append(f"{file_name}: missing")
                continue
            if path.stat().st_size != expected["size"] or freshness.hash_file(path) != expected["digest"]:
                problems.append(f"{file_name}: content differs from the lockfile")
        results.append(VerifyResult(name, output, problems))
    return results
