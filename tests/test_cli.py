"""The command line: exit codes, one-line errors, summaries, the demo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_spec
from tests.families import Family, make_llama_family

REPO = Path(__file__).resolve().parents[1]


def run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MERGEBUILD_CACHE": str(cwd / "cache")}
    return subprocess.run(
        [sys.executable, "-m", "mergebuild", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, pattern: str) -> None:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and pattern in lines[0]
    assert "Traceback" not in result.stderr


def test_demo_builds_from_nothing_and_replays_locked(tmp_path: Path) -> None:
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "demo.jsonnet").write_text((REPO / "specs" / "demo.jsonnet").read_text())
    assert run("init-demo", specs / "models" / "demo", cwd=tmp_path).returncode == 0
    first = run("build", specs / "demo.jsonnet", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "ties" in first.stdout and "locked" in first.stdout
    lock = (specs / "demo.lock.json").read_text()
    # The committed lockfile pins the same demo: generation is deterministic.
    assert (
        json.loads(lock)["targets"] == json.loads((REPO / "specs" / "demo.lock.json").read_text())["targets"]
    )
    null = run("build", specs / "demo.jsonnet", "--json", cwd=tmp_path)
    assert null.returncode == 0, null.stderr
    assert json.loads(null.stdout)["targets"][0]["up_to_date"]
    # Another machine: no output, no cache. --locked rebuilds from the sources and reproduces the lock.
    shutil.rmtree(tmp_path / "out")
    shutil.rmtree(tmp_path / "cache")
    again = run("build", specs / "demo.jsonnet", "--locked", "--json", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["targets"][0]["tensors_merged"] > 0 and summary["targets"][0]["bytes_read"] > 0
    assert (specs / "demo.lock.json").read_text() == lock
    assert run("verify", specs / "demo.jsonnet", cwd=tmp_path).returncode == 0


def test_bad_jsonnet_is_one_line_with_location(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonnet").write_text("{\n  method: 'ties'\n  base: 'b',\n}")
    assert_one_line_error(run("build", "bad.jsonnet", cwd=tmp_path), 2, "bad.jsonnet:3:")


def test_schema_error_is_one_line_with_field_path(tmp_path: Path) -> None:
    write_spec(
        tmp_path / "s.json",
        {
            "method": "ties",
            "base": "b",
            "models": [{"path": "m", "parameters": {"weight": 1, "density": 0}}],
            "output": "o",
        },
    )
    assert_one_line_error(
        run("eval", "s.json", cwd=tmp_path), 2, "models.0.parameters.density: must be in (0, 1]"
    )


def test_missing_model_directory(tmp_path: Path) -> None:
    write_spec(
        tmp_path / "s.json",
        {"method": "linear", "models": ["nowhere"], "parameters": {"weight": 1}, "output": "o"},
    )
    assert_one_line_error(run("build", "s.json", cwd=tmp_path), 2, "nowhere: no such file or directory")


def test_pickle_checkpoints_are_refused(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    write_spec(
        tmp_path / "s.json", {"method": "linear", "models": ["m"], "parameters": {"weight": 1}, "output": "o"}
    )
    assert_one_line_error(run("build", "s.json", cwd=tmp_path), 2, "pickle checkpoints")


def test_shape_mismatch_and_missing_tensor_name_the_tensor(
    tmp_path: Path, llama: Family, bert: Family
) -> None:
    wide = make_llama_family(tmp_path / "wide", 1, hidden_size=32)
    write_spec(
        tmp_path / "s.json",
        {
            "method": "task_arithmetic",
            "base": str(llama.base),
            "models": [{"path": str(wide.experts[0]), "parameters": {"weight": 1}}],
            "output": "o",
        },
    )
    assert_one_line_error(run("build", "s.json", cwd=tmp_path), 2, "tensor 'lm_head.weight': shape [128, 32]")
    write_spec(
        tmp_path / "t.json",
        {
            "method": "task_arithmetic",
            "base": str(llama.base),
            "models": [{"path": str(bert.base), "parameters": {"weight": 1}}],
            "output": "o",
        },
    )
    assert_one_line_error(run("build", "t.json", cwd=tmp_path), 2, "tensor 'lm_head.weight' is missing from")
    assert not (tmp_path / "o").exists()


def test_eval_prints_json_with_tla(tmp_path: Path) -> None:
    (tmp_path / "s.jsonnet").write_text(
        "function(w) { method: 'linear', models: ['a', 'b'], parameters: { weight: std.parseJson(w) }, output: 'o' }"
    )
    result = run("eval", "s.jsonnet", "--tla-str", "w=0.25", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["parameters"]["weight"] == 0.25


@pytest.mark.parametrize(
    "args", [["build"], ["build", "x.json", "--no-such-flag"], ["build", "x.json", "--tla-str", "novalue"]]
)
def test_usage_errors_exit_2(tmp_path: Path, args: list[str]) -> None:
    result = run(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_dry_run_exits_1_and_verify_without_lock_exits_2(tmp_path: Path, llama: Family) -> None:
    write_spec(
        tmp_path / "s.json",
        {
            "method": "linear",
            "models": [str(p) for p in llama.experts],
            "parameters": {"weight": 1},
            "output": "o",
        },
    )
    assert run("build", "s.json", "--dry-run", cwd=tmp_path).returncode == 1
    assert_one_line_error(run("verify", "s.json", cwd=tmp_path), 2, "no lockfile")


def test_allow_pickle_builds_pickle_experts_like_safetensors(tmp_path: Path, llama: Family) -> None:
    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    state = {}
    for f in llama.experts[0].glob("*.safetensors"):
        state.update(load_file(f))
    torch.save(state, pickled / "pytorch_model.bin")
    shutil.copy(llama.experts[0] / "config.json", pickled / "config.json")

    def spec(path: Path, expert: Path) -> Path:
        models = [
            {"path": str(p), "parameters": {"weight": 0.5, "density": 0.5}}
            for p in (expert, llama.experts[1])
        ]
        return write_spec(
            path,
            {
                "method": "ties",
                "base": str(llama.base),
                "models": models,
                "output": str(path.parent / path.stem),
            },
        )

    refused = run("build", spec(tmp_path / "p.json", pickled), cwd=tmp_path)
    assert_one_line_error(refused, 2, "--allow-pickle")
    assert run("build", tmp_path / "p.json", "--allow-pickle", cwd=tmp_path).returncode == 0
    assert run("build", spec(tmp_path / "s.json", llama.experts[0]), cwd=tmp_path).returncode == 0
    digests = [
        {
            n: t["digest"]
            for n, t in json.loads((tmp_path / f"{s}.lock.json").read_text())["targets"]["default"][
                "tensors"
            ].items()
        }
        for s in ("p", "s")
    ]
    assert digests[0] == digests[1]
