"""Read-budget sweep: expert bytes read, wall time and fidelity per budget fraction.

For each method and each fraction f (spec field ``budget: {fraction: f}``), a
fresh cache is prepared (``--warmup``, below), the experts and the cache are
evicted from the page cache while the base is read into it (so the OS counter
counts expert bytes, plus the cache's own reads), and the budget build is
measured. Its output ``merged_f`` is compared with the unbudgeted build
``merged_full`` (same spec without ``budget``, built once per method):

    measured deviation = ||merged_f - merged_full|| / ||merged_full - base||

streamed tensor by tensor in float64. The bound the tool reports in its
``--json`` summary (first key found among ``common.SUMMARY_BOUND_KEYS``: the
design's "sum of omitted w_i ||delta_i,b||") is printed as is and divided by
``||merged_full - base||``; 'n/a' when the summary has none. Failed builds are
listed under the table with the last line of the tool's error.

``--warmup``: a budget can only pick the most valuable blocks if the catalog
already knows the delta statistics, so before each measured build the fresh
cache gets a copy of a catalog made once by ``index`` (``python -m mergebuild
index SPEC``: one read of every source, recording digests and per-block delta
statistics; the default), ``full`` (an unbudgeted build into the same cache: measures a budget
rebuild after a full build) or ``none`` (cold cache).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from common import (
    SUMMARY_BOUND_KEYS,
    SUMMARY_EXPERT_READ_KEYS,
    SUMMARY_READ_KEYS,
    BenchError,
    Measurement,
    Merge,
    add_common_args,
    comma_list,
    files_under,
    find_key,
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
    relative_deviation,
    remove,
    run_measured,
    safetensors_bytes,
    save_results,
    update_norm,
    warm_up_tools,
    write_json,
)
from family import Family, add_family_args, family_from_args

DEFAULT_FRACTIONS = (1.0, 0.5, 0.25, 0.1, 0.05)


def index_available() -> bool:
    """Whether ``python -m mergebuild index --help`` works."""
    proc = subprocess.run(
        [sys.executable, "-m", "mergebuild", "index", "--help"], capture_output=True, check=False
    )
    return proc.returncode == 0


def warm_up(kind: str, spec: Path, full_spec: Path, cache: Path, logs: Path, extra: list[str]) -> None:
    """Prepare ``cache`` for a measured budget build (see the module docstring)."""
    if kind == "index":
        # Index once (one read of every source), then hand each fresh cache a copy of the catalog.
        template = logs.parent / "index-cache"
        if not (template / "catalog.sqlite").is_file():
            run_measured(
                mergebuild_cmd(spec, template, *extra, sub="index"), label="warmup-index", log_dir=logs
            )
        cache.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template / "catalog.sqlite", cache / "catalog.sqlite")
    elif kind == "full":
        run_measured(mergebuild_cmd(full_spec, cache, *extra), label="warmup-full", log_dir=logs)


def bench_method(method: str, fam: Family, args: argparse.Namespace, warmup: str) -> dict[str, Any]:
    """The reference build, then every fraction; returns measurements and deviations."""
    work: Path = args.work_dir / method
    logs = work / "logs"
    experts = fam.experts_paths(args.experts)
    expert_files = files_under(experts)
    expert_bytes = sum(safetensors_bytes(p) for p in experts)
    base_files = files_under([fam.base])
    ref_out = work / "full" / "out"
    ref_merge = Merge.default(method, fam.base, experts, ref_out, seed=args.seed)
    ref_spec = write_json(work / "full" / "spec.json", ref_merge.mergebuild_spec())
    data: dict[str, Any] = {
        "expert_bytes": expert_bytes,
        "fractions": {},
        "reference": None,
        "mergekit": None,
    }

    print(f"\n## {method}: reference build (no budget)", flush=True)
    ref_cache = work / "full" / "cache"
    ref_runs: list[Measurement] = []
    try:
        for rep in range(args.repeats):
            remove(ref_out, ref_cache, ref_spec.with_name("spec.lock.json"))
            ref_runs.append(
                run_measured(
                    mergebuild_cmd(ref_spec, ref_cache, *args.mergebuild_arg),
                    label=f"reference-{rep}",
                    log_dir=logs,
                    evict_paths=[*expert_files, ref_cache],
                    warm_paths=base_files,
                    sync_paths=[ref_out],
                )
            )
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        data["error"] = str(e)
        return data
    data["reference"] = median_measurement(ref_runs)
    remove(ref_cache)
    update = update_norm(ref_out, fam.base)
    data["update_norm"] = update

    if not args.skip_mergekit:
        mk_out = work / "mergekit" / "out"
        cfg = write_json(
            work / "mergekit" / "config.yml", replace(ref_merge, output=mk_out).mergekit_config()
        )
        remove(mk_out)
        try:
            data["mergekit"] = run_measured(
                mergekit_cmd(cfg, mk_out, args.seed),
                label="mergekit",
                log_dir=logs,
                evict_paths=expert_files,
                warm_paths=base_files,
                sync_paths=[mk_out],
            )
        except BenchError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
        remove(mk_out)

    for frac in args.fractions:
        fw = work / f"f{frac:g}"
        out, cache = fw / "out", fw / "cache"
        merge = replace(ref_merge, output=out, budget={"fraction": frac})
        spec = write_json(fw / "spec.json", merge.mergebuild_spec())
        runs: list[Measurement] = []
        entry: dict[str, Any] = {"runs": runs}
        data["fractions"][frac] = entry
        print(f"\n## {method}: budget fraction {frac:g}", flush=True)
        try:
            for rep in range(args.repeats):
                remove(out, cache, spec.with_name("spec.lock.json"))
                warm_up(warmup, spec, ref_spec, cache, logs, args.mergebuild_arg)
                runs.append(
                    run_measured(
                        mergebuild_cmd(spec, cache, *args.mergebuild_arg),
                        label=f"f{frac:g}-{rep}",
                        log_dir=logs,
                        evict_paths=[*expert_files, cache],
                        warm_paths=base_files,
                        sync_paths=[out],
                    )
                )
        except BenchError as e:
            entry["error"] = str(e)
            print(f"error: {e}", file=sys.stderr, flush=True)
            continue
        entry["deviation"] = relative_deviation(out, ref_out, fam.base)
        summary = runs[-1].summary_json() or {}
        entry["bound"] = find_key(summary, SUMMARY_BOUND_KEYS)
        said = find_key(summary, SUMMARY_EXPERT_READ_KEYS)
        if said is None:
            said = _sum_targets(summary, SUMMARY_READ_KEYS)
        entry["tool_read"] = said
        if not args.keep_outputs:
            remove(out, cache)
    if not args.keep_outputs:
        remove(ref_out)
    return data


def _sum_targets(summary: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    targets = summary.get("targets")
    if isinstance(targets, list) and targets:
        values = [find_key(t, keys) for t in targets]
        if all(isinstance(v, int | float) for v in values):
            return int(sum(values))
    value = find_key(summary, keys)
    return int(value) if isinstance(value, int | float) else None


def rows_for(method: str, data: dict[str, Any]) -> list[list[str]]:
    """Table rows for one method: mergekit, the reference and each fraction."""
    rows: list[list[str]] = []
    expert_bytes = data["expert_bytes"]
    for label, m in (("mergekit (full)", data["mergekit"]), ("none (full)", data["reference"])):
        if m is not None:
            rows.append(
                [
                    method,
                    label,
                    fmt_s(m.total_s),
                    "1x" if label.startswith("none") else "",
                    fmt_bytes(m.read_bytes),
                    fmt_ratio(ratio(m.read_bytes, expert_bytes)),
                    "",
                    fmt_bytes(m.maxrss_bytes),
                    "0" if label.startswith("none") else "",
                    "",
                    "",
                    "",
                ]
            )
    if data.get("error"):
        rows.append([method, "none (full)", "failed", *[""] * 9])
    update = data.get("update_norm")
    reference: Measurement | None = data["reference"]
    for frac, entry in data["fractions"].items():
        if not entry["runs"]:
            rows.append([method, f"{frac:g}", "failed", *[""] * 9])
            continue
        m = median_measurement(entry["runs"])
        bound = entry.get("bound")
        bound_rel = ratio(bound, update) if isinstance(bound, int | float) else None
        dev = entry.get("deviation")
        within = "n/a"
        if bound_rel is not None and dev is not None:
            within = "yes" if dev <= bound_rel * (1 + 1e-6) else "NO"
        rows.append(
            [
                method,
                f"{frac:g}",
                fmt_s(m.total_s),
                fmt_ratio(ratio(reference.total_s, m.total_s)) if reference is not None else "n/a",
                fmt_bytes(m.read_bytes),
                fmt_ratio(ratio(m.read_bytes, expert_bytes)),
                fmt_bytes(entry.get("tool_read")) if entry.get("tool_read") is not None else "n/a",
                fmt_bytes(m.maxrss_bytes),
                f"{dev:.3e}" if dev is not None else "n/a",
                f"{bound:.4g}" if isinstance(bound, int | float) else "n/a",
                f"{bound_rel:.3e}" if bound_rel is not None else "n/a",
                within,
            ]
        )
    return rows


HEADERS = [
    "method",
    "budget",
    "wall s",
    "full wall / this",
    "read (OS)",
    "read / expert bytes",
    "tool says read",
    "peak RSS",
    "measured rel. dev",
    "bound (tool)",
    "bound / norm(full - base)",
    "dev <= bound",
]


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(
        description="Budget sweep: for each read-budget fraction, expert bytes read, wall "
        "time, and the measured deviation from the full merge next to the tool's bound."
    )
    add_family_args(parser)
    add_common_args(parser, "budget")
    parser.add_argument(
        "--methods",
        type=method_list,
        default=["task_arithmetic", "ties"],
        help="comma-separated (default task_arithmetic,ties)",
    )
    parser.add_argument(
        "--fractions",
        type=comma_list(float),
        default=list(DEFAULT_FRACTIONS),
        help="comma-separated budget fractions (default 1,0.5,0.25,0.1,0.05)",
    )
    parser.add_argument(
        "--warmup",
        choices=("index", "full", "none"),
        default="index",
        help="how the cache is prepared before each budget build (default index)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="builds per fraction (default 1)")
    parser.add_argument("--keep-outputs", action="store_true", help="keep outputs and caches")
    args = parser.parse_args(argv)
    methods = args.methods
    if args.skip_mergebuild:
        parser.error("the budget sweep measures mergebuild; --skip-mergebuild leaves nothing")

    fam = family_from_args(args)
    ok, why = mergebuild_status()
    if not ok:
        print(f"mergebuild is not runnable ({why}); nothing to measure")
        return 1
    warmup = args.warmup
    if warmup == "index" and not index_available():
        print("note: `mergebuild index` is not available; budget builds start from an empty cache")
        warmup = "none"
    warm_up_tools(
        ([[sys.executable, "-m", "mergekit.scripts.run_yaml", "--help"]] if not args.skip_mergekit else [])
        + [[sys.executable, "-m", "mergebuild", "build", "--help"]]
    )

    rows: list[list[str]] = []
    raw: dict[str, Any] = {}
    for method in methods:
        data = bench_method(method, fam, args, warmup)
        rows += rows_for(method, data)
        print(markdown_table(HEADERS, rows_for(method, data)), flush=True)
        raw[method] = _jsonable(data)

    a = fam.params.arch
    print(
        f"\n# Budget sweep: {a.params / 1e6:.0f}M params x {args.experts} experts "
        f"({fmt_bytes(safetensors_bytes(fam.base))} per model), warm-up: {warmup}, "
        f"{args.repeats} repeat(s)"
    )
    print(f"machine: {machine_line()}")
    print(
        "read (OS): bytes read from disk with the base pre-read into the page cache, so "
        "about the expert bytes read (plus cache reads)\n"
    )
    print(markdown_table(HEADERS, rows))
    notes = failure_notes(raw)
    if notes:
        print("\nfailures:\n" + "\n".join(notes))
    save_results(args.work_dir / "results.json", {"family": str(fam.root), "methods": raw})
    return 0


def failure_notes(raw: dict[str, Any]) -> list[str]:
    """One line per failed build: method, budget and the last line of its error."""
    notes = []
    for method, data in raw.items():
        if data.get("error"):
            notes.append(f"- {method} / none: {last_line(data['error'])}")
        for frac, entry in data.get("fractions", {}).items():
            if entry.get("error"):
                notes.append(f"- {method} / {frac}: {last_line(entry['error'])}")
    return notes


def _jsonable(value: Any) -> Any:
    if isinstance(value, Measurement):
        return value.to_json()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
