"""Coverage-guided fuzzing of mergebuild's untrusted-input parsers with atheris (libFuzzer).

Not part of the test suite (tests/test_fuzz.py holds the bounded hypothesis version).
Any exception other than a MergebuildError is a finding: atheris prints it with the
input that caused it and writes that input to ./crash-<sha1>.

    pip install atheris
    python bench/fuzz_atheris.py header -atheris_runs=200000
    python bench/fuzz_atheris.py spec -max_total_time=300
    python bench/fuzz_atheris.py pickle -max_total_time=300 corpus_dir/

Without a corpus directory, a fresh one seeded with valid inputs is used.
Targets: `header` (a safetensors file: header checks, then every tensor read back),
`spec` (a Jsonnet spec file through evaluation and the schema), `pickle` (a checkpoint
through the --allow-pickle path: weights-only load and conversion). Flags after the
target go to libFuzzer.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["mergebuild"]):
    from mergebuild.errors import MergebuildError
    from mergebuild.safetensors_io import SafetensorsFile, read_bytes
    from mergebuild.sources import ModelSource
    from mergebuild.spec import load

WORK = Path(tempfile.mkdtemp(prefix="mb-atheris-"))


def fuzz_header(data: bytes) -> None:
    path = WORK / "x.safetensors"
    path.write_bytes(data)
    try:
        f = SafetensorsFile.open(path)
    except MergebuildError:
        return
    for info in f.tensors.values():
        if len(read_bytes(info, 0, info.nbytes)) != info.nbytes:
            raise AssertionError(f"short read of {info.name!r}")


def fuzz_spec(data: bytes) -> None:
    path = WORK / "s.jsonnet"
    path.write_bytes(data)
    try:
        load(path, ext_vars={"k": "v"})
    except MergebuildError:
        return


def fuzz_pickle(data: bytes) -> None:
    path = WORK / "x.bin"
    path.write_bytes(data)
    try:
        source = ModelSource.open(path, allow_pickle=True, convert_dir=WORK / "converted")
    except MergebuildError:
        return
    for info in source.tensors.values():
        read_bytes(info, 0, info.nbytes)


TARGETS = {"header": fuzz_header, "spec": fuzz_spec, "pickle": fuzz_pickle}


def seed_corpus(target: str) -> Path:
    """A directory of valid inputs for `target`, so mutation starts from real structure."""
    import io

    import torch
    from safetensors.torch import save

    corpus = WORK / f"seeds-{target}"
    corpus.mkdir()
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.tensor(1.5, dtype=torch.bfloat16)}
    if target == "header":
        (corpus / "valid").write_bytes(save(tensors, metadata={"format": "pt"}))
    elif target == "pickle":
        for zip_format in (True, False):
            buf = io.BytesIO()
            torch.save(tensors, buf, _use_new_zipfile_serialization=zip_format)
            (corpus / f"zip-{zip_format}").write_bytes(buf.getvalue())
    else:
        (corpus / "json").write_text(
            '{"method": "ties", "base": "b", "models": [{"path": "m", "parameters": {"weight": 1, '
            '"density": 0.5}}], "output": "o"}'
        )
        (corpus / "jsonnet").write_text(
            "local mb = import 'mergebuild.libsonnet';\n"
            "mb.sweep('w', [0.5, 1], function(w)\n"
            "  mb.ties('b', [mb.model('m', {weight: w, density: 0.5})], 'o' + w))"
        )
    return corpus


def main() -> None:
    """Run one target: `python bench/fuzz_atheris.py TARGET [libFuzzer flags]`."""
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer flags]")
    name = sys.argv.pop(1)
    if not any(not arg.startswith("-") for arg in sys.argv[1:]):
        sys.argv.append(str(seed_corpus(name)))  # no corpus given: start from valid inputs
    atheris.Setup(sys.argv, TARGETS[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
