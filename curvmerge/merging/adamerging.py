"""AdaMerging: merging coefficients learned by entropy minimisation on unlabelled inputs.

Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024. The
merge is task arithmetic with learned coefficients,

.. math::

    \\theta(\\lambda) = \\theta_0 + \\sum_t \\lambda_t \\tau_t \\quad\\text{(task-wise)},
    \\qquad
    \\theta^{(g)}(\\lambda) = \\theta_0^{(g)} + \\sum_t \\lambda_{t,g} \\tau_t^{(g)}
    \\quad\\text{(layer-wise)},

with :math:`\\tau_t = \\theta_t - \\theta_0`, and :math:`\\lambda` chosen to minimise the mean
Shannon entropy of the merged models' predictions on unlabelled inputs of every task,

.. math::

    \\mathcal{L}(\\lambda) = \\frac{1}{T} \\sum_t \\frac{1}{|B_t|} \\sum_{x \\in B_t}
    H\\big(\\operatorname{softmax} f_t(x; \\theta(\\lambda))\\big), \\qquad
    H(p) = -\\sum_c p_c \\log p_c,

where :math:`f_t` is task :math:`t`'s own network (its head and every parameter that is not
merged are its own) run with the merged parameters. The labels are never read.

:class:`AdaMergingObjective` is :math:`\\mathcal{L}` as a differentiable function of the
coefficients; :func:`adamerging` minimises it with Adam.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from curvmerge.batches import check_deterministic, iterate_batches, logits_from, move_batch
from curvmerge.memory import PeakMemory
from curvmerge.merging.methods import (
    MethodReport,
    check_finite_scalar,
    flatten_models,
    method_report,
)
from curvmerge.merging.report import MergeResult
from curvmerge.merging.system import check_weights

__all__ = [
    "adamerging",
    "AdaMergingObjective",
    "AdaMergingReport",
    "AdaptationReport",
    "GroupedTaskArithmetic",
    "GRANULARITIES",
]

#: The coefficient granularities: one per task, or one per task and merged parameter tensor.
GRANULARITIES = ("task", "layer")

Model = nn.Module | Mapping[str, Tensor]


def entropy(logits: Tensor) -> Tensor:
    """Per-example Shannon entropy (nats) of ``softmax(logits)``, in at least float32."""
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
    return -(logp.exp() * logp).sum(-1)


class GroupedTaskArithmetic:
    """Task arithmetic with one coefficient per task and group of merged tensors,

    .. math::

        \\theta^{(g)}(\\lambda) = \\theta_0^{(g)} + \\sum_t \\lambda_{t,g} \\tau_t^{(g)},

    as a differentiable function of :math:`\\lambda` (``[T, G]``). Shared by the methods
    that learn their coefficients (AdaMerging, data-adaptive weight ensembling).

    **Groups.** ``granularity="task"``: one group holding every merged tensor, coefficients
    ``[T, 1]``. ``granularity="layer"``: one group per merged parameter tensor (a layer's
    weight and bias have a coefficient each, as in AdaMerging's implementation, which
    learns one per parameter tensor), coefficients ``[T, G]`` with :math:`G` the number of
    merged tensors, in the order of :attr:`groups`. Both are computed by the same
    arithmetic, so layer-wise coefficients that are equal across groups give bit for bit
    the task-wise merge.

    Args:
        flat: The flattened models and base (:func:`~curvmerge.merging.methods.flatten_models`).
        granularity: ``"task"`` or ``"layer"``.
    """

    def __init__(self, flat, granularity: str) -> None:
        if granularity not in GRANULARITIES:
            raise ValueError(
                f"granularity must be one of {', '.join(map(repr, GRANULARITIES))}, "
                f"got {granularity!r}"
            )
        self.granularity = granularity
        self.flat = flat
        self.space = flat.space
        self.base = flat.base
        self.task_vectors = flat.task_vectors  # [T, P]
        self.groups: list[list[str]] = (
            [list(flat.space.names)] if granularity == "task" else [[n] for n in flat.space.names]
        )
        self._slices = flat.space.slices()
        self._group_of = {n: g for g, names in enumerate(self.groups) for n in names}
        self.device = flat.thetas.device
        self.dtype = flat.thetas.dtype  # of the coefficients and the merge arithmetic

    @property
    def num_models(self) -> int:
        return int(self.task_vectors.shape[0])

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    def full(self, value: float | Sequence[float]) -> Tensor:
        """Coefficients ``[T, G]`` equal to ``value`` (a number, or one per task)."""
        v = torch.as_tensor(value, dtype=self.dtype, device=self.device)
        return v.reshape(-1, 1).expand(self.num_models, self.num_groups).clone()

    def merged(self, coefficients: Tensor) -> dict[str, Tensor]:
        """:math:`\\theta(\\lambda)`, differentiable in ``coefficients`` (``[T, G]``), each
        tensor in its model dtype and device."""
        lam = self.check(coefficients)
        out = {}
        for name in self.space.names:
            sl = self._slices[name]
            g = self._group_of[name]
            vec = self.base[sl] + lam[:, g] @ self.task_vectors[:, sl]
            ref = self.flat.reference[name]
            out[name] = vec.reshape(ref.shape).to(dtype=ref.dtype)
        return out

    def check(self, coefficients: Tensor) -> Tensor:
        """``coefficients`` in the merge's dtype and device; ``ValueError`` unless ``[T, G]``."""
        want = (self.num_models, self.num_groups)
        if not isinstance(coefficients, Tensor) or tuple(coefficients.shape) != want:
            got = tuple(coefficients.shape) if isinstance(coefficients, Tensor) else coefficients
            raise ValueError(f"coefficients must have shape {want} (tasks, groups), got {got}")
        return coefficients.to(device=self.device, dtype=self.dtype)


def run_task_model(model: nn.Module, params: Mapping[str, Tensor], inputs) -> Tensor:
    """The class logits ``[N, C]`` of ``model`` run on ``inputs`` with ``params`` (a full
    parameter dict) swapped in through :func:`torch.func.functional_call`."""
    if isinstance(inputs, Mapping):
        out = functional_call(model, dict(params), (), dict(inputs))
    else:
        out = functional_call(model, dict(params), (inputs,))
    logits = logits_from(out)
    if logits.ndim != 2 or logits.shape[-1] < 2:
        raise ValueError(
            f"learned coefficients need class logits [N, C] with C >= 2 to take an "
            f"entropy, got shape {tuple(logits.shape)}"
        )
    return logits


def check_task_models(models, data, method: str) -> None:
    """The checks every entropy-minimising method makes on its models and data."""
    if isinstance(models, nn.Module) or not all(isinstance(m, nn.Module) for m in models):
        raise TypeError(f"{method} needs a list of torch.nn.Module models (it runs them)")
    T = len(models)
    if isinstance(data, (Mapping, Tensor)) or len(data) != T:
        n = "a single" if isinstance(data, (Mapping, Tensor)) else len(data)
        raise ValueError(f"data must hold one batch iterable per model: got {n} for {T} models")
    devices = {str(p.device) for m in models for p in m.parameters()}
    if len(devices) > 1:
        raise ValueError(f"the models are on different devices ({sorted(devices)}); move them")
    for t, m in enumerate(models):
        try:
            check_deterministic(m)
        except ValueError as err:
            raise ValueError(f"model {t}: {err}") from None


def read_inputs(models, data) -> tuple[list[list[Any]], list[list[int]]]:
    """Every task's input batches, moved to its model's device and dtype once, and their
    sizes; the targets of the ``(inputs, targets)`` batches are dropped unread."""
    inputs, sizes = [], []
    for t, (model, d) in enumerate(zip(models, data, strict=True)):
        ref = next(model.parameters())
        batches, counts = [], []
        try:
            for x, _ in iterate_batches(d):  # the targets are dropped unread
                batches.append(move_batch(x, ref.device, ref.dtype))
                counts.append(_num_examples(x))
        except ValueError as err:
            raise ValueError(f"data[{t}]: {err}") from None
        inputs.append(batches)
        sizes.append(counts)
    return inputs, sizes


class AdaMergingObjective(GroupedTaskArithmetic):
    """The mean prediction entropy of the merged models as a function of the coefficients.

    A :class:`GroupedTaskArithmetic` (see it for the groups of ``granularity``) that also
    holds every task's inputs (moved to the models' device once; the targets of the
    ``(inputs, targets)`` batches are dropped unread). Calling it builds
    :math:`\\theta(\\lambda)` and runs each task's own module on it through
    :func:`torch.func.functional_call`: no model is copied or modified, and gradients reach
    only the coefficients.

    Args:
        models: The fine-tuned modules (eval mode, or free of dropout and batch norm), on
            one device.
        base: The base :math:`\\theta_0` (module or parameter dict).
        data: One iterable of ``(inputs, targets)`` batches per model, read once; the
            targets are not read.
        granularity: ``"task"`` or ``"layer"``.
        params: Names or a regex selecting the merged parameters (default: every parameter
            of the first model). The others (task heads) are each model's own.

    Raises:
        TypeError: A model is not a module.
        ValueError: A bad granularity, ``data`` without one entry per model, empty data,
            models on several devices or in training mode with dropout or batch norm.
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        base: Model,
        data: Sequence[Any],
        *,
        granularity: str = "task",
        params: str | Sequence[str] | None = None,
        method: str = "adamerging",
    ) -> None:
        check_task_models(models, data, method)
        flat = flatten_models(models, base, params, method=method, needs_base=True)
        super().__init__(flat, granularity)
        self.models = list(models)
        self.inputs, self.sizes = read_inputs(models, data)
        self.own = [{n: p.detach() for n, p in m.named_parameters()} for m in models]

    def task_entropy(self, t: int, merged: Mapping[str, Tensor], batch: int) -> Tensor:
        """Per-example entropies of task ``t``'s batch ``batch`` under ``merged``."""
        try:
            logits = run_task_model(
                self.models[t], {**self.own[t], **merged}, self.inputs[t][batch]
            )
        except ValueError as err:
            raise ValueError(f"model {t}: {err}") from None
        return entropy(logits)

    def __call__(
        self, coefficients: Tensor, batches: Sequence[int] | None = None
    ) -> tuple[Tensor, Tensor]:
        """:math:`\\mathcal{L}(\\lambda)` and the per-task mean entropies ``[T]``.

        Args:
            coefficients: ``[T, G]``.
            batches: One batch index per task (a step), or ``None``: every input of every
                task (each task's mean over all its examples).
        """
        merged = self.merged(coefficients)
        return self.mean_entropies(lambda t, b: self.task_entropy(t, merged, b), batches)

    def mean_entropies(
        self, entropies: Callable[[int, int], Tensor], batches: Sequence[int] | None = None
    ) -> tuple[Tensor, Tensor]:
        """The mean over tasks of each task's mean per-example entropy and the per-task
        means ``[T]``, with ``entropies(t, b)`` the entropies of task ``t``'s batch ``b``
        over every batch (``batches=None``) or the batch ``batches[t]`` of each task."""
        per_task = []
        for t in range(self.num_models):
            which = range(len(self.inputs[t])) if batches is None else [batches[t]]
            total = sum(entropies(t, b).sum() for b in which)
            per_task.append(total / sum(self.sizes[t][b] for b in which))
        per_task = torch.stack(per_task)
        return per_task.mean(), per_task


def _num_examples(inputs) -> int:
    if isinstance(inputs, Mapping):
        return int(next(iter(inputs.values())).shape[0])
    return int(inputs.shape[0])


def check_adaptation(steps: int, lr: float, init: float) -> tuple[int, float, float]:
    """``steps`` (>= 0), ``lr`` (> 0) and ``init`` (finite) of an entropy-minimising method,
    checked; ``ValueError`` naming the bad one."""
    steps = int(steps)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    lr = check_finite_scalar(lr, "lr")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    return steps, lr, check_finite_scalar(init, "init")


def entropy_steps(
    parameters: Sequence[Tensor],
    loss_of: Callable[[list[int]], Tensor],
    num_batches: Sequence[int],
    *,
    steps: int,
    lr: float,
    seed: int,
    desc: str,
    progress: bool = False,
) -> tuple[list[float], float, int | None]:
    """Adam steps (:math:`\\beta = (0.9, 0.999)`) on ``loss_of(batches)``, where step
    :math:`s` takes one batch index per task: each task's batches are cycled through, in an
    order shuffled anew each cycle by a generator seeded with ``seed``.

    Returns:
        The loss of each step (before its update), the steps' seconds and their peak memory
        in bytes (:class:`~curvmerge.memory.PeakMemory`; ``None`` where it cannot be read).
    """
    optimizer = torch.optim.Adam(list(parameters), lr=lr, betas=(0.9, 0.999))
    generator = torch.Generator().manual_seed(int(seed))
    orders: list[list[int]] = [[] for _ in num_batches]
    history: list[float] = []
    bar = None
    if progress and steps:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=desc, leave=False)
    tic = time.perf_counter()
    device = parameters[0].device if parameters else torch.device("cpu")
    try:
        with PeakMemory(device) as memory:
            for _ in range(steps):
                batch = []
                for t, n in enumerate(num_batches):
                    if not orders[t]:
                        orders[t] = torch.randperm(n, generator=generator).tolist()
                    batch.append(orders[t].pop())
                optimizer.zero_grad(set_to_none=True)
                loss = loss_of(batch)
                loss.backward()
                optimizer.step()
                history.append(float(loss.detach()))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(entropy=f"{history[-1]:.4g}")
    finally:
        if bar is not None:
            bar.close()
    return history, time.perf_counter() - tic, memory.peak


@dataclass
class AdaptationReport(MethodReport):
    """What every method that learns by entropy minimisation reports (AdaMerging, weight
    ensembling).

    Attributes:
        groups: The parameter names of each coefficient group (one group for task-wise).
        steps: Adam steps taken.
        entropy_before: :math:`\\mathcal{L}` over every adaptation input before the steps.
        entropy_after: The same after them.
        task_entropy_before: Per task, the mean entropy before.
        task_entropy_after: Per task, after.
        history: The objective of each step's batches, before its update.
        examples: Adaptation inputs per task.
        adaptation_seconds: Time of the Adam steps.
        evaluation_seconds: Time of one forward pass (no gradient) over every adaptation
            input of every task, measured in the same run: the faster of the two passes
            that take the entropy before and after.
        cost_ratio: The adaptation's seconds over ``evaluation_seconds``.
        peak_memory: Peak memory of the adaptation steps in bytes, above what was in use
            before them (:class:`~curvmerge.memory.PeakMemory`; ``None``: not measured).
    """

    groups: list[list[str]] = field(default_factory=list)
    steps: int = 0
    entropy_before: float = float("nan")
    entropy_after: float = float("nan")
    task_entropy_before: list[float] = field(default_factory=list)
    task_entropy_after: list[float] = field(default_factory=list)
    history: list[float] = field(default_factory=list)
    examples: list[int] = field(default_factory=list)
    adaptation_seconds: float = 0.0
    evaluation_seconds: float = 0.0
    cost_ratio: float = float("nan")
    peak_memory: int | None = None

    def learned(self) -> dict[str, Any]:
        """What was learned (``coefficients``, ``[T][G]``) and what it cost, JSON-ready
        (the experiment runner keeps it)."""
        return {
            "coefficients": self.coefficients,
            "groups": self.groups,
            "steps": self.steps,
            "entropy_before": self.entropy_before,
            "entropy_after": self.entropy_after,
            "examples": self.examples,
            "adaptation_seconds": self.adaptation_seconds,
            "evaluation_seconds": self.evaluation_seconds,
            "cost_ratio": self.cost_ratio,
            "peak_memory_bytes": self.peak_memory,
        }


def adaptation_fields(
    objective: AdaMergingObjective,
    before: tuple[Tensor, Tensor],
    after: tuple[Tensor, Tensor],
    history: list[float],
    adaptation_seconds: float,
    evaluation_seconds: float,
    peak: int | None,
) -> dict[str, Any]:
    """The :class:`AdaptationReport` fields of a run: ``before`` and ``after`` are the
    objective and per-task entropies over every adaptation input; the cost ratio counts
    ``adaptation_seconds`` (including any one-off work the caller adds to it)."""
    return {
        "groups": [list(g) for g in objective.groups],
        "steps": len(history),
        "entropy_before": float(before[0]),
        "entropy_after": float(after[0]),
        "task_entropy_before": before[1].tolist(),
        "task_entropy_after": after[1].tolist(),
        "history": history,
        "examples": [sum(s) for s in objective.sizes],
        "adaptation_seconds": adaptation_seconds,
        "evaluation_seconds": evaluation_seconds,
        "cost_ratio": adaptation_seconds / evaluation_seconds if evaluation_seconds > 0 else 0.0,
        "peak_memory": peak,
    }


@dataclass
class AdaMergingReport(AdaptationReport):
    """An :class:`AdaptationReport` of an AdaMerging run; ``options`` holds the options and
    the learned ``coefficients`` (``[T][G]`` nested lists, the values used, after
    clamping)."""

    @property
    def coefficients(self) -> list[list[float]]:
        """The learned coefficients, ``[T][G]``."""
        return self.options["coefficients"]

    def __str__(self) -> str:
        o = self.options
        return (
            f"adamerging ({o['granularity']}-wise, {self.num_models} models x "
            f"{len(self.groups)} groups): {self.steps} Adam steps (lr={o['lr']:g}), entropy "
            f"{self.entropy_before:.4g} -> {self.entropy_after:.4g}, "
            f"{self.cost_ratio:.3g}x one evaluation pass"
        )


def adamerging(
    models: Sequence[nn.Module],
    base: Model,
    data: Sequence[Any],
    *,
    granularity: str = "layer",
    steps: int = 500,
    lr: float = 1e-3,
    init: float = 0.3,
    seed: int = 0,
    clamp: bool = True,
    weights: Sequence[float] | None = None,
    params: str | Sequence[str] | None = None,
    progress: bool = False,
) -> MergeResult:
    """AdaMerging (Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning",
    ICLR 2024): task arithmetic whose coefficients minimise the prediction entropy.

    The coefficients start at :math:`\\lambda_{t,g} = \\text{init} \\cdot w_t` (task
    arithmetic's scaling; the paper starts at 0.3) and take ``steps`` Adam steps
    (:math:`\\beta = (0.9, 0.999)`, as the paper) on

    .. math::

        \\mathcal{L}(\\lambda) = \\frac{1}{T} \\sum_t \\frac{1}{|B_t|} \\sum_{x \\in B_t}
        H\\big(\\operatorname{softmax} f_t(x; \\theta(\\lambda))\\big),

    where step :math:`s` uses one batch :math:`B_t` of every task: each task's batches are
    cycled through, in an order shuffled anew each cycle by a generator seeded with
    ``seed``. The authors' code sums the tasks' entropies; the mean here differs by the
    factor :math:`T`, to which Adam's steps are (up to its :math:`\\epsilon`) invariant.
    See :class:`AdaMergingObjective` for :math:`\\theta(\\lambda)`, the groups of
    ``granularity`` and how each task keeps its own head.

    With ``clamp`` (the default) the coefficients used are
    :math:`\\operatorname{clip}(\\lambda, 0, 1)`, as in the authors' implementation (the
    raw values are what Adam updates; a raw value outside :math:`[0, 1]` gets no gradient).
    Adam moves each coefficient by about ``lr`` per step at most, so a coefficient ends
    within about ``steps * lr`` of where it started: when the best coefficients lie further
    from ``init`` than that, raise ``lr`` or ``steps``.

    **Data.** The inputs are unlabelled in effect: only the inputs of the ``(inputs,
    targets)`` batches are read. The paper adapts on the test inputs; whatever split is
    passed here, its labels play no part.

    **Cost.** Each step is a forward and a backward pass over one batch per task (the
    backward goes through the network to the merged parameters, then to the coefficients);
    two forward passes without gradient over every input measure the entropy before and
    after. ``report.cost_ratio`` is the steps' time over the time of the faster of those
    passes (one evaluation pass over the same inputs).

    Args:
        models: The fine-tuned modules (eval mode, or free of dropout and batch norm).
        base: The base model :math:`\\theta_0` they were fine-tuned from.
        data: One iterable of ``(inputs, targets)`` batches per model (its task's inputs),
            read once.
        granularity: ``"task"`` (one coefficient per model) or ``"layer"`` (one per model
            and merged parameter tensor; the paper's stronger variant).
        steps: Adam steps (>= 0; the paper takes 500; 0 returns the initial merge).
        lr: Adam's learning rate (the paper: 1e-3).
        init: The initial coefficient (the paper: 0.3).
        seed: Seed of the batch order.
        clamp: Clip the coefficients to :math:`[0, 1]`.
        weights: Optional per-model multipliers :math:`w_t \\ge 0` of ``init``.
        params: Names or a regex selecting the merged parameters (default: all of the
            first model's parameters; pass the shared body so each task keeps its head).
        progress: Show one progress bar over the steps.

    Returns:
        A :class:`~curvmerge.merging.MergeResult` with the merged parameters at the learned
        coefficients, whose report is an :class:`AdaMergingReport` (coefficients in
        ``report.options["coefficients"]``; ``report.weights``: each model's mean
        coefficient).

    Raises:
        TypeError: A model is not a module.
        ValueError: Bad options, ``data`` without one entry per model, empty data, outputs
            that are not class logits, or models that are not deterministic.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> base = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> nets = [nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)) for _ in "ab"]
        >>> data = [[(torch.randn(8, 3), None)] for _ in nets]
        >>> out = adamerging(nets, base, data, granularity="task", steps=5, params="^0\\\\.")
        >>> len(out.report.coefficients), len(out.report.coefficients[0]), out.report.steps
        (2, 1, 5)
    """
    start = time.perf_counter()
    steps, lr, init = check_adaptation(steps, lr, init)
    objective = AdaMergingObjective(models, base, data, granularity=granularity, params=params)
    T, G = objective.num_models, objective.num_groups
    w = check_weights(weights, T, 1.0)
    raw = (objective.full(w) * init).requires_grad_(True)

    def used(lam: Tensor) -> Tensor:
        return lam.clamp(0.0, 1.0) if clamp else lam

    tic = time.perf_counter()
    with torch.no_grad():
        before, task_before = objective(used(raw))
    evaluation_seconds = time.perf_counter() - tic

    def loss_of(batch: list[int]) -> Tensor:
        return objective(used(raw), batch)[0]

    history, adaptation_seconds, peak = entropy_steps(
        [raw], loss_of, [len(b) for b in objective.inputs], steps=steps, lr=lr, seed=seed,
        desc=f"AdaMerging ({granularity}-wise)", progress=progress,
    )  # fmt: skip

    tic = time.perf_counter()
    with torch.no_grad():
        lam = used(raw).detach()
        after, task_after = objective(lam)
    evaluation_seconds = min(evaluation_seconds, time.perf_counter() - tic)
    with torch.no_grad():
        merged = {n: v.detach().clone() for n, v in objective.merged(lam).items()}
    coefficients = lam.cpu().tolist()
    report = method_report(
        "adamerging",
        objective.flat,
        [sum(row) / G for row in coefficients],
        start,
        granularity=granularity,
        steps=steps,
        lr=lr,
        init=init,
        seed=int(seed),
        clamp=bool(clamp),
        coefficients=coefficients,
    )
    report = AdaMergingReport(
        **vars(report),
        **adaptation_fields(
            objective, (before, task_before), (after, task_after), history,
            adaptation_seconds, evaluation_seconds, peak,
        ),
    )  # fmt: skip
    report.seconds = time.perf_counter() - start
    return MergeResult(merged, report)
