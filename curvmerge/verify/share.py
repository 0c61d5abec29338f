"""How much of a curvature matrix lies off its diagonal, globally and per layer.

The *off-diagonal share* of a symmetric :math:`F` with diagonal part :math:`D` is

.. math::

    s = \\frac{\\|F - D\\|_F}{\\|F\\|_F} \\in [0, 1],

0 for a diagonal matrix and close to 1 when the diagonal holds almost none of the
Frobenius mass (:math:`\\|D\\|_F^2 = (1 - s^2)\\|F\\|_F^2`). *Per layer* means per parameter
block :math:`R` of the :class:`~curvmerge.ParamSpace`, over the block's rows (all columns,
so couplings to other layers count as off-diagonal):

.. math::

    s_R = \\frac{\\|(F - D)_{R,:}\\|_F}{\\|F_{R,:}\\|_F}.

Exact values need the dense matrix (:func:`exact_diagonal_share`, which also gives the
within-block share :math:`\\|(F-D)_{RR}\\|_F / \\|F_{RR}\\|_F` and the cross-layer share
:math:`\\|F - \\operatorname{blockdiag}(F)\\|_F / \\|F\\|_F`). Matrix-free,
:func:`estimate_diagonal_share` uses :math:`\\|F - D\\|_F^2 = \\|F\\|_F^2 - \\|D\\|_F^2`
with the exact diagonal :math:`d` (from the diagonal Fisher engine) and estimates only

.. math::

    \\|F_{R,:}\\|_F^2 = \\mathbb E\\|(F z)_R\\|^2, \\qquad z \\text{ Rademacher}

(Hutchinson 1989), by the mean :math:`\\bar t_R` of :math:`m` probes with standard error
:math:`\\text{se}(\\bar t_R)`. The diagonal fraction :math:`f_R = \\|d_R\\|^2 / \\bar t_R`
then has :math:`\\text{se}(f_R) = f_R\\,\\text{se}(\\bar t_R) / \\bar t_R` and
:math:`s_R = \\sqrt{1 - f_R}` has :math:`\\text{se}(s_R) = \\text{se}(f_R) / (2 s_R)`
(delta method). Because only the total is random, a fraction :math:`f_R` of
:math:`10^{-3}` is resolved to a relative accuracy of that of :math:`\\bar t_R`, far better
than estimating :math:`\\|F-D\\|_F^2` by probes as well (which was tried: its noise is
about the size of :math:`\\|D\\|_F^2` on a nearly low-rank Fisher).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from curvmerge.operators.base import DENSE_LIMIT, LinearOperator
from curvmerge.space import ParamSpace
from curvmerge.verify.estimators import (
    Z_SCORE,
    apply_block,
    as_generator,
    block_sizes,
    rademacher,
    t_quantile,
)

__all__ = ["DiagonalShare", "exact_diagonal_share", "estimate_diagonal_share", "diagonal_share"]


@dataclass
class DiagonalShare:
    """Off-diagonal share :math:`\\|F-D\\|_F/\\|F\\|_F`, globally and per parameter block.

    Attributes:
        share: The global share :math:`s`.
        stderr: Its standard error (0 when exact).
        per_layer: :math:`s_R` per parameter (rows of the block).
        per_layer_stderr: Standard errors of ``per_layer``.
        frobenius_norm: :math:`\\|F\\|_F` (estimated matrix-free).
        method: ``"exact"`` or ``"hutchinson"``.
        num_products: Products spent.
        num_probes: Probes used (``dof`` is ``num_probes - 1``).
        per_layer_fraction: :math:`f_R = \\|D_R\\|_F^2 / \\|F_{R,:}\\|_F^2 = 1 - s_R^2`.
        per_layer_fraction_stderr: Standard errors of ``per_layer_fraction``.
        within_layer: Exact only: :math:`\\|(F-D)_{RR}\\|_F/\\|F_{RR}\\|_F` per block.
        cross_layer_share: Exact only: :math:`\\|F-\\operatorname{blockdiag}F\\|_F/\\|F\\|_F`.
    """

    share: float
    stderr: float = 0.0
    per_layer: dict[str, float] = field(default_factory=dict)
    per_layer_stderr: dict[str, float] = field(default_factory=dict)
    frobenius_norm: float = math.nan
    method: str = "exact"
    num_products: int = 0
    num_probes: int = 0
    within_layer: dict[str, float] | None = None
    cross_layer_share: float | None = None
    per_layer_fraction: dict[str, float] = field(default_factory=dict)
    per_layer_fraction_stderr: dict[str, float] = field(default_factory=dict)

    @property
    def diagonal_fraction(self) -> float:
        """:math:`\\|D\\|_F^2 / \\|F\\|_F^2 = 1 - s^2`."""
        return 1.0 - self.share**2

    def error_bar(self, z: float = Z_SCORE) -> float:
        """Half-width of the error bar on ``share`` (Student-t, ``num_probes - 1`` dof)."""
        return t_quantile(z, self.num_probes - 1 if self.num_probes else None) * self.stderr

    def layer_error_bar(self, name: str, z: float = Z_SCORE) -> float:
        """Half-width of the error bar on ``per_layer[name]``."""
        dof = self.num_probes - 1 if self.num_probes else None
        return t_quantile(z, dof) * self.per_layer_stderr.get(name, 0.0)

    def fraction_error_bar(self, name: str, z: float = Z_SCORE) -> float:
        """Half-width of the error bar on ``per_layer_fraction[name]``."""
        dof = self.num_probes - 1 if self.num_probes else None
        return t_quantile(z, dof) * self.per_layer_fraction_stderr.get(name, 0.0)

    def to_dict(self) -> dict:
        out = dict(self.__dict__)
        out["diagonal_fraction"] = self.diagonal_fraction
        return out


def exact_diagonal_share(F: LinearOperator | Tensor, space: ParamSpace | None = None):
    """The exact off-diagonal shares from the dense matrix (small spaces).

    Example:
        >>> from curvmerge.operators import DenseOperator
        >>> M = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
        >>> s = exact_diagonal_share(DenseOperator(ParamSpace(("w",), ((2,),)), M))
        >>> round(s.share ** 2, 12)  # half the Frobenius mass is off the diagonal
        0.5
    """
    if isinstance(F, LinearOperator):
        space = space or F.space
        M = F.to_dense().to(torch.float64)
    else:
        M = F.to(torch.float64)
    if space is None:
        space = ParamSpace(("all",), ((M.shape[0],),))
    d = M.diagonal()
    off = M - torch.diag(d)
    total = float(torch.linalg.matrix_norm(M))
    per, within = {}, {}
    block_sq = 0.0
    for name, sl in space.slices().items():
        rows = float(torch.linalg.matrix_norm(M[sl]))
        per[name] = float(torch.linalg.matrix_norm(off[sl])) / rows if rows > 0 else math.nan
        blk = float(torch.linalg.matrix_norm(M[sl, sl]))
        block_sq += blk**2
        within[name] = float(torch.linalg.matrix_norm(off[sl, sl])) / blk if blk > 0 else math.nan
    share = float(torch.linalg.matrix_norm(off)) / total if total > 0 else math.nan
    cross = math.sqrt(max(total**2 - block_sq, 0.0)) / total if total > 0 else math.nan
    return DiagonalShare(
        share,
        0.0,
        per,
        {n: 0.0 for n in per},
        total,
        "exact",
        M.shape[0] if isinstance(F, LinearOperator) else 0,
        0,
        within,
        cross,
        {n: 1.0 - v * v for n, v in per.items()},
        {n: 0.0 for n in per},
    )


def _from_total(diag_sq: float, t: Tensor) -> tuple[float, float, float, float]:
    """Share, its stderr, diagonal fraction and its stderr from exact ``||d_R||^2`` and the
    probe samples ``t`` of ``||F_{R,:}||^2``."""
    m = t.numel()
    tbar = float(t.mean())
    if tbar <= 0:
        return math.nan, math.nan, math.nan, math.nan
    se_t = float(t.std(correction=1)) / math.sqrt(m)
    f = diag_sq / tbar
    se_f = f * se_t / tbar
    s = math.sqrt(max(1.0 - f, 0.0))
    se_s = se_f / (2 * s) if s > 0 else math.sqrt(se_f)
    return s, se_s, f, se_f


def estimate_diagonal_share(
    F: LinearOperator,
    diagonal: Tensor | None = None,
    num_products: int = 60,
    *,
    seed: int | torch.Generator = 0,
    block_size: int = 32,
) -> DiagonalShare:
    """Estimate the off-diagonal shares matrix-free (see the module docstring).

    Args:
        F: A symmetric operator.
        diagonal: Its exact diagonal (default: ``F.diagonal()``, which structured
            operators provide; pass the diagonal Fisher engine's result for the GGN). It
            is taken as exact: an estimated diagonal biases the share.
        num_products: Rademacher probes :math:`m` (one product each).
        seed: Seed of the probes.
        block_size: Probes per product.
    """
    if diagonal is None:
        diagonal = F.diagonal()
    g = as_generator(seed)
    d = diagonal.detach().to(device=F.device, dtype=torch.float64).reshape(-1)
    slices = list(F.space.slices().items())
    t_blocks = []
    for b in block_sizes(num_products, block_size):
        Z = rademacher(F.shape[0], b, g, device=F.device)
        FZ = apply_block(F, Z)
        t_blocks.append(torch.stack([(FZ[sl] ** 2).sum(0) for _, sl in slices]))
    T = torch.cat(t_blocks, 1).cpu()  # [layers, m]
    d2 = [float((d[sl] ** 2).sum()) for _, sl in slices]
    share, se, _, _ = _from_total(sum(d2), T.sum(0))
    per, per_se, frac, frac_se = {}, {}, {}, {}
    for i, (name, _) in enumerate(slices):
        per[name], per_se[name], frac[name], frac_se[name] = _from_total(d2[i], T[i])
    fro = math.sqrt(max(float(T.sum(0).mean()), 0.0))
    return DiagonalShare(
        share,
        se,
        per,
        per_se,
        fro,
        "hutchinson",
        num_products,
        num_products,
        per_layer_fraction=frac,
        per_layer_fraction_stderr=frac_se,
    )


def diagonal_share(
    F: LinearOperator,
    diagonal: Tensor | None = None,
    *,
    exact: bool | None = None,
    num_products: int = 60,
    seed: int = 0,
    max_dense: int = 4096,
) -> DiagonalShare:
    """Exact share when ``P <= max_dense`` (or ``exact=True``), else estimated."""
    if exact is None:
        exact = F.shape[0] <= max_dense
    if exact:
        if F.shape[0] > DENSE_LIMIT:
            raise MemoryError(f"P={F.shape[0]} is too large for the exact share")
        return exact_diagonal_share(F)
    return estimate_diagonal_share(F, diagonal, num_products, seed=seed)
