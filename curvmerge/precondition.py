"""Preconditioners for the merge equation's CG solve.

The Jacobi (diagonal) preconditioner rescales coordinates; the curvature of a network is
far from diagonal, and on the exact-Fisher merge of three MNIST CNNs it made CG slower
(195 products instead of plain CG's 63 at damping 1e-3; ``benchmarks/bench_ggn.py``,
``docs/benchmarks_ggn.md``). What slows CG on :math:`(\\mu I + A)` with a GGN :math:`A`
is a handful of large eigenvalues far above :math:`\\mu`; the randomized Nyström
preconditioner of Frangella, Tropp & Udell ("Randomized Nyström preconditioning", SIAM J.
Matrix Anal. Appl. 44(2), 2023) captures them from one block product :math:`A\\Omega` with a
``[P, ℓ]`` test matrix. On that CNN merge it paid off only at the smallest damping (rank 20:
56 products, sketch included, against 63 at damping 1e-3; 37 against 27 at 1e-2); its
``P × ℓ`` blocks, in the operator's dtype, weigh ℓ parameter vectors each.

For Kronecker-factored curvatures (K-FAC, RegMean's Grams) the
:class:`KroneckerPreconditioner` replaces, per layer, the sum :math:`\\sum_t w_t B_t \\otimes
A_t` by one Kronecker product, whose damped inverse is exact and cheap through the two
factors' eigendecompositions (the inverse K-FAC itself applies, Martens & Grosse, ICML 2015).
It needs no product with the system: building it costs one eigendecomposition per factor.
The merge it preconditions is the K-FAC merge of Tam et al. ("Merging by matching models in
task parameter subspaces", MaTS, TMLR 2024), which they solve by plain CG.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from curvmerge.operators.base import LinearOperator
from curvmerge.operators.kronecker import KroneckerBlock, KroneckerOperator

__all__ = ["NystromPreconditioner", "KroneckerPreconditioner", "KRONECKER_AVERAGES"]

#: How :class:`KroneckerPreconditioner` turns a layer's sum of Kronecker products into one.
KRONECKER_AVERAGES = ("mean", "frobenius")


class NystromPreconditioner(LinearOperator):
    """Randomized Nyström preconditioner for :math:`A + \\mu I`, :math:`A` PSD.

    With the rank-ℓ Nyström approximation :math:`\\hat A = U \\hat\\Lambda U^\\top` of
    :math:`A` (Frangella, Tropp & Udell 2023, Algorithm 2.1, with their stabilising shift
    :math:`\\nu`),

    .. math::

        P^{-1} = (\\hat\\lambda_\\ell + \\mu)\\, U (\\hat\\Lambda + \\mu I)^{-1} U^\\top
                 + (I - U U^\\top),

    which maps the top ℓ eigen-directions of :math:`A + \\mu I` close to the scale of the
    rest. Building it costs ℓ products with :math:`A` (one ``[P, ℓ]`` block, which a
    :class:`~curvmerge.operators.GGNOperator` multiplies in batched passes) and
    :math:`O(P\\ell^2)` arithmetic; the ``[P, ℓ]`` blocks stay in the operator's dtype on its
    device (the test matrix is drawn there), only the ``[ℓ, ℓ]`` factors are formed in
    float64, and the shift :math:`\\nu` follows the operator's precision. Applying it costs
    :math:`O(P\\ell)`.

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
        # the [P, rank] blocks stay in the operator's dtype on its device; only the
        # [rank, rank] matrices are formed in float64
        f64 = dict(dtype=torch.float64, device=self.device)
        work = torch.promote_types(self.dtype, torch.float32)  # QR and SVD need float32
        g = torch.Generator(self.device).manual_seed(seed)
        omega = torch.randn(P, rank, generator=g, dtype=work, device=self.device)
        omega, _ = torch.linalg.qr(omega)
        Y = (A @ omega).to(work)
        nu = (P**0.5) * torch.finfo(self.dtype).eps * float(torch.linalg.matrix_norm(Y, "fro"))
        nu = max(nu, 1e-300)
        Y.add_(omega, alpha=nu)  # Y_nu = Y + nu Omega
        core = (omega.T @ Y).to(**f64)
        del omega
        core = (core + core.T) / 2
        C, info = torch.linalg.cholesky_ex(core)
        shift = 0.0
        while int(info) != 0:  # not positive definite in floating point: raise the shift
            shift = max(shift * 10, nu * 10)
            C, info = torch.linalg.cholesky_ex(core + shift * torch.eye(rank, **f64))
        # B = Y_nu C^{-T}; its thin SVD from a QR of B and the SVD of the small R factor
        C_inv_T = torch.linalg.solve_triangular(C, torch.eye(rank, **f64), upper=False).T
        B = Y @ C_inv_T.to(work)
        del Y
        Q, R = torch.linalg.qr(B)
        del B
        U_R, S, _ = torch.linalg.svd(R.to(torch.float64), full_matrices=False)
        lam = torch.clamp(S**2 - nu - shift, min=0.0)
        self.products = rank
        self.eigenvalues = lam
        self.damping = damping
        self._U = (Q @ U_R.to(work)).to(self.dtype)
        self._scale = ((lam[-1] + damping) / (lam + damping) - 1.0).to(self.device, self.dtype)

    def _matmat(self, X: Tensor) -> Tensor:
        UX = self._U.T @ X
        return X + self._U @ (self._scale.unsqueeze(1) * UX)


def _gram(factors: list[Tensor]) -> Tensor:
    """Frobenius inner products :math:`\\langle F_s, F_t \\rangle` of equal-sized factors."""
    flat = torch.stack([F.reshape(-1) for F in factors])
    return flat @ flat.T


def _check_damping(damping: float) -> float:
    damping = float(damping)
    if not (damping >= 0 and damping < float("inf")):
        raise ValueError(f"the Kronecker preconditioner needs a damping >= 0, got {damping}")
    return damping


def _spectrum(eigenvalues: Tensor) -> Tensor:
    """Eigenvalues of a PSD factor, those below the rounding of ``eigh`` set to zero."""
    top = float(eigenvalues.max().clamp(min=0)) if eigenvalues.numel() else 0.0
    tol = eigenvalues.numel() * torch.finfo(eigenvalues.dtype).eps * top
    return torch.where(eigenvalues > tol, eigenvalues, 0.0)


def _dense(F: Tensor | None, cast: dict) -> Tensor | None:
    """A factor contiguous in the operator's dtype and device (products at full speed)."""
    return None if F is None else F.to(**cast).contiguous()


def _rank_one(G_A: Tensor, G_B: Tensor, w: Tensor, iterations: int, tol: float) -> Tensor:
    """Coefficients :math:`\\alpha` of the input factor :math:`\\bar A = \\sum_t \\alpha_t A_t`
    of the best Kronecker approximation of :math:`\\sum_t w_t B_t \\otimes A_t`.

    The rearrangement (Van Loan & Pitsianis 1993) of the sum is :math:`U W V^\\top` with
    :math:`U = [\\operatorname{vec} B_t]`, :math:`V = [\\operatorname{vec} A_t]`,
    :math:`W = \\operatorname{diag}(w)`; power iterations on it stay in the span of the
    factors, :math:`\\alpha \\leftarrow W G_B W G_A \\alpha` (normalised in :math:`G_A`), with
    the Gram matrices :math:`G_A = V^\\top V`, :math:`G_B = U^\\top U`: a ``[T, T]`` problem,
    the big matrix is never formed. :math:`W G_B W G_A` has non-negative entries (PSD factors),
    so from :math:`\\alpha = w` the iterates stay non-negative (Perron–Frobenius):
    :math:`\\bar A` and :math:`\\bar B` are PSD.
    """
    alpha = w.clone()
    step = (w.unsqueeze(1) * G_B * w.unsqueeze(0)) @ G_A
    for _ in range(iterations):
        new = step @ alpha
        norm = float(new @ G_A @ new) ** 0.5
        if not norm > 0:
            break
        new = new / norm
        done = float((new - alpha).abs().max()) <= tol * float(new.abs().max())
        alpha = new
        if done:
            break
    return alpha


class KroneckerPreconditioner(LinearOperator):
    """Inverse of :math:`\\lambda I + \\bar B \\otimes \\bar A` per layer, for Kronecker-factored
    curvatures :math:`F_t` (:class:`~curvmerge.operators.KroneckerOperator`).

    Each layer's block of :math:`\\sum_t w_t F_t` is a sum of Kronecker products
    :math:`\\sum_t w_t B_t \\otimes A_t`, whose damped inverse has no closed form for
    :math:`T > 1`. It is replaced by one product :math:`\\bar B \\otimes \\bar A`:

    - ``average="mean"`` (default): :math:`\\bar A = \\sum_t w_t A_t / \\sum_t w_t`,
      :math:`\\bar B = \\sum_t w_t B_t`, exact when the :math:`A_t` agree;
    - ``average="frobenius"``: the best approximation in the Frobenius norm, the top singular
      pair of the rearranged sum (Van Loan & Pitsianis, "Approximation with Kronecker
      products", 1993), found by power iterations on the ``[T, T]`` Gram matrices of the
      factors. Closest in norm is not best for CG: the norm is ruled by the largest
      eigenvalues, CG by the small ones next to :math:`\\lambda`; on the demo's CNNs it
      needed more products than the mean (``benchmarks/bench_kfac_merge.py``).

    Both are exact for one model (:math:`T = 1`) and for identity output factors (RegMean's
    Grams, :math:`B_t = I`).

    With the eigendecompositions :math:`\\bar A = Q_A \\operatorname{diag}(a) Q_A^\\top`,
    :math:`\\bar B = Q_B \\operatorname{diag}(b) Q_B^\\top` (computed once, in float64),

    .. math::

        P^{-1} = (Q_B \\otimes Q_A)\\, \\operatorname{diag}(\\lambda + b \\otimes a)^{-1}\\,
        (Q_B \\otimes Q_A)^\\top,

    applied to a layer's joint matrix :math:`M` as :math:`Q_B ((Q_B^\\top M Q_A) \\oslash
    (\\lambda + b a^\\top)) Q_A^\\top` in :math:`O(d_{out} d_{in} (d_{out} + d_{in}))`, the
    inverse K-FAC applies (Martens & Grosse, ICML 2015); parameters no block covers (where
    every :math:`F_t` is zero) get :math:`1/\\lambda`. :math:`P^{-1}` is self-adjoint and
    positive definite (for :math:`\\lambda > 0` its eigenvalues lie in :math:`(0, 1/\\lambda]`),
    so it serves as CG's ``M``.
    Building it costs no product with the curvatures; the eigendecompositions cost
    :math:`O(d_{in}^3 + d_{out}^3)` per layer and do not depend on :math:`\\lambda`
    (:meth:`with_damping` reuses them).

    Args:
        curvatures: One :class:`~curvmerge.operators.KroneckerOperator` per model, all with
            the same layers over the same parameters.
        weights: :math:`w_t \\ge 0` (default :math:`1/T`); terms with :math:`w_t = 0` are left
            out.
        damping: :math:`\\lambda \\ge 0` (absolute); 0 only when every :math:`b_i a_j > 0`
            (then off the blocks, where the system is zero, :math:`P^{-1}` is the identity).
        average: ``"mean"`` or ``"frobenius"`` (:data:`KRONECKER_AVERAGES`).
        iterations: Limit on the power iterations of ``"frobenius"``.

    Attributes:
        products: Products with the curvatures spent building it (0).
        errors: Layer -> relative Frobenius error :math:`\\|\\sum_t w_t B_t \\otimes A_t -
            \\bar B \\otimes \\bar A\\|_F / \\|\\sum_t w_t B_t \\otimes A_t\\|_F` (0 when
            :math:`T = 1`), from the Gram matrices.

    Raises:
        TypeError: A curvature is not a ``KroneckerOperator``.
        ValueError: Curvatures with different layers or parameters, bad weights, a negative
            damping, damping 0 with singular averaged factors, or an unknown ``average``.

    Example:
        >>> from curvmerge import KroneckerOperator, ParamSpace, solve_cg
        >>> space = ParamSpace(("w", "b", "c"), ((2, 2), (2,), (3,)))  # c: no block
        >>> A = torch.tensor([[2.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.0]])
        >>> B = torch.tensor([[1.0, 0.5], [0.5, 3.0]])
        >>> K = KroneckerOperator(space, {"layer": (A, B, "w", "b")})
        >>> M = KroneckerPreconditioner([K], damping=0.1)
        >>> system = K.to_dense() + 0.1 * torch.eye(9)
        >>> torch.allclose(M.to_dense() @ system, torch.eye(9), atol=1e-5)
        True
        >>> solve_cg(system, torch.ones(9), M=M, rtol=1e-5).iterations  # T = 1: exact
        1
    """

    SELF_ADJOINT = True

    def __init__(
        self,
        curvatures: Sequence[KroneckerOperator],
        weights: Sequence[float] | None = None,
        damping: float = 1.0,
        *,
        average: str = "mean",
        iterations: int = 200,
    ):
        curvatures = list(curvatures)
        if not curvatures:
            raise ValueError("KroneckerPreconditioner needs at least one curvature")
        for i, F in enumerate(curvatures):
            if not isinstance(F, KroneckerOperator):
                raise TypeError(
                    f"curvature {i} is a {type(F).__name__}, not a KroneckerOperator: the "
                    "Kronecker preconditioner needs Kronecker-factored curvatures (K-FAC, Grams)"
                )
        T = len(curvatures)
        w = [1.0 / T] * T if weights is None else [float(v) for v in weights]
        if len(w) != T or any(not (v >= 0 and v < float("inf")) for v in w) or sum(w) <= 0:
            raise ValueError(f"weights must be {T} finite non-negative numbers, not all zero")
        damping = _check_damping(damping)
        if average not in KRONECKER_AVERAGES:
            raise ValueError(f"average must be one of {KRONECKER_AVERAGES}, got {average!r}")
        first = curvatures[0]
        super().__init__(first.space, first.dtype, first.device)
        terms = [(wt, F.blocks()) for wt, F in zip(w, curvatures, strict=True) if wt != 0]
        layout = first.blocks()
        for i, F in enumerate(curvatures[1:], start=1):
            first.space.check_same(F.space, what=f"curvature {i}")
            other = F.blocks()
            if list(other) != list(layout) or any(
                (b.weight, b.bias, b.transposed)
                != (layout[k].weight, layout[k].bias, layout[k].transposed)
                for k, b in other.items()
            ):
                raise ValueError(
                    f"curvature {i} has other layers or parameters than curvature 0: the "
                    "Kronecker preconditioner needs the same blocks in every curvature"
                )
        wt = torch.tensor([t[0] for t in terms], dtype=torch.float64, device=self.device)
        f64 = dict(dtype=torch.float64, device=self.device)
        rotate, back, scales, ones = {}, {}, {}, {}
        shapes = dict(zip(first.space.names, first.space.shapes, strict=True))
        self.errors: dict[str, float] = {}
        for layer, blk in layout.items():
            names = (blk.weight, blk.bias, blk.transposed)
            As = [b[layer].A.to(**f64) for _, b in terms]
            Bs = [b[layer].B for _, b in terms]
            wshape = shapes[blk.weight]
            d_out = wshape[1] if blk.transposed else wshape[0]
            identity_B = all(B is None for B in Bs)
            if identity_B:
                G_B = torch.full((len(terms), len(terms)), float(d_out), **f64)
            else:
                Bs = [torch.eye(d_out, **f64) if B is None else B.to(**f64) for B in Bs]
                G_B = _gram(Bs)
            G_A = _gram(As)
            if average == "mean" or len(terms) == 1:
                alpha, beta = wt / wt.sum(), wt
            else:
                alpha = _rank_one(G_A, G_B, wt, iterations, 1e-12)
                beta = wt * (G_A @ alpha)
                s = float(alpha.sum())  # A-bar on the scale of a mean of the A_t
                alpha, beta = alpha / s, beta * s
            total = float(wt @ (G_A * G_B) @ wt)
            cross = float(wt @ ((G_B @ beta) * (G_A @ alpha)))
            approx = float(beta @ G_B @ beta) * float(alpha @ G_A @ alpha)
            self.errors[layer] = max(total - 2 * cross + approx, 0.0) ** 0.5 / max(
                total**0.5, 1e-300
            )
            A_bar = sum(a * A for a, A in zip(alpha.tolist(), As, strict=True))
            a, Q_A = torch.linalg.eigh((A_bar + A_bar.T) / 2)
            a = _spectrum(a)
            if identity_B:
                Q_B, b = None, torch.full((d_out,), float(beta.sum()), **f64)
            else:
                B_bar = sum(c * B for c, B in zip(beta.tolist(), Bs, strict=True))
                b, Q_B = torch.linalg.eigh((B_bar + B_bar.T) / 2)
                b = _spectrum(b)
            cast = dict(dtype=self.dtype, device=self.device)

            rotate[layer] = KroneckerBlock(
                _dense(Q_A, cast), _dense(None if Q_B is None else Q_B.T, cast), *names
            )
            back[layer] = KroneckerBlock(_dense(Q_A.T, cast), _dense(Q_B, cast), *names)
            scales[layer] = KroneckerBlock(torch.diag(a), torch.diag(b), *names)
            ones[layer] = KroneckerBlock(torch.eye(a.numel(), **f64), None, *names)
        space = self.space
        self._rotate = KroneckerOperator(space, rotate)  # M -> Q_B^T M Q_A
        self._back = KroneckerOperator(space, back)  # M -> Q_B M Q_A^T
        self._ba = KroneckerOperator(space, scales).diagonal()  # b_i a_j, float64
        self._covered = KroneckerOperator(space, ones).diagonal()  # 1 on covered entries
        self.products = 0
        self.average = average
        self._set_damping(damping)

    def _set_damping(self, damping: float) -> None:
        covered = self._covered > 0
        if damping == 0 and not bool((self._ba[covered] > 0).all()):
            raise ValueError(
                "the Kronecker preconditioner needs damping > 0 when the averaged factors are "
                "singular (an eigenvalue of A-bar or B-bar is zero)"
            )
        self.damping = damping
        cast = dict(dtype=self.dtype, device=self.device)
        inverse = 1.0 / torch.where(covered, damping + self._ba, 1.0)
        self._inverse = torch.where(covered, inverse, 0.0).to(**cast).unsqueeze(1)
        # off the blocks the system is lambda I: 1 / lambda (with lambda = 0 it is zero there,
        # CG never moves those entries, and any positive scale keeps P^{-1} definite)
        off = 1.0 / damping if damping > 0 else 1.0
        self._uncovered = torch.where(covered, 0.0, off).to(**cast).unsqueeze(1)

    def with_damping(self, damping: float) -> KroneckerPreconditioner:
        """The same preconditioner at another :math:`\\lambda \\ge 0`, sharing the
        eigendecompositions (no new work but one pass over the scales)."""
        damping = _check_damping(damping)
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        other._set_damping(damping)
        return other

    def _matmat(self, X: Tensor) -> Tensor:
        Y = self._back @ (self._inverse * (self._rotate @ X))
        return Y + self._uncovered * X
