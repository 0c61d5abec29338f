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
Fisher-weighted averaging", NeurIPS 2022. The engine (:mod:`curvmerge.statistics.per_example`)
forms the squares from layer inputs and output gradients, in the spirit of BackPACK
(Dangel et al., ICLR 2020) and Goodfellow's per-example gradient trick (2015).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from curvmerge.batches import (
    batch_size,
    check_deterministic,
    iterate_batches,
    model_device,
    model_outputs,
    move_batch,
)
from curvmerge.statistics.per_example import DEFAULT_MEMORY_BUDGET, PerExampleSquares
from curvmerge.losses import (
    LossSpec,
    count_terms,
    flatten_rows,
    output_grad,
    output_hessian_sqrt,
    resolve_loss,
    sample_targets,
)
from curvmerge.operators import DiagonalOperator
from curvmerge.space import ParamSpace

__all__ = ["diagonal_fisher", "DiagonalFisher", "FISHER_KINDS", "fisher_cotangents"]

FISHER_KINDS = ("exact", "mc", "empirical")

# Cross-entropy with at most this many classes uses a rank C-1 Hessian factor (one backward
# pass fewer per row); above it the factor of :func:`output_hessian_sqrt` is used as is.
_REDUCE_MAX_CLASSES = 64


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


def _hessian_factor(spec: LossSpec, f: Tensor) -> Tensor:
    """A factor ``[M, C, K]`` with :math:`S_m S_m^\\top = H_m`.

    For cross-entropy :math:`H = \\operatorname{diag}(p) - pp^\\top` has rank at most
    :math:`C-1` (:math:`H\\mathbf 1 = 0`); its eigendecomposition without the null
    direction gives a factor with :math:`C-1` columns, one backward pass fewer per row.
    """
    S = output_hessian_sqrt(spec, f)
    C = f.shape[-1]
    if spec.name != "cross_entropy" or not 2 <= C <= _REDUCE_MAX_CLASSES or f.shape[0] == 0:
        return S
    S64 = S.to(torch.float64)
    evals, evecs = torch.linalg.eigh(S64 @ S64.transpose(1, 2))
    return (evecs[:, :, 1:] * evals[:, 1:].clamp_min(0).sqrt().unsqueeze(1)).to(S.dtype)


def _row_positions(spec: LossSpec, out: Tensor, targets: Tensor) -> Tensor:
    """Index of each loss row (as returned by :func:`flatten_rows`) among the rows of
    ``out`` (``[-1, C]`` for cross-entropy, ``[B, -1]`` otherwise)."""
    if spec.name == "cross_entropy":
        keep = targets.reshape(-1) != spec.ignore_index
        return keep.nonzero().squeeze(1)
    return torch.arange(out.shape[0], device=out.device)


def fisher_cotangents(
    spec: LossSpec,
    kind: str,
    out: Tensor,
    targets: Tensor,
    *,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> Iterable[tuple[Tensor, float]]:
    """Output cotangents ``V`` (shaped as ``out``) and weights ``w`` such that the kind's
    diagonal is :math:`c \\sum_V w \\sum_n (\\nabla_\\theta\\, V_n^\\top f_n)^{\\odot 2}`.

    Empirical: one cotangent (the loss gradient of every row). MC: one per sample. Exact:
    one per column of the Hessian factor and per row position within an example (rows of one
    example are never mixed, since :math:`H_n` is block diagonal over its rows).
    """
    out = out.detach()
    f, y, example = flatten_rows(spec, out, targets)
    if f.shape[0] == 0:
        return
    C = f.shape[1]
    R = out.numel() // C
    pos = _row_positions(spec, out, targets)

    def place(rows: Tensor | None, vals: Tensor) -> Tensor:
        V = out.new_zeros(R, C)
        V[pos if rows is None else pos[rows]] = vals.to(out.dtype)
        return V.view(out.shape)

    if kind == "empirical":
        yield place(None, output_grad(spec, f, y)), 1.0
    elif kind == "mc":
        Y = sample_targets(spec, f, mc_samples, generator)
        for s in range(mc_samples):
            yield place(None, output_grad(spec, f, Y[s])), 1.0 / mc_samples
    else:
        S = _hessian_factor(spec, f)
        counts = torch.bincount(example, minlength=out.shape[0])
        starts = counts.cumsum(0) - counts
        slot = torch.arange(f.shape[0], device=f.device) - starts[example]
        for s in range(int(slot.max()) + 1):
            rows = (slot == s).nonzero().squeeze(1)
            for k in range(S.shape[2]):
                yield place(rows, S[rows, :, k]), 1.0


def _accumulate_all(engine: PerExampleSquares, out: Tensor, cots) -> None:
    """Feed cotangents to the engine, stacking those of equal weight so that up to
    ``engine.max_columns()`` share one vmapped backward pass."""
    if not engine.can_batch_columns():
        for V, w in cots:
            engine.accumulate(out, V, w)
        return
    kmax = engine.max_columns()
    group: list[Tensor] = []
    weight = None

    def flush():
        if len(group) == 1:
            engine.accumulate(out, group[0], weight)
        elif group:
            engine.accumulate(out, torch.stack(group), weight, columns=len(group))
        group.clear()

    for V, w in cots:
        if group and (w != weight or len(group) >= kmax or not engine.can_batch_columns()):
            flush()
        group.append(V)
        weight = w
    flush()


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
    if kind not in FISHER_KINDS:
        raise ValueError(f"kind must be one of {', '.join(FISHER_KINDS)}; got {kind!r}")
    if kind == "mc" and (not isinstance(mc_samples, int) or mc_samples < 1):
        raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}")
    spec = resolve_loss(loss_fn)
    check_deterministic(model)
    space = params if isinstance(params, ParamSpace) else ParamSpace.from_module(model, params)
    named = dict(model.named_parameters())
    space.check(named, what="model")
    device = model_device(model)
    dtype = named[space.names[0]].dtype if len(space) else torch.get_default_dtype()
    generator = torch.Generator().manual_seed(seed)

    batches = iterate_batches(data)
    if progress:
        from tqdm.auto import tqdm

        total = len(data) if hasattr(data, "__len__") else None
        batches = tqdm(batches, total=total, desc=f"diagonal Fisher ({kind})", leave=False)

    requires = {n: p.requires_grad for n, p in named.items()}
    num_examples = num_terms = 0
    try:
        for n in space.names:
            named[n].requires_grad_(True)
        with PerExampleSquares(model, space.names, memory_budget) as engine:
            for inputs, targets in batches:
                inputs = move_batch(inputs, device, dtype)
                targets = move_batch(targets, device, dtype)
                B = batch_size(inputs)
                out = engine.forward(lambda x: model_outputs(model, x), inputs)
                num_examples += B
                num_terms += count_terms(spec, targets)
                cots = fisher_cotangents(
                    spec, kind, out, targets, mc_samples=mc_samples, generator=generator
                )
                _accumulate_all(engine, out, cots)
                engine.release()
                del out
            squares = engine.squares
    finally:
        for n, p in named.items():
            p.requires_grad_(requires[n])
    if spec.reduction == "mean":
        if num_terms == 0:
            raise ValueError("data has no loss terms (every target is ignore_index)")
        scale = 1.0 / num_terms
    else:
        scale = 1.0
    diag = space.flatten(squares) * scale if len(space) else torch.zeros(0, dtype=dtype)
    return DiagonalFisher(
        space,
        diag,
        kind=kind,
        num_examples=num_examples,
        loss=spec.name,
        reduction=spec.reduction,
        mc_samples=mc_samples if kind == "mc" else None,
    )
