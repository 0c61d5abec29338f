"""Exact quantities of curvmerge.verify against dense float64 computations (rel. 1e-8)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from curvmerge.operators import DiagonalOperator
from curvmerge.verify.diagonal import compare_diagonals, exact_diagonal
from curvmerge.verify.directions import direction_share, prior_share
from curvmerge.verify.estimators import estimate_diagonal
from curvmerge.verify.share import diagonal_share, exact_diagonal_share
from curvmerge.verify.spectrum import effective_ranks, spectrum, top_eigenpairs

from .test_verify_estimators import KINDS, SPACE, op, psd

RTOL = 1e-8


def close(a, b, rtol=RTOL):
    a, b = float(a), float(b)
    assert abs(a - b) <= rtol * max(abs(b), 1e-300), (a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_exact_diagonal_of_lazy_operator(kind):
    M = psd(kind)
    A = 0.5 * op(M) + op(M)  # a SumOperator: probed with unit vectors
    torch.testing.assert_close(exact_diagonal(A), 1.5 * M.diagonal(), rtol=RTOL, atol=0)
    torch.testing.assert_close(exact_diagonal(op(M)), M.diagonal(), rtol=0, atol=0)
    with pytest.raises(MemoryError):
        exact_diagonal(A, max_size=10)


@pytest.mark.parametrize("kind", KINDS)
def test_exact_share_matches_dense(kind):
    M = psd(kind).numpy()
    D = np.diag(np.diag(M))
    s = exact_diagonal_share(op(torch.from_numpy(M)))
    close(s.share, np.linalg.norm(M - D) / np.linalg.norm(M))
    close(s.frobenius_norm, np.linalg.norm(M))
    close(s.diagonal_fraction, np.linalg.norm(D) ** 2 / np.linalg.norm(M) ** 2)
    block = np.zeros_like(M)
    for name, sl in SPACE.slices().items():
        close(s.per_layer[name], np.linalg.norm((M - D)[sl]) / np.linalg.norm(M[sl]))
        close(s.within_layer[name], np.linalg.norm((M - D)[sl, sl]) / np.linalg.norm(M[sl, sl]))
        close(s.per_layer_fraction[name], np.linalg.norm(D[sl]) ** 2 / np.linalg.norm(M[sl]) ** 2)
        block[sl, sl] = M[sl, sl]
    close(s.cross_layer_share, np.linalg.norm(M - block) / np.linalg.norm(M))
    assert diagonal_share(op(torch.from_numpy(M))).method == "exact"


def test_share_of_a_diagonal_is_zero():
    d = torch.linspace(1, 2, SPACE.size, dtype=torch.float64)
    s = exact_diagonal_share(DiagonalOperator(SPACE, d))
    assert s.share == 0.0 and s.cross_layer_share == 0.0


@pytest.mark.parametrize("kind", KINDS)
def test_dense_spectrum_matches_numpy(kind):
    M = psd(kind)
    lam = np.sort(np.linalg.eigvalsh(M.numpy()))[::-1]
    s = spectrum(op(M), damping=0.01)
    assert s.method == "dense"
    np.testing.assert_allclose(s.eigenvalues.numpy(), lam, rtol=RTOL, atol=RTOL * lam[0])
    close(s.trace.value, np.trace(M.numpy()))
    close(s.intrinsic_dimension.value, np.trace(M.numpy()) / lam[0])
    p = np.clip(lam, 0, None) / np.clip(lam, 0, None).sum()
    p = p[p > 0]
    close(s.entropy_rank, np.exp(-(p * np.log(p)).sum()))
    lp = np.clip(lam, 0, None)
    close(s.effective_parameters, (lp / (lp + 0.01)).sum())
    # eigenvectors diagonalise M
    V = s.eigenvectors
    torch.testing.assert_close(V.T @ M @ V, torch.diag(s.eigenvalues), atol=1e-10, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_lanczos_top_eigenvalues_match_dense(kind):
    M = psd(kind)
    lam = np.sort(np.linalg.eigvalsh(M.numpy()))[::-1]
    vals, vecs, products = top_eigenpairs(op(M), 6)
    np.testing.assert_allclose(vals.numpy(), lam[:6], rtol=RTOL)
    assert products > 0
    res = M @ vecs - vecs * vals
    assert float(res.abs().max()) < 1e-8 * lam[0]
    s = spectrum(op(M), k=6, exact=False, diagonal=M.diagonal())
    close(s.trace.value, float(M.trace()))
    close(s.intrinsic_dimension.value, float(M.trace()) / lam[0])
    # without the diagonal, the trace is estimated and the intrinsic dimension gets an error bar
    s2 = spectrum(op(M), k=6, exact=False, trace_products=60)
    assert s2.trace.method == "hutch++" and s2.intrinsic_dimension.stderr > 0


def test_effective_ranks_of_equal_eigenvalues():
    r = effective_ranks(torch.tensor([3.0, 3.0, 3.0, 0.0], dtype=torch.float64), damping=3.0)
    assert r["intrinsic_dimension"] == pytest.approx(3.0, rel=1e-12)
    assert r["entropy_rank"] == pytest.approx(3.0, rel=1e-12)
    assert r["effective_parameters"] == pytest.approx(1.5, rel=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_direction_share_matches_dense(kind):
    M = psd(kind)
    g = torch.Generator().manual_seed(5)
    delta = torch.randn(SPACE.size, generator=g, dtype=torch.float64)
    lam, V = torch.linalg.eigh(M)
    tau = 0.05 * float(lam[-1])
    d = direction_share(op(M), delta, spectrum(op(M)), threshold=tau, diagonal=M.diagonal())
    c2 = (V.T @ delta) ** 2
    n2 = float(delta @ delta)
    q = float(delta @ M @ delta) / n2
    close(d.delta_norm, math.sqrt(n2))
    close(d.rayleigh, q)
    close(d.rayleigh_share, q / float(lam[-1]))
    close(d.alignment, q / (float(M.trace()) / SPACE.size))
    close(d.unseen_fraction, float(c2[lam < tau].sum()) / n2)
    close(d.diagonal_ratio, float((M.diagonal() * delta**2).sum()) / float(delta @ M @ delta))
    assert not d.unseen_is_bound
    # from Lanczos pairs: exact once the pairs reach below tau, else an upper bound
    few = spectrum(op(M), k=3, exact=False, diagonal=M.diagonal())
    dl = direction_share(op(M), delta, few, threshold=tau)
    if float(few.eigenvalues[-1]) < tau:
        close(dl.unseen_fraction, d.unseen_fraction)
    else:
        assert dl.unseen_is_bound and dl.unseen_fraction >= d.unseen_fraction - 1e-12


def test_direction_share_from_lanczos_is_exact_for_low_rank():
    g = torch.Generator().manual_seed(0)
    J = torch.randn(4, SPACE.size, generator=g, dtype=torch.float64)
    M = J.T @ J
    delta = torch.randn(SPACE.size, generator=g, dtype=torch.float64)
    tau = 1e-6
    dense = direction_share(op(M), delta, spectrum(op(M)), threshold=tau)
    lanczos = direction_share(op(M), delta, spectrum(op(M), k=6, exact=False), threshold=tau)
    assert not lanczos.unseen_is_bound
    close(lanczos.unseen_fraction, dense.unseen_fraction)
    P = J.T @ torch.linalg.solve(J @ J.T, J)  # projector onto the range
    close(dense.unseen_fraction, 1 - float(delta @ P @ delta) / float(delta @ delta))


def test_compare_diagonals_against_dense():
    M = psd("decay")
    d = M.diagonal()
    est = estimate_diagonal(op(M), 30, seed=0)
    c = compare_diagonals(est, op(M), name="hutchinson")
    e = est.value
    close(c.relative_error, float(torch.linalg.vector_norm(e - d) / torch.linalg.vector_norm(d)))
    close(c.cosine, float(e @ d / (e.norm() * d.norm())))
    for name, sl in SPACE.slices().items():
        close(c.per_layer[name], float((e[sl] - d[sl]).norm() / d[sl].norm()))
    assert c.within_error_bar is not None and 0 <= c.entry_coverage <= 1
    assert c.error_bar == pytest.approx(3 * est.norm_stderr / float(d.norm()), rel=1e-12)
    same = compare_diagonals(d, d)
    assert same.relative_error == 0 and same.median_ratio == 1.0
    assert same.log_correlation == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_prior_share_matches_dense(kind):
    M = psd(kind)
    g = torch.Generator().manual_seed(7)
    D = torch.randn(SPACE.size, 3, generator=g, dtype=torch.float64)
    lam_damp = 0.02
    shares, iters = prior_share(op(M), D, lam_damp, rtol=1e-13)
    A = M + lam_damp * torch.eye(SPACE.size, dtype=torch.float64)
    for k in range(3):
        d = D[:, k]
        close(shares[k], lam_damp * float(d @ torch.linalg.solve(A, d)) / float(d @ d))
    assert iters > 0
    lam, V = torch.linalg.eigh(M)
    c2 = (V.T @ D[:, 0]) ** 2 / float(D[:, 0] @ D[:, 0])
    close(shares[0], float((c2 * lam_damp / (lam + lam_damp)).sum()))
