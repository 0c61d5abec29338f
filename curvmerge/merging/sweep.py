"""Coefficient sweeps: choose weights and damping on validation data, report test once.

:func:`sweep` merges at every point of a grid with a :class:`~curvmerge.merging.prepared.
PreparedMerge` (per-model statistics computed once; a diagonal or identity point costs
elementwise work only; exact merges warm-start CG from the previous point), scores each point
with a ``validate`` callback, picks the best, and calls ``test`` on that point only: the test
split never takes part in the choice. :func:`grid_search` does the same for any method (task
arithmetic scaling, TIES density, ...).

The result times the work apart from evaluation: statistics (supplied, or measured when the
sweep computes them), preparation and merges. A 25-point sweep of two diagonal-Fisher models
should cost well under 2% of computing their Fishers; :meth:`SweepResult.summary` prints the
ratio.
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from curvmerge.merging.prepared import PreparedMerge
from curvmerge.merging.report import DampingWarning, MergeCosts, MergeResult
from curvmerge.merging.system import DEFAULT_DAMPING, check_damping, check_weights, warn_user
from curvmerge.operators import LinearOperator

__all__ = [
    "SweepPoint",
    "SweepResult",
    "grid_search",
    "sweep",
    "line_grid",
    "simplex_grid",
    "scaling_grid",
]

Score = float | Mapping[str, float]


# ---------------------------------------------------------------------------------- grids
def line_grid(points: int = 25) -> list[tuple[float, float]]:
    """Weights :math:`(\\alpha, 1 - \\alpha)` for two models, :math:`\\alpha` evenly in [0, 1].

    Example:
        >>> line_grid(3)
        [(0.0, 1.0), (0.5, 0.5), (1.0, 0.0)]
    """
    if points < 2:
        raise ValueError(f"a line grid needs at least 2 points, got {points}")
    n = points - 1
    return [(i / n, (n - i) / n) for i in range(points)]


def simplex_grid(num_models: int, steps: int) -> list[tuple[float, ...]]:
    """All weights :math:`w` with :math:`w_t \\in \\{0, 1/n, \\dots, 1\\}`, :math:`\\sum w = 1`.

    There are :math:`\\binom{n + T - 1}{T - 1}` points (:math:`n` = ``steps``); two models and
    24 steps give the 25-point line.

    Example:
        >>> len(simplex_grid(3, 4)), simplex_grid(2, 2)
        (15, [(0.0, 1.0), (0.5, 0.5), (1.0, 0.0)])
    """
    if num_models < 1 or steps < 1:
        raise ValueError("simplex_grid needs num_models >= 1 and steps >= 1")
    out = []
    for bars in itertools.combinations(range(steps + num_models - 1), num_models - 1):
        parts, prev = [], -1
        for b in (*bars, steps + num_models - 1):
            parts.append(b - prev - 1)
            prev = b
        out.append(tuple(p / steps for p in parts))
    return sorted(out)


def scaling_grid(num_models: int, values: Sequence[float]) -> list[tuple[float, ...]]:
    """The same coefficient for every model, one point per value (task-arithmetic style)."""
    return [(float(v),) * num_models for v in values]


# ---------------------------------------------------------------------------------- results
@dataclass
class SweepPoint:
    """One evaluated point.

    Attributes:
        index: Position in the sweep.
        coefficients: The point (``{"weights": (...), "damping": ...}`` or a method's options).
        validation: The selection score (mean of the per-task values when ``validate``
            returns a mapping).
        validation_detail: The per-task validation values (empty for a scalar score).
        merge_seconds: Time spent merging (evaluation excluded).
        eval_seconds: Time spent in ``validate``.
        products: Operator products the merge needed (0 for closed forms); for a damping
            grid solved by one multi-shift CG run, the shared products it needed too.
        spent_products: The products making this point cost, each product counted once over
            the sweep: ``products``, except in a damping grid solved together, whose first
            point carries the whole run and the others 0.
        iterations: CG iterations (0 for closed forms).
        converged: Whether the merge's solve converged.
        relative_residual: The solve's true relative residual (0 for closed forms; ``None``
            for a merge without a report).
        effective_damping: The merge's :math:`\\lambda` (``None`` when it has none).
        damping_dominates: Whether the damping held the merge at its prior (see
            :class:`~curvmerge.merging.MergeReport`); the sweep warns once, not per point.
    """

    index: int
    coefficients: dict[str, Any]
    validation: float
    validation_detail: dict[str, float] = field(default_factory=dict)
    merge_seconds: float = 0.0
    eval_seconds: float = 0.0
    products: int = 0
    spent_products: int = 0
    iterations: int = 0
    converged: bool = True
    relative_residual: float | None = None
    effective_damping: float | None = None
    damping_dominates: bool = False


@dataclass
class SweepResult:
    """A finished sweep.

    Attributes:
        method: What was swept (``"diagonal"``, ``"cg"``, a registry name, ...).
        points: Every evaluated point, in sweep order.
        best: Index of the point chosen on validation.
        best_result: The merge at the chosen point.
        test: ``test`` at the chosen point (``None`` without a test callback).
        test_detail: Its per-task values.
        statistics_seconds: Time spent computing the per-model statistics, if known.
        prepare_seconds: Time spent preparing the sweep (stacking, products).
        prepare_products: Operator products spent preparing.
        prepare_costs: Every product, diagonal pass and their seconds spent preparing
            (:class:`~curvmerge.merging.MergeCosts`; ``None`` when unknown).
        higher_is_better: Direction of the validation score.
        screen_rtol: The loose CG tolerance every point was solved to (a screened sweep),
            ``None`` when every point was solved to the requested one.
        refine_products: Products re-solving the chosen point to the requested tolerance
            (screened sweeps; its validation score stays the screened one).
        refine_seconds: Time of that re-solve.
    """

    method: str
    points: list[SweepPoint]
    best: int
    best_result: Any = field(repr=False, default=None)
    test: float | None = None
    test_detail: dict[str, float] = field(default_factory=dict)
    statistics_seconds: float | None = None
    prepare_seconds: float = 0.0
    prepare_products: int = 0
    prepare_costs: MergeCosts | None = None
    higher_is_better: bool = True
    screen_rtol: float | None = None
    refine_products: int = 0
    refine_seconds: float = 0.0

    @property
    def best_point(self) -> SweepPoint:
        """The point chosen on validation."""
        return self.points[self.best]

    @property
    def products(self) -> int:
        """Operator products the sweep spent, each counted once: preparation plus every
        point's ``spent_products`` (a shared multi-shift run once, not per damping), plus
        the re-solve of a screened sweep's choice."""
        spent = sum(p.spent_products for p in self.points)
        return self.prepare_products + spent + self.refine_products

    @property
    def merge_seconds(self) -> float:
        """Time of all merges (evaluation excluded)."""
        return sum(p.merge_seconds for p in self.points)

    @property
    def eval_seconds(self) -> float:
        """Time of all validation calls."""
        return sum(p.eval_seconds for p in self.points)

    @property
    def sweep_seconds(self) -> float:
        """Cost of the sweep apart from evaluation: preparation plus merges (and the
        re-solve of a screened sweep's choice)."""
        return self.prepare_seconds + self.merge_seconds + self.refine_seconds

    @property
    def cost_ratio(self) -> float | None:
        """``sweep_seconds / statistics_seconds`` (``None`` when the statistics time is unknown)."""
        if not self.statistics_seconds:
            return None
        return self.sweep_seconds / self.statistics_seconds

    def summary(self) -> str:
        """Chosen point, its scores, and the sweep's cost against the statistics."""
        bp = self.best_point
        coeffs = ", ".join(f"{k}={_fmt(v)}" for k, v in bp.coefficients.items())
        lines = [
            f"sweep ({self.method}): {len(self.points)} points; chosen on validation: {coeffs} "
            f"(validation {bp.validation:.4f})"
        ]
        if self.test is not None:
            lines.append(f"  test at the chosen point: {self.test:.4f}")
        cost = (
            f"  cost without evaluation: prepare {self.prepare_seconds:.3g} s + merges "
            f"{self.merge_seconds:.3g} s = {self.sweep_seconds:.3g} s"
        )
        if self.cost_ratio is not None:
            cost += (
                f" = {100 * self.cost_ratio:.2f}% of the {self.statistics_seconds:.3g} s spent "
                "computing the statistics"
            )
        lines.append(cost + f" (evaluation {self.eval_seconds:.3g} s excluded)")
        if self.products:
            shared = sum(p.products for p in self.points) > sum(
                p.spent_products for p in self.points
            )
            lines.append(
                f"  operator products: {self.products} (preparation {self.prepare_products}"
                + (", damping grids from one multi-shift CG run each" if shared else "")
                + ")"
            )
        if self.screen_rtol is not None:
            lines.append(
                f"  points screened at CG rtol {self.screen_rtol:g} (each warm-started from the "
                f"previous); the chosen point re-solved to the requested tolerance: "
                f"{self.refine_products} products, {self.refine_seconds:.3g} s"
            )
        if self.prepare_costs is not None and (
            self.prepare_costs.products or self.prepare_costs.diagonal_passes
        ):
            lines.append(f"  preparation: {self.prepare_costs}")
        dominated = sum(p.damping_dominates for p in self.points)
        if dominated:
            lines.append(
                f"  the damping dominates the curvature at {dominated} of {len(self.points)} "
                "points (the merge stays at its prior there)"
                + (" including the chosen one" if bp.damping_dominates else "")
            )
        return "\n".join(lines)

    def rows(self) -> list[dict[str, Any]]:
        """One flat dict per point (for CSV): coefficients, scores, timing, chosen flag."""
        out = []
        for p in self.points:
            row: dict[str, Any] = {"index": p.index}
            for k, v in p.coefficients.items():
                if isinstance(v, (tuple, list)):
                    row.update({f"{k}_{i + 1}": x for i, x in enumerate(v)})
                else:
                    row[k] = v
            row["validation"] = p.validation
            row.update({f"validation_{k}": v for k, v in p.validation_detail.items()})
            row.update(
                merge_seconds=p.merge_seconds,
                products=p.products,
                spent_products=p.spent_products,
                iterations=p.iterations,
                effective_damping=p.effective_damping,
                damping_dominates=p.damping_dominates,
                chosen=p.index == self.best,
            )
            out.append(row)
        return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(_fmt(x) for x in v) + ")"
    return str(v)


def _fmt_point(coefficients: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in coefficients.items())


def _score(value: Score, what: str) -> tuple[float, dict[str, float]]:
    if isinstance(value, Mapping):
        detail = {str(k): float(v) for k, v in value.items()}
        if not detail:
            raise ValueError(f"{what} returned an empty mapping")
        return sum(detail.values()) / len(detail), detail
    try:
        return float(value), {}
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"{what} must return a number or a mapping of numbers, got {type(value).__name__}"
        ) from err


def _better(a: float, b: float, higher: bool) -> bool:
    if math.isnan(a):
        return False
    if math.isnan(b):
        return True
    return a > b if higher else a < b


# ---------------------------------------------------------------------------------- search
def grid_search(
    make: Callable[..., Any],
    points: Sequence[Mapping[str, Any]],
    *,
    validate: Callable[[Any], Score],
    test: Callable[[Any], Score] | None = None,
    higher_is_better: bool = True,
    method: str = "custom",
    statistics_seconds: float | None = None,
    prepare_seconds: float = 0.0,
    prepare_products: int = 0,
    prepare_costs: MergeCosts | None = None,
    progress: bool = False,
    verbose: bool = False,
) -> SweepResult:
    """Evaluate ``make(**point)`` at every point, choose on ``validate``, test the choice.

    Args:
        make: Builds a result from one point's keyword arguments (for example
            ``lambda **kw: get_method("ties")(models, base=base, **kw)``).
        points: The grid, one mapping of keyword arguments per point.
        validate: Scores a result on validation data: a number, or a mapping of per-task
            numbers whose mean is the score.
        test: Called once, on the chosen point's result.
        higher_is_better: Maximise (accuracy) or minimise (loss) the validation score.
        method: Name recorded in the result.
        statistics_seconds: Time spent computing per-model statistics, for the cost ratio.
        prepare_seconds: Time spent preparing, counted in the sweep's cost.
        prepare_products: Operator products spent preparing.
        prepare_costs: Their details, if known.
        progress: Show a tqdm progress bar.
        verbose: Print :meth:`SweepResult.summary` at the end.

    Returns:
        A :class:`SweepResult`; ties keep the earliest point. Points where the damping
        dominates the curvature are flagged, not warned about one by one; one
        :class:`~curvmerge.merging.DampingWarning` says so if the chosen point is one.
    """
    points = [dict(p) for p in points]
    if not points:
        raise ValueError("the sweep grid is empty")
    iterator = points
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(points, desc=f"sweep {method}", unit="point")
    evaluated: list[SweepPoint] = []
    best, best_result = -1, None
    for i, kwargs in enumerate(iterator):
        t0 = time.perf_counter()
        with warnings.catch_warnings():  # flagged per point, summarised below
            warnings.simplefilter("ignore", DampingWarning)
            result = make(**kwargs)
        t1 = time.perf_counter()
        score, detail = _score(validate(result), "validate")
        t2 = time.perf_counter()
        report = getattr(result, "report", None)
        products = getattr(report, "products", 0)
        spent = getattr(report, "spent_products", None)
        point = SweepPoint(
            index=i,
            coefficients=kwargs,
            validation=score,
            validation_detail=detail,
            merge_seconds=t1 - t0,
            eval_seconds=t2 - t1,
            products=products,
            spent_products=products if spent is None else spent,
            iterations=getattr(report, "iterations", 0),
            converged=getattr(report, "converged", True),
            relative_residual=getattr(report, "relative_residual", None),
            effective_damping=getattr(report, "effective_damping", None),
            damping_dominates=bool(getattr(report, "damping_dominates", False)),
        )
        evaluated.append(point)
        if best < 0 or _better(score, evaluated[best].validation, higher_is_better):
            best, best_result = i, result
    out = SweepResult(
        method=method,
        points=evaluated,
        best=best,
        best_result=best_result,
        statistics_seconds=statistics_seconds,
        prepare_seconds=prepare_seconds,
        prepare_products=prepare_products,
        prepare_costs=prepare_costs,
        higher_is_better=higher_is_better,
    )
    if out.best_point.damping_dominates:
        warn_user(
            f"sweep ({method}): at the point chosen on validation "
            f"({_fmt_point(out.best_point.coefficients)}) the damping dominates the "
            "curvature: that merge is close to its prior; extend the grid to smaller dampings",
            DampingWarning,
        )
    if test is not None:
        out.test, out.test_detail = _score(test(best_result), "test")
    if verbose:
        print(out.summary())
    return out


def sweep(
    thetas: Sequence[nn.Module | Mapping[str, Tensor]],
    curvatures: Sequence[LinearOperator] | Callable[[], Sequence[LinearOperator]] | None = None,
    *,
    validate: Callable[[MergeResult], Score],
    test: Callable[[MergeResult], Score] | None = None,
    weights: Sequence[Sequence[float]] | None = None,
    dampings: Sequence[float] = (DEFAULT_DAMPING,),
    damping_scale: str | float = "auto",
    prior: str | Mapping[str, Tensor] | None = "mean",
    base: nn.Module | Mapping[str, Tensor] | None = None,
    params: str | Sequence[str] | None = None,
    statistics_seconds: float | None = None,
    higher_is_better: bool = True,
    rtol: float = 1e-6,
    maxiter: int | None = None,
    preconditioner: str | LinearOperator | None = None,
    warm_start: bool = True,
    screen_rtol: float | None = None,
    screen: str = "cg",
    screen_max_vectors: int | None = None,
    progress: bool = False,
    verbose: bool = True,
) -> SweepResult:
    """Sweep the merge equation over weights and damping without recomputing statistics.

    Each point is :func:`~curvmerge.merge` with ``weights=w, damping=λ``, computed by a
    :class:`~curvmerge.merging.prepared.PreparedMerge`. With operator curvatures, no
    preconditioner and several dampings, each weight point's damping grid is solved by one
    multi-shift CG run (:meth:`~curvmerge.merging.prepared.PreparedMerge.merge_dampings`, at
    the cost of its smallest damping): weights are the outer loop, and each point's
    ``products`` are those it needed (the grid's shared products are counted in each of its
    points; the first point's ``spent_products`` and ``merge_seconds`` hold the grid's
    solve, and :attr:`SweepResult.products` counts it once). Otherwise dampings
    are the outer loop; the weights run forwards and backwards in turn so that consecutive
    points stay close (CG warm starts).

    Args:
        thetas: The models.
        curvatures: One operator per model, ``None`` (identity: weighted averaging), or a
            zero-argument callable that computes them: then the sweep times it as the
            statistics time.
        validate: Scores a :class:`~curvmerge.merging.MergeResult` on validation data (a number,
            or a mapping of per-task numbers whose mean is the score).
        test: Called once, on the chosen point.
        weights: The weight grid (default :func:`line_grid` ``(25)`` for two models, else
            :func:`simplex_grid` with 4 steps).
        dampings: The damping grid, relative to the damping scale as in
            :func:`~curvmerge.merge` (default: :func:`~curvmerge.merge`'s default).
        damping_scale: As in :func:`~curvmerge.merge` (``"auto"``: the mean diagonal of
            :math:`\\sum_t w_t F_t` at each point).
        prior: As in :func:`~curvmerge.merge` (``"mean"``, ``"zero"``, ``"base"``, a dict).
        base: The base model, for ``prior="base"``.
        params: As in :func:`~curvmerge.merge`.
        statistics_seconds: Time the caller spent computing ``curvatures`` (for the cost
            ratio); measured when ``curvatures`` is a callable.
        higher_is_better: Direction of the validation score.
        rtol: CG tolerance (operator curvatures).
        maxiter: CG iteration limit.
        preconditioner: As in :func:`~curvmerge.merge`.
        warm_start: Warm-start each CG solve from the previous point. Cheaper, but where
            the damping is small against the curvature a solve to ``rtol`` keeps the
            previous point's components in the directions of small curvature, so the merges
            (and the choice) depend on the order of the grid: on two MiniLM bodies at
            damping 0.1, seven points solved to 1e-3 scored at best 0.72 warm-started and
            0.79 solved each from zero (``docs/benchmarks_sweep.md``).
            ``False`` (each point from zero), or ``screen="subspace"``, gives merges that
            do not depend on the order.
        screen_rtol: A screened sweep (operator curvatures): every point is solved only to
            this looser tolerance, enough to rank the points (each warm-started from the
            previous one), and the chosen point is then re-solved to ``rtol`` from its
            screened solution; ``best_result`` and ``test`` are that accurate merge, the
            validation scores the screened ones. ``None``: every point to ``rtol``.
        screen: How a screened sweep solves its points: ``"cg"`` (each point by CG,
            warm-started from the previous one) or ``"subspace"`` (every point of the grid,
            weights and dampings, from one reduced basis grown until all of them reach
            ``screen_rtol``: :meth:`~curvmerge.merging.PreparedMerge.merge_subspace`; its
            basis vectors, one product per model each, are the screen's whole cost;
            refused without ``screen_rtol``).
        screen_max_vectors: The subspace screen's basis size limit (default ``maxiter``,
            else 500); its memory is about :math:`(T + 1)` vectors of size :math:`P` per
            basis vector. Points it leaves above ``screen_rtol`` are reported as not
            converged.
        progress: Show a tqdm progress bar.
        verbose: Print the summary with the sweep's cost against the statistics.

    Returns:
        A :class:`SweepResult`.
    """
    if screen_rtol is not None and not float(screen_rtol) >= rtol:
        raise ValueError(f"screen_rtol={screen_rtol} must be at least rtol={rtol}")
    if screen not in ("cg", "subspace"):
        raise ValueError(f"screen must be 'cg' or 'subspace', got {screen!r}")
    if screen == "subspace" and screen_rtol is None:
        raise ValueError(
            "screen='subspace' needs screen_rtol (the tolerance of the screen; the chosen "
            "point is then re-solved to rtol): without it every point is solved by CG to rtol"
        )
    if callable(curvatures) and not isinstance(curvatures, (LinearOperator, Sequence)):
        t0 = time.perf_counter()
        curvatures = list(curvatures())
        statistics_seconds = time.perf_counter() - t0
    prepared = PreparedMerge(
        thetas,
        curvatures,
        prior=prior,
        base=base,
        params=params,
        damping_scale=damping_scale,
        rtol=rtol,
        maxiter=maxiter,
        preconditioner=preconditioner,
        warm_start=warm_start,
    )
    T = prepared.num_models
    if weights is None:
        weights = line_grid(25) if T == 2 else simplex_grid(T, 4)
    grid_w = [tuple(check_weights(w, T, 1.0 / T)) for w in weights]
    if not grid_w or not len(dampings):
        raise ValueError("the sweep grid is empty")
    try:
        dampings = [check_damping(d) for d in dampings]
    except ValueError as err:
        raise ValueError(f"dampings: {err}") from None
    points = []
    make = prepared.merge
    if prepared.kind == "operator" and preconditioner is None and len(dampings) > 1:
        # each weight point's damping grid from one Krylov space (multi-shift CG): weights
        # outside, dampings inside, the grid solved once at the point's first damping
        pending: list[MergeResult] = []

        def make(weights, damping):
            if not pending:
                pending.extend(prepared.merge_dampings(weights, dampings))
            result = pending.pop(0)
            if result.report.damping != damping or tuple(result.report.weights) != weights:
                raise RuntimeError("sweep: the damping grid's results came out of order")
            return result

        for w in grid_w:
            points.extend({"weights": w, "damping": damping} for damping in dampings)
    else:
        for j, damping in enumerate(dampings):
            row = grid_w if j % 2 == 0 else grid_w[::-1]
            points.extend({"weights": w, "damping": damping} for w in row)
    screened = screen_rtol is not None and prepared.kind == "operator"
    if screened:
        prepared.rtol = float(screen_rtol)
    if screened and screen == "subspace":
        # every point from one reduced basis, built at the first point (so its time and
        # products are that point's: the first report's spent_products)
        pairs = [(tuple(p["weights"]), p["damping"]) for p in points]
        solved: dict = {}

        def make(weights, damping):
            if not solved:
                found = prepared.merge_subspace(
                    pairs, rtol=prepared.rtol, max_vectors=screen_max_vectors or maxiter
                )
                solved.update(zip(pairs, found, strict=True))
            return solved.pop((tuple(weights), damping))

    out = grid_search(
        make,
        points,
        validate=validate,
        test=None if screened else test,
        higher_is_better=higher_is_better,
        method=prepared.kind if prepared.kind != "operator" else "cg",
        statistics_seconds=statistics_seconds,
        prepare_seconds=prepared.prepare_seconds,
        prepare_products=prepared.prepare_products,
        prepare_costs=prepared.prepare_costs,
        progress=progress,
        verbose=verbose and not screened,
    )
    if not screened:
        return out
    # the choice, re-solved to the requested tolerance from its screened solution
    prepared.rtol = rtol
    t0 = time.perf_counter()
    prepared.resume_from(out.best_result.params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DampingWarning)  # said once by grid_search
        out.best_result = prepared.merge(**out.best_point.coefficients)
    out.refine_seconds = time.perf_counter() - t0
    out.refine_products = out.best_result.report.products
    out.screen_rtol = float(screen_rtol)
    if test is not None:
        out.test, out.test_detail = _score(test(out.best_result), "test")
    if verbose:
        print(out.summary())
    return out
