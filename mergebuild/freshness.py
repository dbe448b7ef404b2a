"""The up-to-date check: is a target's published output exactly what its spec and sources would build?

It reads no tensor bytes and needs no torch: the spec's evaluated digest and the
mergebuild version must equal the lockfile's; every source file's stat must
match a catalog row whose lock digest is the one locked; every output file's
stat must match what mergebuild published, with the locked digest; the config
and tokenizer files copied into the output must still equal their sources.
That makes a null build cost a Jsonnet evaluation and a few dozen stat calls.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import xxhash

from mergebuild import __version__, lockfile, spec
from mergebuild.catalog import Catalog, FileStat
from mergebuild.spec import JsonnetArgs
from mergebuild.summary import BuildSummary, TargetSummary

#: The catalog's file name inside the cache directory.
CATALOG_NAME = "catalog.sqlite"

MARKER = ".mergebuild"
#: Files copied from the reference model's directory (or the spec's tokenizer source).
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


def side_files(model_dir: Path | None, tokenizer_dir: Path | None) -> dict[str, Path]:
    """Config and tokenizer files an output copies: name -> source file."""
    found: dict[str, Path] = {}
    for directory, names in ((model_dir, CONFIG_FILES), (tokenizer_dir or model_dir, TOKENIZER_FILES)):
        if directory is None:
            continue
        for name in names:
            src = directory / name
            if src.is_file() and not src.is_symlink():
                found[name] = src
    return found


def target_staleness(
    spec_dir: Path,
    spec_digest: str,
    name: str,
    output: Path,
    tokenizer: Path | None,
    lock: dict | None,
    catalog: Catalog,
) -> str | None:
    """Why target `name` must be rebuilt, or None when its output is up to date."""
    if lock is None:
        return "no lockfile"
    if lock.get("mergebuild_version") != __version__:
        return f"locked by mergebuild {lock.get('mergebuild_version')}"
    if lock["spec"]["digest"] != spec_digest:
        return "the spec changed"
    entry = lock["targets"].get(name)
    if entry is None:
        return "not in the lockfile"
    sources = [key for key in [entry["base"], *entry["models"]] if key is not None]
    for key in sources:
        reason = _source_staleness((spec_dir / key).resolve(), lock["sources"].get(key), catalog)
        if reason:
            return f"source {key}: {reason}"
    if (output / MARKER).is_symlink() or not (output / MARKER).is_file():
        return "no output"
    reference = spec_dir / sources[0]
    copied = side_files(reference if reference.is_dir() else None, tokenizer)
    for file_name, expected in entry["files"].items():
        if file_name in copied:
            if hash_file(copied.pop(file_name)) != expected["digest"]:
                return f"{file_name} changed in its source"
            continue
        reason = _output_staleness(output / file_name, expected, catalog)
        if reason:
            return f"output {file_name}: {reason}"
    if copied:
        return f"{sorted(copied)[0]} is new in its source"
    return None


def _source_staleness(path: Path, locked: dict | None, catalog: Catalog) -> str | None:
    if locked is None:
        return "not in the lockfile"
    files = locked["files"]
    if path.is_dir():
        present = {p.name for p in path.iterdir() if p.name.endswith(".safetensors")}
        if present != set(files):
            return "its safetensors files differ from the lockfile's"
        paths = {name: path / name for name in files}
    else:
        paths = {name: path for name in files}
    for name, file_path in paths.items():
        try:
            stat = FileStat.of(file_path)
        except OSError:
            return f"{name} is missing"
        if catalog.file_digest(file_path, stat) != files[name]["digest"]:
            return f"{name} changed (or is not in the cache)"
    return None


def _output_staleness(path: Path, expected: dict, catalog: Catalog) -> str | None:
    try:
        stat = FileStat.of(path)
    except OSError:
        return "missing"
    published = catalog.published(path)
    if published is None or published != (stat, expected["digest"]):
        return "changed since it was published"
    return None


def hash_file(path: Path) -> str:
    """xxh3-128 (hex) of a whole file, read in 8 MiB chunks: the digest lockfiles give output files."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(8 * 2**20):
            h.update(chunk)
    return h.hexdigest()


def up_to_date(
    spec_path: Path, args: JsonnetArgs, cache_dir: Path, target: str | None
) -> BuildSummary | None:
    """A summary when every selected target is up to date, else None (build the usual way).

    Runs before anything imports torch, so a null build costs well under a second.
    Anything unusual (no lockfile, unknown target, no catalog) answers None and
    leaves the explaining to the full build.
    """
    started = time.perf_counter()
    evaluated, imports = spec.evaluate(
        spec_path,
        ext_vars=args.ext_vars,
        ext_codes=args.ext_codes,
        tla_vars=args.tla_vars,
        tla_codes=args.tla_codes,
    )
    lock_file = lockfile.lock_path(spec_path.resolve())
    lock = lockfile.read_lock(lock_file)
    catalog_path = cache_dir / CATALOG_NAME
    if lock is None or lock["spec"]["imports"] != imports or not catalog_path.is_file():
        return None
    targets = evaluated.get("targets", {"default": evaluated})
    if not isinstance(targets, dict) or (target is not None and target not in targets):
        return None
    spec_dir = spec_path.resolve().parent
    digest = xxhash.xxh3_128_hexdigest(spec.canonical_json(evaluated).encode())
    summary = BuildSummary(spec=spec_path.resolve(), lockfile=lock_file, dry_run=False)
    catalog = Catalog(catalog_path)
    try:
        for name in [target] if target is not None else list(targets):
            raw = targets[name]
            if not isinstance(raw, dict) or not isinstance(raw.get("output"), str):
                return None
            output = Path(os.path.normpath(spec_dir / raw["output"]))
            tokenizer = Path(os.path.normpath(spec_dir / raw["tokenizer"])) if raw.get("tokenizer") else None
            if target_staleness(spec_dir, digest, name, output, tokenizer, lock, catalog) is not None:
                return None
            method = str(lock["targets"][name]["method"])
            tensors = len(lock["targets"][name]["tensors"])
            summary.targets.append(
                TargetSummary(name, output, method, up_to_date=True, tensors_reused=tensors)
            )
    finally:
        catalog.close()
    summary.seconds = time.perf_counter() - started
    return summary
