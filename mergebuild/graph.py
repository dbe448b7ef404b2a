"""Compile: a validated merge spec and its opened sources -> the work per output tensor.

The output holds the tensors of the base (of the first model when there is no
base). For each, the compiled node lists the source tensors it reads, the
parameters resolved for that tensor, and whether it is merged or copied:
non-floating tensors (integer buffers such as position_ids) are copied from the
base unchanged; a model that lacks a tensor is an error, unless the spec sets
`allow_missing`, in which case it takes no part in that tensor, and a tensor
held by fewer models than the method needs is copied from the base. A node's cache
key is derived from these and from its inputs' digests (`node_key`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import xxhash

from mergebuild import params as param_resolver
from mergebuild.errors import InputError, SpecError
from mergebuild.methods import get_method
from mergebuild.methods.base import Method, Scalar
from mergebuild.safetensors_io import TensorInfo
from mergebuild.sources import ModelSource
from mergebuild.spec import MergeSpec, Spec, canonical_json

Action = Literal["merge", "copy"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class TensorNode:
    """One output tensor: what it reads and how it is made."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    action: Action
    #: The tensor copied (action "copy") or the base's tensor (action "merge"), if any.
    base: TensorInfo | None
    #: (index in the spec's models list, tensor) for each model taking part.
    models: tuple[tuple[int, TensorInfo], ...]
    shared: tuple[tuple[str, Scalar], ...]
    per_model: tuple[tuple[tuple[str, Scalar], ...], ...]
    #: Why a tensor is copied rather than merged, for the build report.
    note: str = ""

    @property
    def inputs(self) -> tuple[TensorInfo, ...]:
        return ((self.base,) if self.base is not None else ()) + tuple(info for _, info in self.models)


@dataclass(frozen=True)
class CompiledTarget:
    """A target ready to plan and execute."""

    name: str
    spec: MergeSpec
    method: Method
    output: Path
    base: ModelSource | None
    models: tuple[ModelSource, ...]
    nodes: tuple[TensorNode, ...]

    @property
    def sources(self) -> tuple[ModelSource, ...]:
        """The base (if any), then the models."""
        return ((self.base,) if self.base is not None else ()) + self.models

    @property
    def reference(self) -> ModelSource:
        """The source whose config, tokenizer and tensor list the output follows."""
        return self.base if self.base is not None else self.models[0]


def compile_target(
    spec: Spec, name: str, open_source: Callable[[Path], ModelSource] = ModelSource.open
) -> CompiledTarget:
    """Open a target's sources and compile one node per output tensor."""
    target = spec.targets[name]
    method = get_method(target.method)
    base = open_source(spec.resolve(target.base.path)) if target.base else None
    models = tuple(open_source(spec.resolve(m.path)) for m in target.models)
    reference = base if base is not None else models[0]
    num_layers = _num_layers(reference)
    nodes = []
    for tensor_name in sorted(reference.tensors):
        nodes.append(_compile_tensor(target, method, tensor_name, base, models, reference, num_layers))
    return CompiledTarget(
        name=name,
        spec=target,
        method=method,
        output=spec.resolve(target.output),
        base=base,
        models=models,
        nodes=tuple(nodes),
    )


def _compile_tensor(
    target: MergeSpec,
    method: Method,
    name: str,
    base: ModelSource | None,
    models: tuple[ModelSource, ...],
    reference: ModelSource,
    num_layers: int,
) -> TensorNode:
    ref = reference.tensors[name]
    base_info = base.tensors[name] if base is not None else None
    if not ref.is_float:
        return TensorNode(name, ref.shape, ref.torch_dtype, "copy", ref, (), (), (), "not floating point")
    taking_part: list[tuple[int, TensorInfo]] = []
    for i, model in enumerate(models):
        info = model.tensors.get(name)
        if info is None:
            if not target.allow_missing:
                raise InputError(
                    f"tensor {name!r} is missing from {target.models[i].path} "
                    f"(present in {reference.path}); set allow_missing: true to merge it without that model"
                )
            continue
        if info.shape != ref.shape:
            raise InputError(
                f"tensor {name!r}: shape {list(info.shape)} in {target.models[i].path} "
                f"differs from {list(ref.shape)} in {reference.path}"
            )
        if not info.is_float:
            raise InputError(
                f"tensor {name!r}: dtype {info.dtype} in {target.models[i].path} is not floating point"
            )
        taking_part.append((i, info))
    out_dtype = _DTYPES[target.dtype] if target.dtype else ref.torch_dtype
    if len(taking_part) < method.min_models:
        if base_info is None:
            raise InputError(
                f"tensor {name!r}: {method.name} needs it in at least {method.min_models} models, "
                f"{len(taking_part)} have it"
            )
        return TensorNode(name, ref.shape, out_dtype, "copy", base_info, (), (), (), "missing from models")
    t = param_resolver.layer_position(name, num_layers)
    # Method-wide values of per-model parameters ride along too: methods that
    # treat the base as one more input read them (the base has no model entry).
    shared = _resolve(method, "method", (target.parameters,), "parameters", name, t) + tuple(
        (p.name, p.kind(value))
        for p in method.params
        if p.scope == "model" and (value := _lookup(target.parameters, p.name, name, t)) is not None
    )
    per_model = tuple(
        _resolve(
            method,
            "model",
            (target.models[i].parameters, target.parameters),
            f"models.{i}.parameters",
            name,
            t,
        )
        for i, _ in taking_part
    )
    problem = method.check_params(dict(shared), [dict(p) for p in per_model])
    if problem:
        raise SpecError(f"tensor {name!r}: {problem}")
    return TensorNode(name, ref.shape, out_dtype, "merge", base_info, tuple(taking_part), shared, per_model)


def _resolve(
    method: Method, scope: str, sources: tuple[dict, ...], where: str, name: str, t: float
) -> tuple[tuple[str, Scalar], ...]:
    """Values of the method's `scope` parameters for tensor `name`: the first of
    `sources` (in precedence order) that sets one, else the default."""
    values: list[tuple[str, Scalar]] = []
    for p in method.params:
        if p.scope != scope:
            continue
        found = (_lookup(parameters, p.name, name, t) for parameters in sources)
        value = next((v for v in found if v is not None), p.default)
        if value is None:
            raise SpecError(f"{where}.{p.name}: no value applies to tensor {name!r}")
        values.append((p.name, p.kind(value)))
    return tuple(values)


def _lookup(parameters: dict, key: str, name: str, t: float) -> Scalar | None:
    return param_resolver.resolve(parameters[key], name, t) if key in parameters else None


def config_layers(directory: Path) -> int | None:
    """The layer count a model directory's config.json gives (`num_hidden_layers`, `n_layer` or
    `num_layers`), or None when there is no such file or count."""
    try:
        config = json.loads((directory / "config.json").read_text())
        layers = config.get("num_hidden_layers") or config.get("n_layer") or config.get("num_layers")
    except (OSError, ValueError, AttributeError):
        return None
    return layers if isinstance(layers, int) and layers > 0 else None


def _num_layers(reference: ModelSource) -> int:
    """Layer count from the reference's config.json, else from its tensor names."""
    directory = reference.directory
    layers = None if directory is None else config_layers(directory)
    if layers is not None:
        return layers
    indices = [param_resolver.layer_index(n) for n in reference.tensors]
    found = [i for i in indices if i is not None]
    return max(found) + 1 if found else 0


def node_record(
    node: TensorNode,
    method: Method,
    seed: int,
    input_digests: tuple[bytes, ...],
    allocation: tuple[tuple[int, ...] | None, ...] = (),
) -> str:
    """The canonical record a node's key is the digest of: everything that can change its result.

    Operator name and version, canonical parameters, input digests, seed and
    output dtype; scheduling hints (threads, block size, device) stay out.
    Kept in the catalog so `explain` can say which part of a key changed.
    """
    record = {
        "op": [method.name, method.version] if node.action == "merge" else ["copy", 1],
        "shared": dict(node.shared),
        "models": [dict(p) for p in node.per_model],
        "inputs": [d.hex() for d in input_digests],
        "seed": seed,
        "dtype": str(node.dtype),
        "shape": list(node.shape),
    }
    if any(blocks is not None for blocks in allocation):
        # Under a budget: which expert blocks were read (absent at full read, so keys match).
        record["allocation"] = [None if b is None else list(b) for b in allocation]
    return canonical_json(record)


def node_key(
    node: TensorNode,
    method: Method,
    seed: int,
    input_digests: tuple[bytes, ...],
    allocation: tuple[tuple[int, ...] | None, ...] = (),
) -> str:
    """The content key of a node: the digest of its record."""
    return xxhash.xxh3_128_hexdigest(node_record(node, method, seed, input_digests, allocation).encode())


def expert_work_key(
    recipe: Mapping[str, Scalar | str],
    seed: int,
    expert: bytes,
    base: bytes,
    shape: tuple[int, ...],
    blocks: tuple[int, ...] | None = None,
) -> str:
    """The key of one expert's per-expert work (a sparsified delta): it does not involve the
    other experts, the weights or lambda, so those can change without recomputing it."""
    record = {
        "op": ["expert_work", 3],  # 2: the MBSD3 blob form; 3: fixed-point rescale sums
        "recipe": dict(recipe),
        "seed": seed,
        "expert": expert.hex(),
        "base": base.hex(),
        "shape": list(shape),
    }
    if blocks is not None:
        record["blocks"] = list(blocks)
    return xxhash.xxh3_128_hexdigest(canonical_json(record).encode())
