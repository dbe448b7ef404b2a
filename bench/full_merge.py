"""Full merges: mergebuild vs mergekit 0.1.5 vs the I/O floor, cold page cache.

For each method, the four runners (the I/O floor read through the page cache and
read with O_DIRECT, mergekit, mergebuild) run ``--repeats`` times, interleaved
and rotated (floor, direct floor, mergekit, mergebuild; then direct floor,
mergekit, mergebuild, floor; ...). Before every run the inputs and the tool's
cache directory are evicted from the page cache, and the tool's previous output,
cache and lockfile are deleted, so every run is a cold, from-scratch full
merge. mergekit runs ``mergekit-yaml`` on CPU with ``dtype: float32`` and
``out_dtype: bfloat16``; mergebuild runs ``python -m mergebuild build SPEC
--cache-dir DIR --json`` with ``dtype: bfloat16``; both get the same parameters
and seed. After the runs the two outputs are compared (relative deviation
``||mergebuild - mergekit|| / ||mergekit - base||``; random methods differ by
design, DESIGN.md 5b).

Table columns: ``wall s`` is the median process wall time plus the time to fsync
its output afterwards (``sync s``, mergekit does not fsync); ``read`` is the
median of bytes read from disk (OS counter); ``peak RSS`` the maximum over
repeats; ``x floor`` = wall / floor wall and ``x direct floor`` = wall / direct
floor wall (mergebuild reads cold ranges with O_DIRECT, so the direct floor is
its own floor); ``speed-up`` = mergekit wall / wall.
See ``bench/common.py`` for how each number is measured.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from common import (
    ALL_METHODS,
    RANDOM_METHODS,
    Measurement,
    Merge,
    add_common_args,
    alternate,
    fmt_bytes,
    fmt_ratio,
    fmt_s,
    last_line,
    machine_line,
    markdown_table,
    measure_io_floor,
    median_measurement,
    mergebuild_cmd,
    mergebuild_status,
    mergekit_cmd,
    method_list,
    model_files,
    ratio,
    relative_deviation,
    remove,
    run_measured,
    safetensors_bytes,
    save_results,
    warm_up_tools,
    write_json,
)
from family import Family, add_family_args, family_from_args


def bench_method(method: str, fam: Family, args: argparse.Namespace, run_mergebuild: bool) -> dict[str, Any]:
    """Run floor / mergekit / mergebuild for one method; return every measurement."""
    work: Path = args.work_dir / method
    logs = work / "logs"
    experts = fam.experts_paths(args.experts)
    mk_out, mb_out = work / "mergekit" / "out", work / "mergebuild" / "out"
    mb_cache, mb_spec = work / "mergebuild" / "cache", work / "mergebuild" / "spec.json"
    mk_merge = Merge.default(method, fam.base, experts, mk_out, seed=args.seed)
    mb_merge = Merge.default(method, fam.base, experts, mb_out, seed=args.seed)
    mk_config = write_json(work / "mergekit" / "config.yml", mk_merge.mergekit_config())
    write_json(mb_spec, mb_merge.mergebuild_spec())
    inputs = model_files(mk_merge.inputs())
    out_size = safetensors_bytes(fam.base)

    def floor(rep: int) -> Measurement:
        return measure_io_floor(
            [p for p in inputs if p.suffix == ".safetensors"], out_size, work, label=f"floor-{rep}"
        )

    def mergekit(rep: int) -> Measurement:
        remove(mk_out)
        return run_measured(
            mergekit_cmd(mk_config, mk_out, args.seed),
            label=f"mergekit-{rep}",
            log_dir=logs,
            evict_paths=inputs,
            sync_paths=[mk_out],
        )

    def mergebuild(rep: int) -> Measurement:
        remove(mb_out, mb_cache, mb_spec.with_name("spec.lock.json"))
        return run_measured(
            mergebuild_cmd(mb_spec, mb_cache, *args.mergebuild_arg),
            label=f"mergebuild-{rep}",
            log_dir=logs,
            evict_paths=[*inputs, mb_cache],
            sync_paths=[mb_out],
        )

    def floor_direct(rep: int) -> Measurement:
        return measure_io_floor(
            [p for p in inputs if p.suffix == ".safetensors"],
            out_size,
            work,
            label=f"floor-direct-{rep}",
            direct=True,
        )

    runners = {"floor": floor, "floor_direct": floor_direct}
    if not args.skip_mergekit:
        runners["mergekit"] = mergekit
    if run_mergebuild:
        runners["mergebuild"] = mergebuild
    print(f"\n## {method}: {', '.join(runners)} x {args.repeats}", flush=True)
    results, errors = alternate(runners, args.repeats)
    deviation = None
    if not args.no_compare and results.get("mergekit") and results.get("mergebuild"):
        deviation = relative_deviation(mb_out, mk_out, fam.base if mk_merge.base else None)
    if not args.keep_outputs:
        remove(mk_out, mb_out, mb_cache)
    return {"results": results, "errors": errors, "deviation": deviation}


def table_rows(method: str, data: dict[str, Any]) -> list[list[str]]:
    """Rows of the summary table for one method."""
    results: dict[str, list[Measurement]] = data["results"]
    errors: dict[str, str] = data["errors"]
    med = {k: median_measurement(v) for k, v in results.items() if v}
    floor, floor_direct = med.get("floor"), med.get("floor_direct")
    mk = med.get("mergekit")
    rows = []
    names = {"floor": "I/O floor", "floor_direct": "I/O floor, O_DIRECT"}
    for tool in ("floor", "floor_direct", "mergekit", "mergebuild"):
        m = med.get(tool)
        if m is None:
            if tool in errors:
                rows.append([method, tool, "failed", *[""] * (len(HEADERS) - 3)])
            continue
        dev = ""
        if tool == "mergebuild" and data["deviation"] is not None:
            dev = f"{data['deviation']:.2e}" + (" (rng)" if method in RANDOM_METHODS else "")
        rows.append(
            [
                method,
                names.get(tool, tool),
                fmt_s(m.total_s),
                fmt_s(m.sync_s),
                fmt_bytes(m.read_bytes),
                fmt_bytes(m.maxrss_bytes),
                fmt_ratio(ratio(m.total_s, floor.total_s if floor else None)),
                fmt_ratio(ratio(m.total_s, floor_direct.total_s if floor_direct else None)),
                fmt_ratio(ratio(mk.total_s if mk else None, m.total_s)) if tool not in names else "",
                dev,
                str(len(results[tool])) + (" (then failed)" if tool in errors else ""),
            ]
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(
        description="Full-merge benchmark: mergebuild vs mergekit 0.1.5 vs the I/O floor "
        "(cold page cache, interleaved repeats, markdown table)."
    )
    add_family_args(parser)
    add_common_args(parser, "full")
    parser.add_argument(
        "--methods",
        type=method_list,
        default=list(ALL_METHODS),
        help=f"comma-separated (default: {','.join(ALL_METHODS)})",
    )
    parser.add_argument("--repeats", type=int, default=3, help="repeats per runner (default 3)")
    parser.add_argument(
        "--no-compare", action="store_true", help="skip comparing mergebuild's output with mergekit's"
    )
    parser.add_argument("--keep-outputs", action="store_true", help="keep the merged outputs")
    args = parser.parse_args(argv)

    fam = family_from_args(args)
    run_mb = not args.skip_mergebuild
    if run_mb:
        run_mb, why = mergebuild_status()
        if not run_mb:
            print(f"mergebuild is not runnable ({why}); measuring mergekit and the floor only")
    warm_up_tools(
        ([[sys.executable, "-m", "mergekit.scripts.run_yaml", "--help"]] if not args.skip_mergekit else [])
        + ([[sys.executable, "-m", "mergebuild", "build", "--help"]] if run_mb else [])
    )

    all_data: dict[str, Any] = {}
    rows: list[list[str]] = []
    for method in args.methods:
        data = bench_method(method, fam, args, run_mb)
        all_data[method] = data
        rows += table_rows(method, data)
        print(markdown_table(HEADERS, table_rows(method, data)), flush=True)

    a = fam.params.arch
    print(
        f"\n# Full merge: {a.params / 1e6:.0f}M params x {args.experts} experts "
        f"({fmt_bytes(safetensors_bytes(fam.base))} per model), {args.repeats} repeats"
    )
    print(f"machine: {machine_line()}\n")
    print(markdown_table(HEADERS, rows))
    failures = [
        f"- {m} / {tool}: {last_line(e)}" for m, d in all_data.items() for tool, e in d["errors"].items()
    ]
    if failures:
        print("\nfailures:\n" + "\n".join(failures))
    save_results(
        args.work_dir / "results.json",
        {
            "family": str(fam.root),
            "params": a.params,
            "experts": args.experts,
            "methods": {
                m: {
                    "deviation": d["deviation"],
                    "errors": d["errors"],
                    "runs": {k: [r.to_json() for r in v] for k, v in d["results"].items()},
                }
                for m, d in all_data.items()
            },
        },
    )
    return 0


HEADERS = [
    "method",
    "tool",
    "wall s",
    "sync s",
    "read",
    "peak RSS",
    "x floor",
    "x direct floor",
    "speed-up vs mergekit",
    "rel. diff vs mergekit",
    "n",
]

if __name__ == "__main__":
    sys.exit(main())
