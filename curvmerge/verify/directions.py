"""How much of a task's parameter change lies in directions a Fisher barely sees.

For a task vector :math:`\\Delta = \\theta_t - \\theta_0` and a PSD curvature :math:`F`
(the task's own Fisher, or the merge's :math:`\\sum_s w_s F_s`) with eigenpairs
:math:`(\\lambda_i, v_i)`:

- *Rayleigh quotient* :math:`q = \\Delta^\\top F \\Delta / \\|\\Delta\\|^2`, reported relative
  to :math:`\\lambda_\\max` (:math:`\\in [0, 1]`) and relative to :math:`\\operatorname{tr}(F)/P`,
  the expected quotient of a uniformly random direction (*alignment*: above 1 means
  :math:`\\Delta` leans into high-curvature directions, below 1 into flat ones). One product.
- *Unseen fraction* at a threshold :math:`\\tau`:

  .. math::

      u_\\tau = \\frac{\\sum_{i:\\,\\lambda_i < \\tau} (v_i^\\top \\Delta)^2}{\\|\\Delta\\|^2}
          = 1 - \\frac{\\sum_{i:\\,\\lambda_i \\ge \\tau} (v_i^\\top\\Delta)^2}{\\|\\Delta\\|^2},

  the share of :math:`\\|\\Delta\\|^2` the curvature barely sees. The natural threshold for a
  merge is its damping :math:`\\lambda`: along eigendirections of :math:`\\sum_s w_s F_s`
  below :math:`\\lambda` the merge keeps mostly the prior :math:`\\theta_0`. Exact from a
  full eigendecomposition; from :math:`k` Lanczos pairs it is exact when
  :math:`\\lambda_k < \\tau` (every eigenvalue above :math:`\\tau` was found) and otherwise
  an upper bound (``unseen_is_bound``).
- *Prior share* at damping :math:`\\lambda` (:func:`prior_share`):

  .. math::

      \\rho_\\lambda(\\Delta) = \\frac{\\lambda\\,\\Delta^\\top (F + \\lambda I)^{-1} \\Delta}
          {\\|\\Delta\\|^2}
        = \\sum_i \\frac{(v_i^\\top\\Delta)^2}{\\|\\Delta\\|^2}\\,
          \\frac{\\lambda}{\\lambda_i + \\lambda} \\in [0, 1],

  a soft version of :math:`u_\\lambda` (weight 1 far below :math:`\\lambda`, 0 far above,
  1/2 at :math:`\\lambda`) that needs no eigenvectors, one CG solve instead. It is the
  part of :math:`\\Delta` the merge equation gives back to the prior: with one model,
  :math:`\\theta^* - \\theta_0 = (F + \\lambda I)^{-1} F \\Delta = \\Delta -
  \\lambda (F + \\lambda I)^{-1}\\Delta`.
- *Diagonal's view*: :math:`\\Delta^\\top D \\Delta / \\Delta^\\top F \\Delta` with
  :math:`D = \\operatorname{diag}(F)`: how far the diagonal approximation mis-states the
  curvature along :math:`\\Delta` (1 is right).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from curvmerge.operators.base import LinearOperator
from curvmerge.solve import solve_cg
from curvmerge.verify.spectrum import Spectrum

__all__ = ["DirectionShare", "direction_share", "prior_share"]


@dataclass
class DirectionShare:
    """Where a task vector lies relative to a curvature's spectrum (module docstring).

    Attributes:
        delta_norm: :math:`\\|\\Delta\\|`.
        rayleigh: :math:`q = \\Delta^\\top F\\Delta/\\|\\Delta\\|^2`.
        rayleigh_share: :math:`q / \\lambda_\\max`.
        alignment: :math:`q / (\\operatorname{tr}F / P)`.
        captured_topk: Share of :math:`\\|\\Delta\\|^2` in the span of the computed
            eigenvectors.
        num_eigenpairs: Number of eigenvectors used.
        threshold: :math:`\\tau`.
        unseen_fraction: :math:`u_\\tau`.
        unseen_is_bound: Whether ``unseen_fraction`` is an upper bound (Lanczos pairs did
            not reach below :math:`\\tau`).
        diagonal_ratio: :math:`\\Delta^\\top D\\Delta / \\Delta^\\top F\\Delta`, or ``None``.
        prior_share: :math:`\\rho_\\lambda(\\Delta)` at :math:`\\lambda` = ``threshold``
            (see :func:`prior_share`), or ``None``.
    """

    delta_norm: float
    rayleigh: float
    rayleigh_share: float
    alignment: float
    captured_topk: float
    num_eigenpairs: int
    threshold: float
    unseen_fraction: float
    unseen_is_bound: bool
    diagonal_ratio: float | None = None
    prior_share: float | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def direction_share(
    F: LinearOperator,
    delta: Tensor | Mapping[str, Tensor],
    spec: Spectrum,
    *,
    threshold: float | None = None,
    relative_threshold: float = 1e-3,
    diagonal: Tensor | None = None,
) -> DirectionShare:
    """Measure how much of ``delta`` lies in directions ``F`` barely sees.

    Args:
        F: The curvature (symmetric PSD).
        delta: The task vector, flat ``[P]`` or a parameter dict.
        spec: :func:`~curvmerge.verify.spectrum` of ``F`` with eigenvectors.
        threshold: :math:`\\tau` (default ``relative_threshold`` times
            :math:`\\lambda_\\max`).
        relative_threshold: See ``threshold``.
        diagonal: :math:`\\operatorname{diag}(F)` for the diagonal's view (optional).

    Example:
        >>> import torch
        >>> from curvmerge.space import ParamSpace
        >>> from curvmerge.operators import DiagonalOperator
        >>> from curvmerge.verify.spectrum import spectrum
        >>> F = DiagonalOperator(ParamSpace(("w",), ((2,),)),
        ...                      torch.tensor([1.0, 0.0], dtype=torch.float64))
        >>> d = direction_share(F, torch.tensor([1.0, 1.0]), spectrum(F), threshold=0.5)
        >>> d.unseen_fraction, d.rayleigh_share, d.alignment
        (0.5, 0.5, 1.0)
    """
    if isinstance(delta, Mapping):
        delta = F.space.flatten(delta)
    if spec.eigenvectors is None:
        raise ValueError("direction_share needs a spectrum computed with eigenvectors")
    x = delta.detach().double().cpu().reshape(-1)
    P = x.numel()
    nrm2 = float(x @ x)
    if nrm2 == 0:
        raise ValueError("the task vector is zero")
    Fx = (F @ x.to(device=F.device, dtype=F.dtype)).double().cpu()
    q = float(x @ Fx) / nrm2
    lam = spec.eigenvalues.double().cpu()
    V = spec.eigenvectors.double().cpu()
    lam_max = float(lam[0])
    tau = relative_threshold * lam_max if threshold is None else float(threshold)
    coef2 = (V.T @ x) ** 2 / nrm2
    captured = float(coef2.sum())
    seen = float(coef2[lam >= tau].sum())
    complete = spec.method == "dense" or float(lam[-1]) < tau
    unseen = max(0.0, 1.0 - seen)
    mean_eig = spec.trace.value / P
    diag_ratio = None
    if diagonal is not None:
        xFx = float(x @ Fx)
        d = diagonal.detach().double().cpu().reshape(-1)
        diag_ratio = float((d * x * x).sum()) / xFx if xFx > 0 else math.inf
    return DirectionShare(
        math.sqrt(nrm2),
        q,
        q / lam_max if lam_max > 0 else math.nan,
        q / mean_eig if mean_eig > 0 else math.nan,
        captured,
        int(lam.numel()),
        tau,
        unseen,
        not complete,
        diag_ratio,
    )


def prior_share(
    F: LinearOperator,
    deltas: Tensor,
    damping: float,
    *,
    rtol: float = 1e-8,
    maxiter: int | None = None,
) -> tuple[list[float], int]:
    """:math:`\\rho_\\lambda(\\Delta_k) = \\lambda \\Delta_k^\\top (F+\\lambda I)^{-1}
    \\Delta_k / \\|\\Delta_k\\|^2` for the columns of ``deltas`` (``[P]`` or ``[P, K]``),
    by one block CG solve (see the module docstring).

    Returns:
        ``(shares, products)``: one share per column and the CG iterations spent (each a
        product of :math:`F` with ``K`` columns).

    Example:
        >>> import torch
        >>> from curvmerge.space import ParamSpace
        >>> from curvmerge.operators import DiagonalOperator
        >>> F = DiagonalOperator(ParamSpace(("w",), ((2,),)),
        ...                      torch.tensor([1.0, 0.0], dtype=torch.float64))
        >>> shares, _ = prior_share(F, torch.tensor([1.0, 1.0], dtype=torch.float64), 1.0)
        >>> [round(s, 10) for s in shares]  # (1/2 * 1/(1+1) + 1/2 * 1) = 0.75
        [0.75]
    """
    from curvmerge.operators import IdentityOperator

    if not damping > 0:
        raise ValueError(f"damping must be positive, got {damping}")
    X = deltas.reshape(deltas.shape[0], -1).to(device=F.device, dtype=F.dtype)
    A = F + IdentityOperator(F.space, damping, dtype=F.dtype, device=F.device)
    res = solve_cg(A, X, rtol=rtol, maxiter=maxiter)
    num = damping * (X * res.x).sum(0).double()
    den = (X * X).sum(0).double()
    return [float(v) for v in (num / den).cpu()], res.iterations
