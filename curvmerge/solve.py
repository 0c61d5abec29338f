"""Preconditioned conjugate gradients in torch, with scipy's signature and stopping rule."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from curvmerge.operators.base import LinearOperator

__all__ = ["cg", "cg_shifts", "CGResult", "ShiftedCGResults", "solve_cg"]


@dataclass
class CGResult:
    """Everything a CG run measured.

    Attributes:
        x: The solution, same shape as ``b``.
        info: 0 if the true residual of every column meets the tolerance; -1 on a
            breakdown (a product, the preconditioner or a step turned NaN or Inf: NaN is
            never converged); else the number of iterations done (``maxiter``), as scipy,
            but at least 1.
        iterations: CG iterations done.
        products: Products with ``A``: one per iteration, one for a non-zero ``x0``, and
            the ``true_residual_checks``.
        residuals: Relative residual ``‖b − Ax‖ / ‖b‖`` (largest over columns) after each
            iteration, starting with the initial guess. Entries come from the recurrence,
            except where the true residual was computed; the last entry always is the
            true residual of ``x`` (NaN if it is NaN in any column).
        true_residual_checks: Products spent on the true residual ``b − A x``: one each
            time the recurrence claimed convergence, and one at exit.
    """

    x: Tensor
    info: int
    iterations: int
    products: int
    residuals: list[float] = field(default_factory=list)
    true_residual_checks: int = 0

    @property
    def converged(self) -> bool:
        return self.info == 0

    @property
    def relative_residual(self) -> float:
        return self.residuals[-1] if self.residuals else 0.0


def _as_apply(A) -> Callable[[Tensor], Tensor]:
    if isinstance(A, LinearOperator):
        return lambda X: A @ X
    if isinstance(A, Tensor):
        return lambda X: A @ X
    if callable(A):
        return A
    raise TypeError(f"A must be a LinearOperator, a tensor or a callable, got {type(A).__name__}")


def _dot(U: Tensor, V: Tensor) -> Tensor:
    """Column-wise :math:`u_k^\\top v_k`, accumulated in float64."""
    return (U * V).sum(0, dtype=torch.float64)


def _norm(U: Tensor) -> Tensor:
    """Column-wise Euclidean norms, in float64."""
    return torch.linalg.vector_norm(U, dim=0, dtype=torch.float64)


def solve_cg(
    A,
    b: Tensor,
    x0: Tensor | None = None,
    *,
    rtol: float = 1e-6,
    atol: float = 0.0,
    maxiter: int | None = None,
    M=None,
    callback: Callable[[Tensor], None] | None = None,
) -> CGResult:
    """Like :func:`cg` but returns a :class:`CGResult` with iteration counts and history.

    A ``callback`` with an ``on_residual`` method (a progress bar such as
    :class:`~curvmerge.merging.SolveProgress`) also gets, after each iteration and before
    it is called, the relative residual of that iteration (the recurrence's, largest over
    columns): what a person watching the solve wants to read, at no extra product.
    """
    if b.ndim not in (1, 2):
        raise ValueError(f"b must be [P] or [P, K], got shape {tuple(b.shape)}")
    vector = b.ndim == 1
    B = b.unsqueeze(1) if vector else b
    apply_A = _as_apply(A)
    apply_M = _as_apply(M) if M is not None else None
    P = B.shape[0]
    maxiter = 10 * P if maxiter is None else int(maxiter)

    def finish(X, info, it, products, checks, history):
        return CGResult(X.squeeze(1) if vector else X, info, it, products, history, checks)

    bnorm = _norm(B)
    if not torch.isfinite(bnorm).all():
        raise ValueError("cg: the right-hand side b contains NaN or Inf")
    tol = torch.clamp(rtol * bnorm, min=atol)
    scale = torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
    nan = torch.full_like(bnorm, float("nan"))

    def relative(rnorm, broken):
        # Largest over columns; a column that broke down shows NaN, never a small number.
        return float(torch.where(broken, nan, rnorm / scale).max())

    products = 0
    checks = 0
    if x0 is None:
        X = torch.zeros_like(B)
        R = B.clone()
    else:
        X = (x0.unsqueeze(1) if vector else x0).to(B).clone()
        if X.shape != B.shape:
            raise ValueError(f"x0 has shape {tuple(x0.shape)}, b has {tuple(b.shape)}")
        if not bool(torch.isfinite(X).all()):
            raise ValueError("cg: the initial guess x0 contains NaN or Inf")
        X = torch.where(bnorm > 0, X, 0.0)  # b = 0 has x = 0 (scipy returns b), exactly
        R = B - apply_A(X)
        products += 1
    if bool((bnorm == 0).all()):
        return finish(torch.zeros_like(B), 0, 0, products, 0, [0.0])
    rnorm = _norm(R)
    # A column breaks down when a product, the preconditioner or a step turns non-finite:
    # it stops moving (keeping its last finite iterate) and the run ends with info = -1.
    broken = ~torch.isfinite(rnorm)
    history = [relative(rnorm, broken)]
    # R is the true residual b - A X (not the recurrence's) right after it is computed.
    true_now = True

    on_residual = getattr(callback, "on_residual", None)
    P_dir = None
    rho_prev = None
    it = 0  # iterations done
    checked = None  # true residual norms at the previous check that missed the tolerance
    while True:
        active = (rnorm > tol) & ~broken
        if it == maxiter or not bool(active.any()):
            if true_now:
                break
            # The recurrence says done (or maxiter): check the true residual, which in low
            # precision can stagnate far above the recursive one. One product.
            R = B - apply_A(X)
            products += 1
            checks += 1
            true_now = True
            rnorm = _norm(R)
            broken |= ~torch.isfinite(rnorm)
            history[-1] = relative(rnorm, torch.zeros_like(broken))
            missing = (rnorm > tol) & ~broken
            if checked is not None and bool((rnorm[missing] > 0.9 * checked[missing]).all()):
                break  # a restart no longer gains 10 %: the precision of the dtype is reached
            checked = rnorm.clone() if bool(missing.any()) else None
            P_dir = None  # restart the recurrence from the true residual: p = z
            continue
        Z = apply_M(R) if apply_M is not None else R
        rho = _dot(R, Z)
        if P_dir is None:
            P_dir = Z.clone()
        else:
            beta = torch.where(active, rho / torch.where(rho_prev != 0, rho_prev, 1.0), 0.0)
            P_dir = Z + beta.to(B.dtype) * P_dir
        Q = apply_A(P_dir)
        products += 1
        pq = _dot(P_dir, Q)
        finite = torch.isfinite(rho) & torch.isfinite(pq)
        if bool((active & finite & ~(pq > 0)).any()):
            raise ValueError(
                "cg: p^T A p <= 0: the operator is not positive definite "
                "(check the curvatures and the damping)"
            )
        step = active & finite
        alpha = torch.where(step, rho / torch.where(step, pq, 1.0), 0.0)
        X_new = X + alpha.to(B.dtype) * P_dir
        R_new = R - alpha.to(B.dtype) * Q
        rnorm_new = _norm(R_new)
        step &= torch.isfinite(alpha) & torch.isfinite(rnorm_new) & torch.isfinite(X_new).all(0)
        broken |= active & ~step
        X = torch.where(step, X_new, X)
        R = torch.where(step, R_new, R)
        rnorm = torch.where(step, rnorm_new, rnorm)
        rho_prev = rho
        it += 1
        true_now = False
        history.append(relative(rnorm, broken))
        if on_residual is not None:
            on_residual(history[-1])
        if callback is not None:
            callback(X.squeeze(1) if vector else X)
    # rnorm is the true residual of X here.
    if bool(broken.any()):
        info = -1
    else:
        # Not converged is never 0, even after maxiter=0 iterations (where scipy says 0).
        info = 0 if bool((rnorm <= tol).all()) else max(it, 1)
    return finish(X, info, it, products, checks, history)


def cg(
    A,
    b: Tensor,
    x0: Tensor | None = None,
    *,
    rtol: float = 1e-6,
    atol: float = 0.0,
    maxiter: int | None = None,
    M=None,
    callback: Callable[[Tensor], None] | None = None,
) -> tuple[Tensor, int]:
    """Solve :math:`A x = b` for symmetric positive definite :math:`A` by (preconditioned) CG.

    Mirrors :func:`scipy.sparse.linalg.cg`: the iteration stops once
    :math:`\\|b - A x\\| \\le \\max(\\text{rtol}\\,\\|b\\|, \\text{atol})`, and ``info`` is 0
    on convergence, else the number of iterations done (``maxiter``), or -1 on a
    breakdown (a product with ``A`` or ``M`` or a step turned NaN or Inf; scipy's
    ``info < 0``); NaN is never converged. Several right-hand
    sides ``b`` of shape ``[P, K]`` are solved at once, each column with its own step
    sizes and stopping test; ``info`` is 0 only when every column converged.

    The test is first made on the recursive residual; when that passes (and at exit), the
    true residual :math:`b - A x` is computed (one product). In low precision the two can
    differ by orders of magnitude, so a column whose true residual misses the tolerance
    restarts from it (:math:`p = M r`) and iterates on, until ``maxiter`` or until a
    restart no longer lowers the true residual by 10 % (stagnation at the precision of the
    dtype): ``info`` is 0 only if the true residual of the returned ``x`` meets the
    tolerance. Vectors stay in ``b``'s dtype; inner products and norms are accumulated in
    float64.

    Args:
        A: A :class:`~curvmerge.LinearOperator`, a dense tensor or a callable ``X -> A X``.
        b: Right-hand side, ``[P]`` or ``[P, K]``; its device and dtype are used throughout.
        x0: Initial guess (default zeros); NaN or Inf entries raise ``ValueError``.
        rtol: Relative tolerance.
        atol: Absolute tolerance.
        maxiter: Maximum number of iterations (default ``10 * P``, as scipy).
        M: Preconditioner approximating :math:`A^{-1}` (operator, tensor or callable).
        callback: Called with the current iterate after each iteration.

    Returns:
        ``(x, info)``.

    Example:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> x, info = cg(A, b, rtol=1e-12)
        >>> info, torch.allclose(x, torch.linalg.solve(A, b))
        (0, True)
    """
    result = solve_cg(A, b, x0, rtol=rtol, atol=atol, maxiter=maxiter, M=M, callback=callback)
    return result.x, result.info


class ShiftedCGResults(list):
    """The :class:`CGResult` of every shift of one :func:`cg_shifts` run, in the order of
    the shifts.

    Each result's ``products`` counts the products that shift needed (the iterations it
    was active plus its column of the true-residual block); the products were shared, so
    their sum overstates the cost. The run's cost is:

    Attributes:
        products: Products with ``A`` the run made, each counted once: one per iteration
            (shared by every shift) plus one per column of the ``[P, S]`` true-residual
            block (a product is one column times ``A``, as operators count them).
        iterations: Iterations of the shared Krylov process (those of the hardest shift).
    """

    def __init__(self, results=(), *, products: int = 0, iterations: int = 0):
        super().__init__(results)
        self.products = products
        self.iterations = iterations


def cg_shifts(
    A,
    b: Tensor,
    shifts,
    *,
    rtol: float = 1e-6,
    atol: float = 0.0,
    maxiter: int | None = None,
    callback: Callable[[Tensor], None] | None = None,
) -> ShiftedCGResults:
    """Solve :math:`(A + \\sigma_j I)\\, x_j = b` for every shift :math:`\\sigma_j \\ge 0` from
    one Krylov space (multi-shift CG).

    Multi-shift CG (Jegerlehner, "Krylov space solvers for shifted linear systems", 1996;
    the shifted CG recurrences as written by van den Eshof & Sleijpen, "Accurate
    conjugate gradient methods for families of shifted systems", 2003): the Krylov space
    :math:`\\mathcal K_k(A, b)` is the same for every shift, and the CG residual of each
    shifted system is collinear with the seed's, :math:`r^{(j)}_k = \\zeta^{(j)}_k r_k`. One
    CG run on the seed system (the smallest shift, the slowest to converge) gives the step
    sizes of all others through scalar recurrences, so an iteration costs **one** product
    with :math:`A` for all shifts, plus one vector update per shift.

    ``x0 = 0`` and no preconditioner: both would break the shift invariance of the Krylov
    space (:math:`M(A + \\sigma I)` is not a shift of :math:`MA`, and different starting
    residuals are not collinear), which is what lets the shifts share it.

    Each shift has its own stopping test, scipy's rule on its own (recurrence) residual
    :math:`|\\zeta^{(j)}_k|\\,\\|r_k\\| \\le \\max(\\text{rtol}\\,\\|b\\|, \\text{atol})`, and stops
    updating once it passes. At exit the true residual :math:`\\|b - (A + \\sigma_j I)
    x_j\\|` of every shift is computed by one block product with ``[x_1, ..., x_S]``; a
    shift converged (``info == 0``) only if its true residual meets the tolerance. There is
    no restart (it would break the collinearity): a shift whose true residual misses (low
    precision) reports ``info`` = its iterations; re-solve it with :func:`solve_cg` warm
    started from its ``x``. Conventions as :func:`solve_cg`: vectors in ``b``'s dtype,
    scalars in float64, NaN never converged, ``info = -1`` on a breakdown.

    Args:
        A: Symmetric positive (semi)definite: a :class:`~curvmerge.LinearOperator`, a dense
            tensor or a callable ``X -> A X`` (applied to ``[P, 1]`` and ``[P, S]`` blocks).
        b: Right-hand side ``[P]``.
        shifts: The :math:`\\sigma_j \\ge 0` (any order; results come in the same order).
        rtol, atol: Tolerances, as :func:`solve_cg`.
        maxiter: Limit on the shared iterations (default ``10 * P``).
        callback: Called with the ``[P, S]`` block of iterates after each iteration (the
            block is updated in place: copy it to keep an iterate); one with an
            ``on_residual`` method also gets the largest relative (recurrence) residual over
            the shifts, as in :func:`solve_cg`.

    Returns:
        A :class:`ShiftedCGResults` (a list of :class:`CGResult`, one per shift): each
        result's ``products`` are its own iterations plus its column of the true-residual
        block, ``true_residual_checks`` is 1 and the last ``residuals`` entry is its true
        residual; the list's ``products`` counts the shared products once.

    Example:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> res = cg_shifts(A, b, [0.0, 1.0], rtol=1e-12)
        >>> [r.info for r in res], res.products
        ([0, 0], 4)
    """
    if b.ndim != 1:
        raise ValueError(f"b must be [P], got shape {tuple(b.shape)}")
    sig = torch.tensor([float(s) for s in shifts], dtype=torch.float64)
    S = sig.numel()
    if S == 0:
        return ShiftedCGResults()
    if not bool(torch.isfinite(sig).all()) or bool((sig < 0).any()):
        raise ValueError(f"cg_shifts: shifts must be finite and >= 0, got {sig.tolist()}")
    apply_A = _as_apply(A)
    P = b.shape[0]
    maxiter = 10 * P if maxiter is None else int(maxiter)
    dtype, device = b.dtype, b.device
    bnorm = float(torch.linalg.vector_norm(b, dtype=torch.float64))
    if not math.isfinite(bnorm):
        raise ValueError("cg: the right-hand side b contains NaN or Inf")
    if bnorm == 0:
        return ShiftedCGResults([CGResult(torch.zeros_like(b), 0, 0, 0, [0.0]) for _ in range(S)])
    tol = max(rtol * bnorm, atol)

    def on_device(v: Tensor) -> Tensor:  # float64 scalars per shift -> [1, S] in b's dtype
        return v.to(device=device, dtype=dtype).unsqueeze(0)

    seed = float(sig.min())
    delta = sig - seed  # shifts relative to the seed system A + seed I
    r = b.unsqueeze(1).clone()  # seed residual [P, 1]
    p = r.clone()  # seed direction
    rr = float(_dot(r, r))
    X = torch.zeros(P, S, dtype=dtype, device=device)
    Pd = r.expand(P, S).clone()  # per-shift directions, p_0 = zeta_0 r_0 = b
    zeta = torch.ones(S, dtype=torch.float64)
    zeta_prev = torch.ones(S, dtype=torch.float64)
    alpha_prev, beta_prev = 1.0, 0.0
    rnorm = torch.full((S,), bnorm, dtype=torch.float64)  # recurrence residual per shift
    broken = torch.zeros(S, dtype=torch.bool)
    active = rnorm > tol
    its = torch.zeros(S, dtype=torch.long)
    history = [[1.0] for _ in range(S)]
    on_residual = getattr(callback, "on_residual", None)
    products = 0
    it = 0
    while it < maxiter and bool(active.any()):
        Q = apply_A(p)
        products += 1
        if seed:
            Q = Q + seed * p
        pq = float(_dot(p, Q))
        if not (math.isfinite(pq) and math.isfinite(rr)):
            broken |= active
            break
        if not pq > 0:
            raise ValueError(
                "cg: p^T A p <= 0: the operator is not positive definite "
                "(check the curvatures and the damping)"
            )
        alpha = rr / pq
        r_new = r - alpha * Q
        rr_new = float(_dot(r_new, r_new))
        if not (math.isfinite(alpha) and math.isfinite(rr_new)):
            broken |= active
            break
        beta = rr_new / rr if rr > 0 else 0.0
        # zeta_{k+1} = zeta_k zeta_{k-1} a_{k-1} /
        #              (a_k b_{k-1} (zeta_{k-1} - zeta_k) + zeta_{k-1} a_{k-1} (1 + delta a_k))
        denom = alpha * beta_prev * (zeta_prev - zeta) + zeta_prev * alpha_prev * (
            1.0 + delta * alpha
        )
        zeta_new = zeta * zeta_prev * alpha_prev / torch.where(denom != 0, denom, 1.0)
        ratio = zeta_new / torch.where(zeta != 0, zeta, 1.0)
        ok = (denom != 0) & torch.isfinite(zeta_new) & torch.isfinite(ratio)
        step = active & ok
        alpha_s = torch.where(step, alpha * ratio, 0.0)
        beta_s = torch.where(step, ratio * ratio * beta, 0.0)
        zeta_s = torch.where(step, zeta_new, 0.0)
        # X and Pd are finite (every update below is); X + alpha Pd can then only turn
        # non-finite by overflow, which a bound on its columns rules out: then update in place
        # (no [P, S] temporaries: at 22.7M parameters they cost more than a GGN product).
        # Columns that do not step have alpha = beta = zeta = 0: X keeps its value, and their
        # Pd (zeroed) is never read again, since a column that stops never steps again.
        bound = torch.linalg.vector_norm(X, ord=math.inf, dim=0).double().cpu() + alpha_s.abs() * (
            torch.linalg.vector_norm(Pd, ord=math.inf, dim=0).double().cpu()
        )
        if bool((bound[step] < 0.5 * torch.finfo(dtype).max).all()):
            X.addcmul_(Pd, on_device(alpha_s))
            Pd.mul_(on_device(beta_s)).addcmul_(r_new, on_device(zeta_s))
        else:  # a column may overflow: update out of place and keep its last finite iterate
            X_new = X + on_device(alpha_s) * Pd
            step &= torch.isfinite(X_new).all(0).cpu()
            keep = step.to(device).unsqueeze(0)
            X = torch.where(keep, X_new, X)
            Pd = torch.where(
                keep,
                on_device(torch.where(step, zeta_new, 0.0)) * r_new + on_device(beta_s) * Pd,
                Pd,
            )
        broken |= active & ~step
        zeta_prev = torch.where(step, zeta, zeta_prev)
        zeta = torch.where(step, zeta_new, zeta)
        rnorm = torch.where(step, zeta_new.abs() * math.sqrt(rr_new), rnorm)
        its += step.long()
        for j in step.nonzero().flatten().tolist():
            history[j].append(float(rnorm[j]) / bnorm)
        active = step & (rnorm > tol)
        r, rr = r_new, rr_new
        p = r_new + beta * p
        alpha_prev, beta_prev = alpha, beta
        it += 1
        if on_residual is not None:  # the hardest shift's (recurrence) relative residual
            on_residual(float(rnorm.max()) / bnorm)
        if callback is not None:
            callback(X)
    # The true residuals of every shift: one [P, S] block, S products (one per column).
    R = b.unsqueeze(1) - apply_A(X) - on_device(sig) * X
    products += S
    true = _norm(R).cpu()
    results = ShiftedCGResults(products=products, iterations=it)
    for j in range(S):
        t = float(true[j])
        history[j][-1] = t / bnorm
        if bool(broken[j]):
            info = -1
        else:
            info = 0 if t <= tol else max(int(its[j]), 1)  # NaN is never <= tol
        results.append(CGResult(X[:, j].clone(), info, int(its[j]), int(its[j]) + 1, history[j], 1))
    return results
