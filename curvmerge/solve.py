"""Preconditioned conjugate gradients in torch, with scipy's signature and stopping rule."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from curvmerge.operators.base import LinearOperator

__all__ = ["cg", "CGResult", "solve_cg"]


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
    """Like :func:`cg` but returns a :class:`CGResult` with iteration counts and history."""
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
