"""The experiment runner: statistics once, coefficients on validation, test once.

:func:`run_experiment` takes a :class:`~curvmerge.experiment.ModelPool`, a task pool (one
:class:`~curvmerge.experiment.TaskData` per model) and methods (registry names, or
:class:`MethodRun` entries that override a method's grid and options), and

1. evaluates the reference rows on test: each fine-tuned body with every task's head
   (``model: <task>``), the base, and the majority class of each task's training labels;
2. for each method, fetches the statistics its registry row needs from one
   :class:`~curvmerge.experiment.StatisticsStore` (every diagonal Fisher and GGN operator is
   computed once, whatever the number of methods and grid points), merges at every point of
   its grid (methods that are points of the merge equation share one
   :class:`~curvmerge.merging.PreparedMerge`), scores each point on the validation splits
   only, and evaluates the chosen point once on the test splits;
3. warns with :class:`~curvmerge.train.OneClassWarning` when a merge predicts one class for
   nearly every test input of a task while the labels are not that skewed.

Under :mod:`torch.distributed` (``docs/distributed.md``) every process runs the same
experiment on the same models and data: the statistics store gives each process its shard
of the statistics batches and the curvature computers sum over the processes, CG runs in
lockstep, and every process evaluates the full validation and test splits, so every process
holds the same result (progress and ``log`` lines on rank 0 only; writing is the caller's).

The :class:`ExperimentResult` holds the test metrics of every row (accuracy, macro-F1, MSE
for regression tasks), the chosen coefficients and their validation scores, every sweep, the
merged parameters and the costs (seconds, operator products, data passes).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

from curvmerge.distributed import is_main_process
from curvmerge.experiment.evaluation import Evaluator, majority_metrics
from curvmerge.experiment.pools import ModelPool, TaskData, fisher_batches
from curvmerge.experiment.spec import (
    DEFAULT_METHODS,
    REFERENCE_ROW,
    ExperimentResult,
    MethodRun,
    Settings,
)
from curvmerge.experiment.statistics import StatisticsStore
from curvmerge.merging.prepared import PreparedMerge
from curvmerge.merging.registry import MethodSpec, method_prior, rescale
from curvmerge.merging.report import (
    ConvergenceWarning,
    MergeResult,
    SolveProgress,
    parameters_of,
)
from curvmerge.merging.sweep import grid_search
from curvmerge.train import check_one_class

__all__ = ["run_experiment"]

_PREPARED_OPTIONS = ("prior", "damping_scale", "rtol", "maxiter", "preconditioner", "warm_start")


def _say(log: Callable[[str], None] | None, msg: str) -> None:
    if log is not None:
        log(msg)


def _scaled_maker(spec: MethodSpec, run: MethodRun, pool: ModelPool, names, curvatures):
    """``make(**point)`` for a method whose merge is :math:`\\theta_0 + s\\,\\Delta`
    (``spec.scaled``): one merge at scaling 1 per value of the other options, rescaled
    (:func:`~curvmerge.merging.registry.rescale`) for every ``scaling`` of the grid."""
    unit_merges: dict[str, Any] = {}

    def make(**point):
        options = {**spec.options, **run.fixed_options(), **point}
        scaling = options.pop("scaling")
        key = repr(sorted(options.items()))
        if key not in unit_merges:
            unit_merges[key] = spec(
                pool.models, base=pool.base, curvatures=curvatures, params=names,
                scaling=1.0, **options,
            )  # fmt: skip
        return rescale(unit_merges[key], pool.base, scaling)

    return make


def _maker(
    spec: MethodSpec,
    run: MethodRun,
    pool: ModelPool,
    names,
    curvatures,
    points,
    progress=False,
    log=None,
):
    """``make(**point)`` runs the method at a point, and the grid search's preparation costs.

    An equation method whose grid varies only weights and damping gets one PreparedMerge for
    its whole grid (statistics stacked once); any other method (or a grid over, say, the
    prior) is called through its registry row at each point, with the same statistics.
    With operator curvatures and no preconditioner, the dampings of each weight point are
    solved together by one multi-shift CG run (:meth:`PreparedMerge.merge_dampings`, one
    Krylov space, at about the cost of the hardest damping): the first of those points
    runs it and carries its products (``spent_products``), the others read their results.
    """
    if spec.scaled and pool.base is not None:
        return _scaled_maker(spec, run, pool, names, curvatures), {}
    if not spec.equation or any(set(p) - {"weights", "damping"} for p in points):

        def call(**point):
            options = {**run.fixed_options(), **point}
            return spec(pool.models, base=pool.base, curvatures=curvatures, params=names, **options)

        return call, {}
    fixed = {**spec.options, **run.fixed_options()}
    if "prior" in fixed:  # another method's merge as the prior: computed once for the grid
        fixed["prior"] = method_prior(fixed["prior"], pool.models, base=pool.base, params=names)
    prepared = PreparedMerge(
        pool.models,
        curvatures,
        base=pool.base,
        params=names,
        **{k: fixed[k] for k in _PREPARED_OPTIONS if k in fixed},
    )
    maxiter = fixed.get("maxiter")
    require = fixed.get("require_convergence", False)

    def resolve(point):
        weights = point.get("weights", fixed.get("weights"))
        key = None if weights is None else tuple(weights)
        return weights, key, point.get("damping", fixed.get("damping"))

    # the dampings of each weight point, in grid order: shared where multi-shift CG applies
    grids: dict[Any, list] = {}
    for point in points:
        _, key, damping = resolve(point)
        grids.setdefault(key, []).append(damping)
    if prepared.kind != "operator" or prepared.preconditioner is not None:
        grids = {}
    pending: dict[Any, list] = {}
    if prepared.kind == "operator":  # the stage's bound, said before it starts
        solves = sum(1 for g in grids.values() if len(g) > 1) + sum(
            1 for p in points if len(grids.get(resolve(p)[1], ())) < 2
        )
        shared = solves < len(points)
        cap = f"at most {maxiter} iterations" if maxiter is not None else "no iteration cap"
        _say(
            log,
            f"{spec.name}: {len(points)} points in {solves} CG solve(s)"
            + (" (each weight point's dampings from one Krylov space)" if shared else "")
            + f", each {cap} (option maxiter), rtol {prepared.rtol:g}",
        )

    def solve_grid(weights, key):
        dampings = grids[key]
        bar = None
        if progress:  # one bar for the whole grid: it is one solve
            bar = SolveProgress(
                curvatures, total=maxiter, desc=f"{spec.name} CG ({len(dampings)} dampings)"
            )
        results = None
        try:
            results = prepared.merge_dampings(
                weights, dampings, require_convergence=require, callback=bar
            )
        finally:
            if bar is not None and results is not None:
                bar.finish(costs=results.costs, residual=results.relative_residual)
            elif bar is not None:
                bar.finish()
        hardest = max(r.report.iterations for r in results)
        _say(
            log,
            f"{spec.name}: {len(dampings)} dampings solved by one multi-shift CG run, "
            f"{hardest} iterations, {results.products} products"
            + (f" (cap maxiter={maxiter})" if maxiter is not None else ""),
        )
        pending[key] = list(results)

    def make(**point):
        weights, key, damping = resolve(point)
        if len(grids.get(key, ())) > 1:
            if not pending.get(key):
                solve_grid(weights, key)
            result = pending[key].pop(0)
            if result.report.damping != damping:
                raise RuntimeError("runner: the damping grid's results came out of order")
            return result
        bar = None
        if progress and prepared.kind == "operator":  # one bar per CG solve
            bar = SolveProgress(curvatures, total=maxiter, desc=f"{spec.name} CG")
        try:
            result = prepared.merge(
                weights=weights,
                damping=damping,
                require_convergence=require,
                callback=bar,
            )
        except BaseException:
            if bar is not None:
                bar.finish()
            raise
        if bar is not None:
            bar.finish(result.report)
        return result

    costs = {
        "prepare_seconds": prepared.prepare_seconds,
        "prepare_products": prepared.prepare_products,
        "prepare_costs": prepared.prepare_costs,
    }
    return make, costs


def _skip_reason(spec: MethodSpec, pool: ModelPool) -> str | None:
    if spec.needs_base and pool.base is None:
        return "no base model"
    if spec.num_models is not None and spec.num_models != len(pool.models):
        return f"merges exactly {spec.num_models} models, the pool has {len(pool.models)}"
    if spec.operator is not None:
        try:
            spec.operator_class()
        except ImportError as err:
            return str(err)
    return None


def _check_runs(runs: Sequence[MethodRun], pool: ModelPool) -> None:
    labels = {"base", REFERENCE_ROW}
    for run in runs:
        run.check()
        if run.name in labels or run.name.startswith("model: "):
            raise ValueError(
                f"the row label {run.name!r} is taken (by another method or a reference row); "
                "give the method a label"
            )
        labels.add(run.name)
        prior = {**run.spec.options, **run.fixed_options()}.get("prior")
        if prior == "base" and pool.base is None:
            raise ValueError(f"method {run.name!r}: prior 'base' needs a base model")


def run_experiment(
    pool: ModelPool,
    tasks: Sequence[TaskData],
    methods: Sequence[str | MethodRun | Mapping[str, Any]] = DEFAULT_METHODS,
    *,
    settings: Settings | None = None,
    store: StatisticsStore | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> ExperimentResult:
    """Merge the pool's models with each method, choosing coefficients on validation.

    Args:
        pool: The task models, the base, the shared parameters.
        tasks: One task per model, in the same order.
        methods: Registry names, :class:`MethodRun` entries or their mappings.
        settings: Statistics and evaluation settings (default :class:`Settings`).
        store: A statistics store to use (and fill); default: a new one from ``settings``.
        progress: Progress bars while computing statistics (rank 0 only).
        log: Called with progress lines (nothing is printed otherwise; rank 0 only).

    Returns:
        An :class:`ExperimentResult`; coefficients are chosen on the validation splits, and
        the test splits are evaluated once per row.

    Raises:
        ValueError: A method option or grid key the method does not have, two rows with one
            label, a task pool that does not match the model pool.
    """
    start = time.perf_counter()
    if not is_main_process():  # under torch.distributed: rank 0's bars and lines only
        progress, log = False, None
    settings = settings or Settings()
    tasks = list(tasks)
    if len(tasks) != len(pool.models):
        raise ValueError(f"{len(pool.models)} models for {len(tasks)} tasks: one model per task")
    if len({t.name for t in tasks}) != len(tasks):
        raise ValueError("task names must be unique")
    runs = [MethodRun.parse(m) for m in methods]
    _check_runs(runs, pool)
    names = pool.shared_names()
    task_names = [t.name for t in tasks]
    if store is None:
        batches = [
            t.fisher_batches
            if t.fisher_batches is not None
            else fisher_batches(
                t.train, settings.fisher_examples, settings.fisher_batch_size, settings.seed
            )
            for t in tasks
        ]
        store = StatisticsStore(
            pool.models,
            batches,
            [t.loss for t in tasks],
            names,
            names=list(pool.names or task_names),
            fisher_kind=settings.fisher_kind,
            mc_samples=settings.mc_samples,
            seed=settings.seed,
            exact_examples=settings.exact_examples,
            fisher_dir=settings.fisher_dir,
            progress=progress,
            log=log,
        )
    ev = Evaluator(pool.models, tasks, names, batch_size=settings.batch_size)
    res = ExperimentResult(tasks=task_names, settings=settings.as_dict())
    method_costs: dict[str, dict[str, Any]] = {}

    if settings.references:
        for task, model in zip(tasks, pool.models, strict=True):
            res.metrics[f"model: {task.name}"] = ev.body(parameters_of(model), "test")
            res.kinds[f"model: {task.name}"] = "model"
        if pool.base is not None:
            res.metrics["base"] = ev.body(parameters_of(pool.base), "test")
            res.kinds["base"] = "base"
        res.metrics[REFERENCE_ROW] = {t.name: majority_metrics(t) for t in tasks}
        res.kinds[REFERENCE_ROW] = "reference"
        _say(log, "evaluated the fine-tuned models, the base and the majority class")

    for run in runs:
        spec, label = run.spec, run.name
        reason = _skip_reason(spec, pool)
        if reason is not None:
            res.notes.append(f"{label}: skipped ({reason})")
            continue
        t_stats = time.perf_counter()
        op_class = spec.operator_class() if spec.operator is not None else None
        curvatures = store.get(spec.statistics, op_class)
        t0 = time.perf_counter()
        stats_seconds = t0 - t_stats
        points = run.points()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make, prep = _maker(spec, run, pool, names, curvatures, points, progress, log)
            found = grid_search(
                make,
                points,
                validate=ev.validate,
                method=label,
                statistics_seconds=sum(store.seconds[spec.statistics])
                if spec.statistics in store.seconds
                else None,
                **prep,
            )
        _relay(caught, label, res.notes)
        best = found.best_point
        metrics = ev.result(found.best_result, "test")
        res.metrics[label] = metrics
        res.kinds[label] = "merge" if spec.is_merge else found.best_result.kind
        res.choices[label] = dict(best.coefficients)
        res.validation[label] = best.validation
        if len(points) > 1:
            res.sweeps[label] = found
        if isinstance(found.best_result, MergeResult):
            res.merged[label] = found.best_result.params
        learned = getattr(found.best_result.report, "learned", None)
        if callable(learned):  # coefficients a method learned (AdaMerging, weight ensembling)
            res.learned[label] = learned()
        network = getattr(found.best_result, "network", None)
        if network is not None:
            res.networks[label] = found.best_result
        products = found.products  # a shared multi-shift run counted once
        detail: dict[str, Any] = {}
        if best.effective_damping is not None:
            detail["λ"] = best.effective_damping
        if products:
            detail["products"] = products
        passes = found.prepare_costs.diagonal_passes if found.prepare_costs else 0
        if passes:
            detail["diagonal passes"] = passes
        if not all(p.converged for p in found.points):
            maxiter = {**spec.options, **run.fixed_options()}.get("maxiter")
            note = (
                f"{label}: CG stopped at maxiter={maxiter} at "
                f"{sum(not p.converged for p in found.points)} of {len(found.points)} points "
                "(the chosen point is still the best on validation)"
            )
            res.notes.append(note)
            _say(log, note)  # said now too (stderr in the command), not only in the report
        res.details[label] = detail
        seconds = time.perf_counter() - t0
        res.seconds[label] = seconds
        method_costs[label] = {
            "seconds": seconds,
            "statistics": spec.statistics,
            "statistics_seconds": stats_seconds,
            "points": len(found.points),
            "merge_seconds": found.merge_seconds,
            "prepare_seconds": found.prepare_seconds,
            "validation_seconds": found.eval_seconds,
            "products": products,
            "diagonal_passes": passes,
            "prepare": str(found.prepare_costs) if found.prepare_costs else None,
        }
        for task in tasks:
            m = metrics[task.name]
            what = f"{label} on {task.name} (test)"
            if check_one_class(m, what=what, threshold=settings.one_class_share, warn=False):
                res.one_class.append(_one_class_entry(label, task.name, m))
                check_one_class(m, what=what, threshold=settings.one_class_share)
        mean = sum(ev.scores(metrics).values()) / len(tasks)
        _say(log, f"{label}: mean test score {mean:.4f} at {_fmt_choice(res.choices[label])}")

    for row, per_task in res.metrics.items():
        if res.kinds[row] not in ("model", "base"):  # method rows were checked above
            continue
        for task in tasks:
            if check_one_class(per_task[task.name], threshold=settings.one_class_share, warn=False):
                res.one_class.append(_one_class_entry(row, task.name, per_task[task.name]))

    stats = store.costs()
    if stats["diagonal_fisher"]["seconds"]:
        res.seconds["diagonal Fishers"] = sum(stats["diagonal_fisher"]["seconds"])
    if stats["exact_ggn"]["seconds"]:
        res.seconds["exact GGN operators"] = sum(stats["exact_ggn"]["seconds"])
    if stats["kfac"]["seconds"]:
        res.seconds["K-FAC factors"] = sum(stats["kfac"]["seconds"])
    if stats["input_gram"]["seconds"]:
        res.seconds["input Grams"] = sum(stats["input_gram"]["seconds"])
    res.seconds["evaluation"] = ev.seconds
    res.seconds["total"] = time.perf_counter() - start
    res.costs = {
        "statistics": stats,
        "gradient_pass_seconds": store.gradient_pass_seconds(),
        "methods": method_costs,
        "evaluation": {"seconds": ev.seconds, "calls": dict(ev.calls)},
    }
    res.notes.extend(store.notes)
    if store.loaded:
        res.notes.append(f"{store.loaded} diagonal Fisher(s) reused from Fisher files")
    res.settings["methods"] = [
        {"label": r.name, "method": r.spec.name, "grid": r.points(), "options": r.fixed_options()}
        for r in runs
    ]
    res.settings["tasks"] = [
        {"name": t.name, "loss": t.loss.name, "loss_spec": asdict(t.loss), "metric": t.metric}
        for t in tasks
    ]
    res.settings["params"] = {"count": len(names), "names": names}
    return res


def _one_class_entry(row: str, task: str, m: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "row": row,
        "task": task,
        "predicted_class": m["predicted_class"],
        "predicted_share": m["predicted_share"],
        "label_share": m["label_share"],
    }


def _relay(caught, label: str, notes: list[str]) -> None:
    """Convergence warnings become one note (counted above); others are noted and re-issued
    once per message."""
    seen = set()
    for w in caught:
        if issubclass(w.category, ConvergenceWarning):
            continue
        key = (w.category, str(w.message))
        if key in seen:
            continue
        seen.add(key)
        if w.category.__module__.startswith("curvmerge"):  # not torch's performance notes
            notes.append(f"{label}: {w.message}")
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _fmt_choice(choice: Mapping[str, Any]) -> str:
    if not choice:
        return "its defaults"
    return ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) and math.isfinite(v) else f"{k}={v}"
        for k, v in choice.items()
    )
