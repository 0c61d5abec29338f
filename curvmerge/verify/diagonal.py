"""Exact diagonals and comparisons of one diagonal against a reference.

The reference is the exact GGN diagonal: from the diagonal Fisher engine
(``curvmerge.fisher.diagonal_fisher(..., kind="exact")``), from an operator's own
``diagonal()``, or by probing unit vectors (:func:`exact_diagonal`, :math:`P` products, small
spaces only). The compared diagonal can be an estimate (:class:`DiagonalEstimate`, with
error bars), the MC or empirical Fisher diagonal, or any tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from curvmerge.operators.base import DENSE_LIMIT, LinearOperator, probe_diagonal
from curvmerge.space import ParamSpace
from curvmerge.verify.estimators import Z_SCORE, DiagonalEstimate

__all__ = ["exact_diagonal", "compare_diagonals", "DiagonalComparison", "mc_diagonal"]


def exact_diagonal(A: LinearOperator, *, max_size: int = DENSE_LIMIT, block: int = 256) -> Tensor:
    """The exact diagonal of ``A`` (float64).

    Structured operators (diagonal, dense) return theirs; any other operator is probed
    with unit vectors in blocks, :math:`d_j = e_j^\\top A e_j`, which costs :math:`P`
    products and is refused above ``max_size``.

    Example:
        >>> from curvmerge.operators import DenseOperator
        >>> M = torch.arange(9.0, dtype=torch.float64).reshape(3, 3)
        >>> A = DenseOperator(ParamSpace(("w",), ((3,),)), M) * 2.0  # a lazy operator
        >>> exact_diagonal(A).tolist()
        [0.0, 8.0, 16.0]
    """
    from curvmerge.operators import DenseOperator, DiagonalOperator

    if isinstance(A, (DiagonalOperator, DenseOperator)):
        return A.diagonal().to(torch.float64)
    P = A.shape[0]
    if P > max_size:
        raise MemoryError(
            f"exact_diagonal would probe P={P} unit vectors (> max_size={max_size}); "
            "use the diagonal Fisher engine or curvmerge.verify.estimate_diagonal"
        )
    return probe_diagonal(A, block).to(torch.float64)


@dataclass
class DiagonalComparison:
    """How a diagonal :math:`\\hat d` compares with a reference :math:`d`.

    Attributes:
        name: Label of :math:`\\hat d` (``"hutchinson"``, ``"mc"``, ``"empirical"``...).
        relative_error: :math:`\\|\\hat d - d\\|_2 / \\|d\\|_2`.
        cosine: :math:`\\hat d^\\top d / (\\|\\hat d\\|\\|d\\|)`.
        log_correlation: Pearson correlation of :math:`\\log \\hat d_j` and
            :math:`\\log d_j` over entries where both are positive.
        median_ratio: Median of :math:`\\hat d_j / d_j` over entries with
            :math:`d_j > 10^{-12} \\max d`.
        per_layer: Relative error per parameter (layer block) of the space.
        error_bar: For estimates: ``z`` times the estimated RMS of
            :math:`\\|\\hat d - d\\|_2`, relative to :math:`\\|d\\|_2`; else ``None``.
        within_error_bar: For estimates: whether the relative error is within
            ``error_bar``; else ``None``.
        entry_coverage: For estimates: fraction of entries with
            :math:`|\\hat d_j - d_j| \\le z\\,\\text{se}_j`; else ``None``.
        num_products: Products the estimate spent (0 if unknown).
        z: Standard errors per error bar.
    """

    name: str
    relative_error: float
    cosine: float
    log_correlation: float
    median_ratio: float
    per_layer: dict[str, float] = field(default_factory=dict)
    error_bar: float | None = None
    within_error_bar: bool | None = None
    entry_coverage: float | None = None
    num_products: int = 0
    z: float = Z_SCORE

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _rel(a: Tensor, b: Tensor) -> float:
    nb = float(torch.linalg.vector_norm(b))
    return float(torch.linalg.vector_norm(a - b)) / nb if nb > 0 else math.inf


def compare_diagonals(
    estimate: Tensor | DiagonalEstimate | LinearOperator,
    reference: Tensor | LinearOperator,
    space: ParamSpace | None = None,
    *,
    name: str = "estimate",
    z: float = Z_SCORE,
) -> DiagonalComparison:
    """Compare a diagonal with a reference diagonal, globally and per parameter block.

    Args:
        estimate: A flat diagonal, a :class:`DiagonalEstimate` (its error bars are checked
            against the reference) or an operator (its ``diagonal()``).
        reference: The reference diagonal (or an operator whose ``diagonal()`` it is).
        space: The parameter space for the per-layer split (default: the operator's, or
            one block ``"all"``).
        name: Label of the estimate.
        z: Standard errors per error bar.

    Example:
        >>> d = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
        >>> c = compare_diagonals(2 * d, d)
        >>> c.relative_error, round(c.cosine, 12), c.median_ratio
        (1.0, 1.0, 2.0)
    """
    se = None
    products = 0
    if isinstance(estimate, DiagonalEstimate):
        se, products = estimate.stderr.double().cpu(), estimate.num_products
        est = estimate.value
    elif isinstance(estimate, LinearOperator):
        space = space or estimate.space
        est = estimate.diagonal()
    else:
        est = estimate
    if isinstance(reference, LinearOperator):
        space = space or reference.space
        reference = reference.diagonal()
    est = est.detach().double().cpu().reshape(-1)
    ref = reference.detach().double().cpu().reshape(-1)
    if est.shape != ref.shape:
        raise ValueError(f"diagonals differ in size: {est.numel()} vs {ref.numel()}")
    if space is None:
        space = ParamSpace(("all",), ((ref.numel(),),))
    nrm = float(torch.linalg.vector_norm(est) * torch.linalg.vector_norm(ref))
    cosine = float(est @ ref) / nrm if nrm > 0 else math.nan
    pos = (est > 0) & (ref > 0)
    if int(pos.sum()) > 2:
        logs = torch.stack([est[pos].log(), ref[pos].log()])
        log_corr = float(torch.corrcoef(logs)[0, 1])
    else:
        log_corr = math.nan
    big = ref > 1e-12 * float(ref.abs().max()) if ref.numel() else ref > 0
    median_ratio = float((est[big] / ref[big]).median()) if int(big.sum()) else math.nan
    per_layer = {n: _rel(est[sl], ref[sl]) for n, sl in space.slices().items()}
    rel = _rel(est, ref)
    out = DiagonalComparison(
        name, rel, cosine, log_corr, median_ratio, per_layer, num_products=products, z=z
    )
    if se is not None:
        ref_norm = float(torch.linalg.vector_norm(ref))
        out.error_bar = z * float(torch.linalg.vector_norm(se)) / ref_norm
        out.within_error_bar = rel <= out.error_bar
        out.entry_coverage = float(((est - ref).abs() <= z * se).double().mean())
    return out


def mc_diagonal(
    model,
    loss_fn,
    data,
    *,
    params=None,
    repeats: int = 8,
    mc_samples: int = 1,
    seed: int = 0,
) -> DiagonalEstimate:
    """The Monte-Carlo Fisher diagonal with per-entry error bars.

    Runs the diagonal Fisher engine (``kind="mc"``) ``repeats`` times with independent
    label seeds ``seed, seed + 1, ...``; the estimate is their mean (an MC Fisher with
    ``repeats * mc_samples`` samples per example, unbiased for the exact diagonal) and the
    standard error is their sample standard deviation over :math:`\\sqrt{\\text{repeats}}`.

    Returns:
        A :class:`DiagonalEstimate` (``num_products`` counts engine passes).
    """
    from curvmerge.fisher import diagonal_fisher

    if repeats < 2:
        raise ValueError(f"repeats must be at least 2 for an error bar, got {repeats}")
    data = list(data)
    runs = torch.stack(
        [
            diagonal_fisher(
                model,
                loss_fn,
                data,
                params=params,
                kind="mc",
                mc_samples=mc_samples,
                seed=seed + r,
                progress=False,
            )
            .diagonal()
            .detach()
            .double()
            for r in range(repeats)
        ]
    )
    se = runs.std(0, correction=1) / math.sqrt(repeats)
    return DiagonalEstimate(runs.mean(0), se, repeats, f"mc ({repeats}x{mc_samples} samples)")
