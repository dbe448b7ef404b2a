"""Source models: a Hugging Face directory (sharded with an index, or single-file)
or a single .safetensors file, opened by header only."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mergebuild.errors import InputError
from mergebuild.safetensors_io import SafetensorsFile, TensorInfo

INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass(frozen=True)
class ModelSource:
    """A model's safetensors files and where each tensor lives."""

    path: Path
    files: tuple[SafetensorsFile, ...]
    tensors: dict[str, TensorInfo]

    @property
    def directory(self) -> Path | None:
        """The model's directory (holding config and tokenizer files), if it is one."""
        return self.path if self.path.is_dir() else None

    @classmethod
    def open(cls, path: Path) -> ModelSource:
        """Open `path`; raise InputError if it is missing, empty or not safetensors."""
        if not path.exists():
            raise InputError(f"{path}: no such file or directory")
        files = [SafetensorsFile.open(p) for p in _safetensors_files(path)]
        tensors: dict[str, TensorInfo] = {}
        for f in files:
            for name, info in f.tensors.items():
                if name in tensors:
                    raise InputError(f"{path}: tensor {name!r} appears in more than one file")
                tensors[name] = info
        _check_index(path, tensors)
        return cls(path=path, files=tuple(files), tensors=tensors)


def _safetensors_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise InputError(f"{path}: pickle checkpoints are not supported; convert to safetensors")
        return [path]
    index = path / INDEX_NAME
    if index.is_file():
        names = sorted(set(_read_index(index).values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise InputError(f"{index}: lists missing shard {missing[0]!r}")
        return [path / n for n in names]
    found = sorted(path.glob("*.safetensors"))
    if not found:
        pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise InputError(f"{path}: holds only pickle checkpoints ({pickles[0]}); convert to safetensors")
        raise InputError(f"{path}: no .safetensors files")
    return found


def _read_index(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{index}: not a valid safetensors index ({e})") from e
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and "/" not in v and v not in ("", ".", "..")
        for k, v in weight_map.items()
    ):
        raise InputError(f"{index}: weight_map must map tensor names to shard file names")
    return weight_map


def _check_index(path: Path, tensors: dict[str, TensorInfo]) -> None:
    index = path / INDEX_NAME if path.is_dir() else None
    if index is None or not index.is_file():
        return
    for name, shard in _read_index(index).items():
        info = tensors.get(name)
        if info is None or info.path.name != shard:
            raise InputError(f"{index}: tensor {name!r} is not in shard {shard!r}")
