"""Top eigenvalues, trace and effective rank of a curvature operator.

Top eigenpairs come from Lanczos (ARPACK's implicitly restarted Lanczos through
:func:`scipy.sparse.linalg.eigsh` on :meth:`~curvmerge.LinearOperator.to_scipy`), or from
:func:`torch.linalg.eigh` on the dense matrix for small spaces.

Two effective ranks are reported:

- the *intrinsic dimension* (Tropp 2015, *An introduction to matrix concentration
  inequalities*, §7.1) :math:`r_\\text{int} = \\operatorname{tr}(F) / \\lambda_\\max`,
  available matrix-free (trace by Hutch++ with an error bar, :math:`\\lambda_\\max` by
  Lanczos), and
- the *entropy effective rank* (Roy & Vetterli 2007)
  :math:`r_\\text{ent} = \\exp(-\\sum_i p_i \\log p_i)`, :math:`p_i = \\lambda_i / \\sum_j
  \\lambda_j`, which needs the whole spectrum (exact only).

Both lie in :math:`[1, \\operatorname{rank} F]`; :math:`r_\\text{int} \\ge r_\\text{ent}`
does not hold in general, but both equal :math:`k` for :math:`k` equal eigenvalues.
For a damped merge the relevant count is MacKay's (1992) effective number of parameters
:math:`\\sum_i \\lambda_i / (\\lambda_i + \\lambda)`, also reported when exact.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from curvmerge.operators.base import DENSE_LIMIT, LinearOperator
from curvmerge.verify.estimators import Estimate, estimate_trace

__all__ = ["Spectrum", "top_eigenpairs", "spectrum", "effective_ranks"]


@dataclass
class Spectrum:
    """Spectral summary of a symmetric PSD operator.

    Attributes:
        eigenvalues: The computed eigenvalues, descending (``[k]``, float64; all
            :math:`P` when ``method == "dense"``).
        eigenvectors: ``[P, k]`` matching eigenvectors (float64), or ``None``.
        method: ``"dense"`` or ``"lanczos"``.
        trace: :math:`\\operatorname{tr}(F)`: exact, or estimated with an error bar.
        intrinsic_dimension: :math:`\\operatorname{tr}(F)/\\lambda_\\max`, as an
            :class:`~curvmerge.verify.Estimate` (its error bar comes from the trace's).
        entropy_rank: :math:`\\exp` of the spectral entropy (dense only, else ``None``).
        effective_parameters: :math:`\\sum_i \\lambda_i/(\\lambda_i+\\lambda)` at
            ``damping`` (dense only, else ``None``).
        damping: The :math:`\\lambda` of ``effective_parameters``.
        num_products: Products spent (Lanczos and trace).
        seconds: Wall-clock time.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor | None
    method: str
    trace: Estimate
    intrinsic_dimension: Estimate
    entropy_rank: float | None = None
    effective_parameters: float | None = None
    damping: float | None = None
    num_products: int = 0
    seconds: float = 0.0

    @property
    def lambda_max(self) -> float:
        return float(self.eigenvalues[0])

    def to_dict(self) -> dict:
        return {
            "eigenvalues": [float(v) for v in self.eigenvalues[:200]],
            "method": self.method,
            "trace": self.trace.to_dict(),
            "lambda_max": self.lambda_max,
            "intrinsic_dimension": self.intrinsic_dimension.to_dict(),
            "entropy_rank": self.entropy_rank,
            "effective_parameters": self.effective_parameters,
            "damping": self.damping,
            "num_products": self.num_products,
            "seconds": self.seconds,
        }


class _Counter:
    def __init__(self):
        self.n = 0


def top_eigenpairs(
    F: LinearOperator,
    k: int = 20,
    *,
    tol: float | None = None,
    seed: int = 0,
    ncv: int | None = None,
    return_eigenvectors: bool = True,
) -> tuple[Tensor, Tensor | None, int]:
    """The ``k`` largest eigenvalues (descending) of a symmetric operator by Lanczos.

    Args:
        F: A symmetric operator.
        k: Number of eigenpairs (``k < P``).
        tol: ARPACK's relative tolerance; default 0 (machine precision) for float64
            operators and :math:`10^{-6}` otherwise.
        seed: Seed of the start vector.
        ncv: Lanczos basis size (ARPACK default :math:`\\max(2k+1, 20)`).
        return_eigenvectors: Also return the ``[P, k]`` eigenvectors.

    Returns:
        ``(eigenvalues [k], eigenvectors [P, k] or None, products)``, float64.
    """
    from scipy.sparse.linalg import LinearOperator as ScipyOperator
    from scipy.sparse.linalg import eigsh

    P = F.shape[0]
    if not 0 < k < P:
        raise ValueError(f"k must be in [1, P-1] = [1, {P - 1}], got {k}")
    if tol is None:
        tol = 0.0 if F.dtype == torch.float64 else 1e-6
    base = F.to_scipy(dtype=np.float64)
    counter = _Counter()

    def matvec(x):
        counter.n += 1
        return base.matvec(x)

    def matmat(X):
        counter.n += X.shape[1]
        return base.matmat(X)

    op = ScipyOperator(shape=base.shape, dtype=np.float64, matvec=matvec, matmat=matmat)
    v0 = np.random.default_rng(seed).standard_normal(P)
    vals, vecs = eigsh(op, k=k, which="LA", v0=v0, tol=tol, ncv=ncv, return_eigenvectors=True)
    order = np.argsort(vals)[::-1]
    values = torch.from_numpy(np.ascontiguousarray(vals[order])).to(torch.float64)
    vectors = (
        torch.from_numpy(np.ascontiguousarray(vecs[:, order])).to(torch.float64)
        if return_eigenvectors
        else None
    )
    return values, vectors, counter.n


def effective_ranks(eigenvalues: Tensor, damping: float | None = None) -> dict[str, float]:
    """Effective ranks of a full PSD spectrum (see the module docstring).

    Example:
        >>> r = effective_ranks(torch.tensor([2.0, 2.0, 0.0]), damping=2.0)
        >>> r["intrinsic_dimension"], round(r["entropy_rank"], 6), r["effective_parameters"]
        (2.0, 2.0, 1.0)
    """
    lam = eigenvalues.double().clamp_min(0.0)
    total = float(lam.sum())
    out = {"trace": total, "lambda_max": float(lam.max())}
    out["intrinsic_dimension"] = total / out["lambda_max"] if out["lambda_max"] > 0 else 0.0
    p = lam / total if total > 0 else lam
    nz = p[p > 0]
    out["entropy_rank"] = float(torch.exp(-(nz * nz.log()).sum())) if nz.numel() else 0.0
    if damping is not None:
        out["effective_parameters"] = (
            float((lam / (lam + damping)).sum()) if damping > 0 else (float((lam > 0).sum()))
        )
    return out


def spectrum(
    F: LinearOperator,
    k: int = 20,
    *,
    exact: bool | None = None,
    damping: float | None = None,
    trace_products: int = 60,
    max_dense: int = 4096,
    seed: int = 0,
    return_eigenvectors: bool = True,
    diagonal: Tensor | None = None,
) -> Spectrum:
    """Top eigenvalues, trace and effective ranks of ``F``.

    Dense (``P <= max_dense`` or ``exact=True``): all eigenpairs by
    :func:`torch.linalg.eigh` in float64; everything is exact. Matrix-free: the ``k``
    largest eigenpairs by Lanczos, the trace exactly from ``diagonal`` when given (the
    diagonal Fisher engine's), else by Hutch++ with ``trace_products`` products.

    Example:
        >>> from curvmerge.space import ParamSpace
        >>> from curvmerge.operators import DiagonalOperator
        >>> d = torch.tensor([4.0, 1.0, 1.0], dtype=torch.float64)
        >>> D = DiagonalOperator(ParamSpace(("w",), ((3,),)), d)
        >>> s = spectrum(D, k=2, exact=False, diagonal=D.diagonal())
        >>> [round(v, 8) for v in s.eigenvalues.tolist()], s.intrinsic_dimension.value
        ([4.0, 1.0], 1.5)
    """
    start = time.perf_counter()
    P = F.shape[0]
    if exact is None:
        exact = P <= max_dense
    if exact:
        if P > DENSE_LIMIT:
            raise MemoryError(f"P={P} is too large for a dense eigendecomposition")
        M = F.to_dense().to(torch.float64).cpu()
        M = (M + M.T) / 2
        vals, vecs = torch.linalg.eigh(M)
        vals, vecs = vals.flip(0), vecs.flip(1)
        r = effective_ranks(vals, damping)
        trace = Estimate(float(M.diagonal().sum()), 0.0, P, "exact")
        return Spectrum(
            vals,
            vecs if return_eigenvectors else None,
            "dense",
            trace,
            Estimate(trace.value / float(vals[0]), 0.0, P, "exact"),
            r["entropy_rank"],
            r.get("effective_parameters"),
            damping,
            P,
            time.perf_counter() - start,
        )
    vals, vecs, products = top_eigenpairs(
        F, min(k, P - 1), seed=seed, return_eigenvectors=return_eigenvectors
    )
    if diagonal is not None:
        trace = Estimate(float(diagonal.double().sum()), 0.0, 0, "exact")
    else:
        trace = estimate_trace(F, trace_products, method="hutch++", seed=seed)
        products += trace.num_products
    lam_max = float(vals[0])
    ratio = Estimate(
        trace.value / lam_max if lam_max > 0 else math.nan,
        trace.stderr / lam_max if lam_max > 0 else math.nan,
        trace.num_products,
        trace.method,
        trace.dof,
    )
    return Spectrum(
        vals,
        vecs,
        "lanczos",
        trace,
        ratio,
        None,
        None,
        damping,
        products,
        time.perf_counter() - start,
    )
