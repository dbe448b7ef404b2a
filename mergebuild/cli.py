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
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mergebuild import __version__
from mergebuild.build import BuildOptions, BuildSummary, JsonnetArgs, build, load_spec, verify
from mergebuild.demo import write_demo_family
from mergebuild.errors import MergebuildError

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
    table = Table(title="plan" if summary.dry_run else "build", title_justify="left")
    for column in (
        "target",
        "method",
        "read" if not summary.dry_run else "to read",
        "merged",
        "copied",
        "blocks",
    ):
        table.add_column(column, justify="left" if column in ("target", "method") else "right")
    if not summary.dry_run:
        table.add_column("written", justify="right")
        table.add_column("time", justify="right")
    for t in summary.targets:
        row = [t.name, t.method, _size(t.bytes_read if not summary.dry_run else t.bytes_to_read),
               str(t.tensors_merged), str(t.tensors_copied), str(t.blocks_computed)]  # fmt: skip
        if not summary.dry_run:
            row += [_size(t.bytes_written), f"{t.seconds:.2f}s"]
        table.add_row(*row)
    out.print(table)
    if not summary.dry_run:
        for t in summary.targets:
            out.print(f"wrote {t.output}")
        out.print(f"locked {summary.lockfile} in {summary.seconds:.2f}s")


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
    as_json: JsonOpt = False,
    cache_dir: CacheOpt = None,
    tla_str: TlaStr = [],  # noqa: B006 - typer reads the default
    tla_code: TlaCode = [],  # noqa: B006
    ext_str: ExtStr = [],  # noqa: B006
    ext_code: ExtCode = [],  # noqa: B006
) -> None:
    """Build the spec's targets, publish the outputs and write the lockfile."""
    options = BuildOptions(
        cache_dir=_cache_dir(cache_dir),
        target=target,
        locked=locked,
        dry_run=dry_run,
        force=force,
        jsonnet=_jsonnet_args(tla_str, tla_code, ext_str, ext_code),
    )
    summary = build(spec, options)
    if as_json:
        print(_summary_json(summary))
    else:
        _render_summary(summary)
    if dry_run:
        raise typer.Exit(1)


@app.command("eval")
def eval_command(
    spec: SpecArg,
    tla_str: TlaStr = [],  # noqa: B006
    tla_code: TlaCode = [],  # noqa: B006
    ext_str: ExtStr = [],  # noqa: B006
    ext_code: ExtCode = [],  # noqa: B006
) -> None:
    """Print the evaluated, validated spec as JSON."""
    loaded = load_spec(spec, _jsonnet_args(tla_str, tla_code, ext_str, ext_code))
    print(json.dumps(loaded.evaluated, indent=2, sort_keys=True))


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
    for path in write_demo_family(directory):
        out.print(f"ready {path}")


@app.command("version")
def version_command() -> None:
    """Print mergebuild's version."""
    print(__version__)


def main() -> None:
    """Entry point: run the app, turning user errors into one line and an exit code."""
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
