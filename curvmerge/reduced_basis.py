"""Many weighted, shifted sums of operators solved from one subspace (a reduced basis).

For a family of symmetric positive semi-definite systems that share their pieces,

.. math::

    \\Big(\\lambda_i I + \\sum_t w_{it} F_t\\Big)\\, y_i = b_i, \\qquad i = 1..n,

keep an orthonormal basis :math:`V = [v_1 \\dots v_k]` and the products :math:`F_t V`
(:math:`T` products per basis vector, made once). Every system then has its Galerkin
approximation without any further product,

.. math::

    \\Big(\\lambda_i I_k + \\sum_t w_{it} H_t\\Big)\\, z_i = V^\\top b_i, \\qquad
    H_t = V^\\top F_t V, \\qquad y_i \\approx V z_i,

and its true residual :math:`r_i = b_i - \\lambda_i V z_i - \\sum_t w_{it} (F_t V) z_i`,
exactly (again without a product). The basis starts from the largest right-hand side and
grows by the Galerkin residual of the system whose true residual is worst, re-chosen every
``check_every`` steps. For one system this is the Lanczos process (the Krylov space CG
searches, with full re-orthogonalisation); for many it is the greedy step of the reduced-basis
method (Rozza, Huynh & Patera, "Reduced basis
approximation and a posteriori error estimation for affinely parametrized elliptic coercive
partial differential equations", Arch. Comput. Methods Eng. 2008), with exact residuals as its
error estimate. Memory: :math:`(T' + 1)\\, k` vectors of size :math:`P` for a basis of
:math:`k` vectors and the :math:`T' \\le T` operators some system weighs (kept in blocks of 8
vectors, never copied as the basis grows), besides the right-hand sides; at the end the
:math:`F_t V` are freed before the :math:`n` solutions are formed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from curvmerge.operators.base import LinearOperator

__all__ = ["reduced_basis_solve", "ReducedBasisResult", "combine"]


@dataclass
class ReducedBasisResult:
    """The Galerkin solutions of every system and what they cost.

    Attributes:
        solutions: :math:`y_i = V z_i`, one ``[P]`` tensor per system.
        relative_residuals: :math:`\\|r_i\\| / \\|b_i\\|` (true residuals, 0 for
            :math:`b_i = 0`).
        converged: Per system, whether its relative residual is at most ``rtol``.
        vectors: Basis vectors :math:`k`.
        products: Per-model products :math:`F_t v` made (:math:`T k`, less the zero-weight
            operators no system uses).
        checks: True-residual checks of every system.
    """

    solutions: list[Tensor]
    relative_residuals: list[float]
    converged: list[bool]
    vectors: int = 0
    products: int = 0
    checks: int = 0
    history: list[float] = field(default_factory=list)


def _check_systems(operators, systems, pieces):
    if not len(operators) or not all(isinstance(F, LinearOperator) for F in operators):
        raise TypeError("operators must be a non-empty list of curvmerge LinearOperators")
    if not len(systems):
        raise ValueError("no system to solve")
    P = operators[0].shape[0]
    T = len(operators)
    if pieces is not None:
        if not len(pieces):
            raise ValueError("rhs_pieces is empty")
        for j, c in enumerate(pieces):
            if c.shape != (P,):
                raise ValueError(f"rhs_pieces[{j}] has shape {tuple(c.shape)}, not ({P},)")
    for i, (w, lam, b) in enumerate(systems):
        if len(w) != T:
            raise ValueError(f"system {i}: {len(w)} weights for {T} operators")
        if any(float(x) < 0 for x in w) or float(lam) < 0:
            raise ValueError(f"system {i}: weights and damping must be >= 0")
        if pieces is not None and len(b) != len(pieces):
            raise ValueError(
                f"system {i}: {len(b)} right-hand-side coefficients for {len(pieces)} pieces"
            )
        if pieces is None and b.shape != (P,):
            raise ValueError(f"system {i}: right-hand side of shape {tuple(b.shape)}, not ({P},)")


def reduced_basis_solve(
    operators: Sequence[LinearOperator],
    systems: Sequence[tuple[Sequence[float], float, Tensor | Sequence[float]]],
    *,
    rhs_pieces: Sequence[Tensor] | None = None,
    rtol: float = 1e-3,
    max_vectors: int = 200,
    check_every: int = 5,
    callback: Callable[[int, float], None] | None = None,
) -> ReducedBasisResult:
    """Solve :math:`(\\lambda_i I + \\sum_t w_{it} F_t) y_i = b_i` for every system from one
    growing basis (see the module doc).

    Args:
        operators: :math:`F_1..F_T`, symmetric positive semi-definite, one space.
        systems: ``(weights, damping, b)`` per system; ``weights`` has :math:`T` entries.
            With ``rhs_pieces``, ``b`` is the coefficients :math:`a_{ij}` of
            :math:`b_i = \\sum_j a_{ij} c_j`.
        rhs_pieces: Vectors :math:`c_j` the right-hand sides combine (for example
            :math:`F_t \\theta_t`): each :math:`b_i` is then formed only while it is
            needed, never all :math:`n` at once (:math:`n` vectors less memory).
        rtol: Stop when every system's true relative residual is at most this.
        max_vectors: Stop at this many basis vectors (at most :math:`P`). The storage
            follows the basis used, not this cap (see the module doc).
        check_every: Krylov steps between two checks of every system's true residual.
        callback: Called after each check with the basis size and the worst relative
            residual.

    Returns:
        A :class:`ReducedBasisResult`; a system whose residual is above ``rtol`` when the
        basis is full is reported as not converged (never as converged).
    """
    _check_systems(operators, systems, rhs_pieces)
    if int(max_vectors) < 1 or int(check_every) < 1:
        raise ValueError("max_vectors and check_every must be >= 1")
    T, n = len(operators), len(systems)
    b0 = systems[0][2] if rhs_pieces is None else rhs_pieces[0]
    dtype = torch.promote_types(b0.dtype, operators[0].dtype)
    device = b0.device
    P = b0.shape[0]
    W = torch.tensor([[float(x) for x in w] for w, _, _ in systems], dtype=dtype, device=device)
    lams = torch.tensor([float(lam) for _, lam, _ in systems], dtype=dtype, device=device)
    Bs = _RightHandSides([b for _, _, b in systems], rhs_pieces, P, dtype, device)
    bnorm = Bs.norms()
    used = [t for t in range(T) if bool((W[:, t] != 0).any())]

    cap = min(int(max_vectors), P)  # no more than P orthonormal vectors
    # V and F_t V (for the operators some system weighs) in blocks: appending never copies,
    # and the memory follows the basis used, not ``max_vectors``
    V = _Rows(P, dtype, device)
    FV = {t: _Rows(P, dtype, device) for t in used}
    H = torch.zeros(T, 0, 0, dtype=torch.float64, device=device)  # H_t = V^T F_t V
    C = torch.zeros(0, n, dtype=torch.float64, device=device)  # V^T b_i
    k, products, checks = 0, 0, 0
    history: list[float] = []

    def add(v: Tensor) -> bool:
        """Orthonormalise ``v`` (a vector the caller no longer needs) against the basis and
        append it with its products."""
        nonlocal k, products, C, H
        if k >= cap:
            return False
        norm0 = norm = float(torch.linalg.vector_norm(v))
        # classical Gram-Schmidt, repeated while a pass removes more than 1 - 1/sqrt(2) of
        # the norm ("twice is enough", Daniel, Gragg, Kaufman & Stewart 1976): a Galerkin
        # residual is orthogonal to the basis already, and one pass only cleans its rounding
        for _ in range(2):
            if not k:
                break
            V.matmul_into(v, -V.t_matmul(v))
            before, norm = norm, float(torch.linalg.vector_norm(v))
            if norm >= before / 2**0.5:
                break
        if not norm > 1e-10 * max(norm0, 1e-300):
            return False  # nothing new: the space is invariant
        v = v.div_(norm)
        V.append(v)
        H = torch.nn.functional.pad(H, (0, 1, 0, 1))
        for t in used:
            Fv = (operators[t] @ v).to(device=device, dtype=dtype)
            FV[t].append(Fv)
            products += 1
            row = V.t_matmul(Fv).double()
            H[t, k, : k + 1] = row
            H[t, : k + 1, k] = row
        C = torch.cat([C, Bs.dots(v)[None]], 0)
        k += 1
        return True

    def reduced(idx: Tensor) -> Tensor:
        """Galerkin coefficients ``[k, len(idx)]`` of the systems ``idx`` (float64)."""
        eye = torch.eye(k, dtype=torch.float64, device=device)
        Hs = torch.einsum("it,tab->iab", W[idx].double(), H)
        Hs = Hs + lams[idx].double()[:, None, None] * eye
        rhs = C[:, idx].T.unsqueeze(-1)
        try:
            Z = torch.linalg.solve(Hs, rhs)
        except RuntimeError:  # singular (no damping, a direction no weighted F_t sees)
            Z = torch.linalg.pinv(Hs) @ rhs
        return Z.squeeze(-1).T

    def residuals(idx: Tensor, Z: Tensor) -> Tensor:
        """True residuals ``[len(idx), P]`` of the systems ``idx`` at ``y = V Z``, formed in
        place (one pass over ``V`` and each ``F_t V``, no ``[P, k]`` temporaries)."""
        Zd = Z.to(dtype)
        R = Bs.rows(idx.tolist())
        V.matmul_into(R, Zd * -lams[idx])
        for t in used:
            FV[t].matmul_into(R, Zd * -W[idx, t])
        return R

    every = torch.arange(n, device=device)

    def check() -> tuple[Tensor, Tensor]:
        Z = reduced(every)
        # residual norms a few systems at a time: temporaries of [group, P], not [n, P]
        norms = torch.cat(
            [
                torch.linalg.vector_norm(residuals(idx, Z[:, idx]), dim=1)
                for idx in every.split(_CHECK_GROUP)
            ]
        )
        rel = norms / torch.where(bnorm > 0, bnorm, 1.0)
        return Z, torch.where(bnorm > 0, rel, torch.zeros_like(rel))

    # start from the largest right-hand side; then, greedily, the residual of the worst system
    add(Bs.rows([int(torch.argmax(bnorm))])[0])
    Z, rel = check()
    checks += 1
    worst = int(torch.argmax(rel))
    while k < cap and float(rel[worst]) > rtol:
        grew = False
        for _ in range(check_every):
            # one Lanczos step of the worst system: its Galerkin residual is orthogonal to the
            # basis and spans, with it, the next Krylov space of that system
            idx = torch.tensor([worst], device=device)
            if not add(residuals(idx, reduced(idx))[0]):
                break
            grew = True
            if k >= cap:
                break
        Z, rel = check()
        checks += 1
        worst = int(torch.argmax(rel))
        history.append(float(rel[worst]))
        if callback is not None:
            callback(k, float(rel[worst]))
        if not grew:  # the worst system's space is exhausted: nothing more to learn
            break
    for rows in FV.values():  # the solutions need V only: free F_t V before forming them
        rows.blocks.clear()
    solutions = [V.matmul(Z[:, i].to(dtype)) for i in range(n)]
    rels = [float(r) for r in rel]
    return ReducedBasisResult(
        solutions=solutions,
        relative_residuals=rels,
        converged=[_converged(r, rtol) for r in rels],
        vectors=k,
        products=products,
        checks=checks,
        history=history,
    )


def combine(coefficients: Sequence[float], pieces: Sequence[Tensor]) -> Tensor:
    """:math:`\\sum_j a_j c_j` (a new tensor; zero when every coefficient is)."""
    out = torch.zeros_like(pieces[0])
    for a, c in zip(coefficients, pieces, strict=True):
        if a != 0:
            out.add_(c, alpha=float(a))
    return out


class _RightHandSides:
    """The systems' right-hand sides: given vectors, or combinations
    :math:`b_i = \\sum_j a_{ij} c_j` of shared pieces, formed only while needed."""

    def __init__(self, given, pieces, P: int, dtype: torch.dtype, device) -> None:
        self.P, self.dtype, self.device = P, dtype, device
        if pieces is None:
            self.given = [b.to(device=device, dtype=dtype) for b in given]  # not stacked
            self.pieces = None
        else:
            self.given = None
            self.pieces = [c.to(device=device, dtype=dtype) for c in pieces]
            self.A = torch.tensor([[float(a) for a in row] for row in given], dtype=torch.float64)

    def rows(self, idx: list[int]) -> Tensor:
        """:math:`b_i` for ``i`` in ``idx`` as the rows of a new ``[len(idx), P]`` tensor."""
        out = torch.empty(len(idx), self.P, dtype=self.dtype, device=self.device)
        for row, i in zip(out, idx, strict=True):
            if self.given is not None:
                row.copy_(self.given[i])
            else:
                row.copy_(combine(self.A[i].tolist(), self.pieces))
        return out

    def norms(self) -> Tensor:
        if self.given is not None:
            return torch.stack([torch.linalg.vector_norm(b) for b in self.given])
        return torch.stack(
            [
                torch.linalg.vector_norm(combine(self.A[i].tolist(), self.pieces))
                for i in range(self.A.shape[0])
            ]
        )

    def dots(self, v: Tensor) -> Tensor:
        """:math:`v^\\top b_i` for every system (float64)."""
        if self.given is not None:
            return torch.stack([v @ b for b in self.given]).double()
        d = torch.stack([v @ c for c in self.pieces]).double().cpu()
        return (self.A @ d).to(v.device)


class _Rows:
    """The vectors of a ``[k, P]`` matrix (a basis, or its products), kept in blocks of
    ``_BLOCK`` contiguous rows so that appending one never copies the others."""

    def __init__(self, P: int, dtype: torch.dtype, device: torch.device) -> None:
        self.P, self.dtype, self.device = P, dtype, device
        self.blocks: list[Tensor] = []
        self.k = 0

    def append(self, v: Tensor) -> None:
        if self.k % _BLOCK == 0:
            self.blocks.append(torch.empty(_BLOCK, self.P, dtype=self.dtype, device=self.device))
        self.blocks[-1][self.k % _BLOCK] = v
        self.k += 1

    def _used(self):
        for j, block in enumerate(self.blocks):
            yield j * _BLOCK, block[: min(_BLOCK, self.k - j * _BLOCK)]

    def t_matmul(self, x: Tensor) -> Tensor:
        """:math:`V^\\top x` (``[k]``) for a vector ``x``."""
        parts = [block @ x for _, block in self._used()]
        return torch.cat(parts, 0) if parts else x.new_zeros(0)

    def matmul_into(self, out: Tensor, Z: Tensor) -> Tensor:
        """``out += V Z`` in place: ``out`` a ``[P]`` vector and ``Z`` ``[k]``, or ``out``
        ``[m, P]`` rows and ``Z`` ``[k, m]``."""
        for start, block in self._used():
            part = Z[start : start + block.shape[0]]
            if out.ndim == 1:
                out.addmv_(block.T, part)
            else:
                out.addmm_(part.T, block)
        return out

    def matmul(self, Z: Tensor) -> Tensor:
        """:math:`V z` for a vector ``z`` of ``k`` entries."""
        return self.matmul_into(torch.zeros(self.P, dtype=self.dtype, device=self.device), Z)


_BLOCK = 8  # basis vectors per storage block
_CHECK_GROUP = 8  # systems whose residuals are formed together (as many rows as a block)


def _converged(residual: float, rtol: float) -> bool:
    """A finite residual at most ``rtol`` (NaN is never converged)."""
    return residual == residual and residual <= rtol
