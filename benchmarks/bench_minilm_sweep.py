"""Exact-Fisher damping grid and weight sweep of two MiniLM bodies (issue 15's MiniLM figures).

Two all-MiniLM-L6-v2 classifiers fine-tuned from the same checkpoint (Rotten Tomatoes and
airline tweets, as ``curvmerge demo --text``; ``--tasks 3`` adds deflategate tweets, for the
damping grid only), a ``GGNOperator`` per model on ``--examples`` training texts (length 64),
CG to ``--rtol`` (the demo's 1e-3). Measured in one process:

1. the registry's damping grid (0.1, 0.01, 0.001): its hardest damping alone vs all three by
   multi-shift CG (one Krylov space);
2. a ``--points``-point weight sweep ``w = (a, 1 - a)`` at damping 0.1: one accurate solve at
   (0.5, 0.5); every point screened from one reduced basis to ``--screen-rtol``
   (``sweep(screen="subspace")``) with the choice re-solved to ``--rtol``; and, as the
   reference, an accurate sweep (every point to ``--rtol`` from zero,
   ``sweep(warm_start=False)``) over every ``--reference-every``-th point of the grid
   (every point of it: ``1``; the full reference costs about ``points`` solves). From zero,
   because at these dampings a solve to 1e-3 warm-started from another point keeps that
   point's components in the directions of small curvature (``--agreement``: 8-9
   validation points apart), so a warm-started reference would depend on the sweep's order.

Prints products of the summed system (each applies every GGN once), per-model products, the
basis size, seconds and gradient-pass equivalents (the unit: one forward and backward pass
over one model's GGN texts, timed in the same run), the validation score of each choice, and
the choices' agreement. The reduced basis holds (T + 1) x basis vectors x 22.7M float32
numbers (about 0.27 GB per vector for two bodies).

Run: ``python benchmarks/bench_minilm_sweep.py [--examples 64] [--points 25]
[--reference-every 4] [--threads 2] [--skip-grid | --skip-sweep] [--tasks 3]`` (about half
an hour on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def main() -> None:
    from _units import gradient_pass_seconds

    from curvmerge.demo import TEXT_TASKS, text_setup
    from curvmerge.experiment import StatisticsStore
    from curvmerge.merging.registry import get_method
    from curvmerge.operators.ggn import GGNOperator

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=64, help="GGN examples per model")
    parser.add_argument("--points", type=int, default=25)
    parser.add_argument("--reference-every", type=int, default=4)
    parser.add_argument("--rtol", type=float, default=1e-3)
    parser.add_argument("--screen-rtol", type=float, default=1e-2)
    parser.add_argument("--maxiter", type=int, default=300)
    parser.add_argument("--damping", type=float, default=0.1, help="the weight sweep's damping")
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps per task")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--max-vectors", type=int, default=None,
        help="cap on the reduced basis (memory: 3 x vectors x 91 MB; default: --maxiter); "
        "points it leaves above --screen-rtol are reported",
    )  # fmt: skip
    parser.add_argument("--skip-grid", action="store_true", help="only the weight sweep")
    parser.add_argument("--skip-sweep", action="store_true", help="only the damping grid")
    parser.add_argument(
        "--agreement", action="store_true",
        help="instead of the sweep: one point (1/3, 2/3) solved from the diagonal merge and "
        "warm-started from (0, 1) to --rtol, and from the diagonal merge towards 1e-6 within "
        "--maxiter, each one's validation score and distance",
    )  # fmt: skip
    parser.add_argument(
        "--tasks", type=int, default=2, choices=(2, 3),
        help="bodies merged (3: the three text tasks of `curvmerge demo --text`)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.tasks != 2 and not args.skip_sweep:
        parser.error("the weight sweep is of two bodies: use --skip-sweep with --tasks 3")
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    setup = text_setup(names=TEXT_TASKS[: args.tasks], steps=args.steps, progress=False)
    store = StatisticsStore(
        setup.models,
        setup.fisher_data,
        ["cross_entropy"] * args.tasks,
        setup.params,
        names=setup.names,
        exact_examples=args.examples,
    )
    ops = store.operators(GGNOperator)
    P = sum(p.numel() for n, p in setup.models[0].named_parameters() if n in set(setup.params))
    unit = gradient_pass_seconds(ops)
    print(
        f"{args.tasks} MiniLM bodies ({P:,} merged parameters), GGN on "
        f"{[op.num_data for op in ops]} texts (the first batches of 16 holding at least "
        f"{args.examples}), {args.threads} threads; setup {time.perf_counter() - t0:.0f} s; "
        f"one gradient pass over one model's GGN texts {unit:.2f} s (median of 3, the unit "
        "below)",
        flush=True,
    )
    args.unit = unit
    kw = dict(base=setup.base, params=setup.params, rtol=args.rtol, maxiter=args.maxiter)

    # 1. the damping grid
    dampings = [p["damping"] for p in get_method("fisher_exact").grid_points()]
    if not args.skip_grid:
        damping_grid(setup, ops, dampings, kw, args)

    # 2. the weight sweep
    if args.agreement:
        agreement(setup, ops, kw, args)
    elif not args.skip_sweep:
        weight_sweep(setup, ops, kw, args)


def _evaluator(setup):
    """Validation of the two bodies, each with its own head (the sweeps' score)."""
    from curvmerge.experiment import TaskData
    from curvmerge.experiment.evaluation import Evaluator

    tasks = [
        TaskData(setup.names[k], val=setup.sweep_val[k], test=setup.test[k], fisher_batches=[])
        for k in range(2)
    ]
    return Evaluator(setup.models, tasks, setup.params, batch_size=64)


def agreement(setup, ops, kw, args) -> None:
    """Do two solves of one point to ``--rtol`` agree on validation? From the diagonal merge
    (``PreparedMerge``'s first solve), warm-started from the point (0, 1), and from the
    diagonal merge towards 1e-6 (within ``--maxiter``)."""
    from curvmerge.merging import PreparedMerge

    ev = _evaluator(setup)
    w, d = (1 / 3, 2 / 3), args.damping
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PreparedMerge(setup.models, ops, **kw)
        runs = {}
        pm.reset()
        runs[f"from the diagonal merge, rtol {args.rtol:g}"] = pm.merge(w, d)
        pm.reset()
        pm.merge((0.0, 1.0), d)
        runs[f"warm from (0, 1), rtol {args.rtol:g}"] = pm.merge(w, d)
        pm.rtol = 1e-6
        pm.reset()
        longest = f"from the diagonal merge, towards 1e-6 (at most {args.maxiter} iterations)"
        runs[longest] = pm.merge(w, d)
    ref = runs[longest].params
    ref_norm = sum(float(ref[n].norm() ** 2) for n in ref) ** 0.5
    print(f"\nOne point (1/3, 2/3) at damping {d:g}, solved three ways:")
    print("| solve | products | relative residual | converged | validation | "
          "distance to the longest solve |")  # fmt: skip
    print("| --- | ---: | ---: | --- | ---: | ---: |")
    for name, r in runs.items():
        val = sum(ev.validate(r).values()) / 2
        dist = sum(float((r.params[n] - ref[n]).norm() ** 2) for n in ref) ** 0.5 / ref_norm
        rep = r.report
        print(f"| {name} | {rep.products} | {rep.relative_residual:.1e} | {rep.converged} | "
              f"{val:.4f} | {dist:.2e} |", flush=True)  # fmt: skip


def damping_grid(setup, ops, dampings, kw, args) -> None:
    from curvmerge.merging import PreparedMerge

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = PreparedMerge(setup.models, ops, **kw)
        t0 = time.perf_counter()
        hardest = prepared.merge(damping=min(dampings))
        h_s = time.perf_counter() - t0
        prepared.reset()
        t0 = time.perf_counter()
        grid = prepared.merge_dampings(dampings=dampings)
        g_s = time.perf_counter() - t0
    hp, T, u = hardest.report.products, len(ops), args.unit
    print(f"\nDamping grid {dampings}, rtol {args.rtol:g}:")
    print("| solve | products | per-model products | / hardest alone | seconds | "
          "gradient passes | converged |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    print(f"| hardest damping alone | {hp} | {T * hp} | 1.00 | {h_s:.0f} | {h_s / u:.0f} | "
          f"{hardest.report.converged} |")  # fmt: skip
    print(f"| multi-shift CG, one Krylov space | {grid.products} | {T * grid.products} | "
          f"{grid.products / hp:.2f} | {g_s:.0f} | {g_s / u:.0f} | "
          f"{[r.report.converged for r in grid]} |", flush=True)  # fmt: skip
    print(f"seconds ratio (grid / hardest alone): {g_s / h_s:.2f}; process peak resident "
          f"memory {_peak_rss_gib():.1f} GiB")  # fmt: skip


def _peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def weight_sweep(setup, ops, kw, args) -> None:
    from curvmerge.merging import PreparedMerge, line_grid, sweep

    ev = _evaluator(setup)
    weights = line_grid(args.points)
    common = dict(validate=ev.validate, dampings=[args.damping], verbose=False, **kw)
    screen_kw = dict(common, screen_max_vectors=args.max_vectors)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = PreparedMerge(setup.models, ops, **kw)
        t0 = time.perf_counter()
        single = one.merge((0.5, 0.5), args.damping)
        s_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        screened = sweep(setup.models, ops, weights=weights, screen_rtol=args.screen_rtol,
                         screen="subspace", **screen_kw)  # fmt: skip
        sc_s = time.perf_counter() - t0 - screened.eval_seconds
        ref_weights = weights[:: args.reference_every]
        if weights[-1] not in ref_weights:
            ref_weights.append(weights[-1])
        t0 = time.perf_counter()
        reference = sweep(setup.models, ops, weights=ref_weights, warm_start=False, **common)
        r_s = time.perf_counter() - t0 - reference.eval_seconds
        # the screened choice solved accurately, scored like the reference points
        chosen = screened.best_point.coefficients["weights"]
        chosen_val = screened.best_point.validation  # the screened merge's own score
        accurate_choice = screened.best_result  # re-solved to rtol by the sweep
        chosen_acc = sum(ev.validate(accurate_choice).values()) / 2
    sp = single.report.products
    print(
        f"\nWeight sweep, {args.points} points at damping {args.damping:g}; one solve at "
        f"(0.5, 0.5) to rtol {args.rtol:g}: {sp} products ({2 * sp} per-model), {s_s:.0f} s "
        f"= {s_s / args.unit:.0f} gradient passes"
    )
    print("| sweep | points | products | / one solve | seconds (no evaluation) | "
          "gradient passes | chosen | val |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    for name, out, n, seconds in (
        (f"one reduced basis to {args.screen_rtol:g}, choice re-solved", screened,
         len(weights), sc_s),
        (f"reference: every point to {args.rtol:g} from zero", reference, len(ref_weights),
         r_s),
    ):  # fmt: skip
        bp = out.best_point
        w = ", ".join(f"{x:.3g}" for x in bp.coefficients["weights"])
        print(f"| {name} | {n} | {out.products} | {out.products / sp:.2f} | {seconds:.0f} | "
              f"{seconds / args.unit:.0f} | ({w}) | {bp.validation:.4f} |")  # fmt: skip
    first = screened.points[0]
    converged = all(p.converged for p in screened.points)
    worst = max(p.relative_residual for p in screened.points)
    print(
        f"reduced basis: {first.iterations} vectors; re-solve {screened.refine_products} "
        f"products; every screened point converged: {converged} (worst relative residual "
        f"{worst:.1e}); peak resident memory of the process {_peak_rss_gib():.1f} GiB"
    )
    print(
        f"screened choice ({', '.join(f'{x:.3g}' for x in chosen)}): screened validation "
        f"{chosen_val:.4f}, solved accurately {chosen_acc:.4f}; the reference's best "
        f"{reference.best_point.validation:.4f} (a {len(ref_weights)}-point accurate grid)"
    )


if __name__ == "__main__":
    main()
