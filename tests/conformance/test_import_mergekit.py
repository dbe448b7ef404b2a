"""`import-mergekit` end to end: mergekit merges a YAML config, mergebuild builds the spec the
config imports to, and the two outputs agree within the conformance tolerance."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mergebuild.build import BuildOptions, build
from mergebuild.mergekit_config import import_mergekit
from tests.conformance.cases import Case
from tests.conformance.compare import compare_outputs
from tests.conformance.conftest import NUM_LAYERS
from tests.conformance.oracle import run_mergekit
from tests.families import Family

#: Configs as a mergekit user writes them ({base} and {expert_i} are the llama32 family's
#: directories, 4 layers, float32: its deltas do not tie at top-k thresholds), each with the
#: conformance case of the spec it must import to. mergekit computes in `dtype`: float32 here,
#: mergebuild's arithmetic dtype.
CONFIGS: dict[str, tuple[str, Case]] = {
    "ties_gradients_and_filters": (
        """
merge_method: ties
base_model: {base}
models:
  - model: {base}
  - model: {expert_0}
    parameters:
      weight: 1.0
      density: [1.0, 0.5, 0.2]
  - model: {expert_1}
    parameters:
      weight:
        - filter: mlp
          value: 0.3
        - value: 0.7
      density: 0.6
parameters:
  normalize: true
  int8_mask: true
dtype: float32
out_dtype: bfloat16
""",
        Case(
            "import-ties",
            "llama32",
            "ties",
            (
                (0, {"weight": 1.0, "density": [1.0, 0.5, 0.2]}),
                (1, {"weight": [{"filter": "mlp", "value": 0.3}, {"value": 0.7}], "density": 0.6}),
            ),
            {"normalize": True, "int8_mask": True},
        ),
    ),
    "slerp_as_one_slice": (
        """
slices:
  - sources:
      - model: {base}
        layer_range: [0, 4]
      - model: {expert_1}
        layer_range: [0, 4]
merge_method: slerp
base_model: {base}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
""",
        Case(
            "import-slerp",
            "llama32",
            "slerp",
            ((1, {}),),
            {
                "t": [
                    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                    {"value": 0.5},
                ]
            },
            out_dtype="float32",
        ),
    ),
    "task_arithmetic_with_lambda": (
        """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {expert_0}
    parameters: {{weight: 0.6}}
  - model: {expert_1}
    parameters: {{weight: 0.4}}
  - model: {expert_2}
    parameters: {{weight: [0.1, 0.9]}}
parameters:
  lambda: 0.8
dtype: float32
""",
        Case(
            "import-task-arithmetic",
            "llama32",
            "task_arithmetic",
            ((0, {"weight": 0.6}), (1, {"weight": 0.4}), (2, {"weight": [0.1, 0.9]})),
            {"lambda": 0.8},
            out_dtype="float32",
        ),
    ),
    "linear_with_the_base_among_the_models": (
        """
merge_method: linear
base_model: {base}
models:
  - model: {expert_0}
    parameters: {{weight: 0.5}}
  - model: {base}
    parameters: {{weight: 0.3}}
  - model: {expert_2}
    parameters: {{weight: 0.2}}
dtype: float32
""",
        Case(
            "import-linear",
            "llama32",
            "linear",
            ((0, {"weight": 0.5}), (-1, {"weight": 0.3}), (2, {"weight": 0.2})),
            base=False,
            out_dtype="float32",
        ),
    ),
}


def _paths(family: Family) -> dict[str, str]:
    return {"base": str(family.base), **{f"expert_{i}": str(path) for i, path in enumerate(family.experts)}}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_an_imported_config_builds_what_mergekit_merges(
    name: str, families: dict[str, Family], tmp_path: Path
) -> None:
    text, case = CONFIGS[name]
    # A family whose last "expert" is the base, so a case can name the base as a model (-1).
    family = families[case.family]
    family = Family(family.base, (*family.experts, family.base))
    config = tmp_path / f"{name}.yml"
    config.write_text(text.format(**_paths(family)))
    expected = run_mergekit(yaml.safe_load(config.read_text()), tmp_path / "mergekit")

    imported = import_mergekit(config, output="merged", spec_dir=tmp_path)
    assert imported.unresolved == []
    wanted = case.spec(family, tmp_path / "merged")
    for key in ("method", "base", "models", "parameters"):
        assert imported.spec.get(key) == wanted.get(key), key
    assert imported.spec.get("dtype", case.out_dtype) == case.out_dtype
    spec = tmp_path / "spec.jsonnet"
    spec.write_text(imported.render())  # the printed text, comments and all, is the spec
    build(spec, BuildOptions(cache_dir=tmp_path / "cache"))

    result = compare_outputs(case, family, NUM_LAYERS[case.family], expected, tmp_path / "merged")
    assert not result.problems, "\n".join(result.problems)
    assert result.compared > 0 and result.ambiguous == 0
