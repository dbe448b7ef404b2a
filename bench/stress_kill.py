"""Kill `mergebuild build` with SIGKILL at random moments and check what it leaves behind.

Not a test (it takes a couple of minutes); stdlib, torch and mergebuild only. It
writes a small checkpoint family, builds two variants of one spec (A and B) from
scratch to get reference outputs and lockfiles, then runs trials. Each trial:

1. sets up a start state: nothing built, or variant A's or B's output and lockfile in place;
2. writes the spec as variant A or B and starts `python -m mergebuild build` (with a
   cache shared by all trials, or a fresh one);
3. SIGKILLs it after a random delay between 0 and 1.1x the measured duration of a
   build (process start included; stratified, half of the delays after planning),
   so kills land in startup, reading, computing, writing, or after the end; every
   fourth trial instead kills the moment a file-system event opens a narrow window
   (the marker written into staging: the publish renames; the output renamed into
   place: the lockfile write), which random delays almost never hit;
4. checks the invariants below, runs `mergebuild verify` when there is a lockfile and
   an output, then reruns the build uninterrupted and checks it reproduces the
   reference for the variant exactly.

Invariants (a violation fails the run, exit status 1):
- the output path is absent or a complete output: byte-identical to the reference
  output of A or B (never a half output);
- the lockfile is valid JSON and is the start state's or the new variant's reference;
- a lockfile never names an output that is missing;
- the uninterrupted rerun succeeds, and its lockfile and output equal the variant's reference.

Reported, not failed (known gaps; see the summary): staging or retired directories
left next to the output (a killed process cannot remove them, and the next build
does not sweep them), a lockfile temp file left behind, and an output that is
already the new variant while the lockfile is still the old one (kill between
publish and the lockfile write; `verify` reports it, the next build repairs it).

    python bench/stress_kill.py                # 30 trials, 3-5 minutes on 2 cores
    python bench/stress_kill.py --trials 100 --seed 7 --work-dir /tmp/mb-stress
"""

from __future__ import annotations

import argparse
import collections
import filecmp
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergebuild.publish import MARKER
from mergebuild.safetensors_io import header_for

#: Family shape: a Llama-like layer stack, small enough to generate in a second.
HIDDEN = 128
LAYERS = 4
EXPERTS = 3
SPEC = "s.jsonnet"
LOCK = "s.lock.json"
OUT = "out"


def write_model(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
    """One safetensors file plus a config.json, written with mergebuild's own header writer."""
    directory.mkdir(parents=True, exist_ok=True)
    entries = [(name, t.dtype, tuple(t.shape)) for name, t in sorted(tensors.items())]
    with open(directory / "model.safetensors", "wb") as f:
        f.write(header_for(entries, {"format": "pt"}))
        for name, _, _ in entries:
            f.write(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    config = {"model_type": "llama", "num_hidden_layers": LAYERS, "hidden_size": HIDDEN}
    (directory / "config.json").write_text(json.dumps(config))


def make_family(root: Path) -> None:
    """A base and EXPERTS experts (bf16, about 5 MB each)."""
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (512, HIDDEN), "model.norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}self_attn.{proj}.weight"] = (HIDDEN, HIDDEN)
        shapes[f"{p}mlp.gate_proj.weight"] = (2 * HIDDEN, HIDDEN)
        shapes[f"{p}mlp.up_proj.weight"] = (2 * HIDDEN, HIDDEN)
        shapes[f"{p}mlp.down_proj.weight"] = (HIDDEN, 2 * HIDDEN)
        shapes[f"{p}input_layernorm.weight"] = (HIDDEN,)
    base = {n: torch.randn(s, generator=g) * 0.05 for n, s in shapes.items()}
    write_model(root / "base", {n: t.to(torch.bfloat16) for n, t in base.items()})
    for e in range(EXPERTS):
        expert = {
            n: (t + torch.randn(t.shape, generator=g) * 0.01).to(torch.bfloat16) for n, t in base.items()
        }
        write_model(root / f"expert{e}", expert)


def spec_text(variant: str) -> str:
    """Variant A and B differ in a coefficient and the seed: different outputs, same sources."""
    lam, seed = {"A": (1.0, 1), "B": (0.8, 2)}[variant]
    models = ", ".join(
        f"{{path: 'models/expert{e}', parameters: {{weight: {w}, density: 0.5}}}}"
        for e, w in zip(range(EXPERTS), (1.0, 0.7, 0.4), strict=False)
    )
    return (
        f"{{method: 'dare_ties', base: 'models/base', models: [{models}], "
        f"parameters: {{lambda: {lam}}}, seed: {seed}, output: '{OUT}'}}\n"
    )


def mergebuild(args: list[str], cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "mergebuild", *args],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def timed_build(work: Path, cache: Path) -> tuple[int, str, float, float]:
    """Build once: exit code, stderr, seconds, and seconds until the staging directory appeared."""
    started = time.perf_counter()
    proc = mergebuild(["build", SPEC, "--cache-dir", str(cache)], work)
    staged = None
    while proc.poll() is None:
        if staged is None and any(p.name.startswith(f".{OUT}.staging-") for p in work.iterdir()):
            staged = time.perf_counter() - started
        time.sleep(0.01)
    duration = time.perf_counter() - started
    err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
    return proc.returncode, err, duration, staged if staged is not None else duration


def run(args: list[str], cwd: Path) -> tuple[int, str]:
    proc = mergebuild(args, cwd)
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err.decode(errors="replace").strip()


def leftovers(work: Path) -> list[str]:
    """Staging and retired output directories, and lockfile temp files, beside the output."""
    return sorted(
        p.name for p in work.iterdir() if p.name.startswith((f".{OUT}.staging-", f".{OUT}.old-", f".{LOCK}."))
    )


def same_tree(a: Path, b: Path) -> bool:
    """Same file names and byte-identical files (shallow=False: contents, not stat)."""
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    return not mismatch and not errors


@dataclass
class Trial:
    index: int
    variant: str
    start: str
    cache: str
    delay: float
    fraction: float
    phase: str = ""
    output: str = ""
    lock: str = ""
    left: list[str] = field(default_factory=list)
    verify: str = ""
    rerun: str = ""
    trigger: str = "timed"
    violations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def classify_output(work: Path, refs: dict[str, Path]) -> str:
    out = work / OUT
    if not out.exists():
        return "absent"
    if out.is_symlink() or not out.is_dir():
        return "NOT A DIRECTORY"
    for name, ref in refs.items():
        if same_tree(out, ref):
            return name
    return "INCOMPLETE"


def classify_lock(work: Path, refs: dict[str, bytes]) -> str:
    path = work / LOCK
    if not path.exists():
        return "absent"
    data = path.read_bytes()
    try:
        json.loads(data)
    except ValueError:
        return "CORRUPT"
    for name, ref in refs.items():
        if data == ref:
            return name
    return "OTHER"


def inode(path: Path) -> int | None:
    return path.stat().st_ino if path.exists() else None


def staging_has_marker(work: Path, out_inode: int | None) -> bool:
    """publish() has written the marker into the staging directory: the renames come next."""
    return any((p / MARKER).exists() for p in work.glob(f".{OUT}.staging-*"))


def output_replaced(work: Path, out_inode: int | None) -> bool:
    """The output directory was just renamed into place: the lockfile write comes next."""
    return inode(work / OUT) not in (out_inode, None)


TRIGGERS = {"at publish": staging_has_marker, "after publish": output_replaced}


def wait_for(
    trigger: Callable[[Path, int | None], bool],
    work: Path,
    out_inode: int | None,
    proc: subprocess.Popen[bytes],
    timeout: float,
) -> bool:
    """Poll (about every 0.2 ms) until `trigger` holds, the build exits, or `timeout` passes."""
    deadline = time.perf_counter() + timeout
    while proc.poll() is None and time.perf_counter() < deadline:
        if trigger(work, out_inode):
            proc.send_signal(signal.SIGKILL)
            return True
        time.sleep(0.0002)
    return False


def infer_phase(work: Path, finished: bool, republished: bool, lock_rewritten: bool) -> str:
    """Where the kill landed, from what the killed build left behind."""
    if finished:
        return "finished"
    names = [p.name for p in work.iterdir()]
    staging = [work / n for n in names if n.startswith(f".{OUT}.staging-")]
    if any(n.startswith(f".{OUT}.old-") for n in names) or any((p / MARKER).exists() for p in staging):
        return "publish"
    if staging:
        return "write" if any(f for p in staging for f in p.glob("*.safetensors")) else "read/compute"
    if any(n.startswith(f".{LOCK}.") for n in names) or (republished and not lock_rewritten):
        return "lockfile"
    if lock_rewritten:
        return "exiting"  # everything written; killed on the way out
    return "startup/plan"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/mb-stress-kill"))
    parser.add_argument(
        "--trigger",
        choices=["mixed", "timed", *TRIGGERS],
        default="mixed",
        help="how every trial picks its kill moment (default: timed, and every fourth on a file event)",
    )
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = args.work_dir
    shutil.rmtree(root, ignore_errors=True)
    work, refs_dir = root / "work", root / "refs"
    make_family(work / "models")
    size = sum(p.stat().st_size for p in (work / "models").rglob("*.safetensors"))
    tensors = (LAYERS * 9 + 2) * (EXPERTS + 1)
    print(f"family: base + {EXPERTS} experts, {tensors} tensors, {size / 2**20:.1f} MiB")

    # Reference builds from scratch (fresh cache each), timed: the kill window. Builds with
    # the shared cache are shorter (sources already hashed, some work cached), so a variant
    # switch in a warm cache is timed too and each kind of build gets its own window.
    ref_out: dict[str, Path] = {}
    ref_lock: dict[str, bytes] = {}
    timings: dict[str, list[tuple[float, float]]] = {"fresh": [], "shared": []}
    shared_cache = root / "cache-shared"
    calibration = [("A", "fresh", True), ("B", "fresh", True)]
    # The first shared-cache build warms the cache and is not timed.
    calibration += [("A", "shared", False), ("B", "shared", True), ("A", "shared", True)]
    for variant, mode, timed in calibration:
        (work / SPEC).write_text(spec_text(variant))
        cache = shared_cache if mode == "shared" else root / f"cache-ref-{variant}"
        code, err, duration, staged = timed_build(work, cache)
        if code != 0:
            print(f"calibration build {variant} ({mode} cache) failed ({code}): {err}")
            return 1
        if mode == "fresh":
            ref_out[variant] = refs_dir / variant
            shutil.move(work / OUT, ref_out[variant])
            ref_lock[variant] = (work / LOCK).read_bytes()
            (work / LOCK).unlink()
            shutil.rmtree(cache)
        if timed:
            timings[mode].append((duration, staged))
    window = {mode: (max(d for d, _ in t), min(s for _, s in t)) for mode, t in timings.items()}
    for mode, (duration, staged) in window.items():
        print(
            f"{mode} cache: build {duration:.2f}s (process start included), staging appears at {staged:.2f}s"
        )

    trials: list[Trial] = []
    for i in range(args.trials):
        variant = rng.choice("AB")
        start = rng.choice(["clean", "A", "B"])
        cache_mode = rng.choice(["shared", "fresh"])
        # Stratified delays: even trials cover [0, 1.1] x duration evenly; odd ones cover the
        # part after process start and planning (staging dir created), where the writing is.
        duration, staged = window[cache_mode]
        low = 0.0 if i % 2 == 0 else staged / duration
        slot = (i // 2 + rng.random()) / ((args.trials + 1) // 2)
        fraction = low + (1.1 - low) * slot
        trial = Trial(i, variant, start, cache_mode, fraction * duration, fraction)
        # Every fourth trial kills on a file-system event instead of a timer.
        trial.trigger = "timed" if i % 4 != 3 else ("at publish", "after publish")[(i // 4) % 2]
        if args.trigger != "mixed":
            trial.trigger = args.trigger
        # Start state.
        shutil.rmtree(work / OUT, ignore_errors=True)
        (work / LOCK).unlink(missing_ok=True)
        if start != "clean":
            shutil.copytree(ref_out[start], work / OUT)
            (work / LOCK).write_bytes(ref_lock[start])
        cache = shared_cache if cache_mode == "shared" else root / f"cache-fresh-{i}"
        (work / SPEC).write_text(spec_text(variant))

        out_inode, lock_inode = inode(work / OUT), inode(work / LOCK)
        proc = mergebuild(["build", SPEC, "--cache-dir", str(cache)], work)
        started = time.perf_counter()
        if trial.trigger == "timed":
            time.sleep(trial.delay)
        else:
            # The publish renames and the lockfile write last milliseconds: a random delay
            # almost never lands there, so watch the files and kill the moment the window opens.
            fired = wait_for(TRIGGERS[trial.trigger], work, out_inode, proc, 3 * duration)
            trial.delay = time.perf_counter() - started
            trial.fraction = trial.delay / duration
            if not fired and proc.poll() is None:
                trial.notes.append("trigger never fired")
        finished = proc.poll() is not None
        if not finished:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        if finished and proc.returncode != 0:
            trial.violations.append(f"build exited {proc.returncode} before the kill")

        trial.output = classify_output(work, ref_out)
        trial.lock = classify_lock(work, ref_lock)
        trial.left = leftovers(work)
        republished = inode(work / OUT) not in (out_inode, None)
        lock_rewritten = inode(work / LOCK) not in (lock_inode, None)
        trial.phase = infer_phase(work, finished, republished, lock_rewritten)
        allowed_locks = {"absent" if start == "clean" else start, variant}
        if trial.output in ("INCOMPLETE", "NOT A DIRECTORY"):
            trial.violations.append(f"output is {trial.output}")
        if trial.lock not in allowed_locks:
            trial.violations.append(f"lockfile is {trial.lock}, expected one of {sorted(allowed_locks)}")
        if trial.lock in ("A", "B") and trial.output == "absent":
            trial.violations.append("lockfile names an output that is missing")
        # verify when the kill may have left them out of step (an untouched pair was checked above).
        if trial.lock in ("A", "B") and trial.output in ("A", "B") and (republished or lock_rewritten):
            code, _ = run(["verify", SPEC], work)
            trial.verify = "ok" if code == 0 else f"exit {code}"
            if (code == 0) != (trial.lock == trial.output):
                trial.violations.append(
                    f"verify exit {code} with lock {trial.lock} and output {trial.output}"
                )
            if trial.lock != trial.output:
                trial.notes.append(f"output is {trial.output} but lockfile still {trial.lock}")
        if trial.left:
            trial.notes.append(f"left behind: {', '.join(trial.left)}")

        # An uninterrupted rerun must reproduce the variant's reference exactly.
        code, err = run(["build", SPEC, "--cache-dir", str(cache)], work)
        if code != 0:
            trial.rerun = f"exit {code}"
            trial.violations.append(f"rerun failed: {err.splitlines()[-1] if err else code}")
        else:
            out_ok = classify_output(work, ref_out) == variant
            lock_ok = classify_lock(work, ref_lock) == variant
            trial.rerun = "reproduced" if out_ok and lock_ok else "DIFFERENT"
            if not (out_ok and lock_ok):
                trial.violations.append(
                    f"rerun output {'ok' if out_ok else 'differs'}, lock {'ok' if lock_ok else 'differs'}"
                )
        still = [name for name in leftovers(work) if name in trial.left]
        if still:
            trial.notes.append(f"rerun did not sweep {len(still)} leftover(s)")
        for name in leftovers(work):  # clear them so each trial reports its own
            path = work / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        if cache_mode == "fresh":
            shutil.rmtree(cache, ignore_errors=True)
        trials.append(trial)
        status = "FAIL " + "; ".join(trial.violations) if trial.violations else "ok"
        when = f"kill@{trial.fraction:4.2f}x" if trial.trigger == "timed" else f"kill {trial.trigger}"
        print(
            f"#{i:02d} {variant} from {start:5} cache={cache_mode:6} {when:18} "
            f"{trial.phase:13} out={trial.output:7} lock={trial.lock:7} rerun={trial.rerun:10} {status}"
            + (f"  [{'; '.join(trial.notes)}]" if trial.notes else "")
        )

    summarize(trials)
    return 1 if any(t.violations for t in trials) else 0


def summarize(trials: list[Trial]) -> None:
    buckets = [(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0), (1.0, 1.11)]
    phases = ["startup/plan", "read/compute", "write", "publish", "lockfile", "exiting", "finished"]
    print(
        "\nkill delay (x build duration; triggered kills at their measured time) by phase the kill landed in:"
    )
    print("| delay | " + " | ".join(phases) + " | violations | leftovers |")
    print("|---|" + "---|" * (len(phases) + 2))
    for low, high in buckets:
        rows = [t for t in trials if low <= t.fraction < high]
        counts = collections.Counter(t.phase for t in rows)
        print(
            f"| {low:.2f}-{min(high, 1.1):.2f} | "
            + " | ".join(str(counts.get(p, 0)) for p in phases)
            + f" | {sum(bool(t.violations) for t in rows)} | {sum(bool(t.left) for t in rows)} |"
        )
    for trigger in TRIGGERS:
        hit = collections.Counter(t.phase for t in trials if t.trigger == trigger)
        print(f"kills {trigger}: " + (", ".join(f"{p}: {n}" for p, n in sorted(hit.items())) or "none"))
    outcomes = collections.Counter((t.output, t.lock) for t in trials)
    print(
        "\n(output, lockfile) right after the kill: "
        + ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items()))
    )
    skew = sum(1 for t in trials if t.lock in ("A", "B") and t.output in ("A", "B") and t.lock != t.output)
    left = sum(bool(t.left) for t in trials)
    print(
        f"trials: {len(trials)}; invariant violations: {sum(bool(t.violations) for t in trials)}; "
        f"reruns reproduced: {sum(t.rerun == 'reproduced' for t in trials)}"
    )
    print(
        f"reported: {left} trial(s) left staging/retired dirs or a lockfile temp file; "
        f"{skew} left a new output under the old lockfile"
    )


if __name__ == "__main__":
    sys.exit(main())
