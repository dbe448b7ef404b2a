"""Where the arithmetic runs: --device and --jobs.

The CUDA tests need an NVIDIA GPU and skip without one (CI never has one).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mergebuild import parallel
from mergebuild.build import BuildOptions, build, default_jobs
from mergebuild.errors import InputError
from mergebuild.execute import compute_device
from tests.conftest import jobs, write_spec
from tests.families import Family
from tests.test_build import load_dir, ties_spec
from tests.test_cli import assert_one_line_error, run

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

#: Methods whose CPU and GPU results are compared: the sparsifying family (top-k, random,
#: rank-probability masks, consensus, rescale) and the geometric ones.
DEVICE_METHODS = ["task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties", "della", "slerp", "model_stock"]


def _spec(family: Family, method: str, output: Path) -> dict:
    spec = ties_spec(family, output, seed=3, dtype="float32")
    spec["method"] = method
    if method == "slerp":
        spec["models"] = [str(family.experts[0])]
        spec["parameters"] = {"t": 0.3}
    if method == "model_stock":
        spec["models"] = [str(p) for p in family.experts]
    if method in ("della", "breadcrumbs_ties"):
        for model in spec["models"]:
            model["parameters"]["density"] = 0.4
    return spec


def _build(
    tmp_path: Path, family: Family, method: str, name: str, **options: object
) -> dict[str, torch.Tensor]:
    out = tmp_path / f"out-{name}"
    spec = write_spec(tmp_path / f"{name}.json", _spec(family, method, out))
    build(spec, BuildOptions(cache_dir=tmp_path / f"cache-{name}", **options))  # type: ignore[arg-type]
    return load_dir(out)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della"])
def test_jobs_do_not_change_the_bits(tmp_path: Path, llama: Family, method: str) -> None:
    with jobs(2):  # restores the settings the builds make
        one = _build(tmp_path, llama, method, "one", jobs=1)
        assert (torch.get_num_threads(), parallel.jobs()) == (1, 1)
        four = _build(tmp_path, llama, method, "four", device="cpu", jobs=4)
        # The method's ops and the fold's run at once: each gets half.
        assert (torch.get_num_threads(), parallel.jobs()) == (2, 4)
    assert one.keys() == four.keys()
    assert all(torch.equal(one[k], four[k]) for k in one)


def test_default_jobs_are_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    for cores in (1, 2, 3, 16):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)))
        assert default_jobs() == cores


def test_compute_device_names() -> None:
    assert compute_device("cpu") == torch.device("cpu")
    for bad in ("tpu", "not a device"):
        with pytest.raises(InputError, match="expected cpu, cuda or cuda:N"):
            compute_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_a_gpu_is_a_usage_error(tmp_path: Path, llama: Family) -> None:
    write_spec(tmp_path / "s.json", _spec(llama, "ties", tmp_path / "o"))
    assert_one_line_error(run("build", "s.json", "--device", "cuda", cwd=tmp_path), 2, "sees no CUDA device")
    assert not (tmp_path / "o").exists()


def test_bad_device_and_jobs_exit_2(tmp_path: Path, llama: Family) -> None:
    write_spec(tmp_path / "s.json", _spec(llama, "ties", tmp_path / "o"))
    assert_one_line_error(run("build", "s.json", "--device", "tpu", cwd=tmp_path), 2, "expected cpu, cuda")
    assert run("build", "s.json", "--jobs", "0", cwd=tmp_path).returncode == 2
    assert not (tmp_path / "o").exists()


@needs_cuda
@pytest.mark.parametrize("method", DEVICE_METHODS)
def test_cuda_matches_cpu(tmp_path: Path, llama: Family, method: str) -> None:
    cpu = _build(tmp_path, llama, method, "cpu")
    gpu = _build(tmp_path, llama, method, "cuda", device="cuda")
    base = load_dir(llama.base)
    assert cpu.keys() == gpu.keys()
    for name, want in cpu.items():
        got = gpu[name]
        assert got.dtype == want.dtype and got.shape == want.shape
        if not want.is_floating_point():
            assert torch.equal(got, want), name
            continue
        # Elementwise float32 ops round the same on both; reductions (norms, L1 rescale
        # factors, spherical angles) sum in another order.
        scale = float(torch.linalg.vector_norm(want.double() - base[name].double())) + 1e-12
        assert float(torch.linalg.vector_norm(got.double() - want.double())) <= 1e-5 * scale, name


@needs_cuda
def test_cuda_random_methods_are_deterministic(tmp_path: Path, llama: Family) -> None:
    first = _build(tmp_path, llama, "dare_ties", "a", device="cuda")
    second = _build(tmp_path, llama, "dare_ties", "b", device="cuda")
    assert all(torch.equal(first[k], second[k]) for k in first)
