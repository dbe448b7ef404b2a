"""Incremental rebuilds: what a rebuild costs next to the full build it follows.

Each scenario starts from a fresh mergebuild cache, builds the "before" spec
(the full build), edits the spec in place, and builds again (the rebuild). The
page cache of every input, the cache directory and the outputs is evicted before
each of the two builds, so the rebuild's bytes read are what it really had to
fetch from disk: source bytes, cached blobs and catalog alike. For reference,
mergekit (which has no cache) builds the "after" merge from scratch once.

Scenarios (``--slot`` picks the expert that changes):

* ``null``: rebuild the unchanged spec;
* ``swap``: the slot's expert is replaced by a new fine-tune (every tensor differs);
* ``partial``: the slot's expert is replaced by one whose attention projections
  changed and nothing else (byte-identical other tensors);
* ``reweight``: only the slot's ``weight`` changes;
* ``lambda``: only the method-wide ``lambda`` changes (not for ``linear``);
* ``add``: one more expert (K -> K+1);
* ``sweep``: the spec becomes a multi-target sweep over ``lambda`` that includes
  the merge built first (mergekit: one run per target).

The tool's own figures are printed when its ``--json`` summary has them (per
target ``bytes_read`` and ``blocks_computed``, summed over targets); every other
column comes from the OS (see ``bench/common.py``). Nothing here asserts a
number: incremental reuse lands gradually and this script reports whatever the
tool does today.
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from common import (
    BenchError,
    Measurement,
    Merge,
    add_common_args,
    comma_list,
    files_under,
    fmt_bytes,
    fmt_ratio,
    fmt_s,
    last_line,
    machine_line,
    markdown_table,
    median_measurement,
    mergebuild_cmd,
    mergebuild_status,
    mergekit_cmd,
    method_list,
    ratio,
    remove,
    run_measured,
    safetensors_bytes,
    save_results,
    warm_up_tools,
    write_json,
)
from family import Family, add_family_args, family_from_args

SCENARIOS = ("null", "swap", "partial", "reweight", "lambda", "add", "sweep")
Targets = dict[str, Merge]  # "" = a single-merge spec


@dataclass
class Scenario:
    """A spec before and after the edit."""

    name: str
    before: Targets
    after: Targets


def spec_json(targets: Targets) -> dict[str, Any]:
    """A mergebuild spec: a plain merge for ``{"": m}``, else ``{targets: ...}``."""
    if list(targets) == [""]:
        return targets[""].mergebuild_spec()
    return {"targets": {name: m.mergebuild_spec() for name, m in targets.items()}}


def make_scenario(
    name: str,
    method: str,
    fam: Family,
    k: int,
    slot: int,
    out: Path,
    seed: int,
    lambdas: list[float],
) -> Scenario | None:
    """Build scenario ``name`` for ``method``; None when it does not apply."""
    experts = fam.experts_paths(k)
    base = Merge.default(method, fam.base, experts, out / "merged", seed=seed)
    after = copy.deepcopy(base)
    if name == "null":
        pass
    elif name in ("swap", "partial"):
        _, params = after.models[slot]
        after.models[slot] = (fam.variant(slot, name), params)
    elif name == "reweight":
        path, params = after.models[slot]
        after.models[slot] = (path, {**params, "weight": round(params["weight"] * 1.5, 4)})
    elif name == "lambda":
        if "lambda" not in after.parameters:
            return None
        after.parameters["lambda"] = 0.8
    elif name == "add":
        after = Merge.default(method, fam.base, fam.experts_paths(k + 1), out / "merged", seed=seed)
    elif name == "sweep":
        if "lambda" not in base.parameters:
            return None
        first = replace(
            base, parameters={**base.parameters, "lambda": lambdas[0]}, output=out / f"lambda-{lambdas[0]:g}"
        )
        targets: Targets = {}
        for lam in lambdas:
            targets[f"lambda-{lam:g}"] = replace(
                base, parameters={**base.parameters, "lambda": lam}, output=out / f"lambda-{lam:g}"
            )
        return Scenario(name, {"": first}, targets)
    else:
        raise ValueError(name)
    return Scenario(name, {"": base}, {"": after})


def tool_figures(m: Measurement) -> tuple[int | None, int | None]:
    """(bytes_read, blocks_computed) from the tool's --json summary, summed over targets."""
    summary = m.summary_json()
    if not summary or not isinstance(summary.get("targets"), list):
        return None, None
    read = blocks = 0
    for t in summary["targets"]:
        if not isinstance(t, dict) or "bytes_read" not in t:
            return None, None
        read += int(t["bytes_read"])
        blocks += int(t.get("blocks_computed", 0))
    return read, blocks


def run_scenario(sc: Scenario, work: Path, args: argparse.Namespace, run_mergebuild: bool) -> dict[str, Any]:
    """Full build + rebuild (``--repeats`` times) and the mergekit reference."""
    logs = work / "logs"
    spec, cache = work / "spec.json", work / "cache"
    models = {p for t in (*sc.before.values(), *sc.after.values()) for p in t.inputs()}
    inputs = files_under(sorted(models))
    outputs = sorted({m.output for m in (*sc.before.values(), *sc.after.values())})
    fulls: list[Measurement] = []
    rebuilds: list[Measurement] = []
    error = None
    if run_mergebuild:
        try:
            for rep in range(args.repeats):
                remove(cache, spec.with_name("spec.lock.json"), *outputs)
                write_json(spec, spec_json(sc.before))
                fulls.append(
                    run_measured(
                        mergebuild_cmd(spec, cache, *args.mergebuild_arg),
                        label=f"full-{rep}",
                        log_dir=logs,
                        evict_paths=[*inputs, cache, *outputs],
                        sync_paths=outputs,
                    )
                )
                write_json(spec, spec_json(sc.after))
                rebuilds.append(
                    run_measured(
                        mergebuild_cmd(spec, cache, *args.mergebuild_arg),
                        label=f"rebuild-{rep}",
                        log_dir=logs,
                        evict_paths=[*inputs, cache, *outputs],
                        sync_paths=outputs,
                    )
                )
        except BenchError as e:
            error = str(e)
            print(f"error: {e}", file=sys.stderr, flush=True)
    mergekit: list[Measurement] = []
    if not args.skip_mergekit:
        try:
            for name, merge in sc.after.items():
                mk_out = work / "mergekit" / (name or "merged")
                cfg = write_json(
                    work / "mergekit" / f"{name or 'merged'}.yml",
                    replace(merge, output=mk_out).mergekit_config(),
                )
                remove(mk_out)
                mergekit.append(
                    run_measured(
                        mergekit_cmd(cfg, mk_out, merge.seed),
                        label=f"mergekit-{name or 'merged'}",
                        log_dir=logs,
                        evict_paths=inputs,
                        sync_paths=[mk_out],
                    )
                )
                remove(mk_out)
        except BenchError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            mergekit = []
    if not args.keep_outputs:
        remove(cache, *outputs)
    return {"full": fulls, "rebuild": rebuilds, "mergekit": mergekit, "error": error}


def row(method: str, name: str, data: dict[str, Any]) -> list[str]:
    """One table row."""
    mk = None
    if data["mergekit"]:
        runs: list[Measurement] = data["mergekit"]
        mk = (sum(r.total_s for r in runs), sum(r.read_bytes for r in runs))
    mk_cells = [fmt_s(mk[0]) if mk else "n/a", fmt_bytes(mk[1]) if mk else "n/a"]
    if not data["full"] or not data["rebuild"]:
        why = "failed" if data["error"] else "not run"
        return [method, name, why, "", "", "", "", "", "", "", "", *mk_cells]
    full, reb = median_measurement(data["full"]), median_measurement(data["rebuild"])
    said_read, blocks = tool_figures(data["rebuild"][-1])
    return [
        method,
        name,
        fmt_s(full.total_s),
        fmt_s(reb.total_s),
        fmt_ratio(ratio(reb.total_s, full.total_s)),
        fmt_bytes(full.read_bytes),
        fmt_bytes(reb.read_bytes),
        fmt_ratio(ratio(reb.read_bytes, full.read_bytes)),
        fmt_bytes(reb.maxrss_bytes),
        fmt_bytes(said_read) if said_read is not None else "n/a",
        str(blocks) if blocks is not None else "n/a",
        *mk_cells,
    ]


HEADERS = [
    "method",
    "scenario",
    "full s",
    "rebuild s",
    "time ratio",
    "full read",
    "rebuild read",
    "read ratio",
    "rebuild peak RSS",
    "tool says read",
    "blocks computed",
    "mergekit s",
    "mergekit read",
]


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(
        description="Incremental-rebuild benchmark: full build, edit, rebuild; bytes read, "
        "wall time and peak RSS of the rebuild against the full build (cold page cache)."
    )
    add_family_args(parser)
    add_common_args(parser, "incremental")
    parser.add_argument(
        "--methods", type=method_list, default=["ties"], help="comma-separated methods (default ties)"
    )
    parser.add_argument(
        "--scenarios",
        type=comma_list(),
        default=list(SCENARIOS),
        help=f"comma-separated (default {','.join(SCENARIOS)})",
    )
    parser.add_argument(
        "--slot", type=int, default=0, help="expert that swap/partial/reweight change (default 0)"
    )
    parser.add_argument(
        "--lambdas",
        type=comma_list(float),
        default=[1.0, 0.5, 0.75, 1.25],
        help="sweep values; the first is built first (default 1.0,0.5,0.75,1.25)",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="full build + rebuild pairs per scenario (default 1)"
    )
    parser.add_argument("--keep-outputs", action="store_true", help="keep outputs and caches")
    args = parser.parse_args(argv)
    for bad in [s for s in args.scenarios if s not in SCENARIOS]:
        parser.error(f"unknown scenario {bad!r}")
    if not 0 <= args.slot < args.experts:
        parser.error("--slot must name one of the experts")

    variants = [f"{args.slot}:{kind}" for kind in ("swap", "partial") if kind in args.scenarios]
    fam = family_from_args(args, variants, extra_experts=1 if "add" in args.scenarios else 0)
    run_mb = not args.skip_mergebuild
    if run_mb:
        run_mb, why = mergebuild_status()
        if not run_mb:
            print(f"mergebuild is not runnable ({why}); only the mergekit reference runs")
    warm_up_tools(
        ([[sys.executable, "-m", "mergekit.scripts.run_yaml", "--help"]] if not args.skip_mergekit else [])
        + ([[sys.executable, "-m", "mergebuild", "build", "--help"]] if run_mb else [])
    )

    rows: list[list[str]] = []
    raw: dict[str, Any] = {}
    for method in args.methods:
        for name in args.scenarios:
            work = args.work_dir / method / name
            sc = make_scenario(
                name, method, fam, args.experts, args.slot, work / "out", args.seed, args.lambdas
            )
            if sc is None:
                print(f"\n## {method} / {name}: does not apply, skipped")
                continue
            print(f"\n## {method} / {name}", flush=True)
            data = run_scenario(sc, work, args, run_mb)
            rows.append(row(method, name, data))
            print(markdown_table(HEADERS, [rows[-1]]), flush=True)
            raw[f"{method}/{name}"] = {
                k: [m.to_json() for m in v] if isinstance(v, list) else v for k, v in data.items()
            }

    a = fam.params.arch
    print(
        f"\n# Incremental rebuilds: {a.params / 1e6:.0f}M params x {args.experts} experts "
        f"({fmt_bytes(safetensors_bytes(fam.base))} per model), slot {args.slot}, "
        f"{args.repeats} repeat(s)"
    )
    print(f"machine: {machine_line()}\n")
    print(markdown_table(HEADERS, rows))
    failures = [f"- {key}: {last_line(d['error'])}" for key, d in raw.items() if d.get("error")]
    if failures:
        print("\nfailures:\n" + "\n".join(failures))
    save_results(args.work_dir / "results.json", {"family": str(fam.root), "runs": raw})
    return 0


if __name__ == "__main__":
    sys.exit(main())
