"""The reduced basis's own vector work: this checkout's ``reduced_basis_solve`` against
another checkout's, side by side in one run.

Two diagonal PSD operators of size ``--size`` (products cost one elementwise multiply, so the
time is the basis's orthogonalisation, Galerkin residuals and residual checks), ``--points``
systems ``(a F_1 + (1 - a) F_2 + damping I) y = a F_1 d_1 + (1 - a) F_2 d_2`` given as
combinations of two pieces (as ``merge_subspace`` gives them), grown to ``--vectors`` basis
vectors (a tolerance no system reaches), in ``--dtype``. Reports seconds per run
(interleaved repeats), basis size, checks, the worst relative residual and the worst relative
error against the systems' closed-form solutions (the operators are diagonal).

Run: ``python benchmarks/bench_reduced_basis.py [--size 4000000] [--vectors 40]
[--old CHECKOUT] [--repeats 2] [--threads 2] [--dtype float64]`` (``--old``: e.g. ``git worktree add
/tmp/old <commit>``; memory: 3 x vectors x size x 4 bytes per run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from _checkouts import load_old_module

from curvmerge.operators import DiagonalOperator
from curvmerge.reduced_basis import reduced_basis_solve
from curvmerge.space import ParamSpace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4_000_000)
    parser.add_argument("--vectors", type=int, default=40)
    parser.add_argument("--points", type=int, default=25)
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--old", help="checkout whose reduced_basis_solve is timed too")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    n, dtype = args.size, getattr(torch, args.dtype)
    diags = [torch.rand(n, generator=g, dtype=dtype) ** 8 * 10 for _ in range(2)]  # spread
    space = ParamSpace.from_tensors({"w": diags[0]})
    ops = [DiagonalOperator(space, d) for d in diags]
    pieces = [d * torch.randn(n, generator=g, dtype=dtype) for d in diags]
    grid = torch.linspace(0, 1, args.points).tolist()
    systems = [((a, 1 - a), args.damping, (a, 1 - a)) for a in grid]

    solvers = {"this checkout": reduced_basis_solve}
    if args.old:
        old = load_old_module(args.old, "old_reduced_basis", "curvmerge", "reduced_basis.py")
        solvers["old checkout"] = old.reduced_basis_solve
    seconds = {name: [] for name in solvers}
    results = {}
    for _ in range(args.repeats):
        for name, solve in solvers.items():
            t0 = time.perf_counter()
            results[name] = solve(
                ops, systems, rhs_pieces=pieces, rtol=1e-12, max_vectors=args.vectors
            )
            seconds[name].append(time.perf_counter() - t0)

    def worst_error(r) -> float:
        """Relative error of each solution against ``b / (λ + Σ w_t d_t)``, the worst."""
        errors = []
        for (w, lam, a), y in zip(systems, r.solutions, strict=True):
            b = a[0] * pieces[0] + a[1] * pieces[1]
            exact = b / (lam + w[0] * diags[0] + w[1] * diags[1])
            errors.append(float((y - exact).norm() / exact.norm()))
        return max(errors)

    print(
        f"# reduced basis: {args.points} systems, P = {n:,}, {args.vectors} vectors, "
        f"{args.dtype}, {args.threads} threads, load average {os.getloadavg()[0]:.2f}"
    )
    print(
        "| solver | seconds (median, range) | vectors | checks | worst relative residual | "
        "worst relative error |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        s = seconds[name]
        print(
            f"| {name} | {statistics.median(s):.1f} ({min(s):.1f}-{max(s):.1f}) | {r.vectors} | "
            f"{r.checks} | {max(r.relative_residuals):.2e} | {worst_error(r):.2e} |"
        )
    if args.old:
        ratio = statistics.median(seconds["this checkout"]) / statistics.median(
            seconds["old checkout"]
        )
        print(f"this / old: {ratio:.2f}")


if __name__ == "__main__":
    main()
