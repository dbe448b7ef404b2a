"""Run mergekit 0.1.5 as an oracle, in process, through its public API.

mergekit is imported only here and only called (`run_merge` with a
`MergeConfiguration`); none of its code is copied (it is LGPL).

In-process runs cost a fraction of a second on the tiny families, where each
`mergekit-yaml` subprocess pays several seconds of start-up.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import logging
from pathlib import Path
from typing import Any

import yaml

_PATCHED = False


def _work_around_bert_optional_alias_bug() -> None:
    """Let mergekit 0.1.5 plan BertModel merges at all.

    Its planner checks optional weights with `[w.name] + (w.aliases or [])`, but
    `WeightInfo.aliases` is a tuple, so every optional weight that has aliases raises
    TypeError. BertModel's `embeddings.position_ids` is the only such weight among the
    bundled architectures. We re-register BertModel from mergekit's own bert.json with
    that weight's aliases dropped; aliases only matter for checkpoints that prefix
    names with 'bert.', which our families never do, so the merge math and the
    layer layout (which decides gradient positions) are mergekit's own.
    """
    global _PATCHED
    if _PATCHED:
        return
    import mergekit._data.architectures as arch_data
    from mergekit.architecture import ModelArchitecture, ModuleDefinition
    from mergekit.architecture.json_definitions import (
        NAME_TO_ARCH,
        JsonModuleArchDef,
        JsonModuleArchitecture,
    )

    data = json.loads(importlib.resources.files(arch_data).joinpath("bert.json").read_text())
    data = copy.deepcopy(data)
    for weight in data["pre_weights"] + data["post_weights"]:
        if weight.get("optional"):
            weight.pop("aliases", None)
    module = JsonModuleArchitecture(definition=JsonModuleArchDef.model_validate(data))
    NAME_TO_ARCH["BertModel"] = [
        ModelArchitecture(
            modules={"default": ModuleDefinition(architecture=module)},
            architectures=module.definition.architectures,
            model_type=module.definition.expected_model_type,
        )
    ]
    _PATCHED = True


def mergekit_config(
    method: str,
    models: list[tuple[Path, dict[str, Any]]],
    *,
    base: Path | None,
    parameters: dict[str, Any],
    out_dtype: str,
) -> dict[str, Any]:
    """A mergekit YAML config (as a dict): arithmetic in float32, output in `out_dtype`."""
    config: dict[str, Any] = {
        "merge_method": method,
        "models": [
            {"model": str(path), **({"parameters": params} if params else {})} for path, params in models
        ],
        "dtype": "float32",
        "out_dtype": out_dtype,
    }
    if base is not None:
        config["base_model"] = str(base)
    if parameters:
        config["parameters"] = parameters
    return config


def run_mergekit(config: dict[str, Any], out_dir: Path) -> Path:
    """Merge with mergekit into `out_dir` (CPU, no tokenizer copy); return `out_dir`.

    The YAML text is also written next to the output, so a failing case can be rerun
    by hand with `mergekit-yaml`.
    """
    _work_around_bert_optional_alias_bug()
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    text = yaml.safe_dump(config, sort_keys=False)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    out_dir.with_suffix(".mergekit.yml").write_text(text)
    options = MergeOptions(
        device="cpu",
        copy_tokenizer=False,
        lazy_unpickle=False,
        write_model_card=False,
        quiet=True,
    )
    # mergekit logs planning chatter at INFO; keep test output to what matters.
    logging.getLogger("mergekit").setLevel(logging.WARNING)
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(out_dir), options)
    return out_dir
