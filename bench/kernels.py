"""Sparsification kernels, before and after the radix-select rewrite (issue 5).

Times each kernel of ``mergebuild/methods/sparsify.py`` and ``mergebuild/rng.py``
against the implementation it replaced (kept below, as of commit 50cf15d), plus
``tensor_checks.all_finite`` against ``torch.isfinite(t).all()``, on float32
tensors of each ``--sizes`` element count and two kinds of data:

* ``gauss``: N(0, 1) deltas (almost no ties);
* ``bf16``: the float32 difference of two bf16 tensors (base N(0, 0.02), expert
  base + N(0, 0.002), both rounded to bf16), as real deltas are: heavy ties,
  many exact zeros.

Each figure is the median of ``--repeats`` runs of wall time; ``same`` says
whether old and new gave identical results (not for ``rescale_l1``: the old one
is torch's float32 sum, the new one sums exactly, so the factors can differ in
their last place). Every allocator setting runs in its
own child process (``default``: glibc as is; ``tuned``:
``memory.tune_allocator()`` first) so one cannot warm the other's heap; each
table ends with the child's peak RSS. ``--busy N`` keeps N extra processes
spinning meanwhile, as a read-ahead or writer thread would take a core during a
merge. The machine is whatever runs this (other load on it shows in the
figures); it asserts nothing.

Usage: ``python bench/kernels.py [--sizes 10M,50M] [--repeats 3] [--threads N]
[--busy N] [--allocators default,tuned] [--kinds gauss,bf16] [--kernels magnitude,...]``
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import comma_list

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mergebuild import memory, rng, tensor_checks
from mergebuild.methods import sparsify
from mergebuild.methods.sparse_delta import keep_in_place

# ----- the implementations replaced in issue 5 (commit 50cf15d) -----


def _old_stable_ranks(w: torch.Tensor, boundary: torch.Tensor) -> torch.Tensor:
    eq = w == boundary
    below = int((w < boundary).sum())
    ranks = torch.cumsum(eq, dim=0, dtype=torch.int64) - 1 + below
    return torch.where(eq, ranks, torch.full_like(ranks, -1))


def old_keep_rank_range(magnitudes: torch.Tensor, lo_rank: int, hi_rank: int) -> torch.Tensor:
    w = magnitudes.reshape(-1)
    n = w.numel()
    if hi_rank <= lo_rank or n == 0:
        return torch.zeros(magnitudes.shape, dtype=torch.bool)
    lo = torch.kthvalue(w, lo_rank + 1).values
    hi = torch.kthvalue(w, hi_rank).values
    keep = (w > lo) & (w < hi)
    for boundary in (lo, hi) if lo != hi else (lo,):
        ranks = _old_stable_ranks(w, boundary)
        keep |= (ranks >= lo_rank) & (ranks < hi_rank)
    return keep.reshape(magnitudes.shape)


def old_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    w = delta.abs().reshape(-1)
    n = w.numel()
    k = max(1, int(density * n))
    threshold = torch.kthvalue(w, n - k + 1).values
    keep = w > threshold
    room = k - int(keep.sum())
    tied = w == threshold
    keep |= tied & (torch.cumsum(tied, dim=0) <= room)
    return keep.reshape(delta.shape)


def old_magnitude_outliers(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    n = delta.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bottom = max(0, n - target - n_top)
    return old_keep_rank_range(delta.abs(), n_bottom, n_bottom + target)


def old_della(delta: torch.Tensor, uniforms: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    mags = delta.abs() if delta.dim() >= 2 else delta.abs().reshape(1, -1)
    mags = mags.movedim(1, -1)
    length = mags.shape[-1]
    order = torch.argsort(mags, dim=-1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(length).expand_as(order))
    if length > 1:
        rank_norm = ranks.to(torch.float64) / (length - 1)
    else:
        rank_norm = torch.full(ranks.shape, 0.5, dtype=torch.float64)
    probs = (density - epsilon) + rank_norm * (2 * epsilon)
    probs = probs.movedim(-1, 1)
    return uniforms < probs.reshape(delta.shape)


def old_rescale_l1(delta: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    before = delta.abs().sum()
    after = kept.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return kept
    return kept * (before / after)


def new_rescale_l1(delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    factor = sparsify.rescale_factor(delta, mask)
    kept = keep_in_place(delta.clone(), mask)
    return kept if factor is None else kept.mul_(factor)


def old_uniform(key: int, start: int, count: int) -> torch.Tensor:
    x = torch.arange(start, start + count, dtype=torch.int64)
    x.mul_(rng._signed(rng._GOLDEN)).add_(rng._signed(key))
    x.bitwise_xor_(rng._shr(x, 30)).mul_(rng._signed(rng._MIX1))
    x.bitwise_xor_(rng._shr(x, 27)).mul_(rng._signed(rng._MIX2))
    x.bitwise_xor_(rng._shr(x, 31))
    return rng._shr(x, 11).to(torch.float64).mul_(2.0**-53)


# ----- the measurements -----

KEY = 0x5EED_0F_15_5E_05
KERNELS = ("magnitude", "outliers", "rank_range", "random", "uniform", "della", "rescale_l1", "all_finite")


def make_delta(kind: str, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    if kind == "gauss":
        return torch.randn(n, generator=g)
    base = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
    expert = (base.float() + torch.randn(n, generator=g) * 0.002).to(torch.bfloat16)
    return expert.float() - base.float()


def cases(delta: torch.Tensor) -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    """kernel -> (old, new) zero-argument calls on `delta`."""
    n = delta.numel()
    rows = delta[: n - n % 4096].view(-1, 4096)  # della ranks within rows of a 4096-wide matrix
    u = rng.uniform(KEY, 0, rows.numel()).view(rows.shape)
    mask = rng.keep_mask(KEY, 0, n, 0.3)
    kept = delta * mask
    neg = -delta.abs()
    return {
        "magnitude": (lambda: old_magnitude(delta, 0.3), lambda: sparsify.magnitude(delta, 0.3)),
        "outliers": (
            lambda: old_magnitude_outliers(delta, 0.9, 0.01),
            lambda: sparsify.magnitude_outliers(delta, 0.9, 0.01),
        ),
        # sce's call: ranks of -variance below k.
        "rank_range": (
            lambda: old_keep_rank_range(neg, 0, n // 10),
            lambda: sparsify.keep_rank_range(neg, 0, n // 10),
        ),
        "random": (lambda: old_uniform(KEY, 0, n) < 0.3, lambda: rng.keep_mask(KEY, 0, n, 0.3)),
        "uniform": (lambda: old_uniform(KEY, 0, n), lambda: rng.uniform(KEY, 0, n)),
        "della": (
            lambda: old_della(rows, u, 0.5, 0.15),
            lambda: sparsify.della(rows, lambda part: u.reshape(-1)[part], 0.5, 0.15),
        ),
        "rescale_l1": (lambda: old_rescale_l1(delta, kept), lambda: new_rescale_l1(delta, mask)),
        "all_finite": (
            lambda: bool(torch.isfinite(delta).all()),
            lambda: tensor_checks.all_finite(delta),
        ),
    }


def median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def child(args: argparse.Namespace) -> None:
    tuned = args.child == "tuned"
    if tuned and not memory.tune_allocator():
        print("(tune_allocator is a no-op here: not glibc)")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"\n### allocator {args.child}, torch threads {torch.get_num_threads()}, busy {args.busy}\n")
    print("| kernel | data | n | old s | new s | speed-up | same |")
    print("|---|---|---:|---:|---:|---:|---|")
    for n in args.sizes:
        for kind in args.kinds:
            delta = make_delta(kind, n)
            for name, (old, new) in cases(delta).items():
                if name not in args.kernels or (kind != args.kinds[0] and name in ("random", "uniform")):
                    continue  # the random streams do not depend on the data
                ok = same(old(), new())  # also a warm-up
                t_old, t_new = median_time(old, args.repeats), median_time(new, args.repeats)
                row = [name, kind, f"{n / 1e6:g}M", f"{t_old:.3f}", f"{t_new:.3f}", f"{t_old / t_new:.1f}x"]
                print("| " + " | ".join([*row, "yes" if ok else "NO"]) + " |", flush=True)
            del delta
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS of this run: {rss_mib:.0f} MiB")


def size(text: str) -> int:
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:].upper(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def main() -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--sizes", type=comma_list(size), default=[10**7, 5 * 10**7])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    parser.add_argument("--busy", type=int, default=0, help="spinning processes alongside")
    parser.add_argument("--allocators", type=comma_list(), default=["default", "tuned"])
    parser.add_argument("--kinds", type=comma_list(), default=["gauss", "bf16"])
    parser.add_argument("--kernels", type=comma_list(), default=list(KERNELS))
    parser.add_argument("--child", choices=["default", "tuned"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; median of {args.repeats}; busy {args.busy}")
    argv = [a for a in sys.argv[1:] if not a.startswith("--child")]
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        for allocator in args.allocators:
            subprocess.run([sys.executable, __file__, *argv, f"--child={allocator}"], check=True)
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
