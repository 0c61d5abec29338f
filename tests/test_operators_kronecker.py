"""KroneckerOperator against dense kron(B, A) matrices laid out by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvmerge import ParamSpace
from curvmerge.operators import DiagonalOperator, KroneckerOperator, SumOperator
from curvmerge.space import SpaceMismatchError
from curvmerge.statistics import input_grams
from tests.helpers import assert_matches_dense, random_spd

DT = torch.float64


def joint_index(space, weight, bias, d_out, d_in, transposed=False):
    """Flat index of every entry of the joint matrix [W b] (row-major), by hand."""
    sl = space.slices()
    w0 = sl[weight].start
    idx = []
    for o in range(d_out):
        for j in range(d_in):
            idx.append(w0 + (j * d_out + o if transposed else o * d_in + j))
        if bias is not None:
            idx.append(sl[bias].start + o)
    return torch.tensor(idx)


def dense_of(space, blocks):
    D = torch.zeros(space.size, space.size, dtype=DT)
    for A, B, weight, bias, d_out, d_in, tr in blocks:
        idx = joint_index(space, weight, bias, d_out, d_in, tr)
        B = torch.eye(d_out, dtype=DT) if B is None else B
        D[idx[:, None], idx[None, :]] = torch.kron(B, A)
    return D


SPACE = ParamSpace(
    ("conv.w", "conv.b", "skip", "hf.w", "lin.w", "lin.b"),
    ((3, 2, 2, 1), (3,), (4,), (2, 3), (2, 3), (2,)),
)


def _blocks(seed=0):
    return [
        (random_spd(5, seed), random_spd(3, seed + 1), "conv.w", "conv.b", 3, 4, False),
        (random_spd(2, seed + 2), random_spd(3, seed + 3), "hf.w", None, 3, 2, True),
        (random_spd(4, seed + 4), None, "lin.w", "lin.b", 2, 3, False),
    ]


def _operator(blocks):
    return KroneckerOperator(
        SPACE, {f"l{i}": (A, B, w, b, tr) for i, (A, B, w, b, _, _, tr) in enumerate(blocks)}
    )


def test_matches_dense_kronecker_layout():
    blocks = _blocks()
    K = _operator(blocks)
    D = dense_of(SPACE, blocks)
    assert D[SPACE.slices()["skip"]].abs().sum() == 0  # uncovered: zero
    assert_matches_dense(K, D)
    assert K.dtype == DT and K.SELF_ADJOINT
    assert_matches_dense(
        K + DiagonalOperator(SPACE, torch.ones(SPACE.size, dtype=DT)),
        D + torch.eye(SPACE.size, dtype=DT),
    )
    S = K + _operator(_blocks(7))
    assert isinstance(S, SumOperator)
    assert_matches_dense(S, D + dense_of(SPACE, _blocks(7)))
    K32 = K.to(dtype=torch.float32)
    assert K32.dtype == torch.float32
    torch.testing.assert_close(K32.to_dense(), D.float())


def test_from_grams_is_regmean_with_identity_output_factor():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2, bias=False)).double()
    g = input_grams(model, [(torch.randn(6, 3, dtype=DT), torch.zeros(6))])
    space = ParamSpace.from_module(model)
    K = KroneckerOperator.from_grams(space, g)
    D = dense_of(
        space,
        [
            (g.grams["0"], None, "0.weight", "0.bias", 2, 3, False),
            (g.grams["2"], None, "2.weight", None, 2, 2, False),
        ],
    )
    assert_matches_dense(K, D)
    # M -> M G: the gradient of the RegMean objective 1/2 sum_r |M x_r|^2 w.r.t. M
    W = torch.randn(2, 3, dtype=DT)
    b = torch.randn(2, dtype=DT)
    x = torch.zeros(space.size, dtype=DT)
    x[:6], x[6:8] = W.reshape(-1), b
    y = K @ x
    torch.testing.assert_close(
        torch.cat([y[:6].view(2, 3), y[6:8, None]], 1), torch.cat([W, b[:, None]], 1) @ g.grams["0"]
    )


def test_bad_blocks_are_refused():
    A, B = random_spd(4), random_spd(2)
    with pytest.raises(ValueError, match=r"block 'x': factor A must have shape \(4, 4\)"):
        KroneckerOperator(SPACE, {"x": (random_spd(3), B, "lin.w", "lin.b")})
    with pytest.raises(ValueError, match=r"factor B must have shape \(2, 2\)"):
        KroneckerOperator(SPACE, {"x": (A, random_spd(3), "lin.w", "lin.b")})
    with pytest.raises(SpaceMismatchError, match="'nope' is not in the space"):
        KroneckerOperator(SPACE, {"x": (A, B, "nope", None)})
    with pytest.raises(SpaceMismatchError, match="in block 'x' and block 'y'"):
        KroneckerOperator(SPACE, {"x": (A, B, "lin.w", "lin.b"), "y": (A, B, "lin.w", "lin.b")})
    with pytest.raises(ValueError, match=r"bias 'skip' has shape \(4,\), expected \(2,\)"):
        KroneckerOperator(SPACE, {"x": (A, B, "lin.w", "skip")})
    with pytest.raises(TypeError, match="must be a KroneckerBlock or a tuple"):
        KroneckerOperator(SPACE, {"x": A})


def test_from_grams_restricted_to_a_smaller_space():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2)).double()
    g = input_grams(model, [(torch.randn(6, 3, dtype=DT), torch.zeros(6))])
    full = KroneckerOperator.from_grams(ParamSpace.from_module(model), g).to_dense()
    space = ParamSpace.from_module(model).select(["0.weight", "2.weight", "2.bias"])
    K = KroneckerOperator.from_grams(space, g)
    keep = torch.cat([torch.arange(6), torch.arange(8, 14)])  # 0.bias dropped
    torch.testing.assert_close(K.to_dense(), full[keep[:, None], keep[None, :]])
    with pytest.raises(ValueError, match="no layer of the statistics has its weight"):
        KroneckerOperator.from_grams(ParamSpace.from_module(model).select(["0.bias"]), g)
