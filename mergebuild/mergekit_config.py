"""A mergekit YAML config translated into the equivalent spec (`mergebuild import-mergekit`).

mergekit 0.1.5's config schema maps onto the spec almost field by field:
`merge_method` is `method`, `base_model` is `base`, `models` and their
`parameters` (numbers, gradients, `{filter, value}` rules) keep their names
and meanings, and `out_dtype` (else `dtype`) is the output `dtype`. What
differs is said in the spec's header comments:

- mergekit's `dtype` is also its arithmetic dtype; mergebuild always computes
  in float32 (DESIGN.md section 5), so only the output dtype carries over.
- Model references: a local path is kept (relative paths are rewritten to
  resolve from the spec's directory, as mergekit resolved them from the
  current one); a Hugging Face id (`org/name`, `org/name@revision`) becomes
  the snapshot in the local Hugging Face cache, since mergebuild never
  downloads. An id not in the cache is kept as written and reported.
- `slices` are accepted when there is one slice whose sources all cover every
  layer (the `models` form written as a slice); stacking or cutting layers has
  no spec equivalent. Slice-level parameters become method-wide ones (mergekit
  looks them up after the model's own and before the config's).

Refused, because they change tensors in ways a spec cannot say: LoRA
references (`model+lora`), `tokenizer_source: union` and tokenizer `tokens`
or padding (they resize embeddings), `modules`, and a slice's
`residual_weight`. `chat_template` is dropped with a note (it changes no
tensor).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergebuild.errors import SpecError
from mergebuild.graph import config_layers
from mergebuild.methods import REGISTRY
from mergebuild.spec import parse_merge

#: The top-level fields of a mergekit 0.1.5 config.
_CONFIG_FIELDS = {
    "merge_method",
    "base_model",
    "models",
    "slices",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "modules",
}
_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "fp32": "float32"}
_DTYPES |= {"fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}
#: Methods to which mergekit feeds a base listed among the models as one more input.
_BASE_AVERAGED_IN = {"linear", "karcher"}
#: A Hugging Face repository id: one `org/name`, no path beyond it.
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass
class ImportedSpec:
    """The spec a mergekit config translates to, and what the translation should tell its reader."""

    spec: dict[str, Any]
    #: What differs from the config (rendered as comments above the spec).
    notes: list[str] = field(default_factory=list)
    #: Model references found neither on disk nor in the Hugging Face cache.
    unresolved: list[str] = field(default_factory=list)

    def render(self) -> str:
        """The spec as Jsonnet source: its JSON, under the notes as `//` comments."""
        header = ["// Imported from a mergekit config by `mergebuild import-mergekit`."]
        header += [f"// - {note}" for note in self.notes]
        return "\n".join([*header, _json(self.spec, "")]) + "\n"


def _json(value: Any, indent: str) -> str:
    """`value` as indented JSON, with a list of scalars (a gradient) on one line."""
    inner = indent + "  "
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(key)}: {_json(item, inner)}" for key, item in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{indent}}}"
    if isinstance(value, list) and any(isinstance(item, dict | list) for item in value):
        return "[\n" + ",\n".join(f"{inner}{_json(item, inner)}" for item in value) + f"\n{indent}]"
    return json.dumps(value)


def import_mergekit(
    config_path: Path,
    output: str | None = None,
    spec_dir: Path | None = None,
    hub_cache: Path | None = None,
) -> ImportedSpec:
    """Translate the mergekit YAML config at `config_path` into a spec that writes `output`
    (default: `out/<config name>`), with relative paths that resolve from `spec_dir` (default:
    the current directory, which mergekit resolves them from) and Hugging Face ids looked up
    in `hub_cache` (default: the cache huggingface_hub uses).

    Raises SpecError naming the config field when the config is not valid YAML, is not a
    mergekit config, or uses something a spec cannot express (see the module docstring).
    """
    try:
        config = yaml.safe_load(config_path.read_text())
    except OSError as e:
        raise SpecError(f"{config_path}: cannot read: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{config_path}:{mark.line + 1}:{mark.column + 1}" if mark else str(config_path)
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(f"{where}: not valid YAML: {problem}") from None
    if not isinstance(config, dict):
        raise SpecError(f"{config_path}: a mergekit config is a YAML mapping (merge_method, models, ...)")
    translator = _Translator(
        Path.cwd() if spec_dir is None else spec_dir, _default_hub_cache() if hub_cache is None else hub_cache
    )
    return translator.translate(config, output or f"out/{config_path.stem}")


def _default_hub_cache() -> Path:
    """Where huggingface_hub keeps downloaded repositories ($HF_HUB_CACHE, $HF_HOME/hub, or
    ~/.cache/huggingface/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


@dataclass
class _Translator:
    spec_dir: Path
    hub_cache: Path
    notes: list[str] = field(default_factory=list)
    unresolved: list[str] = field(default_factory=list)

    def translate(self, config: dict[str, Any], output: str) -> ImportedSpec:
        _fields(config, "", _CONFIG_FIELDS, "configs", "a YAML mapping")
        if not isinstance(config.get("merge_method"), str):
            raise SpecError("merge_method: required, the name of a method (e.g. ties)")
        if config.get("modules"):
            raise SpecError("modules: multi-module merges are not supported")
        spec: dict[str, Any] = {"method": config["merge_method"]}
        base = config.get("base_model")
        parameters = self._parameters(config.get("parameters"), "parameters")
        if config.get("models") and config.get("slices"):
            raise SpecError("models, slices: give one or the other, as mergekit requires")
        if config.get("slices"):
            sources, base, slice_parameters = self._single_slice(config["slices"], base)
            parameters |= slice_parameters
        else:
            sources = self._models(config.get("models") or [])
        if base is not None:
            spec["base"] = self._locate(base, "base_model")
            sources = self._without_base(spec, sources)
        spec["models"] = sources
        if parameters:
            spec["parameters"] = parameters
        dtype = self._dtype(config)
        if dtype is not None:
            spec["dtype"] = dtype
        tokenizer = self._tokenizer(config)
        if tokenizer is not None:
            spec["tokenizer"] = tokenizer
        if config.get("chat_template"):
            self.notes.append("chat_template is not carried over: the tokenizer files are copied as they are")
        spec["output"] = output
        merge = parse_merge(spec)  # the spec's own checks, and its method
        if REGISTRY[merge.method].draws:
            self.notes.append(
                "seed 0: the random draws are a function of the seed and of each element's position, "
                "so they differ from mergekit's (DESIGN.md section 5)"
            )
        return ImportedSpec(spec, self.notes, self.unresolved)

    def _without_base(self, spec: dict[str, Any], sources: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The models, as mergebuild counts them, when mergekit's list also names the base.

        mergekit leaves a listed base out of the models for every method but linear and
        karcher, which average it in at its place in the list (and, when it is not listed,
        after the models: what a spec's `base` means for them). passthrough refuses a base
        beside a model, as mergekit does.
        """
        here = [i for i, entry in enumerate(sources) if self._same(entry["path"], spec["base"])]
        if not here or spec["method"] == "passthrough":
            return sources
        if spec["method"] in _BASE_AVERAGED_IN:
            del spec["base"]
            self.notes.append(
                f"the base model is model {here[0]} too: {spec['method']} averages it in there, as "
                "mergekit does"
            )
            return sources
        self.notes.append(
            f"model {here[0]} is the base model, which mergekit's {spec['method']} does not count among the "
            "models: left out"
        )
        return [entry for i, entry in enumerate(sources) if i not in here]

    def _same(self, a: str, b: str) -> bool:
        """Whether two spec paths name the same model."""
        if a == b:
            return True
        return (self.spec_dir / a).resolve() == (self.spec_dir / b).resolve()

    def _models(self, models: object) -> list[dict[str, Any]]:
        if not isinstance(models, list):
            raise SpecError("models: a list of {model, parameters}")
        entries = []
        for i, entry in enumerate(models):
            where = f"models.{i}"
            _fields(
                entry, where, {"model", "parameters"}, "models", "a mapping with a model (and parameters)"
            )
            entries.append(self._entry(entry["model"], entry.get("parameters"), where))
        return entries

    def _entry(self, model: object, parameters: object, where: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"path": self._locate(model, f"{where}.model")}
        params = self._parameters(parameters, f"{where}.parameters")
        if params:
            entry["parameters"] = params
        return entry

    def _single_slice(
        self, slices: object, base: object
    ) -> tuple[list[dict[str, Any]], object, dict[str, Any]]:
        """The models, base and slice parameters of a config whose one slice covers every layer."""
        if not isinstance(slices, list) or len(slices) != 1:
            raise SpecError(
                "slices: only one slice over every layer has a spec equivalent; stacking or cutting "
                "layers (a frankenmerge) cannot be written as a mergebuild spec"
            )
        (output_slice,) = slices
        fields = {"sources", "base_model", "parameters", "residual_weight"}
        _fields(output_slice, "slices.0", fields, "slices", "a mapping with sources")
        if output_slice.get("residual_weight") is not None:
            raise SpecError("slices.0.residual_weight: not supported")
        sources = output_slice.get("sources")
        if not isinstance(sources, list) or not sources:
            raise SpecError("slices.0.sources: a non-empty list of {model, layer_range, parameters}")
        entries = []
        for i, source in enumerate(sources):
            where = f"slices.0.sources.{i}"
            fields = {"model", "layer_range", "parameters"}
            _fields(
                source,
                where,
                fields,
                "slice sources",
                "a mapping with a model, a layer_range (and parameters)",
            )
            entry = self._entry(source["model"], source.get("parameters"), where)
            layer_range = source.get("layer_range")
            if not (
                isinstance(layer_range, list)
                and len(layer_range) == 2
                and all(type(x) is int for x in layer_range)
            ):
                raise SpecError(f"{where}.layer_range: two layer indices [start, end)")
            layers = config_layers(self.spec_dir / entry["path"])
            if layers is None:
                raise SpecError(
                    f"{where}.layer_range: cannot tell whether {layer_range} covers every layer of "
                    f"{entry['path']!r} (no config.json with num_hidden_layers there)"
                )
            if layer_range != [0, layers]:
                raise SpecError(
                    f"{where}.layer_range: {layer_range} is not every layer of {entry['path']!r} "
                    f"([0, {layers}]); stacking or cutting layers cannot be written as a mergebuild spec"
                )
            entries.append(entry)
        slice_base = output_slice.get("base_model")
        parameters = self._parameters(output_slice.get("parameters"), "slices.0.parameters")
        if parameters:
            self.notes.append("the slice's parameters are method-wide parameters here")
        return entries, slice_base if slice_base is not None else base, parameters

    def _locate(self, reference: object, where: str) -> str:
        """The spec path of a mergekit model reference (see the module docstring)."""
        path, revision = _reference(reference, where)
        local = Path(path).expanduser()
        if local.exists():
            if revision is not None:
                raise SpecError(
                    f"{where}: {path!r} is a local path; a revision (@{revision}) applies to hub ids"
                )
            return (
                str(local)
                if local.is_absolute()
                else os.path.relpath(local.resolve(), self.spec_dir.resolve())
            )
        hub_id = _HUB_ID.match(path) is not None
        snapshot = self._snapshot(path, revision) if hub_id else None
        if snapshot is not None:
            self.notes.append(
                f"{where}: {path}{'@' + revision if revision else ''} is {snapshot} (Hugging Face cache)"
            )
            return str(snapshot)
        self.unresolved.append(path)
        if hub_id:
            flag = f" --revision {revision}" if revision else ""
            self.notes.append(
                f"{where}: {path!r} is neither a local path nor in the Hugging Face cache "
                f"({self.hub_cache}): download it (huggingface-cli download {path}{flag}) and import "
                "again, or write its path here"
            )
        else:
            self.notes.append(
                f"{where}: {path!r} does not exist (mergekit would resolve it from the current directory)"
            )
        return path

    def _snapshot(self, repo: str, revision: str | None) -> Path | None:
        """The cached snapshot of hub repository `repo` at `revision` (a branch, tag or commit;
        default main), as huggingface_hub lays its cache out, or None."""
        root = self.hub_cache / ("models--" + repo.replace("/", "--"))
        name = revision or "main"
        ref = root / "refs" / name
        try:
            commit = ref.read_text().strip() if ref.is_file() else name
        except OSError:
            return None
        snapshot = root / "snapshots" / commit
        return snapshot if snapshot.is_dir() and commit else None

    def _parameters(self, raw: object, where: str) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise SpecError(f"{where}: a mapping of parameter names to values")
        return {str(name): _parameter(value, f"{where}.{name}") for name, value in raw.items()}

    def _dtype(self, config: dict[str, Any]) -> str | None:
        name = config.get("out_dtype") or config.get("dtype")
        where = "out_dtype" if config.get("out_dtype") else "dtype"
        if name is None:
            return None
        if name not in _DTYPES:
            raise SpecError(
                f"{where}: {name!r} is not an output dtype mergebuild writes (float32, float16, bfloat16)"
            )
        if config.get("dtype") and _DTYPES.get(config["dtype"]) != "float32":
            self.notes.append(
                f"dtype {config['dtype']}: mergekit's arithmetic dtype; mergebuild computes in float32 and "
                "writes the output dtype once at the end"
            )
        return _DTYPES[name]

    def _tokenizer(self, config: dict[str, Any]) -> str | None:
        tokenizer = config.get("tokenizer")
        source = config.get("tokenizer_source")
        where = "tokenizer_source"
        if tokenizer is not None:
            fields = {"source", "tokens", "pad_to_multiple_of"}
            _fields(tokenizer, "tokenizer", fields, "tokenizer configs", "a mapping with a source")
            for name in ("tokens", "pad_to_multiple_of"):
                if tokenizer.get(name):
                    raise SpecError(f"tokenizer.{name}: changes the embeddings' rows; not supported")
            source, where = tokenizer.get("source"), "tokenizer.source"
        if source is None or source == "base":
            return None  # the base's tokenizer files are copied, as without the field
        if source == "union":
            raise SpecError(f"{where}: 'union' merges vocabularies and resizes the embeddings; not supported")
        return self._locate(source, where)


def _fields(value: object, where: str, fields: set[str], kind: str, shape: str) -> None:
    """Refuse `value` (at `where`) unless it is a mapping of some of mergekit's `fields` for
    `kind`, with a model when `fields` has one; `shape` says what it should be."""
    if not isinstance(value, dict) or ("model" in fields and "model" not in value):
        raise SpecError(f"{where}: {shape}" if where else shape)
    extra = sorted(set(map(str, value)) - fields)
    if extra:
        raise SpecError(f"{where + '.' if where else ''}{extra[0]}: mergekit 0.1.5 {kind} have no such field")


def _reference(reference: object, where: str) -> tuple[str, str | None]:
    """(path, revision) of a mergekit model reference: `path[@revision][+lora]`, or its mapping
    form `{model: {path, revision}, lora}`."""
    if isinstance(reference, dict):
        if reference.get("lora"):
            raise SpecError(
                f"{where}: LoRA adapters are not supported; merge the adapter into its model first"
            )
        model = reference.get("model", reference)
        if not isinstance(model, dict) or not isinstance(model.get("path"), str):
            raise SpecError(f"{where}: a model path, or a mapping {{model: {{path, revision}}}}")
        revision = model.get("revision")
        return model["path"], str(revision) if revision is not None else None
    if not isinstance(reference, str) or not reference.strip():
        raise SpecError(f"{where}: a model path or Hugging Face id")
    if "+" in reference:
        raise SpecError(
            f"{where}: {reference!r} names a LoRA adapter (+); merge the adapter into its model first"
        )
    path, _, revision = reference.partition("@")
    return path, revision or None


def _parameter(value: object, where: str) -> Any:
    """A spec parameter value from a mergekit one: a number or bool, a gradient (a list of
    numbers), or `{filter, value}` rules (a single rule becomes a list of one)."""
    if isinstance(value, bool | int | float):
        return value
    if isinstance(value, dict):
        return [_rule(value, where)]
    if isinstance(value, list) and value:
        if all(isinstance(item, dict) for item in value):
            return [_rule(item, f"{where}.{i}") for i, item in enumerate(value)]
        if all(isinstance(item, int | float) and not isinstance(item, bool) for item in value):
            return value
    raise SpecError(
        f"{where}: a number, a list of numbers (a gradient) or {{filter, value}} rules, got {value!r}"
    )


def _rule(rule: dict[str, Any], where: str) -> dict[str, Any]:
    extra = sorted(set(map(str, rule)) - {"filter", "value"})
    if extra or "value" not in rule:
        raise SpecError(f"{where}: a rule is {{filter, value}}, got {rule!r}")
    out: dict[str, Any] = {"value": _parameter(rule["value"], f"{where}.value")}
    if isinstance(out["value"], list) and isinstance(out["value"][0], dict):
        raise SpecError(f"{where}.value: rules do not nest")
    if rule.get("filter") is not None:
        out = {"filter": str(rule["filter"]), **out}
    return out
