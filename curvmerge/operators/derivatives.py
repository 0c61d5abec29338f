"""Layer norm, linear and softmax with their derivatives written out, for the GGN products.

PyTorch's general derivative formulas are correct but do more work than a GGN product needs:

- the double backward of ``native_layer_norm_backward`` forms every second-order term, while
  the cached product only differentiates a layer norm's backward with respect to its output
  gradient (a linear map, :class:`_LayerNormGrad`);
- the forward-mode (dual-number) rules of ``layer_norm`` and ``softmax`` run through
  decompositions with clones and extra passes, and the rule of ``addmm`` adds three separate
  terms; written out, a linear layer's tangent :math:`\\dot x W^\\top + x \\dot W^\\top +
  \\dot b` is one matrix product accumulated onto another (``addmm_``).

:class:`CheapDoubleBackward` routes ``layer_norm`` through :class:`_LayerNorm` while the
cached graphs are recorded; :class:`CheapForwardAD` routes ``layer_norm``, ``linear`` and
``softmax`` through functions with a ``jvp`` while a streamed product's dual-number forward
pass runs. Each function computes the same values as PyTorch's (its forward calls PyTorch's
kernel) and its derivatives are exact; ``tests/test_ggn.py`` checks the products against
dense float64 GGNs with and without these routes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CheapDoubleBackward", "CheapForwardAD"]


# ---------------------------------------------------------------------------- layer norm
def _layer_norm_grads(g, xhat, rstd, weight, dims, lead):
    """:math:`(\\partial_x, \\partial_w, \\partial_b)` of a layer norm from the output
    gradient ``g`` (see :class:`_LayerNormGrad`); absent affine terms give empty tensors."""
    gh = g if weight is None else g * weight
    gx = rstd * (gh - gh.mean(dims, keepdim=True) - xhat * (gh * xhat).mean(dims, keepdim=True))
    empty = g.new_zeros(0)
    gw = empty if weight is None else (g * xhat).sum(lead)
    gb = g.sum(lead)
    return gx, gw, gb


def _layer_norm_jvp(tx, tw, tb, xhat, rstd, weight, dims):
    """:math:`\\dot y = w \\odot r\\,\\Pi(\\dot x) + \\hat x \\odot \\dot w + \\dot b` (see
    :class:`_LayerNormGrad` for :math:`\\Pi`); ``None`` tangents are zero."""
    out = None
    if tx is not None:
        a = tx * rstd
        out = a - a.mean(dims, keepdim=True) - xhat * (a * xhat).mean(dims, keepdim=True)
        if weight is not None:
            out = out * weight
    if tw is not None and tw.numel():
        out = xhat * tw if out is None else out.addcmul_(xhat, tw)
    if tb is not None and tb.numel():
        out = tb.expand_as(xhat).clone() if out is None else out.add_(tb)
    return torch.zeros_like(xhat) if out is None else out


class _LayerNormGrad(torch.autograd.Function):
    """The linear map :math:`g \\mapsto (\\partial_x, \\partial_w, \\partial_b)` of a layer
    norm's backward, with its transpose written out as its backward.

    For :math:`\\hat x = (x - \\mu)\\, r` (:math:`r` the inverse standard deviation of each row,
    :math:`N` entries normalised) the backward of :math:`y = w \\odot \\hat x + b` is

    .. math::

        \\partial_x = r\\, \\Pi(w \\odot g), \\qquad
        \\partial_w = \\textstyle\\sum \\hat x \\odot g, \\qquad \\partial_b = \\textstyle\\sum g,

        \\Pi(z) = z - \\tfrac1N \\mathbf 1 \\mathbf 1^\\top z - \\tfrac1N \\hat x \\hat x^\\top z,

    and :math:`\\Pi` is symmetric, so the transpose (what a Jacobian-vector product by double
    backward needs) is :math:`(\\dot x, \\dot w, \\dot b) \\mapsto w \\odot r\\,\\Pi(\\dot x) +
    \\hat x \\odot \\dot w + \\dot b` -- the layer norm's own Jacobian-vector product. A dozen
    elementwise operations, where PyTorch's general double backward of
    ``native_layer_norm_backward`` forms every second-order term and costs far more. Only the
    dependence on :math:`g` is differentiable: the operator differentiates its stored graphs
    with respect to the cotangent only.
    """

    @staticmethod
    def forward(ctx, g, xhat, rstd, weight, dims, lead):
        ctx.save_for_backward(xhat, rstd, weight)
        ctx.dims = dims
        return _layer_norm_grads(g, xhat, rstd, weight, dims, lead)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dgx, dgw, dgb):
        xhat, rstd, weight = ctx.saved_tensors
        out = _layer_norm_jvp(dgx, dgw, dgb, xhat, rstd, weight, ctx.dims)
        return out, None, None, None, None, None


class _LayerNorm(torch.autograd.Function):
    """``torch.nn.functional.layer_norm`` (PyTorch's kernel forward) whose backward, when
    recorded with ``create_graph``, has the cheap double backward of :class:`_LayerNormGrad`,
    and whose forward-mode derivative is :func:`_layer_norm_jvp`."""

    @staticmethod
    def forward(ctx, x, shape, weight, bias, eps):
        ctx.set_materialize_grads(False)
        out, mean, rstd = torch.native_layer_norm(x, shape, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.save_for_forward(x, weight, mean, rstd)
        ctx.has_bias = bias is not None
        ctx.nd = len(shape)
        return out

    @staticmethod
    def _xhat(ctx):
        x, weight, mean, rstd = ctx.saved_tensors
        dims = tuple(range(x.ndim - ctx.nd, x.ndim))
        lead = tuple(range(x.ndim - ctx.nd))
        with torch.no_grad():
            xhat = (x - mean) * rstd
        return xhat, rstd, weight, dims, lead

    @staticmethod
    def backward(ctx, g):
        if g is None:
            return None, None, None, None, None
        xhat, rstd, weight, dims, lead = _LayerNorm._xhat(ctx)
        if torch.is_grad_enabled():
            gx, gw, gb = _LayerNormGrad.apply(g, xhat, rstd, weight, dims, lead)
        else:
            gx, gw, gb = _layer_norm_grads(g, xhat, rstd, weight, dims, lead)
        return (
            gx,
            None,
            gw if weight is not None else None,
            gb if ctx.has_bias else None,
            None,
        )

    @staticmethod
    def jvp(ctx, tx, _shape, tw, tb, _eps):
        xhat, rstd, weight, dims, _ = _LayerNorm._xhat(ctx)
        return _layer_norm_jvp(tx, tw, tb, xhat, rstd, weight, dims)


def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    return _LayerNorm.apply(input, list(shape), weight, bias, eps)


# ---------------------------------------------------------------------------- linear
class _Linear(torch.autograd.Function):
    """:math:`y = x W^\\top + b` with the tangent :math:`\\dot y = \\dot x W^\\top + x
    \\dot W^\\top + \\dot b` formed by one ``addmm`` accumulated onto another."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight)
        ctx.save_for_forward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        gx = gw = gb = None
        if g is None:
            return gx, gw, gb
        rows = g.reshape(-1, g.shape[-1])
        if ctx.needs_input_grad[0]:
            gx = g @ weight
        if ctx.needs_input_grad[1]:
            gw = rows.T @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = rows.sum(0)
        return gx, gw, gb

    @staticmethod
    def jvp(ctx, tx, tw, tb):
        x, weight = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        out = None
        if tw is not None:
            out = x2 @ tw.T if tb is None else torch.addmm(tb, x2, tw.T)
        if tx is not None:
            tx2 = tx.reshape(-1, x.shape[-1])
            out = tx2 @ weight.T if out is None else out.addmm_(tx2, weight.T)
        if out is None:
            out = x2.new_zeros(x2.shape[0], weight.shape[0])
        if tb is not None and tw is None:
            out = out + tb
        return out.reshape(*x.shape[:-1], weight.shape[0])


# ---------------------------------------------------------------------------- softmax
class _Softmax(torch.autograd.Function):
    """:math:`y = \\operatorname{softmax}(x)` along ``dim``; both derivatives are
    :math:`z \\mapsto y \\odot (z - \\langle y, z \\rangle)` (the Jacobian is symmetric)."""

    @staticmethod
    def forward(ctx, x, dim):
        y = torch.softmax(x, dim)
        ctx.save_for_backward(y)
        ctx.save_for_forward(y)
        ctx.dim = dim
        return y

    @staticmethod
    def _apply_jacobian(ctx, z):
        (y,) = ctx.saved_tensors
        yz = y * z
        return yz.sub_(y * yz.sum(ctx.dim, keepdim=True))

    @staticmethod
    def backward(ctx, g):
        return _Softmax._apply_jacobian(ctx, g), None

    @staticmethod
    def jvp(ctx, tx, _dim):
        return _Softmax._apply_jacobian(ctx, tx)


def _softmax_call(func, args, kwargs):
    """The ``(input, dim)`` of a plain softmax call (``F.softmax``, ``torch.softmax``,
    ``Tensor.softmax``), or ``None`` for one with a ``dtype`` or an implicit dimension."""
    names = ("input", "dim", "_stacklevel", "dtype") if func is F.softmax else ("input", "dim")
    bound = dict(zip(names, args, strict=False))
    bound.update(kwargs)
    if func is not F.softmax and len(args) > 2:
        bound["dtype"] = args[2]
    x, dim = bound.get("input"), bound.get("dim")
    if bound.get("dtype") is not None or dim is None or not isinstance(x, Tensor):
        return None
    return x, dim


_SOFTMAXES = (F.softmax, torch.softmax, Tensor.softmax)


# ---------------------------------------------------------------------------- modes
class CheapDoubleBackward(torch.overrides.TorchFunctionMode):
    """Route ``layer_norm`` through :class:`_LayerNorm` while a batch's graphs are built."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.layer_norm:
            return _layer_norm(*args, **kwargs)
        return func(*args, **kwargs)


class CheapForwardAD(torch.overrides.TorchFunctionMode):
    """Route ``layer_norm``, ``linear`` and ``softmax`` through functions with written-out
    forward-mode derivatives while a dual-number forward pass runs."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.layer_norm:
            return _layer_norm(*args, **kwargs)
        if func is F.linear:
            bound = dict(zip(("input", "weight", "bias"), args, strict=False), **kwargs)
            return _Linear.apply(bound["input"], bound["weight"], bound.get("bias"))
        if func in _SOFTMAXES:
            call = _softmax_call(func, args, kwargs)
            if call is not None:
                return _Softmax.apply(*call)
        return func(*args, **kwargs)
