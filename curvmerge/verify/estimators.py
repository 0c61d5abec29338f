"""Stochastic diagonal and trace estimators, each with a standard error.

Every estimator sees the operator only through products :math:`A Z` with blocks of probe
vectors, so it works on any operator of the protocol (dense, diagonal, the matrix-free GGN)
and counts the products it spends.

Estimators of the diagonal :math:`d = \\operatorname{diag}(A)` of a symmetric :math:`A`:

- ``"hutchinson"`` (Hutchinson 1989 for the trace; Bekas, Kokiopoulou & Saad 2007 for the
  diagonal): :math:`\\hat d = \\frac1m \\sum_i z_i \\odot A z_i` with Rademacher
  :math:`z_i`; entry :math:`j` has variance :math:`\\frac1m\\sum_{k\\ne j} A_{jk}^2`.
- ``"diag++"`` (the diagonal analogue of Hutch++, Meyer, Musco, Musco & Woodruff 2021;
  Baston & Nakatsukasa 2022): sketch :math:`Q = \\operatorname{orth}(A S)`, compute
  :math:`\\operatorname{diag}(Q Q^\\top A)` exactly and apply Hutchinson to the deflated
  remainder :math:`(I - QQ^\\top) A`.
- ``"xdiag"`` (Epperly, Tropp & Webber 2024, *XTrace: making the most of every sample in
  stochastic trace estimation*): every probe serves both as a sketch column and as a
  Hutchinson probe for the matrix deflated by the *other* probes' sketch; the :math:`k`
  leave-one-out estimates are averaged. Derivation used here: with
  :math:`Y = A\\Omega = QR`, the basis of :math:`Y` without column :math:`i` spans
  :math:`Q (I - s_i s_i^\\top)` with :math:`s_i = R^{-\\top} e_i / \\|R^{-\\top} e_i\\|`, and
  :math:`Q^\\top A\\omega_i = R e_i`, so the :math:`i`-th estimate is

  .. math::

      \\hat d_i = \\operatorname{diag}(Q Z^\\top) - (Q s_i) \\odot (Z s_i)
                  + \\omega_i \\odot (Q s_i) / \\|R^{-\\top} e_i\\|, \\qquad Z = A Q.

Standard errors are sample standard deviations of the per-probe terms divided by
:math:`\\sqrt{m}` (for Diag++ and Hutch++ conditional on the sketch, where the remainder
estimate is a plain Hutchinson estimate). For XDiag the :math:`\\hat d_i` are exchangeable
but not independent; Epperly et al. use their spread the same way as an error estimate,
and :mod:`tests.test_verify_estimators` checks its coverage empirically.

Error bars are ``Z_SCORE`` standard errors (3, see :data:`Z_SCORE`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from curvmerge.operators.base import LinearOperator, rademacher

__all__ = [
    "Z_SCORE",
    "Estimate",
    "DiagonalEstimate",
    "rademacher",
    "estimate_diagonal",
    "estimate_trace",
    "estimate_frobenius_norm",
    "DIAGONAL_METHODS",
    "TRACE_METHODS",
]

#: Number of standard errors in an error bar. With 20 seeds and at most one miss allowed,
#: z = 2 (nominal miss rate 4.6 %) would fail about one time in four
#: (P[>= 2 misses of 20] = 0.23); z = 3 (nominal 0.27 %) leaves room for non-normal
#: per-probe terms and for standard errors estimated from a few dozen probes.
Z_SCORE = 3.0

DIAGONAL_METHODS = ("hutchinson", "diag++", "xdiag")
TRACE_METHODS = ("hutchinson", "hutch++")


@dataclass
class Estimate:
    """A scalar estimate with its standard error.

    Attributes:
        value: The estimate.
        stderr: Its standard error (0 for exact values).
        num_products: Operator-vector products spent.
        method: How it was computed (``"exact"``, ``"hutchinson"``, ...).
        dof: Degrees of freedom of the sample standard deviation behind ``stderr``
            (``None``: use the normal quantile). With ``dof`` the error bar uses the
            Student-t quantile at the two-sided level of ``z`` normal standard errors,
            which matters for the few probes left after a Hutch++ sketch.
    """

    value: float
    stderr: float = 0.0
    num_products: int = 0
    method: str = "exact"
    dof: int | None = None

    def error_bar(self, z: float = Z_SCORE) -> float:
        """Half-width of the error bar: :math:`z \\cdot \\text{stderr}`, or the Student-t
        quantile of the same confidence level times ``stderr`` when ``dof`` is known."""
        return t_quantile(z, self.dof) * self.stderr

    def covers(self, truth: float, z: float = Z_SCORE) -> bool:
        """Whether ``truth`` lies within the error bar."""
        return abs(self.value - truth) <= self.error_bar(z)

    def to_dict(self) -> dict:
        return {
            "value": float(self.value),
            "stderr": float(self.stderr),
            "error_bar": float(self.error_bar()),
            "num_products": int(self.num_products),
            "method": self.method,
        }


def t_quantile(z: float, dof: int | None) -> float:
    """The Student-t quantile with ``dof`` degrees of freedom at the two-sided confidence
    level of ``z`` normal standard errors (``z`` itself when ``dof`` is ``None``)."""
    if dof is None or dof <= 0 or z <= 0:
        return z
    from scipy import stats

    return float(stats.t.isf(stats.norm.sf(z), dof))


def _roundoff(A: LinearOperator, P: int) -> float:
    """Relative size of rounding errors in sums of ``P`` products with ``A``: standard
    errors are floored at this times the value, so exact-in-exact-arithmetic estimates
    (a sketch that captures the whole range) still cover the truth."""
    return 10.0 * math.sqrt(max(P, 1)) * torch.finfo(A.dtype).eps


@dataclass
class DiagonalEstimate:
    """An estimate of :math:`\\operatorname{diag}(A)` with per-entry standard errors.

    Attributes:
        value: The estimated diagonal ``[P]``.
        stderr: Per-entry standard errors ``[P]`` (zeros for exact diagonals).
        num_products: Operator-vector products spent.
        method: How it was computed.
    """

    value: Tensor
    stderr: Tensor
    num_products: int = 0
    method: str = "exact"

    @property
    def norm_stderr(self) -> float:
        """:math:`\\sqrt{\\sum_j \\text{se}_j^2}`, an estimate of the root-mean-square of
        :math:`\\|\\hat d - d\\|_2` (the per-entry errors are uncorrelated)."""
        return float(torch.linalg.vector_norm(self.stderr.double()))

    def error_bar(self, z: float = Z_SCORE) -> float:
        """Error bar on :math:`\\|\\hat d - d\\|_2`: ``z * norm_stderr``."""
        return z * self.norm_stderr

    def covers(self, truth: Tensor, z: float = Z_SCORE) -> bool:
        """Whether :math:`\\|\\hat d - d\\|_2 \\le z \\cdot` :attr:`norm_stderr`."""
        err = torch.linalg.vector_norm((self.value - truth.to(self.value)).double())
        return float(err) <= self.error_bar(z)

    def trace(self) -> Estimate:
        """The trace as the sum of the diagonal (its stderr ignores correlations; prefer
        :func:`estimate_trace`)."""
        return Estimate(float(self.value.sum()), self.norm_stderr, self.num_products, self.method)

    def to_dict(self) -> dict:
        return {
            "norm": float(torch.linalg.vector_norm(self.value.double())),
            "norm_stderr": self.norm_stderr,
            "num_products": int(self.num_products),
            "method": self.method,
        }


# ---------------------------------------------------------------------------- probes
def as_generator(seed: int | torch.Generator) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    return torch.Generator().manual_seed(int(seed))


def block_sizes(m: int, block: int) -> Iterator[int]:
    done = 0
    while done < m:
        b = min(block, m - done)
        yield b
        done += b


def apply_block(A: LinearOperator, X: Tensor) -> Tensor:
    """``A @ X`` computed in ``A``'s dtype, returned in float64 on ``X``'s device."""
    return (A @ X.to(device=A.device, dtype=A.dtype)).to(device=X.device, dtype=torch.float64)


def _check(A: LinearOperator, num_probes: int, minimum: int, method: str) -> None:
    if not isinstance(A, LinearOperator):
        raise TypeError(f"expected a curvmerge LinearOperator, got {type(A).__name__}")
    if num_probes < minimum:
        raise ValueError(f"{method} needs at least {minimum} products, got {num_probes}")


def _mean_and_stderr(total: Tensor, total_sq: Tensor, m: int) -> tuple[Tensor, Tensor]:
    mean = total / m
    var = (total_sq - m * mean**2).clamp_min(0.0) / (m - 1)
    return mean, (var / m).sqrt()


# ---------------------------------------------------------------------------- diagonal
def estimate_diagonal(
    A: LinearOperator,
    num_products: int = 60,
    *,
    method: str = "hutchinson",
    seed: int | torch.Generator = 0,
    block_size: int = 32,
) -> DiagonalEstimate:
    """Estimate :math:`\\operatorname{diag}(A)` of a symmetric operator from products.

    Args:
        A: A symmetric (self-adjoint) operator.
        num_products: Budget of operator-vector products :math:`m`. Hutchinson uses
            :math:`m` probes; Diag++ uses :math:`\\lfloor m/3 \\rfloor` sketch columns (two
            products each) and the rest as probes; XDiag uses :math:`\\lfloor m/2
            \\rfloor` probes (two products each).
        method: One of :data:`DIAGONAL_METHODS`.
        seed: Seed (or generator) of the Rademacher probes.
        block_size: Probes multiplied at once.

    Returns:
        A :class:`DiagonalEstimate` (float64, on ``A``'s device).

    Example:
        >>> from curvmerge.space import ParamSpace
        >>> from curvmerge.operators import DenseOperator
        >>> M = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
        >>> A = DenseOperator(ParamSpace(("w",), ((2,),)), M, self_adjoint=True)
        >>> est = estimate_diagonal(A, 400, seed=0)
        >>> bool(est.covers(M.diagonal()))
        True
    """
    g = as_generator(seed)
    if method == "hutchinson":
        return _hutchinson_diagonal(A, num_products, g, block_size)
    if method in ("diag++", "diagpp", "hutch++"):
        return _diagpp(A, num_products, g, block_size)
    if method == "xdiag":
        return _xdiag(A, num_products, g)
    raise ValueError(f"unknown diagonal method {method!r}; choose one of {DIAGONAL_METHODS}")


def _hutchinson_diagonal(A, m, g, block_size, *, deflate: Tensor | None = None):
    """Hutchinson on :math:`A` or, with ``deflate=(Q, Z)``, on :math:`(I-QQ^\\top)A`."""
    _check(A, m, 2, "hutchinson")
    P = A.shape[0]
    total = torch.zeros(P, dtype=torch.float64, device=A.device)
    total_sq = torch.zeros_like(total)
    for b in block_sizes(m, block_size):
        Z = rademacher(P, b, g, device=A.device)
        AZ = apply_block(A, Z)
        if deflate is not None:
            Q, AQ = deflate
            AZ = AZ - Q @ (AQ.T @ Z)  # (I - QQ^T) A z, using Q^T A = (A Q)^T
        S = Z * AZ
        total += S.sum(1)
        total_sq += (S * S).sum(1)
    mean, se = _mean_and_stderr(total, total_sq, m)
    return DiagonalEstimate(mean, se, m, "hutchinson")


def _floor(A: LinearOperator, value: Tensor, se: Tensor) -> Tensor:
    """Floor per-entry standard errors at the rounding level (see :func:`_roundoff`)."""
    scale = value.abs() + value.abs().mean()
    return torch.maximum(se, _roundoff(A, A.shape[0]) * scale)


def _sketch(A: LinearOperator, s: int, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """``Omega``, ``Q = orth(A Omega)`` and ``R``."""
    P = A.shape[0]
    Omega = rademacher(P, s, g, device=A.device)
    Y = apply_block(A, Omega)
    Q, R = torch.linalg.qr(Y)
    return Omega, Q, R


def _diagpp(A, m, g, block_size):
    P = A.shape[0]
    s = min(m // 3, P)
    _check(A, m - 2 * s, 2, "diag++ (after the sketch)")
    _, Q, _ = _sketch(A, s, g)
    AQ = apply_block(A, Q)
    exact_part = (Q * AQ).sum(1)
    rest = _hutchinson_diagonal(A, m - 2 * s, g, block_size, deflate=(Q, AQ))
    value = exact_part + rest.value
    return DiagonalEstimate(value, _floor(A, value, rest.stderr), m, "diag++")


def _xdiag_terms(A, m, g):
    """The ``k`` leave-one-out estimates ``[P, k]`` of XDiag and the leave-one-out traces."""
    k = m // 2
    _check(A, 2 * k, 4, "xdiag")
    P = A.shape[0]
    k = min(k, P)
    Omega, Q, R = _sketch(A, k, g)
    Z = apply_block(A, Q)
    # columns s_i of S: R^{-T} e_i normalised; n_i = ||R^{-T} e_i||
    Rinv_T = torch.linalg.solve_triangular(
        R.T, torch.eye(k, dtype=R.dtype, device=R.device), upper=False
    )
    norms = torch.linalg.vector_norm(Rinv_T, dim=0)
    S = Rinv_T / norms
    QS, ZS = Q @ S, Z @ S
    base = (Q * Z).sum(1, keepdim=True)
    terms = base - QS * ZS + Omega * QS / norms
    return terms, 2 * k


def _xdiag(A, m, g):
    terms, used = _xdiag_terms(A, m, g)
    k = terms.shape[1]
    mean = terms.mean(1)
    se = terms.std(1, correction=1) / math.sqrt(k)
    return DiagonalEstimate(mean, _floor(A, mean, se), used, "xdiag")


# ---------------------------------------------------------------------------- trace
def estimate_trace(
    A: LinearOperator,
    num_products: int = 60,
    *,
    method: str = "hutch++",
    seed: int | torch.Generator = 0,
    block_size: int = 32,
) -> Estimate:
    """Estimate :math:`\\operatorname{tr}(A)` of a symmetric operator from products.

    ``"hutchinson"`` averages :math:`z^\\top A z` (Hutchinson 1989); ``"hutch++"``
    (Meyer et al. 2021) computes :math:`\\operatorname{tr}(Q^\\top A Q)` for a sketch
    :math:`Q = \\operatorname{orth}(AS)` with :math:`m/3` columns and applies Hutchinson
    to :math:`(I-QQ^\\top)A(I-QQ^\\top)`. Standard errors as in the module docstring; the
    error bar uses the Student-t quantile (``dof`` = probes − 1). Summing an XDiag
    diagonal also estimates the trace, but the spread of its leave-one-out terms
    underestimates the error (measured: about 0.6 of the true error), so it is not offered.

    Example:
        >>> from curvmerge.space import ParamSpace
        >>> from curvmerge.operators import DenseOperator
        >>> M = torch.diag(torch.tensor([3.0, 2.0, 0.0], dtype=torch.float64))
        >>> A = DenseOperator(ParamSpace(("w",), ((3,),)), M, self_adjoint=True)
        >>> round(estimate_trace(A, 8, method="hutch++").value, 8)  # the sketch sees rank 2
        5.0
    """
    g = as_generator(seed)
    if method == "hutchinson":
        return _hutchinson_trace(A, num_products, g, block_size, None)
    if method in ("hutch++", "hutchpp"):
        P = A.shape[0]
        s = min(num_products // 3, P)
        _, Q, _ = _sketch(A, s, g)
        AQ = apply_block(A, Q)
        exact = float((Q * AQ).sum())
        rest_m = num_products - 2 * s
        if s == P or rest_m < 2:
            if s < P:
                raise ValueError(f"hutch++ needs at least {2 * s + 2} products here")
            return Estimate(exact, _roundoff(A, P) * abs(exact), 2 * s, "hutch++")
        rest = _hutchinson_trace(A, rest_m, g, block_size, Q)
        value = exact + rest.value
        se = max(rest.stderr, _roundoff(A, P) * abs(value))
        return Estimate(value, se, num_products, "hutch++", dof=rest_m - 1)
    raise ValueError(f"unknown trace method {method!r}; choose one of {TRACE_METHODS}")


def _hutchinson_trace(A, m, g, block_size, Q):
    _check(A, m, 2, "hutchinson")
    P = A.shape[0]
    samples = []
    for b in block_sizes(m, block_size):
        Z = rademacher(P, b, g, device=A.device)
        if Q is not None:
            Z = Z - Q @ (Q.T @ Z)
        samples.append((Z * apply_block(A, Z)).sum(0))
    t = torch.cat(samples)
    value = float(t.mean())
    se = max(float(t.std(correction=1) / math.sqrt(m)), _roundoff(A, P) * abs(value))
    return Estimate(value, se, m, "hutchinson", dof=m - 1)


def estimate_frobenius_norm(
    A: LinearOperator,
    num_products: int = 60,
    *,
    seed: int | torch.Generator = 0,
    block_size: int = 32,
) -> Estimate:
    """Estimate :math:`\\|A\\|_F` from :math:`\\|A\\|_F^2 = \\mathbb E\\|Az\\|^2` for
    Rademacher :math:`z` (the standard error follows by the delta method,
    :math:`\\text{se}(\\sqrt{x}) = \\text{se}(x) / (2\\sqrt{x})`).

    Example:
        >>> from curvmerge.space import ParamSpace
        >>> from curvmerge.operators import DiagonalOperator
        >>> A = DiagonalOperator(ParamSpace(("w",), ((2,),)), torch.tensor([3.0, 4.0]))
        >>> estimate_frobenius_norm(A, 4).value  # exact for a diagonal: |Az| = |diag|
        5.0
    """
    _check(A, num_products, 2, "frobenius norm")
    g = as_generator(seed)
    P = A.shape[0]
    samples = []
    for b in block_sizes(num_products, block_size):
        Z = rademacher(P, b, g, device=A.device)
        samples.append((apply_block(A, Z) ** 2).sum(0))
    t = torch.cat(samples)
    sq, se_sq = float(t.mean()), float(t.std(correction=1) / math.sqrt(num_products))
    value = math.sqrt(max(sq, 0.0))
    se = se_sq / (2 * value) if value > 0 else 0.0
    se = max(se, _roundoff(A, P) * value)
    return Estimate(value, se, num_products, "hutchinson", dof=num_products - 1)
