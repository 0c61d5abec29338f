"""Randomized Nyström preconditioner, alone and inside merge()."""

from __future__ import annotations

import pytest
import torch

from curvmerge import DenseOperator, ParamSpace, merge, solve_cg
from curvmerge.precondition import NystromPreconditioner

DT = torch.float64


def _spiked(P=200, spikes=8, seed=0):
    """PSD matrix with a few huge eigenvalues over a spread-out tail: hard for plain CG."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=DT))
    lam = torch.cat(
        [torch.logspace(4, 2, spikes, dtype=DT), torch.rand(P - spikes, generator=g, dtype=DT)]
    )
    return (Q * lam) @ Q.T


def test_eigenvalues_and_inverse_on_exact_low_rank():
    space = ParamSpace(("w",), ((60,),))
    g = torch.Generator().manual_seed(1)
    Z = torch.randn(60, 6, generator=g, dtype=DT)
    A = Z @ Z.T
    M = NystromPreconditioner(DenseOperator(space, A), rank=10, damping=0.5)
    top = torch.linalg.eigvalsh(A).flip(0)[:6]
    torch.testing.assert_close(M.eigenvalues[:6], top, rtol=1e-8, atol=1e-8)
    assert M.products == 10
    # rank >= rank(A): P^{-1} = (lambda_l + mu) (A + mu I)^{-1}, lambda_l = 0
    expected = 0.5 * torch.linalg.inv(A + 0.5 * torch.eye(60, dtype=DT))
    torch.testing.assert_close(M.to_dense(), expected, rtol=1e-8, atol=1e-8)


def test_cuts_cg_products_on_spiked_spectrum():
    A = _spiked()
    space = ParamSpace(("w",), ((200,),))
    op = DenseOperator(space, A, self_adjoint=True)
    mu = 1e-3
    b = torch.randn(200, dtype=DT)
    plain = solve_cg(lambda x: A @ x + mu * x, b, rtol=1e-8, maxiter=2000)
    M = NystromPreconditioner(op, rank=20, damping=mu)
    pre = solve_cg(lambda x: A @ x + mu * x, b, rtol=1e-8, maxiter=2000, M=M)
    assert plain.converged and pre.converged
    assert pre.products + M.products < plain.products / 2
    exact = torch.linalg.solve(A + mu * torch.eye(200, dtype=DT), b)
    assert float((pre.x - exact).norm() / exact.norm()) < 1e-5


def test_merge_with_nystrom_matches_dense_solve():
    space = ParamSpace(("w",), ((200,),))
    mats = [_spiked(seed=s) for s in (0, 1)]
    ops = [DenseOperator(space, F, self_adjoint=True) for F in mats]
    g = torch.Generator().manual_seed(2)
    thetas = [{"w": torch.randn(200, generator=g, dtype=DT)} for _ in mats]
    lam = 1e-2
    absolute = {"damping": lam, "damping_scale": 1.0, "prior": None, "rtol": 1e-10}
    res = merge(thetas, ops, preconditioner="nystrom:30", **absolute)
    A = lam * torch.eye(200, dtype=DT) + 0.5 * (mats[0] + mats[1])
    b = 0.5 * (mats[0] @ thetas[0]["w"] + mats[1] @ thetas[1]["w"])
    expected = torch.linalg.solve(A, b)
    assert res.report.converged and res.report.preconditioner == "nystrom (rank 30)"
    assert float((res.params["w"] - expected).norm() / expected.norm()) < 1e-6
    plain = merge(thetas, ops, preconditioner=None, **absolute)
    assert res.report.products < plain.report.products


def test_errors():
    space = ParamSpace(("w",), ((4,),))
    op = DenseOperator(space, torch.eye(4, dtype=DT))
    with pytest.raises(ValueError, match="rank"):
        NystromPreconditioner(op, rank=0, damping=1.0)
    with pytest.raises(ValueError, match="damping"):
        NystromPreconditioner(op, rank=2, damping=0.0)
    thetas = [{"w": torch.ones(4, dtype=DT)}, {"w": torch.zeros(4, dtype=DT)}]
    with pytest.raises(ValueError, match="nystrom"):
        merge(thetas, [op, op], preconditioner="nystrom:x")
    with pytest.warns(UserWarning, match="damping > 0"):
        merge(thetas, [op, op], damping=0.0, preconditioner="nystrom")


def test_sketch_stays_in_the_operators_dtype():
    """A float32 operator's sketch: float32 blocks, no float64 ``[P, rank]`` tensor is ever
    formed, exact on a low-rank operator to float32 precision, and it still pays."""
    from torch.utils._python_dispatch import TorchDispatchMode

    P, rank, mu = 200, 20, 1e-1
    A = _spiked()
    space = ParamSpace(("w",), ((P,),))
    big64 = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == DT and P in t.shape:
                    big64.append((str(func), tuple(t.shape)))
            return out

    op32 = DenseOperator(space, A.float(), self_adjoint=True)
    with Record():
        M32 = NystromPreconditioner(op32, rank=rank, damping=mu)
    assert big64 == []
    assert M32._U.dtype == torch.float32 and M32._U.shape == (P, rank)
    # exact on a low-rank float32 operator, to float32 precision
    Z = torch.randn(P, 6, generator=torch.Generator().manual_seed(1), dtype=DT)
    low = DenseOperator(space, (Z @ Z.T).float(), self_adjoint=True)
    top = torch.linalg.eigvalsh(Z @ Z.T).flip(0)[:6]
    M_low = NystromPreconditioner(low, rank=10, damping=mu)
    torch.testing.assert_close(M_low.eigenvalues[:6], top, rtol=1e-4, atol=0)
    b = torch.randn(P, generator=torch.Generator().manual_seed(4))
    A32 = A.float()
    # rtol 1e-3: float32's residual floor here is near 1e-4 (|A| ~ 1e4)
    plain = solve_cg(lambda x: A32 @ x + mu * x, b, rtol=1e-3, maxiter=2000)
    pre = solve_cg(lambda x: A32 @ x + mu * x, b, rtol=1e-3, maxiter=2000, M=M32)
    assert pre.converged and pre.products + M32.products < plain.products / 2
