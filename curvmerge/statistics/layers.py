"""Per-layer inputs and output gradients as matrices of rows: the hook engine behind input
Gram matrices (RegMean) and K-FAC factors.

A supported layer is a linear map :math:`y_r = W x_r + b` applied to *rows* :math:`x_r`:

- ``nn.Linear`` (weight ``[out, in]``): one row per position, i.e. the input ``[..., in]``
  flattened to ``[-1, in]`` (tokens of a sequence are rows, as in K-FAC's *expand* setting of
  Eschenhagen et al., "Kronecker-factored approximate curvature for modern neural network
  architectures", NeurIPS 2023);
- ``nn.Conv1d`` / ``nn.Conv2d`` with ``groups=1``: the unfolded (im2col) linear map, one row
  per example and output position, :math:`x_r` the patch of ``in_channels * prod(kernel)``
  input values (channel-major, as ``weight.reshape(out, -1)`` reads them) and :math:`y_r`
  the ``out_channels`` outputs at that position (Grosse & Martens, "A Kronecker-factored
  approximate Fisher matrix for convolution layers", ICML 2016);
- Hugging Face's GPT-2 ``Conv1D`` (recognised by class name, ``transformers`` is never
  imported): :math:`y = x W + b` with weight ``[in, out]``; its rows are those of a linear
  layer with weight :math:`W^\\top`.

**Layer names.** A layer is named by its module name (``model.named_modules()``; ``""`` for a
model that is itself a layer) and maps to :class:`LayerInfo`: the *parameter* name of its
weight and of its bias (``None`` without a bias, or when the bias is not selected), named as
in ``model.named_parameters()`` (the first name of a tied parameter). A layer is supported
only when its weight is selected and held by no other module (one module reachable
under several names is one layer, named by its first name); a selected bias of a layer
whose weight is not selected, and every selected parameter of other modules (embeddings,
norms), is reported in ``unsupported`` so that merges can fall back to averaging for them.
Grouped convolutions (``groups > 1``) holding a selected weight are refused with an error
naming the layer.

**Padding rows.** Hugging Face batches are dicts; when one holds a 2-d ``attention_mask``
``[B, T]``, a layer input whose leading dimensions are ``[B, T]`` (or ``[B * T]``
flattened, or ``[T, B]`` in sequence-first layers when :math:`T \\ne B`) keeps only the rows
where the mask is non-zero. Inputs of other shapes (a pooled ``[B, d]`` classifier head,
convolutions) keep all their rows. Sums over rows do not depend on the order of the rows,
so beyond the mask the batch axis needs not be known.

A layer called several times per forward pass (shared across positions or blocks) adds the
rows of every call. A layer whose module is never called on the data, because its weight is
used functionally (``nn.MultiheadAttention`` applies ``out_proj.weight`` with ``F.linear``)
or not at all, has no statistic: :func:`drop_unseen` moves its parameters to
``unsupported`` after the pass instead of leaving a zero statistic that would look like
information.

The row mask is matched by shape: layers of a model with an ``attention_mask`` must see
their tokens batch-first (``[B, T, d]``, as Hugging Face models do); a sequence-first layer
with :math:`T = B` would be read as batch-first, and the rows of other tokens that happen to
have the mask's shape (an encoder-decoder's decoder positions when their length equals the
encoder's) would be masked by it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from curvmerge.statistics.per_example import conv_patches, supported_layer

__all__ = [
    "LayerInfo",
    "find_layers",
    "drop_unseen",
    "row_mask",
    "weight_dims",
    "LayerHooks",
    "LayerCall",
]

_KINDS = ("linear", "hf_conv1d", "conv")


@dataclass(frozen=True)
class LayerInfo:
    """A supported layer: its module and the parameters it holds.

    Attributes:
        module: Module name (``model.get_submodule(module)``).
        kind: ``"linear"``, ``"conv"`` (``nn.Conv1d``/``nn.Conv2d``) or ``"hf_conv1d"``.
        weight: Parameter name of the weight.
        bias: Parameter name of the bias, or ``None`` (no bias, or bias not selected).
        d_in: Input features of a row (``in_channels * prod(kernel_size)`` for convs),
            without the bias' constant 1.
        d_out: Output features of a row.
    """

    module: str
    kind: str
    weight: str
    bias: str | None
    d_in: int
    d_out: int

    @property
    def size(self) -> int:
        """Size of the input factor: :math:`d_{in} + 1` with a bias, else :math:`d_{in}`."""
        return self.d_in + (self.bias is not None)


def weight_dims(shape: Sequence[int], transposed: bool = False) -> tuple[int, int] | None:
    """``(d_out, d_in)`` of a layer's weight of shape ``shape``: ``[d_out, *rest]`` with
    :math:`d_{in} = \\prod` ``rest`` (linear weights, convolution kernels read as
    ``weight.reshape(d_out, -1)``), or ``[d_in, d_out]`` when ``transposed`` (Hugging Face
    ``Conv1D``); ``None`` for a shape no layer's weight has (fewer than two dimensions, or a
    transposed weight of more than two).

    Example:
        >>> weight_dims((8, 3, 5, 5)), weight_dims((3, 8), transposed=True), weight_dims((4,))
        ((8, 75), (8, 3), None)
    """
    shape = tuple(shape)
    if len(shape) < 2 or (transposed and len(shape) != 2):
        return None
    if transposed:
        return shape[1], shape[0]
    return shape[0], math.prod(shape[1:])


def find_layers(model: nn.Module, names: Sequence[str]) -> tuple[dict[str, LayerInfo], list[str]]:
    """The supported layers among the selected parameters ``names``.

    Returns:
        ``(layers, unsupported)``: the layers by module name, in module order, and the
        selected parameter names that no supported layer covers, in the order of ``names``.

    Raises:
        ValueError: A selected weight belongs to a grouped convolution (``groups > 1``).
    """
    selected = set(names)
    name_of = {id(p): n for n, p in model.named_parameters()}
    holders: dict[int, set[int]] = {}  # parameter id -> ids of the modules holding it
    for _, mod in model.named_modules(remove_duplicate=False):
        for p in mod.parameters(recurse=False):
            holders.setdefault(id(p), set()).add(id(mod))
    layers: dict[str, LayerInfo] = {}
    for mname, mod in model.named_modules():
        kind = supported_layer(mod)
        if kind not in _KINDS:
            continue
        weight = getattr(mod, "weight", None)
        if not isinstance(weight, nn.Parameter) or name_of.get(id(weight)) not in selected:
            continue
        if len(holders.get(id(weight), ())) > 1:
            continue  # tied to another module: not one layer's statistic (reported)
        if kind == "conv" and mod.groups != 1:
            raise ValueError(
                f"layer {mname!r} ({type(mod).__name__}, groups={mod.groups}) is a grouped "
                "convolution, which per-layer statistics do not support (only groups=1); "
                f"leave its parameters out of params (e.g. exclude {name_of[id(weight)]!r})"
            )
        bias = getattr(mod, "bias", None)
        bias_name = name_of.get(id(bias)) if isinstance(bias, nn.Parameter) else None
        if bias_name not in selected or len(holders.get(id(bias), ())) > 1:
            bias_name = None
        d_out, d_in = weight_dims(weight.shape, kind == "hf_conv1d")
        layers[mname] = LayerInfo(mname, kind, name_of[id(weight)], bias_name, d_in, d_out)
    covered = {n for info in layers.values() for n in (info.weight, info.bias) if n}
    return layers, [n for n in names if n not in covered]


def drop_unseen(
    layers: Mapping[str, LayerInfo], num_rows: Mapping[str, int], names: Sequence[str]
) -> tuple[dict[str, LayerInfo], list[str]]:
    """The layers that saw at least one row, and the selected parameters ``names`` that
    none of them covers (in the order of ``names``)."""
    kept = {k: info for k, info in layers.items() if num_rows.get(k, 0) > 0}
    covered = {n for info in kept.values() for n in (info.weight, info.bias) if n}
    return kept, [n for n in names if n not in covered]


def row_mask(inputs) -> Tensor | None:
    """The padding mask of a batch: a Hugging Face dict's 2-d ``attention_mask`` as booleans
    ``[B, T]`` (``True``: a real token), else ``None`` (every row counts)."""
    if isinstance(inputs, Mapping):
        mask = inputs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.ndim == 2:
            return mask != 0
    return None


def _select(lead: tuple[int, ...], mask: Tensor | None) -> Tensor | None:
    """The flat row mask for rows of leading shape ``lead`` (``None``: keep every row)."""
    if mask is None:
        return None
    B, T = mask.shape
    if lead == (B, T) or lead == (B * T,):
        return mask.reshape(-1)
    if lead == (T, B) and T != B:
        return mask.T.reshape(-1)
    return None


@dataclass
class LayerCall:
    """One call of a supported layer during a forward pass.

    Its input rows went to ``on_rows`` during the call and are not kept (a convolution's
    unfolded patches are ``prod(kernel_size)`` times its input).

    Attributes:
        layer: The layer's :class:`LayerInfo`.
        output: The layer's output (kept only when output gradients are wanted).
        keep: The flat mask of the kept rows among all rows (``None``: all).
    """

    layer: LayerInfo
    output: Tensor | None
    keep: Tensor | None

    def grad_rows(self, grad: Tensor) -> Tensor:
        """Rows ``[..., n, d_out]`` of an output gradient (extra leading axes, such as a
        batch of cotangents ``[K, *output.shape]``, are kept)."""
        extra = grad.ndim - self.output.ndim
        if self.layer.kind == "conv":  # [..., B, out, *spatial] -> [..., B * L, out]
            grad = grad.movedim(extra + 1, -1)
        rows = grad.reshape(*grad.shape[:extra], -1, self.layer.d_out)
        return rows if self.keep is None else rows[..., self.keep, :]


class LayerHooks:
    """Forward hooks on supported layers that hand each call's input rows to ``on_rows`` and
    optionally keep the outputs for output gradients.

    Use as a context manager (the hooks are removed on exit); call :meth:`start` with every
    batch's inputs before its forward pass (it sets the padding mask and clears the calls).

    Args:
        model: The model.
        layers: The layers to hook (from :func:`find_layers`).
        on_rows: Called as ``on_rows(layer, rows)`` with every call's input rows
            ``[n, d_in]``, detached, in the layer's dtype.
        keep_outputs: Keep every call's output in :attr:`calls` for :meth:`output_grads`.
            The layer then returns a copy of its output to the rest of the model, so that
            in-place operations after it (``nn.ReLU(inplace=True)``) leave the kept tensor
            intact.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Mapping[str, LayerInfo],
        on_rows: Callable[[LayerInfo, Tensor], None] | None = None,
        *,
        keep_outputs: bool = False,
    ):
        self.model = model
        self.layers = dict(layers)
        self.on_rows = on_rows
        self.keep_outputs = keep_outputs
        self.calls: list[LayerCall] = []
        self._mask: Tensor | None = None
        self._handles: list = []

    def __enter__(self) -> LayerHooks:
        for mname, info in self.layers.items():
            mod = self.model.get_submodule(mname)
            self._handles.append(mod.register_forward_hook(self._hook(info), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.calls = []

    def start(self, inputs) -> None:
        """Begin a batch: its padding mask (:func:`row_mask`) and no calls yet."""
        self._mask = row_mask(inputs)
        self.calls = []

    def _hook(self, info: LayerInfo):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs.get("input", next(iter(kwargs.values()), None))
            if not isinstance(x, Tensor):
                raise TypeError(f"layer {info.module!r} was called without a tensor input")
            x = x.detach()
            if info.kind == "conv":
                u = conv_patches(module, x)  # [B, 1, d_in, L]
                rows = u[:, 0].transpose(1, 2).reshape(-1, info.d_in)
                keep = None
            else:
                keep = _select(tuple(x.shape[:-1]), self._mask)
                rows = x.reshape(-1, info.d_in)
                if keep is not None:
                    keep = keep.to(rows.device)
                    rows = rows[keep]
            if self.on_rows is not None:
                self.on_rows(info, rows)
            if not self.keep_outputs:
                return None
            self.calls.append(LayerCall(info, output, keep))
            return output.clone()

        return hook

    def output_grads(self, out: Tensor, cotangents: Tensor, batched: bool = False) -> list:
        """Gradients of :math:`v^\\top \\text{out}` w.r.t. every kept call's output, as rows.

        Args:
            out: The model output of the batch (the graph is retained).
            cotangents: ``v`` shaped as ``out``, or ``[K, *out.shape]`` with ``batched``.
            batched: ``K`` cotangents share one vectorised backward pass.

        Returns:
            One tensor per call of :attr:`calls`: ``[n, d_out]``, or ``[K, n, d_out]``.
        """
        live = [c for c in self.calls if c.output.requires_grad]
        grads = (
            torch.autograd.grad(
                out,
                [c.output for c in live],
                cotangents,
                retain_graph=True,
                allow_unused=True,
                materialize_grads=True,
                is_grads_batched=batched,
            )
            if live
            else []
        )
        by_call = {id(c): g for c, g in zip(live, grads, strict=True)}
        rows = []
        for c in self.calls:  # a call outside the graph (under no_grad) gets zeros
            g = by_call.get(id(c))
            if g is None:
                lead = (cotangents.shape[0],) if batched else ()
                g = c.output.new_zeros(*lead, *c.output.shape)
            rows.append(c.grad_rows(g.detach()))
        return rows
