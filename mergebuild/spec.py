"""Spec evaluation (Jsonnet -> JSON) and validation (JSON -> frozen models).

Imports are confined to the spec's directory tree and the bundled
`mergebuild.libsonnet`; every imported file's digest is recorded for the
lockfile. Schema errors name the field path; Jsonnet errors name file:line:col.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import _jsonnet
import xxhash
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from mergebuild.errors import InputError, SpecError

if TYPE_CHECKING:
    from mergebuild.methods.base import Method

LIBRARY_NAME = "mergebuild.libsonnet"
LIBRARY_PATH = Path(__file__).resolve().parent / LIBRARY_NAME

_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip


def parse_size(value: object) -> int:
    """Bytes from an int or a string such as '16MiB' or '4GB'."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
        if not m or m.group(2).lower() not in _SIZE_UNITS:
            raise ValueError(f"not a size: {value!r} (use e.g. '16MiB', '4GB' or a number of bytes)")
        number = float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
        # A long digit string parses to inf; int(inf) would raise OverflowError, not ValueError.
        if not math.isfinite(number):
            raise ValueError(f"not a size: {value!r} is too large")
        size = int(number)
    else:
        raise ValueError("must be a number of bytes or a string such as '16MiB'")
    if size <= 0:
        raise ValueError("must be positive")
    return size


def env_size(name: str, default: int) -> int:
    """A size setting from environment variable `name` (e.g. '20GB'), or `default` when unset."""
    raw = os.environ.get(name)
    try:
        return parse_size(raw) if raw else default
    except ValueError as e:
        raise InputError(f"{name}: {e}") from e


ByteSize = Annotated[int, BeforeValidator(parse_size)]


def _check_path(value: str) -> str:
    # A NUL byte cannot be in a file name: os calls would raise ValueError mid-build.
    if "\0" in value:
        raise ValueError("a path cannot contain a NUL character")
    if not value.strip():
        raise ValueError("a path cannot be empty")
    return value


SpecPath = Annotated[str, AfterValidator(_check_path)]
#: Seeds go into random streams as signed 64-bit integers.
Seed = Annotated[StrictInt, Field(ge=-(2**63), lt=2**63)]
Number = StrictInt | StrictFloat
Gradient = Annotated[list[Number], Field(min_length=1)]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FilterRule(_Frozen):
    """`{filter: 'substring', value: ...}`: applies to tensors whose name contains `filter`."""

    filter: str | None = None
    value: StrictBool | Number | Gradient


ParamValue = StrictBool | Number | Gradient | Annotated[list[FilterRule], Field(min_length=1)]


class ModelEntry(_Frozen):
    """One input model: a path and its own parameters."""

    path: SpecPath
    parameters: dict[str, ParamValue] = {}

    @model_validator(mode="before")
    @classmethod
    def _from_path(cls, data: object) -> object:
        return {"path": data} if isinstance(data, str) else data


class Budget(_Frozen):
    """A read budget: a fraction of the full expert bytes, or a byte count."""

    fraction: float | None = Field(default=None, gt=0, le=1)
    bytes: ByteSize | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Budget:
        if (self.fraction is None) == (self.bytes is None):
            raise ValueError("give exactly one of fraction or bytes")
        return self


class MergeSpec(_Frozen):
    """One merge (DESIGN.md section 2)."""

    method: str
    base: ModelEntry | None = None
    models: list[ModelEntry] = []
    parameters: dict[str, ParamValue] = {}
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    seed: Seed = 0
    budget: Budget | None = None
    block_size: ByteSize = 16 * 2**20
    shard_size: ByteSize = 5 * 10**9
    tokenizer: SpecPath | None = None
    #: Let a model that lacks a tensor sit that tensor out instead of failing.
    allow_missing: StrictBool = False
    output: SpecPath

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        from mergebuild.methods import REGISTRY  # torch comes with it: not needed for an up-to-date check

        if v not in REGISTRY:
            raise ValueError(f"unknown method {v!r}; known: {', '.join(sorted(REGISTRY))}")
        return v

    @model_validator(mode="after")
    def _fits_method(self) -> MergeSpec:
        from mergebuild.methods import REGISTRY

        method = REGISTRY[self.method]
        if self.budget is not None and not method.budgeted:
            raise ValueError(
                f"budget: {self.method!r} does not add deltas to a base; budgets apply to task_arithmetic, "
                "ties, dare_*, breadcrumbs* and della*"
            )
        if method.base_policy == "required" and self.base is None:
            raise ValueError(f"method {self.method!r} needs a base model")
        if self.base is None and not self.models:
            raise ValueError(f"method {self.method!r} needs a base or a model to read")
        count = len(self.models)
        if count < method.min_models or (method.max_models is not None and count > method.max_models):
            wanted = (
                f"exactly {method.min_models}"
                if method.max_models == method.min_models
                else f"at least {method.min_models}"
                + (f" and at most {method.max_models}" if method.max_models else "")
            )
            raise ValueError(f"method {self.method!r} takes {wanted} models, got {count}")
        if self.base is not None and self.base.parameters:
            raise ValueError("the base takes no parameters; put them under models or parameters")
        _check_params(method, self.parameters, "parameters", per_model=False)
        for i, entry in enumerate(self.models):
            _check_params(method, entry.parameters, f"models.{i}.parameters", per_model=True)
        for spec in method.params:
            if spec.default is not None or spec.name in self.parameters:
                continue
            if spec.scope == "method":
                raise ValueError(f"parameters.{spec.name}: required by {self.method!r}")
            for i, entry in enumerate(self.models):
                if spec.name not in entry.parameters:
                    raise ValueError(
                        f"models.{i}.parameters.{spec.name}: required by {self.method!r} "
                        "(set it per model or in parameters)"
                    )
        return self


def _check_params(method: Method, params: dict[str, ParamValue], where: str, per_model: bool) -> None:
    for name, value in params.items():
        spec = method.param_spec(name)
        if spec is None:
            known = ", ".join(p.name for p in method.params) or "none"
            raise ValueError(
                f"{where}.{name}: {method.name!r} takes no parameter {name!r} (it takes: {known})"
            )
        if per_model and spec.scope == "method":
            raise ValueError(f"{where}.{name}: {name!r} is method-wide; set it under parameters")
        for scalar in _scalars(value):
            problem = spec.check(scalar)
            if problem:
                raise ValueError(f"{where}.{name}: {problem}, got {scalar!r}")


def _scalars(value: ParamValue) -> list[bool | int | float]:
    if isinstance(value, list):
        out: list[bool | int | float] = []
        for item in value:
            out.extend(_scalars(item.value) if isinstance(item, FilterRule) else [item])
        return out
    return [value]


@dataclass(frozen=True)
class Spec:
    """An evaluated, validated spec file: its targets and what it was made from."""

    path: Path
    evaluated: dict
    targets: dict[str, MergeSpec]
    #: Digest of every imported Jsonnet file (relative path or library name -> hex).
    imports: dict[str, str] = field(default_factory=dict)

    @property
    def directory(self) -> Path:
        return self.path.parent

    @property
    def digest(self) -> str:
        """Digest of the evaluated spec's canonical JSON."""
        return xxhash.xxh3_128_hexdigest(canonical_json(self.evaluated).encode())

    def resolve(self, path: str) -> Path:
        """A spec path, relative to the spec's directory.

        Symbolic links are resolved in the parent only: the last component stays
        the one the spec names, so an output that is a symlink is seen (and
        refused) as one, instead of silently replacing the directory it points to.
        """
        if Path(path).is_absolute():
            return Path(path)
        joined = self.directory / path
        if joined.name in ("", "..") or joined == self.directory:
            return joined.resolve()
        return joined.parent.resolve() / joined.name


def canonical_json(value: object) -> str:
    """Compact JSON with sorted keys: equal values give equal strings."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass
class _Importer:
    """Jsonnet import callback confined to `root` and the bundled library."""

    root: Path
    digests: dict[str, str] = field(default_factory=dict)

    def __call__(self, directory: str, rel: str) -> tuple[str, bytes]:
        if rel == LIBRARY_NAME:
            target = LIBRARY_PATH
        else:
            try:
                target = (Path(directory) / rel).resolve()
            except (OSError, ValueError) as e:
                raise RuntimeError(f"cannot import {rel!r}: {e}") from e
            # Only the library file itself, not the package directory around it.
            if not (target.is_relative_to(self.root) or target == LIBRARY_PATH):
                raise RuntimeError(f"import {rel!r} is outside the spec's directory tree")
        try:
            content = target.read_bytes()
        except OSError as e:
            raise RuntimeError(f"cannot import {rel!r}: {e.strerror}") from e
        key = LIBRARY_NAME if target == LIBRARY_PATH else str(target.relative_to(self.root))
        self.digests[key] = xxhash.xxh3_128_hexdigest(content)
        return str(target), content


def evaluate(
    path: Path,
    *,
    ext_vars: dict[str, str] | None = None,
    ext_codes: dict[str, str] | None = None,
    tla_vars: dict[str, str] | None = None,
    tla_codes: dict[str, str] | None = None,
) -> tuple[dict, dict[str, str]]:
    """Evaluate a Jsonnet file; return its JSON value and the digests of what it imported."""
    path = path.resolve()
    if not path.is_file():
        raise SpecError(f"{path}: no such spec file")
    try:
        path.read_bytes().decode("utf-8")
    except OSError as e:
        raise SpecError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None
    importer = _Importer(root=path.parent)
    try:
        text = _jsonnet.evaluate_file(
            str(path),
            ext_vars=ext_vars or {},
            ext_codes=ext_codes or {},
            tla_vars=tla_vars or {},
            tla_codes=tla_codes or {},
            import_callback=importer,
        )
    except RuntimeError as e:
        raise SpecError(_jsonnet_message(str(e), path.parent)) from None
    except UnicodeDecodeError:
        # The binding decodes Jsonnet's output (or error message) as UTF-8.
        raise SpecError(
            f"{path}: evaluates to (or fails with) text that is not UTF-8; is an import binary?"
        ) from None
    value = json.loads(text)
    if not isinstance(value, dict):
        raise SpecError(f"{path}: a spec must evaluate to an object, got {type(value).__name__}")
    return value, dict(sorted(importer.digests.items()))


def _jsonnet_message(raw: str, root: Path) -> str:
    """One line: 'file:line:col: ERROR KIND: message', paths relative to the spec directory."""
    lines = [line.strip() for line in raw.strip().splitlines() if line.strip()]
    head = lines[0] if lines else raw
    location = next((line.split()[0] for line in lines[1:] if re.match(r"\S+:\d+:\d+", line)), None)
    message = f"{location}: {head}" if location and not re.search(r":\d+:\d+", head) else head
    return message.replace(f"{root}/", "")


def load(path: Path, **jsonnet_args: dict[str, str] | None) -> Spec:
    """Evaluate and validate a spec file."""
    evaluated, imports = evaluate(path, **jsonnet_args)
    spec = Spec(path=path.resolve(), evaluated=evaluated, targets=validate(evaluated), imports=imports)
    _check_outputs(spec, prefix="targets." if "targets" in evaluated else "")
    return spec


def _check_outputs(spec: Spec, prefix: str) -> None:
    """Refuse an output whose replacement would delete the spec or a source.

    Publishing replaces the output directory (with --force, even one mergebuild
    did not make): an output of '.' or of a model directory must never get that far.
    """
    sources = {
        (spec.directory / p).resolve(): p
        for target in spec.targets.values()
        for p in [*(m.path for m in target.models), *(e.path for e in (target.base,) if e), target.tokenizer]
        if p is not None
    }
    for name, target in spec.targets.items():
        where = f"{prefix}{name}.output" if prefix else "output"
        output = (spec.directory / target.output).resolve()
        if spec.directory.is_relative_to(output):
            raise SpecError(
                f"{where}: {target.output!r} holds the spec's own directory; choose a new directory"
            )
        for source, written in sources.items():
            if source.is_relative_to(output):
                raise SpecError(
                    f"{where}: {target.output!r} holds the source {written!r}; choose a new directory"
                )


def validate(value: dict) -> dict[str, MergeSpec]:
    """Validate an evaluated spec: one merge, or {targets: {name: merge}}."""
    if "targets" in value:
        extra = sorted(set(value) - {"targets"})
        if extra:
            raise SpecError(f"{extra[0]}: not allowed next to targets")
        raw = value["targets"]
        if not isinstance(raw, dict) or not raw:
            raise SpecError("targets: must be a non-empty object of named merges")
        items = {str(k): v for k, v in raw.items()}
        prefix = "targets."
    else:
        items, prefix = {"default": value}, ""
    targets: dict[str, MergeSpec] = {}
    for name, raw_target in items.items():
        targets[name] = parse_merge(raw_target, f"{prefix}{name}." if prefix else "")
    outputs: dict[str, str] = {}
    for name, target in targets.items():
        if target.output in outputs:
            raise SpecError(f"targets {outputs[target.output]!r} and {name!r} write the same output")
        outputs[target.output] = name
    return targets


def parse_merge(raw: object, where: str = "") -> MergeSpec:
    """One merge of a spec, validated; SpecError names the first bad field (after `where`)."""
    try:
        return MergeSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(_schema_message(e, where)) from None


def _schema_message(error: ValidationError, prefix: str) -> str:
    first = error.errors()[0]
    loc = ".".join(str(part) for part in first["loc"] if not str(part).startswith("function-"))
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    elif first["type"] == "missing":
        msg = "required field is missing"
    path = f"{prefix}{loc}".rstrip(".")
    return f"{path}: {msg}" if path else msg


@dataclass(frozen=True)
class JsonnetArgs:
    """Top-level arguments and external variables from the CLI."""

    ext_vars: dict[str, str] = field(default_factory=dict)
    ext_codes: dict[str, str] = field(default_factory=dict)
    tla_vars: dict[str, str] = field(default_factory=dict)
    tla_codes: dict[str, str] = field(default_factory=dict)
