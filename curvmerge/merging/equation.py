"""The merge equation.

.. math::

    \\theta^* = (\\lambda I + \\textstyle\\sum_t w_t F_t)^{-1}
                (\\textstyle\\sum_t w_t F_t \\theta_t + \\lambda \\theta_0),

the minimiser of :math:`\\sum_t \\tfrac{w_t}{2}\\|\\theta-\\theta_t\\|^2_{F_t}
+ \\tfrac{\\lambda}{2}\\|\\theta-\\theta_0\\|^2`. It is solved in task-vector form,
:math:`\\theta^* = \\theta_0 + (\\lambda I + \\sum_t w_t F_t)^{-1}
\\sum_t w_t F_t (\\theta_t - \\theta_0)`: in closed form when every :math:`F_t` is diagonal
(identity included), else by preconditioned CG warm-started from a diagonal merge.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from curvmerge.operators import DiagonalOperator, IdentityOperator, LinearOperator
from curvmerge.operators.base import SumOperator
from curvmerge.solve import solve_cg
from curvmerge.space import ParamSpace, SpaceMismatchError

__all__ = [
    "merge",
    "MergeResult",
    "MergeReport",
    "ConvergenceWarning",
    "ConvergenceError",
    "load_merged",
    "parameters_of",
    "check_weights",
]


class ConvergenceWarning(UserWarning):
    """CG stopped before reaching the requested tolerance."""


class ConvergenceError(RuntimeError):
    """CG stopped before reaching the requested tolerance (``require_convergence=True``)."""


@dataclass
class MergeReport:
    """What a merge did.

    Attributes:
        method: ``"average"`` (identity), ``"diagonal"`` (closed form) or ``"cg"``.
        num_models: Number of merged models.
        weights: The coefficients :math:`w_t`.
        damping: :math:`\\lambda`.
        prior: ``"mean"``, ``"zero"`` or ``"given"``.
        converged: Whether the solve reached its tolerance (closed forms: always).
        iterations: CG iterations (0 for closed forms).
        products: Products with :math:`\\lambda I + \\sum_t w_t F_t` in CG, plus the
            :math:`T` products that form the right-hand side.
        relative_residual: :math:`\\|b - Ax\\| / \\|b\\|` at the end (0 for closed forms).
        residual_history: Relative residual after each CG iteration.
        preconditioner: Name of the preconditioner used.
        warm_start: Whether CG started from the diagonal merge.
        unseen: Entries that no curvature sees and damping does not hold
            (:math:`\\lambda + \\sum_t w_t d_t = 0`), set to the prior (diagonal form only).
        seconds: Wall-clock time of the merge.
    """

    method: str
    num_models: int
    weights: list[float]
    damping: float
    prior: str
    converged: bool = True
    iterations: int = 0
    products: int = 0
    relative_residual: float = 0.0
    residual_history: list[float] = field(default_factory=list)
    preconditioner: str | None = None
    warm_start: bool = False
    unseen: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        s = f"{self.method} merge of {self.num_models} models (damping={self.damping:g}, "
        s += f"prior={self.prior})"
        if self.method == "cg":
            state = "converged" if self.converged else "NOT CONVERGED"
            s += (
                f": {state} after {self.iterations} iterations / {self.products} products, "
                f"relative residual {self.relative_residual:.2e}"
            )
        return s


@dataclass
class MergeResult:
    """The merged parameters and a :class:`MergeReport`."""

    params: dict[str, Tensor]
    report: MergeReport

    def load_into(self, module: nn.Module) -> nn.Module:
        """A copy of ``module`` with the merged parameters (see :func:`load_merged`)."""
        return load_merged(module, self.params)


def parameters_of(model: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The parameter dict of a module (detached) or a mapping, as a plain dict."""
    if isinstance(model, nn.Module):
        return {n: p.detach() for n, p in model.named_parameters()}
    if isinstance(model, Mapping):
        return dict(model)
    raise TypeError(f"expected a module or a parameter dict, got {type(model).__name__}")


def load_merged(module: nn.Module, params: Mapping[str, Tensor], *, copy_module: bool = True):
    """Load merged parameters into (a deep copy of) ``module``.

    Parameters not in ``params`` (task heads, buffers) keep the module's values.
    """
    target = copy.deepcopy(module) if copy_module else module
    own = dict(target.named_parameters())
    for name, value in params.items():
        if name not in own:
            raise SpaceMismatchError(f"merged parameter {name!r} is not a parameter of the module")
        if own[name].shape != value.shape:
            raise SpaceMismatchError(
                f"merged parameter {name!r} has shape {tuple(value.shape)}, "
                f"the module's has {tuple(own[name].shape)}"
            )
        with torch.no_grad():
            own[name].copy_(value)
    return target


def _check_finite(x: Tensor, what: str, space: ParamSpace) -> None:
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        idx = int(bad.nonzero()[0, 0])
        name = next(n for n, sl in space.slices().items() if sl.start <= idx < sl.stop)
        raise ValueError(f"{what} contains NaN or Inf (first in parameter {name!r})")


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


def check_inputs(thetas, curvatures, params):
    """Validate the models and curvatures of a merge.

    Returns:
        ``(dicts, curvatures, space, dtype, device)``: the parameter dicts, the curvatures
        as a list (or ``None``), the merged space (names and shapes), and the dtype and
        device the merge is computed in (the curvatures', else the first model's promoted
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
        dtype, device = curvatures[0].dtype, curvatures[0].device
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


def merge(
    thetas: Sequence[nn.Module | Mapping[str, Tensor]],
    curvatures: Sequence[LinearOperator] | None = None,
    *,
    weights: Sequence[float] | None = None,
    damping: float = 1e-3,
    prior: str | Mapping[str, Tensor] | None = "mean",
    params: str | Sequence[str] | None = None,
    rtol: float = 1e-6,
    maxiter: int | None = None,
    preconditioner: str | LinearOperator | None = None,
    warm_start: bool = True,
    require_convergence: bool = False,
    callback=None,
) -> MergeResult:
    """Merge models by :math:`\\theta^* = (\\lambda I + \\sum_t w_t F_t)^{-1}
    (\\sum_t w_t F_t \\theta_t + \\lambda\\theta_0)`.

    Args:
        thetas: The models (modules or parameter dicts). They may hold more parameters
            than are merged (task heads); those are ignored.
        curvatures: One operator :math:`F_t` per model, all on the same space; ``None``
            means identity (weighted averaging).
        weights: Coefficients :math:`w_t \\ge 0` (default :math:`1/T`).
        damping: :math:`\\lambda \\ge 0`.
        prior: :math:`\\theta_0`: ``"mean"`` (the :math:`w`-weighted average, the default),
            ``None`` (zero: the textbook form, which pulls unseen directions to zero), or a
            parameter dict (for example the pre-trained base).
        params: Names or a regex selecting the merged parameters when ``curvatures`` is
            ``None`` (default: all parameters of the first model). With curvatures, their
            space decides.
        rtol: Relative tolerance of CG (scipy's stopping rule).
        maxiter: Maximum CG iterations (default ``10 * P``).
        preconditioner: ``"diagonal"`` (Jacobi: :math:`\\lambda + \\sum_t w_t
            \\operatorname{diag}F_t` when the curvatures provide a diagonal),
            ``"nystrom"`` or ``"nystrom:<rank>"`` (randomized Nyström preconditioner of
            :math:`\\sum_t w_t F_t`, :class:`curvmerge.precondition.NystromPreconditioner`;
            its sketch costs ``rank`` products, counted in the report, and about
            ``5 * P * rank`` float64 numbers of memory; default rank :data:`NYSTROM_RANK`),
            ``None`` (plain CG, the default), or an operator approximating
            :math:`(\\lambda I + \\sum_t w_t F_t)^{-1}`. Plain CG is the default because on
            the exact-Fisher merge of three MNIST CNNs
            (``benchmarks/bench_ggn.py``, ``docs/benchmarks_ggn.md``) Jacobi needed 3.1x
            plain CG's products at damping 1e-3 and 1.6x at 1e-2, and Nyström saved
            products only at the smallest damping (rank 20: 56 instead of 63 at 1e-3).
        warm_start: Start CG from the diagonal merge when the diagonals are available.
        require_convergence: Raise :class:`ConvergenceError` instead of warning.
        callback: Passed to CG (called with the task-vector iterate).

    Returns:
        A :class:`MergeResult` whose ``params`` has one tensor per merged parameter, in each
        parameter's original dtype and device.

    Example:
        >>> a = {"w": torch.tensor([0.0, 2.0])}
        >>> b = {"w": torch.tensor([2.0, 4.0])}
        >>> merge([a, b]).params["w"]
        tensor([1., 3.])
    """
    start = time.perf_counter()
    dicts, curvatures, space, dtype, device = check_inputs(thetas, curvatures, params)
    T = len(dicts)
    w = check_weights(weights, T, 1.0 / T)
    damping = float(damping)
    if not damping >= 0:
        raise ValueError(f"damping must be >= 0, got {damping}")

    thetas_flat = [space.flatten(d).to(device=device, dtype=dtype) for d in dicts]
    for i, th in enumerate(thetas_flat):
        _check_finite(th, f"model {i}", space)

    wsum = sum(w)
    if isinstance(prior, str) and prior == "mean":
        theta0 = sum(wt * th for wt, th in zip(w, thetas_flat, strict=True)) / wsum
        prior_name = "mean"
    elif prior is None:
        theta0 = torch.zeros_like(thetas_flat[0])
        prior_name = "zero"
    elif isinstance(prior, Mapping):
        theta0 = space.flatten(prior).to(device=device, dtype=dtype)
        _check_finite(theta0, "prior", space)
        prior_name = "given"
    else:
        raise ValueError(f"prior must be 'mean', None or a parameter dict, got {prior!r}")
    deltas = [th - theta0 for th in thetas_flat]

    if curvatures is None:
        curvatures = [IdentityOperator(space, dtype=dtype, device=device)] * T
    report = MergeReport(method="", num_models=T, weights=w, damping=damping, prior=prior_name)

    if all(isinstance(F, DiagonalOperator) for F in curvatures):
        step = _diagonal_step(curvatures, w, damping, deltas, space, report)
    else:
        step = _cg_step(
            curvatures,
            w,
            damping,
            deltas,
            space,
            report,
            rtol=rtol,
            maxiter=maxiter,
            preconditioner=preconditioner,
            warm_start=warm_start,
            callback=callback,
        )
        if not report.converged:
            msg = (
                f"merge: CG did not converge: relative residual {report.relative_residual:.2e} "
                f"> rtol={rtol:g} after {report.iterations} iterations; the merged parameters "
                "are inaccurate. Raise maxiter or the damping, or use a preconditioner."
            )
            if require_convergence:
                raise ConvergenceError(msg)
            warnings.warn(msg, ConvergenceWarning, stacklevel=2)

    merged = theta0 + step
    _check_finite(merged, "the merged parameters", space)
    out = {}
    for name, value in space.unflatten(merged).items():
        original = dicts[0][name]
        out[name] = value.to(device=original.device, dtype=original.dtype).clone()
    report.seconds = time.perf_counter() - start
    return MergeResult(out, report)


def _weighted_diagonal(curvatures, w, device, dtype, space) -> Tensor:
    total = torch.zeros(space.size, device=device, dtype=dtype)
    for i, (wt, F) in enumerate(zip(w, curvatures, strict=True)):
        d = F.diagonal().to(device=device, dtype=dtype)
        _check_finite(d, f"curvature {i}", space)
        if bool((d < 0).any()):
            raise ValueError(f"curvature {i} has negative diagonal entries: not PSD")
        total = total + wt * d
    return total


def _diagonal_step(curvatures, w, damping, deltas, space, report) -> Tensor:
    """Closed form :math:`(\\lambda + \\sum w d)^{-1} \\sum w d \\delta`, elementwise."""
    device, dtype = deltas[0].device, deltas[0].dtype
    is_identity = all(isinstance(F, IdentityOperator) for F in curvatures)
    report.method = "average" if is_identity else "diagonal"
    denom = _weighted_diagonal(curvatures, w, device, dtype, space) + damping
    numer = torch.zeros_like(denom)
    for wt, F, delta in zip(w, curvatures, deltas, strict=True):
        numer = numer + wt * (F.diagonal().to(device=device, dtype=dtype) * delta)
    unseen = denom == 0
    report.unseen = int(unseen.sum())
    return torch.where(unseen, 0.0, numer / torch.where(unseen, 1.0, denom))


#: Sketch size of ``preconditioner="nystrom"`` (``"nystrom:<rank>"`` picks another).
NYSTROM_RANK = 100


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


def system_operator(curvatures, w, damping, space, dtype, device) -> LinearOperator:
    """The lazy operator :math:`\\lambda I + \\sum_t w_t F_t` (terms with :math:`w_t = 0`
    left out)."""
    A = IdentityOperator(space, damping, dtype=dtype, device=device)
    for wt, F in zip(w, curvatures, strict=True):
        if wt != 0:
            A = A + wt * F
    return A


def make_preconditioner(preconditioner, curvatures, w, damping, diag, space, report):
    """Resolve ``merge``'s ``preconditioner`` argument into an operator ``M`` (or ``None``).

    Args:
        diag: :math:`\\sum_t w_t \\operatorname{diag} F_t`, or ``None`` when unavailable.

    Returns:
        ``(M, sketch_products)``; the report's ``preconditioner`` field is set.
    """
    if isinstance(preconditioner, LinearOperator):
        report.preconditioner = type(preconditioner).__name__
        return preconditioner, 0
    if preconditioner is None:
        return None, 0
    if preconditioner == "diagonal":
        if diag is None or not bool(((diag + damping) > 0).all()):
            warnings.warn(
                "merge: no positive diagonal of the curvatures; solving without preconditioner",
                stacklevel=4,
            )
            return None, 0
        report.preconditioner = "diagonal"
        return DiagonalOperator(space, 1.0 / (diag + damping)), 0
    if isinstance(preconditioner, str) and preconditioner.split(":")[0] == "nystrom":
        rank = _nystrom_rank(preconditioner, space.size)
        if not damping > 0:
            warnings.warn(
                "merge: the Nyström preconditioner needs damping > 0; solving without",
                stacklevel=4,
            )
            return None, 0
        from curvmerge.precondition import NystromPreconditioner

        weighted = [wt * F for wt, F in zip(w, curvatures, strict=True) if wt != 0]
        total = weighted[0] if len(weighted) == 1 else SumOperator(weighted)
        M = NystromPreconditioner(total, rank, damping)
        report.preconditioner = f"nystrom (rank {M.products})"
        return M, M.products
    raise ValueError(
        "preconditioner must be 'diagonal', 'nystrom', 'nystrom:<rank>', None or an "
        f"operator, got {preconditioner!r}"
    )


def solve_system(A, b, x0, M, report, *, rtol, maxiter, callback=None, extra_products=0):
    """Solve :math:`A y = b` by CG and fill the report.

    A warm start ``x0`` is kept only if its residual beats :math:`x = 0` (one product).
    ``extra_products`` (right-hand side, sketch) are added to the report's count.
    """
    checked = 0
    if x0 is not None:
        checked = 1
        if torch.linalg.vector_norm(b - A @ x0) >= torch.linalg.vector_norm(b):
            x0 = None
    report.warm_start = x0 is not None
    result = solve_cg(A, b, x0, rtol=rtol, maxiter=maxiter, M=M, callback=callback)
    report.method = "cg"
    report.converged = result.converged
    report.iterations = result.iterations
    report.products = result.products + checked + extra_products
    report.relative_residual = result.relative_residual
    report.residual_history = result.residuals
    return result.x


def _cg_step(
    curvatures,
    w,
    damping,
    deltas,
    space,
    report,
    *,
    rtol,
    maxiter,
    preconditioner,
    warm_start,
    callback,
) -> Tensor:
    """Solve :math:`(\\lambda I + \\sum w F) y = \\sum w F \\delta` by preconditioned CG."""
    device, dtype = deltas[0].device, deltas[0].dtype
    A = system_operator(curvatures, w, damping, space, dtype, device)
    b = torch.zeros(space.size, device=device, dtype=dtype)
    for wt, F, delta in zip(w, curvatures, deltas, strict=True):
        if wt != 0:
            b = b + wt * (F @ delta).to(device=device, dtype=dtype)
    _check_finite(b, "the right-hand side sum_t w_t F_t (theta_t - theta_0)", space)
    rhs_products = sum(1 for wt in w if wt != 0)

    diag = None
    if preconditioner == "diagonal" or warm_start:
        try:
            diag = _weighted_diagonal(curvatures, w, device, dtype, space)
        except NotImplementedError:
            diag = None
    M, sketch_products = make_preconditioner(
        preconditioner, curvatures, w, damping, diag, space, report
    )

    x0 = None
    if warm_start and diag is not None:
        denom = diag + damping
        numer = torch.zeros_like(b)
        for wt, F, delta in zip(w, curvatures, deltas, strict=True):
            numer = numer + wt * F.diagonal().to(device=device, dtype=dtype) * delta
        x0 = torch.where(denom > 0, numer / torch.where(denom > 0, denom, 1.0), 0.0)
    return solve_system(
        A,
        b,
        x0,
        M,
        report,
        rtol=rtol,
        maxiter=maxiter,
        callback=callback,
        extra_products=rhs_products + sketch_products,
    )
