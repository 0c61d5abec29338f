"""Evaluating merged bodies with every task's head, and the majority-class reference.

:class:`Evaluator` keeps one working copy of each task model; a body (a dict of the shared
parameters) is copied into the copies before each evaluation, so nothing is deep-copied per
evaluation and the pool's own models are never modified (curvature operators keep reading
them). Every evaluation returns the full metrics of :func:`curvmerge.train.evaluate` per task;
:meth:`Evaluator.scores` turns them into the selection scores (higher is better: MSE and loss
are negated).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from curvmerge.experiment.pools import TaskData, label_batches
from curvmerge.merging.ensemble import EnsembleResult
from curvmerge.merging.registry import task_models
from curvmerge.train import METRICS, as_examples, classification_metrics, evaluate, is_batches

__all__ = ["Evaluator", "majority_metrics", "selection_score"]

Metrics = dict[str, dict[str, Any]]


def selection_score(metrics: Mapping[str, Any], metric: str) -> float:
    """The value of ``metric`` with its sign set so that higher is better."""
    value = float(metrics.get(metric, math.nan))
    return value if METRICS[metric] else -value


def majority_metrics(task: TaskData) -> dict[str, Any]:
    """Test metrics of the majority-class reference: always the most frequent training class
    (for regression, the mean training target). Learned from training labels only
    (:meth:`TaskData.reference_labels`).

    Splits given as batches are read batch by batch (token-level batches may differ in
    length); labels equal to the loss's ``ignore_index`` (padding) are skipped, and ``n``
    counts examples, as :func:`curvmerge.train.evaluate` does.

    Raises:
        ValueError: The task has no training label.
    """
    train = task.reference_labels()
    if train.shape[0] == 0:
        raise ValueError(f"task {task.name!r}: no training labels for the majority class")
    spec = task.loss
    n = 0
    if task.is_regression:
        mean = train.double().mean(0)
        sse, terms = 0.0, 0
        for t in label_batches(task.test):
            rows = t.double().reshape(t.shape[0], -1) if t.ndim else t.double().reshape(1, 1)
            n += int(rows.shape[0])
            sse += float(((rows - mean) ** 2).sum())
            terms += rows.numel()
        mse = sse / terms if terms else math.nan
        return {"mse": mse, "loss": mse, "n": n}
    classes, counts = torch.unique(train, return_counts=True)
    majority = int(classes[counts.argmax()])
    parts = []
    for t in label_batches(task.test):
        n += int(t.shape[0]) if t.ndim else 1
        t = t.reshape(-1)
        parts.append(t[t != spec.ignore_index] if spec.name == "cross_entropy" else t)
    targets = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    out = classification_metrics(torch.full_like(targets, majority), targets)
    return {**out, "loss": math.nan, "n": n}


def _evaluation_data(task: TaskData, split: str):
    """A split as :func:`curvmerge.train.evaluate` reads it: targets equal to the loss's
    ``ignore_index`` become ``-100`` (the padding label that ``evaluate`` skips)."""
    data = getattr(task, split)
    spec = task.loss
    if spec.name != "cross_entropy" or spec.ignore_index == -100:
        return data

    def remap(t):
        t = torch.as_tensor(t)
        return torch.where(t == spec.ignore_index, torch.full_like(t, -100), t)

    if is_batches(data):
        return [(x, remap(t)) for x, t in data]
    inputs, labels = as_examples(data)
    return inputs, remap(labels)


class Evaluator:
    """Evaluates bodies, modules and merge results on every task.

    Args:
        models: The task models (copied once; the originals are never modified).
        tasks: The task pool, one task per model.
        params: The shared parameter names a body holds.
        batch_size: Evaluation batch size.

    Attributes:
        seconds: Time spent evaluating.
        calls: ``{split: number of per-task evaluations}`` (the test split is evaluated once
            per table row).
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        tasks: Sequence[TaskData],
        params: Sequence[str],
        *,
        batch_size: int = 256,
    ):
        if len(models) != len(tasks):
            raise ValueError(f"{len(models)} models for {len(tasks)} tasks")
        self.models = list(models)
        self.tasks = list(tasks)
        self.params = list(params)
        self.batch_size = batch_size
        self.work = [copy.deepcopy(m).eval() for m in models]
        self.seconds = 0.0
        self.calls: dict[str, int] = {}

    def _evaluate(self, model: nn.Module, k: int, split: str) -> dict[str, Any]:
        task = self.tasks[k]
        self.calls[split] = self.calls.get(split, 0) + 1
        return evaluate(
            model, _evaluation_data(task, split), batch_size=self.batch_size, loss=task.loss.name
        )

    def body(self, params: Mapping[str, Tensor], split: str) -> Metrics:
        """Metrics per task of ``params`` read with each task's own head."""
        start = time.perf_counter()
        out = {}
        for k, (task, model) in enumerate(zip(self.tasks, self.work, strict=True)):
            own = dict(model.named_parameters())
            with torch.no_grad():
                for n in self.params:
                    own[n].copy_(params[n])
            out[task.name] = self._evaluate(model, k, split)
        self.seconds += time.perf_counter() - start
        return out

    def modules(self, modules: Sequence[nn.Module], split: str) -> Metrics:
        """Metrics per task of one module per task."""
        start = time.perf_counter()
        out = {
            task.name: self._evaluate(m, k, split)
            for k, (task, m) in enumerate(zip(self.tasks, modules, strict=True))
        }
        self.seconds += time.perf_counter() - start
        return out

    def result(self, result, split: str) -> Metrics:
        """Metrics per task of a :class:`~curvmerge.merging.MergeResult` (its body with each
        head) or an :class:`~curvmerge.merging.EnsembleResult` (its members)."""
        if isinstance(result, EnsembleResult):
            return self.modules(task_models(result, self.models), split)
        return self.body(result.params, split)

    def scores(self, metrics: Metrics) -> dict[str, float]:
        """Per task, the selection score (each task's own metric; higher is better)."""
        return {t.name: selection_score(metrics[t.name], t.metric) for t in self.tasks}

    def validate(self, result) -> dict[str, float]:
        """The selection scores of ``result`` on the validation splits (a sweep callback)."""
        return self.scores(self.result(result, "val"))
