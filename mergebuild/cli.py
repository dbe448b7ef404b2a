"""The command line: parses arguments, calls the build stages, renders results.

Errors a user can cause print as one line with their exit code (DESIGN.md
section 4); `--debug` shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mergebuild import __version__, freshness, memory
from mergebuild.errors import MergebuildError
from mergebuild.spec import JsonnetArgs
from mergebuild.summary import BuildSummary

if TYPE_CHECKING:
    from mergebuild.build import BuildOptions

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Build weight-space model merges from Jsonnet specs."
)
out = Console()
err = Console(stderr=True)
_debug = False

SpecArg = Annotated[Path, typer.Argument(help="The spec file (.jsonnet or .json).")]
TargetOpt = Annotated[str | None, typer.Option("--target", "-t", help="Build only this target.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable summary.")]
CacheOpt = Annotated[
    Path | None,
    typer.Option("--cache-dir", help="Cache directory (default: $MERGEBUILD_CACHE or ./cache)."),
]
TlaStr = Annotated[list[str], typer.Option("--tla-str", help="Top-level argument k=v (string).")]
TlaCode = Annotated[list[str], typer.Option("--tla-code", help="Top-level argument k=code (Jsonnet).")]
ExtStr = Annotated[list[str], typer.Option("--ext-str", help="External variable k=v (string).")]
ExtCode = Annotated[list[str], typer.Option("--ext-code", help="External variable k=code (Jsonnet).")]


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    result = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MergebuildError(f"{flag} takes key=value, got {item!r}")
        result[key] = value
    return result


def _jsonnet_args(
    tla_str: list[str], tla_code: list[str], ext_str: list[str], ext_code: list[str]
) -> JsonnetArgs:
    return JsonnetArgs(
        ext_vars=_pairs(ext_str, "--ext-str"),
        ext_codes=_pairs(ext_code, "--ext-code"),
        tla_vars=_pairs(tla_str, "--tla-str"),
        tla_codes=_pairs(tla_code, "--tla-code"),
    )


def _cache_dir(option: Path | None) -> Path:
    return option or Path(os.environ.get("MERGEBUILD_CACHE", "cache"))


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _summary_json(summary: BuildSummary) -> str:
    # Paths are the only non-JSON values in a summary.
    return json.dumps(asdict(summary), default=str, indent=2, sort_keys=True)


def _render_summary(summary: BuildSummary) -> None:
    if summary.dry_run:
        _render_dry_run(summary)
        return
    table = Table(title="build", title_justify="left")
    for column in (
        "target",
        "method",
        "read",
        "reused",
        "merged",
        "copied",
        "expert work",
        "written",
        "time",
    ):
        table.add_column(column, justify="left" if column in ("target", "method") else "right")
    for t in summary.targets:
        if t.up_to_date:
            table.add_row(t.name, t.method, "0 B", str(t.tensors_reused), "0", "0", "-", "up to date", "-")
            continue
        work = f"{t.expert_work_reused} reused, {t.expert_work_computed} new"
        row = [t.name, t.method, _size(t.bytes_read), str(t.tensors_reused), str(t.tensors_merged),
               str(t.tensors_copied), work, _size(t.bytes_written), f"{t.seconds:.2f}s"]  # fmt: skip
        table.add_row(*row)
    out.print(table)
    for t in summary.targets:
        if t.up_to_date:
            out.print(f"up to date {t.output}")
            continue
        out.print(f"wrote {t.output}" + (f" ({t.reason})" if t.reason else ""))
        if t.bad_blobs:
            out.print(f"[yellow]{t.bad_blobs} cache blob(s) failed their digest check: recomputed[/yellow]")
    out.print(f"locked {summary.lockfile} in {summary.seconds:.2f}s")


def _render_dry_run(summary: BuildSummary) -> None:
    table = Table(title="plan", title_justify="left")
    for column in ("target", "method", "status", "to read", "merged", "copied"):
        table.add_column(column, justify="left" if column in ("target", "method", "status") else "right")
    for t in summary.targets:
        status = "up to date" if t.up_to_date else t.reason
        table.add_row(t.name, t.method, status, _size(t.bytes_to_read), str(t.tensors_merged),
                      str(t.tensors_copied))  # fmt: skip
    out.print(table)


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    global _debug
    _debug = debug


@app.command("build")
def build_command(
    spec: SpecArg,
    target: TargetOpt = None,
    locked: Annotated[
        bool,
        typer.Option(
            "--locked", help="Refuse to build unless inputs match the lockfile; reproduce it exactly."
        ),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Plan only; exit 1 when there is work to do.")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an output directory mergebuild did not make.")
    ] = False,
    allow_pickle: Annotated[
        bool,
        typer.Option(
            "--allow-pickle",
            help="Load .bin/.pt checkpoints with torch's weights-only unpickler (converted once, cached).",
        ),
    ] = False,
    device: Annotated[
        str,
        typer.Option(
            "--device",
            help="Where the arithmetic runs: cpu, cuda or cuda:N (reads and writes stay on the host).",
        ),
    ] = "cpu",
    jobs: Annotated[
        int | None,
        typer.Option("--jobs", "-j", min=1, help="Threads for CPU arithmetic (default: the usable cores)."),
    ] = None,
    as_json: JsonOpt = False,
    cache_dir: CacheOpt = None,
    tla_str: TlaStr = [],  # noqa: B006 - typer reads the default
    tla_code: TlaCode = [],  # noqa: B006
    ext_str: ExtStr = [],  # noqa: B006
    ext_code: ExtCode = [],  # noqa: B006
) -> None:
    """Build the spec's targets, publish the outputs and write the lockfile."""
    jsonnet = _jsonnet_args(tla_str, tla_code, ext_str, ext_code)
    summary = None
    if not (dry_run or locked):
        summary = freshness.up_to_date(spec, jsonnet, _cache_dir(cache_dir), target)
    if summary is None:
        # torch loads here, not at start-up: an up-to-date build never needs it.
        from mergebuild.build import BuildOptions, build, default_jobs

        options = BuildOptions(
            cache_dir=_cache_dir(cache_dir),
            target=target,
            locked=locked,
            dry_run=dry_run,
            force=force,
            jsonnet=jsonnet,
            allow_pickle=allow_pickle,
            on_wait=lambda message: err.print(message, highlight=False),
            device=device,
            jobs=jobs if jobs is not None else default_jobs(),
        )
        summary = build(spec, options)
    if as_json:
        print(_summary_json(summary))
    else:
        _render_summary(summary)
    if dry_run and any(not t.up_to_date for t in summary.targets):
        raise typer.Exit(1)


def _options(cache_dir: Path | None, target: str | None, jsonnet: JsonnetArgs) -> BuildOptions:
    from mergebuild.build import BuildOptions

    return BuildOptions(cache_dir=_cache_dir(cache_dir), target=target, jsonnet=jsonnet)


@app.command("plan")
def plan_command(
    spec: SpecArg,
    target: TargetOpt = None,
    as_json: JsonOpt = False,
    cache_dir: CacheOpt = None,
    tla_str: TlaStr = [],  # noqa: B006
    tla_code: TlaCode = [],  # noqa: B006
    ext_str: ExtStr = [],  # noqa: B006
    ext_code: ExtCode = [],  # noqa: B006
) -> None:
    """Say what a build would read (per source), reuse and compute, and under a budget its bound."""
    from mergebuild.build import plan

    statuses = plan(spec, _options(cache_dir, target, _jsonnet_args(tla_str, tla_code, ext_str, ext_code)))
    if as_json:
        print(json.dumps([asdict(s) for s in statuses], default=str, indent=2, sort_keys=True))
        return
    for status in statuses:
        p = status.plan
        head = "up to date" if status.stale is None else f"to build: {status.stale}"
        out.print(f"[bold]{status.name}[/bold] ({p.method}) -> {status.output}: {head}")
        counts = {a: sum(n.action == a for n in p.nodes) for a in ("reuse", "compute", "copy")}
        work = sum(n.expert_work_reused for n in p.nodes)
        out.print(
            f"  tensors: {counts['compute']} to merge, {counts['copy']} to copy, {counts['reuse']} cached; "
            f"per-expert work reused: {work}"
        )
        table = Table(title_justify="left")
        table.add_column("source")
        table.add_column("to read", justify="right")
        for source, nbytes in sorted(p.bytes_by_source().items()):
            table.add_row(source, _size(nbytes))
        table.add_row("[bold]total[/bold]", _size(p.bytes_to_read))
        out.print(table)
        if p.budget is not None:
            b = p.budget
            bound = "unknown" if b.bound is None else f"{b.bound:.6g}"
            out.print(
                f"  budget {_size(b.budget_bytes)} of {_size(b.full_bytes)} expert bytes: "
                f"{_size(b.allocated_bytes)} allocated; bound on the omitted update: {bound}"
            )
            budget_table = Table(title_justify="left")
            for column in ("expert", "allocated", "of", "delta norm kept"):
                budget_table.add_column(column, justify="left" if column == "expert" else "right")
            for key, (got, full, kept) in b.experts.items():
                budget_table.add_row(key, _size(got), _size(full), "?" if kept is None else f"{kept:.1%}")
            out.print(budget_table)
            if b.blocks_without_stats:
                out.print(
                    f"  {b.blocks_without_stats} block(s) have no statistics yet: ranked by weight only"
                )


@app.command("explain")
def explain_command(
    spec: SpecArg,
    tensor: Annotated[str | None, typer.Argument(help="Explain only this output tensor.")] = None,
    target: TargetOpt = None,
    as_json: JsonOpt = False,
    cache_dir: CacheOpt = None,
    tla_str: TlaStr = [],  # noqa: B006
    tla_code: TlaCode = [],  # noqa: B006
    ext_str: ExtStr = [],  # noqa: B006
    ext_code: ExtCode = [],  # noqa: B006
) -> None:
    """Say, per output tensor, whether it is reused or rebuilt and why (which digest or parameter changed)."""
    from mergebuild.build import plan

    statuses = plan(spec, _options(cache_dir, target, _jsonnet_args(tla_str, tla_code, ext_str, ext_code)))
    nodes = [(s.name, n) for s in statuses for n in s.plan.nodes if tensor is None or n.name == tensor]
    if tensor is not None and not nodes:
        raise MergebuildError(f"no output tensor {tensor!r}")
    if as_json:
        print(json.dumps([{"target": t, **asdict(n)} for t, n in nodes], indent=2, sort_keys=True))
        return
    reused = 0
    for name, node in nodes:
        if node.action == "reuse" and tensor is None:
            reused += 1
            continue
        read = sum(r.nbytes for r in node.reads)
        out.print(f"{name}: {escape(node.name)}: {node.action} (reads {_size(read)})")
        for reason in node.reasons:
            out.print(f"    because {escape(reason)}")
        if node.expert_work_reused:
            out.print(f"    reusing the cached per-expert work of {node.expert_work_reused} model(s)")
    if reused:
        out.print(f"{reused} tensor(s) reused from the cache")


@app.command("index")
def index_command(
    spec: SpecArg,
    target: TargetOpt = None,
    as_json: JsonOpt = False,
    cache_dir: CacheOpt = None,
    tla_str: TlaStr = [],  # noqa: B006
    tla_code: TlaCode = [],  # noqa: B006
    ext_str: ExtStr = [],  # noqa: B006
    ext_code: ExtCode = [],  # noqa: B006
) -> None:
    """Hash the spec's sources into the cache and record delta statistics (what a budget plans with)."""
    from mergebuild.build import index

    read = index(spec, _options(cache_dir, target, _jsonnet_args(tla_str, tla_code, ext_str, ext_code)))
    if as_json:
        print(json.dumps({"bytes_read": read}))
    else:
        out.print(f"indexed: read {_size(read)}")


@app.command("gc")
def gc_command(
    cache_dir: CacheOpt = None,
    max_size: Annotated[
        str | None,
        typer.Option("--max-size", help="Size cap, e.g. 20GB (default: $MERGEBUILD_CACHE_MAX or 50GiB)."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would be removed; remove nothing.")
    ] = False,
) -> None:
    """Evict least-recently-used cache blobs until the cache fits its size cap."""
    from mergebuild.cache import Cache, max_cache_bytes
    from mergebuild.spec import parse_size

    try:
        cap = parse_size(max_size) if max_size is not None else max_cache_bytes()
    except ValueError as e:  # from --max-size; max_cache_bytes names its variable itself
        raise MergebuildError(f"--max-size: {e}") from None
    cache = Cache(_cache_dir(cache_dir))
    try:
        report = cache.gc(cap, dry_run=dry_run)
    finally:
        cache.close()
    verb = "would remove" if dry_run else "removed"
    out.print(
        f"{verb} {report.removed} blob(s), {_size(report.removed_bytes)}; "
        f"kept {report.kept}, {_size(report.kept_bytes)} (cap {_size(cap)})"
    )


@app.command("eval")
def eval_command(
    spec: SpecArg,
    tla_str: TlaStr = [],  # noqa: B006
    tla_code: TlaCode = [],  # noqa: B006
    ext_str: ExtStr = [],  # noqa: B006
    ext_code: ExtCode = [],  # noqa: B006
) -> None:
    """Print the evaluated, validated spec as JSON."""
    from mergebuild.build import load_spec

    loaded = load_spec(spec, _jsonnet_args(tla_str, tla_code, ext_str, ext_code))
    print(json.dumps(loaded.evaluated, indent=2, sort_keys=True))


@app.command("import-mergekit")
def import_mergekit_command(
    config: Annotated[Path, typer.Argument(help="The mergekit YAML config.")],
    output: Annotated[
        str | None,
        typer.Option("--output", "-o", help="The spec's output directory (default: out/<config name>)."),
    ] = None,
    spec_dir: Annotated[
        Path | None,
        typer.Option(
            "--spec-dir",
            help="Where the spec will live: relative model paths are rewritten to resolve from there "
            "(default: the current directory, which mergekit resolves them from).",
        ),
    ] = None,
) -> None:
    """Print the spec equivalent to a mergekit config (Jsonnet: JSON under comments that say what differs)."""
    from mergebuild.mergekit_config import import_mergekit

    imported = import_mergekit(config, output, spec_dir)
    for reference in imported.unresolved:
        err.print(
            f"[yellow]warning:[/yellow] {escape(reference)} is neither a local path nor in the Hugging Face "
            "cache; the spec names it as written",
            highlight=False,
            soft_wrap=True,
        )
    print(imported.render(), end="")


@app.command("verify")
def verify_command(
    spec: SpecArg,
    target: TargetOpt = None,
    tla_str: TlaStr = [],  # noqa: B006
    tla_code: TlaCode = [],  # noqa: B006
    ext_str: ExtStr = [],  # noqa: B006
    ext_code: ExtCode = [],  # noqa: B006
) -> None:
    """Check that each output on disk still matches the lockfile (exit 1 if not)."""
    from mergebuild.build import verify

    results = verify(spec, _jsonnet_args(tla_str, tla_code, ext_str, ext_code), target)
    failed = False
    for result in results:
        if result.problems:
            failed = True
            for problem in result.problems:
                out.print(f"[red]✗[/red] {result.target}: {result.output}: {problem}")
        else:
            out.print(f"[green]✓[/green] {result.target}: {result.output} matches the lockfile")
    if failed:
        raise typer.Exit(1)


@app.command("init-demo")
def init_demo_command(
    directory: Annotated[Path, typer.Argument(help="Where to write the demo family.")] = Path(
        "specs/models/demo"
    ),
) -> None:
    """Generate the demo checkpoint family (a tiny Llama base and three experts)."""
    from mergebuild.demo import write_demo_family

    for path in write_demo_family(directory):
        out.print(f"ready {path}")


@app.command("version")
def version_command() -> None:
    """Print mergebuild's version."""
    print(__version__)


def main() -> None:
    """Entry point: run the app, turning user errors into one line and an exit code."""
    memory.use_huge_pages()
    memory.use_one_arena()
    try:
        app()
    except MergebuildError as e:
        if _debug:
            raise
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted; nothing was published")
        sys.exit(130)
