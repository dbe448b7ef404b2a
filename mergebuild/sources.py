"""Source models: a Hugging Face directory (sharded with an index, or single-file)
or a single .safetensors file, opened by header only.

Pickle checkpoints (.bin, .pt, .pth, .ckpt) are refused unless the caller opts
in (`allow_pickle`, the CLI's --allow-pickle). Even then they are loaded with
torch's weights-only unpickler, which refuses any pickle that would import or
call code, and converted once into a safetensors file under `convert_dir`
(keyed by the pickle's content digest, written to a temp file and renamed).
Everything downstream then reads safetensors byte ranges as usual.
"""

from __future__ import annotations

import json
import os
import pickle
import uuid
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

from mergebuild.errors import ExecutionError, InputError
from mergebuild.safetensors_io import DTYPE_NAMES, READ_CHUNK, SafetensorsFile, TensorInfo, header_for

INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
#: Hugging Face's names for pickle weights in a model directory.
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
PICKLE_SINGLE_NAME = "pytorch_model.bin"
#: Subdirectory of the cache directory that callers should pass as `convert_dir`.
CONVERTED_DIR = "converted"

_OPT_IN = "pass --allow-pickle to load weights only (no code runs), or convert to safetensors"


@dataclass(frozen=True)
class ModelSource:
    """A model's safetensors files and where each tensor lives."""

    path: Path
    files: tuple[SafetensorsFile, ...]
    tensors: dict[str, TensorInfo]
    #: The pickle files `files` were converted from (empty for safetensors sources).
    converted_from: tuple[Path, ...] = ()

    @property
    def directory(self) -> Path | None:
        """The model's directory (holding config and tokenizer files), if it is one."""
        return self.path if self.path.is_dir() else None

    @classmethod
    def open(cls, path: Path, allow_pickle: bool = False, convert_dir: Path | None = None) -> ModelSource:
        """Open `path`; raise InputError if it is missing, empty or not safetensors.

        With `allow_pickle`, a pickle checkpoint (a file, or a directory holding
        `pytorch_model.bin` or shards listed in `pytorch_model.bin.index.json`,
        and no safetensors) is loaded weights-only and converted into
        `convert_dir` (required then; e.g. `cache_dir / CONVERTED_DIR`).
        """
        if allow_pickle and convert_dir is None:
            raise ValueError("allow_pickle needs a convert_dir to write converted checkpoints to")
        if not path.exists():
            raise InputError(f"{path}: no such file or directory")
        pickles = _pickle_files(path)
        if pickles and not allow_pickle:
            what = (
                "is a pickle checkpoint"
                if path.is_file()
                else f"holds only pickle checkpoints ({pickles[0].name})"
            )
            raise InputError(f"{path}: {what}, refused by default; {_OPT_IN}")
        if pickles:
            assert convert_dir is not None
            paths = [convert_pickle(p, convert_dir) for p in pickles]
        else:
            paths = _safetensors_files(path)
        files = [SafetensorsFile.open(p) for p in paths]
        tensors: dict[str, TensorInfo] = {}
        for f in files:
            for name, info in f.tensors.items():
                if name in tensors:
                    raise InputError(f"{path}: tensor {name!r} appears in more than one file")
                tensors[name] = info
        if pickles:
            _check_pickle_index(path, pickles, files)
        else:
            _check_index(path, tensors)
        return cls(path=path, files=tuple(files), tensors=tensors, converted_from=tuple(pickles))


def _pickle_files(path: Path) -> list[Path]:
    """The pickle files that hold `path`'s weights, or [] if it is (or has) safetensors."""
    if path.is_file():
        return [path] if path.suffix in PICKLE_SUFFIXES else []
    if (path / INDEX_NAME).is_file() or any(path.glob("*.safetensors")):
        return []
    index = path / PICKLE_INDEX_NAME
    if index.is_file():
        return _index_shards(index)
    if (path / PICKLE_SINGLE_NAME).is_file():
        return [path / PICKLE_SINGLE_NAME]
    others = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if others:
        # Other pickles in a model directory are usually training state
        # (training_args.bin, optimizer.pt), not weights: never guess.
        raise InputError(
            f"{path}: holds only pickle checkpoints ({others[0]}) and no {PICKLE_SINGLE_NAME}; "
            "name the checkpoint file itself as the source, or convert to safetensors"
        )
    return []


def _index_shards(index: Path) -> list[Path]:
    """The shard files an index lists (each once, sorted); every one must exist."""
    names = sorted(set(_read_index(index).values()))
    missing = [n for n in names if not _is_file(index.parent / n)]
    if missing:
        raise InputError(f"{index}: lists missing shard {missing[0]!r}")
    return [index.parent / n for n in names]


def _is_file(path: Path) -> bool:
    """`path.is_file()`, False where the name itself is refused (too long, say): Python 3.11
    raises for those."""
    try:
        return path.is_file()
    except OSError:
        return False


def _safetensors_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    index = path / INDEX_NAME
    if index.is_file():
        return _index_shards(index)
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise InputError(f"{path}: no .safetensors files")
    return found


def _read_index(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{index}: not a valid safetensors index ({e})") from e
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str)
        and isinstance(v, str)
        and "/" not in v
        and "\0" not in v
        and v not in ("", ".", "..")
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


def _check_pickle_index(path: Path, pickles: list[Path], files: list[SafetensorsFile]) -> None:
    index = path / PICKLE_INDEX_NAME if path.is_dir() else None
    if index is None or not index.is_file():
        return
    shard_of = {name: p.name for p, f in zip(pickles, files, strict=True) for name in f.tensors}
    for name, shard in _read_index(index).items():
        if shard_of.get(name) != shard:
            raise InputError(f"{index}: tensor {name!r} is not in shard {shard!r}")


def file_digest(path: Path) -> str:
    """xxh3-128 of a file's bytes, streamed."""
    h = xxhash.xxh3_128()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(READ_CHUNK):
                h.update(chunk)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror}") from e
    return h.hexdigest()


def convert_pickle(path: Path, convert_dir: Path) -> Path:
    """The safetensors conversion of pickle checkpoint `path`, made once per content.

    It lives at `convert_dir/<xxh3-128 of the pickle>/<stem>.safetensors`, with
    tensors sorted by name and fixed metadata, so the same pickle converts to
    the same bytes on every machine (and a lockfile replays across machines).
    """
    target = convert_dir / file_digest(path) / f"{path.stem}.safetensors"
    if target.is_file():
        return target
    state = load_pickle_state_dict(path)
    entries = [(name, t.dtype, tuple(t.shape)) for name, t in sorted(state.items())]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:12]}")
        try:
            with open(tmp, "wb") as f:
                f.write(header_for(entries, {"format": "pt"}))
                for name, _, _ in entries:
                    f.write(_tensor_view(state[name]))
                f.flush()
                os.fsync(f.fileno())
            # Rename last: a reader (or a concurrent build) sees the whole file or none.
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as e:
        raise ExecutionError(f"{target}: cannot write the converted checkpoint: {e.strerror}") from e
    return target


def load_pickle_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict (tensor name -> tensor) with torch's weights-only unpickler.

    Anything else (a pickled module, a pickle that imports or calls code, a
    corrupt file) is an InputError; nothing in the file gets to run code.
    """
    try:
        # mmap keeps a large checkpoint out of memory; only the zip format supports it.
        # (is_zipfile itself raises BadZipFile on some corrupt archives.)
        mmap = zipfile.is_zipfile(path)
        with warnings.catch_warnings():
            # torch warns about pickle protocols on stderr; the error (if any) says enough.
            warnings.simplefilter("ignore")
            state = torch.load(path, weights_only=True, map_location="cpu", mmap=mmap)
    except pickle.UnpicklingError as e:
        raise InputError(f"{path}: refused by the weights-only unpickler: {_unpickler_reason(e)}") from None
    except MemoryError:
        raise
    except Exception as e:
        # A corrupt pickle can fail in any way; none of them is a bug of ours.
        raise InputError(
            f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {_first_line(e)})"
        ) from None
    if not isinstance(state, dict):
        raise InputError(f"{path}: holds a {type(state).__name__}, not a state dict (tensor name -> tensor)")
    if not state:
        raise InputError(f"{path}: holds no tensors")
    for name, value in state.items():
        if not isinstance(name, str):
            raise InputError(f"{path}: key {name!r} is not a tensor name (a string)")
        if not isinstance(value, torch.Tensor):
            raise InputError(
                f"{path}: {name!r} holds a {type(value).__name__}, not a tensor; "
                "only flat state dicts (tensor name -> tensor) are supported"
            )
        if value.layout != torch.strided or value.is_quantized:
            raise InputError(f"{path}: tensor {name!r} is sparse or quantized; not supported")
        if value.dtype not in DTYPE_NAMES:
            raise InputError(f"{path}: tensor {name!r} has unsupported dtype {value.dtype}")
    return state


def _tensor_view(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in safetensors layout (little-endian, C order), without a copy if contiguous."""
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else "no details"


def _unpickler_reason(error: BaseException) -> str:
    """The one useful sentence of torch's multi-paragraph weights-only error."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    boilerplate = (
        "Weights only load failed",
        "Check the documentation",
        "Please file an issue",
        "(1)",
        "(2)",
    )
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = next((line for line in lines if not line.startswith(boilerplate)), "unsupported content")
    # "Unsupported global: GLOBAL posix.system was not an allowed global by default. Please use ..."
    return reason.split(" Please use", 1)[0].rstrip(".") + " (only tensors and plain containers are allowed)"
