"""The lockfile: `<spec>.lock.json`, a canonical record that replays a build bit for bit.

Sorted keys, one entry per line for tensors and files so `git diff` reads well.
Its size grows with the number of tensors, not of blocks.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import xxhash

from mergebuild import __version__
from mergebuild.errors import InputError

LOCK_VERSION = 1


def lock_path(spec_path: Path) -> Path:
    """specs/a.jsonnet -> specs/a.lock.json."""
    return spec_path.with_name(spec_path.name.rsplit(".", 1)[0] + ".lock.json")


def file_digest(header: bytes, tensor_contents: list[bytes]) -> str:
    """A source file's digest: its header and the content digests of its tensors, in header order."""
    h = xxhash.xxh3_128(header)
    for content in tensor_contents:
        h.update(content)
    return h.hexdigest()


def new_lock(spec_digest: str, imports: dict[str, str]) -> dict:
    return {
        "lock_version": LOCK_VERSION,
        "mergebuild_version": __version__,
        "spec": {"digest": spec_digest, "imports": imports},
        "sources": {},
        "targets": {},
    }


def read_lock(path: Path) -> dict | None:
    """The lockfile at `path`, or None if there is none."""
    if not path.is_file():
        return None
    try:
        lock = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable lockfile ({e})") from e
    if not isinstance(lock, dict) or lock.get("lock_version") != LOCK_VERSION:
        raise InputError(f"{path}: lockfile version {lock.get('lock_version')!r} is not {LOCK_VERSION}")
    return lock


#: Objects of scalars with at most this many keys (a file entry) stay on one line;
#: larger ones (a tensor -> digest map) get one entry per line.
_INLINE_KEYS = 4


def dumps(value: object) -> str:
    """Canonical JSON: sorted keys; small objects of scalars on one line, everything else indented."""
    return _dump(value, 0) + "\n"


def _dump(value: object, depth: int) -> str:
    nested = isinstance(value, dict) and any(isinstance(v, dict | list) for v in value.values())
    if isinstance(value, dict) and (nested or len(value) > _INLINE_KEYS):
        pad = "  " * (depth + 1)
        items = [f"{pad}{json.dumps(k)}: {_dump(value[k], depth + 1)}" for k in sorted(value)]
        return "{\n" + ",\n".join(items) + "\n" + "  " * depth + "}"
    if isinstance(value, list) and value and any(isinstance(v, dict | list) for v in value):
        pad = "  " * (depth + 1)
        items = [f"{pad}{_dump(v, depth + 1)}" for v in value]
        return "[\n" + ",\n".join(items) + "\n" + "  " * depth + "]"
    return json.dumps(value, sort_keys=True, separators=(", ", ": "))


def write_lock(path: Path, lock: dict) -> None:
    """Write atomically: a temp file of this process's own, fsynced, then renamed over the old one."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(dumps(lock))
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def diff(locked: dict, current: dict, where: str = "") -> list[str]:
    """Paths (dotted) at which two lock fragments differ, for error messages."""
    if isinstance(locked, dict) and isinstance(current, dict):
        out: list[str] = []
        for key in sorted(set(locked) | set(current)):
            sub = f"{where}.{key}" if where else str(key)
            if key not in locked:
                out.append(f"{sub} (not in the lockfile)")
            elif key not in current:
                out.append(f"{sub} (missing now)")
            else:
                out.extend(diff(locked[key], current[key], sub))
        return out
    return [] if locked == current else [where]
