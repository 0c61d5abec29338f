"""Writing an experiment: tables, plots, sweeps, merged models and a JSON record.

:func:`write_results` writes, each file atomically (a temporary file moved into place):

- ``<stem>.md``, ``<stem>.csv``, ``<stem>.png``: the test metrics of every row (accuracy and
  macro-F1 per task, MSE for regression tasks; see :func:`curvmerge.results.write_metrics`);
- ``<stem>_report.md``: the tables, the coefficients chosen on validation, the rows that
  predicted one class, the costs and the notes (:func:`format_report`);
- ``sweeps/<method>.md/.csv/.png``: every grid point of each method with a grid;
- ``merged/<method>...``: the merged models, by a writer of :data:`MERGED_WRITERS`
  (``"safetensors"``: the merged shared parameters, readable by ``curvmerge eval --body``;
  ``"hf"``: Hugging Face folders, through :func:`curvmerge.hf.save_merged`);
- ``learned/<method>.safetensors``: the coefficient network of each weight-ensembling row
  (:func:`curvmerge.merging.load_coefficient_network` reads it back);
- ``<stem>.json``: every setting, metric, choice, cost and timing, what learned methods
  learned, and the files written.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from curvmerge.atomic import atomic_write_text
from curvmerge.experiment.pools import ModelPool
from curvmerge.experiment.spec import ExperimentResult

__all__ = [
    "MERGED_WRITERS",
    "MergedWriter",
    "cost_table",
    "format_report",
    "output_paths",
    "register_merged_writer",
    "result_json",
    "write_results",
]

MERGED_FORMAT = "curvmerge-merged-params"

MergedWriter = Callable[[str, Mapping[str, Tensor], ModelPool, Path, bool], list[Path]]
"""``writer(label, merged_params, pool, folder, force) -> paths written``."""


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "method"


def _write_safetensors(label, params, pool, folder: Path, force: bool) -> list[Path]:
    from curvmerge.io import save_params

    path = folder / f"{_safe(label)}.safetensors"
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": MERGED_FORMAT, "method": label, "params": len(params)}
    return [save_params(params, path, force=force, metadata=meta)]


def _write_hf(label, params, pool, folder: Path, force: bool) -> list[Path]:
    """Hugging Face folders, one per task head (or one when the heads are shared), through
    ``curvmerge.hf.save_merged``; the pool's ``handles`` (what the model sources returned,
    e.g. ``curvmerge.hf.HFModel``) carry configs and tokenizers."""
    try:
        from curvmerge.hf import save_merged
    except ImportError as err:
        raise ImportError(
            f"writing merged models as Hugging Face folders needs curvmerge.hf: {err}"
        ) from err
    models = pool.handles if pool.handles else pool.models
    names = [_safe(n) for n in (pool.names or [f"task_{i}" for i in range(len(models))])]
    folder.mkdir(parents=True, exist_ok=True)
    return list(save_merged(models, params, folder / _safe(label), force=force, names=names))


#: Writers of merged models by format name; :func:`register_merged_writer` adds one.
MERGED_WRITERS: dict[str, MergedWriter] = {
    "safetensors": _write_safetensors,
    "hf": _write_hf,
}


def register_merged_writer(name: str, writer: MergedWriter) -> None:
    """Make ``writer`` the merged-model writer of format ``name`` (replacing any)."""
    if not callable(writer):
        raise TypeError("writer must be callable")
    MERGED_WRITERS[str(name)] = writer


# ---------------------------------------------------------------------------------- text
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(_fmt(x) for x in v) + ")"
    return str(v)


def cost_table(result: ExperimentResult) -> str | None:
    """Each method's costs as Markdown: its statistics and its merges (every grid point,
    validation excluded) in seconds and gradient-pass equivalents, and its operator products.

    A gradient pass is one forward and backward pass over one model's statistics batches
    (``result.costs["gradient_pass_seconds"]``, measured in the same run); a statistic is
    counted for every method that uses it (they share it: computed once). ``None`` without
    recorded costs.
    """
    costs = result.costs or {}
    methods, unit = costs.get("methods"), costs.get("gradient_pass_seconds")
    if not methods or not unit:
        return None
    stats = costs.get("statistics", {})
    lines = [
        f"Costs (gradient passes: one pass over one model's statistics batches = {unit:.3g} s):",
        "",
        "| method | statistics | statistics s | statistics passes | merges s | merge passes "
        "| products | points |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, c in methods.items():
        kind = c.get("statistics", "none")
        s_sec = sum(stats.get(kind, {}).get("seconds", []) or []) if kind != "none" else 0.0
        m_sec = (c.get("merge_seconds") or 0.0) + (c.get("prepare_seconds") or 0.0)
        lines.append(
            f"| {label} | {kind} | {s_sec:.2f} | {s_sec / unit:.1f} | {m_sec:.2f} | "
            f"{m_sec / unit:.1f} | {c.get('products') or 0} | {c.get('points', 1)} |"
        )
    return "\n".join(lines)


def format_report(result: ExperimentResult, title: str, *, extra: str = "") -> str:
    """The metric tables, the choices, one-class rows, costs and notes, as Markdown.

    Args:
        result: The experiment.
        title: The heading.
        extra: Markdown inserted after the choices (e.g. a sweep's summary).
    """
    from curvmerge.results import metrics_markdown

    lines = [f"## {title}", "", "Test metrics (coefficients chosen on validation):", ""]
    lines.append(metrics_markdown(result.tables(), heading="####"))
    chosen = [m for m in result.choices if result.choices[m] or result.details.get(m)]
    if chosen:
        lines.append("Chosen on validation:")
        for method in chosen:
            parts = [", ".join(f"{k}={_fmt(v)}" for k, v in result.choices[method].items())]
            detail = result.details.get(method) or {}
            if detail:
                parts.append(", ".join(f"{k}={_fmt(v)}" for k, v in detail.items()))
            val = result.validation.get(method)
            text = "; ".join(p for p in parts if p)
            shown = f" (validation {val:.4f})" if val is not None else ""
            lines.append(f"- {method}: {text}{shown}")
        lines.append("")
    if extra:
        lines.extend([extra.rstrip("\n"), ""])
    if result.learned:
        lines.append("Learned on unlabelled inputs (coefficients per task, mean over groups):")
        for method, info in result.learned.items():
            per_task = ", ".join(f"{sum(row) / len(row):.3g}" for row in info["coefficients"])
            memory = info.get("peak_memory_bytes")
            lines.append(
                f"- {method}: [{per_task}]; {info['steps']} steps, entropy "
                f"{_fmt(info['entropy_before'])} -> {_fmt(info['entropy_after'])}, "
                f"{_fmt(info['cost_ratio'])}x one evaluation pass, peak memory "
                + (f"{memory / 2**20:.0f} MiB" if memory is not None else "not measured")
            )
        lines.append("")
    if result.one_class:
        lines.append("Predictions in one class (test):")
        for e in result.one_class:
            lines.append(
                f"- {e['row']} on {e['task']}: class {e['predicted_class']} for "
                f"{100 * e['predicted_share']:.1f}% of the inputs (most frequent label "
                f"{100 * e['label_share']:.1f}%)"
            )
        lines.append("")
    table = cost_table(result)
    if table:
        lines.extend([table, ""])
    if result.seconds:
        lines.append("Time: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items()))
    lines.extend(f"Note: {n}" for n in result.notes)
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------- JSON
def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, Tensor) and obj.numel() == 1:
        return _jsonable(obj.item())
    if isinstance(obj, nn.Module):  # an option holding a module (a trained network)
        return f"<{type(obj).__name__}>"
    return str(obj)


def result_json(
    result: ExperimentResult,
    *,
    title: str = "experiment",
    pool: ModelPool | None = None,
    config: Mapping[str, Any] | None = None,
) -> str:
    """Every setting, metric, choice, cost and timing of ``result`` as JSON text (NaN and
    infinities as ``null``)."""
    import torch

    import curvmerge

    record = {
        "format": "curvmerge-experiment",
        "version": 1,
        "title": title,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "curvmerge": curvmerge.__version__,
        "torch": torch.__version__,
        "settings": result.settings,
        "config": config,
        "models": pool.info if pool is not None else None,
        "tasks": result.tasks,
        "metrics": result.metrics,
        "kinds": result.kinds,
        "choices": result.choices,
        "validation": result.validation,
        "details": result.details,
        "learned": result.learned,
        "sweeps": {k: s.rows() for k, s in result.sweeps.items()},
        "costs": result.costs,
        "seconds": result.seconds,
        "one_class": result.one_class,
        "notes": result.notes,
        "paths": result.paths,
    }
    return json.dumps(_jsonable(record), indent=2, allow_nan=False) + "\n"


# ---------------------------------------------------------------------------------- files
def output_paths(out_dir: str | os.PathLike, stem: str = "results") -> list[Path]:
    """The fixed files :func:`write_results` writes (checked before a run starts)."""
    out = Path(out_dir)
    return [
        *(out / f"{stem}{s}" for s in (".md", ".csv", ".png")),
        out / f"{stem}_report.md",
        out / f"{stem}.json",
    ]


def write_results(
    result: ExperimentResult,
    out_dir: str | os.PathLike,
    *,
    stem: str = "results",
    title: str = "experiment",
    plots: bool = True,
    sweeps: bool = True,
    merged: str | None = "safetensors",
    pool: ModelPool | None = None,
    config: Mapping[str, Any] | None = None,
    force: bool = True,
    report_extra: str = "",
) -> dict[str, Path]:
    """Write the experiment's files into ``out_dir`` (see the module docstring).

    Args:
        result: The experiment.
        out_dir: The folder (created).
        stem: Name of the table files.
        title: Heading of the tables and plots.
        plots: Write PNG plots.
        sweeps: Write each method's grid under ``sweeps/``.
        merged: Format of the merged models (a key of :data:`MERGED_WRITERS`), or ``None``.
        pool: The model pool (needed for ``merged``; its description goes into the JSON).
        config: The configuration the experiment came from (recorded in the JSON).
        force: Replace existing files (the caller checks before running).
        report_extra: Markdown added to the report after the choices.

    Returns:
        ``{what: path}``, also stored in ``result.paths``; the JSON is written last.
    """
    from curvmerge.results import write_metrics, write_sweep

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if merged is not None and merged not in MERGED_WRITERS:
        raise ValueError(f"merged must be one of {', '.join(MERGED_WRITERS)} or None")
    paths: dict[str, Path] = {}
    for k, v in write_metrics(result.tables(), out / stem, title=title, plot=plots).items():
        paths[k] = v
    paths["report"] = atomic_write_text(
        out / f"{stem}_report.md", format_report(result, title, extra=report_extra)
    )
    if sweeps:
        for label, sw in result.sweeps.items():
            written = write_sweep(
                sw, out / "sweeps" / _safe(label), title=f"{label}: sweep", plot=plots
            )
            for k, v in written.items():
                paths[f"sweep {label} {k}"] = v
    if merged is not None and result.merged:
        if pool is None:
            raise ValueError("writing merged models needs the model pool")
        for label, params in result.merged.items():
            for i, p in enumerate(
                MERGED_WRITERS[merged](label, params, pool, out / "merged", force)
            ):
                paths[f"merged {label}" + (f" {i}" if i else "")] = Path(p)
    for label, learned in result.networks.items():  # small: written with every result
        path = out / "learned" / f"{_safe(label)}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        learned.save(path, metadata={"method": label})
        paths[f"network {label}"] = path
    result.paths.update(paths)
    result.paths["json"] = out / f"{stem}.json"
    atomic_write_text(
        out / f"{stem}.json", result_json(result, title=title, pool=pool, config=config)
    )
    return dict(result.paths)
