"""Per-example squared gradients summed over a data set: the diagonal Fisher's statistic.

With the loss :math:`L(\\theta) = c \\sum_n \\ell_n` (see :mod:`curvmerge.losses`), the
diagonal of each Fisher kind is :math:`c \\sum_V w_V \\sum_n (\\nabla_\\theta\\, V_n^\\top
f_n)^{\\odot 2}` over output cotangents :math:`V` (:func:`fisher_cotangents`); this module
sums the squares over the data with :class:`~curvmerge.statistics.per_example.PerExampleSquares`
and returns them as a tensor (the operator wrapper is :func:`curvmerge.fisher.diagonal_fisher`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from curvmerge.batches import batch_size, model_outputs, move_batch
from curvmerge.losses import (
    LossSpec,
    count_terms,
    flatten_rows,
    output_grad,
    output_hessian_sqrt,
    sample_targets,
)
from curvmerge.statistics.base import CurvatureComputer
from curvmerge.statistics.per_example import DEFAULT_MEMORY_BUDGET, PerExampleSquares

__all__ = [
    "FISHER_KINDS",
    "check_kind",
    "fisher_cotangents",
    "fisher_batches",
    "diagonal_squares",
    "DiagonalSquares",
    "DiagonalTooCostlyError",
]

FISHER_KINDS = ("exact", "mc", "empirical")


class DiagonalTooCostlyError(ValueError, NotImplementedError):
    """The exact diagonal would need an output-Hessian factor past the memory budget (a
    language model's vocabulary); ``kind="mc"`` estimates it instead. A ``NotImplementedError``
    too, so that callers that can do without a diagonal (a merge's damping scale, its warm
    start) fall back to what they use then."""


def check_kind(kind: str, mc_samples: int) -> None:
    """Refuse an unknown curvature kind or a bad ``mc_samples`` (shared by every computer)."""
    if kind not in FISHER_KINDS:
        raise ValueError(f"kind must be one of {', '.join(FISHER_KINDS)}; got {kind!r}")
    if kind == "mc" and (
        not isinstance(mc_samples, int) or isinstance(mc_samples, bool) or mc_samples < 1
    ):
        raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}")


# Cross-entropy with at most this many classes uses a rank C-1 Hessian factor (one backward
# pass fewer per row); above it the factor of :func:`output_hessian_sqrt` is used as is.
_REDUCE_MAX_CLASSES = 64


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
    max_factor_bytes: int | None = None,
) -> Iterable[tuple[Tensor, float]]:
    """Output cotangents ``V`` (shaped as ``out``) and weights ``w`` such that the kind's
    diagonal is :math:`c \\sum_V w \\sum_n (\\nabla_\\theta\\, V_n^\\top f_n)^{\\odot 2}`.

    Empirical: one cotangent (the loss gradient of every row). MC: one per sample. Exact:
    one per column of the Hessian factor and per row position within an example (rows of one
    example are never mixed, since :math:`H_n` is block diagonal over its rows).

    Raises:
        ValueError: ``kind="exact"`` whose ``[M, C, C]`` Hessian factor would exceed
            ``max_factor_bytes`` (a language model's vocabulary): use ``"mc"``.
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
        nbytes = f.shape[0] * C * C * f.element_size()
        if max_factor_bytes is not None and nbytes > max_factor_bytes:
            raise DiagonalTooCostlyError(
                f"kind='exact' with {C} classes needs a [{f.shape[0]}, {C}, {C}] output-Hessian "
                f"factor ({nbytes / 2**30:.3g} GiB, above the memory budget of "
                f"{max_factor_bytes / 2**30:.3g} GiB) and {C - 1} backward passes per row "
                "position; use kind='mc' (Monte-Carlo Fisher, mc_samples backward passes) "
                "for large vocabularies"
            )
        if spec.name == "mse":
            # H = 2I: unit cotangents of weight 2, exact in every dtype (the factor sqrt(2) I
            # is not: in bfloat16 it is 1.4140625, every square 2.3e-4 too small)
            S, weight = torch.eye(C, dtype=f.dtype, device=f.device).expand(f.shape[0], C, C), 2.0
        else:
            S, weight = _hessian_factor(spec, f), 1.0
        counts = torch.bincount(example, minlength=out.shape[0])
        starts = counts.cumsum(0) - counts
        slot = torch.arange(f.shape[0], device=f.device) - starts[example]
        for s in range(int(slot.max()) + 1):
            rows = (slot == s).nonzero().squeeze(1)
            for k in range(S.shape[2]):
                yield place(rows, S[rows, :, k]), weight


def fisher_batches(
    computer: CurvatureComputer,
    kind: str,
    forward: Callable[[object], Tensor],
    *,
    mc_samples: int = 1,
    seed: int | Callable[[int], int] = 0,
    max_factor_bytes: int | None = None,
    desc: str | None = None,
    progress: bool = False,
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[Tensor, Iterable[tuple[Tensor, float]], int, int]]:
    """One pass over ``computer``'s data yielding, per batch, ``(out, cotangents, examples,
    terms)``: the output ``forward(inputs)``, the kind's :func:`fisher_cotangents` of it, the
    batch's examples and loss terms (the ``"mean"`` normaliser's share).

    The loop every computer that sums over output cotangents shares (diagonal Fisher,
    K-FAC): inputs and targets moved to the device (floating ones cast to ``dtype``,
    default the computer's), the ``mc`` labels drawn from a CPU generator seeded with
    ``seed`` (:meth:`~CurvatureComputer.rank_seed`: another seed on each process but the
    main one), or with ``seed(index)`` per batch (that pass then needs the batches of the
    computer's first such pass: checked). ``out`` and the cotangents are released before the
    next batch's forward pass.
    """
    per_batch = callable(seed)
    generator = None if per_batch else torch.Generator().manual_seed(computer.rank_seed(seed))
    dtype = computer.dtype if dtype is None else dtype
    batches = computer.batches(desc, progress, same_batches=per_batch and kind == "mc", dtype=dtype)
    for index, inputs, targets in batches:
        if per_batch:
            generator = torch.Generator().manual_seed(seed(index))
        targets = move_batch(targets, computer.device, dtype)
        out = forward(inputs)
        cots = fisher_cotangents(
            computer.loss,
            kind,
            out,
            targets,
            mc_samples=mc_samples,
            generator=generator,
            max_factor_bytes=max_factor_bytes,
        )
        yield out, cots, batch_size(inputs), count_terms(computer.loss, targets)
        del out, cots


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


@dataclass
class DiagonalSquares:
    """What :func:`diagonal_squares` measured.

    Attributes:
        sums: :math:`\\sum_V w_V \\sum_n (\\nabla_\\theta V_n^\\top f_n)^{\\odot 2}`, flat
            over the computer's space, in at least float32 (not yet multiplied by :math:`c`).
        num_examples: Examples read (by all the processes with ``distributed``).
        num_terms: Loss terms counted (the ``"mean"`` normaliser of the data read).
    """

    sums: Tensor
    num_examples: int
    num_terms: int


def diagonal_squares(
    computer: CurvatureComputer,
    *,
    kind: str = "exact",
    mc_samples: int = 1,
    seed: int | Callable[[int], int] = 0,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = False,
    model: nn.Module | None = None,
) -> DiagonalSquares:
    """One pass over ``computer``'s data summing the kind's per-example squares (and,
    when the computer is ``distributed``, over the processes' shards: one sum at the end).

    Args:
        computer: Model, loss, data and selected parameters.
        kind: ``"exact"``, ``"mc"`` or ``"empirical"``.
        mc_samples: Labels sampled per example for ``kind="mc"``.
        seed: Seed of the CPU generator that draws the ``mc`` labels, or a function of the
            batch index giving each batch its own seed (as the GGN operator's samples are
            drawn; that pass then needs the batches of the operator's first pass, checked).
        memory_budget: Bytes the engine may use for per-example gradients at once; the
            exact kind's ``[M, C, C]`` output-Hessian factor of a batch may use the larger of
            this and ``DEFAULT_MEMORY_BUDGET`` (past it, ``"exact"`` is refused).
        progress: Show a progress bar over the batches.
        model: Run this module instead of ``computer.model`` (a copy of it in another
            dtype, with the same parameter names); inputs are cast to its dtype.
    """
    check_kind(kind, mc_samples)
    model = computer.model if model is None else model
    space = computer.space
    named = dict(model.named_parameters())
    dtype = named[space.names[0]].dtype
    requires = {n: p.requires_grad for n, p in named.items()}
    num_examples = num_terms = 0
    with computer.shard_pass():
        try:
            for n in space.names:
                named[n].requires_grad_(True)
            with PerExampleSquares(model, space.names, memory_budget) as engine:
                batches = fisher_batches(
                    computer,
                    kind,
                    lambda inputs: engine.forward(lambda x: model_outputs(model, x), inputs),
                    mc_samples=mc_samples,
                    seed=seed,
                    max_factor_bytes=max(memory_budget, DEFAULT_MEMORY_BUDGET),
                    desc=f"diagonal Fisher ({kind})",
                    progress=progress,
                    dtype=dtype,
                )
                for out, cots, examples, terms in batches:
                    num_examples += examples
                    num_terms += terms
                    _accumulate_all(engine, out, cots)
                    engine.release()
                    del out
                squares = engine.squares
        finally:
            for n, p in named.items():
                p.requires_grad_(requires[n])
    acc = torch.promote_types(dtype, torch.float32)
    sums = torch.cat([squares[n].reshape(-1).to(acc) for n in space.names])
    num_examples, num_terms = computer.sum_over_ranks([sums], [num_examples, num_terms])
    computer.check_examples(num_examples)
    return DiagonalSquares(sums, num_examples, num_terms)
