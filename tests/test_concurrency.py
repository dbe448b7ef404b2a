"""Builds sharing one cache at the same time: both finish correctly, or one waits and says so."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mergebuild.build import BuildOptions, build
from mergebuild.lockfile import lock_path
from tests.conftest import write_spec
from tests.families import Family


def _spec(path: Path, family: Family, weight: float) -> Path:
    return write_spec(
        path,
        {
            "method": "ties",
            "base": str(family.base),
            "models": [
                {"path": str(p), "parameters": {"weight": weight, "density": 0.5}} for p in family.experts
            ],
            "output": str(path.parent / f"out-{path.stem}"),
        },
    )


def _start(spec: Path, cache: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "mergebuild", "build", str(spec), "--cache-dir", str(cache), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _digests(spec: Path) -> dict[str, str]:
    return {
        n: t["digest"]
        for n, t in json.loads(lock_path(spec).read_text())["targets"]["default"]["tensors"].items()
    }


def test_two_specs_build_at_once_on_one_cache(tmp_path: Path, llama: Family) -> None:
    a, b = _spec(tmp_path / "a.json", llama, 1.0), _spec(tmp_path / "b.json", llama, 0.5)
    cache = tmp_path / "cache"
    runs = [_start(a, cache), _start(b, cache)]
    for run in runs:
        _, stderr = run.communicate(timeout=600)
        assert run.returncode == 0, stderr
    for spec in (a, b):
        assert (
            subprocess.run([sys.executable, "-m", "mergebuild", "verify", str(spec)], check=False).returncode
            == 0
        )
    # The shared catalog is whole: each spec is now up to date, and equals a build on its own cache.
    for spec in (a, b):
        assert build(spec, BuildOptions(cache_dir=cache)).targets[0].up_to_date
    expected = {}
    for spec in (a, b):
        expected[spec.name] = _digests(spec)
        lock_path(spec).unlink()
        build(spec, BuildOptions(cache_dir=tmp_path / f"alone-{spec.stem}"))
        assert _digests(spec) == expected[spec.name]


def test_the_same_spec_twice_at_once_waits(tmp_path: Path, llama: Family) -> None:
    spec = _spec(tmp_path / "s.json", llama, 0.8)
    cache = tmp_path / "cache"
    runs = [_start(spec, cache), _start(spec, cache)]
    outputs = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    summaries = [json.loads(out)["targets"][0] for out, _ in outputs]
    # Either the second waited and found the work done, or both saw the same state: never a mix.
    assert sum(not s["up_to_date"] for s in summaries) >= 1
    waited = [err for _, err in outputs if "waiting" in err]
    assert len(waited) <= 1
    assert (
        subprocess.run([sys.executable, "-m", "mergebuild", "verify", str(spec)], check=False).returncode == 0
    )
    assert not list(tmp_path.glob(".out-s.staging-*")) and not list(tmp_path.glob(".out-s.old-*"))
