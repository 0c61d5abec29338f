"""K-FAC's Kronecker factors of the Fisher, per supported layer.

With the loss :math:`L(\\theta) = c \\sum_n \\ell_n` of :mod:`curvmerge.losses`, the Fisher
block of a layer :math:`y_r = M \\tilde x_r` (joint matrix :math:`M = [W\\; b]`,
:math:`\\tilde x_r = [x_r; 1]` with a bias) is approximated, as in Martens & Grosse,
"Optimizing neural networks with Kronecker-factored approximate curvature" (ICML 2015), and
for convolutions Grosse & Martens (ICML 2016), by

.. math::

    F \\approx A \\otimes B, \\qquad
    A = \\frac{1}{R} \\sum_r \\tilde x_r \\tilde x_r^\\top, \\qquad
    B = c \\sum_V w_V \\sum_r g_{Vr} g_{Vr}^\\top,

acting on the joint matrix as :math:`M \\mapsto B M A`. The sums run over the layer's rows
(examples, and positions of sequences or images: the *expand* setting of Eschenhagen et
al., NeurIPS 2023), :math:`R` is the number of rows, and :math:`g_{Vr} = \\partial (V^\\top
f) / \\partial y_r` are the output gradients of the cotangents :math:`V` with weights
:math:`w_V` of :func:`~curvmerge.statistics.diagonal.fisher_cotangents`: columns of the loss
Hessian's factor (``kind="exact"``), gradients at labels sampled from the model (``"mc"``,
seeded) or at the true labels (``"empirical"``). These are the conventions of curvlinops'
``KFACLinearOperator`` (``fisher_type`` ``"type-2"``, ``"mc"``, ``"empirical"``,
``kfac_approx="expand"``, its ``num_data`` normalisation and loss-average correction), so
that products agree with it on the problems both support. Padding rows (where an
``attention_mask`` is 0) are left out of both factors here; positions whose cross-entropy
target is ``ignore_index`` are no loss terms (nor counted in the ``"mean"`` normaliser) but
stay rows of both factors: their inputs, and their output gradients from the other
positions' losses (through attention), are real. Factors accumulate in float32, or float64
for a float64 model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from curvmerge.batches import model_outputs
from curvmerge.losses import LossSpec
from curvmerge.space import ParamSpace
from curvmerge.statistics.base import CurvatureComputer
from curvmerge.statistics.diagonal import check_kind, fisher_batches
from curvmerge.statistics.gram import add_gram
from curvmerge.statistics.layers import LayerHooks, LayerInfo, drop_unseen, find_layers
from curvmerge.statistics.per_example import DEFAULT_MEMORY_BUDGET

__all__ = ["KFACFactors", "kfac_factors"]

# Cotangents that share one vectorised backward pass at most.
_MAX_COLUMNS = 64


@dataclass
class KFACFactors:
    """K-FAC factors of a model's supported layers (see the module docstring).

    Attributes:
        A: Layer -> input factor ``[size, size]`` (``size = d_in + 1`` with a bias, the bias
            entry last), normalised by the layer's row count.
        B: Layer -> output-gradient factor ``[d_out, d_out]``, including the loss scale
            :math:`c`.
        layers: Layer -> :class:`~curvmerge.statistics.layers.LayerInfo`.
        num_rows: Layer -> rows summed into ``A``.
        unsupported: Selected parameters no supported layer covers, including those of
            layers never called on the data.
        kind: ``"exact"``, ``"mc"`` or ``"empirical"``.
        num_examples: Examples read.
        num_terms: Loss terms read (the ``"mean"`` normaliser).
        mc_samples: Labels sampled per example (``kind="mc"``).
    """

    A: dict[str, Tensor]
    B: dict[str, Tensor]
    layers: dict[str, LayerInfo]
    num_rows: dict[str, int]
    unsupported: list[str] = field(default_factory=list)
    kind: str = "exact"
    num_examples: int = 0
    num_terms: int = 0
    mc_samples: int = 1


def _add_output_grads(hooks, out, cots, B, acc) -> None:
    """Add :math:`w \\sum_r g_r g_r^\\top` of every cotangent to ``B``; cotangents of equal
    weight share one vectorised backward pass (one at a time if that pass fails)."""
    groups: list[tuple[float, list[Tensor]]] = []
    for V, w in cots:
        if groups and groups[-1][0] == w and len(groups[-1][1]) < _MAX_COLUMNS:
            groups[-1][1].append(V)
        else:
            groups.append((w, [V]))
    for w, Vs in groups:
        try:
            rows = hooks.output_grads(out, torch.stack(Vs), batched=True)
        except RuntimeError:  # an operation without a batching rule
            per = [hooks.output_grads(out, V) for V in Vs]
            rows = [torch.stack(g) for g in zip(*per, strict=True)]
        for call, g in zip(hooks.calls, rows, strict=True):
            g = g.to(acc).reshape(-1, g.shape[-1])
            B[call.layer.module].addmm_(g.T, g, alpha=w)


def kfac_factors(
    model: nn.Module,
    loss: nn.Module | str | LossSpec,
    data: Iterable,
    *,
    kind: str = "exact",
    mc_samples: int = 1,
    seed: int = 0,
    params: str | Sequence[str] | ParamSpace | None = None,
    num_data: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = False,
    distributed: bool | None = None,
) -> KFACFactors:
    """K-FAC factors :math:`A` and :math:`B` of every supported layer among the selected
    parameters, in one forward pass and one (vectorised) backward pass per group of
    cotangents per batch.

    Args:
        model: The model (eval mode, or free of dropout and batch norm).
        loss: ``nn.CrossEntropyLoss``, ``nn.MSELoss``, ``nn.BCEWithLogitsLoss``, a name or a
            :class:`~curvmerge.losses.LossSpec`.
        data: Iterable of ``(inputs, targets)`` batches.
        kind: ``"exact"`` (type-2 Fisher: the loss Hessian's factor, one backward column
            per class and row position), ``"mc"`` or ``"empirical"``.
        mc_samples: Labels sampled per example for ``kind="mc"``.
        seed: Seed of the CPU generator that draws the ``mc`` labels.
        params: Names or a regex of the selected parameters (default: all), or a space.
        num_data: The ``"mean"`` normaliser (loss terms); ``None`` counts them while the
            factors are computed.
        memory_budget: Bytes the exact kind's ``[M, C, C]`` output-Hessian factor of a batch
            may use (past it, ``"exact"`` is refused: a language model's vocabulary).
        progress: Show a progress bar over the batches.
        distributed: Sum the factors' sums and counts over the processes of
            :mod:`torch.distributed`, each reading its own shard of the data, before they
            are normalised (``None``: when a process group is initialised; see
            :class:`~curvmerge.statistics.base.CurvatureComputer`). A given ``num_data`` is
            that of all the shards; ``mc`` labels are drawn with another seed on each
            process but the main one.

    Raises:
        ValueError: An unknown kind, no selected parameter in a supported layer, or a
            selected weight of a grouped convolution.
        DiagonalTooCostlyError: ``kind="exact"`` whose output-Hessian factor exceeds
            ``memory_budget``; use ``kind="mc"``.
    """
    check_kind(kind, mc_samples)
    computer = CurvatureComputer(
        model, loss, data, params=params, num_data=num_data, distributed=distributed
    )
    layers, unsupported = find_layers(model, computer.space.names)
    if not layers:
        raise ValueError(
            "no selected parameter belongs to a supported layer (nn.Linear, nn.Conv1d, "
            f"nn.Conv2d, Hugging Face Conv1D); unsupported: {unsupported[:5]}"
        )
    spec = computer.loss
    acc = torch.promote_types(computer.dtype, torch.float32)
    dev = computer.device
    A = {k: torch.zeros(i.size, i.size, dtype=acc, device=dev) for k, i in layers.items()}
    B = {k: torch.zeros(i.d_out, i.d_out, dtype=acc, device=dev) for k, i in layers.items()}
    num_rows = dict.fromkeys(layers, 0)

    def on_rows(info: LayerInfo, rows: Tensor) -> None:
        add_gram(A[info.module], rows, info.bias is not None)
        num_rows[info.module] += rows.shape[0]

    named = dict(model.named_parameters())
    weights = [named[i.weight] for i in layers.values()]
    requires = [p.requires_grad for p in weights]
    num_examples = num_terms = 0
    with computer.shard_pass():
        try:
            for p in weights:  # the layers' outputs must be in the graph
                p.requires_grad_(True)
            with LayerHooks(model, layers, on_rows, keep_outputs=True) as hooks:

                def forward(inputs) -> Tensor:
                    hooks.start(inputs)
                    with torch.enable_grad():
                        return model_outputs(model, inputs)

                batches = fisher_batches(
                    computer,
                    kind,
                    forward,
                    mc_samples=mc_samples,
                    seed=seed,
                    max_factor_bytes=memory_budget,
                    desc=f"K-FAC ({kind})",
                    progress=progress,
                )
                for out, cots, examples, terms in batches:
                    num_examples += examples
                    num_terms += terms
                    _add_output_grads(hooks, out, cots, B, acc)
                    hooks.calls = []
                    del out
        finally:
            for p, r in zip(weights, requires, strict=True):
                p.requires_grad_(r)
    *rows, num_examples, num_terms = computer.sum_over_ranks(
        [*A.values(), *B.values()], [*num_rows.values(), num_examples, num_terms]
    )
    num_rows = dict(zip(num_rows, rows, strict=True))
    computer.check_examples(num_examples)
    layers, unsupported = drop_unseen(layers, num_rows, computer.space.names)
    if not layers:
        raise ValueError(
            "no supported layer holding a selected parameter was called on the data (a "
            "weight used functionally, as nn.MultiheadAttention uses out_proj, is not a call)"
        )
    A = {k: A[k] / num_rows[k] for k in layers}
    if spec.reduction == "sum":
        scale = 1.0
    elif num_data is not None:
        scale = 1.0 / num_data
    elif num_terms > 0:
        scale = 1.0 / num_terms  # counted on this pass: no extra pass over the data
    else:
        raise ValueError("data has no loss terms (every target is ignore_index)")
    B = {k: B[k] * scale for k in layers}
    rows = {k: num_rows[k] for k in layers}
    return KFACFactors(A, B, layers, rows, unsupported, kind, num_examples, num_terms, mc_samples)
