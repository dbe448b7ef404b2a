"""End-to-end builds: outputs load, lockfiles replay, failures publish nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergebuild import build as build_module
from mergebuild.build import BuildOptions, JsonnetArgs, build, verify
from mergebuild.errors import ExecutionError, InputError, LockMismatch
from mergebuild.lockfile import lock_path
from mergebuild.publish import MARKER
from tests.conftest import write_spec
from tests.families import Family


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def ties_spec(family: Family, output: Path, **extra: object) -> dict:
    return {
        "method": "ties",
        "base": str(family.base),
        "models": [
            {"path": str(p), "parameters": {"weight": w, "density": 0.5}}
            for p, w in zip(family.experts, (1.0, 0.7, 0.4), strict=False)
        ],
        "output": str(output),
        **extra,
    }


def options(tmp_path: Path, **kw: object) -> BuildOptions:
    return BuildOptions(cache_dir=tmp_path / "cache", **kw)  # type: ignore[arg-type]


def test_ties_build_loads_and_locks(tmp_path: Path, llama: Family) -> None:
    spec = write_spec(tmp_path / "s.json", ties_spec(llama, tmp_path / "out"))
    summary = build(spec, options(tmp_path))
    out = tmp_path / "out"
    assert (out / MARKER).is_file()
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    merged = load_dir(out)
    base = load_dir(llama.base)
    assert merged.keys() == base.keys()
    # Frozen embeddings merge to the base exactly; other tensors move.
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert not torch.equal(
        merged["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"]
    )
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    target = summary.targets[0]
    sources_bytes = sum(
        f.stat().st_size for d in (llama.base, *llama.experts) for f in d.glob("*.safetensors")
    )
    assert 0 < target.bytes_read <= sources_bytes
    assert target.tensors_merged == len(base)
    lock = json.loads(lock_path(spec).read_text())
    assert set(lock["targets"]["default"]["tensors"]) == set(base)
    assert len(lock["sources"]) == 4
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(
        model.state_dict()["model.layers.1.mlp.up_proj.weight"], merged["model.layers.1.mlp.up_proj.weight"]
    )
    assert AutoTokenizer.from_pretrained(out) is not None


def test_bert_keeps_integer_buffers_and_loads(tmp_path: Path, bert: Family) -> None:
    spec = write_spec(
        tmp_path / "s.json",
        {
            "method": "task_arithmetic",
            "base": str(bert.base),
            "models": [{"path": str(p), "parameters": {"weight": 0.5}} for p in bert.experts],
            "dtype": "float32",
            "output": str(tmp_path / "out"),
        },
    )
    build(spec, options(tmp_path))
    merged = load_dir(tmp_path / "out")
    base, experts = load_dir(bert.base), [load_dir(p) for p in bert.experts]
    assert merged["embeddings.position_ids"].dtype == torch.int64
    assert torch.equal(merged["embeddings.position_ids"], base["embeddings.position_ids"])
    name = "encoder.layer.0.attention.self.query.weight"
    expected = base[name] + sum(0.5 * (e[name] - base[name]) for e in experts)
    torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)
    from transformers import AutoModel

    assert AutoModel.from_pretrained(tmp_path / "out") is not None


def test_locked_rebuild_reproduces_and_detects_changed_input(tmp_path: Path, llama: Family) -> None:
    family = Family(
        base=llama.base, experts=tuple(Path(shutil.copytree(p, tmp_path / p.name)) for p in llama.experts)
    )
    spec = write_spec(tmp_path / "s.json", ties_spec(family, tmp_path / "out"))
    build(spec, options(tmp_path))
    first = json.loads(lock_path(spec).read_text())
    build(spec, options(tmp_path, locked=True))
    assert json.loads(lock_path(spec).read_text()) == first
    assert all(not r.problems for r in verify(spec, JsonnetArgs()))
    # Change one tensor of one expert, keeping the file's size.
    shard = sorted(family.experts[1].glob("*.safetensors"))[0]
    tensors = load_file(shard)
    name = sorted(tensors)[-1]
    tensors[name] = tensors[name] + 1
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(
        LockMismatch, match=f"source {family.experts[1].name} differs from the lockfile at tensors.{name}"
    ):
        build(spec, options(tmp_path, locked=True))
    # Nothing was published: the output still matches the lockfile.
    assert all(not r.problems for r in verify(spec, JsonnetArgs()))


def test_locked_refuses_a_changed_spec(tmp_path: Path, llama: Family) -> None:
    spec = write_spec(tmp_path / "s.json", ties_spec(llama, tmp_path / "out"))
    build(spec, options(tmp_path))
    write_spec(spec, ties_spec(llama, tmp_path / "out", seed=3))
    with pytest.raises(LockMismatch, match="spec evaluates differently"):
        build(spec, options(tmp_path, locked=True))


def test_verify_names_a_corrupted_output_file(tmp_path: Path, llama: Family) -> None:
    spec = write_spec(tmp_path / "s.json", ties_spec(llama, tmp_path / "out", shard_size="200KB"))
    build(spec, options(tmp_path))
    shards = sorted((tmp_path / "out").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    data = bytearray(shards[0].read_bytes())
    data[-1] ^= 0xFF
    shards[0].write_bytes(bytes(data))
    (result,) = verify(spec, JsonnetArgs())
    assert result.problems == [f"{shards[0].name}: content differs from the lockfile"]


def test_targets_share_sources_and_lock_together(tmp_path: Path, llama: Family) -> None:
    spec = write_spec(
        tmp_path / "s.json",
        {
            "targets": {
                f"w{w}": ties_spec(llama, tmp_path / f"out{w}", parameters={"lambda": w}) for w in (1, 2)
            }
        },
    )
    summary = build(spec, options(tmp_path))
    assert [t.name for t in summary.targets] == ["w1", "w2"]
    lock = json.loads(lock_path(spec).read_text())
    assert set(lock["targets"]) == {"w1", "w2"}
    a, b, base = load_dir(tmp_path / "out1"), load_dir(tmp_path / "out2"), load_dir(llama.base)
    name = "model.layers.2.self_attn.q_proj.weight"
    # lambda scales the merged delta.
    torch.testing.assert_close(
        (b[name].float() - base[name].float()),
        2 * (a[name].float() - base[name].float()),
        rtol=0.02,
        atol=2e-3,
    )
    # Building one target keeps the other's lock entry.
    build(spec, options(tmp_path, target="w2"))
    assert set(json.loads(lock_path(spec).read_text())["targets"]) == {"w1", "w2"}


def test_single_file_sources_and_missing_tensors(tmp_path: Path, llama: Family) -> None:
    base, experts = load_dir(llama.base), [load_dir(p) for p in llama.experts]
    name = "model.layers.0.mlp.up_proj.weight"
    del experts[0][name]
    files = []
    for i, tensors in enumerate([base, *experts]):
        files.append(tmp_path / f"m{i}.safetensors")
        save_file(tensors, files[-1])
    spec = write_spec(
        tmp_path / "s.json",
        {
            "method": "task_arithmetic",
            "base": files[0].name,
            "models": [{"path": f.name, "parameters": {"weight": 1.0}} for f in files[1:]],
            "dtype": "float32",
            "output": "out",
        },
    )
    with pytest.raises(InputError, match=f"tensor '{name}' is missing from m1.safetensors"):
        build(spec, options(tmp_path))
    spec_dict = json.loads(spec.read_text())
    write_spec(spec, {**spec_dict, "allow_missing": True})
    build(spec, options(tmp_path))
    merged = load_dir(tmp_path / "out")
    # The expert lacking the tensor takes no part in it.
    expected = base[name].float() + sum(e[name].float() - base[name].float() for e in experts[1:])
    torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)


def test_foreign_output_directory_is_not_replaced_without_force(tmp_path: Path, llama: Family) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    spec = write_spec(tmp_path / "s.json", ties_spec(llama, tmp_path / "out"))
    with pytest.raises(InputError, match="not made by mergebuild"):
        build(spec, options(tmp_path))
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"
    build(spec, options(tmp_path, force=True))
    assert not (tmp_path / "out" / "precious.txt").exists() and (tmp_path / "out" / MARKER).is_file()


def test_failed_build_publishes_nothing(
    tmp_path: Path, llama: Family, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = write_spec(tmp_path / "s.json", ties_spec(llama, tmp_path / "out"))
    real = build_module.execute

    def failing(target, plan, reader, write, on_tensor=None, **kwargs):  # type: ignore[no-untyped-def]
        def write_then_fail(name: str, tensor: torch.Tensor):  # type: ignore[no-untyped-def]
            if name.startswith("model.layers.2"):
                raise OSError(28, "No space left on device")
            return write(name, tensor)

        return real(target, plan, reader, write_then_fail, on_tensor, **kwargs)

    monkeypatch.setattr(build_module, "execute", failing)
    with pytest.raises(ExecutionError, match="No space left on device"):
        build(spec, options(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "s.json"]


def test_dry_run_plans_without_writing(tmp_path: Path, llama: Family) -> None:
    spec = write_spec(tmp_path / "s.json", ties_spec(llama, tmp_path / "out"))
    summary = build(spec, options(tmp_path, dry_run=True))
    assert summary.targets[0].bytes_to_read > 0 and summary.targets[0].bytes_read == 0
    assert not (tmp_path / "out").exists() and not lock_path(spec).exists()


@pytest.mark.parametrize("method", ["dare_ties", "della_linear"])
def test_random_methods_do_not_depend_on_block_size(tmp_path: Path, llama: Family, method: str) -> None:
    outputs = []
    for block_size in ("1KiB", "16MiB"):
        spec_dict = ties_spec(llama, tmp_path / f"out-{block_size}", block_size=block_size, seed=7)
        spec_dict["method"] = method
        build(write_spec(tmp_path / f"{block_size}.json", spec_dict), options(tmp_path))
        outputs.append(load_dir(tmp_path / f"out-{block_size}"))
    assert outputs[0].keys() == outputs[1].keys()
    assert all(torch.equal(outputs[0][k], outputs[1][k]) for k in outputs[0])


def test_nan_in_an_input_is_refused(tmp_path: Path, llama: Family) -> None:
    base, expert = load_dir(llama.base), load_dir(llama.experts[0])
    name = "model.layers.1.mlp.up_proj.weight"
    expert[name][0, 0] = float("nan")
    save_file(base, tmp_path / "b.safetensors")
    save_file(expert, tmp_path / "e.safetensors")
    spec = write_spec(
        tmp_path / "s.json",
        {
            "method": "task_arithmetic",
            "base": "b.safetensors",
            "models": [{"path": "e.safetensors", "parameters": {"weight": 1}}],
            "output": "out",
        },
    )
    with pytest.raises(InputError, match=f"tensor '{name}' holds NaN or Inf"):
        build(spec, options(tmp_path))
    assert not (tmp_path / "out").exists()


def test_debris_of_killed_builds_is_swept(tmp_path: Path, llama: Family) -> None:
    import os
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    leftovers = [tmp_path / f".out.staging-{dead.pid}-x", tmp_path / f".out.old-{dead.pid}-x"]
    live = tmp_path / f".out.staging-{os.getpid()}-busy"
    for path in [*leftovers, live]:
        path.mkdir()
    spec = write_spec(tmp_path / "s.json", ties_spec(llama, tmp_path / "out"))
    build(spec, options(tmp_path))
    assert not any(p.exists() for p in leftovers)
    assert live.exists()  # a running build's staging directory is not touched


def test_source_changed_during_the_build_fails_and_publishes_nothing(
    tmp_path: Path, llama: Family, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from mergebuild import execute as execute_module

    models = tmp_path / "models"
    shutil.copytree(llama.experts[0], models / "e0")
    spec_dict = ties_spec(llama, tmp_path / "out")
    spec_dict["models"][0]["path"] = str(models / "e0")
    spec = write_spec(tmp_path / "s.json", spec_dict)
    real = execute_module.read_bytes
    touched: list[Path] = []

    def read_then_rewrite(info, start, end, **kwargs):  # type: ignore[no-untyped-def]
        data = real(info, start, end, **kwargs)
        if info.path.parent == models / "e0" and not touched:
            # Another process rewrites the checkpoint while the build is reading it.
            st = info.path.stat()
            os.utime(info.path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
            touched.append(info.path)
        return data

    monkeypatch.setattr(execute_module, "read_bytes", read_then_rewrite)
    with pytest.raises(ExecutionError, match="changed while the build was reading it"):
        build(spec, options(tmp_path))
    assert touched
    assert not (tmp_path / "out").exists() and not lock_path(spec).exists()
    assert not list(tmp_path.glob(".out.staging-*"))
