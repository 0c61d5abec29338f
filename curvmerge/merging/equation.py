"""The merge equation.

.. math::

    \\theta^* = (\\lambda I + \\textstyle\\sum_t w_t F_t)^{-1}
                (\\textstyle\\sum_t w_t F_t \\theta_t + \\lambda \\theta_0),

the minimiser of :math:`\\sum_t \\tfrac{w_t}{2}\\|\\theta-\\theta_t\\|^2_{F_t}
+ \\tfrac{\\lambda}{2}\\|\\theta-\\theta_0\\|^2`. It is solved in task-vector form,
:math:`\\theta^* = \\theta_0 + (\\lambda I + \\sum_t w_t F_t)^{-1}
\\sum_t w_t F_t (\\theta_t - \\theta_0)`: in closed form when every :math:`F_t` is diagonal
(identity included), else by CG warm-started from a diagonal merge. :func:`merge` is one
point of :class:`~curvmerge.merging.prepared.PreparedMerge`, the one implementation that
sweeps use too.

The damping is relative by default: :math:`\\lambda = \\text{damping} \\cdot s`, with
:math:`s` the mean diagonal entry of :math:`\\sum_t w_t F_t`, so the same ``damping`` means
the same thing for a Fisher whose entries are 1 or 1e-6.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from curvmerge.merging.prepared import PreparedMerge
from curvmerge.merging.report import (
    ConvergenceError,
    ConvergenceWarning,
    DampingWarning,
    MergeCosts,
    MergeReport,
    MergeResult,
    SolveProgress,
    load_merged,
    parameters_of,
)
from curvmerge.merging.system import DEFAULT_DAMPING, NYSTROM_RANK, check_weights
from curvmerge.operators import LinearOperator

__all__ = [
    "merge",
    "MergeResult",
    "MergeReport",
    "MergeCosts",
    "ConvergenceWarning",
    "ConvergenceError",
    "DampingWarning",
    "DEFAULT_DAMPING",
    "NYSTROM_RANK",
    "load_merged",
    "parameters_of",
    "check_weights",
]


def merge(
    thetas: Sequence[nn.Module | Mapping[str, Tensor]],
    curvatures: Sequence[LinearOperator] | None = None,
    *,
    weights: Sequence[float] | None = None,
    damping: float = DEFAULT_DAMPING,
    damping_scale: str | float = "auto",
    prior: str | Mapping[str, Tensor] | None = "mean",
    base: nn.Module | Mapping[str, Tensor] | None = None,
    params: str | Sequence[str] | None = None,
    rtol: float = 1e-6,
    maxiter: int | None = None,
    preconditioner: str | LinearOperator | None = None,
    warm_start: bool = True,
    require_convergence: bool = False,
    callback=None,
    progress: bool = False,
) -> MergeResult:
    """Merge models by :math:`\\theta^* = (\\lambda I + \\sum_t w_t F_t)^{-1}
    (\\sum_t w_t F_t \\theta_t + \\lambda\\theta_0)`.

    Args:
        thetas: The models (modules or parameter dicts). They may hold more parameters
            than are merged (task heads); those are ignored.
        curvatures: One operator :math:`F_t` per model, all on the same space; ``None``
            means identity (weighted averaging).
        weights: Coefficients :math:`w_t \\ge 0` (default :math:`1/T`). Only their ratios
            matter: the damping scales with them.
        damping: :math:`\\ge 0`, relative to ``damping_scale``: :math:`\\lambda =
            \\text{damping} \\cdot s`. The default :data:`DEFAULT_DAMPING` holds entries
            whose weighted curvature is below a thousandth of the mean at the prior.
        damping_scale: ``"auto"`` (default): :math:`s` is the mean diagonal entry of
            :math:`\\sum_t w_t F_t` (1 for averaging with default weights), from the
            curvatures' diagonals, or for operators without a cheap diagonal (curvlinops
            adapters) a seeded Hutchinson estimate with a ``[P, 4]`` block per curvature,
            counted in the report. A positive number fixes :math:`s`: ``damping_scale=1.0``
            makes ``damping`` the absolute :math:`\\lambda`.
        prior: :math:`\\theta_0`: ``"mean"`` (the :math:`w`-weighted average, the default),
            ``"zero"`` or ``None`` (the textbook form, which pulls unseen directions to
            zero), ``"base"`` (the ``base`` model), or a parameter dict.
        base: The model (or parameter dict) the tasks were fine-tuned from; needed by
            ``prior="base"``.
        params: Names or a regex selecting the merged parameters when ``curvatures`` is
            ``None`` (default: all parameters of the first model). With curvatures their
            space decides, and ``params`` must select exactly that space (or be ``None``).
        rtol: Relative tolerance of CG (scipy's stopping rule).
        maxiter: Maximum CG iterations (default ``10 * P``).
        preconditioner: ``"diagonal"`` (Jacobi: :math:`\\lambda + \\sum_t w_t
            \\operatorname{diag}F_t` when the curvatures have a cheap diagonal),
            ``"nystrom"`` or ``"nystrom:<rank>"`` (randomized Nyström preconditioner of
            :math:`\\sum_t w_t F_t`, :class:`curvmerge.precondition.NystromPreconditioner`;
            its sketch costs ``rank`` products, counted in the report, and about
            ``5 * P * rank`` float64 numbers of memory; default rank :data:`NYSTROM_RANK`),
            ``None`` (plain CG, the default), or an operator approximating
            :math:`(\\lambda I + \\sum_t w_t F_t)^{-1}`. Plain CG is the default because on
            the exact-Fisher merge of three MNIST CNNs (``benchmarks/bench_ggn.py``,
            ``docs/benchmarks_ggn.md``) Jacobi needed several times plain CG's products
            and Nyström saved products only at the smallest damping.
        warm_start: Start CG from the diagonal merge when the curvatures have a cheap
            diagonal (never one probed with unit vectors).
        require_convergence: Raise :class:`ConvergenceError` instead of warning.
        callback: Passed to CG (called with the task-vector iterate).
        progress: Show one progress bar for the CG solve (iterations, per-model products,
            and at the end the relative residual and products of the sum); nothing per
            operator product. Closed forms show none.

    Returns:
        A :class:`MergeResult` whose ``params`` has one tensor per merged parameter, in each
        parameter's original dtype and device. Its report states the damping (relative,
        scale, :math:`\\lambda`) and every cost; a merge whose damping dominates the
        curvature (it kept less than :data:`~curvmerge.merging.system.DAMPING_DOMINANCE` of
        its undamped step) sets ``damping_dominates`` and warns with
        :class:`DampingWarning`.

    Example:
        >>> a = {"w": torch.tensor([0.0, 2.0])}
        >>> b = {"w": torch.tensor([2.0, 4.0])}
        >>> merge([a, b]).params["w"]
        tensor([1., 3.])
        >>> F = [DiagonalOperator(ParamSpace(("w",), ((2,),)), torch.tensor([1e-6, 0.0])),
        ...      DiagonalOperator(ParamSpace(("w",), ((2,),)), torch.tensor([3e-6, 1e-6]))]
        >>> merge([a, b], F, damping=0.0).params["w"]  # Fisher-weighted, per entry
        tensor([1.5000, 4.0000])
    """
    start = time.perf_counter()
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
        cache_bytes=0,  # one point: each right-hand-side product is used once
    )
    bar = None
    if progress and prepared.kind == "operator":
        bar = SolveProgress(curvatures, callback=callback, total=maxiter)
    try:
        result = prepared.merge(
            weights,
            damping,
            require_convergence=require_convergence,
            callback=callback if bar is None else bar,
        )
    except BaseException:
        if bar is not None:
            bar.finish()
        raise
    report = result.report
    report.costs = prepared.prepare_costs + report.costs
    if bar is not None:
        bar.finish(report)
    report.products = report.costs.products
    report.seconds = time.perf_counter() - start
    return result
