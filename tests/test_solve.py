"""cg against torch.linalg.solve in float64, and scipy's stopping rule and info."""

import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch

from curvmerge import DenseOperator, DiagonalOperator, cg, solve_cg
from curvmerge.solve import cg_shifts
from tests.helpers import random_space, random_spd

SPACE = random_space()
P = SPACE.size


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("precondition", [False, True])
@pytest.mark.parametrize("k", [None, 1, 4])
def test_cg_matches_dense_solve(precondition, k):
    S = random_spd(P, seed=1)
    A = DenseOperator(SPACE, S, self_adjoint=True)
    g = torch.Generator().manual_seed(2)
    b = (
        torch.randn(P, generator=g, dtype=torch.float64)
        if k is None
        else torch.randn(P, k, generator=g, dtype=torch.float64)
    )
    M = DiagonalOperator(SPACE, S.diagonal()).inverse() if precondition else None
    x, info = cg(A, b, rtol=1e-13, M=M)
    assert info == 0
    assert x.shape == b.shape
    assert _rel(x, torch.linalg.solve(S, b)) < 1e-10


def test_jacobi_preconditioner_helps_a_badly_scaled_system():
    scale = torch.logspace(0, 4, P, dtype=torch.float64)
    S = scale.sqrt()[:, None] * random_spd(P, seed=3) * scale.sqrt()[None, :]
    A = DenseOperator(SPACE, S, self_adjoint=True)
    b = torch.ones(P, dtype=torch.float64)
    plain = solve_cg(A, b, rtol=1e-10)
    jacobi = solve_cg(A, b, rtol=1e-10, M=DiagonalOperator(SPACE, S.diagonal()).inverse())
    assert jacobi.converged and plain.converged
    assert jacobi.iterations < plain.iterations


def test_info_is_maxiter_when_not_converged_like_scipy():
    S = random_spd(P, seed=4, cond_shift=1e-3)
    b = torch.randn(P, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x, info = cg(S, b, rtol=1e-14, maxiter=3)
    x_sp, info_sp = spla.cg(S.numpy(), b.numpy(), rtol=1e-14, maxiter=3)
    assert info == info_sp == 3
    np.testing.assert_allclose(x.numpy(), x_sp, rtol=1e-8)


def test_stopping_rule_and_iterates_follow_scipy():
    S = random_spd(P, seed=6)
    b = torch.randn(P, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    for rtol, atol in [(1e-3, 0.0), (0.0, 1e-2), (1e-8, 1e-4)]:
        ours = solve_cg(S, b, rtol=rtol, atol=atol)
        count = []
        x_sp, info_sp = spla.cg(
            S.numpy(), b.numpy(), rtol=rtol, atol=atol, callback=lambda _: count.append(1)
        )
        assert ours.info == info_sp == 0
        assert ours.iterations == len(count)
        np.testing.assert_allclose(ours.x.numpy(), x_sp, rtol=1e-10)
        assert float((b - S @ ours.x).norm()) <= max(rtol * float(b.norm()), atol)


def test_warm_start_zero_rhs_and_callback():
    S = random_spd(P, seed=8)
    b = torch.randn(P, dtype=torch.float64)
    exact = torch.linalg.solve(S, b)
    warm = solve_cg(S, b, exact + 1e-9, rtol=1e-6)
    assert warm.iterations == 0 and warm.products == 1
    x, info = cg(S, torch.zeros(P, dtype=torch.float64))
    assert info == 0 and not x.any()
    seen = []
    cg(S, b, callback=lambda xk: seen.append(xk.clone()))
    assert seen and _rel(seen[-1], exact) < 1e-5


def test_columns_converge_independently():
    S = random_spd(P, seed=9)
    B = torch.stack([torch.randn(P, dtype=torch.float64), torch.zeros(P, dtype=torch.float64)], 1)
    X, info = cg(S, B, rtol=1e-12)
    assert info == 0
    assert not X[:, 1].any()
    assert _rel(X[:, 0], torch.linalg.solve(S, B[:, 0])) < 1e-10


def test_cg_refuses_indefinite_and_nonfinite():
    S = -torch.eye(P, dtype=torch.float64)
    with pytest.raises(ValueError, match="not positive definite"):
        cg(S, torch.ones(P, dtype=torch.float64))
    b = torch.ones(P, dtype=torch.float64)
    b[0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        cg(torch.eye(P, dtype=torch.float64), b)


def test_cg_float32_and_callable():
    S = random_spd(P, seed=10).float()
    b = torch.randn(P)
    x, info = cg(lambda v: S @ v, b, rtol=1e-5)
    assert info == 0 and x.dtype == torch.float32
    assert _rel(x.double(), torch.linalg.solve(S.double(), b.double())) < 1e-4


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_x0_is_refused(bad):
    S = random_spd(P, seed=11)
    x0 = torch.zeros(P, dtype=torch.float64)
    x0[3] = bad
    with pytest.raises(ValueError, match="x0 contains NaN or Inf"):
        cg(S, torch.ones(P, dtype=torch.float64), x0)


def _poisoned(S, value, *, after, column=None):
    """``X -> S X`` that returns ``value`` (entry 0, or a whole column) from product ``after`` on.

    An Inf entry gets the sign of the direction it multiplies, so ``p^T A p`` is ``+inf``
    and the step is zero: the residual, not the curvature test, is what goes NaN.
    """
    calls = [0]

    def apply(X):
        calls[0] += 1
        Y = S @ X
        if calls[0] >= after:
            Y = Y.clone()
            if column is None:
                Y[0] = value * (torch.sign(X[0]) if value == float("inf") else 1.0)
            else:
                Y[:, column] = value
        return Y

    return apply


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_product_is_a_breakdown_never_convergence(value):
    S = random_spd(P, seed=12)
    b = torch.randn(P, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    res = solve_cg(_poisoned(S, value, after=3), b, rtol=1e-10)
    assert res.info == -1 and not res.converged
    assert not np.isfinite(res.relative_residual)
    assert torch.isfinite(res.x).all()  # the last finite iterate, not NaN
    _, info = cg(_poisoned(S, value, after=3), b, rtol=1e-10)
    assert info == -1


def test_a_nan_column_breaks_down_alone():
    S = random_spd(P, seed=14)
    B = torch.randn(P, 3, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    res = solve_cg(_poisoned(S, float("nan"), after=2, column=1), B, rtol=1e-12)
    assert res.info == -1 and not res.converged
    assert not np.isfinite(res.relative_residual)
    exact = torch.linalg.solve(S, B)
    for k in (0, 2):
        assert _rel(res.x[:, k], exact[:, k]) < 1e-10


def _ill_conditioned(n=400, seed=0):
    """``Q diag(logspace(0, 6)) Q^T`` (condition number 1e6) in float64, a hard ``b`` (whose
    solution is as large as ``b``, so float32 cannot get its residual below ~1e-2) and an
    easy one (``A y``)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    S = (Q * torch.logspace(0, 6, n, dtype=torch.float64)) @ Q.T
    hard = torch.randn(n, generator=g, dtype=torch.float64)
    easy = S @ torch.randn(n, generator=g, dtype=torch.float64)
    return S, hard, easy


def _true_rel(S, b, x):
    """``‖b − A x‖ / ‖b‖`` per column, recomputed in float64."""
    b = b.reshape(b.shape[0], -1)
    r = b - S @ x.double().reshape(b.shape)
    return r.norm(dim=0) / b.norm(dim=0)


@pytest.mark.parametrize("rtol", [1e-2, 1e-3])
def test_float32_never_claims_a_convergence_the_true_residual_misses(rtol):
    S, hard, _ = _ill_conditioned()
    res = solve_cg(S.float(), hard.float(), rtol=rtol)
    true = float(_true_rel(S, hard, res.x).max())
    if res.converged:
        assert true <= rtol
    else:
        assert res.info == res.iterations > 0
        assert true / 1.5 <= res.relative_residual <= 1.5 * true  # reported, not recursive
        assert res.true_residual_checks >= 2  # a restart from the true residual was tried
    assert res.products == res.iterations + res.true_residual_checks


def test_float32_columns_are_checked_one_by_one():
    S, hard, easy = _ill_conditioned()
    B = torch.stack([easy, hard], 1)
    res = solve_cg(S.float(), B.float(), rtol=1e-3)
    true = _true_rel(S, B, res.x)
    assert not res.converged
    assert float(true[0]) <= 1e-3
    assert true[1] / 1.5 <= res.relative_residual <= 1.5 * true[1]
    easy_alone = solve_cg(S.float(), easy.float(), rtol=1e-4)
    assert easy_alone.converged and float(_true_rel(S, easy, easy_alone.x)) <= 1e-4


def test_edge_cases_never_report_a_false_convergence():
    S = random_spd(P, seed=19)
    b = torch.randn(P, generator=torch.Generator().manual_seed(20), dtype=torch.float64)
    # maxiter=0: scipy says info 0 without converging; we say not converged.
    res = solve_cg(S, b, maxiter=0)
    assert not res.converged and res.iterations == 0 and res.relative_residual == 1.0
    # A zero column of b has the solution 0 whatever the warm start (scipy returns b).
    B = torch.stack([b, torch.zeros_like(b)], 1)
    X0 = torch.randn(P, 2, generator=torch.Generator().manual_seed(21), dtype=torch.float64)
    res = solve_cg(S, B, X0, rtol=1e-10)
    assert res.converged and res.iterations <= P  # not 10 P chasing an exact zero
    assert not res.x[:, 1].any()
    assert _rel(res.x[:, 0], torch.linalg.solve(S, b)) < 1e-8


def test_float32_stagnation_stops_long_before_maxiter():
    """At the float32 floor restarts gain nothing: CG stops, honestly unconverged, instead of
    spending maxiter products (10 P by default: 220 million for a MiniLM body)."""
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(400, 400, generator=g, dtype=torch.float64))
    A = (Q * torch.logspace(0, 6, 400, dtype=torch.float64)) @ Q.T
    b = torch.randn(400, generator=g, dtype=torch.float64)
    result = solve_cg(A.float(), b.float(), rtol=1e-6, maxiter=100_000)
    true = float((b - A @ result.x.double()).norm() / b.norm())
    assert result.info > 0 and not result.converged
    assert result.iterations < 20_000
    assert abs(result.relative_residual - true) < 0.05 * true


# ------------------------------------------------------------------ multi-shift CG
SHIFTS = [1.0, 0.0, 1e-3, 0.1, 10.0]


def _shifted_problem(dtype=torch.float64, seed=11, spread=2):
    # PSD with a spread spectrum, like a Fisher: shifts change the conditioning a lot
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    S = (Q * torch.logspace(-spread, spread, P, dtype=torch.float64)) @ Q.T
    S = (S + S.T) / 2
    b = torch.randn(P, generator=g, dtype=torch.float64)
    return S.to(dtype), b.to(dtype)


@pytest.mark.parametrize("operator", [False, True])
def test_cg_shifts_match_dense_solves_and_separate_cg(operator):
    S, b = _shifted_problem()
    A = DenseOperator(SPACE, S, self_adjoint=True) if operator else S
    rtol = 1e-10
    results = cg_shifts(A, b, SHIFTS, rtol=rtol)
    assert len(results) == len(SHIFTS)
    eye = torch.eye(P, dtype=torch.float64)
    for sigma, r in zip(SHIFTS, results, strict=True):
        ref = torch.linalg.solve(S + sigma * eye, b)
        assert r.info == 0 and r.converged
        true = float((b - (S + sigma * eye) @ r.x).norm() / b.norm())
        assert true <= rtol
        assert r.relative_residual == pytest.approx(true, rel=1e-6)
        cond = float(torch.linalg.cond(S + sigma * eye))
        assert _rel(r.x, ref) < 10 * rtol * cond
        separate = solve_cg(S + sigma * eye, b, rtol=rtol)
        assert _rel(r.x, separate.x) < 10 * rtol * cond
        # a shift stops when its own test passes: as many iterations as its separate solve
        assert abs(r.iterations - separate.iterations) <= 1
        assert r.products == r.iterations + 1 and r.true_residual_checks == 1
    hardest = max(r.iterations for r in results)
    assert results.iterations == hardest == results[SHIFTS.index(0.0)].iterations
    # shared products once, plus one per column of the [P, S] true-residual block
    assert results.products == hardest + len(SHIFTS)
    separate_total = sum(solve_cg(S + s * eye, b, rtol=rtol).products for s in SHIFTS)
    assert results.products < separate_total / 2


def test_cg_shifts_counts_products_and_stops_each_shift():
    S, b = _shifted_problem()
    calls = []

    def apply(X):
        calls.append(X.shape[1])
        return S @ X

    seen = []
    results = cg_shifts(apply, b, [0.0, 100.0], rtol=1e-8, callback=seen.append)
    assert len(calls) == results.iterations + 1 and results.products == sum(calls)
    assert calls[-1] == 2 and set(calls[:-1]) == {1}  # one [P, S] block at the end
    assert len(seen) == results.iterations
    assert results[1].iterations < results[0].iterations
    assert len(results[1].residuals) == results[1].iterations + 1


def test_cg_shifts_edge_cases():
    S, b = _shifted_problem()
    zero = cg_shifts(S, torch.zeros(P, dtype=torch.float64), [0.0, 1.0])
    assert [r.info for r in zero] == [0, 0] and zero.products == 0
    assert all(bool((r.x == 0).all()) for r in zero)
    assert len(cg_shifts(S, b, [])) == 0
    with pytest.raises(ValueError):
        cg_shifts(S, b, [-1.0])
    with pytest.raises(ValueError):
        cg_shifts(S, b, [float("nan")])
    with pytest.raises(ValueError):
        cg_shifts(S, b.unsqueeze(1), [0.0])
    capped = cg_shifts(S, b, [0.0, 10.0], rtol=1e-12, maxiter=3)
    assert capped[0].info == 3 and not capped[0].converged
    assert capped.products == 3 + 2
    nan = cg_shifts(lambda X: X * float("nan"), b, [0.0, 1.0])
    assert [r.info for r in nan] == [-1, -1]
    with pytest.raises(ValueError, match="positive definite"):
        cg_shifts(-S, b, [0.0])


def test_cg_shifts_float32_never_claims_a_convergence_its_true_residual_misses():
    S, b = _shifted_problem(torch.float32, spread=1)
    shifts = [0.0, 1e-2, 1.0]
    for rtol in (1e-3, 1e-6, 1e-9):
        results = cg_shifts(S, b, shifts, rtol=rtol, maxiter=500)
        for sigma, r in zip(shifts, results, strict=True):
            assert r.x.dtype == torch.float32
            A64 = S.double() + sigma * torch.eye(P, dtype=torch.float64)
            true = float((b.double() - A64 @ r.x.double()).norm() / b.double().norm())
            # the reported true residual is computed in float32: close to the float64 one
            assert r.relative_residual == pytest.approx(true, rel=2e-2, abs=1e-5)
            if r.converged:
                assert true <= rtol * 1.02 + 1e-5
    assert not all(r.converged for r in cg_shifts(S, b, shifts, rtol=1e-9, maxiter=500))
    assert all(r.converged for r in cg_shifts(S, b, shifts, rtol=1e-3))
