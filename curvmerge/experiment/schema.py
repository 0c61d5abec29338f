"""The configuration schema of an experiment, and its validation.

The schema (every key optional unless marked; unknown keys and bad values raise a
``ValueError`` that names the key, before any model is loaded)::

    title: digit subsets                # heading of the tables and plots
    seed: 0                             # draw of the statistics examples, MC labels
    output_dir: results/digits          # files are written here (none when absent);
                                        # relative paths are relative to the YAML file
    force: false                        # replace existing result files

    models:                             # the model pool
      base: runs/base.safetensors       # the model the tasks were fine-tuned from
      params: '^body\\.'                # regex of the merged (shared) parameters
                                        # (default: everything outside the task head)
      finetuned:                        # REQUIRED: one model per task, by task name
        digits-0-1-2: runs/a.safetensors
        digits-3-4-5: {kind: mlp, in_features: 64, num_classes: 3, hidden: [32],
                       checkpoint: runs/b.safetensors}

    tasks:                              # the task pool, by the same names (default: the
      digits-0-1-2: digits:0,1,2        # tasks recorded in the checkpoints)
      digits-3-4-5:
        data: digits:3,4,5              # a bundled task (curvmerge.data): digits, mnist,
                                        # digits:0,1,2, rotten_tomatoes, airline, ...
        loss: cross_entropy             # cross_entropy | bce | mse
        metric: accuracy                # chooses on validation: accuracy | macro_f1 |
                                        # mse | loss
        split_seed: 0                   # seed of the bundled train/val/test split
        max_length: 64                  # text tasks: tokens per example
      # a task of data files for a Hugging Face model (source "files", paths relative
      # to the YAML file): one file split by split_seed, or one file per split
      #   files: data/sentiment.csv     # or {train: a.csv, validation: b.csv, test: c.csv}
      #   options: {text_column: review, label_column: stars, validation: 0.1, test: 0.1}

    methods:                            # default: average, task_arithmetic, ties,
      - average                         # fisher_diagonal, fisher_exact, ensemble
      - method: fisher_diagonal
        grid: {damping: [1.0e-4, 1.0e-3, 1.0e-2]}   # a product, or a list of points
      - method: fisher_exact
        label: fisher_exact (80 iterations)        # the row name
        options: {maxiter: 80}                     # fixed for every point

    fisher:
      kind: exact                       # exact | mc | empirical
      examples: 512                     # training examples per task (null: all)
      batch_size: 64
      mc_samples: 1
      save: true                        # Fisher files in <output_dir>/fishers, reused
      dir: fishers                      # by a rerun when model, data and settings match
    exact:
      examples: 256                     # examples per task for the GGN operators
    evaluation:
      batch_size: 256
      references: true                  # rows model: <task>, base, majority class
      one_class_share: 0.95             # OneClassWarning threshold
    outputs:
      merged: safetensors               # safetensors | hf | none
      plots: true
      sweeps: true

A model is a path (a ``.safetensors`` checkpoint written by ``curvmerge finetune``, or a
Hugging Face folder or hub id) or a mapping: ``{kind: cnn|mlp|minilm, ...}`` builds a
built-in model (optionally filled from ``checkpoint``), ``{source: NAME, path: ...,
options: {...}}`` uses a registered source. :data:`MODEL_SOURCES` and :data:`TASK_SOURCES`
are the hooks: ``"hf"`` models come from ``curvmerge.hf.load_model``; data files
(``files:``, source ``"files"``) are read by :func:`~curvmerge.experiment.sources.files_task`
(CSV, TSV, JSON Lines, Parquet, ``datasets`` folders; ``options`` are its columns, labels and
split sizes, :data:`~curvmerge.experiment.sources.FILES_OPTIONS`).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from curvmerge.experiment.outputs import MERGED_WRITERS
from curvmerge.experiment.pools import LOSSES
from curvmerge.experiment.sources import FILE_SPLITS, FILES_OPTIONS, MODEL_SOURCES, TASK_SOURCES
from curvmerge.experiment.spec import DEFAULT_METHODS, MethodRun
from curvmerge.merging.registry import UnknownMethodError
from curvmerge.train import METRICS

__all__ = ["validate_config"]

_TOP = (
    "title",
    "seed",
    "output_dir",
    "force",
    "models",
    "tasks",
    "methods",
    "fisher",
    "exact",
    "evaluation",
    "outputs",
)
_MODELS = ("base", "params", "finetuned")
_MODEL_ENTRY = (
    "source",
    "path",
    "kind",
    "checkpoint",
    "num_classes",
    "in_features",
    "hidden",
    "image_size",
    "in_channels",
    "channels",
    "seed",
    "options",
)
_TASK_ENTRY = ("data", "source", "loss", "metric", "split_seed", "max_length", "files", "options")
_FISHER = ("kind", "examples", "batch_size", "mc_samples", "save", "dir")
_EXACT = ("examples",)
_EVALUATION = ("batch_size", "references", "one_class_share")
_OUTPUTS = ("merged", "plots", "sweeps")
_KINDS = ("exact", "mc", "empirical")
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


# ---------------------------------------------------------------------------------- checks
def _keys(d: Any, valid: Sequence[str], where: str) -> dict:
    if not isinstance(d, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {type(d).__name__}")
    for k in d:
        if k not in valid:
            raise ValueError(f"{where}: unknown key {k!r} (valid: {', '.join(valid)})")
    return dict(d)


def _int(v: Any, where: str, minimum: int | None = None, none: bool = False) -> int | None:
    if v is None and none:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{where}: expected an integer, got {v!r}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{where}: must be at least {minimum}, got {v}")
    return v


def _float(v: Any, where: str) -> float:
    if isinstance(v, str) and _NUMBER.match(v.strip()):
        v = float(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{where}: expected a finite number, got {v!r}")
    return float(v)


def _bool(v: Any, where: str) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"{where}: expected true or false, got {v!r}")
    return v


def _str(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"{where}: expected a non-empty string, got {v!r}")
    return v


def _choice(v: Any, choices: Sequence[str], where: str) -> str:
    if v not in choices:
        raise ValueError(f"{where}: must be one of {', '.join(choices)}, got {v!r}")
    return v


def _numbers(v: Any) -> Any:
    """YAML reads ``1e-3`` as a string: numeric strings inside grids become floats."""
    if isinstance(v, str) and _NUMBER.match(v.strip()):
        return float(v)
    if isinstance(v, list):
        return [_numbers(x) for x in v]
    if isinstance(v, tuple):
        return tuple(_numbers(x) for x in v)
    if isinstance(v, Mapping):
        return {k: _numbers(x) for k, x in v.items()}
    return v


def _path(v: Any, where: str, base_dir: Path | None) -> str:
    p = Path(_str(v, where)).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    return str(p)


def _model_entry(v: Any, where: str, base_dir: Path | None) -> dict[str, Any]:
    if isinstance(v, (str, os.PathLike)):
        v = {"path": os.fspath(v)}
    entry = _keys(v, _MODEL_ENTRY, where)
    if "kind" in entry:
        entry.setdefault("source", "builtin")
    if "source" not in entry:
        if "path" not in entry:
            raise ValueError(f"{where}: give a path, a kind (cnn, mlp, minilm) or a source")
        path = str(entry["path"])
        local = Path(path) if Path(path).is_absolute() or base_dir is None else base_dir / path
        if path.endswith(".safetensors"):
            entry["source"] = "checkpoint"
        elif local.is_dir() or not path.startswith((".", "/", "~")):
            entry["source"] = "hf"
        else:
            raise ValueError(f"{where}: {path} is neither a .safetensors file nor a folder")
    source = _str(entry["source"], f"{where}.source")
    if source not in MODEL_SOURCES:
        raise ValueError(
            f"{where}.source: unknown model source {source!r} (known: {', '.join(MODEL_SOURCES)})"
        )
    for key in ("path", "checkpoint"):
        if key in entry:
            raw = _str(entry[key], f"{where}.{key}")
            local = Path(raw).expanduser()
            if not local.is_absolute() and base_dir is not None:
                local = base_dir / local
            # a hub id stays as it is; paths are resolved against the config's folder
            entry[key] = str(local) if source != "hf" or local.exists() else raw
    if entry.get("options") is not None and not isinstance(entry["options"], Mapping):
        raise ValueError(f"{where}.options: expected a mapping")
    return entry


def _files_entry(entry: dict[str, Any], where: str, base_dir: Path | None) -> None:
    """Check a ``files`` task and resolve its paths against ``base_dir`` (in place)."""
    key = "files" if "files" in entry else "data"
    if key not in entry:
        raise ValueError(f"{where}: give 'files' (a data file, or one per split)")
    files = entry[key]
    if isinstance(files, Mapping):
        unknown = sorted(set(files) - set(FILE_SPLITS), key=str)
        if unknown:
            raise ValueError(
                f"{where}.{key}: unknown split {unknown[0]!r} (train, validation, test)"
            )
        given = {FILE_SPLITS[k] for k in files}
        missing = [k for k in ("train", "validation", "test") if FILE_SPLITS[k] not in given]
        if missing:
            raise ValueError(
                f"{where}.{key}: needs train, validation and test ({missing[0]} is missing)"
            )
        entry[key] = {
            str(k): _path(_pathlike(p, f"{where}.{key}.{k}"), f"{where}.{key}.{k}", base_dir)
            for k, p in files.items()
        }
    else:
        entry[key] = _path(_pathlike(files, f"{where}.{key}"), f"{where}.{key}", base_dir)
    options = entry.get("options")
    if options is not None:
        _keys(options, FILES_OPTIONS, f"{where}.options")


def _pathlike(v: Any, where: str) -> str:
    if isinstance(v, os.PathLike):
        v = os.fspath(v)
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"{where}: expected a path, got {v!r}")
    return v


def _task_entry(v: Any, where: str, base_dir: Path | None = None) -> dict[str, Any]:
    if isinstance(v, str):
        v = {"data": v}
    entry = _keys(v if v is not None else {}, _TASK_ENTRY, where)
    if "source" in entry:
        if entry["source"] not in TASK_SOURCES:
            raise ValueError(
                f"{where}.source: unknown task source {entry['source']!r} "
                f"(known: {', '.join(TASK_SOURCES)})"
            )
    elif "files" in entry:
        entry["source"] = "files"
    if entry.get("options") is not None and not isinstance(entry["options"], Mapping):
        raise ValueError(f"{where}.options: expected a mapping")
    if entry.get("source") == "files":
        _files_entry(entry, where, base_dir)
    elif "data" in entry:
        _str(entry["data"], f"{where}.data")
    if "loss" in entry:
        _choice(entry["loss"], LOSSES, f"{where}.loss")
    if "metric" in entry:
        _choice(entry["metric"], tuple(METRICS), f"{where}.metric")
    if "split_seed" in entry:
        _int(entry["split_seed"], f"{where}.split_seed", 0)
    if "max_length" in entry:
        _int(entry["max_length"], f"{where}.max_length", 1)
    return entry


def _method_entry(v: Any, where: str) -> MethodRun:
    if isinstance(v, Mapping):
        _keys(v, ("method", "label", "grid", "options"), where)
        if "method" not in v:
            raise ValueError(f"{where}: needs 'method' (a registry name)")
        grid = v.get("grid")
        if grid is not None and not isinstance(grid, (list, Mapping)):
            raise ValueError(f"{where}.grid: a list of points or a mapping of value lists")
        if isinstance(grid, list) and not all(isinstance(p, Mapping) for p in grid):
            raise ValueError(f"{where}.grid: every point must be a mapping of options")
        if v.get("options") is not None and not isinstance(v["options"], Mapping):
            raise ValueError(f"{where}.options: expected a mapping")
        if v.get("label") is not None:
            _str(v["label"], f"{where}.label")
        v = {**v, "grid": _numbers(grid), "options": _numbers(dict(v.get("options") or {}))}
    elif not isinstance(v, str):
        raise ValueError(f"{where}: a method is a registry name or a mapping")
    try:
        run = MethodRun.parse(v)
        run.check()
    except (UnknownMethodError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None
    return run


def validate_config(
    config: Mapping[str, Any], *, base_dir: str | os.PathLike | None = None
) -> dict[str, Any]:
    """Check a configuration and return it normalised (paths resolved against
    ``base_dir``: model paths, ``output_dir``, ``fisher.dir`` and the data files of
    ``files`` tasks; defaults filled in, methods parsed). Nothing is loaded.

    Raises:
        ValueError: Naming the first unknown key or bad value (``fisher.kind: must be one
            of exact, mc, empirical, got 'full'``).
    """
    base = Path(base_dir) if base_dir is not None else None
    cfg = _keys(config, _TOP, "config")
    out: dict[str, Any] = {
        "title": _str(cfg.get("title", "experiment"), "title"),
        "seed": _int(cfg.get("seed", 0), "seed", 0),
        "output_dir": _path(cfg["output_dir"], "output_dir", base)
        if cfg.get("output_dir") is not None
        else None,
        "force": _bool(cfg.get("force", False), "force"),
    }
    if "models" not in cfg:
        raise ValueError("config: 'models' is required (models.finetuned: one model per task)")
    models = _keys(cfg["models"], _MODELS, "models")
    finetuned = models.get("finetuned")
    if not isinstance(finetuned, Mapping) or not finetuned:
        raise ValueError("models.finetuned: a mapping of task name to model is required")
    out["models"] = {
        "finetuned": {
            str(name): _model_entry(m, f"models.finetuned.{name}", base)
            for name, m in finetuned.items()
        },
        "base": _model_entry(models["base"], "models.base", base)
        if models.get("base") is not None
        else None,
        "params": models.get("params"),
    }
    params = models.get("params")
    if params is not None and not (
        isinstance(params, str)
        or (isinstance(params, list) and all(isinstance(p, str) for p in params))
    ):
        raise ValueError("models.params: a regular expression or a list of parameter names")
    if isinstance(params, str):
        try:
            re.compile(params)
        except re.error as err:
            raise ValueError(f"models.params: not a valid regular expression: {err}") from None
    tasks = cfg.get("tasks") or {}
    if not isinstance(tasks, Mapping):
        raise ValueError("tasks: expected a mapping of task name to task")
    for name in tasks:
        if str(name) not in out["models"]["finetuned"]:
            raise ValueError(f"tasks.{name}: no model in models.finetuned for this task")
    out["tasks"] = {
        name: _task_entry(tasks.get(name), f"tasks.{name}", base)
        for name in out["models"]["finetuned"]
    }
    methods = cfg.get("methods", list(DEFAULT_METHODS))
    if not isinstance(methods, list) or not methods:
        raise ValueError("methods: expected a non-empty list of methods")
    out["methods"] = [_method_entry(m, f"methods[{i}]") for i, m in enumerate(methods)]
    labels = [r.name for r in out["methods"]]
    for i, label in enumerate(labels):
        if label in labels[:i]:
            raise ValueError(f"methods[{i}]: the row {label!r} appears twice; give it a label")

    fisher = _keys(cfg.get("fisher") or {}, _FISHER, "fisher")
    out["fisher"] = {
        "kind": _choice(fisher.get("kind", "exact"), _KINDS, "fisher.kind"),
        "examples": _int(fisher.get("examples", 512), "fisher.examples", 1, none=True),
        "batch_size": _int(fisher.get("batch_size", 64), "fisher.batch_size", 1),
        "mc_samples": _int(fisher.get("mc_samples", 1), "fisher.mc_samples", 1),
        "save": _bool(fisher.get("save", True), "fisher.save"),
        "dir": _path(
            fisher["dir"], "fisher.dir", Path(out["output_dir"]) if out["output_dir"] else base
        )
        if fisher.get("dir") is not None
        else None,
    }
    exact = _keys(cfg.get("exact") or {}, _EXACT, "exact")
    out["exact"] = {"examples": _int(exact.get("examples", 256), "exact.examples", 1, none=True)}
    ev = _keys(cfg.get("evaluation") or {}, _EVALUATION, "evaluation")
    share = _float(ev.get("one_class_share", 0.95), "evaluation.one_class_share")
    if not 0 < share <= 1:
        raise ValueError(f"evaluation.one_class_share: must be in (0, 1], got {share}")
    out["evaluation"] = {
        "batch_size": _int(ev.get("batch_size", 256), "evaluation.batch_size", 1),
        "references": _bool(ev.get("references", True), "evaluation.references"),
        "one_class_share": share,
    }
    outputs = _keys(cfg.get("outputs") or {}, _OUTPUTS, "outputs")
    merged = outputs.get("merged", "safetensors")
    merged = None if merged in (None, "none", False) else merged
    if merged is not None:
        _choice(merged, tuple(MERGED_WRITERS), "outputs.merged")
    out["outputs"] = {
        "merged": merged,
        "plots": _bool(outputs.get("plots", True), "outputs.plots"),
        "sweeps": _bool(outputs.get("sweeps", True), "outputs.sweeps"),
    }
    return out
