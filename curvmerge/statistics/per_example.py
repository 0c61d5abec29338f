"""Per-example squared gradients from layer inputs and output gradients.

A layer :math:`y_t = W a_t + b` applied at positions :math:`t` of example :math:`n`
(tokens, pixels) has the per-example gradient

.. math::

    \\nabla_W \\ell_n = \\sum_t \\delta_{nt} a_{nt}^\\top, \\qquad
    \\nabla_b \\ell_n = \\sum_t \\delta_{nt}, \\qquad
    \\delta_{nt} = \\partial \\ell_n / \\partial y_{nt}.

The engine captures :math:`a` with forward hooks, obtains :math:`\\delta` for every layer
with one ``torch.autograd.grad`` call per output cotangent (the weight gradients of the batch
are never formed), and accumulates :math:`\\sum_n (\\nabla \\ell_n)^{\\odot 2}`. Without
positions, the square is :math:`(\\delta^{\\odot 2})^\\top (a^{\\odot 2})` (Goodfellow,
"Efficient per-example gradient computations", 2015); with positions, the sum over
:math:`t` is formed first (in chunks of examples that respect a memory budget) and then
squared, because squaring per position is a different quantity. The same construction
underlies BackPACK (Dangel, Kunstner & Hennig, "BackPACK: Packing more into backprop",
ICLR 2020), which however covers only plain layers of ``nn.Sequential`` models.

Supported layers: ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Embedding``,
``nn.LayerNorm``, ``nn.RMSNorm`` and the ``Conv1D`` layer of Hugging Face GPT-2. Any other
parameter is handled by the nearest module that holds it and was called on the batch, with
``torch.func``: ``vmap`` over examples of the module's vector-Jacobian product. Parameters
used by several calls (a layer applied twice, tied embeddings) get their per-example
gradients summed over the calls before squaring.

The batch axis of every tensor a layer sees is traced, not guessed from its shape: a probe
run on two or three examples records the shapes, and the batch axis is the one axis whose size
follows the number of examples (``[T, B, D]`` in sequence-first layers, even when
:math:`T = B`). Calls where no such axis exists (sizes that change otherwise) are handled
by an enclosing module, or refused with the module's name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvmerge.batches import batch_size

__all__ = ["PerExampleSquares", "supported_layer", "conv_patches"]

DEFAULT_MEMORY_BUDGET = 2**30


def _is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's GPT-2 ``Conv1D``: :math:`y = x W + b` with ``W`` of shape ``[in, out]``."""
    return (
        type(module).__name__ == "Conv1D"
        and hasattr(module, "nf")
        and isinstance(getattr(module, "weight", None), Tensor)
        and module.weight.ndim == 2
    )


def supported_layer(module: nn.Module) -> str | None:
    """Name of the closed-form handler for ``module`` (``None``: ``torch.func`` fallback)."""
    if isinstance(module, nn.Linear):
        return "linear"
    if _is_hf_conv1d(module):
        return "hf_conv1d"
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return "conv"
    if isinstance(module, nn.Embedding) and not module.scale_grad_by_freq:
        return "embedding"
    if isinstance(module, nn.LayerNorm):
        return "layer_norm"
    if hasattr(nn, "RMSNorm") and isinstance(module, nn.RMSNorm):
        return "rms_norm"
    return None


# --------------------------------------------------------------------------- handlers
# Every handler gets the layer input ``x`` and output gradient ``d`` of a chunk of examples
# (batch dimension first) and returns ``{local parameter name: [b, *shape]}`` for the
# requested names; ``*_sq`` variants return the sum over examples of the squares directly.


def _linear_per_example(module, x, d, names, transpose=False):
    b = x.shape[0]
    x = x.reshape(b, -1, x.shape[-1])
    d = d.reshape(b, -1, d.shape[-1])
    out = {}
    if "weight" in names:
        eq = "bto,bti->bio" if transpose else "bto,bti->boi"
        out["weight"] = torch.einsum(eq, d, x)
    if "bias" in names:
        out["bias"] = d.sum(1)
    return out


def _linear_sq_into(engine, module, x, d, accs, scale, transpose=False, reps=1):
    """Add the squares of a linear layer's per-example gradients to ``accs``.

    One position per example: Goodfellow's :math:`(\\delta^{\\odot 2})^\\top a^{\\odot 2}`.
    Several: per-example gradients of a chunk of examples, formed by one batched matrix
    product into a reused buffer (as costly as the layer's weight gradient), squared in place
    and summed over examples by one matrix-vector product (few, large kernels).
    """
    b = x.shape[0]
    x = x.reshape(b, -1, x.shape[-1])
    d = d.reshape(reps, b, -1, d.shape[-1])  # ``reps`` output cotangents of the same inputs
    if "bias" in accs:
        accs["bias"].add_(d.sum(2).square().sum((0, 1)), alpha=scale)
    if "weight" not in accs:
        return
    acc = accs["weight"]
    if x.shape[1] == 1:
        x2, d2 = x[:, 0].square(), d[:, :, 0].square().sum(0)
        if transpose:
            acc.addmm_(x2.T, d2, alpha=scale)
        else:
            acc.addmm_(d2.T, x2, alpha=scale)
        return
    numel = acc.numel()
    chunk = max(1, min(b, engine.memory_budget // max(1, numel * acc.element_size())))
    buf = engine.workspace(chunk * numel, acc.dtype, acc.device)
    for r in range(reps):
        for lo in range(0, b, chunk):
            hi = min(b, lo + chunk)
            G = buf[: (hi - lo) * numel].view(hi - lo, *acc.shape)
            if transpose:
                torch.bmm(x[lo:hi].transpose(1, 2), d[r, lo:hi], out=G)
            else:
                torch.bmm(d[r, lo:hi].transpose(1, 2), x[lo:hi], out=G)
            G.square_()
            ones = torch.ones(1, hi - lo, dtype=acc.dtype, device=acc.device)
            acc.view(1, -1).addmm_(ones, G.view(hi - lo, -1), alpha=scale)


def _conv_padded(module, x):
    """The convolution's input with its padding applied."""
    if isinstance(module.padding, str) or module.padding_mode != "zeros":
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        return F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    pad = []
    for p in reversed(module.padding):
        pad += [p, p]
    return F.pad(x, pad) if any(pad) else x


def conv_patches(module, x):
    """The convolution's input patches ``[b, groups, in_channels / groups * prod(kernel),
    positions]`` (``F.unfold`` of the padded input; a ``Conv1d`` is a ``Conv2d`` of height 1)."""
    b = x.shape[0]
    xp = _conv_padded(module, x)
    if isinstance(module, nn.Conv1d):
        xp = xp.unsqueeze(2)
        ks, dil, st = (1, *module.kernel_size), (1, *module.dilation), (1, *module.stride)
    else:
        ks, dil, st = module.kernel_size, module.dilation, module.stride
    u = F.unfold(xp, ks, dilation=dil, stride=st)
    return u.view(b, module.groups, -1, u.shape[-1])


def _conv_grouped(module, x, d, reps=1):
    """Per-example, per-cotangent convolution weight gradients as one grouped convolution over
    (example, group) pairs: the output gradients of an example are the kernels, the forward
    stride becomes the dilation and vice versa (Rochette, Manoel & Tramel, "Efficient
    per-example gradient computations in convolutional neural networks", 2019). The ``reps``
    cotangents in ``d`` (``[reps * b, out_channels, *positions]``) are extra output channels
    of the same group, so every cotangent shares the example's input (no copy per cotangent).

    Returns ``[in_channels / groups, b, groups, reps, out_channels / groups, *kernel_size]``.
    """
    b = x.shape[0]
    g = module.groups
    co = module.out_channels // g
    one_d = isinstance(module, nn.Conv1d)
    conv = F.conv1d if one_d else F.conv2d
    xp = _conv_padded(module, x)
    spatial = xp.shape[2:]
    cin_g = module.in_channels // g
    xg = xp.reshape(b, g, cin_g, *spatial).movedim(2, 0).reshape(cin_g, b * g, *spatial)
    pos = d.shape[2:]
    kernel = d.reshape(reps, b, g, co, *pos).movedim(0, 2).reshape(b * g * reps * co, 1, *pos)
    w = conv(xg, kernel, stride=module.dilation, dilation=module.stride, groups=b * g)
    ks = module.kernel_size
    w = w[(..., slice(0, ks[0])) if one_d else (..., slice(0, ks[0]), slice(0, ks[1]))]
    return w.reshape(cin_g, b, g, reps, co, *ks)


def _conv_per_example(module, x, d, names):
    """Per-example convolution gradients (weight by :func:`_conv_grouped`)."""
    out = {}
    if "weight" in names:
        w = _conv_grouped(module, x, d)[:, :, :, 0]  # [cin_g, b, g, co, *ks]
        out["weight"] = w.movedim(0, 3).reshape(x.shape[0], *module.weight.shape)
    if "bias" in names:
        out["bias"] = d.flatten(2).sum(-1)
    return out


# A matrix product per (example, group) beats the grouped convolution once both its output
# dimensions are this large (measured on CPU: conv 16->32, 5x5, 14x14 with 9 cotangents).
_UNFOLD_MIN_DIM = 64


def _conv_sq_into(engine, module, x, d, accs, scale, reps=1):
    """Add the squares of a convolution's per-example gradients to ``accs``.

    ``d`` stacks ``reps`` output cotangents of the same inputs ``[reps * b, ...]``; every
    cotangent shares the example's input (never copied per cotangent) and is squared on its
    own. Two contractions, chosen by shape: the grouped convolution of
    :func:`_conv_grouped`, or the input unfolded once per chunk of examples and one matrix
    product :math:`[\\delta_{n,1}; \\dots; \\delta_{n,R}]\\, U_n^\\top` per (example, group),
    when both its dimensions are large enough to run at matrix-product speed.
    """
    b = x.shape[0]
    g = module.groups
    co = module.out_channels // g
    d = d.reshape(reps, b, module.out_channels, *d.shape[2:])
    if "bias" in accs:
        accs["bias"].add_(d.flatten(3).sum(3).square().sum((0, 1)), alpha=scale)
    if "weight" not in accs:
        return
    acc = accs["weight"]
    numel = acc.numel()
    k = numel // module.out_channels  # in_channels / groups * prod(kernel_size)
    unfold = reps * co >= _UNFOLD_MIN_DIM and k >= _UNFOLD_MIN_DIM
    # bytes per example: the gradients of all cotangents, a copy of the (unfolded) input and
    # of the output gradients
    per = reps * numel + x[0].numel() * (k // (module.in_channels // g) if unfold else 2)
    per += reps * d[0, 0].numel()
    chunk = max(1, min(b, engine.memory_budget // max(1, per * acc.element_size())))
    ones = torch.ones(1, chunk, dtype=acc.dtype, device=acc.device)
    for lo in range(0, b, chunk):
        hi = min(b, lo + chunk)
        c = hi - lo
        if not unfold:
            w = _conv_grouped(module, x[lo:hi], d[:, lo:hi].reshape(reps * c, *d.shape[2:]), reps)
            s = w.square().sum((1, 3))  # [cin_g, g, co, *ks]
            acc.add_(s.movedim(0, 2).reshape(acc.shape), alpha=scale)
            continue
        u = conv_patches(module, x[lo:hi])  # [c, g, k, L]
        # [R, c, g, co, L] -> [c, g, R * co, L]: the cotangents share the patches
        dd = d[:, lo:hi].reshape(reps, c, g, co, -1).permute(1, 2, 0, 3, 4)
        dd = dd.reshape(c, g, reps * co, -1)
        G = engine.workspace(c * reps * numel, acc.dtype, acc.device)[: c * reps * numel]
        G = G.view(c, g, reps * co, k)
        torch.matmul(dd, u.transpose(-1, -2), out=G)
        G.square_()
        s = torch.mm(ones[:, :c], G.view(c, -1)).view(g, reps, co, k).sum(1)
        acc.add_(s.view(acc.shape), alpha=scale)


def _embedding_per_example(module, x, d, names):
    b = x.shape[0]
    V, D = module.weight.shape
    ids = x.reshape(b, -1)
    d = d.reshape(b, -1, D)
    rows = torch.arange(b, device=ids.device).unsqueeze(1).expand_as(ids)
    keep = ids != module.padding_idx if module.padding_idx is not None else None
    out = torch.zeros(b, V, D, dtype=d.dtype, device=d.device)
    if keep is not None:
        out.index_put_((rows[keep], ids[keep]), d[keep], accumulate=True)
    else:
        out.index_put_((rows.reshape(-1), ids.reshape(-1)), d.reshape(-1, D), accumulate=True)
    return {"weight": out}


def _embedding_sq_into(engine, module, x, d, accs, scale):
    """Sum per example over the positions holding the same token, square, and add into the
    rows that occur in the batch only."""
    b = x.shape[0]
    V, D = module.weight.shape
    ids = x.reshape(-1)
    d = d.reshape(-1, D)
    key = torch.arange(b, device=ids.device).repeat_interleave(ids.numel() // b) * V + ids
    if module.padding_idx is not None:
        keep = ids != module.padding_idx
        key, d = key[keep], d[keep]
    uniq, inv = torch.unique(key, return_inverse=True)
    summed = torch.zeros(uniq.numel(), D, dtype=d.dtype, device=d.device).index_add_(0, inv, d)
    accs["weight"].index_add_(0, uniq % V, summed.square(), alpha=scale)


def _norm_per_example(module, x, d, names, rms=False):
    b = x.shape[0]
    shape = tuple(module.normalized_shape)
    if rms:
        xhat = F.rms_norm(x, shape, None, module.eps)
    else:
        xhat = F.layer_norm(x, shape, None, None, module.eps)
    out = {}
    if "weight" in names:
        out["weight"] = (d * xhat).reshape(b, -1, *shape).sum(1)
    if "bias" in names:
        out["bias"] = d.reshape(b, -1, *shape).sum(1)
    return out


_PER_EXAMPLE = {
    "linear": _linear_per_example,
    "hf_conv1d": lambda m, x, d, n: _linear_per_example(m, x, d, n, transpose=True),
    "conv": _conv_per_example,
    "embedding": _embedding_per_example,
    "layer_norm": _norm_per_example,
    "rms_norm": lambda m, x, d, n: _norm_per_example(m, x, d, n, rms=True),
}

_SQ_INTO = {
    "linear": _linear_sq_into,
    "conv": _conv_sq_into,
    "hf_conv1d": lambda e, m, x, d, a, s, reps=1: _linear_sq_into(
        e, m, x, d, a, s, transpose=True, reps=reps
    ),
    "embedding": lambda e, m, x, d, a, s, reps=1: _embedding_sq_into(
        e, m, x.repeat(reps, *[1] * (x.ndim - 1)), d, a, s
    ),
}


# --------------------------------------------------------------------------- fallback
def _tensors_of(obj) -> list[Tensor | None]:
    """Floating tensors of a module output (tensor, tuple/list, mapping), in a fixed order;
    ``None`` keeps the place of anything else."""
    if isinstance(obj, Tensor):
        return [obj if obj.is_floating_point() else None]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _tensors_of(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _tensors_of(v)]
    return [None]


def _fallback_per_example(module, call, d_list, names, lo, hi):
    """Per-example gradients of ``module``'s own parameters ``names`` for examples
    ``lo:hi``, by ``vmap`` over examples of a ``torch.func.vjp`` of the module. Every
    batched input and output gradient is cut along its own traced batch axis, and each
    example keeps a batch axis of size one there (the module sees its usual layout).
    Modules whose kernels have no batching rule (``nn.LSTM``, ``nn.GRU``: fused over the
    batch) are run one example at a time instead."""
    from torch.func import functional_call, vjp, vmap

    params = {n: module.get_parameter(n).detach() for n in names}
    args, kwargs = call.args, call.kwargs
    keys = [("a", i) for i in range(len(args))] + [("k", k) for k in kwargs]
    values = list(args) + list(kwargs.values())

    def cut(v, axis):
        return v.detach().narrow(axis, lo, hi - lo).unsqueeze(axis + 1)

    where = [i for i, a in enumerate(call.arg_axes) if a is not None]
    batched = [cut(values[i], call.arg_axes[i]) for i in where]
    active = [i for i, t in enumerate(call.outputs) if t is not None]
    deltas = [cut(d_list[i], call.out_axes[i]) for i in active]
    in_dims = ([call.arg_axes[i] for i in where], [call.out_axes[i] for i in active])
    consts = [v.detach() if isinstance(v, Tensor) else v for v in values]

    def one(bvals, bdeltas):
        vals = list(consts)
        for i, v in zip(where, bvals, strict=True):
            vals[i] = v
        a = tuple(v for (kind, _), v in zip(keys, vals, strict=True) if kind == "a")
        kw = {k: v for (kind, k), v in zip(keys, vals, strict=True) if kind == "k"}

        def f(p):
            outs = _tensors_of(functional_call(module, p, a, kw))
            return tuple(outs[i] for i in active)

        _, pullback = vjp(f, params)
        return pullback(tuple(bdeltas))[0]

    try:
        return vmap(one, in_dims=in_dims)(batched, deltas)
    except (RuntimeError, NotImplementedError):
        pass  # no batching rule for some kernel: a loop over the examples computes the same
    grads = []
    for e in range(hi - lo):
        bvals = [v.select(axis, e) for v, axis in zip(batched, in_dims[0], strict=True)]
        bdeltas = [d.select(axis, e) for d, axis in zip(deltas, in_dims[1], strict=True)]
        grads.append(one(bvals, bdeltas))
    return {n: torch.stack([g[n] for g in grads]) for n in names}


# --------------------------------------------------------------------------- batch axes
def _probe_inputs(inputs, batch: int):
    """The probe sub-batch, copied from every tensor of ``inputs`` along its first axis:
    two examples (the first and second; the first twice for a batch of one), three for a
    batch of two (the probe size must differ from the batch size). Never one: a size-1 axis
    is squeezed and broadcast by models where a batch axis is not. Copies, so that a model
    that changes its input in place changes neither the batch nor the user's data."""
    index = [0, 1] if batch > 2 else ([0, 1, 0] if batch == 2 else [0, 0])

    def cut(v):
        if not isinstance(v, Tensor) or v.ndim == 0:
            return v
        return v[torch.tensor(index, device=v.device)]

    if isinstance(inputs, Mapping):
        return {k: cut(v) for k, v in inputs.items()}
    return cut(inputs)


def _shapes(args, kwargs, output) -> tuple[list, list]:
    """Shapes of a call's inputs (positional, then keyword) and floating outputs."""
    values = list(args) + list(kwargs.values())
    ins = [tuple(v.shape) if isinstance(v, Tensor) else None for v in values]
    outs = [tuple(t.shape) if t is not None else None for t in _tensors_of(output)]
    return ins, outs


def _trace_axis(real, probe, batch: int, size: int) -> tuple[int | None, str | None]:
    """The batch axis of a tensor of shape ``real`` in a batch of ``batch`` examples and of
    shape ``probe`` in the probe of ``size`` examples: the one axis of sizes ``batch`` and
    ``size``, all others equal.

    Returns ``(axis, None)``; ``(None, None)`` for equal shapes (the tensor does not depend
    on the examples: it is broadcast); ``(None, reason)`` when no axis is the batch axis.
    """
    if probe is None:
        return None, "has no counterpart in the probe run"
    real, probe = tuple(real), tuple(probe)
    diff = [i for i, (r, q) in enumerate(zip(real, probe, strict=False)) if r != q]
    if len(real) == len(probe):
        if not diff:
            return None, None
        if len(diff) == 1 and real[diff[0]] == batch and probe[diff[0]] == size:
            return diff[0], None
    return None, (
        f"has shape {list(real)} for {batch} example(s) but {list(probe)} for {size}: "
        "no single axis follows the number of examples"
    )


# --------------------------------------------------------------------------- engine
@dataclass(eq=False)
class _Call:
    module_name: str
    batch: int
    x: Tensor | None = None  # input of a supported layer
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    outputs: list = field(default_factory=list)  # floating output tensors (or None)
    versions: list = field(default_factory=list)
    x_version: int | None = None
    # traced batch axes (None: not batched) of ``x``, of ``args`` then ``kwargs`` values,
    # and of ``outputs``; ``problem`` says why the call cannot give per-example gradients
    x_axis: int | None = 0
    arg_axes: list = field(default_factory=list)
    out_axes: list = field(default_factory=list)
    problem: str | None = None

    def is_batched(self) -> bool:
        return self.problem is None

    def batch_first_x(self) -> Tensor:
        """The input of a supported layer, detached, examples along the first axis."""
        return self.x.detach().movedim(self.x_axis, 0)


def _trace_layer(call: _Call, kind: str, outs, rec, size: int) -> bool:
    """Trace the batch axes of a supported layer's call (``call.x`` and its one output).
    Returns whether the call is a broadcast one with a leading axis of one (position ids
    ``[1, T]``), to be expanded to the batch."""
    B = call.batch
    call.out_axes = [None] * len(outs)
    t = outs[0] if len(outs) == 1 else None
    if rec is None or t is None or len(rec[1]) != 1 or not rec[0]:
        call.problem = "was not called the same way on the probe sub-batch"
        return False
    x_axis, why_x = _trace_axis(call.x.shape, rec[0][0], B, size)
    o_axis, why_o = _trace_axis(t.shape, rec[1][0], B, size)
    if why_x or why_o:
        call.problem = f"its {'input' if why_x else 'output'} {why_x or why_o}"
        return False
    if x_axis is None and o_axis is None:
        if call.x.ndim > 1 and call.x.shape[0] == 1 and t.ndim > 0 and t.shape[0] == 1:
            call.x_axis, call.out_axes = 0, [0]
            return True
        call.problem = "its input and output have no batch axis (they are shared by all examples)"
        return False
    if x_axis is None or x_axis != o_axis:
        call.problem = (
            f"its input has batch axis {x_axis} but its output batch axis {o_axis}; "
            "examples are mixed"
        )
        return False
    if kind == "conv" and x_axis != 0:
        call.problem = f"a convolution needs the batch at axis 0, not {x_axis}"
        return False
    call.x_axis, call.out_axes = x_axis, [o_axis]
    return False


def _trace_module(call: _Call, values, outs, rec, size: int) -> None:
    """Trace the batch axes of every tensor input and floating output of a call handled by
    the ``torch.func`` fallback."""
    B = call.batch
    call.arg_axes = [None] * len(values)
    call.out_axes = [None] * len(outs)
    if rec is None or len(rec[0]) != len(values) or len(rec[1]) != len(outs):
        call.problem = "was not called the same way on the probe sub-batch"
        return
    for i, v in enumerate(values):
        if isinstance(v, Tensor) and v.ndim > 0:
            call.arg_axes[i], why = _trace_axis(v.shape, rec[0][i], B, size)
            if why:
                call.problem = f"its input {i} {why}"
                return
    if all(a is None for a in call.arg_axes):
        call.problem = "none of its inputs has a batch axis"
        return
    if all(t is None for t in outs):
        call.problem = "none of its outputs depends on the parameters"
        return
    for j, t in enumerate(outs):
        if t is None:
            continue
        call.out_axes[j], why = _trace_axis(t.shape, rec[1][j], B, size)
        if why:
            call.problem = f"its output {j} {why}"
            return
        if call.out_axes[j] is None:
            call.problem = f"its output {j} has no batch axis (it is shared by all examples)"
            return


def _graph_uses(root: Tensor) -> dict[int, int]:
    """Number of graph edges into each leaf tensor's accumulator (keyed by ``id``)."""
    uses: dict[int, int] = {}
    seen = set()
    stack = [root.grad_fn] if root.grad_fn is not None else []
    while stack:
        fn = stack.pop()
        for nxt, _ in fn.next_functions:
            if nxt is None:
                continue
            var = getattr(nxt, "variable", None)
            if var is not None:
                uses[id(var)] = uses.get(id(var), 0) + 1
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return uses


class PerExampleSquares:
    """Accumulates :math:`\\sum_n (\\nabla_\\theta\\, v_n^\\top f_n)^{\\odot 2}` over examples
    :math:`n` and output cotangents :math:`v` for the selected parameters of a model.

    Usage: ``out = engine.forward(call, inputs)`` runs the model with hooks (``call`` maps a
    batch of inputs, batch dimension first, to the output tensor, batch dimension first),
    then ``engine.accumulate(out, V)`` for each cotangent ``V`` (same shape as ``out``;
    examples must not be mixed by the model), then ``engine.release()``.
    ``engine.squares`` holds the running sums, in the parameter dtype promoted to at least
    float32 (bfloat16 and float16 sums lose increments). Inside the model, a module may hold
    the batch at another axis (sequence-first attention, layers on ``[T, B, D]``): the axis
    of every tensor is traced from the model input by a probe run (see :meth:`forward`).
    ``nn.LSTM`` and ``nn.GRU`` (no ``torch.func.vmap`` batching rule) are handled one
    example at a time.

    Args:
        model: The model.
        names: Selected parameter names (``model.named_parameters()`` names).
        memory_budget: Bytes allowed for the per-example gradients materialised at once.
    """

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str],
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
    ):
        self.model = model
        self.names = list(names)
        self.memory_budget = int(memory_budget)
        all_params = dict(model.named_parameters(remove_duplicate=False))
        self.params = {n: all_params[n] for n in self.names}
        # statistics accumulate in at least float32 whatever the model dtype: summed in
        # bfloat16 they stop taking increments, squared in float16 they underflow
        self.squares = {
            n: torch.zeros_like(
                p,
                dtype=torch.promote_types(p.dtype, torch.float32),
                memory_format=torch.contiguous_format,
            )
            for n, p in self.params.items()
        }
        modules = dict(model.named_modules(remove_duplicate=False))
        # owners[name] = (module name, local name); tied parameters get several owners
        by_id: dict[int, str] = {id(p): n for n, p in self.params.items()}
        self.owners: dict[str, list[tuple[str, str]]] = {n: [] for n in self.names}
        for mname, mod in modules.items():
            for local, p in mod.named_parameters(recurse=False, remove_duplicate=False):
                if id(p) in by_id:
                    self.owners[by_id[id(p)]].append((mname, local))
        self.modules = modules
        hooked = set()
        for lst in self.owners.values():
            for mname, _ in lst:
                parts = mname.split(".") if mname else []
                for k in range(len(parts) + 1):
                    hooked.add(".".join(parts[:k]))
        self.hooked = sorted(hooked)
        self._handles = []
        self._calls: list[_Call] = []
        self._clone: set[str] = set()
        self._capturing = False
        self._probing = False
        self._probe: dict[str, list] = {}  # module name -> shapes of each call in the probe
        self._probe_size = 0
        self._seen: dict[str, int] = {}
        self._batch = 0
        self._workspace: Tensor | None = None
        self._batch_ok = True
        self.plan = None

    # ---------------------------------------------------------------- hooks
    def __enter__(self):
        for mname in self.hooked:
            mod = self.modules[mname]
            self._handles.append(
                mod.register_forward_pre_hook(self._pre_hook(mname), with_kwargs=True)
            )
            self._handles.append(
                mod.register_forward_hook(self._hook(mname, mod), with_kwargs=True)
            )
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.release()
        self._workspace = None

    def _pre_hook(self, mname):
        def hook(mod, args, kwargs):
            if not self._capturing or mname not in self._clone:
                return None
            args = tuple(a.clone() if isinstance(a, Tensor) else a for a in args)
            return args, kwargs

        return hook

    def _hook(self, mname, mod):
        kind = supported_layer(mod)

        def hook(module, args, kwargs, output):
            if self._probing:
                self._probe.setdefault(mname, []).append(_shapes(args, kwargs, output))
                return None
            if not self._capturing:
                return None
            # the probe record of the same call (the i-th call of this module)
            i = self._seen.get(mname, 0)
            self._seen[mname] = i + 1
            recs = self._probe.get(mname, [])
            rec = recs[i] if i < len(recs) else None
            call = _Call(mname, self._batch)
            outs = [t if t is not None and t.requires_grad else None for t in _tensors_of(output)]
            if kind is not None:
                call.x = args[0] if args else next(iter(kwargs.values()))
                call.x_version = call.x._version
                if _trace_layer(call, kind, outs, rec, self._probe_size):
                    # broadcast input (position ids [1, T]): give each example its own
                    # copy so that its output gradient is not summed over the batch
                    B = self._batch
                    call.x = call.x.expand(B, *call.x.shape[1:])
                    output = output.expand(B, *output.shape[1:])
                    call.outputs = [output] if output.requires_grad else [None]
                    call.versions = [output._version]
                    self._calls.append(call)
                    return output
            else:
                call.args, call.kwargs = args, dict(kwargs)
                values = list(args) + list(kwargs.values())
                _trace_module(call, values, outs, rec, self._probe_size)
            call.outputs = outs
            call.versions = [t._version if t is not None else 0 for t in call.outputs]
            self._calls.append(call)
            if mname in self._clone and isinstance(output, Tensor):
                # later in-place operations modify the copy, the captured tensor stays intact
                return output.clone()
            return None

        return hook

    # ---------------------------------------------------------------- forward and plan
    def forward(self, call, inputs) -> Tensor:
        """Run ``call(inputs)`` (the model's forward on a batch of inputs, a tensor or a dict
        of tensors with the batch dimension first) with hooks and plan how each parameter's
        per-example gradient is obtained.

        The batch axis of every tensor a hooked module sees is traced, not guessed: a probe
        run of ``call`` on a copy of two or three examples (see :func:`_probe_inputs`)
        records their shapes, and a tensor's batch axis is the one axis whose size follows
        the number of examples (a tensor of equal shapes is shared by all examples)."""
        batch = batch_size(inputs)
        if batch == 0:
            raise ValueError("the batch has no examples")
        probe = _probe_inputs(inputs, batch)
        self._probe_size = batch_size(probe)
        self._probe = {}
        self._probing = True
        try:
            # shapes only: a call that takes another path without gradients (a fused
            # inference kernel) does not match its counterpart and is refused, never guessed
            with torch.no_grad():
                probe_shape = tuple(call(probe).shape)
        finally:
            self._probing = False
        for _ in range(3):
            self.release()
            self._batch = batch
            self._seen = {}
            self._capturing = True
            try:
                with torch.enable_grad():
                    out = call(inputs)
            finally:
                self._capturing = False
            changed = {
                c.module_name
                for c in self._calls
                if any(
                    t is not None and t._version != v
                    for t, v in zip(c.outputs, c.versions, strict=True)
                )
                or (c.x is not None and c.x._version != c.x_version)
            }
            if not changed - self._clone:
                break
            self._clone |= changed  # outputs modified in place later: capture copies
        self._probe = {}
        axis, why = _trace_axis(out.shape, probe_shape, batch, self._probe_size)
        if axis != 0:
            where = why or ("has no batch axis" if axis is None else f"has it at axis {axis}")
            raise RuntimeError(f"the model output must have the batch dimension first; it {where}")
        if not out.requires_grad:
            raise RuntimeError(
                "the model output does not depend on the selected parameters (it does not "
                "require grad); are they used by the forward pass?"
            )
        self._plan(out)
        return out

    def _plan(self, out: Tensor) -> None:
        calls_by_module: dict[str, list[_Call]] = {}
        for c in self._calls:
            calls_by_module.setdefault(c.module_name, []).append(c)
        uses = _graph_uses(out)
        work: dict[str, list[tuple[_Call, str]]] = {}  # param name -> [(call, local name)]
        for name in self.names:
            p = self.params[name]
            n_uses = uses.get(id(p), 0)
            if n_uses == 0:
                continue  # not used for this output: zero gradient
            entries = []
            for mname, local in self.owners[name]:
                mod = self.modules[mname]
                calls = calls_by_module.get(mname, [])
                if supported_layer(mod) and calls and all(c.is_batched() for c in calls):
                    entries += [(c, local) for c in calls]
            if entries and len(entries) >= n_uses:
                work[name] = entries
                continue
            # fallback: nearest ancestor (the owner itself included) called on batched inputs
            entries = self._fallback_entries(name, calls_by_module)
            if entries is None:
                raise RuntimeError(self._no_batch_axis_message(name, calls_by_module))
            work[name] = entries
        self.plan = work

    def _no_batch_axis_message(self, name, calls_by_module) -> str:
        """Why no module holding parameter ``name`` gives its per-example gradients: the
        problem of the nearest one that was called, and how to fix it."""
        mname = self.owners[name][0][0]
        parts = mname.split(".") if mname else []
        detail = "no module holding it was called on the batch"
        for k in range(len(parts), -1, -1):
            anc = ".".join(parts[:k])
            bad = [c for c in calls_by_module.get(anc, []) if c.problem is not None]
            if bad:
                mod = self.modules[anc]
                detail = f"module {anc or '<model>'!r} ({type(mod).__name__}): {bad[0].problem}"
                break
        return (
            f"parameter {name!r} is used by the forward pass, but its per-example gradients "
            f"cannot be formed: {detail}. The batch axis of every tensor is traced from the "
            "model input (a probe run on two or three examples); make the model's inputs "
            "batch-first and keep the other sizes independent of the batch (pad sequences to "
            "a fixed length, do not flatten examples together) in the modules that hold the "
            "selected parameters"
        )

    def _fallback_entries(self, name, calls_by_module):
        mname, local = self.owners[name][0]
        if len(self.owners[name]) > 1:  # tied across modules: the whole model holds all uses
            mname, local = "", name
        parts = mname.split(".") if mname else []
        for k in range(len(parts), -1, -1):
            anc = ".".join(parts[:k])
            rel = ".".join(parts[k:] + [local]) if k < len(parts) else local
            calls = calls_by_module.get(anc, [])
            if calls and all(c.is_batched() for c in calls):
                return [(c, rel) for c in calls]
        return None

    def workspace(self, numel: int, dtype: torch.dtype, device) -> Tensor:
        """A reused scratch buffer of at least ``numel`` entries (avoids allocating, and
        page-faulting, large per-example gradients for every layer)."""
        buf = self._workspace
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = self._workspace = torch.empty(numel, dtype=dtype, device=device)
        return buf

    def release(self) -> None:
        """Drop the captured tensors (and with them the retained graph)."""
        self._calls = []
        self.plan = None

    # ---------------------------------------------------------------- accumulation
    def _chunk(self, call: _Call, numel: int, itemsize: int) -> int:
        extra = 0
        mod = self.modules[call.module_name]
        if call.x is not None and isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            extra = 2 * call.x.numel() // call.batch  # padded, regrouped input
        per = max(1, (2 * numel + extra) * itemsize)
        return max(1, min(call.batch, self.memory_budget // per))

    def _per_example(self, call, deltas, locals_, lo, hi):
        mod = self.modules[call.module_name]
        kind = supported_layer(mod) if call.x is not None else None
        if kind is not None:
            return _PER_EXAMPLE[kind](mod, call.x[lo:hi], deltas[0][lo:hi], locals_)
        return _fallback_per_example(mod, call, deltas, locals_, lo, hi)

    def can_batch_columns(self) -> bool:
        """Whether several cotangents can share one (vmapped) backward pass: every
        parameter is handled by a closed-form layer, and no earlier attempt failed."""
        return self._batch_ok and all(
            c.x is not None for entries in self.plan.values() for c, _ in entries
        )

    def max_columns(self) -> int:
        """Cotangents per shared backward pass that fit the memory budget."""
        calls = {id(c): c for entries in self.plan.values() for c, _ in entries}.values()
        per = 0
        for c in calls:
            for t in c.outputs:
                if t is not None:
                    per += 3 * t.numel() * max(4, t.element_size())  # summed in >= float32
            if c.x is not None:
                per += c.x.numel() * max(4, c.x.element_size())
        return max(1, self.memory_budget // max(1, per))

    def accumulate(
        self, out: Tensor, cotangent: Tensor, scale: float = 1.0, columns: int | None = None
    ) -> None:
        """Add :math:`\\text{scale} \\sum_n (\\nabla_\\theta v_n^\\top f_n)^{\\odot 2}` for
        the cotangent ``v`` (``cotangent``, shaped as ``out``); with ``columns=K``,
        ``cotangent`` stacks K cotangents ``[K, *out.shape]`` that share one vmapped backward
        pass (``torch.autograd.grad(..., is_grads_batched=True)``). When that pass fails (an
        operation without a batching rule), the K cotangents are taken one at a time; errors
        while the squares are added propagate (a retry could count a layer twice)."""
        if columns is not None:
            try:
                calls, grads = self._output_grads(out, cotangent, columns)
            except RuntimeError:
                # an operation without a batching rule: one cotangent at a time. Only the
                # shared backward pass falls back; nothing has been added to the squares yet
                self._batch_ok = False
                for k in range(columns):
                    self._add_squares(*self._output_grads(out, cotangent[k], None), scale, None)
                return
            self._add_squares(calls, grads, scale, columns)
            return
        self._add_squares(*self._output_grads(out, cotangent, None), scale, None)

    def _output_grads(self, out, cotangent, columns):
        """The planned calls and the gradients of their outputs (one backward pass)."""
        calls = list(dict.fromkeys(c for entries in self.plan.values() for c, _ in entries))
        flat = [t for c in calls for t in c.outputs if t is not None]
        grads = torch.autograd.grad(
            out,
            flat,
            cotangent,
            retain_graph=True,
            allow_unused=True,
            materialize_grads=True,
            is_grads_batched=columns is not None,
        )
        return calls, grads

    def _add_squares(self, calls, grads, scale, columns):
        index = {id(c): i for i, c in enumerate(calls)}
        flat = [
            (i, j) for i, c in enumerate(calls) for j, t in enumerate(c.outputs) if t is not None
        ]
        K = columns or 1
        # the dtype of the sums each call adds to (at least float32): supported layers get
        # their inputs and output gradients in it, others their per-example gradients
        acc_dtype: dict[int, torch.dtype] = {}
        for name, entries in self.plan.items():
            for c, _ in entries:
                dt = self.squares[name].dtype
                acc_dtype[id(c)] = torch.promote_types(acc_dtype.get(id(c), dt), dt)
        deltas: list[list] = [[None] * len(c.outputs) for c in calls]
        for (i, j), g in zip(flat, grads, strict=True):
            g = g.detach()
            if calls[i].x is not None:  # supported layers: examples along the first axis
                axis = calls[i].out_axes[j]
                if columns is not None:  # the K cotangents become K copies of each example
                    g = g.movedim(axis + 1, 1).to(acc_dtype[id(calls[i])])
                    g = g.reshape(-1, *g.shape[2:])
                else:
                    g = g.movedim(axis, 0).to(acc_dtype[id(calls[i])])
            deltas[i][j] = g
        multi_ids = {
            id(c) for entries in self.plan.values() if len(entries) > 1 for c, _ in entries
        }

        def batch_first(c):
            if c.x is None:
                return c
            x = c.batch_first_x()
            if x.is_floating_point():
                x = x.to(acc_dtype[id(c)])
            if columns is not None and (
                id(c) in multi_ids or supported_layer(self.modules[c.module_name]) not in _SQ_INTO
            ):
                x = x.repeat(K, *[1] * (x.ndim - 1))
            return _Call(c.module_name, c.batch * K, x=x)

        dtypes = [acc_dtype[id(c)] for c in calls]
        calls = [batch_first(c) for c in calls]

        # group: single-use parameters of one call are handled together
        single: dict[int, list[tuple[str, str]]] = {}
        multi: list[tuple[str, list[tuple[_Call, str]]]] = []
        for name, entries in self.plan.items():
            if len(entries) == 1:
                single.setdefault(index[id(entries[0][0])], []).append((name, entries[0][1]))
            else:
                multi.append((name, entries))
        with torch.no_grad():
            for i, pairs in single.items():
                call = calls[i]
                ds = [d for d in deltas[i] if d is not None] if call.x is not None else deltas[i]
                locals_ = [loc for _, loc in pairs]
                mod = self.modules[call.module_name]
                kind = supported_layer(mod) if call.x is not None else None
                if kind in _SQ_INTO:
                    accs = {loc: self.squares[name] for name, loc in pairs}
                    x = call.x[: call.batch // K]  # the un-repeated inputs
                    _SQ_INTO[kind](self, mod, x, ds[0], accs, scale, reps=K)
                    continue
                items = [(call, ds, loc) for loc in locals_]
                res = self._sq_by_chunks(items, locals_, dtypes[i])
                for name, loc in pairs:
                    self.squares[name].add_(res[loc].reshape(self.squares[name].shape), alpha=scale)
            for name, entries in multi:
                items = []
                for c, loc in entries:
                    i = index[id(c)]
                    ds = [d for d in deltas[i] if d is not None] if c.x is not None else deltas[i]
                    items.append((calls[i], ds, loc))
                res = self._sq_by_chunks(items, None, self.squares[name].dtype)
                self.squares[name].add_(res.reshape(self.squares[name].shape), alpha=scale)

    def _sq_by_chunks(self, items, locals_, dtype):
        """Sum of squares of per-example gradients, in ``dtype``. ``locals_`` given:
        ``items`` are ``(call, deltas, local)`` of one call, result per local name. Else: the
        items are the uses of one parameter, summed per example before squaring."""
        call0 = items[0][0]
        B = call0.batch
        numel = sum(self.modules[c.module_name].get_parameter(loc).numel() for c, _, loc in items)
        chunk = self._chunk(call0, numel * (1 if locals_ is not None else 2), dtype.itemsize)
        if locals_ is not None:
            total = {}
            for lo in range(0, B, chunk):
                hi = min(B, lo + chunk)
                g = self._per_example(call0, items[0][1], locals_, lo, hi)
                for loc in locals_:
                    s = g[loc].to(dtype).square().sum(0)
                    total[loc] = s if loc not in total else total[loc] + s
            return total
        total = None
        for lo in range(0, B, chunk):
            hi = min(B, lo + chunk)
            g = None
            for c, ds, loc in items:
                gi = self._per_example(c, ds, [loc], lo, hi)[loc].to(dtype)
                g = gi if g is None else g + gi
            s = g.square().sum(0)
            total = s if total is None else total + s
        return total
