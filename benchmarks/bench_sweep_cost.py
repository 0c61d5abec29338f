"""Cost of coefficient sweeps against the statistics they reuse (issues 6 and 15).

Three parts, each measured side by side in one process:

1. **The demo's exact-Fisher damping grid** (issue 15): the three MNIST-5k CNNs of
   ``make demo`` (:func:`curvmerge.demo.vision_setup`, 256 Fisher examples per task, one
   thread as the demo), the ``fisher_exact`` registry grid of dampings, at the demo's
   tolerance and cap (:data:`curvmerge.demo.VISION_EXACT_OPTIONS`; ``--rtol``,
   ``--maxiter``), solved

   - its hardest (smallest) damping alone (warm-started from the diagonal merge, as one
     point of the runner);
   - point by point, as the runner did before multi-shift CG (one CG solve per damping, each
     warm-started from the previous point);
   - point by point as the demo did before (registry tolerance, 80 iterations per point);
   - by one multi-shift CG run (:meth:`curvmerge.PreparedMerge.merge_dampings`, one Krylov
     space, each damping its own stopping test and true residual), as the runner now does.

   Prints products of the summed system (each applies the three curvatures), seconds, and
   the ratios to the hardest point alone. The operators' caches are built and the damping
   scale and right-hand sides prepared before any timing.
2. **A two-model exact-Fisher weight sweep** (issue 15, ``--weight-sweep``): 25 points
   ``w = (a, 1 - a)`` of the first two CNNs at one damping, every point solved to the
   tolerance (each warm-started from the previous) vs screened (:func:`curvmerge.sweep`
   ``screen_rtol``: every point to a loose tolerance, the chosen one re-solved) by CG point by
   point or from one reduced basis for all points (``screen="subspace"``); products against
   one accurate solve, and whether the choices match on validation.
3. **A 25-point diagonal-Fisher sweep of two MiniLM bodies** (issue 6, ``--examples``):
   diagonal Fishers of the exact kind on N examples each (length 64), then ``w = (a, 1 - a)``
   with :class:`curvmerge.PreparedMerge` (each point elementwise work only); prints the
   Fisher time, the sweep time and their ratio. The models are the pretrained body with
   fresh heads: the costs do not depend on fine-tuning.

Run: ``python benchmarks/bench_sweep_cost.py [--quick] [--weight-sweep]`` (the exact-Fisher
parts; ``--quick``: the demo's reduced setup on sklearn digits, 128 Fisher examples) and
``python benchmarks/bench_sweep_cost.py --examples 256 512 1024 [--threads 2]`` (MiniLM).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from _units import gradient_pass_seconds


def _setup(quick: bool):
    from curvmerge.demo import vision_setup
    from curvmerge.experiment import StatisticsStore
    from curvmerge.operators.ggn import GGNOperator

    kwargs = dict(dataset="digits", base_steps=30, task_steps=40, fisher_examples=128)
    setup = vision_setup(progress=False, **(kwargs if quick else {}))
    store = StatisticsStore(
        setup.models,
        setup.fisher_data,
        ["cross_entropy"] * len(setup.models),
        setup.params,
        names=setup.names,
        exact_examples=256,
    )
    return setup, store.operators(GGNOperator)


def _exact_grid(setup, ops, quick: bool, rtol: float | None, maxiter: int | None) -> None:
    from curvmerge.demo import VISION_EXACT_OPTIONS
    from curvmerge.merging import PreparedMerge
    from curvmerge.merging.registry import get_method

    spec = get_method("fisher_exact")
    dampings = [p["damping"] for p in spec.grid_points()]
    rtol = VISION_EXACT_OPTIONS["rtol"] if rtol is None else rtol
    maxiter = VISION_EXACT_OPTIONS["maxiter"] if maxiter is None else maxiter
    # damping scale, diagonals, right-hand sides, operator caches: built here, not timed
    prepared = PreparedMerge(
        setup.models, ops, base=setup.base, params=setup.params, rtol=rtol, maxiter=maxiter
    )
    P, T = prepared.space.size, len(ops)
    unit = gradient_pass_seconds(ops)
    print(
        f"{'digits (quick)' if quick else 'MNIST-5k'} demo: {T} CNNs, {P:,} shared parameters, "
        f"{torch.get_num_threads()} thread(s); dampings {dampings}, rtol {rtol:g}, "
        f"maxiter {maxiter}; preparation: {prepared.prepare_costs}; one gradient pass over "
        f"one model's GGN data {unit * 1e3:.0f} ms (the unit of 'gradient passes')"
    )

    def point_by_point(tol, cap):
        prepared.reset()
        prepared.rtol, prepared.maxiter = tol, cap
        t0 = time.perf_counter()
        results = [prepared.merge(damping=d) for d in dampings]
        prepared.rtol, prepared.maxiter = rtol, maxiter
        return results, sum(r.report.products for r in results), time.perf_counter() - t0

    def describe(results):
        return "; ".join(
            f"{r.report.damping:g}: {r.report.iterations} it, res {r.report.relative_residual:.1e}"
            + ("" if r.report.converged else " (NOT converged)")
            for r in results
        )

    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the rows say which points did not converge
        prepared.reset()
        t0 = time.perf_counter()
        hardest = prepared.merge(damping=min(dampings))
        h_seconds = time.perf_counter() - t0
        rows.append(("hardest damping alone", [hardest], hardest.report.products, h_seconds))
        rows.append(("point by point", *point_by_point(rtol, maxiter)))
        before = f"point by point, rtol {spec.options['rtol']:g}, cap 80 (demo before)"
        rows.append((before, *point_by_point(spec.options["rtol"], 80)))
        prepared.reset()
        t0 = time.perf_counter()
        grid = prepared.merge_dampings(dampings=dampings)
        seconds = time.perf_counter() - t0
        rows.append(("multi-shift CG, one Krylov space (demo now)", list(grid), grid.products))
        rows[-1] = (*rows[-1], seconds)
    hp = hardest.report.products
    print(
        "| solve | products of the sum | per-model products | seconds | gradient passes "
        "| products / hardest | seconds / hardest | per damping |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, results, products, seconds in rows:
        print(
            f"| {name} | {products} | {products * T} | {seconds:.1f} | {seconds / unit:.0f} | "
            f"{products / hp:.2f} | {seconds / h_seconds:.2f} | {describe(results)} |",
            flush=True,
        )
    by_point = rows[1]
    print(
        f"multi-shift / point by point: {grid.products / by_point[2]:.2f}x products, "
        f"{rows[-1][3] / by_point[3]:.2f}x seconds"
    )
    # the shared run's (recurrence) residuals: iterations each damping needs at a tolerance
    for tol in [t for t in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6) if t >= rtol]:
        its = [
            next((k for k, v in enumerate(r.report.residual_history) if v <= tol), None)
            for r in grid
        ]
        print(
            f"iterations to relative residual {tol:g}: "
            + ", ".join(f"{d:g}: {'-' if k is None else k}" for d, k in zip(dampings, its))
        )


def _weight_sweep(setup, ops, points: int, damping: float, rtol: float, screen_rtol: float):
    """A two-model exact-Fisher weight sweep: every point to ``rtol`` vs screened."""
    from curvmerge.experiment import TaskData
    from curvmerge.experiment.evaluation import Evaluator
    from curvmerge.merging import PreparedMerge, line_grid, sweep

    models, curvatures = setup.models[:2], ops[:2]
    tasks = [
        TaskData(setup.names[k], val=setup.val[k], test=setup.test[k], fisher_batches=[])
        for k in range(2)
    ]
    ev = Evaluator(models, tasks, setup.params, batch_size=256)
    kwargs = dict(
        validate=ev.validate,
        weights=line_grid(points),
        dampings=[damping],
        base=setup.base,
        params=setup.params,
        rtol=rtol,
        verbose=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = PreparedMerge(models, curvatures, params=setup.params, rtol=rtol)
        t0 = time.perf_counter()
        single = one.merge((0.5, 0.5), damping)  # one accurate solve, as one merge
        single_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        accurate = sweep(models, curvatures, **kwargs)
        accurate_seconds = time.perf_counter() - t0 - accurate.eval_seconds
        t0 = time.perf_counter()
        screened = sweep(models, curvatures, screen_rtol=screen_rtol, **kwargs)
        screened_seconds = time.perf_counter() - t0 - screened.eval_seconds
        t0 = time.perf_counter()
        subspace = sweep(models, curvatures, screen_rtol=screen_rtol, screen="subspace", **kwargs)
        subspace_seconds = time.perf_counter() - t0 - subspace.eval_seconds
    sp = single.report.products
    unit = gradient_pass_seconds(curvatures)
    print(
        f"\nTwo-model exact-Fisher weight sweep: {points} points, damping {damping:g}; one "
        f"solve at (0.5, 0.5) to rtol {rtol:g}: {sp} products, {single_seconds:.1f} s "
        f"= {single_seconds / unit:.0f} gradient passes"
    )
    print(
        "| sweep | products | / one solve | seconds (no evaluation) | gradient passes | "
        "chosen weights | val |"
    )
    print("| --- | ---: | ---: | ---: | ---: | --- | ---: |")
    for name, out, seconds in (
        (f"every point to rtol {rtol:g} (warm starts)", accurate, accurate_seconds),
        (f"screened at rtol {screen_rtol:g}, choice re-solved", screened, screened_seconds),
        (
            f"one reduced basis to rtol {screen_rtol:g} for all points, choice re-solved",
            subspace,
            subspace_seconds,
        ),
    ):
        bp = out.best_point
        print(
            f"| {name} | {out.products} | {out.products / sp:.2f} | {seconds:.1f} | "
            f"{seconds / unit:.0f} | "
            f"({', '.join(f'{w:.3g}' for w in bp.coefficients['weights'])}) | "
            f"{bp.validation:.4f} |"
        )
    for name, out in (("CG-screened", screened), ("subspace-screened", subspace)):
        same = out.best == accurate.best
        gap = accurate.points[out.best].validation - accurate.best_point.validation
        print(
            f"{name} choice {'matches' if same else 'differs from'} the accurate sweep's"
            + ("" if same else f" (solved accurately, it scores {gap:+.4f} against the best)")
        )
    first = subspace.points[0]
    print(
        f"subspace basis: {first.iterations} vectors ({first.iterations} products of each "
        f"model), re-solve of the choice {subspace.refine_products} products"
    )


def _minilm_sweep(examples, points: int) -> None:
    from curvmerge.data import text_tasks, tokenize
    from curvmerge.fisher import diagonal_fisher
    from curvmerge.merging import PreparedMerge, line_grid
    from curvmerge.models import body_names, load_minilm, load_minilm_tokenizer
    from curvmerge.train import iter_batches

    tokenizer = load_minilm_tokenizer()
    tasks = text_tasks(("airline", "deflategate"))
    models = [load_minilm(3, seed=i + 1) for i in range(2)]
    names = body_names(models[0])
    print(
        f"MiniLM body: {sum(p.numel() for n, p in models[0].named_parameters() if n in names):,}"
        f" parameters, {torch.get_num_threads()} threads, {points} points"
    )
    print("| examples per model | Fisher (2 models) s | sweep s (prepare + merges) | ratio |")
    print("| --- | --- | --- | --- |")
    for n in examples:
        fishers, fisher_seconds = [], 0.0
        for model, task in zip(models, tasks, strict=True):
            train = tokenize(task.train, tokenizer)
            data = list(iter_batches({k: v[:n] for k, v in train.items()}, 16))
            start = time.perf_counter()
            fishers.append(
                diagonal_fisher(model, "cross_entropy", data, params=names, progress=False)
            )
            fisher_seconds += time.perf_counter() - start
        start = time.perf_counter()
        prepared = PreparedMerge(models, fishers, damping_scale=1.0)  # absolute damping
        for w in line_grid(points):
            prepared.merge(w, damping=1e-8)
        sweep_seconds = time.perf_counter() - start
        print(
            f"| {n} | {fisher_seconds:.1f} | {sweep_seconds:.2f} | "
            f"{100 * sweep_seconds / fisher_seconds:.2f}% |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the demo's reduced digits setup")
    parser.add_argument("--rtol", type=float, default=None, help="CG tolerance (the demo's)")
    parser.add_argument("--maxiter", type=int, default=None, help="CG cap (the demo's)")
    parser.add_argument(
        "--weight-sweep", action="store_true", help="also a screened two-model exact sweep"
    )
    parser.add_argument("--sweep-damping", type=float, default=0.1)
    parser.add_argument("--screen-rtol", type=float, default=1e-2)
    parser.add_argument(
        "--minilm",
        action="store_true",
        help="the MiniLM diagonal sweep (also implied by --examples; alone, it skips the "
        "exact-Fisher parts unless --exact)",
    )
    parser.add_argument("--exact", action="store_true", help="the exact-Fisher parts too")
    parser.add_argument("--examples", type=int, nargs="+", default=None, help="MiniLM: N")
    parser.add_argument("--points", type=int, default=25)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (exact parts: 1, as the demo)"
    )
    args = parser.parse_args()
    minilm = args.minilm or args.examples is not None
    if args.exact or not minilm or args.quick or args.weight_sweep:
        previous = torch.get_num_threads()
        torch.set_num_threads(args.threads or 1)
        setup, ops = _setup(args.quick)
        _exact_grid(setup, ops, args.quick, args.rtol, args.maxiter)
        if args.weight_sweep:
            from curvmerge.demo import VISION_EXACT_OPTIONS

            rtol = VISION_EXACT_OPTIONS["rtol"] if args.rtol is None else args.rtol
            _weight_sweep(setup, ops, args.points, args.sweep_damping, rtol, args.screen_rtol)
        torch.set_num_threads(previous)
    if minilm:
        if args.threads:
            torch.set_num_threads(args.threads)
        _minilm_sweep(args.examples or [256, 512, 1024], args.points)


if __name__ == "__main__":
    main()
