"""What an experiment runs and what it returns: methods, settings, results.

:class:`MethodRun` is one method of an experiment (a registry row, its grid and options, its
row label); :class:`Settings` says how statistics are computed and models evaluated;
:class:`ExperimentResult` holds what :func:`~curvmerge.experiment.run_experiment` found.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from curvmerge.merging.registry import MethodSpec, get_method
from curvmerge.merging.sweep import SweepResult
from curvmerge.train import ONE_CLASS_SHARE

__all__ = [
    "DEFAULT_METHODS",
    "REFERENCE_ROW",
    "ExperimentResult",
    "MethodRun",
    "Settings",
]

#: Methods an experiment runs by default, in table order.
DEFAULT_METHODS = (
    "average",
    "task_arithmetic",
    "ties",
    "dare",
    "tsv_merge",
    "iso_c",
    "iso_cts",
    "slerp_sequential",
    "spherical_barycenter",
    "regmean",
    "regmean_plus_plus",
    "fisher_diagonal",
    "fisher_kfac",
    "fisher_exact",
    "ensemble",
)

#: Name of the majority-class reference row.
REFERENCE_ROW = "majority class"

_TABLE_METRICS = ("accuracy", "macro_f1", "mse")


@dataclass(frozen=True)
class MethodRun:
    """A method of an experiment: a registry row, its grid and options, its row label.

    Attributes:
        method: The registry name.
        label: The table row (default: the method name); lets one method run twice.
        grid: Points to choose from on validation: a list of option mappings, or a mapping
            of option to values whose product is the grid; ``None``: the registry's grid.
        options: Fixed options for every point (``maxiter``, ``prior``, ``weights``, ...).
    """

    method: str
    label: str | None = None
    grid: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> MethodSpec:
        """The registry row (raises :class:`~curvmerge.merging.UnknownMethodError`)."""
        return get_method(self.method)

    @property
    def name(self) -> str:
        """The row label."""
        return self.label or self.spec.name

    def points(self) -> list[dict[str, Any]]:
        """The grid, checked against the method's options."""
        return self.spec.grid_points(self.grid)

    def fixed_options(self) -> dict[str, Any]:
        """The options every point gets: the registry row's sweep defaults, then ours."""
        return {**self.spec.sweep_options, **self.options}

    def check(self) -> None:
        """Check the options and grid against the registry row.

        Raises:
            ValueError: An unknown option or grid key (naming it and the valid ones).
        """
        spec = self.spec
        valid = {*spec.options, "weights"}
        unknown = sorted(set(self.options) - valid)
        if unknown:
            raise ValueError(
                f"method {spec.name!r} has no option {unknown[0]!r} "
                f"(its options: {', '.join(sorted(valid))})"
            )
        self.points()

    @classmethod
    def parse(cls, entry: str | MethodRun | Mapping[str, Any]) -> MethodRun:
        """A registry name, a :class:`MethodRun`, or ``{"method", "label", "grid",
        "options"}``."""
        if isinstance(entry, MethodRun):
            return entry
        if isinstance(entry, str):
            return cls(get_method(entry).name)
        if isinstance(entry, Mapping):
            unknown = sorted(set(entry) - {"method", "label", "grid", "options"})
            if unknown:
                raise ValueError(f"method entry has no key {unknown[0]!r}")
            if "method" not in entry:
                raise ValueError("method entry needs a 'method' (a registry name)")
            return cls(
                get_method(entry["method"]).name,
                label=entry.get("label"),
                grid=entry.get("grid"),
                options=dict(entry.get("options") or {}),
            )
        raise TypeError(f"a method is a name or a mapping, got {type(entry).__name__}")


@dataclass
class Settings:
    """How an experiment computes statistics and evaluates.

    Attributes:
        fisher_kind: Kind of the diagonal Fisher (``"exact"``, ``"mc"``, ``"empirical"``).
        fisher_examples: Training examples per task for the statistics (drawn with ``seed``;
            ignored for tasks that bring ``fisher_batches``; ``None``: all).
        fisher_batch_size: Batch size of those examples.
        mc_samples: Samples per example for ``fisher_kind="mc"``.
        exact_examples: Examples per task for the GGN operators (the first statistics
            batches; each CG iteration is a pass over them).
        seed: Seed of the draw of statistics examples and of Monte-Carlo labels.
        batch_size: Evaluation batch size.
        references: Add the ``model: <task>``, ``base`` and majority-class rows.
        one_class_share: Share of a task's test inputs in one predicted class above which a
            merge gets a :class:`~curvmerge.train.OneClassWarning`.
        fisher_dir: Folder of Fisher files, reused when they match (``None``: none).
    """

    fisher_kind: str = "exact"
    fisher_examples: int | None = 512
    fisher_batch_size: int = 64
    mc_samples: int = 1
    exact_examples: int | None = 256
    seed: int = 0
    batch_size: int = 256
    references: bool = True
    one_class_share: float = ONE_CLASS_SHARE
    fisher_dir: str | Path | None = None

    def as_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready values."""
        out = asdict(self)
        out["fisher_dir"] = None if self.fisher_dir is None else str(self.fisher_dir)
        return out


@dataclass
class ExperimentResult:
    """What an experiment found.

    Attributes:
        tasks: The task names (table columns).
        metrics: ``{row: {task: test metrics}}`` (see :func:`curvmerge.train.evaluate`), rows
            in table order: references, then methods.
        kinds: ``{row: "model" | "base" | "reference" | "merge" | "ensemble" | "adaptive"}``
            (``"adaptive"``: weight ensembling, one merge per batch).
        choices: ``{method: coefficients chosen on validation}``.
        validation: ``{method: mean validation score at the chosen point}``.
        details: ``{method: {"λ": effective damping, "products": ..., ...}}`` of the chosen
            point.
        sweeps: ``{method: SweepResult}`` for methods with more than one grid point.
        merged: ``{method: merged shared parameters}`` (merges only).
        learned: ``{method: what it learned}`` for methods that learn coefficients
            (AdaMerging: the coefficients; weight ensembling: their mean and spread over
            batches), with the adaptation's steps, entropies, seconds, peak memory and cost
            ratio to one evaluation pass (the reports' ``learned()``).
        networks: ``{method: result}`` of methods that learned a network (weight
            ensembling), written by :func:`~curvmerge.experiment.write_results` with the
            result's ``save``.
        costs: Statistics (computed, loaded, seconds, passes), per method (seconds, points,
            products, diagonal passes) and evaluation.
        seconds: Flat ``{what: seconds}`` (statistics, each method, evaluation, total).
        one_class: Every (row, task) whose test predictions fell into one class.
        notes: Lines worth reading (skipped methods, CG stops, reused files).
        settings: Every setting (JSON-ready).
        paths: Files written.
    """

    tasks: list[str]
    metrics: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    choices: dict[str, dict[str, Any]] = field(default_factory=dict)
    validation: dict[str, float] = field(default_factory=dict)
    details: dict[str, dict[str, Any]] = field(default_factory=dict)
    sweeps: dict[str, SweepResult] = field(default_factory=dict)
    merged: dict[str, dict[str, Tensor]] = field(default_factory=dict, repr=False)
    learned: dict[str, dict[str, Any]] = field(default_factory=dict)
    networks: dict[str, Any] = field(default_factory=dict, repr=False)
    costs: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    one_class: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)

    def table(self, metric: str = "accuracy") -> dict[str, dict[str, float]]:
        """``{row: {task: value}}`` of one metric, over the tasks it applies to."""
        out: dict[str, dict[str, float]] = {}
        for row, per_task in self.metrics.items():
            values = {t: float(m[metric]) for t, m in per_task.items() if metric in m}
            if values:
                out[row] = values
        return out

    def tables(self) -> dict[str, dict[str, dict[str, float]]]:
        """Every metric that applies to some task: accuracy, macro-F1, MSE."""
        return {m: t for m in _TABLE_METRICS if (t := self.table(m))}

    @property
    def rows(self) -> dict[str, dict[str, float]]:
        """The accuracy table (MSE when every task is a regression)."""
        return self.table("accuracy") or self.table("mse")

    def mean(self, row: str, metric: str = "accuracy") -> float:
        """The mean of ``metric`` over the tasks of ``row``."""
        values = list(self.table(metric)[row].values())
        return sum(values) / len(values)
