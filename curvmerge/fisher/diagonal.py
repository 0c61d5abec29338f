"""The diagonal Fisher: exact, Monte-Carlo and empirical, per example.

With the loss :math:`L(\\theta) = c \\sum_n \\ell_n` (see :mod:`curvmerge.losses`), the three
kinds are

.. math::

    \\operatorname{diag} F_{\\text{exact}} &= c \\sum_n \\sum_{m \\in n} \\sum_k
        \\big(J_m^\\top s_{mk}\\big)^{\\odot 2},
        \\qquad S_m S_m^\\top = H_m = \\nabla_f^2 \\ell_m, \\\\
    \\operatorname{diag} F_{\\text{mc}} &= \\frac{c}{S} \\sum_n \\sum_{s=1}^S
        \\big(\\nabla_\\theta \\ell_n(f_n, \\tilde y_{ns})\\big)^{\\odot 2},
        \\qquad \\tilde y_{ns} \\sim p(y \\mid f_n), \\\\
    \\operatorname{diag} F_{\\text{emp}} &= c \\sum_n
        \\big(\\nabla_\\theta \\ell_n(f_n, y_n)\\big)^{\\odot 2},

where :math:`m \\in n` runs over the loss rows of example :math:`n` (one for classification,
one per non-padding token for language modelling, where a whole sequence is one example).
For cross-entropy the exact kind equals :math:`\\sum_c p_c (\\nabla \\log p_c)^{\\odot 2}` per
row and is the diagonal of the GGN. Squares are always of per-example gradients: squaring
a batch-summed gradient, as some merging code does, is a different, biased quantity.

Fisher-weighted averaging with this diagonal is Matena & Raffel, "Merging models with
Fisher-weighted averaging", NeurIPS 2022. The engine (:mod:`curvmerge.statistics.per_example`,
summed by :func:`curvmerge.statistics.diagonal.diagonal_squares`)
forms the squares from layer inputs and output gradients, in the spirit of BackPACK
(Dangel et al., ICLR 2020) and Goodfellow's per-example gradient trick (2015).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch  # noqa: F401 (the doctests use it)
from torch import nn

from curvmerge.losses import LossSpec
from curvmerge.operators import DiagonalOperator
from curvmerge.space import ParamSpace
from curvmerge.statistics.base import CurvatureComputer
from curvmerge.statistics.diagonal import FISHER_KINDS, diagonal_squares
from curvmerge.statistics.per_example import DEFAULT_MEMORY_BUDGET

__all__ = ["diagonal_fisher", "DiagonalFisher", "FISHER_KINDS"]


class DiagonalFisher(DiagonalOperator):
    """A :class:`~curvmerge.operators.DiagonalOperator` that remembers how it was computed.

    Args:
        space: The parameter space.
        diag: The diagonal (flat ``[P]`` or a parameter dict).
        kind: ``"exact"``, ``"mc"`` or ``"empirical"``.
        num_examples: Number of examples :math:`N` it sums over.
        loss: Name of the loss (``"cross_entropy"``, ``"mse"``, ``"bce"``).
        reduction: ``"mean"`` or ``"sum"``.
        mc_samples: Samples per example (``kind="mc"``).

    Example:
        >>> space = ParamSpace(("w",), ((2,),))
        >>> F = DiagonalFisher(space, torch.tensor([1.0, 3.0]), kind="empirical", num_examples=4)
        >>> (F + F).diagonal(), F.kind, F.num_examples
        (tensor([2., 6.]), 'empirical', 4)
    """

    def __init__(
        self,
        space: ParamSpace,
        diag,
        *,
        kind: str,
        num_examples: int,
        loss: str | None = None,
        reduction: str | None = None,
        mc_samples: int | None = None,
    ):
        super().__init__(space, diag)
        self.kind = kind
        self.num_examples = int(num_examples)
        self.loss = loss
        self.reduction = reduction
        self.mc_samples = mc_samples

    def __repr__(self) -> str:
        return (
            f"DiagonalFisher(kind={self.kind!r}, num_examples={self.num_examples}, {self.space!r})"
        )


def diagonal_fisher(
    model: nn.Module,
    loss_fn: nn.Module | str | LossSpec,
    data: Iterable,
    *,
    params: str | Sequence[str] | ParamSpace | None = None,
    kind: str = "exact",
    mc_samples: int = 1,
    seed: int = 0,
    progress: bool = True,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    distributed: bool | None = None,
) -> DiagonalFisher:
    """The diagonal of the Fisher of ``model`` on ``data``, per example.

    .. math::

        \\operatorname{diag} F = c \\sum_n \\mathbb E_{v}\\big[(\\nabla_\\theta\\,
        v^\\top f_n(\\theta))^{\\odot 2}\\big]

    with :math:`v` a column of the output-Hessian factor (``exact``), the loss gradient at a
    label sampled from the model (``mc``) or at the true label (``empirical``), and :math:`c`
    the loss reduction over the whole data set (see :mod:`curvmerge.losses`).

    Args:
        model: A ``torch.nn.Module`` (Hugging Face models included), in eval mode or free of
            dropout and batch norm. Its forward pass must not mix examples.
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss``, ``nn.BCEWithLogitsLoss`` or a name.
            Cross-entropy accepts ``[B, C]`` or token-level ``[B, T, C]`` outputs (padding
            marked by ``ignore_index`` in the targets; a sequence is one example).
        data: Iterable of ``(inputs, targets)`` batches.
        params: Parameter names or a regex (default: all parameters), or a
            :class:`ParamSpace`.
        kind: ``"exact"`` (:math:`C-1` backward passes per row position for
            :math:`C`-class cross-entropy), ``"mc"`` (``mc_samples`` backward passes) or
            ``"empirical"`` (one backward pass). For language models with large
            vocabularies, ``"exact"`` costs one backward pass per token position and class;
            use ``"mc"``.
        mc_samples: Labels sampled per example for ``kind="mc"``.
        seed: Seed of the CPU generator that draws the ``mc`` labels.
        progress: Show a progress bar.
        memory_budget: Bytes the engine may use for per-example gradients at once (the
            activations of a batch come on top; choose the batch size for those).
        distributed: Sum the squares and counts over the processes of
            :mod:`torch.distributed`, each reading its own shard of the data, so that every
            process returns the diagonal of all the shards (``None``: when a process group
            is initialised; ``False``: each process's own shard; see
            :class:`~curvmerge.statistics.base.CurvatureComputer`). ``mc`` labels are drawn
            with another seed on each process but the main one.

    Returns:
        A :class:`DiagonalFisher` (a :class:`~curvmerge.operators.DiagonalOperator`) on the
        selected parameters.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> data = [(torch.randn(5, 3), torch.randint(0, 2, (5,)))]
        >>> F = diagonal_fisher(model, nn.CrossEntropyLoss(), data, progress=False)
        >>> F.shape, F.kind, F.num_examples
        ((26, 26), 'exact', 5)
    """
    computer = CurvatureComputer(model, loss_fn, data, params=params, distributed=distributed)
    stats = diagonal_squares(
        computer,
        kind=kind,
        mc_samples=mc_samples,
        seed=seed,
        memory_budget=memory_budget,
        progress=progress,
    )
    spec = computer.loss
    if spec.reduction == "mean":
        if stats.num_terms == 0:
            raise ValueError("data has no loss terms (every target is ignore_index)")
        diag = stats.sums / stats.num_terms
    else:
        diag = stats.sums
    return DiagonalFisher(
        computer.space,
        diag,
        kind=kind,
        num_examples=stats.num_examples,
        loss=spec.name,
        reduction=spec.reduction,
        mc_samples=mc_samples if kind == "mc" else None,
    )
