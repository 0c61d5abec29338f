"""Run every verification on a set of task models and collect the results.

:func:`run_verification` takes models, loss and data, builds each task's exact GGN operator
and diagonal Fishers (exact, MC, empirical), and returns a :class:`VerificationResult`:
diagonal comparisons with error bars, off-diagonal shares per layer, spectra, effective
ranks, task-vector directions and the merge comparison. :func:`curvmerge.verify.write_report`
turns it into a Markdown report with plots.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from curvmerge.merging import parameters_of
from curvmerge.operators.base import LinearOperator
from curvmerge.operators.ggn import GGNOperator
from curvmerge.space import ParamSpace
from curvmerge.verify.diagonal import DiagonalComparison, compare_diagonals
from curvmerge.verify.directions import DirectionShare, direction_share, prior_share
from curvmerge.verify.estimators import DIAGONAL_METHODS, Z_SCORE, estimate_diagonal
from curvmerge.verify.merges import MergeComparison, compare_merges
from curvmerge.verify.share import DiagonalShare, estimate_diagonal_share
from curvmerge.verify.spectrum import Spectrum, spectrum

__all__ = ["TaskVerification", "VerificationResult", "run_verification", "ggn_operator"]


@dataclass
class TaskVerification:
    """Everything measured on one task's curvature.

    Attributes:
        name: Task name.
        num_examples: Examples the curvatures sum over.
        spectrum: Top eigenvalues, trace and effective rank of the exact GGN :math:`F_t`.
        share: Off-diagonal share of :math:`F_t`, globally and per layer (estimated).
        comparisons: Diagonals compared with the exact one: the MC and empirical Fisher
            diagonals and the stochastic estimators of :math:`\\operatorname{diag}F_t`.
        directions_own: Where the task vector lies in :math:`F_t`'s spectrum.
        directions_merge: Where it lies in the spectrum of :math:`\\sum_s w_s F_s`.
        diagonals: The diagonals themselves (``"exact"``, ``"mc"``, ``"empirical"``, and
            estimator names), for plots; estimator standard errors under ``"<name>_se"``.
        seconds: Wall-clock time of each step.
    """

    name: str
    num_examples: int
    spectrum: Spectrum
    share: DiagonalShare
    comparisons: list[DiagonalComparison]
    directions_own: DirectionShare
    directions_merge: DirectionShare | None = None
    diagonals: dict[str, Tensor] = field(default_factory=dict, repr=False)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "num_examples": self.num_examples,
            "spectrum": self.spectrum.to_dict(),
            "share": self.share.to_dict(),
            "comparisons": [c.to_dict() for c in self.comparisons],
            "directions_own": self.directions_own.to_dict(),
            "directions_merge": (
                self.directions_merge.to_dict() if self.directions_merge else None
            ),
            "seconds": self.seconds,
        }


@dataclass
class VerificationResult:
    """The outcome of :func:`run_verification`.

    Attributes:
        space: The merged parameter space (its parameters are the "layers").
        tasks: One :class:`TaskVerification` per task.
        merge_spectrum: Spectrum of :math:`\\sum_t w_t F_t`.
        merges: The merge comparison.
        config: The settings used.
        seconds: Wall-clock time of each stage and in total.
        z: Standard errors per error bar.
    """

    space: ParamSpace
    tasks: list[TaskVerification]
    merge_spectrum: Spectrum | None
    merges: MergeComparison | None
    config: dict
    seconds: dict[str, float]
    z: float = Z_SCORE

    def to_dict(self) -> dict:
        return {
            "num_parameters": self.space.size,
            "layers": dict(zip(self.space.names, self.space.numels, strict=True)),
            "tasks": [t.to_dict() for t in self.tasks],
            "merge_spectrum": self.merge_spectrum.to_dict() if self.merge_spectrum else None,
            "merges": self.merges.to_dict() if self.merges else None,
            "config": self.config,
            "seconds": self.seconds,
            "z": self.z,
        }


def ggn_operator(model: nn.Module, loss_fn, data, params=None) -> LinearOperator:
    """The exact GGN (= Fisher) operator of ``model`` on ``data`` over ``params``."""
    return GGNOperator(model, loss_fn, data, params=params, kind="exact")


def _flat(space: ParamSpace, params: Mapping[str, Tensor]) -> Tensor:
    return space.flatten(params).double()


def run_verification(
    models: Sequence[nn.Module],
    fisher_data: Sequence,
    eval_data: Sequence | None = None,
    *,
    params: str | Sequence[str] | None = None,
    loss_fn: nn.Module | None = None,
    task_names: Sequence[str] | None = None,
    base: nn.Module | Mapping[str, Tensor] | None = None,
    weights: Sequence[float] | None = None,
    damping: float = 1e-3,
    k: int = 20,
    num_products: int = 60,
    estimator_tasks: int = 1,
    mc_samples: int = 1,
    rtol: float = 1e-4,
    maxiter: int | None = 200,
    merge_spectrum_k: int | None = None,
    prior_share_maxiter: int | None = None,
    prior_share_rtol: float = 1e-2,
    seed: int = 0,
    curvature: Callable | None = None,
    log: Callable[[str], None] | None = None,
) -> VerificationResult:
    """Verify the diagonal against the exact Fisher on every task, and compare merges.

    Args:
        models: Task models (same body; heads may differ).
        fisher_data: Per task, the ``(inputs, targets)`` batches the curvatures sum over.
        eval_data: Per task, evaluation data for the merge comparison (``None`` skips it).
        params: Names or regex of the merged ("shared") parameters (default: all).
        loss_fn: The loss (default ``nn.CrossEntropyLoss()``, mean reduction).
        task_names: Labels of the tasks.
        base: The starting point of the task vectors :math:`\\Delta_t = \\theta_t -
            \\theta_0` (a model or parameter dict; default the average of the models,
            the merge's prior).
        weights: Merge coefficients (default :math:`1/T`).
        damping: Merge damping :math:`\\lambda`, absolute; also the threshold below which an
            eigenvalue counts as "barely seen".
        k: Eigenpairs per Lanczos run.
        num_products: Products per stochastic estimate.
        estimator_tasks: On how many tasks to run the stochastic diagonal estimators.
        mc_samples: Samples per example of the MC Fisher diagonal.
        rtol, maxiter: CG settings of the exact merge.
        merge_spectrum_k: Eigenpairs of :math:`\\sum_t w_t F_t` (default ``k``; 0 skips).
        prior_share_maxiter: CG iterations for the prior shares
            :math:`\\rho_\\lambda(\\Delta_t)` w.r.t. :math:`\\sum_t w_t F_t` (one block solve,
            :math:`T` products of :math:`T` columns per iteration; ``None`` skips it, the
            default, since with :math:`\\lambda_\\max/\\lambda \\approx 10^3` it needs about
            100 iterations).
        prior_share_rtol: CG tolerance of that solve (the quadratic form converges at
            about the square of the residual).
        seed: Seed of every random probe.
        curvature: ``curvature(model, loss_fn, data, params) -> operator``, default
            :func:`ggn_operator`.
        log: Called with a line of progress text.
    """
    from curvmerge.fisher import diagonal_fisher

    t_start = time.perf_counter()
    cpu_start = time.process_time()
    say = log or (lambda s: None)
    loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
    curvature = curvature or ggn_operator
    T = len(models)
    names = list(task_names) if task_names is not None else [f"task{t}" for t in range(T)]
    if len(fisher_data) != T:
        raise ValueError(f"got {len(fisher_data)} Fisher data sets for {T} models")
    w = list(weights) if weights is not None else [1.0 / T] * T
    space = ParamSpace.from_module(models[0], params)
    space = ParamSpace(space.names, space.shapes)
    thetas = [_flat(space, parameters_of(m)) for m in models]
    theta0 = (
        _flat(space, parameters_of(base))
        if base is not None
        else sum(wt * th for wt, th in zip(w, thetas, strict=True)) / sum(w)
    )
    seconds: dict[str, float] = {}
    ops, diag_ops, tasks = [], [], []
    for t, (model, data) in enumerate(zip(models, fisher_data, strict=True)):
        data = list(data)
        n_ex = sum(int(y.shape[0]) for _, y in data)
        times: dict[str, float] = {}
        clock = time.perf_counter()
        F = curvature(model, loss_fn, data, list(space.names))
        diags = {}
        for kind in ("exact", "mc", "empirical"):
            D = diagonal_fisher(
                model,
                loss_fn,
                data,
                params=list(space.names),
                kind=kind,
                mc_samples=mc_samples,
                seed=seed + t,
                progress=False,
            )
            diags[kind] = D.diagonal().detach().double().cpu()
            if kind == "exact":
                diag_ops.append(D)
        times["diagonal_fisher"] = time.perf_counter() - clock
        exact = diags["exact"]
        comps = [
            compare_diagonals(diags["mc"], exact, space, name=f"mc ({mc_samples} sample)"),
            compare_diagonals(diags["empirical"], exact, space, name="empirical"),
        ]
        if t < estimator_tasks:
            clock = time.perf_counter()
            for method in DIAGONAL_METHODS:
                est = estimate_diagonal(F, num_products, method=method, seed=seed)
                diags[method] = est.value.cpu()
                diags[method + "_se"] = est.stderr.cpu()
                comps.append(compare_diagonals(est, exact, space, name=method))
            times["estimators"] = time.perf_counter() - clock
        say(
            f"[{names[t]}] diagonals: "
            + ", ".join(f"{c.name} {c.relative_error:.3f}" for c in comps)
        )
        clock = time.perf_counter()
        share = estimate_diagonal_share(F, exact, num_products, seed=seed)
        times["share"] = time.perf_counter() - clock
        say(f"[{names[t]}] off-diagonal share {share.share:.3f} +- {share.error_bar():.3f}")
        clock = time.perf_counter()
        spec = spectrum(F, k, exact=False, diagonal=exact, seed=seed, damping=damping)
        times["spectrum"] = time.perf_counter() - clock
        say(
            f"[{names[t]}] lambda_max {spec.lambda_max:.4g}, trace {spec.trace.value:.4g}, "
            f"intrinsic dim {spec.intrinsic_dimension.value:.1f}"
        )
        own = direction_share(F, thetas[t] - theta0, spec, threshold=damping, diagonal=exact)
        tasks.append(TaskVerification(names[t], n_ex, spec, share, comps, own, None, diags, times))
        ops.append(F)
    seconds["tasks"] = time.perf_counter() - t_start

    merge_spec = None
    mk = k if merge_spectrum_k is None else merge_spectrum_k
    if mk:
        clock = time.perf_counter()
        S = w[0] * ops[0]
        for wt, F in zip(w[1:], ops[1:], strict=True):
            S = S + wt * F
        d_sum = sum(wt * tv.diagonals["exact"] for wt, tv in zip(w, tasks, strict=True))
        merge_spec = spectrum(S, mk, exact=False, diagonal=d_sum, seed=seed, damping=damping)
        for t, tv in enumerate(tasks):
            tv.directions_merge = direction_share(
                S, thetas[t] - theta0, merge_spec, threshold=damping, diagonal=d_sum
            )
        if damping > 0 and prior_share_maxiter:
            deltas = torch.stack([th - theta0 for th in thetas], 1)
            shares, iters = prior_share(
                S, deltas, damping, rtol=prior_share_rtol, maxiter=prior_share_maxiter
            )
            for tv, share in zip(tasks, shares, strict=True):
                tv.directions_merge.prior_share = share
            seconds["prior_share_cg_iterations"] = float(iters)
        seconds["merge_spectrum"] = time.perf_counter() - clock
        say(f"[merge] lambda_max of sum_t w_t F_t: {merge_spec.lambda_max:.4g}")

    merges = None
    if eval_data is not None:
        clock = time.perf_counter()
        merges = compare_merges(
            models,
            eval_data,
            {"naive": None, "diagonal": diag_ops, "exact": ops},
            params=list(space.names),
            task_names=names,
            weights=w,
            damping=damping,
            damping_scale=1.0,  # the report's damping is the absolute lambda of its spectra
            rtol=rtol,
            maxiter=maxiter,
            preconditioner=None,
        )
        seconds["merges"] = time.perf_counter() - clock
        say(
            "[merge] mean accuracy: "
            + ", ".join(f"{m.name} {m.mean_accuracy:.3f}" for m in merges.methods)
        )
    seconds["total"] = time.perf_counter() - t_start
    seconds["cpu_total"] = time.process_time() - cpu_start
    config = {
        "tasks": names,
        "num_parameters": space.size,
        "weights": w,
        "damping": damping,
        "k": k,
        "num_products": num_products,
        "estimator_tasks": estimator_tasks,
        "mc_samples": mc_samples,
        "rtol": rtol,
        "maxiter": maxiter,
        "seed": seed,
        "base": "given" if base is not None else "mean",
        "curvature": type(ops[0]).__name__,
        "z": Z_SCORE,
    }
    return VerificationResult(space, tasks, merge_spec, merges, config, seconds)
