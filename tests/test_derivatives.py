"""The written-out derivatives of :mod:`curvmerge.operators.derivatives`: values equal
PyTorch's, and both derivatives pass ``gradcheck`` (finite differences, float64)."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from curvmerge.operators.derivatives import (
    CheapDoubleBackward,
    CheapForwardAD,
    _layer_norm,
    _Linear,
    _Softmax,
)

DT = torch.float64


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _check(fn, inputs):
    inputs = [t.requires_grad_(True) if isinstance(t, torch.Tensor) else t for t in inputs]
    assert torch.autograd.gradcheck(fn, inputs, check_forward_ad=True, check_backward_ad=True)


@pytest.mark.parametrize(
    "shape, weight, bias",
    [((4, 5, 3), True, True), ((4, 5, 3), True, False), ((4, 5, 3), False, False)],
    ids=["affine", "weight-only", "plain"],
)
def test_layer_norm_derivatives_and_values(shape, weight, bias):
    x = _randn(*shape) * 2 + 1
    w = _randn(shape[-1], seed=1) if weight else None
    b = _randn(shape[-1], seed=2) if bias else None
    assert torch.allclose(_layer_norm(x, shape[-1], w, b), F.layer_norm(x, shape[-1:], w, b))
    args = [t for t in (x, w, b) if t is not None]

    def fn(*a):
        it = iter(a)
        return _layer_norm(
            next(it), shape[-1], next(it) if weight else None, next(it) if bias else None
        )

    _check(fn, args)


def test_layer_norm_over_two_dimensions():
    x = _randn(3, 5, 4)
    w = _randn(5, 4, seed=1)
    assert torch.allclose(_layer_norm(x, (5, 4), w), F.layer_norm(x, (5, 4), w))
    _check(lambda a, b: _layer_norm(a, (5, 4), b), [x, w])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(6, 3), (2, 4, 3), (3,)], ids=["2d", "3d", "1d"])
def test_linear_derivatives_and_values(shape, bias):
    x, w = _randn(*shape), _randn(5, 3, seed=1)
    b = _randn(5, seed=2) if bias else None
    assert torch.allclose(_Linear.apply(x, w, b), F.linear(x, w, b))
    if bias:
        _check(lambda *a: _Linear.apply(*a), [x, w, b])
    else:
        _check(lambda a, c: _Linear.apply(a, c, None), [x, w])


def test_linear_tangent_of_some_inputs_only():
    """A tangent on the weight only (the first layer) or the input only (a frozen layer)."""
    x, w, b = _randn(4, 3), _randn(5, 3, seed=1), _randn(5, seed=2)
    tx, tw = _randn(4, 3, seed=3), _randn(5, 3, seed=4)
    for dual_x, dual_w, expected in [(True, False, tx @ w.T), (False, True, x @ tw.T)]:
        with fwAD.dual_level():
            xd = fwAD.make_dual(x, tx) if dual_x else x
            wd = fwAD.make_dual(w, tw) if dual_w else w
            tangent = fwAD.unpack_dual(_Linear.apply(xd, wd, b)).tangent
        assert torch.allclose(tangent, expected)


def test_softmax_derivatives_and_values():
    x = _randn(3, 4, 5) * 3
    x[0, 0, 2] = -1e9  # a masked entry, as attention masks make them
    assert torch.allclose(_Softmax.apply(x, -1), torch.softmax(x, -1))
    _check(lambda a: _Softmax.apply(a, 1), [_randn(3, 4, 5)])


def _calls(x, w, b):
    h = F.layer_norm(F.linear(x, w, b), (5,))
    outs = [F.softmax(h, dim=-1), torch.softmax(h, 1), h.softmax(-1), F.softmax(h, -1, dtype=DT)]
    return torch.cat([*outs, F.linear(h, w.T)], dim=-1)


@pytest.mark.parametrize("mode", [CheapForwardAD, CheapDoubleBackward])
def test_modes_give_pytorchs_values_and_derivatives(mode):
    x, w, b = _randn(4, 3), _randn(5, 3, seed=1), _randn(5, seed=2)
    tx, tw = _randn(4, 3, seed=3), _randn(5, 3, seed=4)
    g = _randn(4, 23, seed=5)
    results = []
    for routed in (False, True):
        with fwAD.dual_level():
            xd, wd = fwAD.make_dual(x, tx), fwAD.make_dual(w.requires_grad_(True), tw)
            if routed:
                with mode():
                    out = _calls(xd, wd, b)
            else:
                out = _calls(xd, wd, b)
            value, tangent = fwAD.unpack_dual(out)
        (grad,) = torch.autograd.grad(value, w, g)
        results.append((value, tangent, grad))
    for a, c in zip(*results, strict=True):
        assert torch.allclose(a, c, rtol=1e-10, atol=1e-12)


def test_forward_mode_routes_layer_norm_linear_and_softmax():
    x, w = _randn(4, 3).requires_grad_(True), _randn(5, 3, seed=1)
    with CheapForwardAD():
        h = F.linear(x, w)
        by_name = F.linear(input=x, weight=w, bias=None)
        outs = [h, F.layer_norm(h, (5,)), F.softmax(h, -1), h.softmax(-1), torch.softmax(h, 0)]
        kept = F.softmax(h, -1, dtype=DT)  # an explicit dtype keeps PyTorch's softmax
    names = [type(t.grad_fn).__name__ for t in outs]
    assert names == ["_LinearBackward", "_LayerNormBackward"] + ["_SoftmaxBackward"] * 3
    assert type(kept.grad_fn).__name__ == "SoftmaxBackward0"
    assert type(by_name.grad_fn).__name__ == "_LinearBackward" and torch.equal(by_name, h)
