"""KroneckerPreconditioner against dense float64 inverses, alone and inside merge()."""

from __future__ import annotations

import pytest
import torch

from curvmerge import DenseOperator, ParamSpace, PreparedMerge, merge, solve_cg
from curvmerge.operators import KroneckerOperator
from curvmerge.precondition import KroneckerPreconditioner
from tests.helpers import random_spd

DT = torch.float64

# a convolution with bias, a transposed (HF Conv1D) weight, a linear layer with bias and a
# parameter no block covers
SPACE = ParamSpace(
    ("conv.w", "conv.b", "skip", "hf.w", "lin.w", "lin.b"),
    ((3, 2, 2, 1), (3,), (4,), (2, 3), (2, 3), (2,)),
)
LAYERS = {"conv": ("conv.w", "conv.b", 5, 3, False), "hf": ("hf.w", None, 2, 3, True)}
LAYERS["lin"] = ("lin.w", "lin.b", 4, 2, False)


def _curvature(seed: int, identity_b: bool = False) -> KroneckerOperator:
    blocks = {}
    for i, (layer, (w, b, n_in, n_out, tr)) in enumerate(LAYERS.items()):
        A = random_spd(n_in, seed * 10 + 2 * i, cond_shift=0.1)
        B = None if identity_b else random_spd(n_out, seed * 10 + 2 * i + 1, cond_shift=0.1)
        blocks[layer] = (A, B, w, b, tr)
    return KroneckerOperator(SPACE, blocks)


def _kron_dense(factors: dict) -> torch.Tensor:
    """Dense B-bar (x) A-bar, laid out as KroneckerOperator lays out its blocks."""
    blocks = {k: (A, B, *LAYERS[k][:2], LAYERS[k][4]) for k, (A, B) in factors.items()}
    return KroneckerOperator(SPACE, blocks).to_dense()


def _van_loan(Fs, w):
    """Per layer, the best Kronecker approximation by an SVD of the rearranged sum."""
    out = {}
    for layer in LAYERS:
        pairs = [F.factors()[layer] for F in Fs]
        R = sum(wt * torch.outer(B.reshape(-1), A.reshape(-1)) for wt, (A, B) in zip(w, pairs))
        U, S, Vh = torch.linalg.svd(R)
        n_out, n_in = pairs[0][1].shape[0], pairs[0][0].shape[0]
        B_bar, A_bar = U[:, 0].reshape(n_out, n_out), S[0] * Vh[0].reshape(n_in, n_in)
        out[layer] = (A_bar, B_bar)
    return out


def _inverse(dense, lam):
    return torch.linalg.inv(dense + lam * torch.eye(SPACE.size, dtype=DT))


def test_mean_is_the_inverse_of_the_dense_kronecker_of_the_averages():
    Fs, w, lam = [_curvature(s) for s in range(3)], [0.5, 0.2, 0.3], 0.05
    M = KroneckerPreconditioner(Fs, w, lam, average="mean")
    factors = {}
    for layer in LAYERS:
        pairs = [F.factors()[layer] for F in Fs]
        A_bar = sum(wt * A for wt, (A, _) in zip(w, pairs)) / sum(w)
        factors[layer] = (A_bar, sum(wt * B for wt, (_, B) in zip(w, pairs)))
    expected = _inverse(_kron_dense(factors), lam)
    torch.testing.assert_close(M.to_dense(), expected, rtol=1e-10, atol=1e-10)
    skip = SPACE.slices()["skip"]  # no block: 1 / lambda
    torch.testing.assert_close(M.to_dense()[skip, skip], torch.eye(4, dtype=DT) / lam)
    assert M.products == 0


def test_frobenius_is_van_loan_pitsianis_and_its_error_is_measured():
    Fs, w, lam = [_curvature(s) for s in range(3)], [0.5, 0.2, 0.3], 0.05
    M = KroneckerPreconditioner(Fs, w, lam, average="frobenius")
    best = _van_loan(Fs, w)
    torch.testing.assert_close(M.to_dense(), _inverse(_kron_dense(best), lam), rtol=1e-8, atol=1e-8)
    mean = KroneckerPreconditioner(Fs, w, lam, average="mean")
    for layer in LAYERS:
        pairs = [F.factors()[layer] for F in Fs]
        total = sum(wt * torch.kron(B, A) for wt, (A, B) in zip(w, pairs))
        A_bar, B_bar = best[layer]
        error = torch.linalg.norm(total - torch.kron(B_bar, A_bar)) / torch.linalg.norm(total)
        assert M.errors[layer] == pytest.approx(float(error), rel=1e-6, abs=1e-10)
        assert M.errors[layer] <= mean.errors[layer] + 1e-12  # the best in this norm


def test_self_adjoint_positive_definite_and_with_damping():
    Fs = [_curvature(s) for s in range(2)]
    M = KroneckerPreconditioner(Fs, None, 0.1)
    D = M.to_dense()
    torch.testing.assert_close(D, D.T, rtol=0, atol=1e-12)
    eig = torch.linalg.eigvalsh(D)
    assert float(eig.min()) > 0 and float(eig.max()) <= 1 / 0.1 + 1e-9
    fresh = KroneckerPreconditioner(Fs, None, 0.01)
    torch.testing.assert_close(M.with_damping(0.01).to_dense(), fresh.to_dense())
    assert M.damping == 0.1  # unchanged


@pytest.mark.parametrize("average", ["mean", "frobenius"])
def test_one_model_is_exact_cg_converges_in_one_iteration(average):
    (F,) = Fs = [_curvature(0)]
    lam = 1e-3
    M = KroneckerPreconditioner(Fs, [2.0], lam, average=average)
    A = 2.0 * F.to_dense() + lam * torch.eye(SPACE.size, dtype=DT)
    torch.testing.assert_close(M.to_dense() @ A, torch.eye(SPACE.size, dtype=DT), atol=1e-8, rtol=0)
    b = torch.randn(SPACE.size, generator=torch.Generator().manual_seed(0), dtype=DT)
    res = solve_cg(A, b, rtol=1e-10, M=M)
    assert res.converged and res.iterations == 1
    assert M.errors == {layer: 0.0 for layer in LAYERS}


@pytest.mark.parametrize("average", ["mean", "frobenius"])
def test_identity_output_factors_are_exact(average):
    """RegMean's Grams (B = I): the sum is one Kronecker product, the inverse exact."""
    Fs, w, lam = [_curvature(s, identity_b=True) for s in range(3)], [0.2, 0.3, 0.5], 1e-2
    M = KroneckerPreconditioner(Fs, w, lam, average=average)
    total = sum(wt * F.to_dense() for wt, F in zip(w, Fs))
    torch.testing.assert_close(M.to_dense(), _inverse(total, lam), rtol=1e-9, atol=1e-9)
    assert max(M.errors.values()) < 1e-7


def test_merge_with_kronecker_matches_dense_solve_in_fewer_products():
    Fs, lam = [_curvature(s) for s in range(3)], 1e-4
    g = torch.Generator().manual_seed(3)
    thetas = [
        {n: torch.randn(s, generator=g, dtype=DT) for n, s in zip(SPACE.names, SPACE.shapes)}
        for _ in Fs
    ]
    absolute = {"damping": lam, "damping_scale": 1.0, "prior": None, "rtol": 1e-10}
    res = merge(thetas, Fs, preconditioner="kronecker", **absolute)
    A = lam * torch.eye(SPACE.size, dtype=DT) + sum(F.to_dense() for F in Fs) / 3
    b = sum(F.to_dense() @ SPACE.flatten(t) for F, t in zip(Fs, thetas)) / 3
    expected = torch.linalg.solve(A, b)
    assert res.report.converged and res.report.preconditioner == "kronecker (mean)"
    got = SPACE.flatten(res.params)
    assert float((got - expected).norm() / expected.norm()) < 1e-8
    plain = merge(thetas, Fs, preconditioner=None, **absolute)
    assert res.report.products < plain.report.products
    frob = merge(thetas, Fs, preconditioner="kronecker:frobenius", **absolute)
    assert frob.report.converged and frob.report.preconditioner == "kronecker (frobenius)"


def test_errors():
    F = _curvature(0)
    with pytest.raises(TypeError, match="not a KroneckerOperator"):
        KroneckerPreconditioner([F, DenseOperator(SPACE, F.to_dense())])
    with pytest.raises(ValueError, match="damping >= 0"):
        KroneckerPreconditioner([F], damping=-1.0)
    with pytest.raises(ValueError, match="average"):
        KroneckerPreconditioner([F], average="median")
    with pytest.raises(ValueError, match="weights"):
        KroneckerPreconditioner([F, F], [1.0])
    other = KroneckerOperator(SPACE, {"lin": F.factors()["lin"] + ("lin.w", "lin.b")})
    with pytest.raises(ValueError, match="same blocks"):
        KroneckerPreconditioner([F, other])
    thetas = [
        {n: torch.zeros(s, dtype=DT) for n, s in zip(SPACE.names, SPACE.shapes)} for _ in range(2)
    ]
    dense = [DenseOperator(SPACE, F.to_dense()) for _ in range(2)]
    with pytest.raises(ValueError, match="Kronecker-factored curvatures"):
        merge(thetas, dense, preconditioner="kronecker")
    with pytest.raises(ValueError, match="Kronecker-factored curvatures"):
        PreparedMerge(thetas, dense, preconditioner="kronecker")  # refused before any product
    with pytest.raises(ValueError, match="kronecker:mean"):
        merge(thetas, [F, F], preconditioner="kronecker:median")
    singular = KroneckerOperator(
        SPACE, {"lin": (torch.zeros(4, 4, dtype=DT), None, "lin.w", "lin.b")}
    )
    with pytest.raises(ValueError, match="singular"):
        KroneckerPreconditioner([singular], damping=0.0)
    with pytest.warns(UserWarning, match="damping > 0"):
        merge(thetas, [singular, singular], damping=0.0, preconditioner="kronecker")


def test_zero_damping_with_definite_factors_is_the_exact_inverse_on_the_blocks():
    F = _curvature(0)
    M = KroneckerPreconditioner([F], damping=0.0)
    covered = F.diagonal() > 0
    A = F.to_dense()[covered][:, covered]
    D = M.to_dense()
    torch.testing.assert_close(D[covered][:, covered], torch.linalg.inv(A), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(D[~covered][:, ~covered], torch.eye(4, dtype=DT))  # "skip"
    assert M.with_damping(0.5).damping == 0.5


def test_prepared_damping_grid_solves_each_damping_with_its_own_preconditioner():

    Fs = [_curvature(s) for s in range(3)]
    g = torch.Generator().manual_seed(4)
    thetas = [
        {n: torch.randn(s, generator=g, dtype=DT) for n, s in zip(SPACE.names, SPACE.shapes)}
        for _ in Fs
    ]
    prepared = PreparedMerge(
        thetas, Fs, preconditioner="kronecker", damping_scale=1.0, prior=None, rtol=1e-10
    )
    grid = prepared.merge_dampings(None, [1e-1, 1e-2, 1e-3])
    assert not grid.shared  # the preconditioner depends on the damping: one solve each
    total = sum(F.to_dense() for F in Fs) / 3
    b = sum(F.to_dense() @ SPACE.flatten(t) for F, t in zip(Fs, thetas)) / 3
    for r, lam in zip(grid, [1e-1, 1e-2, 1e-3]):
        assert r.report.converged and r.report.preconditioner == "kronecker (mean)"
        assert r.report.costs.sketch_products == 0 and r.report.costs.sketch_seconds > 0
        expected = torch.linalg.solve(total + lam * torch.eye(SPACE.size, dtype=DT), b)
        got = SPACE.flatten(r.params)
        assert float((got - expected).norm() / expected.norm()) < 1e-8
