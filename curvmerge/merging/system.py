"""The pieces of the merge equation's linear system, shared by every merge.

.. math::

    (\\lambda I + \\textstyle\\sum_t w_t F_t)\\, y = \\textstyle\\sum_t w_t F_t
    (\\theta_t - \\theta_0), \\qquad \\theta^* = \\theta_0 + y.

Input checks, the prior :math:`\\theta_0`, the damping scale (:math:`\\lambda =
\\text{damping} \\cdot s`), the lazy system operator, preconditioners and the checked CG
solve. :class:`~curvmerge.merging.prepared.PreparedMerge` assembles them;
:func:`~curvmerge.merge` is one point of it.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from curvmerge.merging.report import MergeCosts, MergeReport, parameters_of
from curvmerge.operators import (
    BlockDiagonalOperator,
    DiagonalOperator,
    IdentityOperator,
    KroneckerOperator,
    LinearOperator,
)
from curvmerge.operators.base import ScaledOperator, SumOperator, rademacher
from curvmerge.solve import solve_cg
from curvmerge.space import ParamSpace

__all__ = [
    "DEFAULT_DAMPING",
    "DAMPING_DOMINANCE",
    "SCALE_PROBES",
    "NYSTROM_RANK",
    "KRONECKER_AVERAGE",
    "PRIORS",
    "check_weights",
    "check_inputs",
    "check_finite",
    "check_damping",
    "check_damping_scale",
    "resolve_prior",
    "has_cheap_diagonal",
    "diagonal_passes",
    "hutchinson_mean_diagonal",
    "mean_diagonals",
    "check_preconditioner",
    "system_operator",
    "make_preconditioner",
    "solve_system",
    "warn_user",
]

#: The damping of :func:`~curvmerge.merge`, :class:`~curvmerge.PreparedMerge`, the sweeps, the
#: registry and the command: relative to the curvature's scale (see :func:`~curvmerge.merge`).
DEFAULT_DAMPING = 1e-3

#: A merge that kept less than this share of its undamped step is dominated by its damping
#: (``MergeReport.damping_dominates``, :class:`~curvmerge.merging.DampingWarning`).
DAMPING_DOMINANCE = 0.05

#: Rademacher columns per curvature of the Hutchinson estimate of the damping scale, used for
#: curvatures without a cheap diagonal (one ``[P, SCALE_PROBES]`` block product each).
SCALE_PROBES = 4

#: Sketch size of ``preconditioner="nystrom"`` (``"nystrom:<rank>"`` picks another).
NYSTROM_RANK = 100

#: How ``preconditioner="kronecker"`` makes one Kronecker product of each layer's sum
#: (``"kronecker:mean"`` or ``"kronecker:frobenius"`` picks one;
#: :class:`~curvmerge.precondition.KroneckerPreconditioner`).
KRONECKER_AVERAGE = "mean"

#: The prior vocabulary (besides a parameter dict).
PRIORS = ("mean", "zero", "base")


# ---------------------------------------------------------------------------------- checks
def warn_user(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` attributed to the first caller outside :mod:`curvmerge.merging`
    (the user's ``merge``, ``PreparedMerge.merge`` or ``sweep`` call)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_globals.get("__name__", "").startswith("curvmerge.merging"):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def check_finite(x: Tensor, what: str, space: ParamSpace, nonnegative: bool = False) -> None:
    """Raise ``ValueError`` naming the first parameter of ``x`` with NaN/Inf (or a negative
    entry when ``nonnegative``); one pass over ``x`` when nothing is wrong."""
    if not x.numel():
        return
    lo, hi = torch.aminmax(x)
    finite = bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))
    if finite and not (nonnegative and float(lo) < 0):
        return
    bad = ~torch.isfinite(x) if not finite else x < 0
    idx = int(bad.nonzero()[0, 0])
    name = next(n for n, sl in space.slices().items() if sl.start <= idx < sl.stop)
    if not finite:
        raise ValueError(f"{what} contains NaN or Inf (first in parameter {name!r})")
    raise ValueError(f"{what} has negative diagonal entries (first in parameter {name!r}): not PSD")


def check_weights(weights: Sequence[float] | None, num_models: int, default: float) -> list[float]:
    """Validate per-model coefficients: finite, non-negative, one per model.

    Args:
        weights: The coefficients, or ``None`` for ``default`` for every model.
        num_models: Number of models :math:`T`.
        default: Coefficient used when ``weights`` is ``None``.

    Raises:
        ValueError: On a wrong count, a negative, NaN or infinite coefficient, or all zeros.
    """
    if weights is None:
        return [float(default)] * num_models
    if isinstance(weights, (int, float)):
        raise ValueError(f"weights must be a sequence of {num_models} numbers, got {weights!r}")
    w = [float(v) for v in weights]
    if len(w) != num_models:
        raise ValueError(f"got {len(w)} weights for {num_models} models")
    bad = [v for v in w if not math.isfinite(v) or v < 0]
    if bad:
        raise ValueError(f"weights must be finite and non-negative, got {w}")
    if sum(w) <= 0:
        raise ValueError("weights must not all be zero")
    return w


def check_damping(damping: float) -> float:
    """The damping as a float; ``ValueError`` unless finite and non-negative."""
    damping = float(damping)
    if not (math.isfinite(damping) and damping >= 0):
        raise ValueError(f"damping must be finite and >= 0, got {damping}")
    return damping


def check_damping_scale(damping_scale: str | float) -> float | None:
    """``"auto"`` gives ``None`` (estimate the scale); a number must be finite and > 0."""
    if isinstance(damping_scale, str):
        if damping_scale != "auto":
            raise ValueError(
                f"damping_scale must be 'auto' or a positive number, got {damping_scale!r}"
            )
        return None
    scale = float(damping_scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"damping_scale must be finite and > 0, got {scale}")
    return scale


def check_inputs(thetas, curvatures, params):
    """Validate the models and curvatures of a merge.

    ``params`` selects the merged parameters of models without curvatures. With curvatures,
    their space decides; ``params`` is then accepted only if it selects exactly that space
    (any order), and refused otherwise rather than silently ignored.

    Returns:
        ``(dicts, curvatures, space, dtype, device)``: the parameter dicts, the curvatures
        as a list (or ``None``), the merged space (names and shapes), and the dtype and
        device the merge is computed in (the curvatures', else the first model's, promoted
        to at least float32).

    Raises:
        ValueError, TypeError, SpaceMismatchError: naming the first model or curvature
        that does not fit.
    """
    if isinstance(thetas, (nn.Module, Mapping)) or not len(thetas):
        raise ValueError("merge needs a non-empty list of models")
    dicts = [parameters_of(t) for t in thetas]
    T = len(dicts)
    if curvatures is not None:
        if isinstance(curvatures, LinearOperator):
            raise TypeError("curvatures must be a list with one operator per model")
        curvatures = list(curvatures)
        if len(curvatures) != T:
            raise ValueError(f"got {len(curvatures)} curvatures for {T} models")
        for i, F in enumerate(curvatures):
            if not isinstance(F, LinearOperator):
                raise TypeError(
                    f"curvature {i} is a {type(F).__name__}, not a curvmerge LinearOperator "
                    "(wrap foreign operators with curvmerge.as_operator)"
                )
        space = curvatures[0].space
        for i, F in enumerate(curvatures[1:], start=1):
            space.check_same(F.space, what=f"curvature {i}")
        if params is not None:
            selected = ParamSpace.from_tensors(dicts[0], params).names
            if set(selected) != set(space.names):
                extra = [n for n in selected if n not in space.names]
                missing = [n for n in space.names if n not in selected]
                detail = (
                    f"it selects {extra[0]!r}, which the curvatures do not cover"
                    if extra
                    else f"it leaves out {missing[0]!r}, which the curvatures cover"
                )
                raise ValueError(
                    f"params selects {len(selected)} parameters but the curvatures act on "
                    f"{len(space.names)} ({detail}); with curvatures their space decides what "
                    "is merged: pass params=None, or compute the curvatures on that selection"
                )
        # at least float32: CG and the right-hand side never run in half precision
        dtype = torch.promote_types(curvatures[0].dtype, torch.float32)
        device = curvatures[0].device
    else:
        space = ParamSpace.from_tensors(dicts[0], params)
        first = dicts[0][space.names[0]]
        dtype, device = torch.promote_types(first.dtype, torch.float32), first.device
    space = ParamSpace(space.names, space.shapes)  # compare names and shapes only
    reference = ParamSpace.from_tensors(dicts[0]).select(list(space.names))
    for i, d in enumerate(dicts):
        space.check(d, what=f"model {i}")
        reference.check(d, what=f"model {i}")  # dtypes must agree too
    return dicts, curvatures, space, dtype, device


def resolve_prior(prior, base, space: ParamSpace, dtype, device) -> tuple[str, Tensor | None]:
    """The prior :math:`\\theta_0` as ``(name, flat vector)``; ``None`` for the mean, which
    depends on the weights.

    ``"mean"``: the :math:`w`-weighted average of the models; ``"zero"`` or ``None``: zero
    (the textbook form); ``"base"``: the ``base`` model or parameter dict (required); a
    parameter dict or module: that point.
    """
    if isinstance(prior, str):
        if prior == "mean":
            return "mean", None
        if prior == "zero":
            return "zero", torch.zeros(space.size, dtype=dtype, device=device)
        if prior == "base":
            if base is None:
                raise ValueError(
                    "prior='base' needs the base model (the checkpoint the models were "
                    "fine-tuned from): pass base=..."
                )
            return "base", _flat_point(base, "the base model", space, dtype, device)
    elif prior is None:
        return "zero", torch.zeros(space.size, dtype=dtype, device=device)
    elif isinstance(prior, (Mapping, nn.Module)):
        return "given", _flat_point(prior, "the prior", space, dtype, device)
    raise ValueError(
        "prior must be 'mean', 'zero' (or None), 'base' (with base=...) or a parameter dict, "
        f"got {prior!r}"
    )


def _flat_point(point, what: str, space: ParamSpace, dtype, device) -> Tensor:
    params = parameters_of(point)
    space.check(params, what=what)
    flat = space.flatten(params).to(device=device, dtype=dtype)
    check_finite(flat, what, space)
    return flat


# ---------------------------------------------------------------------------------- scale
def has_cheap_diagonal(F: LinearOperator) -> bool:
    """Whether ``F.diagonal()`` is computed from ``F``'s structure (or one pass over data)
    rather than by probing :math:`P` unit vectors (the base class's fallback)."""
    if isinstance(F, ScaledOperator):
        return has_cheap_diagonal(F.operator)
    if isinstance(F, SumOperator):
        return all(has_cheap_diagonal(op) for op in F.operators)
    if isinstance(F, BlockDiagonalOperator):
        return all(has_cheap_diagonal(op) for op in F.blocks)
    return type(F).diagonal is not LinearOperator.diagonal


def diagonal_passes(F: LinearOperator) -> int:
    """Passes over data ``F`` (and the operators it wraps) ran for diagonals so far
    (their ``diagonal_passes`` attribute, as :class:`~curvmerge.GGNOperator` keeps it)."""
    if isinstance(F, ScaledOperator):
        return diagonal_passes(F.operator)
    if isinstance(F, SumOperator):
        return sum(diagonal_passes(op) for op in F.operators)
    return int(getattr(F, "diagonal_passes", 0) or 0)


def hutchinson_mean_diagonal(F: LinearOperator, probes: int = SCALE_PROBES, seed: int = 0):
    """:math:`\\operatorname{tr}(F)/P` by Hutchinson's estimate with one seeded
    ``[P, probes]`` Rademacher block (``probes`` products)."""
    g = torch.Generator().manual_seed(seed)
    Z = rademacher(F.shape[0], probes, g, dtype=F.dtype, device=F.device)
    FZ = F @ Z
    return float((Z * FZ).sum(dtype=torch.float64)) / (probes * F.shape[0])


def mean_diagonals(
    curvatures, space, dtype, device, *, need_diagonal: bool, costs: MergeCosts, out=None
):
    """Per-curvature mean diagonal entries :math:`s_t` and, when ``need_diagonal`` and every
    curvature has a cheap diagonal, the stack of diagonals ``[T, P]`` (written into ``out``
    when given).

    Curvatures without a cheap diagonal get a Hutchinson estimate (never :math:`P` probes).
    The cost of diagonals (passes, seconds) and probes goes into ``costs``.

    Returns:
        ``(means, stack or None, source)`` with ``source`` ``"mean diagonal"`` or
        ``"hutchinson (k probes)"`` (if any curvature needed probes).
    """
    T = len(curvatures)
    cheap = [has_cheap_diagonal(F) for F in curvatures]
    stack = None
    if need_diagonal and all(cheap):
        stack = out if out is not None else torch.empty(T, space.size, dtype=dtype, device=device)
    means = []
    for i, F in enumerate(curvatures):
        if cheap[i]:
            try:
                d = _diagonal(F, costs)
            except NotImplementedError:  # it declined (no engine, space too large)
                cheap[i], stack = False, None
        if cheap[i]:
            check_finite(d, f"curvature {i}", space, nonnegative=True)
            means.append(float(d.sum(dtype=torch.float64)) / max(space.size, 1))
            if stack is not None:
                stack[i].copy_(d)
        else:
            t0 = time.perf_counter()
            means.append(hutchinson_mean_diagonal(F))
            costs.scale_products += SCALE_PROBES
            costs.scale_seconds += time.perf_counter() - t0
            if not math.isfinite(means[-1]):
                raise ValueError(f"curvature {i}: its products contain NaN or Inf")
    source = "mean diagonal" if all(cheap) else f"hutchinson ({SCALE_PROBES} probes)"
    return means, stack, source


def _diagonal(F: LinearOperator, costs: MergeCosts) -> Tensor:
    before = diagonal_passes(F)
    t0 = time.perf_counter()
    d = F.diagonal()
    costs.diagonal_seconds += time.perf_counter() - t0
    costs.diagonal_passes += diagonal_passes(F) - before
    return d


# ---------------------------------------------------------------------------------- solve
def _nystrom_rank(name: str, P: int) -> int:
    parts = name.split(":")
    if len(parts) == 1:
        return min(NYSTROM_RANK, P)
    try:
        rank = int(parts[1])
    except ValueError:
        rank = 0
    if len(parts) != 2 or rank < 1:
        raise ValueError(f"preconditioner {name!r}: expected 'nystrom:<positive rank>'")
    return min(rank, P)


def _kronecker_average(name: str) -> str:
    parts = name.split(":")
    if len(parts) == 1:
        return KRONECKER_AVERAGE
    if len(parts) != 2 or parts[1] not in ("mean", "frobenius"):
        raise ValueError(
            f"preconditioner {name!r}: expected 'kronecker', 'kronecker:mean' or "
            "'kronecker:frobenius'"
        )
    return parts[1]


def check_preconditioner(preconditioner, P: int, curvatures=None) -> None:
    """Refuse an unknown ``preconditioner`` before any work is done (and ``"kronecker"``
    for curvatures that are not all :class:`~curvmerge.operators.KroneckerOperator`, when
    they are given)."""
    if preconditioner is None or isinstance(preconditioner, LinearOperator):
        return
    if preconditioner == "diagonal":
        return
    if isinstance(preconditioner, str) and preconditioner.split(":")[0] == "nystrom":
        _nystrom_rank(preconditioner, P)
        return
    if isinstance(preconditioner, str) and preconditioner.split(":")[0] == "kronecker":
        _kronecker_average(preconditioner)
        if curvatures is not None:
            _check_kronecker(curvatures)
        return
    raise ValueError(
        "preconditioner must be 'diagonal', 'nystrom', 'nystrom:<rank>', 'kronecker', "
        f"'kronecker:<mean|frobenius>', None or an operator, got {preconditioner!r}"
    )


def _check_kronecker(curvatures) -> None:
    for i, F in enumerate(curvatures):
        if not isinstance(F, KroneckerOperator):
            raise ValueError(
                f"preconditioner='kronecker' needs Kronecker-factored curvatures "
                f"(KroneckerOperator: K-FAC, RegMean's Grams); curvature {i} is a "
                f"{type(F).__name__}. For other curvatures build a "
                "curvmerge.precondition.KroneckerPreconditioner from K-FAC factors and pass "
                "it as the preconditioner, or use 'nystrom' or None"
            )


def system_operator(curvatures, w, damping, space, dtype, device) -> LinearOperator:
    """The lazy operator :math:`\\lambda I + \\sum_t w_t F_t` (terms with :math:`w_t = 0`
    left out)."""
    A = IdentityOperator(space, damping, dtype=dtype, device=device)
    for wt, F in zip(w, curvatures, strict=True):
        if wt != 0:
            A = A + wt * F
    return A


def make_preconditioner(preconditioner, curvatures, w, damping, diag, space, report):
    """Resolve the ``preconditioner`` argument into an operator ``M`` (or ``None``).

    Args:
        diag: :math:`\\sum_t w_t \\operatorname{diag} F_t`, or ``None`` when the curvatures
            have no cheap diagonal.

    Returns:
        ``M``; the report's ``preconditioner`` field and sketch costs are set.
    """
    check_preconditioner(preconditioner, space.size)
    if isinstance(preconditioner, LinearOperator):
        report.preconditioner = type(preconditioner).__name__
        return preconditioner
    if preconditioner is None:
        return None
    if preconditioner == "diagonal":
        if diag is None or not bool(((diag + damping) > 0).all()):
            warn_user(
                "merge: the curvatures have no cheap, positive diagonal; solving without "
                "preconditioner",
                UserWarning,
            )
            return None
        report.preconditioner = "diagonal"
        return DiagonalOperator(space, 1.0 / (diag + damping))
    if preconditioner.split(":")[0] == "kronecker":
        return _kronecker_preconditioner(preconditioner, curvatures, w, damping, report)
    rank = _nystrom_rank(preconditioner, space.size)
    if not damping > 0:
        warn_user(
            "merge: the Nyström preconditioner needs damping > 0; solving without", UserWarning
        )
        return None
    from curvmerge.precondition import NystromPreconditioner

    t0 = time.perf_counter()
    weighted = [wt * F for wt, F in zip(w, curvatures, strict=True) if wt != 0]
    total = weighted[0] if len(weighted) == 1 else SumOperator(weighted)
    M = NystromPreconditioner(total, rank, damping)
    report.costs.sketch_products += M.products
    report.costs.sketch_seconds += time.perf_counter() - t0
    report.preconditioner = f"nystrom (rank {M.products})"
    return M


def _kronecker_preconditioner(name, curvatures, w, damping, report):
    _check_kronecker(curvatures)
    from curvmerge.precondition import KroneckerPreconditioner

    average = _kronecker_average(name)
    t0 = time.perf_counter()
    try:
        M = KroneckerPreconditioner(curvatures, w, damping, average=average)
    except ValueError:
        if damping > 0:
            raise
        warn_user(
            "merge: the Kronecker preconditioner needs damping > 0 (the averaged K-FAC factors "
            "are singular); solving without",
            UserWarning,
        )
        return None
    report.costs.sketch_seconds += time.perf_counter() - t0  # eigendecompositions, no products
    report.preconditioner = f"kronecker ({average})"
    return M


def solve_system(A, b, x0, M, report: MergeReport, *, rtol, maxiter, callback=None) -> Tensor:
    """Solve :math:`A y = b` by CG and fill the report (convergence and costs).

    A warm start ``x0`` is kept only if its residual beats :math:`x = 0` (one product,
    counted as ``warm_start_products``).
    """
    if x0 is not None:
        t0 = time.perf_counter()
        keep = bool(torch.linalg.vector_norm(b - A @ x0) < torch.linalg.vector_norm(b))
        report.costs.warm_start_products += 1
        report.costs.warm_start_seconds += time.perf_counter() - t0
        if not keep:
            x0 = None
    report.warm_start = x0 is not None
    t0 = time.perf_counter()
    result = solve_cg(A, b, x0, rtol=rtol, maxiter=maxiter, M=M, callback=callback)
    report.costs.cg_seconds += time.perf_counter() - t0
    report.costs.cg_products += result.products
    report.method = "cg"
    report.converged = result.converged
    report.iterations = result.iterations
    report.relative_residual = result.relative_residual
    report.residual_history = list(result.residuals)
    return result.x
