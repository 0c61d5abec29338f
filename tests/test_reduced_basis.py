"""The reduced-basis solver: Galerkin solutions of many weighted, shifted sums from one
basis equal dense float64 solves, residuals are true, budgets are honest."""

from __future__ import annotations

import pytest
import torch

from curvmerge.operators import DenseOperator
from curvmerge.reduced_basis import reduced_basis_solve
from curvmerge.space import ParamSpace

D = torch.float64
P = 60
SPACE = ParamSpace.from_tensors({"w": torch.zeros(P, dtype=D)})


def _spd(seed, rank=12):
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(P, rank, generator=g, dtype=D)
    return G @ G.T


def _systems(Fs, seed=5):
    """Merge-like systems: b = sum_t w_t F_t d_t (in the operators' range)."""
    g = torch.Generator().manual_seed(seed)
    d = [torch.randn(P, generator=g, dtype=D) for _ in Fs]
    out = []
    for a in torch.linspace(0, 1, 9).tolist():
        for lam in (1e-2, 1.0):
            w = (a, 1 - a, 0.3)[: len(Fs)]
            b = sum(wt * (F @ dt) for wt, F, dt in zip(w, Fs, d, strict=True))
            out.append((w, lam, b))
    return out


def test_every_system_equals_its_dense_solve_and_the_residuals_are_true():
    Fs = [_spd(s) for s in (1, 2, 3)]
    ops = [DenseOperator(SPACE, F, self_adjoint=True) for F in Fs]
    systems = _systems(Fs)
    given = [b.clone() for _, _, b in systems]
    res = reduced_basis_solve(ops, systems, rtol=1e-10, max_vectors=P)
    assert all(res.converged) and res.vectors <= P
    for (_, _, b), before in zip(systems, given, strict=True):  # worked on in place: copies
        assert torch.equal(b, before)
    assert res.products == 3 * res.vectors
    for (w, lam, b), y, rel in zip(systems, res.solutions, res.relative_residuals, strict=True):
        A = lam * torch.eye(P, dtype=D) + sum(wt * F for wt, F in zip(w, Fs, strict=True))
        x = torch.linalg.solve(A, b)
        torch.testing.assert_close(y, x, rtol=1e-7, atol=1e-9)
        true = float(torch.linalg.vector_norm(b - A @ y) / torch.linalg.vector_norm(b))
        assert rel == pytest.approx(true, abs=1e-11)
    # at a loose tolerance the residuals are large enough to compare closely
    loose = reduced_basis_solve(ops, systems, rtol=1e-2, max_vectors=P)
    assert all(loose.converged) and loose.vectors < res.vectors
    assert max(loose.relative_residuals) > 1e-4  # not a vacuous comparison
    for (w, lam, b), y, rel in zip(systems, loose.solutions, loose.relative_residuals, strict=True):
        A = lam * torch.eye(P, dtype=D) + sum(wt * F for wt, F in zip(w, Fs, strict=True))
        true = float(torch.linalg.vector_norm(b - A @ y) / torch.linalg.vector_norm(b))
        assert rel == pytest.approx(true, rel=1e-8) and rel <= 1e-2


def test_one_system_is_the_krylov_space_cg_searches():
    # rank-12 operators: the systems' Krylov space has at most 12 + 1 dimensions
    Fs = [_spd(1)]
    ops = [DenseOperator(SPACE, Fs[0], self_adjoint=True)]
    b = Fs[0] @ torch.randn(P, dtype=D, generator=torch.Generator().manual_seed(0))
    res = reduced_basis_solve(ops, [((1.0,), 0.5, b)], rtol=1e-12, max_vectors=P, check_every=1)
    assert res.converged == [True] and res.vectors <= 13


def test_a_full_basis_reports_what_it_did_not_reach():
    Fs = [_spd(s, rank=40) for s in (1, 2)]
    ops = [DenseOperator(SPACE, F, self_adjoint=True) for F in Fs]
    systems = [s for s in _systems(Fs) if s[1] == 1e-2][1:3]
    res = reduced_basis_solve(ops, systems, rtol=1e-12, max_vectors=3)
    assert res.vectors == 3 and res.products == 6
    assert res.converged == [False, False]
    assert all(r > 1e-12 for r in res.relative_residuals)


def test_zero_right_hand_sides_and_bad_input():
    ops = [DenseOperator(SPACE, _spd(1), self_adjoint=True)]
    res = reduced_basis_solve(ops, [((1.0,), 0.1, torch.zeros(P, dtype=D))], rtol=1e-8)
    assert res.converged == [True] and float(res.solutions[0].abs().max()) == 0.0
    with pytest.raises(ValueError, match="2 weights for 1 operators"):
        reduced_basis_solve(ops, [((1.0, 2.0), 0.1, torch.ones(P, dtype=D))])
    with pytest.raises(ValueError, match=">= 0"):
        reduced_basis_solve(ops, [((-1.0,), 0.1, torch.ones(P, dtype=D))])
    with pytest.raises(ValueError, match="shape"):
        reduced_basis_solve(ops, [((1.0,), 0.1, torch.ones(P + 1, dtype=D))])
    with pytest.raises(ValueError, match="no system"):
        reduced_basis_solve(ops, [])


def test_memory_grows_with_the_basis_not_with_max_vectors():
    # the basis and its products were allocated for max_vectors up front ((T + 1) x
    # max_vectors x P numbers: sweep(screen='subspace') of a 22.7M-parameter pair at the
    # default 500 vectors asked for 136 GB before its first product; here 10**9 vectors of
    # P = 60, 1.4 TB); the module doc says (T + 1) k for k vectors used (fails on 76fd611)
    Fs = [_spd(s) for s in (1, 2)]
    ops = [DenseOperator(SPACE, F, self_adjoint=True) for F in Fs]
    systems = _systems(Fs)
    small = reduced_basis_solve(ops, systems, rtol=1e-10, max_vectors=P)
    huge = reduced_basis_solve(ops, systems, rtol=1e-10, max_vectors=10**9)
    assert huge.vectors == small.vectors and all(huge.converged)
    for a, b in zip(huge.solutions, small.solutions, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_nan_from_an_operator_is_never_converged():
    F = _spd(1)
    F[3, 3] = float("nan")
    ops = [DenseOperator(SPACE, F, self_adjoint=True)]
    b = torch.ones(P, dtype=D)
    res = reduced_basis_solve(ops, [((1.0,), 0.1, b)], rtol=1e-3, max_vectors=5)
    assert res.converged == [False]
    assert res.relative_residuals[0] != res.relative_residuals[0]  # NaN, reported as such


def test_peak_memory_is_the_basis_used_without_copies_or_unweighted_operators():
    # the storage doubled from 32 vectors by copying (old and new alive together) and kept
    # F_t V for operators no system weighs: 40 vectors of two used operators and an unused
    # third peaked at ~ (32 + 64) x 4 vectors instead of 40 x 3 — for two MiniLM bodies
    # (0.09 GB per vector) that was the sweep's out-of-memory kill (fails on 149a1b4)
    from curvmerge.memory import PeakMemory
    from curvmerge.operators import DiagonalOperator

    n = 400_000
    space = ParamSpace.from_tensors({"w": torch.zeros(n)})
    g = torch.Generator().manual_seed(0)
    ops = [DiagonalOperator(space, torch.rand(n, generator=g) + 0.1) for _ in range(3)]
    b = torch.randn(n, generator=g)
    systems = [((1.0, 0.5, 0.0), 1e-3, b), ((0.5, 1.0, 0.0), 1e-3, b)]
    vectors = 40
    with PeakMemory("cpu") as m:
        res = reduced_basis_solve(ops, systems, rtol=1e-12, max_vectors=vectors)
    if m.peak is None:
        pytest.skip("this platform does not report a process's peak memory")
    assert res.vectors == vectors and res.products == 2 * vectors
    stored = 3 * vectors * n * 4  # V and F_1 V, F_2 V in float32
    # with room for temporaries of the residual checks (a few [P, 2] blocks), the inputs'
    # copies and the allocator's fragmentation: measured 217-229 MiB here, 463 before
    bound = stored + 32 * n * 4 + 16 * 2**20
    assert m.peak <= bound, f"peak {m.peak / 2**20:.0f} MiB > bound {bound / 2**20:.0f} MiB"


def test_right_hand_sides_from_shared_pieces_equal_the_given_ones():
    # b_i = sum_j a_ij c_j formed while needed (merges: c_t = F_t theta_t) instead of n
    # vectors held at once: the same solutions and residuals
    Fs = [_spd(s) for s in (1, 2, 3)]
    ops = [DenseOperator(SPACE, F, self_adjoint=True) for F in Fs]
    g = torch.Generator().manual_seed(7)
    pieces = [F @ torch.randn(P, generator=g, dtype=D) for F in Fs]
    coeffs, given = [], []
    for a in (0.1, 0.5, 0.9):
        for lam in (1e-2, 1.0):
            w = (a, 1 - a, 0.3)
            coeffs.append((w, lam, w))
            given.append((w, lam, sum(wt * c for wt, c in zip(w, pieces, strict=True))))
    ref = reduced_basis_solve(ops, given, rtol=1e-9)
    res = reduced_basis_solve(ops, coeffs, rhs_pieces=pieces, rtol=1e-9)
    assert res.vectors == ref.vectors and all(res.converged)
    for (w, lam, b), y, z in zip(given, res.solutions, ref.solutions, strict=True):
        A = lam * torch.eye(P, dtype=D) + sum(wt * F for wt, F in zip(w, Fs, strict=True))
        torch.testing.assert_close(y, torch.linalg.solve(A, b), rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(y, z, rtol=1e-8, atol=1e-10)  # rounding only
    for a, b in zip(res.relative_residuals, ref.relative_residuals, strict=True):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-14)
    with pytest.raises(ValueError, match="2 right-hand-side coefficients for 3 pieces"):
        reduced_basis_solve(ops, [((1, 1, 1), 1.0, (1, 1))], rhs_pieces=pieces)
    with pytest.raises(ValueError, match=r"rhs_pieces\[1\] has shape"):
        reduced_basis_solve(ops, coeffs, rhs_pieces=[pieces[0], pieces[1][:5], pieces[2]])
