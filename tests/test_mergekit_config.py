"""Translating mergekit YAML configs into specs (`import-mergekit`); that the translated specs merge
what mergekit merges is tests/conformance/test_import_mergekit.py's part."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mergebuild.errors import SpecError
from mergebuild.mergekit_config import import_mergekit


def _models(root: Path, *names: str, layers: int = 4) -> None:
    for name in names:
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text(json.dumps({"num_hidden_layers": layers}))


def _config(tmp_path: Path, text: str, name: str = "merge.yml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _hub_snapshot(cache: Path, repo: str, commit: str, ref: str | None = "main") -> Path:
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "snapshots" / commit).mkdir(parents=True)
    if ref is not None:
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / ref).write_text(commit)
    return root / "snapshots" / commit


def test_a_models_config_maps_field_by_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _models(tmp_path / "models", "base", "math", "code")
    monkeypatch.chdir(tmp_path)  # mergekit resolves relative paths from here
    config = _config(
        tmp_path,
        """
merge_method: dare_ties
base_model: models/base
models:
  - model: models/math
    parameters: {weight: [0.2, 0.8], density: {filter: mlp, value: 0.3}}
  - model: ./models/code
    parameters:
      weight: 0.5
      density: [{filter: self_attn, value: [0.1, 0.9]}, {value: 0.5}]
parameters: {normalize: false, rescale: true, lambda: 1.5}
dtype: bfloat16
out_dtype: float16
""",
    )
    imported = import_mergekit(config, spec_dir=tmp_path / "specs")
    assert imported.spec == {
        "method": "dare_ties",
        "base": "../models/base",  # relative to the spec's directory now
        "models": [
            {
                "path": "../models/math",
                "parameters": {"weight": [0.2, 0.8], "density": [{"filter": "mlp", "value": 0.3}]},
            },
            {
                "path": "../models/code",
                "parameters": {
                    "weight": 0.5,
                    "density": [{"filter": "self_attn", "value": [0.1, 0.9]}, {"value": 0.5}],
                },
            },
        ],
        "parameters": {"normalize": False, "rescale": True, "lambda": 1.5},
        "dtype": "float16",  # out_dtype wins over dtype
        "output": "out/merge",
    }
    assert imported.unresolved == []
    notes = " ".join(imported.notes)
    assert "dtype bfloat16" in notes and "computes in float32" in notes
    assert "seed 0" in notes  # dare draws differ from mergekit's by design


def test_the_printed_spec_is_what_mergebuild_evaluates(tmp_path: Path) -> None:
    _models(tmp_path, "base", "a", "b")
    config = _config(
        tmp_path,
        "merge_method: ties\nbase_model: base\nmodels:\n"
        "  - {model: a, parameters: {weight: 1, density: [1, 0.5]}}\n"
        "  - {model: b, parameters: {weight: 1, density: 0.5}}\ndtype: float16\n",
    )
    run = subprocess.run(
        [sys.executable, "-m", "mergebuild", "import-mergekit", str(config), "--output", "merged"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("// Imported from a mergekit config")
    spec = tmp_path / "spec.jsonnet"
    spec.write_text(run.stdout)
    evaluated = subprocess.run(
        [sys.executable, "-m", "mergebuild", "eval", str(spec)], capture_output=True, text=True, cwd=tmp_path
    )
    assert evaluated.returncode == 0, evaluated.stderr
    imported = import_mergekit(config, output="merged", spec_dir=tmp_path)
    assert json.loads(evaluated.stdout) == {
        **imported.spec,
        # eval prints the schema's defaults too
        **{k: v for k, v in json.loads(evaluated.stdout).items() if k not in imported.spec},
    }
    assert json.loads(evaluated.stdout)["models"][0]["parameters"]["density"] == [1, 0.5]


def test_hub_ids_become_snapshots_of_the_local_cache(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    main = _hub_snapshot(cache, "org/base-7b", "abc123")
    tagged = _hub_snapshot(cache, "org/math-7b", "def456", ref="v2")
    pinned = _hub_snapshot(cache, "org/code-7b", "0123beef", ref=None)
    config = _config(
        tmp_path,
        "merge_method: task_arithmetic\nbase_model: org/base-7b\nmodels:\n"
        "  - {model: org/math-7b@v2, parameters: {weight: 1}}\n"
        "  - {model: {model: {path: org/code-7b, revision: 0123beef}}, parameters: {weight: 1}}\n"
        "  - {model: org/missing-7b, parameters: {weight: 1}}\n",
    )
    imported = import_mergekit(config, spec_dir=tmp_path, hub_cache=cache)
    assert imported.spec["base"] == str(main)
    assert [m["path"] for m in imported.spec["models"]] == [str(tagged), str(pinned), "org/missing-7b"]
    assert imported.unresolved == ["org/missing-7b"]
    assert any("huggingface-cli download org/missing-7b" in note for note in imported.notes)


def test_unresolved_models_are_warned_about_on_stderr(tmp_path: Path) -> None:
    config = _config(
        tmp_path, "merge_method: linear\nmodels:\n  - {model: org/gone, parameters: {weight: 1}}\n"
    )
    run = subprocess.run(
        [sys.executable, "-m", "mergebuild", "import-mergekit", str(config)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"HF_HUB_CACHE": str(tmp_path / "empty"), "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0
    assert "warning: org/gone is neither a local path nor in the Hugging Face cache" in run.stderr
    assert '"path": "org/gone"' in run.stdout


def test_one_slice_over_every_layer_is_the_models_form(tmp_path: Path) -> None:
    _models(tmp_path, "base", "chat", layers=32)
    config = _config(
        tmp_path,
        """
slices:
  - sources:
      - {model: base, layer_range: [0, 32]}
      - {model: chat, layer_range: [0, 32]}
    parameters: {t: [0, 1]}
merge_method: slerp
base_model: base
""",
    )
    imported = import_mergekit(config, spec_dir=tmp_path)
    # The base listed among the sources is the slerp's base, not a second model.
    assert imported.spec["base"] == "base"
    assert imported.spec["models"] == [{"path": "chat"}]
    # mergekit looks a slice's parameters up after the model's own: method-wide ones here.
    assert imported.spec["parameters"] == {"t": [0, 1]}
    assert any("slice's parameters" in note for note in imported.notes)


@pytest.mark.parametrize("method", ["linear", "karcher"])
def test_a_base_among_the_models_is_averaged_in_where_mergekit_does(tmp_path: Path, method: str) -> None:
    _models(tmp_path, "base", "a")
    weights = "{weight: 1}" if method == "linear" else "{}"
    config = _config(
        tmp_path,
        f"merge_method: {method}\nbase_model: base\nmodels:\n"
        f"  - {{model: a, parameters: {weights}}}\n  - {{model: base, parameters: {weights}}}\n",
    )
    imported = import_mergekit(config, spec_dir=tmp_path)
    assert "base" not in imported.spec
    assert [m["path"] for m in imported.spec["models"]] == ["a", "base"]


def test_a_tokenizer_source_model_is_the_specs_tokenizer(tmp_path: Path) -> None:
    _models(tmp_path, "base", "a", "tok")
    config = _config(
        tmp_path,
        "merge_method: linear\nmodels:\n  - {model: a, parameters: {weight: 1}}\ntokenizer_source: tok\n"
        "chat_template: chatml\n",
    )
    imported = import_mergekit(config, spec_dir=tmp_path)
    assert imported.spec["tokenizer"] == "tok"
    assert any("chat_template" in note for note in imported.notes)
    base_tokenizer = _config(
        tmp_path,
        "merge_method: linear\nmodels:\n  - {model: a, parameters: {weight: 1}}\ntokenizer: {source: base}\n",
    )
    assert "tokenizer" not in import_mergekit(base_tokenizer, spec_dir=tmp_path).spec


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("merge_method: ties\nmodels: [\n", "merge.yml:3:1: not valid YAML"),
        ("- just a list\n", "a mergekit config is a YAML mapping"),
        ("models: []\n", "merge_method: required"),
        ("merge_method: frankenstein\nmodels: [{model: a}]\n", "unknown method 'frankenstein'"),
        (
            "merge_method: linear\nmodels: [{model: a}]\nwhatever: 1\n",
            "whatever: mergekit 0.1.5 configs have no such field",
        ),
        (
            "merge_method: linear\nmodels: [{model: a+adapter}]\n",
            "models.0.model: 'a+adapter' names a LoRA adapter",
        ),
        (
            "merge_method: linear\nmodels: [{model: a, parameters: {weight: abc}}]\n",
            "models.0.parameters.weight: a number",
        ),
        (
            "merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\ntokenizer_source: union\n",
            "tokenizer_source: 'union'",
        ),
        (
            "merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\ntokenizer: {source: base, tokens: {x: {source: a}}}\n",
            "tokenizer.tokens: changes the embeddings",
        ),
        (
            "merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\nmodules: {text: {}}\n",
            "modules: multi-module",
        ),
        (
            "merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1, density: 2}}]\n",
            "models.0.parameters.density",
        ),
        (
            "merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\nout_dtype: int8\n",
            "out_dtype: 'int8'",
        ),
        (
            "merge_method: passthrough\nslices:\n  - sources: [{model: a, layer_range: [0, 2]}]\n  - sources: [{model: a, layer_range: [1, 4]}]\n",
            "slices: only one slice over every layer",
        ),
        (
            "merge_method: passthrough\nslices:\n  - sources: [{model: a, layer_range: [0, 3]}]\n",
            "slices.0.sources.0.layer_range: [0, 3] is not every layer of 'a' ([0, 4])",
        ),
        (
            "merge_method: passthrough\nslices:\n  - sources: [{model: org/absent, layer_range: [0, 3]}]\n",
            "cannot tell whether [0, 3] covers every layer of 'org/absent'",
        ),
    ],
)
def test_what_a_spec_cannot_say_is_refused_naming_the_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, message: str
) -> None:
    _models(tmp_path, "a", "b")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError) as raised:
        import_mergekit(_config(tmp_path, text), spec_dir=tmp_path, hub_cache=tmp_path / "hub")
    assert message in str(raised.value)


def test_the_cli_renders_a_refusal_as_one_line(tmp_path: Path) -> None:
    config = _config(tmp_path, "merge_method: linear\nmodels: [{model: a+lora}]\n")
    run = subprocess.run(
        [sys.executable, "-m", "mergebuild", "import-mergekit", str(config)], capture_output=True, text=True
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "error: models.0.model: 'a+lora' names a LoRA adapter (+); merge the adapter into its model first"
    ]
