"""Results people can read: Markdown tables, CSV files and PNG plots, written atomically.

A *comparison* maps each row (a method, or a model such as ``"base"`` or ``"model: sst2"``) to
its per-task scores, in the order rows should appear:

.. code-block:: python

    rows = {"average": {"digits": 0.91, "mnist": 0.88}, "fisher_diagonal": {...}}
    paths = write_comparison(rows, "out/compare")  # out/compare.md, .csv, .png

Each table has one column per task and a ``mean`` column (the unweighted mean over tasks;
blank when a task is missing). Several metrics of one comparison (accuracy, macro-F1, MSE)
are *metric tables*, ``{metric: rows}``, written together by :func:`write_metrics`: one
Markdown section and one plot panel per metric, and one CSV with a ``metric`` column.
Sweeps (:class:`~curvmerge.merging.sweep.SweepResult`) are written
by :func:`write_sweep`: every point with its coefficients and scores, the chosen point, its
test score and the sweep's cost.

Files are written to a temporary file in the target folder and moved into place with
:func:`os.replace`, so a crash never leaves a half-written file. Plots use matplotlib's Agg
renderer through :class:`matplotlib.figure.Figure`, without pyplot or a display.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from curvmerge._optional import require
from curvmerge.atomic import atomic_write_bytes, atomic_write_text

__all__ = [
    "comparison_tasks",
    "markdown_table",
    "comparison_csv",
    "plot_comparison",
    "write_comparison",
    "METRIC_NAMES",
    "metrics_markdown",
    "metrics_csv",
    "plot_metrics",
    "write_metrics",
    "sweep_markdown",
    "plot_sweep",
    "write_sweep",
]

Rows = Mapping[str, Mapping[str, float]]
Tables = Mapping[str, Rows]

#: Display name of each metric and whether lower values are better (for highlighting).
METRIC_NAMES: dict[str, tuple[str, bool]] = {
    "accuracy": ("accuracy", False),
    "macro_f1": ("macro-F1", False),
    "mse": ("MSE", True),
    "loss": ("loss", True),
}
#: Metrics shown as percentages.
PERCENT_METRICS = ("accuracy", "macro_f1")


# ---------------------------------------------------------------------------------- files
def comparison_tasks(rows: Rows) -> list[str]:
    """The task columns: every task of every row, in order of first appearance."""
    tasks: list[str] = []
    for scores in rows.values():
        for task in scores:
            if task != "mean" and task not in tasks:
                tasks.append(task)
    return tasks


def _value(scores: Mapping[str, float], task: str) -> float:
    v = scores.get(task)
    return math.nan if v is None else float(v)


def _mean(scores: Mapping[str, float], tasks: Sequence[str]) -> float:
    values = [_value(scores, t) for t in tasks]
    if not values or any(math.isnan(v) for v in values):
        return math.nan
    return sum(values) / len(values)


def _table(rows: Rows, tasks: Sequence[str] | None) -> tuple[list[str], list[list[float]]]:
    if not rows:
        raise ValueError("a comparison needs at least one row")
    tasks = list(tasks) if tasks is not None else comparison_tasks(rows)
    if not tasks:
        raise ValueError("a comparison needs at least one task column")
    body = []
    for scores in rows.values():
        body.append([_value(scores, t) for t in tasks] + [_mean(scores, tasks)])
    return [*tasks, "mean"], body


def _fmt(v: float, digits: int, percent: bool) -> str:
    if math.isnan(v):
        return "–"
    return f"{100 * v:.{max(digits - 2, 0)}f}" if percent else f"{v:.{digits}f}"


def markdown_table(
    rows: Rows,
    *,
    tasks: Sequence[str] | None = None,
    digits: int = 3,
    percent: bool = False,
    highlight_best: bool = True,
    label: str = "method",
    lower_is_better: bool = False,
) -> str:
    """A Markdown table: one row per entry of ``rows``, one column per task, then the mean.

    Args:
        rows: ``{row name: {task: score}}``.
        tasks: Column order (default: :func:`comparison_tasks`).
        digits: Decimals (for ``percent``, decimals of the fraction, so 3 gives ``91.2``).
        percent: Show scores as percentages.
        highlight_best: Bold the best value of each column.
        label: Header of the first column.
        lower_is_better: The best value is the lowest (errors such as MSE).

    Example:
        >>> print(markdown_table({"a": {"x": 0.5, "y": 1.0}, "b": {"x": 0.75, "y": 0.5}}), end="")
        | method | x | y | mean |
        | --- | ---: | ---: | ---: |
        | a | 0.500 | **1.000** | **0.750** |
        | b | **0.750** | 0.500 | 0.625 |
    """
    header, body = _table(rows, tasks)
    pick = min if lower_is_better else max
    best = [
        pick((r[j] for r in body if not math.isnan(r[j])), default=math.nan)
        for j in range(len(header))
    ]
    lines = [
        "| " + " | ".join([label, *header]) + " |",
        "| --- | " + " | ".join("---:" for _ in header) + " |",
    ]
    for name, values in zip(rows, body, strict=True):
        cells = []
        for j, v in enumerate(values):
            cell = _fmt(v, digits, percent)
            if highlight_best and len(body) > 1 and not math.isnan(v) and v == best[j]:
                cell = f"**{cell}**"
            cells.append(cell)
        lines.append("| " + " | ".join([str(name), *cells]) + " |")
    return "\n".join(lines) + "\n"


def comparison_csv(rows: Rows, *, tasks: Sequence[str] | None = None, label: str = "method"):
    """The comparison as CSV text (full precision; missing values are empty cells)."""
    header, body = _table(rows, tasks)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([label, *header])
    for name, values in zip(rows, body, strict=True):
        writer.writerow([name, *("" if math.isnan(v) else repr(v) for v in values)])
    return buf.getvalue()


# ---------------------------------------------------------------------------------- plots
def _figure(width: float, height: float):
    require("matplotlib", "plots (curvmerge.results)")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=120, layout="constrained")


def _png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")  # a bare Figure renders with Agg, no pyplot needed
    return buf.getvalue()


def plot_comparison(
    rows: Rows,
    path: str | os.PathLike,
    *,
    tasks: Sequence[str] | None = None,
    title: str | None = None,
    ylabel: str = "accuracy",
) -> Path:
    """Grouped bars: one group per task (and the mean), one bar per row. Written atomically."""
    header, body = _table(rows, tasks)
    n = len(body)
    fig = _figure(max(6.0, 1.1 * len(header) + 0.25 * n * len(header)), 4.2)
    ax = fig.add_subplot()
    width = 0.8 / n
    for i, (name, values) in enumerate(zip(rows, body, strict=True)):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(header))]
        ax.bar(xs, [0 if math.isnan(v) else v for v in values], width, label=str(name))
    ax.set_xticks(range(len(header)), header)
    ax.set_ylabel(ylabel)
    finite = [v for r in body for v in r if not math.isnan(v)]
    if finite and 0 <= min(finite) and max(finite) <= 1:
        ax.set_ylim(max(0.0, min(finite) - 0.1), 1.0)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", ncols=min(n, 4), loc="lower center", bbox_to_anchor=(0.5, 1.0))
    if title:
        fig.suptitle(title)
    return atomic_write_bytes(path, _png_bytes(fig))


def write_comparison(
    rows: Rows,
    stem: str | os.PathLike,
    *,
    tasks: Sequence[str] | None = None,
    title: str | None = None,
    plot: bool = True,
    percent: bool = False,
    label: str = "method",
) -> dict[str, Path]:
    """Write ``<stem>.md``, ``<stem>.csv`` and (``plot``) ``<stem>.png``; return their paths."""
    stem = Path(stem)
    md = markdown_table(rows, tasks=tasks, percent=percent, label=label)
    if title:
        md = f"## {title}\n\n{md}"
    paths = {
        "markdown": atomic_write_text(stem.with_suffix(".md"), md),
        "csv": atomic_write_text(
            stem.with_suffix(".csv"), comparison_csv(rows, tasks=tasks, label=label)
        ),
    }
    if plot:
        paths["png"] = plot_comparison(rows, stem.with_suffix(".png"), tasks=tasks, title=title)
    return paths


# ---------------------------------------------------------------------------------- metrics
def _metric_name(metric: str) -> str:
    return METRIC_NAMES.get(metric, (metric, False))[0]


def metrics_markdown(
    tables: Tables,
    *,
    digits: int = 3,
    highlight_best: bool = True,
    label: str = "method",
    heading: str = "###",
) -> str:
    """One Markdown section per metric: accuracy and macro-F1 as percentages, MSE as numbers.

    Args:
        tables: ``{metric: {row: {task: value}}}``, in display order.
        digits: As in :func:`markdown_table`.
        highlight_best: Bold the best value of each column (lowest for MSE and loss).
        label: Header of the first column.
        heading: Markdown heading of each section.

    Example:
        >>> tables = {"accuracy": {"a": {"x": 0.5}}, "macro_f1": {"a": {"x": 0.25}}}
        >>> print(metrics_markdown(tables, highlight_best=False), end="")
        ### accuracy (%)
        <BLANKLINE>
        | method | x | mean |
        | --- | ---: | ---: |
        | a | 50.0 | 50.0 |
        <BLANKLINE>
        ### macro-F1 (%)
        <BLANKLINE>
        | method | x | mean |
        | --- | ---: | ---: |
        | a | 25.0 | 25.0 |
    """
    parts = []
    for metric, rows in tables.items():
        percent = metric in PERCENT_METRICS
        lower = METRIC_NAMES.get(metric, (metric, False))[1]
        title = _metric_name(metric) + (" (%)" if percent else "")
        table = markdown_table(
            rows,
            digits=digits,
            percent=percent,
            label=label,
            highlight_best=highlight_best,
            lower_is_better=lower,
        )
        parts.append(f"{heading} {title}\n\n{table}")
    if not parts:
        raise ValueError("no metric tables")
    return "\n".join(parts)


def metrics_csv(tables: Tables, *, label: str = "method") -> str:
    """Every metric table as one CSV: ``label, metric, <tasks...>, mean`` (full precision).

    The task columns are the union over metrics; a task a metric does not apply to (MSE of a
    classification task) is an empty cell.
    """
    tasks: list[str] = []
    for rows in tables.values():
        tasks.extend(t for t in comparison_tasks(rows) if t not in tasks)
    if not tasks:
        raise ValueError("a comparison needs at least one task column")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([label, "metric", *tasks, "mean"])
    for metric, rows in tables.items():
        own = comparison_tasks(rows)
        for name, scores in rows.items():
            values = [_value(scores, t) for t in tasks]
            mean = _mean(scores, own)
            writer.writerow(
                [
                    name,
                    metric,
                    *("" if math.isnan(v) else repr(v) for v in values),
                    "" if math.isnan(mean) else repr(mean),
                ]
            )
    return buf.getvalue()


def plot_metrics(tables: Tables, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Grouped bars, one panel per metric (one group per task and the mean, one bar per row).
    Written atomically."""
    if not tables:
        raise ValueError("no metric tables")
    panels = [(metric, *_table(rows, None)) for metric, rows in tables.items()]
    n_rows = max(len(body) for _, _, body in panels)
    n_cols = max(len(header) for _, header, _ in panels)
    width = max(6.0, 1.1 * n_cols + 0.25 * n_rows * n_cols)
    fig = _figure(width, 3.4 * len(panels) + 0.8)
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (metric, header, body), rows in zip(axes, panels, tables.values(), strict=True):
        n = len(body)
        bar = 0.8 / n
        for i, (name, values) in enumerate(zip(rows, body, strict=True)):
            xs = [j + (i - (n - 1) / 2) * bar for j in range(len(header))]
            ax.bar(xs, [0 if math.isnan(v) else v for v in values], bar, label=str(name))
        ax.set_xticks(range(len(header)), header)
        ax.set_ylabel(_metric_name(metric))
        finite = [v for r in body for v in r if not math.isnan(v)]
        if metric in PERCENT_METRICS and finite and 0 <= min(finite) and max(finite) <= 1:
            ax.set_ylim(max(0.0, min(finite) - 0.1), 1.0)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(
        fontsize="small", ncols=min(n_rows, 4), loc="lower center", bbox_to_anchor=(0.5, 1.0)
    )
    if title:
        fig.suptitle(title)
    return atomic_write_bytes(path, _png_bytes(fig))


def write_metrics(
    tables: Tables,
    stem: str | os.PathLike,
    *,
    title: str | None = None,
    plot: bool = True,
    label: str = "method",
    preamble: str = "",
) -> dict[str, Path]:
    """Write ``<stem>.md`` (:func:`metrics_markdown`), ``<stem>.csv`` (:func:`metrics_csv`)
    and (``plot``) ``<stem>.png`` (:func:`plot_metrics`), each atomically; return the paths.

    Args:
        tables: ``{metric: {row: {task: value}}}``.
        stem: Output path without suffix.
        title: Heading of the Markdown file and title of the plot.
        plot: Write the PNG.
        label: Header of the first column.
        preamble: Markdown placed after the title, before the tables.
    """
    stem = Path(stem)
    md = metrics_markdown(tables, label=label)
    if preamble:
        md = preamble.rstrip("\n") + "\n\n" + md
    if title:
        md = f"## {title}\n\n{md}"
    paths = {
        "markdown": atomic_write_text(stem.with_suffix(".md"), md),
        "csv": atomic_write_text(stem.with_suffix(".csv"), metrics_csv(tables, label=label)),
    }
    if plot:
        paths["png"] = plot_metrics(tables, stem.with_suffix(".png"), title=title)
    return paths


# ---------------------------------------------------------------------------------- sweeps
def _sweep_axis(result) -> tuple[str, list[float], list[Any]]:
    """x label, x values and the series key of each point."""
    coeffs = [p.coefficients for p in result.points]
    first = coeffs[0]
    if "weights" in first and all(len(c["weights"]) == 2 for c in coeffs):
        return (
            "weight of model 1",
            [c["weights"][0] for c in coeffs],
            [c.get("damping") for c in coeffs],
        )
    numeric = [
        k for k, v in first.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    varying = [k for k in numeric if len({c.get(k) for c in coeffs}) > 1]
    if len(varying) == 1:
        key = varying[0]
        return key, [float(c[key]) for c in coeffs], [None] * len(coeffs)
    return "point", [float(p.index) for p in result.points], [None] * len(coeffs)


def plot_sweep(result, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Validation score along a sweep (one line per damping), chosen point marked.

    Per-task validation scores are drawn as thin lines when ``validate`` returned them.
    """
    xlabel, xs, series = _sweep_axis(result)
    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot()
    groups: dict[Any, list[int]] = {}
    for i, key in enumerate(series):
        groups.setdefault(key, []).append(i)
    for key, idx in groups.items():
        idx = sorted(idx, key=lambda i: xs[i])
        label = "validation" if key is None else f"validation (damping {key:g})"
        ax.plot([xs[i] for i in idx], [result.points[i].validation for i in idx], marker="o",
                markersize=3, label=label)  # fmt: skip
        tasks = result.points[idx[0]].validation_detail
        if len(groups) == 1:
            for task in tasks:
                ys = [result.points[i].validation_detail.get(task, math.nan) for i in idx]
                ax.plot([xs[i] for i in idx], ys, linewidth=0.8, alpha=0.6, label=task)
    best = result.best_point
    ax.plot([xs[result.best]], [best.validation], marker="*", markersize=14, color="black",
            linestyle="none", label="chosen on validation")  # fmt: skip
    if xlabel == "damping" and min(xs) > 0 and max(xs) / min(xs) > 10:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    heading = title or f"sweep ({result.method})"
    if result.test is not None:
        heading += f" — test at chosen point: {result.test:.3f}"
    fig.suptitle(heading, fontsize="medium")
    return atomic_write_bytes(path, _png_bytes(fig))


def sweep_markdown(result, *, title: str | None = None, digits: int = 4) -> str:
    """The sweep as Markdown: the summary (choice, test, cost), then one row per point."""
    rows = result.rows()
    keys = [k for k in rows[0] if k not in ("index",)]
    lines = [f"## {title}\n" if title else "", "```", result.summary(), "```", ""]
    lines.append("| " + " | ".join(["point", *keys]) + " |")
    lines.append("| " + " | ".join("---:" for _ in range(len(keys) + 1)) + " |")
    for row in rows:
        cells = []
        for k in keys:
            v = row.get(k, "")
            if isinstance(v, bool):
                cells.append("**yes**" if v else "")
            elif isinstance(v, float):
                cells.append(f"{v:.{digits}g}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join([str(row["index"]), *cells]) + " |")
    return "\n".join(lines).lstrip("\n") + "\n"


def write_sweep(
    result, stem: str | os.PathLike, *, title: str | None = None, plot: bool = True
) -> dict[str, Path]:
    """Write ``<stem>.md``, ``<stem>.csv`` (one row per point) and ``<stem>.png``."""
    stem = Path(stem)
    rows = result.rows()
    fields: list[str] = []
    for row in rows:
        fields.extend(k for k in row if k not in fields)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    paths = {
        "markdown": atomic_write_text(stem.with_suffix(".md"), sweep_markdown(result, title=title)),
        "csv": atomic_write_text(stem.with_suffix(".csv"), buf.getvalue()),
    }
    if plot:
        paths["png"] = plot_sweep(result, stem.with_suffix(".png"), title=title)
    return paths
