"""Every core operator and every lazy combination against a float64 dense matrix."""

import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch

from curvmerge import DenseOperator, DiagonalOperator, IdentityOperator, SpaceMismatchError
from curvmerge.operators import ProductOperator, ScaledOperator, SumOperator
from tests.helpers import assert_matches_dense, random_space, random_spd

SPACE = random_space()
P = SPACE.size


def _rand(seed, shape=(P, P)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _cases():
    d1 = torch.rand(P, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.1
    d2 = torch.rand(P, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    A = _rand(3)  # not symmetric: exercises adjoints
    S = random_spd(P, seed=4)
    D1, D2 = DiagonalOperator(SPACE, d1), DiagonalOperator(SPACE, d2)
    I = IdentityOperator(SPACE, dtype=torch.float64)
    dA, dS = DenseOperator(SPACE, A), DenseOperator(SPACE, S, self_adjoint=True)
    eye = torch.eye(P, dtype=torch.float64)
    return {
        "identity": (I, eye),
        "scaled identity": (2.5 * I, 2.5 * eye),
        "diagonal": (D1, torch.diag(d1)),
        "diagonal from dict": (DiagonalOperator(SPACE, SPACE.unflatten(d1)), torch.diag(d1)),
        "dense": (dA, A),
        "dense symmetric": (dS, S),
        "diag + diag": (D1 + D2, torch.diag(d1 + d2)),
        "identity + diag": (I + D1, eye + torch.diag(d1)),
        "diag - identity": (D1 - I, torch.diag(d1) - eye),
        "c * dense": (3.0 * dA, 3.0 * A),
        "dense / c": (dA / 4.0, A / 4.0),
        "-dense": (-dA, -A),
        "dense + diag": (dA + D1, A + torch.diag(d1)),
        "dense - dense": (dA - dS, A - S),
        "dense @ diag": (dA @ D1, A @ torch.diag(d1)),
        "dense @ dense": (dA @ dS, A @ S),
        "sum of products": (dA @ dS + 0.5 * (D1 @ dA), A @ S + 0.5 * torch.diag(d1) @ A),
        "adjoint": (dA.adjoint(), A.T),
        "adjoint of product": ((dA @ D1).adjoint(), (A @ torch.diag(d1)).T),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_operator_matches_dense(name):
    op, dense = _cases()[name]
    assert_matches_dense(op, dense)


def test_structured_operators_stay_structured():
    d = torch.rand(P, dtype=torch.float64)
    D = DiagonalOperator(SPACE, d)
    I = IdentityOperator(SPACE, dtype=torch.float64)
    assert type(D + D) is DiagonalOperator
    assert type(2 * D) is DiagonalOperator
    assert type(I + I) is IdentityOperator
    assert type(I * 3) is IdentityOperator
    assert type(I + D) is DiagonalOperator
    assert type(D + I) is DiagonalOperator
    dA = DenseOperator(SPACE, _rand(0))
    assert isinstance(dA + D, SumOperator)
    assert isinstance(2 * dA, ScaledOperator)
    assert isinstance(dA @ D, ProductOperator)


def test_scipy_solvers_run_on_to_scipy():
    S = random_spd(P, seed=7)
    op = DenseOperator(SPACE, S, self_adjoint=True)
    b = np.random.default_rng(0).standard_normal(P)
    x, info = spla.cg(op.to_scipy(), b, rtol=1e-12)
    assert info == 0
    np.testing.assert_allclose(x, np.linalg.solve(S.numpy(), b), rtol=1e-8)
    vals = spla.eigsh(op.to_scipy(), k=2, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(vals), np.linalg.eigvalsh(S.numpy())[-2:], rtol=1e-8)
    assert op.to_scipy(dtype=np.float32).dtype == np.float32


def test_inverse_of_diagonal_and_identity():
    d = torch.tensor([1.0, 2.0, 4.0] + [1.0] * (P - 3), dtype=torch.float64)
    D = DiagonalOperator(SPACE, d)
    torch.testing.assert_close(D.inverse(damping=1.0).diagonal(), 1 / (d + 1))
    I = IdentityOperator(SPACE, 2.0, dtype=torch.float64)
    assert I.inverse(damping=2.0).scale == 0.25


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_inverse_refuses_nonpositive_entries(bad):
    d = torch.ones(P, dtype=torch.float64)
    d[7] = bad  # p0 holds entries 0..5, so this is p1[1]
    with pytest.raises(ValueError, match="parameter 'p1', entry 1"):
        DiagonalOperator(SPACE, d).inverse()
    with pytest.raises(ValueError, match="must be positive"):
        IdentityOperator(SPACE, 0.0).inverse()


def test_to_dense_refuses_large_spaces():
    from curvmerge import ParamSpace

    big = ParamSpace(("w",), ((100_000,),))
    with pytest.raises(MemoryError, match="max_size"):
        IdentityOperator(big).to_dense()


def test_mismatched_spaces_and_shapes_are_refused():
    other = random_space(((3, 2), (5,), (2, 1, 2)))
    D = DiagonalOperator(SPACE, torch.ones(P))
    E = DiagonalOperator(other, torch.ones(other.size))
    with pytest.raises(SpaceMismatchError, match="'p1' has shape"):
        D + E
    with pytest.raises(ValueError, match=r"cannot multiply a tensor of shape \(3,\)"):
        D @ torch.ones(3)
    with pytest.raises(SpaceMismatchError, match="'p0' is missing"):
        D @ {"p1": torch.ones(4)}
    with pytest.raises(ValueError, match="diag must have shape"):
        DiagonalOperator(SPACE, torch.ones(P + 1))


def test_float32_operator_accepts_float64_input():
    D = DiagonalOperator(SPACE, torch.ones(P, dtype=torch.float32))
    y = D @ torch.ones(P, dtype=torch.float64)
    assert y.dtype == torch.float32


def test_block_diagonal_matches_dense():
    from curvmerge import BlockDiagonalOperator

    sub_a = SPACE.select(["p2", "p0"])  # keeps the space order: p0, p2
    S = random_spd(sub_a.size, seed=11)
    d = torch.rand(4, dtype=torch.float64)
    blocks = [
        DenseOperator(sub_a, S, self_adjoint=True),
        DiagonalOperator(SPACE.select(["p1"]), d),
    ]
    op = BlockDiagonalOperator(SPACE, blocks)
    dense = torch.zeros(P, P, dtype=torch.float64)
    idx_a = torch.cat([torch.arange(0, 6), torch.arange(10, 14)])
    dense[idx_a[:, None], idx_a[None, :]] = S
    dense[6:10, 6:10] = torch.diag(d)
    assert_matches_dense(op, dense)
    partial = BlockDiagonalOperator(SPACE, blocks[1:], fill=2.0)
    expected = 2.0 * torch.eye(P, dtype=torch.float64)
    expected[6:10, 6:10] = torch.diag(d)
    assert_matches_dense(partial, expected)
    with pytest.raises(SpaceMismatchError, match="'p1' is in block 0 and block 1"):
        BlockDiagonalOperator(SPACE, [blocks[1], blocks[1]])


def test_sum_of_operators_starts_from_zero_and_keeps_structure():
    cases = _cases()
    (D1, d1), (D2, d2) = cases["diagonal"], cases["diag + diag"]
    (I, eye), (dA, A) = cases["identity"], cases["dense"]
    assert 0 + D1 is D1 and D1 + 0 is D1 and D1 - 0 is D1
    assert type(sum([D1, D2])) is DiagonalOperator
    assert type(sum([I, I])) is IdentityOperator
    assert_matches_dense(sum([D1, D2]), d1 + d2)
    assert_matches_dense(sum([D1, I, dA]), d1 + eye + A)
    assert_matches_dense(sum([dA, D1], start=I), eye + A + d1)
    assert_matches_dense(0 - dA, -A)
    with pytest.raises(TypeError):
        1 + D1
    with pytest.raises(TypeError):
        D1 + 1.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_to_scipy_of_half_precision_operators_works_through_float32(dtype):
    S = random_spd(P, seed=16)
    op = DenseOperator(SPACE, S.to(dtype), self_adjoint=True)
    dense = S.to(dtype).double()  # the operator's own (rounded) matrix
    sp = op.to_scipy()
    assert sp.dtype == np.float32
    x = np.random.default_rng(1).standard_normal(P)
    X = np.random.default_rng(2).standard_normal((P, 3)).astype(np.float32)
    eps = torch.finfo(dtype).eps
    for got, want in [
        (sp @ x, dense.numpy() @ x),
        (sp.matmat(X), dense.numpy() @ X),
        (sp.rmatvec(x), dense.numpy().T @ x),
    ]:
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=0, atol=20 * eps * np.abs(want).max())
    y, info = spla.cg(sp, x, rtol=1e-2)
    assert info == 0
    np.testing.assert_allclose(y, np.linalg.solve(dense.numpy(), x), atol=0.1)
    assert op.to_scipy(dtype=np.float64).matvec(x).dtype == np.float64


@pytest.mark.parametrize("op_dtype", [torch.float64, torch.float32])
def test_dict_inputs_are_cast_like_tensor_inputs(op_dtype):
    from curvmerge import ParamSpace

    # The space records float32 parameters (as ParamSpace.of(model) does).
    typed = ParamSpace(SPACE.names, SPACE.shapes, (torch.float32,) * len(SPACE.names))
    S = random_spd(P, seed=17)
    op = DenseOperator(typed, S.to(op_dtype), self_adjoint=True)
    dense = S.to(op_dtype).double()
    x = torch.randn(P, generator=torch.Generator().manual_seed(18), dtype=torch.float64)
    dicts = {dtype: SPACE.unflatten(x.to(dtype)) for dtype in (torch.float64, torch.bfloat16)}
    dicts["mixed"] = {
        n: t.to(torch.float64 if i % 2 else torch.float32)
        for i, (n, t) in enumerate(SPACE.unflatten(x).items())
    }
    tol = 1e-12 if op_dtype == torch.float64 else 1e-5
    for d in dicts.values():
        vec = SPACE.flatten(d)  # the input as a tensor (mixed dtypes promote to float64)
        got = op @ d
        assert {v.dtype for v in got.values()} == {(op @ vec).dtype} == {op_dtype}
        torch.testing.assert_close(SPACE.flatten(got), op @ vec, rtol=0, atol=0)
        want = dense @ vec.double()
        assert float((SPACE.flatten(got).double() - want).norm() / want.norm()) < tol
