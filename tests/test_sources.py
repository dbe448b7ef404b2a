"""Opening sources: pickle checkpoints only on opt-in, loaded weights-only and converted once;
malicious or non-state-dict pickles refused; index files cannot point outside the model."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergebuild.build import BuildOptions, build
from mergebuild.errors import InputError
from mergebuild.lockfile import lock_path
from mergebuild.safetensors_io import bytes_to_tensor, read_bytes
from mergebuild.sources import CONVERTED_DIR, ModelSource, file_digest
from tests.conftest import write_spec
from tests.families import Family, load_tensors


def state_dict() -> dict[str, torch.Tensor]:
    """Every layout a real checkpoint has: several dtypes, a scalar, an empty tensor,
    a non-contiguous view and two names sharing one storage (tied weights)."""
    g = torch.Generator().manual_seed(0)
    embed = torch.randn(16, 8, generator=g).to(torch.bfloat16)
    return {
        "embed.weight": embed,
        "lm_head.weight": embed,  # tied: same storage
        "proj.weight": torch.randn(8, 12, generator=g).t(),  # non-contiguous
        "norm.weight": torch.randn(8, generator=g, dtype=torch.float16),
        "scale": torch.tensor(0.5, dtype=torch.float64),
        "position_ids": torch.arange(10, dtype=torch.int64)[None],
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
    }


def read_all(source: ModelSource) -> dict[str, torch.Tensor]:
    return {
        name: bytes_to_tensor(read_bytes(info, 0, info.nbytes), info.torch_dtype, info.shape)
        for name, info in source.tensors.items()
    }


class RunsCode:
    """Unpickling this calls os.system: the classic malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("layout", ["file", "directory"])
def test_pickle_is_refused_by_default_and_names_the_opt_in(tmp_path: Path, layout: str) -> None:
    (tmp_path / "m").mkdir()
    torch.save(state_dict(), tmp_path / "m" / "pytorch_model.bin")
    path = tmp_path / "m" / "pytorch_model.bin" if layout == "file" else tmp_path / "m"
    with pytest.raises(InputError, match="refused by default; pass --allow-pickle") as e:
        ModelSource.open(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("zip_format", [True, False])
def test_state_dict_pickle_converts_once_and_reads_back_exactly(tmp_path: Path, zip_format: bool) -> None:
    original = state_dict()
    path = tmp_path / "model.pt"
    torch.save(original, path, _use_new_zipfile_serialization=zip_format)
    convert = tmp_path / "cache" / CONVERTED_DIR
    source = ModelSource.open(path, allow_pickle=True, convert_dir=convert)
    assert source.path == path and source.converted_from == (path,)
    (converted,) = source.files
    assert converted.path == convert / file_digest(path) / "model.safetensors"
    assert set(source.tensors) == set(original)
    for name, tensor in read_all(source).items():
        assert tensor.dtype == original[name].dtype and torch.equal(tensor, original[name]), name
    # The reference library reads the conversion too (it is a plain safetensors file).
    assert torch.equal(load_file(converted.path)["proj.weight"], original["proj.weight"])
    # A second open reuses the conversion instead of rewriting it.
    stat = converted.path.stat()
    again = ModelSource.open(path, allow_pickle=True, convert_dir=convert)
    assert again.files[0].path == converted.path
    assert (stat.st_ino, stat.st_mtime_ns) == (
        converted.path.stat().st_ino,
        converted.path.stat().st_mtime_ns,
    )
    assert not [p for p in converted.path.parent.iterdir() if p.name.startswith(".")]  # no temp files


def test_conversion_is_deterministic_across_caches(tmp_path: Path) -> None:
    # Same pickle bytes, two caches (two machines): the same safetensors bytes,
    # so lockfile digests of a pickle source replay anywhere.
    torch.save(state_dict(), tmp_path / "a.bin")
    a = ModelSource.open(tmp_path / "a.bin", allow_pickle=True, convert_dir=tmp_path / "c1")
    b = ModelSource.open(tmp_path / "a.bin", allow_pickle=True, convert_dir=tmp_path / "c2")
    assert a.files[0].path.read_bytes() == b.files[0].path.read_bytes()


def test_sharded_pickle_directory_follows_its_index(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    tensors = state_dict()
    names = sorted(tensors)
    shards = {"pytorch_model-00001-of-00002.bin": names[:4], "pytorch_model-00002-of-00002.bin": names[4:]}
    for shard, members in shards.items():
        torch.save({n: tensors[n] for n in members}, model / shard)
    weight_map = {n: shard for shard, members in shards.items() for n in members}
    (model / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    # Training state next to the weights is not a weight file and must not be opened.
    with open(model / "training_args.bin", "wb") as f:
        pickle.dump(RunsCode(tmp_path / "never"), f)
    source = ModelSource.open(model, allow_pickle=True, convert_dir=tmp_path / "conv")
    assert source.directory == model and len(source.files) == 2
    assert {n: i.path.name for n, i in source.tensors.items()} == {
        n: s.replace(".bin", ".safetensors") for n, s in weight_map.items()
    }
    assert all(torch.equal(t, tensors[n]) for n, t in read_all(source).items())
    assert not (tmp_path / "never").exists()
    # An index that puts a tensor in the wrong shard is refused.
    weight_map[names[0]] = "pytorch_model-00002-of-00002.bin"
    (model / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(InputError, match=f"tensor '{names[0]}' is not in shard"):
        ModelSource.open(model, allow_pickle=True, convert_dir=tmp_path / "conv")


def test_directory_with_only_training_pickles_is_refused(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    torch.save({"lr": torch.tensor(0.1)}, tmp_path / "m" / "optimizer.pt")
    with pytest.raises(
        InputError, match=r"holds only pickle checkpoints \(optimizer.pt\) and no pytorch_model.bin"
    ):
        ModelSource.open(tmp_path / "m", allow_pickle=True, convert_dir=tmp_path / "conv")


@pytest.mark.parametrize(
    ("wrap", "reason"),
    [
        ("pickle protocol 2", "GLOBAL posix.system"),
        ("pickle protocol 5", "Unsupported operand"),  # refused even before it reaches the call
        ("torch.save", "GLOBAL posix.system"),
    ],
)
def test_malicious_pickle_is_refused_even_when_allowed(tmp_path: Path, wrap: str, reason: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    if wrap == "torch.save":
        torch.save({"w": torch.zeros(2), "x": RunsCode(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(RunsCode(marker), protocol=int(wrap[-1])))
    with pytest.raises(InputError, match=f"refused by the weights-only unpickler: .*{reason}") as e:
        ModelSource.open(path, allow_pickle=True, convert_dir=tmp_path / "conv")
    assert "\n" not in str(e.value)
    assert not marker.exists()
    assert not (tmp_path / "conv").exists()


def test_full_module_pickle_is_refused(tmp_path: Path) -> None:
    torch.save(torch.nn.Linear(4, 2), tmp_path / "module.bin")
    with pytest.raises(InputError, match=r"Unsupported global: GLOBAL torch\.nn\.modules\.linear\.Linear"):
        ModelSource.open(tmp_path / "module.bin", allow_pickle=True, convert_dir=tmp_path / "conv")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (torch.zeros(3), "holds a Tensor, not a state dict"),
        ({"state_dict": {"w": torch.zeros(3)}}, "'state_dict' holds a dict, not a tensor"),
        ({"w": torch.zeros(3), "step": 7}, "'step' holds a int, not a tensor"),
        ({3: torch.zeros(3)}, "key 3 is not a tensor name"),
        ({}, "holds no tensors"),
        ({"w": torch.zeros(3, dtype=torch.complex64)}, "unsupported dtype torch.complex64"),
        ({"w": torch.zeros(3).to_sparse()}, "sparse or quantized"),
    ],
)
def test_pickles_that_are_not_flat_state_dicts_are_refused(
    tmp_path: Path, content: object, message: str
) -> None:
    torch.save(content, tmp_path / "x.pt")
    with pytest.raises(InputError, match=message):
        ModelSource.open(tmp_path / "x.pt", allow_pickle=True, convert_dir=tmp_path / "conv")


def test_corrupt_pickle_is_an_input_error(tmp_path: Path) -> None:
    torch.save(state_dict(), tmp_path / "ok.bin")
    data = (tmp_path / "ok.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cut\.bin: not a readable PyTorch checkpoint"):
        ModelSource.open(tmp_path / "cut.bin", allow_pickle=True, convert_dir=tmp_path / "conv")


def test_allow_pickle_needs_a_conversion_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="convert_dir"):
        ModelSource.open(tmp_path, allow_pickle=True)


@pytest.mark.parametrize("shard", ["../other/model.safetensors", "/etc/model.safetensors", "..", ""])
def test_index_cannot_point_outside_the_model_directory(tmp_path: Path, shard: str) -> None:
    model = tmp_path / "m"
    model.mkdir()
    save_file({"w": torch.zeros(2)}, model / "model-00001-of-00001.safetensors")
    (tmp_path / "other").mkdir()
    save_file({"w": torch.zeros(2)}, tmp_path / "other" / "model.safetensors")
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
    with pytest.raises(InputError, match="weight_map must map tensor names to shard file names"):
        ModelSource.open(model)


def test_build_from_pickle_experts_matches_the_safetensors_build(tmp_path: Path, llama: Family) -> None:
    """A merge of weights-only-loaded pickle experts is bit-identical to the safetensors merge."""
    pickled = []
    for expert in llama.experts:
        directory = tmp_path / "pickled" / expert.name
        directory.mkdir(parents=True)
        torch.save(load_tensors(expert), directory / "pytorch_model.bin")
        shutil.copy(expert / "config.json", directory / "config.json")
        pickled.append(directory)

    def spec(experts: list[Path], output: str) -> dict:
        models = [{"path": str(p), "parameters": {"weight": 1.0, "density": 0.5}} for p in experts]
        return {"method": "ties", "base": str(llama.base), "models": models, "output": output}

    reference = write_spec(tmp_path / "ref.json", spec(list(llama.experts), "ref-out"))
    build(reference, BuildOptions(cache_dir=tmp_path / "cache"))
    from_pickles = write_spec(tmp_path / "pkl.json", spec(pickled, "pkl-out"))
    with pytest.raises(InputError, match="--allow-pickle"):
        build(from_pickles, BuildOptions(cache_dir=tmp_path / "cache"))
    build(from_pickles, BuildOptions(cache_dir=tmp_path / "cache", allow_pickle=True))
    tensors = {
        name: json.loads(lock_path(s).read_text())["targets"]["default"]["tensors"]
        for name, s in (("ref", reference), ("pkl", from_pickles))
    }
    assert {k: v["digest"] for k, v in tensors["ref"].items()} == {
        k: v["digest"] for k, v in tensors["pkl"].items()
    }
    assert len(list((tmp_path / "cache" / CONVERTED_DIR).iterdir())) == len(llama.experts)
