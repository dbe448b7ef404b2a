"""The build: spec -> graph -> execute -> publish -> lockfile, for every target.

The CLI calls `build`, `verify` and `plan` and renders what they return.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from mergebuild import lockfile
from mergebuild import spec as spec_module
from mergebuild.catalog import BlockGrid, Catalog
from mergebuild.errors import ExecutionError, InputError, LockMismatch, SpecError
from mergebuild.execute import ExecutionReport, SourceReader, execute
from mergebuild.graph import CompiledTarget, TensorNode, compile_target
from mergebuild.publish import (
    OutputWriter,
    check_output_path,
    copy_side_files,
    discard,
    publish,
    staging_dir,
)
from mergebuild.sources import ModelSource
from mergebuild.spec import Spec

CATALOG_NAME = "catalog.sqlite"


@dataclass(frozen=True)
class JsonnetArgs:
    """Top-level arguments and external variables from the CLI."""

    ext_vars: dict[str, str] = field(default_factory=dict)
    ext_codes: dict[str, str] = field(default_factory=dict)
    tla_vars: dict[str, str] = field(default_factory=dict)
    tla_codes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BuildOptions:
    cache_dir: Path
    target: str | None = None
    locked: bool = False
    dry_run: bool = False
    force: bool = False
    jsonnet: JsonnetArgs = JsonnetArgs()


@dataclass
class TargetSummary:
    """What building one target read, computed and wrote."""

    name: str
    output: Path
    method: str
    bytes_to_read: int = 0
    bytes_read: int = 0
    tensors_merged: int = 0
    tensors_copied: int = 0
    blocks_computed: int = 0
    bytes_written: int = 0
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class BuildSummary:
    spec: Path
    lockfile: Path
    dry_run: bool
    targets: list[TargetSummary] = field(default_factory=list)
    seconds: float = 0.0


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


def _opener() -> Callable[[Path], ModelSource]:
    """Open each source once per build, however many targets use it."""
    opened: dict[Path, ModelSource] = {}

    def open_source(path: Path) -> ModelSource:
        if path not in opened:
            opened[path] = ModelSource.open(path)
        return opened[path]

    return open_source


def build(spec_path: Path, options: BuildOptions) -> BuildSummary:
    """Build the spec's targets (or one), publish each output, write the lockfile."""
    started = time.perf_counter()
    spec = load_spec(spec_path, options.jsonnet)
    lock_file = lockfile.lock_path(spec.path)
    previous = lockfile.read_lock(lock_file)
    if options.locked:
        _check_locked_spec(spec, previous, lock_file)
    summary = BuildSummary(spec=spec.path, lockfile=lock_file, dry_run=options.dry_run)
    open_source = _opener()
    compiled = [compile_target(spec, name, open_source) for name in _selected(spec, options.target)]
    lock = lockfile.new_lock(spec.digest, spec.imports)
    if previous is not None and options.target is not None:
        lock["sources"].update(previous.get("sources", {}))
        lock["targets"].update(previous.get("targets", {}))
    catalog = Catalog(options.cache_dir / CATALOG_NAME)
    try:
        for target in compiled:
            reader = SourceReader(catalog, target.spec.block_size)
            if options.dry_run:
                summary.targets.append(_plan_summary(target))
                continue
            check = None
            if options.locked:
                assert previous is not None
                check = _locked_checker(target.name, previous)
            target_summary, entry, sources = _build_target(spec, target, reader, options.force, check)
            summary.targets.append(target_summary)
            lock["sources"].update(sources)
            lock["targets"][target.name] = entry
    finally:
        catalog.close()
    if not options.dry_run:
        lockfile.write_lock(lock_file, lock)
    summary.seconds = time.perf_counter() - started
    return summary


def _plan_summary(target: CompiledTarget) -> TargetSummary:
    summary = TargetSummary(target.name, target.output, target.method.name)
    summary.bytes_to_read = sum(info.nbytes for node in target.nodes for info in node.inputs)
    summary.tensors_merged = sum(node.action == "merge" for node in target.nodes)
    summary.tensors_copied = sum(node.action == "copy" for node in target.nodes)
    summary.blocks_computed = sum(_blocks(node, target.spec.block_size) for node in target.nodes)
    return summary


def _blocks(node: TensorNode, block_size: int) -> int:
    return len(BlockGrid.for_shape(node.shape, block_size).ranges())


def _build_target(
    spec: Spec,
    target: CompiledTarget,
    reader: SourceReader,
    force: bool,
    check: Callable[[dict, dict[str, dict]], None] | None,
) -> tuple[TargetSummary, dict, dict[str, dict]]:
    """Execute into a staging directory; `check` may veto before anything is published."""
    check_output_path(target.output, force)
    summary = _plan_summary(target)
    staging = staging_dir(target.output)
    try:
        layout = [(node.name, node.dtype, node.shape) for node in target.nodes]
        writer = OutputWriter(
            staging, layout, target.spec.shard_size, target.spec.block_size, {"format": "pt"}
        )
        report: ExecutionReport = execute(target, reader, writer.write)
        files = writer.finish()
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
            "plan": {"read": "all"},
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
    summary.bytes_read = reader.counters.bytes_read
    summary.tensors_merged = report.merged
    summary.tensors_copied = report.copied
    summary.bytes_written = sum(f.size for f in files)
    summary.files = [f.name for f in files]
    summary.seconds = report.seconds
    return summary, entry, sources


def _source_key(spec: Spec, path: Path) -> str:
    return os.path.relpath(path, spec.directory)


def _source_entries(spec: Spec, target: CompiledTarget, reader: SourceReader) -> dict[str, dict]:
    """Lock entries for the target's sources: files (name, size, digest) and tensor digests."""
    entries: dict[str, dict] = {}
    for source in ((target.base,) if target.base else ()) + target.models:
        files = {}
        tensors = {}
        for f in source.files:
            digests = [reader.digests(info) for info in f.tensors.values()]
            files[f.path.name] = {
                "size": f.size,
                "digest": lockfile.file_digest(f.header, [d.content for d in digests]),
            }
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
    changed = lockfile.diff(locked_target, entry)
    if changed:
        raise ExecutionError(f"--locked: target {name!r} did not reproduce the lockfile at {changed[0]}")


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
            h = xxhash.xxh3_128()
            with open(path, "rb") as f:
                while chunk := f.read(8 * 2**20):
                    h.update(chunk)
            if path.stat().st_size != expected["size"] or h.hexdigest() != expected["digest"]:
                problems.append(f"{file_name}: content differs from the lockfile")
        results.append(VerifyResult(name, output, problems))
    return results
