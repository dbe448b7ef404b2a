"""Fuzzing the parsers that read untrusted input: only mergebuild's own errors may come out.

Spec files (Jsonnet/JSON text, and JSON objects shaped like specs), safetensors files
mutated from a valid one, model index files, and pickle checkpoints mutated from valid
ones (opened with the --allow-pickle path). tests/test_safetensors_io.py fuzzes the
header from scratch; here the inputs start from valid files, so they get deeper.
Bounded and derandomized: a few seconds each, the same examples every run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from mergebuild.build import BuildOptions, build
from mergebuild.errors import MergebuildError
from mergebuild.methods import REGISTRY
from mergebuild.methods.base import Method, ParamSpec
from mergebuild.safetensors_io import SafetensorsFile, bytes_to_tensor, read_bytes
from mergebuild.sources import ModelSource
from mergebuild.spec import load

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# --------------------------------------------------------------------------------------------
# Spec text.

TOKENS = [
    "{", "}", "[", "]", "(", ")", ":", "::", ",", ";", "=", "+", "-", "*", "/", "%", "==", "!", ".",
    "local", "x", "f", "self", "$", "super", "if", "then", "else", "for", "in", "function", "error",
    "assert", "null", "true", "false", "import", "importstr", "importbin", "0", "1", "-1", "0.5",
    "1e308", "1e999", "9007199254740993", "'ties'", "'linear'", "'slerp'", "'m'", "'out'", "'.'",
    "'../x'", "'/etc/hostname'", "'mergebuild.libsonnet'", "'\\u0000'", "method", "models", "base",
    "output", "parameters", "weight", "density", "targets", "seed", "block_size", "'16MiB'", "dtype",
    "std.extVar('k')", "std.parseJson('[')", "std.range(1, 3)", "std.length", "\"a\"", "|||", "//", "#",
]  # fmt: skip

VALID = (
    "{method: 'ties', base: 'b', models: [{path: 'm', parameters: {weight: 1, density: 0.5}}], output: 'o'}"
)

spec_text = st.one_of(
    st.text(max_size=200),
    st.lists(st.sampled_from(TOKENS) | st.text(max_size=3), max_size=40).map(" ".join),
    # Mutations of a valid spec: a deleted span and an inserted token.
    st.tuples(st.integers(0, len(VALID)), st.integers(0, 8), st.sampled_from(TOKENS)).map(
        lambda c: VALID[: c[0]] + c[2] + VALID[c[0] + c[1] :]
    ),
)


@FUZZ
@given(text=spec_text | st.binary(max_size=100), as_json=st.booleans())
def test_spec_text_gives_only_mergebuild_errors(tmp_path: Path, text: str | bytes, as_json: bool) -> None:
    path = tmp_path / ("s.json" if as_json else "s.jsonnet")
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", errors="surrogatepass"))
    try:
        spec = load(path, ext_vars={"k": "v"})
    except MergebuildError as e:
        assert str(e) and "Traceback" not in str(e)
        return
    assert spec.targets


# --------------------------------------------------------------------------------------------
# JSON objects shaped like specs.

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.sampled_from(["", " ", ".", "..", "m", "b", "o", "a\0b", "16MiB", "1e999", "9" * 400, "/"]),
    st.text(max_size=6),
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)
param_names = st.sampled_from(
    ["weight", "density", "gamma", "epsilon", "lambda", "normalize", "rescale", "t", "int8_mask", "x"]
)
param_value = st.one_of(
    st.integers(-3, 3),
    st.floats(-2, 2, allow_nan=False),
    st.floats(allow_nan=False),
    st.booleans(),
    st.lists(st.floats(-1, 2, allow_nan=False), max_size=4),
    st.lists(
        st.fixed_dictionaries({"value": st.floats(0, 1)}, optional={"filter": st.text(max_size=4)}),
        max_size=3,
    ),
    values,
)
parameters = st.dictionaries(param_names, param_value, max_size=4)
good_model = st.sampled_from(["m", "n"]) | st.fixed_dictionaries(
    {"path": st.sampled_from(["m", "n", "b"])}, optional={"parameters": parameters}
)
model_entry = st.one_of(good_model, good_model, st.sampled_from(["", "a\0b", "../x", "nowhere"]), values)
#: Mostly well-formed merges (real methods, real model names) with a few odd fields, so that
#: examples get past the first schema check and reach parameter checks and compilation.
merge = st.fixed_dictionaries(
    {"method": st.sampled_from(sorted(REGISTRY)), "models": st.lists(model_entry, max_size=4)},
    optional={
        "base": st.sampled_from(["b", "m"]) | model_entry,
        "parameters": parameters,
        "dtype": st.sampled_from(["float32", "bfloat16", "int8"]) | scalars,
        "seed": st.integers(-(2**65), 2**65) | scalars,
        "budget": st.fixed_dictionaries({}, optional={"fraction": scalars, "bytes": scalars}),
        "block_size": st.sampled_from(["16MiB", "1KiB", 1, "0", "-1", "1e3", "9" * 400]) | scalars,
        "shard_size": st.sampled_from(["5GB", 1, "x"]) | scalars,
        "tokenizer": st.sampled_from(["b", "."]) | scalars,
        "allow_missing": st.booleans() | scalars,
        "output": st.sampled_from(["o", ".", "..", "m", "b", "", "o\0"]) | scalars,
    },
)
garbled_merge = st.builds(
    lambda m, k, v: {**m, k: v}, merge, st.sampled_from(["method", "models", "parameters", "extra"]), values
)
spec_objects = st.one_of(
    merge,
    garbled_merge,
    st.fixed_dictionaries({"targets": st.dictionaries(st.text(max_size=4), merge, max_size=3) | values}),
    values,
)


@settings(FUZZ, max_examples=100)  # each load runs the Jsonnet VM (~50 ms)
@given(obj=spec_objects)
def test_spec_objects_give_only_mergebuild_errors(tmp_path: Path, obj: object) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps(obj))
    try:
        load(path)
    except MergebuildError:
        return


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directories b, m, n and o: a base and three experts, with layers, a norm and an integer buffer."""
    root = tmp_path_factory.mktemp("tiny")
    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.w": torch.randn(4, 3, generator=g) for i in range(3)}
    base |= {
        "model.norm.weight": torch.ones(3),
        "ids": torch.arange(3),
        "lm_head.weight": torch.randn(5, 3, generator=g),
    }
    for name, scale in (("b", 0.0), ("m", 0.1), ("n", -0.2), ("o", 0.3)):
        (root / name).mkdir()
        tensors = {
            k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in base.items()
        }
        save_file(tensors, root / name / "model.safetensors")
    return root


def param_values(spec: ParamSpec) -> st.SearchStrategy:
    """Values for one parameter: mostly in range, sometimes at or past its bounds; as a scalar,
    a gradient over layers or a list of filter rules."""
    if spec.kind is bool:
        scalar: st.SearchStrategy = st.booleans()
    elif spec.kind is int:
        scalar = st.integers(-1, 12)
    else:
        scalar = st.sampled_from([0, 1, 0.5, 1e-9, -0.25, 1.25]) | st.floats(-0.5, 1.5, allow_nan=False)
    rule = st.fixed_dictionaries(
        {"value": scalar}, optional={"filter": st.sampled_from(["layers.1", "norm", "w", "zzz"])}
    )
    return st.one_of(
        scalar, scalar, st.lists(scalar, min_size=1, max_size=4), st.lists(rule, min_size=1, max_size=3)
    )


def params_for(method: Method, scope: str) -> st.SearchStrategy:
    specs = [p for p in method.params if p.scope == scope or (scope == "method" and p.scope == "model")]
    if not specs:
        return st.just({})
    return st.fixed_dictionaries({}, optional={p.name: param_values(p) for p in specs})


def plausible_merge(name: str) -> st.SearchStrategy:
    method = REGISTRY[name]
    most = method.max_models if method.max_models is not None else 3
    model = st.fixed_dictionaries(
        {"path": st.sampled_from(["m", "n", "o"])}, optional={"parameters": params_for(method, "model")}
    )
    return st.fixed_dictionaries(
        {
            "method": st.just(name),
            "models": st.lists(model, min_size=method.min_models, max_size=max(method.min_models, most)),
            "parameters": params_for(method, "method"),
        },
        optional={
            "base": st.just("b"),
            "dtype": st.sampled_from(["float32", "bfloat16", "float16"]),
            "seed": st.integers(0, 2**63 - 1),
            "block_size": st.sampled_from([1, 8, "1KiB"]),
            "allow_missing": st.booleans(),
        },
    ).map(lambda spec: {**spec, "base": "b"} if method.base_policy == "required" else spec)


@settings(FUZZ, max_examples=100)
@given(obj=st.sampled_from(sorted(REGISTRY)).flatmap(plausible_merge))
def test_plausible_specs_build_or_fail_cleanly(tiny_models: Path, obj: dict) -> None:
    """Specs shaped for their method go all the way: open sources, compile, execute, publish.
    Whatever the parameter values, the result is a build or one of our errors."""
    path = tiny_models / "s.json"
    path.write_text(json.dumps({**obj, "output": "out"}))
    try:
        build(path, BuildOptions(cache_dir=tiny_models / "cache"))
    except MergebuildError:
        return
    assert (tiny_models / "out" / "model.safetensors").is_file()


# --------------------------------------------------------------------------------------------
# Safetensors files and index files, mutated from valid ones.


def valid_safetensors() -> bytes:
    tensors = {
        "a": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "b": torch.arange(5, dtype=torch.int64),
        "c": torch.tensor(1.5, dtype=torch.bfloat16),
        "d": torch.zeros(0, 2),
    }
    from safetensors.torch import save

    return save(tensors, metadata={"format": "pt"})


VALID_SAFETENSORS = valid_safetensors()

mutations = st.lists(
    st.tuples(
        st.sampled_from(["set", "insert", "delete", "truncate"]),
        st.integers(0, 2**16),
        st.binary(min_size=1, max_size=4),
    ),
    min_size=1,
    max_size=4,
)


def mutate(data: bytes, edits: list[tuple[str, int, bytes]]) -> bytes:
    out = bytearray(data)
    for kind, at, chunk in edits:
        i = at % (len(out) + 1)
        if kind == "set":
            out[i : i + len(chunk)] = chunk
        elif kind == "insert":
            out[i:i] = chunk
        elif kind == "delete":
            del out[i : i + len(chunk)]
        else:
            del out[i:]
    return bytes(out)


@FUZZ
@given(edits=mutations)
def test_mutated_safetensors_open_and_read_or_fail_cleanly(tmp_path: Path, edits: list) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(mutate(VALID_SAFETENSORS, edits))
    try:
        f = SafetensorsFile.open(path)
    except MergebuildError:
        return
    # Whatever the header now says was checked against the file: every tensor reads whole.
    for info in f.tensors.values():
        data = read_bytes(info, 0, info.nbytes)
        assert len(data) == info.nbytes == math.prod(info.shape) * info.itemsize
        assert tuple(bytes_to_tensor(data, info.torch_dtype, info.shape).shape) == info.shape


@FUZZ
@given(weight_map=values, extra=st.booleans())
def test_index_files_give_only_mergebuild_errors(tmp_path: Path, weight_map: object, extra: bool) -> None:
    model = tmp_path / "m"
    model.mkdir(exist_ok=True)
    (model / "model.safetensors").write_bytes(VALID_SAFETENSORS)
    body = {"weight_map": weight_map} if extra else weight_map
    (model / "model.safetensors.index.json").write_text(json.dumps(body))
    try:
        source = ModelSource.open(model)
    except MergebuildError:
        return
    assert all(info.path.parent == model for info in source.tensors.values())


# --------------------------------------------------------------------------------------------
# Pickle checkpoints (the --allow-pickle path), mutated from valid ones.


def valid_pickles() -> dict[str, bytes]:
    import io

    state = {"a": torch.randn(4, 3), "b": torch.arange(5), "c": torch.ones(2, dtype=torch.bfloat16)}
    out = {}
    for name, zip_format in (("zip", True), ("legacy", False)):
        buf = io.BytesIO()
        torch.save(state, buf, _use_new_zipfile_serialization=zip_format)
        out[name] = buf.getvalue()
    return out


VALID_PICKLES = valid_pickles()


@FUZZ
@given(kind=st.sampled_from(sorted(VALID_PICKLES)), edits=mutations)
def test_mutated_pickles_give_only_mergebuild_errors(tmp_path: Path, kind: str, edits: list) -> None:
    path = tmp_path / "x.bin"
    path.write_bytes(mutate(VALID_PICKLES[kind], edits))
    try:
        source = ModelSource.open(path, allow_pickle=True, convert_dir=tmp_path / "conv")
    except MergebuildError:
        return
    for info in source.tensors.values():
        assert len(read_bytes(info, 0, info.nbytes)) == info.nbytes
