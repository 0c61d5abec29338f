"""The model pool and the task pool of an experiment.

A :class:`ModelPool` holds one fine-tuned model per task (each with its own head), the
optional base model they were fine-tuned from, and which parameters are shared (merged): by
default the *body*, everything outside the head that :func:`curvmerge.models.head_prefix`
finds. A :class:`TaskData` holds one task's data: the examples curvature statistics are
computed on (drawn from ``train``, or given as batches), validation examples (coefficients
are chosen there) and test examples (reported once), with the task's loss (a
:class:`~curvmerge.losses.LossSpec`, such as a data file's
:attr:`curvmerge.data.files.DataBatches.loss`, carried to every statistic and evaluation) and
the metric that chooses. Splits given as batches are read batch by batch: batches may differ
in shape (token-level targets padded per batch).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from curvmerge.losses import LossSpec, resolve_loss
from curvmerge.train import METRICS, Data, as_examples, is_batches, iter_batches

__all__ = [
    "LOSSES",
    "ModelPool",
    "TaskData",
    "fisher_batches",
    "first_examples",
    "label_batches",
    "labels_of",
    "task_labels",
    "shared_parameters",
]

#: Losses a task may have (the names of :mod:`curvmerge.losses`).
LOSSES = ("cross_entropy", "bce", "mse")


@dataclass
class TaskData:
    """One task of the task pool.

    Attributes:
        name: The task's name (a column of the tables).
        val: Validation examples (see :data:`curvmerge.train.Data`, or an iterable of
            ``(inputs, targets)`` batches such as data-file batches): coefficients are
            chosen here.
        test: Test examples: reported once per row, never used to choose.
        train: Training examples; statistics batches are drawn from them (``fisher_examples``
            seeded examples; from batches, the first batches holding that many) unless
            ``fisher_batches`` is given, and the majority-class reference predicts their
            most frequent class.
        fisher_batches: ``(inputs, targets)`` batches for the curvature statistics (overrides
            drawing from ``train``).
        loss: A :class:`~curvmerge.losses.LossSpec` or a name (``"cross_entropy"``,
            ``"bce"``, ``"mse"`` for regression); a name becomes ``LossSpec(name)``. The spec
            is handed as it is to the statistics (so ``classes_last=True`` of token-level
            data reaches them: needed when the sequence length equals the number of
            classes), and its ``ignore_index`` marks the targets that evaluation and the
            majority class skip.
        metric: The validation metric that chooses coefficients: ``"accuracy"``,
            ``"macro_f1"``, ``"mse"`` or ``"loss"`` (the last two are minimised); default
            accuracy, or MSE for ``loss="mse"``.
    """

    name: str
    val: Data
    test: Data
    train: Data | None = None
    fisher_batches: list[tuple[Any, Tensor]] | None = None
    loss: LossSpec | str = "cross_entropy"
    metric: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.loss, (str, LossSpec)):
            raise ValueError(
                f"task {self.name!r}: loss must be a LossSpec or one of {', '.join(LOSSES)}, "
                f"got {self.loss!r}"
            )
        try:
            self.loss = resolve_loss(self.loss)
        except ValueError as err:
            raise ValueError(f"task {self.name!r}: {err}") from None
        if self.metric is None:
            self.metric = "mse" if self.loss.name == "mse" else "accuracy"
        if self.metric not in METRICS:
            raise ValueError(
                f"task {self.name!r}: metric must be one of {', '.join(METRICS)}, "
                f"got {self.metric!r}"
            )
        if self.loss.name == "mse" and self.metric in ("accuracy", "macro_f1"):
            raise ValueError(f"task {self.name!r}: a regression task (loss mse) has no accuracy")
        if self.loss.name != "mse" and self.metric == "mse":
            raise ValueError(f"task {self.name!r}: metric mse needs loss mse")
        if self.train is None and self.fisher_batches is None:
            raise ValueError(f"task {self.name!r}: give train examples or fisher_batches")

    @property
    def is_regression(self) -> bool:
        """Whether the task is scored by MSE (``loss="mse"``)."""
        return self.loss.name == "mse"

    def reference_labels(self) -> Tensor:
        """The labels the majority-class reference learns from: ``train``, else the
        statistics batches (training examples too), never the test split.

        Read batch by batch (batches may differ in length): for regression the targets as
        rows ``[N, k]``; otherwise the labels as one vector ``[M]`` (token-level labels
        flattened), without the loss's ``ignore_index`` (padding).
        """
        data = self.train if self.train is not None else self.fisher_batches
        return task_labels(data, self.loss)


def label_batches(data: Data | Iterable[tuple[Any, Tensor]]) -> Iterator[Tensor]:
    """The targets of :data:`~curvmerge.train.Data` (one tensor) or of ``(inputs, targets)``
    batches (one tensor per batch, shapes as they are)."""
    if not is_batches(data):
        yield as_examples(data)[1]
        return
    for _, targets in data:
        yield torch.as_tensor(targets)


def task_labels(
    data: Data | Iterable[tuple[Any, Tensor]], loss: LossSpec | str = "cross_entropy"
) -> Tensor:
    """The labels of ``data`` read batch by batch: targets as rows ``[N, k]`` for MSE, else
    one vector ``[M]`` of the labels that are not the loss's ``ignore_index``."""
    spec = resolve_loss(loss)
    parts = []
    for t in label_batches(data):
        if spec.name == "mse":
            parts.append(t.reshape(t.shape[0], -1) if t.ndim else t.reshape(1, 1))
            continue
        t = t.reshape(-1)
        if spec.name == "cross_entropy":
            t = t[t != spec.ignore_index]
        parts.append(t)
    if not parts:
        return torch.zeros(0, 1) if spec.name == "mse" else torch.zeros(0, dtype=torch.long)
    return torch.cat(parts)


def labels_of(data: Data | Sequence[tuple[Any, Tensor]]) -> Tensor:
    """The labels of :data:`~curvmerge.train.Data` or of ``(inputs, targets)`` batches, one
    row per example (``[N, k]``; token targets of batches padded to different lengths are
    flattened to ``[M, 1]``)."""
    if not is_batches(data):
        labels = as_examples(data)[1]
        return labels.reshape(labels.shape[0], -1)
    parts = [torch.as_tensor(t) for _, t in data]
    if not parts:
        return torch.zeros(0, 1)
    if len({p.shape[1:] for p in parts}) > 1:
        return torch.cat([p.reshape(-1, 1) for p in parts])
    return torch.cat([p.reshape(p.shape[0], -1) for p in parts])


def fisher_batches(data: Data, examples: int | None, batch_size: int, seed: int) -> list:
    """``examples`` examples of ``data`` drawn without replacement (seeded), as batches
    (``data`` given as batches: the first ``examples`` examples, the last batch cut to
    size when its inputs are a tensor or a dict of tensors).

    The draw is ``torch.randperm(n, generator=manual_seed(seed))[:examples]``, the one
    ``curvmerge fisher`` makes, so the same settings give the same Fisher.

    Args:
        data: Examples with labels.
        examples: How many (``None`` or more than there are: all, in the drawn order).
        batch_size: Examples per batch.
        seed: Seed of the draw.
    """
    if is_batches(data):
        batches = first_examples(list(data), examples)
        return _cut(batches, examples) if examples is not None else batches
    inputs, labels = as_examples(data)
    n = int(labels.shape[0])
    if n == 0:
        raise ValueError("no training examples to compute statistics on")
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if examples is not None:
        idx = idx[: min(int(examples), n)]
    if isinstance(inputs, Mapping):
        sub: Any = {**{k: v[idx] for k, v in inputs.items()}, "labels": labels[idx]}
    else:
        sub = (inputs[idx], labels[idx])
    return list(iter_batches(sub, batch_size))


def _cut(batches: list, n: int) -> list:
    """``batches`` with the last one cut so that they hold ``n`` examples (when it can be)."""
    from curvmerge.batches import batch_size

    if not batches:
        return batches
    extra = sum(batch_size(b[0]) for b in batches) - int(n)
    inputs, targets = batches[-1]
    size = batch_size(inputs)
    if extra <= 0 or extra >= size:
        return batches
    keep = size - extra

    def head(x):
        return x[:keep] if isinstance(x, Tensor) and x.ndim and x.shape[0] == size else x

    if isinstance(inputs, Tensor):
        cut = head(inputs)
    elif isinstance(inputs, Mapping):
        cut = {k: head(v) for k, v in inputs.items()}
    else:
        return batches
    return [*batches[:-1], (cut, head(torch.as_tensor(targets)))]


def first_examples(batches: Sequence, n: int | None) -> list:
    """The first batches of ``batches`` holding at least ``n`` examples (all if fewer)."""
    from curvmerge.batches import batch_size

    if n is None:
        return list(batches)
    out, total = [], 0
    for batch in batches:
        if total >= n:
            break
        out.append(batch)
        total += batch_size(batch[0])
    return out


def shared_parameters(
    models: Sequence[nn.Module],
    params: str | Sequence[str] | None = None,
    *,
    base: nn.Module | None = None,
) -> list[str]:
    """The names of the merged parameters, checked to exist with one shape in every model.

    Args:
        models: The task models.
        params: A regex (:func:`re.search`) or a list of names; ``None``: the body of the
            first model (:func:`curvmerge.models.body_names`), or, for a model without a
            recognisable head, every parameter.
        base: Checked too, when given.

    Raises:
        ValueError: Naming the first model and parameter that differ, or a regex that selects
            nothing.
    """
    from curvmerge.models import body_names

    first = dict(models[0].named_parameters())
    if params is None:
        try:
            names = body_names(models[0])
        except ValueError:
            names = list(first)
    elif isinstance(params, str):
        try:
            pattern = re.compile(params)
        except re.error as err:
            raise ValueError(
                f"params {params!r} is not a valid regular expression: {err}"
            ) from None
        names = [n for n in first if pattern.search(n)]
        if not names:
            raise ValueError(f"params {params!r} selects no parameter of the first model")
    else:
        names = list(params)
        missing = [n for n in names if n not in first]
        if missing:
            raise ValueError(f"the first model has no parameter {missing[0]!r}")
    if not names:
        raise ValueError("no shared parameter to merge")
    others = [(f"model {i}", m) for i, m in enumerate(models) if i > 0]
    if base is not None:
        others.append(("the base model", base))
    for who, model in others:
        own = dict(model.named_parameters())
        for n in names:
            if n not in own:
                raise ValueError(f"{who} has no parameter {n!r} (different architectures?)")
            if own[n].shape != first[n].shape:
                raise ValueError(
                    f"{who}: parameter {n!r} has shape {tuple(own[n].shape)}, model 0 "
                    f"{tuple(first[n].shape)} (different architectures?)"
                )
    return names


@dataclass
class ModelPool:
    """The models of an experiment.

    Attributes:
        models: One fine-tuned model per task, in the task pool's order; each keeps its own
            head (the parameters outside ``params``).
        base: The model they were fine-tuned from (task arithmetic, TIES, DARE and
            ``prior="base"`` need it; it is also a reference row).
        params: The shared (merged) parameters: a regex or a list of names; ``None``: the
            body (see :func:`shared_parameters`).
        names: A label per model (default: the task names).
        info: Per model, how it was obtained (source, path; recorded in the JSON).
        tokenizer: The tokenizer the text tasks were encoded with, if any.
        handles: Per model, what its source returned when that is more than the module
            (e.g. a ``curvmerge.hf.HFModel`` with its config and tokenizer), for writers of
            merged models.
    """

    models: Sequence[nn.Module]
    base: nn.Module | None = None
    params: str | Sequence[str] | None = None
    names: Sequence[str] | None = None
    info: list[dict[str, Any]] = field(default_factory=list)
    tokenizer: Any = None
    handles: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.models = list(self.models)
        if not self.models:
            raise ValueError("the model pool is empty")
        for i, m in enumerate(self.models):
            if not isinstance(m, nn.Module):
                raise TypeError(f"model {i} is a {type(m).__name__}, not a torch.nn.Module")
        self._shared: list[str] | None = None

    def shared_names(self) -> list[str]:
        """The merged parameter names (computed and checked once)."""
        if self._shared is None:
            self._shared = shared_parameters(self.models, self.params, base=self.base)
        return self._shared
