"""Run mergebuild on conformance cases and compare its outputs with mergekit's, tensor by tensor."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from tests.conformance.cases import Case, ambiguous_elements, rescale_slack, statistic_slack
from tests.conformance.ulp import ulp_diff
from tests.families import Family, load_tensors

#: Allowed distance, in units in the last place of the output dtype.
ULP_TOLERANCE = 1


def run_build(spec: dict, spec_path: Path, cache_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    """Write `spec` as JSON (valid Jsonnet) and run `python -m mergebuild build` on it."""
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec, indent=1))
    return subprocess.run(
        [sys.executable, "-m", "mergebuild", "build", str(spec_path), "--cache-dir", str(cache_dir), *extra],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=spec_path.parent,
    )


@dataclass
class BatchBuilder:
    """Builds many cases as targets of one spec, to pay mergebuild's start-up once.

    When the batch fails, it is split in halves and retried, so a failing case is
    isolated in O(log n) extra builds and the others still get their outputs.
    """

    root: Path
    cache_dir: Path
    attempts: int = 0

    def build(self, jobs: dict[str, tuple[Case, Family]]) -> dict[str, Path | str]:
        """Case id -> output directory, or the failing build's output (a str)."""
        if not jobs:
            return {}
        self.attempts += 1
        where = self.root / f"attempt{self.attempts}"
        outputs = {cid: where / cid for cid in jobs}
        targets = {cid: case.spec(family, outputs[cid]) for cid, (case, family) in jobs.items()}
        spec = targets[next(iter(targets))] if len(targets) == 1 else {"targets": targets}
        proc = run_build(spec, where / "spec.json", self.cache_dir)
        if proc.returncode == 0:
            return dict(outputs)
        if len(jobs) == 1:
            return {
                cid: f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}" for cid in jobs
            }
        ids = list(jobs)
        half = len(ids) // 2
        result = self.build({cid: jobs[cid] for cid in ids[:half]})
        result.update(self.build({cid: jobs[cid] for cid in ids[half:]}))
        return result


@dataclass
class Comparison:
    """What a case's comparison found."""

    problems: list[str]
    compared: int
    ambiguous: int
    #: Elements that differ by more than the tolerance but sit on a top-k tie.
    excused: int

    @property
    def ambiguous_fraction(self) -> float:
        return self.ambiguous / max(1, self.compared)


def compare_outputs(
    case: Case,
    family: Family,
    num_layers: int,
    mergekit_dir: Path,
    mergebuild_dir: Path,
) -> Comparison:
    """Compare every output tensor within ULP_TOLERANCE, excusing only top-k ties and the
    rounding of mergekit's float32 sums: of the rescale factor where the case rescales
    (`rescale_slack`), of whole-tensor statistics where the method has them
    (`statistic_slack`)."""
    expected = load_tensors(mergekit_dir)
    actual = load_tensors(mergebuild_dir)
    problems: list[str] = []
    if set(expected) != set(actual):
        missing = sorted(set(expected) - set(actual))
        extra = sorted(set(actual) - set(expected))
        problems.append(f"tensor names differ: missing {missing[:5]}, extra {extra[:5]}")
    base = load_tensors(family.base)
    experts = [load_tensors(family.experts[i]) for i, _ in case.models]
    compared = ambiguous = excused = 0
    for name in sorted(set(expected) & set(actual)):
        want, got = expected[name], actual[name]
        if want.dtype != got.dtype or want.shape != got.shape:
            problems.append(f"{name}: {got.dtype}{tuple(got.shape)} != {want.dtype}{tuple(want.shape)}")
            continue
        if not want.is_floating_point():
            if not torch.equal(want, got):
                problems.append(f"{name}: non-floating tensor differs")
            continue
        compared += want.numel()
        tie = ambiguous_elements(case, name, base[name], [e[name] for e in experts], num_layers)
        ambiguous += int(tie.sum())
        ulps = ulp_diff(got, want, want.dtype)
        over = ulps > ULP_TOLERANCE
        inputs = [e[name] for e in experts]
        for slack in (
            rescale_slack(case, name, base[name], inputs, num_layers),
            statistic_slack(case, base[name], inputs),
        ):
            if slack is not None:
                over &= (got.float() - want.float()).abs() > slack
        excused += int((over & tie).sum())
        bad = over & ~tie
        if bad.any():
            worst = int(torch.argmax(torch.where(bad, ulps, 0)))
            problems.append(
                f"{name}: {int(bad.sum())}/{want.numel()} elements over {ULP_TOLERANCE} ulp "
                f"(max {int(ulps[bad].max())} ulp at flat index {worst}: "
                f"mergebuild {got.reshape(-1)[worst].item():.9g}, "
                f"mergekit {want.reshape(-1)[worst].item():.9g})"
            )
    return Comparison(problems, compared, ambiguous, excused)
