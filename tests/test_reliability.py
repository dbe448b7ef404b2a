"""Reliability and safety (issue 6): bad inputs fail with one line and write nothing; outputs
cannot escape or clobber what mergebuild did not make; a full disk publishes nothing."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergebuild import cli
from mergebuild.build import BuildOptions, JsonnetArgs, build, verify
from mergebuild.errors import InputError, SpecError
from mergebuild.lockfile import lock_path
from mergebuild.publish import MARKER
from mergebuild.safetensors_io import MAX_HEADER_BYTES
from mergebuild.spec import LIBRARY_PATH, load
from tests.conftest import write_spec

# --------------------------------------------------------------------------------------------
# A tiny single-file family, written per test (milliseconds; no transformers).

NAMES = ("model.layers.0.mlp.weight", "model.layers.1.mlp.weight", "model.norm.weight")


def family_tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = {
        NAMES[0]: torch.randn(8, 4, generator=g),
        NAMES[1]: torch.randn(8, 4, generator=g),
        NAMES[2]: torch.ones(4),
        "position_ids": torch.arange(4, dtype=torch.int64),
    }
    if seed == 0:
        return base
    g = torch.Generator().manual_seed(seed)
    return {
        k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
        for k, v in base.items()
    }


def write_family(root: Path) -> None:
    for name, seed in (("b", 0), ("e1", 1), ("e2", 2)):
        save_file(family_tensors(seed), root / f"{name}.safetensors")


def ties(**extra: object) -> dict:
    return {
        "method": "ties",
        "base": "b.safetensors",
        "models": [
            {"path": f"e{i}.safetensors", "parameters": {"weight": 1.0, "density": 0.5}} for i in (1, 2)
        ],
        "output": "out",
        **extra,
    }


def raw_safetensors(path: Path, header: object, data: bytes, length: int | None = None) -> None:
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + data)


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root (but the cache) with a digest of what it is: proves nothing was written."""
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not (Path(dirpath) == root and d == "cache")]
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                found[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                found[rel] = "dir"
            else:
                found[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return found


def run_cli(
    args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[int, str]:
    """Run the CLI's entry point in-process (as `mergebuild ARGS` would); return (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["mergebuild", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    code = exit_info.value.code
    return (code if isinstance(code, int) else 0 if code is None else 1), capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Bad inputs: each one line on stderr, exit code 2, nothing written.

Setup = Callable[[Path, dict], "list[str] | None"]


def set_spec(**changes: object) -> Setup:
    def setup(root: Path, spec: dict) -> None:
        spec.update(changes)

    return setup


def set_model(i: int, **changes: object) -> Setup:
    def setup(root: Path, spec: dict) -> None:
        spec["models"][i].update(changes)

    return setup


def replace_expert(tensors: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> Setup:
    def setup(root: Path, spec: dict) -> None:
        save_file(tensors(family_tensors(1)), root / "e1.safetensors")

    return setup


def raw_expert(header: object, data: bytes, length: int | None = None) -> Setup:
    def setup(root: Path, spec: dict) -> None:
        raw_safetensors(root / "e1.safetensors", header, data, length)

    return setup


def truncate_expert(root: Path, spec: dict) -> None:
    data = (root / "e1.safetensors").read_bytes()
    (root / "e1.safetensors").write_bytes(data[:-20])


def malformed_jsonnet(root: Path, spec: dict) -> list[str]:
    (root / "bad.jsonnet").write_text("{\n  method: 'ties'\n  base: 'b.safetensors',\n}\n")
    return ["build", "bad.jsonnet"]


def tiny_expert(root: Path, spec: dict) -> None:
    (root / "e1.safetensors").write_bytes(b"\1\2")


def not_utf8(root: Path, spec: dict) -> list[str]:
    (root / "latin1.jsonnet").write_bytes("{method: 'tiés'}".encode("latin-1"))
    return ["build", "latin1.jsonnet"]


def import_outside(root: Path, spec: dict) -> list[str]:
    (root / "s2.jsonnet").write_text("(import 's.json') + { output: importstr '/etc/hostname' }")
    return ["build", "s2.jsonnet"]


def poke(name: str, value: float) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    def change(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tensors[name][1, 2] = value
        return tensors

    return change


def symlinked_output(root: Path, spec: dict) -> None:
    (root / "elsewhere").mkdir()
    (root / "elsewhere" / "keep.txt").write_text("keep")
    (root / "out").symlink_to(root / "elsewhere")


def foreign_output(root: Path, spec: dict) -> None:
    (root / "out").mkdir()
    (root / "out" / "notes.txt").write_text("mine, not mergebuild's")


def file_output(root: Path, spec: dict) -> list[str]:
    (root / "out").write_text("a file where the output directory would go")
    return ["build", "s.json", "--force"]


def with_force(setup: Setup) -> Setup:
    def wrapped(root: Path, spec: dict) -> list[str]:
        setup(root, spec)
        return ["build", "s.json", "--force"]

    return wrapped


def pickle_expert(root: Path, spec: dict) -> None:
    (root / "pickled").mkdir()
    torch.save(family_tensors(1), root / "pickled" / "pytorch_model.bin")
    spec["models"][0]["path"] = "pickled"


F32_8 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}

BAD_INPUTS: dict[str, tuple[Setup, str]] = {
    "malformed jsonnet": (malformed_jsonnet, "bad.jsonnet:3:"),
    "import outside the spec tree": (import_outside, "outside the spec's directory tree"),
    "missing spec file": (lambda root, spec: ["build", "nope.jsonnet"], "no such spec file"),
    "unknown field": (set_spec(colour="red"), "colour: unknown field"),
    "unknown method": (set_spec(method="tiez"), "method: unknown method 'tiez'"),
    "unknown parameter": (
        set_model(0, parameters={"weight": 1, "densty": 0.5}),
        "models.0.parameters.densty: 'ties' takes no parameter 'densty'",
    ),
    "density 0": (set_model(0, parameters={"weight": 1, "density": 0}), "density: must be in (0, 1]"),
    "density above 1": (
        set_model(1, parameters={"weight": 1, "density": 1.01}),
        "density: must be in (0, 1]",
    ),
    "missing base": (set_spec(base=None), "needs a base model"),
    "no inputs at all": (
        set_spec(method="passthrough", base=None, models=[]),
        "needs a base or a model to read",
    ),
    "spec that is not UTF-8": (not_utf8, "not UTF-8 text (invalid byte at offset 12)"),
    "slerp with two models": (
        set_spec(method="slerp", models=["e1.safetensors", "e2.safetensors"], parameters={"t": 0.5}),
        "takes exactly 1 models, got 2",
    ),
    "NUL in a path": (set_model(0, path="e1\0.safetensors"), "models.0.path: a path cannot contain a NUL"),
    "seed beyond 64 bits": (set_spec(seed=2**64), "seed: Input should be less than"),
    "size that overflows": (set_spec(block_size="1" + "0" * 400 + "KiB"), "block_size: not a size"),
    "output is the spec's directory": (with_force(set_spec(output=".")), "holds the spec's own directory"),
    "output holds a source": (
        with_force(set_model(0, path="out/e1.safetensors")),
        "holds the source 'out/e1.safetensors'",
    ),
    "missing directory": (set_model(0, path="nowhere"), "nowhere: no such file or directory"),
    "missing file": (set_spec(base="nothing.safetensors"), "nothing.safetensors: no such file or directory"),
    "directory without weights": (set_model(1, path="cache"), "no .safetensors files"),
    "pickle without opt-in": (pickle_expert, "refused by default; pass --allow-pickle"),
    "tensor missing from a model": (
        replace_expert(lambda t: {k: v for k, v in t.items() if k != NAMES[1]}),
        f"tensor '{NAMES[1]}' is missing from e1.safetensors",
    ),
    "shape mismatch": (
        replace_expert(lambda t: {**t, NAMES[0]: torch.zeros(8, 5)}),
        f"tensor '{NAMES[0]}': shape [8, 5] in e1.safetensors differs",
    ),
    "non-float dtype": (
        replace_expert(lambda t: {**t, NAMES[0]: torch.zeros(8, 4, dtype=torch.int32)}),
        "dtype I32 in e1.safetensors is not floating point",
    ),
    "NaN in an input": (
        replace_expert(poke(NAMES[1], float("nan"))),
        f"tensor '{NAMES[1]}' holds NaN or Inf",
    ),
    "Inf in an input": (
        replace_expert(poke(NAMES[0], float("-inf"))),
        f"tensor '{NAMES[0]}' holds NaN or Inf",
    ),
    "truncated safetensors": (truncate_expert, "out of range"),
    "file shorter than 8 bytes": (tiny_expert, "not a safetensors file (shorter than 8 bytes)"),
    "header longer than the file": (raw_expert({}, b"", length=10**6), "larger than the file"),
    "header over the cap": (raw_expert({}, b"", length=MAX_HEADER_BYTES + 1), "exceeds the"),
    "offsets out of range": (raw_expert({"w": F32_8}, b"\0" * 4), "data_offsets [0, 8] out of range"),
    "overlapping tensors": (
        raw_expert({"v": F32_8, "w": {**F32_8, "data_offsets": [4, 12]}}, b"\0" * 12),
        "tensors 'v' and 'w' overlap",
    ),
    "offsets not matching dtype x shape": (
        raw_expert({"w": {**F32_8, "shape": [3]}}, b"\0" * 8),
        "holds 8 bytes but F32 x [3] needs 12",
    ),
    "unsupported dtype": (raw_expert({"w": {**F32_8, "dtype": "F4"}}, b"\0" * 8), "unsupported dtype 'F4'"),
    "output is a symlink": (symlinked_output, "output path is a symbolic link"),
    "output made by someone else": (foreign_output, "not made by mergebuild; pass --force"),
    "output is a file, even with --force": (file_output, "exists and is not a directory"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    setup, expected = BAD_INPUTS[case]
    write_family(tmp_path)
    (tmp_path / "cache").mkdir()
    spec = ties()
    args = setup(tmp_path, spec) or ["build", "s.json"]
    write_spec(tmp_path / "s.json", spec)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    code, stderr = run_cli([*args, "--cache-dir", str(tmp_path / "cache")], capsys, monkeypatch)
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert expected in lines[0]
    # Nothing written: no output, no lockfile, no staging directory; every file as it was.
    assert snapshot(tmp_path) == before
    assert not lock_path(tmp_path / "s.json").exists()


# --------------------------------------------------------------------------------------------
# Safety: where a build may read and write.


def options(tmp_path: Path, **kw: object) -> BuildOptions:
    return BuildOptions(cache_dir=tmp_path / "cache", **kw)  # type: ignore[arg-type]


def test_tensor_names_are_never_paths(tmp_path: Path) -> None:
    """Tensor names live inside safetensors headers; output files have fixed names."""
    hostile = ["../../evil", f"{tmp_path}/abs-evil", "..", "config.json", "model.safetensors.index.json"]
    base = {name: torch.full((64, 64), float(i)) for i, name in enumerate(hostile)}
    base["model.norm.weight"] = torch.ones(64)
    save_file(base, tmp_path / "b.safetensors")
    save_file({k: v + 1 for k, v in base.items()}, tmp_path / "e.safetensors")
    spec = write_spec(
        tmp_path / "work" / "s.json",
        {
            "method": "task_arithmetic",
            "base": "../b.safetensors",
            "models": [{"path": "../e.safetensors", "parameters": {"weight": 0.5}}],
            "shard_size": "20KB",  # several shards and an index naming every tensor
            "output": "out",
        },
    )
    build(spec, options(tmp_path))
    out = tmp_path / "work" / "out"
    files = sorted(p.name for p in out.iterdir())
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 1
    assert files == sorted([*shards, "model.safetensors.index.json", MARKER])
    merged: dict[str, torch.Tensor] = {}
    for shard in shards:
        merged.update(load_file(out / shard))
    assert set(merged) == set(base)
    assert torch.equal(merged["../../evil"], base["../../evil"] + 0.5)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(base) and set(index["weight_map"].values()) == set(shards)
    # Nothing appeared where the hostile names point.
    assert not (tmp_path / "evil").exists() and not (tmp_path.parent / "evil").exists()
    assert not (tmp_path / "abs-evil").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.safetensors", "cache", "e.safetensors", "work"]


def test_symlinked_output_is_refused_even_with_force(tmp_path: Path) -> None:
    write_family(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "keep.txt").write_text("keep")
    (tmp_path / "out").symlink_to("elsewhere")
    spec = write_spec(tmp_path / "s.json", ties())
    for force in (False, True):
        with pytest.raises(InputError, match="output path is a symbolic link"):
            build(spec, options(tmp_path, force=force))
    assert [p.name for p in (tmp_path / "elsewhere").iterdir()] == ["keep.txt"]
    assert (tmp_path / "out").is_symlink()


def test_output_with_marker_is_replaced_whole_and_foreign_only_with_force(tmp_path: Path) -> None:
    write_family(tmp_path)
    spec = write_spec(tmp_path / "s.json", ties())
    build(spec, options(tmp_path))
    first = (tmp_path / "out" / "model.safetensors").read_bytes()
    # mergebuild's own output (it has the marker) is replaced without --force, stray files and all.
    (tmp_path / "out" / "stray.txt").write_text("left by a user")
    write_spec(spec, ties(seed=1, parameters={"lambda": 0.5}))
    build(spec, options(tmp_path))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MARKER, "model.safetensors"]
    assert (tmp_path / "out" / "model.safetensors").read_bytes() != first
    assert all(not r.problems for r in verify(spec, JsonnetArgs()))
    # Without the marker it is someone else's directory: refused, untouched, unless --force.
    (tmp_path / "out" / MARKER).unlink()
    with pytest.raises(InputError, match="not made by mergebuild; pass --force"):
        build(spec, options(tmp_path))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors"]
    build(spec, options(tmp_path, force=True))
    assert (tmp_path / "out" / MARKER).is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("how", ["symlink out of the tree", "package file next to the library"])
def test_imports_cannot_escape_through_symlinks_or_the_package(tmp_path: Path, how: str) -> None:
    (tmp_path / "secret.libsonnet").write_text("{ password: 'hunter2' }")
    spec_dir = tmp_path / "specs"
    spec_dir.mkdir()
    if how == "symlink out of the tree":
        (spec_dir / "lib.libsonnet").symlink_to(tmp_path / "secret.libsonnet")
        target = "lib.libsonnet"
    else:
        target = str(LIBRARY_PATH.parent / "errors.py")
    (spec_dir / "s.jsonnet").write_text(
        f"local x = importstr '{target}'; {{method: 'linear', models: ['m'], parameters: {{weight: 1}}, output: x}}"
    )
    with pytest.raises(SpecError, match="outside the spec's directory tree"):
        load(spec_dir / "s.jsonnet")
    # The bundled library itself stays importable by name.
    (spec_dir / "ok.jsonnet").write_text(
        "local mb = import 'mergebuild.libsonnet'; mb.linear([mb.model('m', {weight: 1})], 'o')"
    )
    assert load(spec_dir / "ok.jsonnet").imports.keys() == {"mergebuild.libsonnet"}


def test_spec_values_that_would_crash_later_are_schema_errors(tmp_path: Path) -> None:
    cases = {
        "seed: -1e19": "seed: Input should be greater than or equal to",
        f"block_size: '{'9' * 400}'": "block_size: not a size",
        "tokenizer: 'tok\\u0000'": "tokenizer: a path cannot contain a NUL character",
        "output: ' '": "output: a path cannot be empty",
    }
    for field, message in cases.items():
        path = tmp_path / "s.jsonnet"
        path.write_text(
            f"{{method: 'linear', models: ['m'], parameters: {{weight: 1}}, output: 'o'}} + {{{field}}}"
        )
        with pytest.raises(SpecError, match=message):
            load(path)


# --------------------------------------------------------------------------------------------
# A full disk (RLIMIT_FSIZE) and an output that cannot be created.

#: Output of the big family: 4 float32 tensors of 1 MiB. The cap lets the catalog, lockfile and
#: first tensor through and stops the output file at its second tensor.
FSIZE_CAP = 3 * 2**20 // 2


def big_family(root: Path) -> None:
    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.mlp.weight": torch.randn(256, 1024, generator=g) for i in range(4)}
    save_file(base, root / "b.safetensors")
    save_file(
        {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}, root / "e.safetensors"
    )


def arithmetic(weight: float, prefix: str = "") -> dict:
    return {
        "method": "task_arithmetic",
        "base": f"{prefix}b.safetensors",
        "models": [{"path": f"{prefix}e.safetensors", "parameters": {"weight": weight}}],
        "dtype": "float32",
        "output": "out",
    }


def mergebuild_subprocess(
    args: list[str], cwd: Path, fsize: int | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    def limit() -> None:
        # Ignore SIGXFSZ so an oversized write fails with EFBIG (as on a full disk) instead of killing.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run(
        [sys.executable, "-m", "mergebuild", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        preexec_fn=limit,
        timeout=timeout,
    )


def tensor_digests(spec: Path) -> dict[str, str]:
    lock = json.loads(lock_path(spec).read_text())
    return {name: t["digest"] for name, t in lock["targets"]["default"]["tensors"].items()}


@dataclass(frozen=True)
class DiskFullRun:
    result: subprocess.CompletedProcess[str]
    before: dict[str, str]
    after: dict[str, str]
    rebuilt: dict[str, str]
    clean: dict[str, str]


@pytest.fixture(scope="module")
def disk_full(tmp_path_factory: pytest.TempPathFactory) -> DiskFullRun:
    """Build A; rebuild as B with writes capped; then build B normally, and B from scratch elsewhere."""
    root = tmp_path_factory.mktemp("disk-full")
    big_family(root)
    spec = write_spec(root / "s.json", arithmetic(1.0))
    build(spec, BuildOptions(cache_dir=root / "cache"))
    write_spec(spec, arithmetic(0.5))
    before = snapshot(root)
    result = mergebuild_subprocess(["build", "s.json", "--cache-dir", "cache"], root, fsize=FSIZE_CAP)
    after = snapshot(root)
    build(spec, BuildOptions(cache_dir=root / "cache"))
    clean = write_spec(root / "clean" / "s.json", arithmetic(0.5, prefix="../"))
    build(clean, BuildOptions(cache_dir=root / "clean" / "cache"))
    return DiskFullRun(result, before, after, tensor_digests(spec), tensor_digests(clean))


def test_full_disk_publishes_nothing_and_a_later_build_recovers(disk_full: DiskFullRun) -> None:
    assert disk_full.result.returncode != 0, disk_full.result.stdout
    # The previous output and lockfile are untouched, and nothing else was left behind
    # (no staging directory, no retired output, no temp lockfile).
    assert disk_full.after == disk_full.before
    assert disk_full.rebuilt == disk_full.clean


def test_full_disk_is_a_one_line_execution_error(disk_full: DiskFullRun) -> None:
    stderr = disk_full.result.stderr
    assert disk_full.result.returncode in (2, 3), stderr
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error: "), stderr


def cannot_create_output(tmp_path: Path, how: str) -> subprocess.CompletedProcess[str]:
    write_family(tmp_path)
    if how == "parent is a file":
        (tmp_path / "parent").write_text("not a directory")
    else:
        (tmp_path / "parent").mkdir(mode=0o555)
    write_spec(tmp_path / "s.json", ties(output="parent/out"))
    before = snapshot(tmp_path)
    result = mergebuild_subprocess(["build", "s.json", "--cache-dir", "cache"], tmp_path)
    assert snapshot(tmp_path) == before
    assert not lock_path(tmp_path / "s.json").exists()
    return result


CANNOT_CREATE = [
    "parent is a file",
    pytest.param(
        "parent is read-only",
        marks=pytest.mark.skipif(
            os.geteuid() == 0, reason="running as root: chmod 0o555 does not stop root from writing"
        ),
    ),
]


@pytest.mark.parametrize("how", CANNOT_CREATE)
def test_output_that_cannot_be_created_publishes_nothing(tmp_path: Path, how: str) -> None:
    assert cannot_create_output(tmp_path, how).returncode != 0


@pytest.mark.parametrize("how", CANNOT_CREATE)
def test_output_that_cannot_be_created_is_a_one_line_error(tmp_path: Path, how: str) -> None:
    result = cannot_create_output(tmp_path, how)
    assert result.returncode in (2, 3), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: "), result.stderr


def test_the_same_model_twice_builds(tmp_path: Path) -> None:
    write_family(tmp_path)
    spec = ties()
    spec["models"][1]["path"] = spec["models"][0]["path"]
    write_spec(tmp_path / "s.json", spec)
    try:
        result = mergebuild_subprocess(["build", "s.json", "--cache-dir", "cache"], tmp_path, timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail("the build hung")
    assert result.returncode == 0, result.stderr
