"""Preconditioners for the merge equation's CG solve.

The Jacobi (diagonal) preconditioner rescales coordinates; the curvature of a network is
far from diagonal, and on the exact-Fisher merge of three MNIST CNNs it made CG slower
(195 products instead of plain CG's 63 at damping 1e-3; ``benchmarks/bench_ggn.py``,
``docs/benchmarks_ggn.md``). What slows CG on :math:`(\\mu I + A)` with a GGN :math:`A`
is a handful of large eigenvalues far above :math:`\\mu`; the randomized Nyström
preconditioner of Frangella, Tropp & Udell ("Randomized Nyström preconditioning", SIAM J.
Matrix Anal. Appl. 44(2), 2023) captures them from one block product :math:`A\\Omega` with a
``[P, ℓ]`` test matrix. On that CNN merge it paid off only at the smallest damping (rank 20:
56 products, sketch included, against 63 at damping 1e-3; 37 against 27 at 1e-2), and its
``P × ℓ`` float64 blocks rule it out for models of MiniLM's size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvmerge.operators.base import LinearOperator

__all__ = ["NystromPreconditioner"]


class NystromPreconditioner(LinearOperator):
    """Randomized Nyström preconditioner for :math:`A + \\mu I`, :math:`A` PSD.

    With the rank-ℓ Nyström approximation :math:`\\hat A = U \\hat\\Lambda U^\\top` of
    :math:`A` (Frangella, Tropp & Udell 2023, Algorithm 2.1, with their stabilising shift
    :math:`\\nu`),

    .. math::

        P^{-1} = (\\hat\\lambda_\\ell + \\mu)\\, U (\\hat\\Lambda + \\mu I)^{-1} U^\\top
                 + (I - U U^\\top),

    which maps the top ℓ eigen-directions of :math:`A + \\mu I` close to the scale of the
    rest. Building it costs ℓ products with :math:`A` (one ``[P, ℓ]`` block) and
    :math:`O(P\\ell^2)` arithmetic in float64; applying it costs :math:`O(P\\ell)`.

    Args:
        A: The PSD operator (without the damping).
        rank: ℓ, the sketch size.
        damping: :math:`\\mu > 0`.
        seed: Seed of the Gaussian test matrix.

    Attributes:
        products: Products with ``A`` spent on the sketch (``rank``).
        eigenvalues: :math:`\\hat\\lambda`, descending.

    Example:
        >>> from curvmerge import DenseOperator, ParamSpace, cg
        >>> space = ParamSpace(("w",), ((50,),))
        >>> g = torch.Generator().manual_seed(0)
        >>> Z = torch.randn(50, 5, generator=g, dtype=torch.float64)
        >>> A = DenseOperator(space, Z @ Z.T * 100)
        >>> M = NystromPreconditioner(A, rank=10, damping=1e-2)
        >>> b = torch.ones(50, dtype=torch.float64)
        >>> x, info = cg(lambda x: A @ x + 1e-2 * x, b, M=M, rtol=1e-10, maxiter=5)
        >>> info  # the five large eigenvalues are gone: CG converges in a couple of steps
        0
    """

    SELF_ADJOINT = True

    def __init__(self, A: LinearOperator, rank: int, damping: float, *, seed: int = 0):
        P = A.shape[0]
        rank = int(rank)
        if rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank}")
        rank = min(rank, P)
        damping = float(damping)
        if not damping > 0:
            raise ValueError(f"the Nyström preconditioner needs damping > 0, got {damping}")
        super().__init__(A.space, A.dtype, A.device)
        g = torch.Generator().manual_seed(seed)
        omega = torch.randn(P, rank, generator=g, dtype=torch.float64)
        omega, _ = torch.linalg.qr(omega)
        Y = (A @ omega.to(A.device, A.dtype)).to("cpu", torch.float64)
        nu = (P**0.5) * torch.finfo(A.dtype).eps * torch.linalg.matrix_norm(Y, "fro")
        nu = max(float(nu), 1e-300)
        Y_nu = Y + nu * omega
        core = omega.T @ Y_nu
        core = (core + core.T) / 2
        C, info = torch.linalg.cholesky_ex(core)
        shift = 0.0
        while int(info) != 0:  # not positive definite in floating point: raise the shift
            shift = max(shift * 10, nu * 10)
            C, info = torch.linalg.cholesky_ex(core + shift * torch.eye(rank, dtype=core.dtype))
        B = torch.linalg.solve_triangular(C, Y_nu.T, upper=False).T
        U, S, _ = torch.linalg.svd(B, full_matrices=False)
        lam = torch.clamp(S**2 - nu - shift, min=0.0)
        self.products = rank
        self.eigenvalues = lam
        self.damping = damping
        self._U = U.to(self.device, self.dtype)
        self._scale = ((lam[-1] + damping) / (lam + damping) - 1.0).to(self.device, self.dtype)

    def _matmat(self, X: Tensor) -> Tensor:
        UX = self._U.T @ X
        return X + self._U @ (self._scale.unsqueeze(1) * UX)
