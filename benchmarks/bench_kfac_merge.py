"""K-FAC Fisher merges with and without the Kronecker preconditioner, side by side.

The three CNNs of the MNIST demo (:func:`curvmerge.demo.vision_setup`; ``--quick``: the
reduced setup on sklearn digits), the registry's damping grid (1e-1, 1e-2, 1e-3, relative to
the damping scale as ``merge`` uses it), rtol 1e-6 (the registry's), one process:

1. **K-FAC Fisher merge** (registry row ``fisher_kfac``; K-FAC factors of the exact kind
   on all Fisher batches, as :class:`~curvmerge.experiment.StatisticsStore` computes them):

   - plain CG, the grid by one multi-shift run (:meth:`~curvmerge.PreparedMerge.merge_dampings`
     without a preconditioner, as the runner solves it);
   - ``preconditioner="kronecker"`` (mean factors) and ``"kronecker:frobenius"``
     (Van Loan–Pitsianis): one solve per damping, the first warm-started from the diagonal
     merge, each next from the previous damping's solution (what ``merge_dampings`` does
     with a preconditioner); the preconditioner is rebuilt per damping and its build
     seconds are counted (``sketch_seconds``).

   Prints per damping: CG products of the summed system (one product applies the three
   K-FAC operators), converged, the true relative residual, and the grid's seconds; then
   the seconds of one system product and of one preconditioner application (medians,
   interleaved), so products convert to work.
2. **Exact-Fisher (GGN) merge** (registry row ``fisher_exact``, 256 Fisher examples per task,
   the demo's rtol 1e-3 and cap 300 (:data:`curvmerge.demo.VISION_EXACT_OPTIONS`; float32
   GGN products do not reach 1e-6 here; ``--ggn-rtol``, ``--ggn-maxiter``); ``--skip-ggn``
   leaves it out): plain multi-shift CG against CG with a
   K-FAC preconditioner (:class:`~curvmerge.precondition.KroneckerPreconditioner` of K-FAC
   factors of the exact kind on the same examples, one extra pass per model, whose seconds
   are printed), both from zero, at the same absolute damping
   :math:`\\lambda = \\text{damping} \\cdot s` (the plain run's damping scale :math:`s`).

``--dtypes float32,float64`` also solves the K-FAC merge with float64 operators (the
models' float32 is the registry's): it separates convergence from float32's floor.

Run: ``python benchmarks/bench_kfac_merge.py [--quick] [--maxiter 2000] [--skip-ggn]
[--skip-kfac] [--dtypes float32,float64] [--ggn-rtol 1e-3] [--ggn-maxiter 300] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

DAMPINGS = (1e-1, 1e-2, 1e-3)


def _median_seconds(fns: dict, repeats: int) -> dict[str, float]:
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _row(name: str, r, extra: str = "") -> str:
    rep = r.report
    products = rep.costs.cg_products + rep.costs.warm_start_products
    return (
        f"| {name} | {rep.damping:g} | {products} | {'yes' if rep.converged else 'NO'} | "
        f"{rep.relative_residual:.2e} | {extra} |"
    )


def _header() -> None:
    print("| solver | damping | CG products | converged | true rel. residual | notes |")
    print("| --- | ---: | ---: | --- | ---: | --- |")


def _kfac_part(setup, store, dtype, maxiter: int, rtol: float) -> None:
    from curvmerge.merging import PreparedMerge
    from curvmerge.merging.system import system_operator
    from curvmerge.precondition import KroneckerPreconditioner

    t0 = time.perf_counter()
    ops = store.kfac_operators()
    kfac_seconds = time.perf_counter() - t0
    ops = [F.to(dtype=dtype) for F in ops]
    T = len(ops)
    common = dict(rtol=rtol, maxiter=maxiter)
    plain = PreparedMerge(setup.models, ops, **common)
    P = plain.space.size
    print(
        f"\n## K-FAC Fisher merge: {T} CNNs, {P:,} parameters, {dtype}, rtol {rtol:g}, "
        f"maxiter {maxiter} (K-FAC factors: {kfac_seconds:.1f} s for {T} models)\n"
    )
    _header()
    t0 = time.perf_counter()
    grid = plain.merge_dampings(None, DAMPINGS)
    grid_seconds = time.perf_counter() - t0
    for r in grid:
        print(_row("plain CG, multi-shift grid", r, "own products of the shared run"))
    print(
        f"| plain CG, multi-shift grid | all | {grid.products} | "
        f"{'yes' if all(r.report.converged for r in grid) else 'NO'} | | "
        f"{grid_seconds:.2f} s for the grid |"
    )
    totals = {"plain CG (multi-shift grid)": (grid.products, grid_seconds)}
    for name in ("kronecker", "kronecker:frobenius"):
        pre = PreparedMerge(setup.models, ops, preconditioner=name, **common)
        t0 = time.perf_counter()
        res = pre.merge_dampings(None, DAMPINGS)
        seconds = time.perf_counter() - t0
        build = sum(r.report.costs.sketch_seconds for r in res)
        for r in res:
            rep = r.report
            print(
                _row(
                    f"`{name}`",
                    r,
                    f"{rep.preconditioner}; build {rep.costs.sketch_seconds:.3f} s; "
                    f"warm start {'yes' if rep.warm_start else 'no'}",
                )
            )
        products = sum(r.report.costs.cg_products + r.report.costs.warm_start_products for r in res)
        print(
            f"| `{name}` | all | {products} | "
            f"{'yes' if all(r.report.converged for r in res) else 'NO'} | | "
            f"{seconds:.2f} s for the grid ({build:.3f} s building) |"
        )
        totals[f"`{name}`"] = (products, seconds)
    scale = grid[-1].report.damping_scale
    lam = DAMPINGS[-1] * scale
    A = system_operator(ops, [1 / T] * T, lam, ops[0].space, ops[0].dtype, ops[0].device)
    M = KroneckerPreconditioner(ops, None, lam)
    x = torch.randn(P, dtype=ops[0].dtype)
    t = _median_seconds({"A": lambda: A @ x, "M": lambda: M @ x}, 30)
    print(
        f"\none system product (3 K-FAC products): {t['A'] * 1e3:.2f} ms; one preconditioner "
        f"application: {t['M'] * 1e3:.2f} ms ({t['M'] / t['A']:.2f} products)"
    )
    base_p, base_s = totals["plain CG (multi-shift grid)"]
    for name, (p, s) in totals.items():
        print(f"{name}: {p} products, {s:.2f} s ({p / base_p:.2f}x products, {s / base_s:.2f}x s)")


def _ggn_part(setup, store, maxiter: int, rtol: float, examples: int) -> None:
    from curvmerge.experiment.pools import first_examples
    from curvmerge.merging import PreparedMerge
    from curvmerge.operators import KroneckerOperator
    from curvmerge.operators.ggn import GGNOperator
    from curvmerge.precondition import KroneckerPreconditioner
    from curvmerge.statistics import kfac_factors

    ops = store.operators(GGNOperator)
    T = len(ops)
    plain = PreparedMerge(setup.models, ops, rtol=rtol, maxiter=maxiter)
    P = plain.space.size
    print(
        f"\n## Exact-Fisher (GGN) merge: {T} CNNs, {P:,} parameters, {examples} examples per "
        f"task, rtol {rtol:g}, maxiter {maxiter}\n"
    )
    t0 = time.perf_counter()
    kfac = []
    for model, batches in zip(setup.models, setup.fisher_data, strict=True):
        factors = kfac_factors(
            model,
            "cross_entropy",
            first_examples(batches, examples),
            kind="exact",
            params=list(plain.space.names),
        )
        kfac.append(KroneckerOperator.from_kfac(plain.space, factors))
    kfac_seconds = time.perf_counter() - t0
    _header()
    t0 = time.perf_counter()
    grid = plain.merge_dampings(None, DAMPINGS)
    grid_seconds = time.perf_counter() - t0
    for r in grid:
        print(_row("plain CG, multi-shift grid", r, "own products of the shared run"))
    print(f"| plain CG, multi-shift grid | all | {grid.products} | | | {grid_seconds:.2f} s |")
    scale = grid[0].report.damping_scale
    pre = PreparedMerge(
        setup.models, ops, rtol=rtol, maxiter=maxiter, damping_scale=scale, warm_start=False
    )
    total_p, total_s, build = 0, 0.0, 0.0
    for d in DAMPINGS:
        t0 = time.perf_counter()
        M = KroneckerPreconditioner(kfac, None, d * scale)
        b = time.perf_counter() - t0
        pre.preconditioner = M
        t0 = time.perf_counter()
        r = pre.merge(None, d)
        s = time.perf_counter() - t0
        p = r.report.costs.cg_products
        total_p, total_s, build = total_p + p, total_s + s + b, build + b
        print(_row("K-FAC preconditioner (mean), from zero", r, f"{s:.2f} s + build {b:.3f} s"))
    print(
        f"| K-FAC preconditioner | all | {total_p} | | | {total_s:.2f} s + K-FAC factors "
        f"{kfac_seconds:.2f} s ({T} passes) |"
    )
    print(
        f"\nGGN: K-FAC-preconditioned / plain grid: {total_p / grid.products:.2f}x products, "
        f"{(total_s + kfac_seconds) / grid_seconds:.2f}x seconds (K-FAC factors included)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced digits setup (< 1 min)")
    parser.add_argument("--maxiter", type=int, default=None, help="CG cap (2000; quick 500)")
    parser.add_argument("--rtol", type=float, default=1e-6, help="CG tolerance (registry's)")
    parser.add_argument("--dtypes", default="float32", help="comma-separated operator dtypes")
    parser.add_argument("--skip-ggn", action="store_true", help="leave out the GGN merge")
    parser.add_argument("--skip-kfac", action="store_true", help="leave out the K-FAC merge")
    parser.add_argument("--ggn-rtol", type=float, default=None, help="(the demo's, 1e-3)")
    parser.add_argument("--ggn-maxiter", type=int, default=None, help="(the demo's, 300)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    maxiter = args.maxiter or (500 if args.quick else 2000)

    from curvmerge.demo import VISION_EXACT_OPTIONS, vision_setup
    from curvmerge.experiment import StatisticsStore

    t0 = time.perf_counter()
    kwargs = dict(dataset="digits", base_steps=30, task_steps=40, fisher_examples=128)
    setup = vision_setup(progress=False, **(kwargs if args.quick else {}))
    examples = 128 if args.quick else 256
    store = StatisticsStore(
        setup.models,
        setup.fisher_data,
        ["cross_entropy"] * len(setup.models),
        setup.params,
        fisher_kind="exact",
        exact_examples=examples,
    )
    print(
        f"# {'digits (quick)' if args.quick else 'MNIST-5k'} demo, {len(setup.models)} CNNs "
        f"({time.perf_counter() - t0:.1f} s to train), {torch.get_num_threads()} thread(s)"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the rows say which solves did not converge
        for name in [] if args.skip_kfac else args.dtypes.split(","):
            _kfac_part(setup, store, getattr(torch, name.strip()), maxiter, args.rtol)
        if not args.skip_ggn:
            rtol = args.ggn_rtol or VISION_EXACT_OPTIONS["rtol"]
            cap = args.ggn_maxiter or VISION_EXACT_OPTIONS["maxiter"]
            _ggn_part(setup, store, cap, rtol, examples)


if __name__ == "__main__":
    main()
