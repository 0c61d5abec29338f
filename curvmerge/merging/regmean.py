"""RegMean and RegMean++: merge linear layers by solving a regression on their inputs.

RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models",
ICLR 2023) merges each linear (or convolution) layer so that, on every task's inputs, it
predicts what that task's model predicts:

.. math::

    M^* = \\arg\\min_M \\sum_t w_t \\|X_t M^\\top - X_t M_t^\\top\\|^2
        = \\Big(\\sum_t w_t G_t\\Big)^{-1} \\sum_t w_t G_t M_t^\\top,
    \\qquad G_t = X_t^\\top X_t,

with :math:`M_t = [W_t\\; b_t]` the layer's weight and bias of model :math:`t` and the rows
of :math:`X_t` its inputs :math:`[x; 1]` (padding excluded). RegMean scales the
off-diagonal entries of each Gram, :math:`\\tilde G_t = \\alpha G_t + (1 - \\alpha)
\\operatorname{diag}(G_t)`, which pulls the solution towards a per-input weighted average
(:math:`\\alpha \\to 0`) and keeps the system positive definite. Parameters without a Gram
(norms, embeddings, unsupported layers) are averaged with the same weights.

This is the merge equation of :func:`~curvmerge.merge` with the block-diagonal curvature
:math:`F_t = \\tilde G_t \\otimes I` on each layer's parameters (zero elsewhere) and
:math:`\\lambda \\to 0` with the mean prior; here it is solved exactly, layer by layer.

RegMean++ (Nguyen et al., "RegMean++: Enhancing Effectiveness and Generalization of
Regression Mean for Model Merging", 2025, arXiv:2508.03121) computes layer :math:`\\ell`'s
Grams from the inputs that the *merged* model (its layers before :math:`\\ell` already
merged) produces on each task's data, instead of each candidate model's own inputs, so
each layer's regression sees what the merged network will actually feed it.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from curvmerge.merging.methods import (
    FlatModels,
    MethodReport,
    check_finite_scalar,
    flatten_models,
    method_report,
)
from curvmerge.merging.report import MergeResult, parameters_of
from curvmerge.merging.system import check_weights
from curvmerge.statistics.base import CurvatureComputer
from curvmerge.statistics.gram import add_gram
from curvmerge.statistics.layers import LayerHooks, find_layers, weight_dims

__all__ = [
    "RegMeanReport",
    "SingularGramWarning",
    "regmean",
    "regmean_plus_plus",
    "scale_off_diagonal",
]

Model = nn.Module | Mapping[str, Tensor]


class SingularGramWarning(UserWarning):
    """A layer's summed Gram is singular: directions no input reaches keep the average."""


@dataclass
class RegMeanReport(MethodReport):
    """A :class:`~curvmerge.merging.methods.MethodReport` plus what RegMean solved.

    Attributes:
        layers: The layers solved by regression, in order.
        averaged: Merged parameters without a Gram in every model (weighted average).
        singular: Layers whose summed Gram was singular (solved by pseudo-inverse; see
            :func:`regmean`).
        forwards: Forward passes over one batch that the merge ran (RegMean++; 0 for
            RegMean, whose Grams are given). Passes stopped early count as one each.
        gram_seconds: Time spent computing Grams (RegMean++).
    """

    layers: list[str] = field(default_factory=list)
    averaged: list[str] = field(default_factory=list)
    singular: list[str] = field(default_factory=list)
    forwards: int = 0
    gram_seconds: float = 0.0

    def __str__(self) -> str:
        s = (
            f"{super().__str__()}: {len(self.layers)} layers solved, "
            f"{len(self.averaged)} parameters averaged"
        )
        if self.singular:
            s += f", {len(self.singular)} singular"
        if self.forwards:
            s += f", {self.forwards} batch forwards ({self.gram_seconds:.3g} s)"
        return s + f"; {self.seconds:.3g} s"


# ---------------------------------------------------------------------------------- Grams
def scale_off_diagonal(gram: Tensor, alpha: float) -> Tensor:
    """:math:`\\alpha G + (1 - \\alpha) \\operatorname{diag}(G)`: RegMean's off-diagonal
    scaling (works on a batch ``[..., d, d]``).

    Example:
        >>> scale_off_diagonal(torch.tensor([[2.0, 1.0], [1.0, 4.0]]), 0.5)
        tensor([[2.0000, 0.5000],
                [0.5000, 4.0000]])
    """
    diag = torch.diagonal(gram, dim1=-2, dim2=-1)
    return alpha * gram + (1 - alpha) * torch.diag_embed(diag)


def _check_alpha(alpha: float) -> float:
    """``alpha`` as a float in :math:`(0, 1]`; ``ValueError`` otherwise."""
    alpha = check_finite_scalar(alpha, "alpha")
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha (RegMean's off-diagonal scaling) must be in (0, 1], got {alpha}")
    return alpha


@dataclass
class _Layer:
    """One layer to solve: its parameters, Gram size and how its weight maps to rows."""

    name: str
    weight: str
    bias: str | None
    size: int  # d: inputs (+1 with a bias)
    transposed: bool  # weight stored [d_in, out] (Hugging Face Conv1D)


def _gram_fields(grams: Any, i: int) -> tuple[Mapping[str, Tensor], Mapping[str, Any]]:
    """``(Grams by layer, LayerInfo by layer)`` of one model's Gram container."""
    for attr in ("grams", "layers"):
        if not isinstance(getattr(grams, attr, None), Mapping):
            raise TypeError(
                f"grams[{i}] must be a LayerGrams (from curvmerge.statistics.input_grams) "
                f"with a mapping {attr!r}, got {type(grams).__name__}"
            )
    return grams.grams, grams.layers


def _rows_of(grams: Any, layer: str) -> float:
    rows = getattr(grams, "num_rows", None)
    if isinstance(rows, Mapping):
        rows = rows.get(layer)
    if rows is None or not float(rows) > 0:
        raise ValueError(f"normalize=True needs a positive num_rows for layer {layer!r}")
    return float(rows)


def _plan_layers(
    grams: Sequence[Any], flat: FlatModels, known: set[str]
) -> tuple[list[_Layer], list[list[Tensor]]]:
    """The layers to solve (a Gram in every model, their weight selected) and each model's
    Gram per layer; ``known`` are all parameter names of the models."""
    T = flat.thetas.shape[0]
    if isinstance(grams, Mapping) or not isinstance(grams, Sequence):
        raise TypeError(
            f"grams must be a list of one LayerGrams per model, got {type(grams).__name__}"
        )
    if len(grams) != T:
        raise ValueError(f"got {len(grams)} Gram sets (grams) for {T} models: pass one per model")
    fields_ = [_gram_fields(g, i) for i, g in enumerate(grams)]
    selected = set(flat.space.names)
    layers: list[_Layer] = []
    per_layer: list[list[Tensor]] = []
    for name in fields_[0][0]:
        if not all(name in f[0] for f in fields_):
            continue
        info = fields_[0][1][name]
        for i, f in enumerate(fields_[1:], 1):
            other = f[1][name]
            if (other.weight, other.bias, other.kind) != (info.weight, info.bias, info.kind):
                raise ValueError(
                    f"layer {name!r}: grams[{i}] is for parameters {(other.weight, other.bias)} "
                    f"({other.kind}), grams[0] for {(info.weight, info.bias)} ({info.kind})"
                )
        if info.weight not in known:
            raise ValueError(
                f"layer {name!r}: its Grams are for weight {info.weight!r}, which is not a "
                "parameter of the models (Grams of another model?)"
            )
        if info.weight not in selected:
            continue
        blocks = [f[0][name] for f in fields_]
        layer = _layer_of(info, flat, selected)
        d = info.size
        for i, g in enumerate(blocks):
            if g.ndim != 2 or tuple(g.shape) != (d, d):
                raise ValueError(
                    f"layer {name!r}: grams[{i}] has a Gram of shape {tuple(g.shape)}, "
                    f"expected {(d, d)} (d_in={info.d_in}"
                    + (", plus 1 for the bias)" if info.bias else ")")
                )
        if info.bias is not None and layer.bias is None:
            # the bias is not merged: solve the weight on its own block of the Gram
            blocks = [g[: info.d_in, : info.d_in] for g in blocks]
        layers.append(layer)
        per_layer.append(blocks)
    return layers, per_layer


def _layer_of(info: Any, flat: FlatModels, selected: set[str]) -> _Layer:
    """The :class:`_Layer` of a ``LayerInfo``, checked against the merged parameters."""
    W = flat.reference[info.weight]
    transposed = info.kind == "hf_conv1d"
    if weight_dims(W.shape, transposed) != (info.d_out, info.d_in):
        raise ValueError(
            f"layer {info.module!r}: weight {info.weight!r} has shape {tuple(W.shape)}, "
            f"which does not fit its statistics (d_in={info.d_in}, d_out={info.d_out})"
        )
    bias = info.bias if info.bias is not None and info.bias in selected else None
    if bias is not None and tuple(flat.reference[bias].shape) != (info.d_out,):
        raise ValueError(
            f"layer {info.module!r}: bias {bias!r} has shape "
            f"{tuple(flat.reference[bias].shape)}, expected {(info.d_out,)}"
        )
    return _Layer(info.module, info.weight, bias, info.d_in + (bias is not None), transposed)


def _rows_matrix(flat: FlatModels, layer: _Layer, vec: Tensor) -> Tensor:
    """``[out, d]``: the layer's weight (and bias) rows read from a flat vector."""
    sl = flat.space.slices()
    shape = flat.space.shapes[flat.space.names.index(layer.weight)]
    W = vec[..., sl[layer.weight]].reshape(*vec.shape[:-1], *shape)
    if layer.transposed:
        W = W.transpose(-1, -2)
    else:
        W = W.reshape(*vec.shape[:-1], shape[0], -1)
    if layer.bias is None:
        return W
    return torch.cat([W, vec[..., sl[layer.bias]].unsqueeze(-1)], dim=-1)


def _write_rows(flat: FlatModels, layer: _Layer, M: Tensor, vec: Tensor) -> None:
    sl = flat.space.slices()
    d_in = layer.size - (layer.bias is not None)
    W = M[:, :d_in]
    if layer.transposed:
        W = W.T
    vec[sl[layer.weight]] = W.reshape(-1).to(vec.device, vec.dtype)
    if layer.bias is not None:
        vec[sl[layer.bias]] = M[:, d_in].to(vec.device, vec.dtype)


def _solve(A: Tensor, R: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Solve ``A X = R`` for a batch of symmetric PSD ``A`` ``[n, d, d]`` (float64).

    Cholesky where ``A`` is numerically positive definite (its smallest pivot squared above
    ``d * eps`` times its largest diagonal entry); elsewhere the pseudo-inverse from
    ``eigh``, eigenvalues below ``d * eps`` times the largest taken as zero. Returns ``X``
    and a boolean ``[n]`` mask of the singular systems.
    """
    d = A.shape[-1]
    L, info = torch.linalg.cholesky_ex(A)
    scale = torch.diagonal(A, dim1=-2, dim2=-1).amax(-1)
    pivots = torch.diagonal(L, dim1=-2, dim2=-1).abs().amin(-1) ** 2
    singular = (info != 0) | ~(pivots > d * eps * scale)
    X = torch.empty_like(R)
    ok = ~singular
    if bool(ok.any()):
        X[ok] = torch.cholesky_solve(R[ok], L[ok])
    if bool(singular.any()):
        vals, vecs = torch.linalg.eigh(A[singular])
        cutoff = d * eps * vals.abs().amax(-1, keepdim=True)
        inv = torch.where(vals > cutoff, 1.0 / vals, torch.zeros_like(vals))
        X[singular] = vecs @ (inv.unsqueeze(-1) * (vecs.mT @ R[singular]))
    return X, singular


def _solve_layers(
    flat: FlatModels,
    layers: Sequence[_Layer],
    per_layer: Sequence[Sequence[Tensor]],
    w: Sequence[float],
    alpha: float,
    merged: Tensor,
    scales: Sequence[Sequence[float]] | None = None,
) -> list[str]:
    """Solve every layer into ``merged`` (the flat weighted average, updated in place);
    returns the singular layers. Layers of equal ``(d, out)`` are solved as one batch."""
    groups: dict[tuple[int, int], list[int]] = {}
    for k, layer in enumerate(layers):
        out = _rows_matrix(flat, layer, flat.thetas[0]).shape[0]
        groups.setdefault((layer.size, out), []).append(k)
    singular: list[str] = []
    wt = torch.tensor(w, dtype=torch.float64)
    for idx in groups.values():
        device = per_layer[idx[0]][0].device
        As, Rs, bars = [], [], []
        eps = 0.0
        for k in idx:
            layer = layers[k]
            rows = _rows_matrix(flat, layer, flat.thetas).to(device, torch.float64)  # [T, o, d]
            bar = _rows_matrix(flat, layer, merged).to(device, torch.float64)  # [o, d]
            G = torch.stack([g.to(device, torch.float64) for g in per_layer[k]])
            if scales is not None:
                rows_t = torch.tensor([s[k] for s in scales], dtype=torch.float64, device=device)
                G = G / rows_t[:, None, None]
            Gt = scale_off_diagonal(G, alpha) * wt.to(device)[:, None, None]
            As.append(Gt.sum(0))
            Rs.append(torch.einsum("tij,toj->io", Gt, rows - bar).contiguous())
            bars.append(bar)
            eps = max(eps, max(torch.finfo(g.dtype).eps for g in per_layer[k]))
        X, bad = _solve(torch.stack(As), torch.stack(Rs), eps)
        for j, k in enumerate(idx):
            _write_rows(flat, layers[k], bars[j] + X[j].T, merged)
            if bool(bad[j]):
                singular.append(layers[k].name)
    return [layer.name for layer in layers if layer.name in set(singular)]


def _warn_singular(singular: Sequence[str]) -> None:
    if singular:
        shown = ", ".join(repr(s) for s in singular[:5])
        more = f" and {len(singular) - 5} more" if len(singular) > 5 else ""
        warnings.warn(
            f"RegMean: the summed Gram of layer(s) {shown}{more} is singular (an input that "
            "never varies, or fewer input rows than inputs with alpha=1); solved by "
            "pseudo-inverse: directions no input reaches keep the weighted average",
            SingularGramWarning,
            stacklevel=3,
        )


# ---------------------------------------------------------------------------------- RegMean
def regmean(
    models: Sequence[Model],
    grams: Sequence[Any],
    *,
    alpha: float = 0.9,
    weights: Sequence[float] | None = None,
    params: str | Sequence[str] | None = None,
    base: Model | None = None,
    normalize: bool = False,
) -> MergeResult:
    """RegMean (Jin et al., ICLR 2023): each layer with a Gram solves a regression.

    For each layer with a Gram in every model, with :math:`M_t = [W_t\\; b_t]` (the bias
    column only when the layer has a bias, its Gram then being over :math:`[x; 1]`):

    .. math::

        \\tilde G_t = \\alpha G_t + (1 - \\alpha)\\operatorname{diag}(G_t), \\qquad
        M^{*\\top} = \\Big(\\sum_t w_t \\tilde G_t\\Big)^{-1}
        \\sum_t w_t \\tilde G_t M_t^\\top .

    It is solved in float64 in task-vector form, :math:`M^* = \\bar M + \\big((\\sum_t w_t
    \\tilde G_t)^{-1} \\sum_t w_t \\tilde G_t (M_t - \\bar M)^\\top\\big)^\\top` around the
    weighted average :math:`\\bar M`, by Cholesky, layers of equal size in one batch. A
    singular sum (an input that is always zero, or with ``alpha=1`` fewer input rows than
    inputs) is solved by pseudo-inverse instead: directions that no task's inputs reach keep
    the weighted average, the limit :math:`\\lambda \\to 0` of :func:`~curvmerge.merge`
    with the mean prior. Such layers are listed in ``report.singular`` and a
    :class:`SingularGramWarning` is issued. Parameters without a Gram in every model are
    the weighted average :math:`\\sum_t w_t \\theta_t / \\sum_t w_t`.

    Args:
        models: The fine-tuned models (modules or parameter dicts).
        grams: One :class:`~curvmerge.statistics.LayerGrams` per model, in model order
            (``curvmerge.statistics.input_grams`` on that model's task data).
        alpha: :math:`\\alpha \\in (0, 1]`, the scaling of the off-diagonal Gram entries
            (1 is the plain regression; smaller values pull each input's weights towards
            their average; tune it on validation data).
        weights: Per-model coefficients :math:`w_t \\ge 0` (default :math:`1/T`); only
            their ratios matter.
        params: Names or a regex selecting the merged parameters (default: every parameter
            of the first model). A layer whose weight is selected without its bias is
            solved on the weight's block of its Gram.
        base: The model the tasks were fine-tuned from. Accepted so that every method takes
            the same arguments; RegMean does not use it (both its solve and its average are
            the same whatever the base).
        normalize: Divide each model's Grams by their ``num_rows`` first (a mean over input
            rows, as in the authors' code), so a task counts by its weight and not by the
            size of its data.

    Returns:
        A :class:`~curvmerge.merging.MergeResult` whose report is a :class:`RegMeanReport`.

    Raises:
        ValueError: One Gram set per model is not given, Grams of a layer differ in shape
            across models or do not fit the layer's weight, ``alpha`` is outside
            :math:`(0, 1]`, or the weights are invalid.

    Example:
        >>> from curvmerge.statistics import LayerGrams
        >>> from curvmerge.statistics.layers import LayerInfo
        >>> info = {"fc": LayerInfo("fc", "linear", "fc.weight", None, d_in=2, d_out=1)}
        >>> X1, X2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
        >>> g = [LayerGrams({"fc": X.T @ X}, {"fc": 1}, info) for X in (X1, X2)]
        >>> a = {"fc.weight": torch.tensor([[1.0, 5.0]])}
        >>> b = {"fc.weight": torch.tensor([[3.0, 2.0]])}
        >>> regmean([a, b], g, alpha=1.0).params["fc.weight"]  # each task sets its input's
        tensor([[1., 2.]])
    """
    start = time.perf_counter()
    flat = flatten_models(models, base, params, method="regmean", needs_base=False)
    T = flat.thetas.shape[0]
    w = check_weights(weights, T, 1.0 / T)
    alpha = _check_alpha(alpha)
    layers, per_layer = _plan_layers(grams, flat, set(parameters_of(models[0])))
    scales = None
    if normalize:
        scales = [[_rows_of(g, layer.name) for layer in layers] for g in grams]
    merged, singular = _merge_flat(flat, layers, per_layer, w, alpha, scales)
    _warn_singular(singular)
    report = _report("regmean", flat, w, start, layers, singular, alpha=alpha, normalize=normalize)
    return MergeResult(flat.unflatten(merged), report)


def _average(flat: FlatModels, w: Sequence[float]) -> Tensor:
    coeffs = torch.tensor(w, dtype=flat.thetas.dtype, device=flat.thetas.device)
    return (coeffs @ flat.thetas) / coeffs.sum()


def _merge_flat(flat, layers, per_layer, w, alpha, scales):
    merged = _average(flat, w)
    singular = _solve_layers(flat, layers, per_layer, w, alpha, merged, scales) if layers else []
    return merged, singular


def _report(method, flat, w, start, layers, singular, **options) -> RegMeanReport:
    base = method_report(method, flat, list(w), start, **options)
    covered = {n for layer in layers for n in (layer.weight, layer.bias) if n}
    return RegMeanReport(
        **{k: getattr(base, k) for k in base.__dataclass_fields__},
        layers=[layer.name for layer in layers],
        averaged=[n for n in flat.space.names if n not in covered],
        singular=list(singular),
    )


# ---------------------------------------------------------------------------------- RegMean++
class _Stop(Exception):
    """Raised from a hook to end a forward pass once the wanted layers have run."""


def _forward(model: nn.Module, overrides: Mapping[str, Tensor], inputs) -> None:
    """One forward pass of ``model`` with ``overrides`` in place of its parameters."""
    args, kwargs = ((), dict(inputs)) if isinstance(inputs, Mapping) else ((inputs,), None)
    torch.func.functional_call(model, overrides, args, kwargs, strict=False)


def _common_layers(models: Sequence[nn.Module], names: Sequence[str]) -> dict[str, Any]:
    """The supported layers of the first model, checked to be the same in every model."""
    layers, _ = find_layers(models[0], names)
    for i, model in enumerate(models[1:], 1):
        other, _ = find_layers(model, names)
        if other != layers:
            diff = next(k for k in {**layers, **other} if layers.get(k) != other.get(k))
            raise ValueError(
                f"model {i} does not have the layers of model 0 (first difference: layer "
                f"{diff!r}: {other.get(diff)} vs {layers.get(diff)})"
            )
    return layers


def _call_plan(model, layers, overrides, inputs) -> list[tuple[list[str], dict[str, int]]]:
    """Groups of layers in forward order and the calls each makes per forward pass.

    One forward pass with pre-hooks: a layer joins the previous layer's group when both are
    called once and its input is the very tensor the previous call got, unchanged (same
    object, same in-place version), as the query, key and value projections of attention
    are; merging one cannot change the other's input. Only the previous call's input is
    held, so the pass keeps no more activations than a plain one.
    """
    calls: list[tuple[str, bool]] = []  # (layer, same input as the previous call)
    last: list = [None, None]
    handles = []

    def pre_hook(name):
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()), None)
            version = getattr(x, "_version", None)
            calls.append((name, x is last[0] and version == last[1]))
            last[0], last[1] = x, version

        return hook

    try:
        for name in layers:
            mod = model.get_submodule(name)
            handles.append(mod.register_forward_pre_hook(pre_hook(name), with_kwargs=True))
        with torch.no_grad():
            _forward(model, overrides, inputs)
    finally:
        for h in handles:
            h.remove()
        last[0] = None
    count: dict[str, int] = {}
    for name, _ in calls:
        count[name] = count.get(name, 0) + 1
    groups: list[tuple[list[str], dict[str, int]]] = []
    seen: set[str] = set()
    joinable = False  # the previous call was a first call of the last group's last layer
    for name, same in calls:
        if name in seen:
            joinable = False
            continue
        seen.add(name)
        if joinable and same and count[name] == 1 and all(c == 1 for c in groups[-1][1].values()):
            groups[-1][0].append(name)
            groups[-1][1][name] = 1
        else:
            groups.append(([name], {name: count[name]}))
        joinable = True
    return groups


def _group_grams(model, infos, expected, overrides, batches, acc_dtype):
    """Grams of the layers ``infos`` over ``batches``, each forward pass stopped once every
    layer made its ``expected`` calls. Returns ``(grams, rows, forwards)``."""
    grams = {}
    rows = dict.fromkeys(infos, 0)
    made = dict.fromkeys(infos, 0)
    forwards = 0

    def on_rows(info, x):
        if info.module not in grams:
            grams[info.module] = torch.zeros(info.size, info.size, dtype=acc_dtype, device=x.device)
        add_gram(grams[info.module], x, info.bias is not None)
        rows[info.module] += x.shape[0]
        made[info.module] += 1
        if all(made[k] >= expected[k] for k in made):
            raise _Stop

    with torch.no_grad(), LayerHooks(model, infos, on_rows) as hooks:
        for _, inputs, _ in batches:
            hooks.start(inputs)
            for k in made:
                made[k] = 0
            forwards += 1
            try:
                _forward(model, overrides, inputs)
            except _Stop:
                pass
    return grams, rows, forwards


def regmean_plus_plus(
    models: Sequence[nn.Module],
    data: Sequence[Any],
    *,
    alpha: float = 0.9,
    weights: Sequence[float] | None = None,
    params: str | Sequence[str] | None = None,
    normalize: bool = False,
    progress: bool = False,
) -> MergeResult:
    """RegMean++ (Nguyen et al., 2025): RegMean on the inputs the merged model produces.

    Layers are merged one after another in forward order. The Gram of layer :math:`\\ell`
    for task :math:`t` is

    .. math::

        G_t^{(\\ell)} = \\sum_r \\hat x_{tr} \\hat x_{tr}^\\top,

    where :math:`\\hat x_{tr}` are the inputs of layer :math:`\\ell` when the *merged* model
    (layers before :math:`\\ell` already merged, parameters without a Gram averaged, task
    :math:`t`'s own unmerged parameters such as its head) runs on task :math:`t`'s data; the
    layer is then solved as in :func:`regmean` (same :math:`\\alpha`, weights and
    pseudo-inverse fallback). So each layer's regression accounts for how the layers
    before it were merged, which RegMean (candidate inputs) ignores.

    The paper merges transformer blocks in order, and inside a block uses each candidate's
    own block; here the unit is the layer, the finest order: every layer sees the merged
    version of all layers that run before it. The order is that of the layers' first calls
    in a forward pass; a layer called several times per pass (shared across positions)
    gathers the rows of every call, and its later calls see the layers run in between still
    at their weighted average.

    **Cost.** One discovery forward pass on the first batch (the layer order and the calls
    per pass), then, for every group of layers and every task, one forward pass per batch
    of that task's data, stopped as soon as the group's layers have run (a layer called
    several times per pass runs all its calls). Layers called once on the same unchanged
    input tensor (query, key and value projections) form one group. With :math:`L` groups
    and :math:`B_t` batches, that is :math:`1 + L \\sum_t B_t` partial forward passes, no
    backward pass; ``report.forwards`` counts them. The model is never modified: the merged
    parameters are passed with :func:`torch.func.functional_call`.

    Args:
        models: The fine-tuned models (modules, eval mode or free of dropout and batch
            norm, on one device).
        data: One iterable of ``(inputs, targets)`` batches per model (its task's data; the
            targets are not read). Each is read once per group of layers, so it must be
            re-iterable (a list or a ``DataLoader``).
        alpha: :math:`\\alpha \\in (0, 1]`, RegMean's off-diagonal scaling.
        weights: Per-model coefficients :math:`w_t \\ge 0` (default :math:`1/T`).
        params: Names or a regex selecting the merged parameters (default: all of the first
            model's). Supported layers (``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d`` with
            ``groups=1``, Hugging Face ``Conv1D``) among them are solved; the rest averaged.
        normalize: Divide each task's Grams by their row counts (see :func:`regmean`).
        progress: Show one progress bar over the layer groups.

    Returns:
        A :class:`~curvmerge.merging.MergeResult` whose report is a :class:`RegMeanReport`
        (``forwards``: partial forward passes over one batch; ``gram_seconds``: their time).

    Raises:
        TypeError: A model is not a module, or a task's data is a one-shot iterator.
        ValueError: ``data`` does not have one entry per model, the models' layers differ,
            or the models are on different devices.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> nets = [nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)) for _ in "ab"]
        >>> data = [[(torch.randn(8, 3), None)] for _ in nets]
        >>> out = regmean_plus_plus(nets, data)
        >>> out.report.layers, out.report.forwards  # 1 discovery + 2 layers x 2 tasks
        (['0', '2'], 5)
    """
    start = time.perf_counter()
    if isinstance(models, nn.Module) or not all(isinstance(m, nn.Module) for m in models):
        raise TypeError("regmean_plus_plus needs a list of torch.nn.Module models (it runs them)")
    flat = flatten_models(models, None, params, method="regmean_plus_plus", needs_base=False)
    T = flat.thetas.shape[0]
    if isinstance(data, (Mapping, Tensor)) or len(data) != T:
        n = "a single" if isinstance(data, (Mapping, Tensor)) else len(data)
        raise ValueError(f"data must hold one batch iterable per model: got {n} for {T} models")
    for t, d in enumerate(data):
        if iter(d) is d:
            raise TypeError(
                f"data[{t}] is a one-shot iterator; RegMean++ reads each task's data once per "
                "layer: pass a list of batches or a DataLoader"
            )
    w = check_weights(weights, T, 1.0 / T)
    alpha = _check_alpha(alpha)
    devices = {str(next(m.parameters()).device) for m in models}
    if len(devices) > 1:
        raise ValueError(f"the models are on different devices ({sorted(devices)}); move them")
    # every process reads all of its data (never a shard: nothing is summed over processes),
    # so empty data is refused as in one process
    computers = [
        CurvatureComputer(m, "mse", d, params=flat.space, distributed=False)
        for m, d in zip(models, data, strict=True)
    ]
    infos = _common_layers(models, flat.space.names)
    merged = _average(flat, w)
    overrides = flat.unflatten(merged)
    acc_dtype = torch.promote_types(flat.thetas.dtype, torch.float32)

    gram_seconds = 0.0
    tic = time.perf_counter()
    first = next(iter(computers[0].batches()))[1]
    groups = _call_plan(models[0], infos, overrides, first)
    forwards = 1
    gram_seconds += time.perf_counter() - tic

    solved: list[_Layer] = []
    singular: list[str] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(groups), desc="RegMean++ layers", leave=False)
    try:
        for names, expected in groups:
            tic = time.perf_counter()
            group = {n: infos[n] for n in names}
            per_task = []
            for t in range(T):
                grams, rows, n = _group_grams(
                    models[t], group, expected, overrides, computers[t].batches(), acc_dtype
                )
                forwards += n
                per_task.append((grams, rows))
            gram_seconds += time.perf_counter() - tic
            layers = [_layer_of(group[n], flat, set(flat.space.names)) for n in names]
            present = [k for k, n in enumerate(names) if all(n in g for g, _ in per_task)]
            layers = [layers[k] for k in present]
            per_layer = [[g[layers[j].name] for g, _ in per_task] for j in range(len(layers))]
            scales = None
            if normalize:
                scales = [[float(r[layer.name]) for layer in layers] for _, r in per_task]
            if layers:
                singular += _solve_layers(flat, layers, per_layer, w, alpha, merged, scales)
            sl = flat.space.slices()
            for layer in layers:
                for p in (layer.weight, layer.bias):
                    if p is not None:
                        ref = flat.reference[p]
                        overrides[p] = merged[sl[p]].reshape(ref.shape).to(ref.device, ref.dtype)
            solved += layers
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    _warn_singular(singular)
    report = _report(
        "regmean_plus_plus", flat, w, start, solved, singular, alpha=alpha, normalize=normalize
    )
    report.forwards = forwards
    report.gram_seconds = gram_seconds
    return MergeResult(flat.unflatten(merged), report)
