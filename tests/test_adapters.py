"""as_operator: curvlinops and scipy operators as curvmerge operators."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch
from torch import nn

from curvmerge import DenseOperator, ParamSpace, SpaceMismatchError, merge
from curvmerge.operators.adapters import CurvlinopsOperator, ScipyOperator, as_operator
from curvmerge.operators.ggn import GGNOperator

DT = torch.float64


def _problem(seed=0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    data = [
        (torch.randn(n, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g))
        for n in (4, 3)
    ]
    return model, nn.CrossEntropyLoss(), data


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(
    "name",
    ["GGNLinearOperator", "KFACLinearOperator", "EFLinearOperator", "HessianLinearOperator"],
)
def test_curvlinops_operators(name):
    import curvlinops

    model, loss_fn, data = _problem()
    names = ["2.weight", "2.bias"]
    named = dict(model.named_parameters())
    ref = getattr(curvlinops, name)(model, loss_fn, [named[n] for n in names], data)
    space = ParamSpace.from_module(model, names)
    op = as_operator(ref, space)
    assert isinstance(op, CurvlinopsOperator) and op.space == space
    assert op.dtype == DT and op.SELF_ADJOINT
    X = torch.randn(space.size, 3, dtype=DT)
    dense = ref @ torch.eye(space.size, dtype=DT)
    torch.testing.assert_close(op @ X, dense @ X)
    torch.testing.assert_close(op @ X[:, 0], dense @ X[:, 0])
    torch.testing.assert_close(op.to_dense(), dense)
    torch.testing.assert_close(op.diagonal(), dense.diagonal())
    d = op @ space.unflatten(X[:, 0])
    torch.testing.assert_close(space.flatten(d), dense @ X[:, 0])
    if name == "GGNLinearOperator":  # sums with curvmerge's own operators
        ours = GGNOperator(model, loss_fn, data, params=names)
        torch.testing.assert_close((op + ours) @ X, 2 * dense @ X)
        np.testing.assert_allclose(op.to_scipy() @ X[:, 0].numpy(), (dense @ X[:, 0]).numpy())


def test_kfac_merge():
    from curvlinops import KFACLinearOperator

    thetas, ops = [], []
    for seed in (0, 1):
        model, loss_fn, data = _problem(seed)
        named = dict(model.named_parameters())
        names = ["0.weight", "0.bias"]
        ref = KFACLinearOperator(model, loss_fn, [named[n] for n in names], data)
        ops.append(as_operator(ref, ParamSpace.from_module(model, names)))
        thetas.append(model)
    result = merge(thetas, ops, damping=1e-2, damping_scale=1.0, rtol=1e-10, prior=None)
    assert result.report.converged
    A = 1e-2 * torch.eye(ops[0].shape[0], dtype=DT)
    b = torch.zeros(ops[0].shape[0], dtype=DT)
    for F, m in zip(ops, thetas, strict=True):
        Fd = F.to_dense()
        A += 0.5 * Fd
        b += 0.5 * Fd @ ops[0].space.flatten(dict(m.named_parameters()))
    expected = torch.linalg.solve(A, b)
    assert _rel(ops[0].space.flatten(result.params), expected) < 1e-6


def test_scipy_and_dense():
    g = np.random.default_rng(0)
    M = g.standard_normal((5, 5))
    space = ParamSpace(("a", "b"), ((2, 2), (1,)))
    for obj in (sla.aslinearoperator(M), M):
        op = as_operator(obj, space)
        assert isinstance(op, ScipyOperator) and op.dtype == DT
        X = torch.randn(5, 2, dtype=DT)
        torch.testing.assert_close(op @ X, torch.as_tensor(M) @ X)
        torch.testing.assert_close(op.adjoint() @ X, torch.as_tensor(M).T @ X)
        torch.testing.assert_close(op.to_dense(), torch.as_tensor(M))
    op32 = as_operator(sla.aslinearoperator(M.astype(np.float32)))
    assert op32.dtype == torch.float32 and op32.space.names == ("x",)
    dense = as_operator(torch.eye(5, dtype=DT), space)
    assert isinstance(dense, DenseOperator)
    assert as_operator(dense) is dense


def test_errors():
    space = ParamSpace(("a",), ((3,),))
    with pytest.raises(ValueError, match="P=3"):
        as_operator(np.eye(4), space)
    with pytest.raises(ValueError, match="square"):
        as_operator(np.ones((2, 3)))
    with pytest.raises(ValueError, match="square"):
        as_operator(torch.ones(2, 3))
    with pytest.raises(TypeError, match="cannot wrap"):
        as_operator("not an operator")
    with pytest.raises(TypeError, match="space"):
        as_operator(np.eye(3), space=3)
    with pytest.raises(SpaceMismatchError):
        as_operator(DenseOperator(space, torch.eye(3)), ParamSpace(("b",), ((3,),)))
