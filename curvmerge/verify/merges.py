"""Merge-level comparison: what the curvature approximation does to the merged model.

:func:`compare_merges` merges the same models with several curvatures (identity = naive
averaging, diagonal Fisher, exact GGN/Fisher solved by CG, ...), evaluates every merged
model on every task with that task's own head, and measures the distances between the
merged points and the CG history.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from curvmerge.batches import model_outputs
from curvmerge.merging import load_merged, merge, parameters_of
from curvmerge.operators.base import LinearOperator
from curvmerge.space import ParamSpace

__all__ = ["MethodOutcome", "MergeComparison", "compare_merges", "evaluate_classifier"]


@dataclass
class MethodOutcome:
    """One merge, evaluated on every task.

    Attributes:
        name: Label of the method (``"naive"``, ``"diagonal"``, ``"exact"``, ``"task"``).
        per_task: ``{task: {"loss", "accuracy", "n"}}``.
        mean_accuracy: Mean of the per-task accuracies.
        mean_loss: Mean of the per-task losses.
        report: The merge's :class:`~curvmerge.MergeReport` as a dict (``None`` for the
            unmerged task models).
        seconds: Wall-clock time of the merge.
        params: The merged parameters (not serialised).
    """

    name: str
    per_task: dict[str, dict[str, float]]
    mean_accuracy: float
    mean_loss: float
    report: dict | None = None
    seconds: float = 0.0
    params: dict[str, Tensor] | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "params"}
        return out


@dataclass
class MergeComparison:
    """Merges of the same models with different curvatures.

    Attributes:
        tasks: Task names, in model order.
        methods: One :class:`MethodOutcome` per merge (and ``"task"``: each task's own
            fine-tuned model on its own task, the reference).
        distances: ``{a: {b: ||theta_a - theta_b||}}`` between merged points.
        distance_to_tasks: ``{method: {task: ||theta_method - theta_task||}}``.
        spread: :math:`\\max_t \\|\\theta_t - \\bar\\theta\\|` of the task models around their
            average, the scale against which distances are small or large.
        residual_history: ``{method: [relative residual after each CG iteration]}``.
        num_parameters: Size :math:`P` of the merged space.
    """

    tasks: list[str]
    methods: list[MethodOutcome]
    distances: dict[str, dict[str, float]]
    distance_to_tasks: dict[str, dict[str, float]]
    spread: float
    residual_history: dict[str, list[float]]
    num_parameters: int

    def method(self, name: str) -> MethodOutcome:
        for m in self.methods:
            if m.name == name:
                return m
        raise KeyError(f"no method {name!r}; have {[m.name for m in self.methods]}")

    def to_dict(self) -> dict:
        out = dict(self.__dict__)
        out["methods"] = [m.to_dict() for m in self.methods]
        return out


def _examples(data) -> Iterable[tuple[object, Tensor]]:
    if hasattr(data, "inputs") and hasattr(data, "labels"):
        data = (data.inputs, data.labels)
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor):
        X, y = data
        return [(X[i : i + 512], y[i : i + 512]) for i in range(0, len(y), 512)]
    return data


@torch.no_grad()
def evaluate_classifier(model: nn.Module, data) -> dict[str, float]:
    """Mean cross-entropy and accuracy of a classifier.

    Args:
        model: A classifier (logits, or outputs with ``.logits``).
        data: An object with ``.inputs`` and ``.labels``, a pair of tensors ``(X, y)`` or
            an iterable of ``(inputs, labels)`` batches.

    Returns:
        ``{"loss": ..., "accuracy": ..., "n": ...}``.
    """
    was_training = model.training
    model.eval()
    total, correct, n = 0.0, 0, 0
    device = next(model.parameters()).device
    for inputs, labels in _examples(data):
        inputs = inputs.to(device) if isinstance(inputs, Tensor) else inputs
        labels = labels.to(device)
        logits = model_outputs(model, inputs)
        total += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
        n += int(labels.numel())
    model.train(was_training)
    if n == 0:
        return {"loss": math.nan, "accuracy": math.nan, "n": 0}
    return {"loss": total / n, "accuracy": correct / n, "n": n}


def _outcome(name, models, eval_data, tasks, params, report=None, seconds=0.0):
    per_task = {}
    for t, (model, data) in enumerate(zip(models, eval_data, strict=True)):
        merged = load_merged(model, params) if params is not None else model
        per_task[tasks[t]] = evaluate_classifier(merged, data)
    accs = [v["accuracy"] for v in per_task.values()]
    losses = [v["loss"] for v in per_task.values()]
    return MethodOutcome(
        name,
        per_task,
        sum(accs) / len(accs),
        sum(losses) / len(losses),
        report,
        seconds,
        params,
    )


def compare_merges(
    models: Sequence[nn.Module],
    eval_data: Sequence,
    curvatures: Mapping[str, Sequence[LinearOperator] | None],
    *,
    params: str | Sequence[str] | None = None,
    task_names: Sequence[str] | None = None,
    weights: Sequence[float] | None = None,
    damping: float = 1e-3,
    damping_scale: str | float = "auto",
    prior="mean",
    rtol: float = 1e-6,
    maxiter: int | None = None,
    preconditioner="diagonal",
    include_task_models: bool = True,
) -> MergeComparison:
    """Merge ``models`` once per entry of ``curvatures`` and evaluate every merge per task.

    Args:
        models: The task models (same body, each with its own head).
        eval_data: One evaluation set per task (see :func:`evaluate_classifier`).
        curvatures: ``{method: [F_1, ..., F_T] or None}``; ``None`` is naive averaging.
        params: Names or regex of the merged parameters (needed for ``None`` curvatures;
            with operators their space decides).
        task_names: Labels of the tasks (default ``task0``, ...).
        weights, damping, damping_scale, prior, rtol, maxiter, preconditioner: Passed to
            :func:`~curvmerge.merge` (``damping_scale=1.0``: ``damping`` is the absolute
            :math:`\\lambda`).
        include_task_models: Also evaluate each unmerged task model on every task.

    Returns:
        A :class:`MergeComparison`.
    """
    T = len(models)
    if len(eval_data) != T:
        raise ValueError(f"got {len(eval_data)} evaluation sets for {T} models")
    tasks = list(task_names) if task_names is not None else [f"task{t}" for t in range(T)]
    outcomes: list[MethodOutcome] = []
    history: dict[str, list[float]] = {}
    space = None
    for name, curv in curvatures.items():
        start = time.perf_counter()
        result = merge(
            models,
            curv,
            weights=weights,
            damping=damping,
            damping_scale=damping_scale,
            prior=prior,
            params=params if curv is None else None,
            rtol=rtol,
            maxiter=maxiter,
            preconditioner=preconditioner,
        )
        seconds = time.perf_counter() - start
        space = space or ParamSpace.from_tensors(result.params)
        report = asdict(result.report)
        history[name] = list(result.report.residual_history)
        outcomes.append(_outcome(name, models, eval_data, tasks, result.params, report, seconds))
    if space is None:
        raise ValueError("curvatures is empty")
    flat = {o.name: space.flatten(o.params).double() for o in outcomes}
    thetas = [space.flatten(parameters_of(m)).double() for m in models]
    mean = sum(thetas) / T
    spread = max(float(torch.linalg.vector_norm(th - mean)) for th in thetas)
    distances = {
        a: {b: float(torch.linalg.vector_norm(flat[a] - flat[b])) for b in flat} for a in flat
    }
    to_tasks = {
        a: {tasks[t]: float(torch.linalg.vector_norm(flat[a] - thetas[t])) for t in range(T)}
        for a in flat
    }
    if include_task_models:
        per_task = {}
        for t, (model, data) in enumerate(zip(models, eval_data, strict=True)):
            per_task[tasks[t]] = evaluate_classifier(model, data)
        accs = [v["accuracy"] for v in per_task.values()]
        losses = [v["loss"] for v in per_task.values()]
        outcomes.insert(
            0, MethodOutcome("task", per_task, sum(accs) / T, sum(losses) / T, None, 0.0)
        )
    return MergeComparison(tasks, outcomes, distances, to_tasks, spread, history, space.size)
