"""Spec evaluation and validation: Jsonnet features, confinement, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergebuild.errors import SpecError
from mergebuild.spec import load, parse_size


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


TIES = """{method: 'ties', base: 'b', models: [{path: 'm', parameters: {weight: 1, density: 0.5}}], output: 'o'}"""


def test_plain_json_is_a_spec(tmp_path: Path) -> None:
    spec = load(
        write(
            tmp_path / "a.json",
            '{"method": "linear", "models": ["x", "y"], "parameters": {"weight": 1}, "output": "o"}',
        )
    )
    target = spec.targets["default"]
    assert target.method == "linear"
    assert [m.path for m in target.models] == ["x", "y"]
    assert spec.resolve(target.output) == (tmp_path / "o").resolve()


def test_library_import_tla_ext_and_targets(tmp_path: Path) -> None:
    path = write(
        tmp_path / "s.jsonnet",
        """
        local mb = import 'mergebuild.libsonnet';
        function(lam='1.0')
          mb.sweep('w', [0.25, 0.5], function(w)
            mb.ties('base', [mb.model('m', { weight: w, density: 0.5 })], 'out/' + std.extVar('tag') + '-' + w,
                    parameters={ lambda: std.parseJson(lam) }))
        """,
    )
    spec = load(path, tla_vars={"lam": "0.5"}, ext_vars={"tag": "x"})
    assert sorted(spec.targets) == ["w-0.25", "w-0.5"]
    t = spec.targets["w-0.5"]
    assert t.parameters["lambda"] == 0.5
    assert t.models[0].parameters["weight"] == 0.5
    assert t.output == "out/x-0.5"
    assert "mergebuild.libsonnet" in spec.imports


def test_imported_files_are_digested(tmp_path: Path) -> None:
    write(tmp_path / "lib" / "common.libsonnet", "{ base: 'b' }")
    spec = load(
        write(
            tmp_path / "s.jsonnet",
            "local c = import 'lib/common.libsonnet'; " + TIES.replace("'b'", "c.base"),
        )
    )
    assert list(spec.imports) == ["lib/common.libsonnet"]
    before = spec.digest
    write(tmp_path / "lib" / "common.libsonnet", "{ base: 'b2' }")
    assert load(tmp_path / "s.jsonnet").digest != before


@pytest.mark.parametrize("target", ["../outside.libsonnet", "/etc/passwd"])
def test_imports_are_confined_to_the_spec_tree(tmp_path: Path, target: str) -> None:
    write(tmp_path / "outside.libsonnet", "{}")
    path = write(
        tmp_path / "inner" / "s.jsonnet", f"local x = importstr '{target}'; assert std.length(x) >= 0; {TIES}"
    )
    with pytest.raises(SpecError, match="outside the spec's directory tree"):
        load(path)


def test_jsonnet_errors_carry_file_line_col(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.jsonnet", "{\n  method: 'ties',\n  base: ,\n}")
    with pytest.raises(SpecError) as e:
        load(path)
    message = str(e.value)
    assert "bad.jsonnet:3:" in message and "\n" not in message


def test_runtime_errors_carry_location(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.jsonnet", "local x = {};\n{ method: x.nope }")
    with pytest.raises(SpecError, match=r"bad.jsonnet:2:\d+.*nope"):
        load(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{method: 'ties', base: 'b', models: [], output: 'o', colour: 1}", r"^colour: unknown field$"),
        ("{method: 'tie', base: 'b', models: [], output: 'o'}", r"^method: unknown method 'tie'"),
        (
            "{method: 'ties', models: [{path: 'm', parameters: {weight: 1}}], output: 'o'}",
            "needs a base model",
        ),
        (
            "{method: 'ties', base: 'b', models: [{path: 'm', parameters: {weight: 1, density: 1.5}}], output: 'o'}",
            r"models.0.parameters.density: must be in \(0, 1\], got 1.5",
        ),
        (
            "{method: 'ties', base: 'b', models: [{path: 'm', parameters: {weight: 1, densty: 0.5}}], output: 'o'}",
            "models.0.parameters.densty: 'ties' takes no parameter 'densty'",
        ),
        (
            "{method: 'ties', base: 'b', models: [{path: 'm'}], output: 'o'}",
            "models.0.parameters.weight: required",
        ),
        (
            "{method: 'ties', base: 'b', models: [{path: 'm', parameters: {weight: 1, lambda: 2}}], output: 'o'}",
            "models.0.parameters.lambda: 'lambda' is method-wide",
        ),
        (
            "{method: 'slerp', base: 'b', models: ['m', 'n'], parameters: {t: 0.5}, output: 'o'}",
            "takes exactly 1 models",
        ),
        ("{method: 'ties', base: 'b', models: []}", r"^output: required field is missing$"),
        (
            "{targets: {a: {method: 'linear', models: ['m'], parameters: {weight: 1}, output: 'o', x: 1}}}",
            r"^targets.a.x: unknown field$",
        ),
        (
            "{targets: {a: {method: 'linear', models: ['m'], parameters: {weight: 1}, output: 'o'},"
            " b: {method: 'linear', models: ['m'], parameters: {weight: 1}, output: 'o'}}}",
            "write the same output",
        ),
        ("[1, 2]", "must evaluate to an object"),
        (
            "{method: 'ties', base: 'b', models: [], output: 'o', block_size: '12 parsecs'}",
            "block_size: .*not a size",
        ),
    ],
)
def test_schema_errors_name_the_field(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(SpecError, match=expected) as e:
        load(write(tmp_path / "s.jsonnet", text))
    assert "\n" not in str(e.value)


def test_gradients_and_filters_validate_each_value(tmp_path: Path) -> None:
    ok = "{method: 'ties', base: 'b', models: [{path: 'm', parameters: {weight: [0.1, 0.9], density: [{filter: 'mlp', value: 0.3}, {value: [0.2, 0.4]}]}}], output: 'o'}"
    assert load(write(tmp_path / "ok.jsonnet", ok)).targets["default"].models[0].parameters["weight"] == [
        0.1,
        0.9,
    ]
    bad = ok.replace("value: 0.3", "value: 0")
    with pytest.raises(SpecError, match="density: must be in"):
        load(write(tmp_path / "bad.jsonnet", bad))


def test_parse_size() -> None:
    assert parse_size("16MiB") == 16 * 2**20
    assert parse_size("4GB") == 4 * 10**9
    assert parse_size(1024) == 1024
    assert parse_size("1.5KiB") == 1536
    for bad in ("0", "-1", "lots", True):
        with pytest.raises(ValueError):
            parse_size(bad)
