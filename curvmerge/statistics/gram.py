"""Per-layer input Gram matrices: the statistic of RegMean.

For a supported layer (:mod:`curvmerge.statistics.layers`) with input rows :math:`x_r`
(padding rows excluded) the Gram matrix is

.. math::

    G = \\sum_r \\tilde x_r \\tilde x_r^\\top, \\qquad
    \\tilde x_r = \\begin{cases} [x_r; 1] & \\text{the layer has a (selected) bias,} \\\\
    x_r & \\text{otherwise,} \\end{cases}

so that weight and bias are solved jointly: RegMean (Jin et al., "Dataless knowledge fusion
by merging weights of language models", ICLR 2023) merges the joint matrices
:math:`M_t = [W_t\\; b_t]` of a layer as :math:`M^* = (\\sum_t M_t G_t)(\\sum_t G_t)^{-1}`,
the minimiser of :math:`\\sum_t \\sum_r \\|M \\tilde x_{tr} - M_t \\tilde x_{tr}\\|^2`.
One forward pass per batch, no backward pass; sums accumulate in float32, or float64 for a
float64 model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from curvmerge.batches import batch_size, model_outputs
from curvmerge.losses import LossSpec
from curvmerge.space import ParamSpace
from curvmerge.statistics.base import CurvatureComputer
from curvmerge.statistics.layers import LayerHooks, LayerInfo, drop_unseen, find_layers

__all__ = ["LayerGrams", "input_grams", "add_gram"]


@dataclass
class LayerGrams:
    """Input Gram matrices of a model's supported layers.

    Attributes:
        grams: Layer (module name) -> :math:`G` ``[size, size]`` (``size = d_in + 1`` with a
            bias: the last row and column hold :math:`\\sum_r x_r` and the row count).
        num_rows: Layer -> number of rows summed (non-padding positions of all calls).
        layers: Layer -> :class:`~curvmerge.statistics.layers.LayerInfo` (weight and bias
            parameter names, sizes).
        unsupported: Selected parameters no supported layer covers (merges average them),
            including those of layers never called on the data.
        num_examples: Examples read.
    """

    grams: dict[str, Tensor]
    num_rows: dict[str, int]
    layers: dict[str, LayerInfo]
    unsupported: list[str] = field(default_factory=list)
    num_examples: int = 0

    @property
    def weight_names(self) -> dict[str, str]:
        """Layer -> parameter name of its weight."""
        return {k: info.weight for k, info in self.layers.items()}

    @property
    def bias_names(self) -> dict[str, str | None]:
        """Layer -> parameter name of its bias (``None``: the Gram has no bias row)."""
        return {k: info.bias for k, info in self.layers.items()}


def add_gram(acc: Tensor, rows: Tensor, bias: bool) -> None:
    """Add :math:`\\sum_r \\tilde x_r \\tilde x_r^\\top` of ``rows`` ``[n, d]`` to ``acc``
    (``[d + 1, d + 1]`` with ``bias``: :math:`\\tilde x_r = [x_r; 1]`), in ``acc``'s dtype.

    Example:
        >>> acc = torch.zeros(3, 3)
        >>> add_gram(acc, torch.tensor([[1.0, 2.0], [3.0, 4.0]]), bias=True)
        >>> acc
        tensor([[10., 14.,  4.],
                [14., 20.,  6.],
                [ 4.,  6.,  2.]])
    """
    rows = rows.to(acc.dtype)
    d = rows.shape[1]
    if not bias:
        acc.addmm_(rows.T, rows)
        return
    acc[:d, :d].addmm_(rows.T, rows)
    s = rows.sum(0)
    acc[:d, d] += s
    acc[d, :d] += s
    acc[d, d] += rows.shape[0]


def input_grams(
    model: nn.Module,
    data: Iterable,
    *,
    params: str | Sequence[str] | ParamSpace | None = None,
    loss: nn.Module | str | LossSpec | None = None,
    progress: bool = False,
    distributed: bool | None = None,
) -> LayerGrams:
    """Input Gram matrices of the supported layers among the selected parameters.

    Args:
        model: The model (eval mode, or free of dropout and batch norm).
        data: Iterable of ``(inputs, targets)`` batches; the targets are not read (inputs
            may be Hugging Face dicts; their ``attention_mask`` excludes padding rows).
        params: Names or a regex of the selected parameters (default: all), or a space.
        loss: Accepted for a uniform signature with the other computers; not used (the
            Grams do not depend on the loss).
        progress: Show a progress bar over the batches.
        distributed: Sum the Grams and counts over the processes of
            :mod:`torch.distributed`, each reading its own shard of the data (``None``:
            when a process group is initialised; see
            :class:`~curvmerge.statistics.base.CurvatureComputer`).

    Returns:
        :class:`LayerGrams`, in float32 or the model's dtype if wider.

    Raises:
        ValueError: No selected parameter belongs to a supported layer, or a selected weight
            belongs to a grouped convolution.

    Example:
        >>> lin = nn.Linear(2, 1)
        >>> x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> g = input_grams(lin, [(x, torch.zeros(2, 1))])
        >>> g.grams[""], g.num_rows[""], g.bias_names[""]
        (tensor([[10., 14.,  4.],
                [14., 20.,  6.],
                [ 4.,  6.,  2.]]), 2, 'bias')
    """
    computer = CurvatureComputer(
        model, loss if loss is not None else "mse", data, params=params, distributed=distributed
    )
    layers, unsupported = find_layers(model, computer.space.names)
    if not layers:
        raise ValueError(
            "no selected parameter belongs to a supported layer (nn.Linear, nn.Conv1d, "
            f"nn.Conv2d, Hugging Face Conv1D); unsupported: {unsupported[:5]}"
        )
    acc = torch.promote_types(computer.dtype, torch.float32)
    grams = {
        k: torch.zeros(i.size, i.size, dtype=acc, device=computer.device) for k, i in layers.items()
    }
    rows_seen = dict.fromkeys(layers, 0)

    def on_rows(info: LayerInfo, rows: Tensor) -> None:
        add_gram(grams[info.module], rows, info.bias is not None)
        rows_seen[info.module] += rows.shape[0]

    num_examples = 0
    with computer.shard_pass():
        with torch.no_grad(), LayerHooks(model, layers, on_rows) as hooks:
            for _, inputs, _ in computer.batches("input Grams", progress):
                hooks.start(inputs)
                model_outputs(model, inputs)
                num_examples += batch_size(inputs)
    counts = computer.sum_over_ranks(list(grams.values()), [*rows_seen.values(), num_examples])
    *rows, num_examples = counts
    rows_seen = dict(zip(rows_seen, rows, strict=True))
    computer.check_examples(num_examples)
    layers, unsupported = drop_unseen(layers, rows_seen, computer.space.names)
    if not layers:
        raise ValueError(
            "no supported layer holding a selected parameter was called on the data (a "
            "weight used functionally, as nn.MultiheadAttention uses out_proj, is not a call)"
        )
    return LayerGrams(
        {k: grams[k] for k in layers},
        {k: rows_seen[k] for k in layers},
        layers,
        unsupported,
        num_examples,
    )
