"""``curvmerge run CONFIG.yaml``: a whole experiment from one configuration.

The configuration (schema: :mod:`curvmerge.experiment.schema`) names a model pool, a task
pool and methods; :func:`curvmerge.experiment.load_config` loads it and
:meth:`curvmerge.experiment.Experiment.run` computes every statistic once, chooses
coefficients on validation, evaluates on test and writes the tables (Markdown, CSV), plots,
merged models and a JSON record into ``output_dir``.

Tasks with ``files:`` read data files (:mod:`curvmerge.data.files`) for Hugging Face
models; paths are relative to the configuration's folder::

    tasks:
      sentiment:
        files: data/sentiment.csv         # split by seed into train/validation/test, or
        # files: {train: a.csv, validation: b.csv, test: c.csv}
        split_seed: 0
        max_length: 64
        options: {text_column: review, label_column: stars, validation: 0.1, test: 0.1}
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from curvmerge.commands.common import (
    CLIError,
    add_common,
    check_outputs,
    log,
    read_parts,
    warnings_as_messages,
)

FILES_OPTIONS = (
    "text_column",
    "text_pair_column",
    "label_column",
    "image_column",
    "label2id",
    "split",
    "validation",
    "test",
)
_ENCODE = ("text_column", "text_pair_column", "label_column", "image_column", "label2id")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "run",
        help="run a whole experiment from a YAML config",
        description="Run an experiment from one YAML configuration: a model pool "
        "(checkpoints, Hugging Face folders or hub ids, the base), a task pool (bundled "
        "tasks or data files with their columns, loss and metric), methods with their "
        "coefficient grids, Fisher settings and an output folder. Every statistic is "
        "computed once (Fisher files are kept and reused by a rerun), coefficients are "
        "chosen on validation, test is evaluated once per row; writes the tables "
        "(Markdown, CSV), plots (PNG), merged models and a JSON record. The schema is in "
        "the documentation of curvmerge.experiment.schema.",
    )
    p.add_argument("config", help="the YAML configuration")
    add_common(p)
    p.set_defaults(func=run)


def _resolve(path: Any, base_dir: Path, where: str) -> str:
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise ValueError(f"{where}: expected a path, got {path!r}")
    p = Path(os.fspath(path)).expanduser()
    return str(p if p.is_absolute() else base_dir / p)


def files_source(base_dir: Path):
    """The ``files`` task source: data files for Hugging Face models, paths relative to
    ``base_dir``."""

    def load(name: str, entry: dict[str, Any], model) -> Any:
        from curvmerge.data.files import encode_table, read_table
        from curvmerge.experiment import TaskData
        from curvmerge.hf import HFModel

        where = entry.get("_where", f"tasks.{name}")
        hf = getattr(model, "handle", None)
        if not isinstance(hf, HFModel):
            raise ValueError(
                f"{where}: data files are encoded with a Hugging Face model's tokenizer or image "
                f"processor; models.finetuned.{name} is not a Hugging Face model"
            )
        opts = dict(entry.get("options") or {})
        unknown = sorted(set(opts) - set(FILES_OPTIONS))
        if unknown:
            raise ValueError(
                f"{where}.options: unknown key {unknown[0]!r} (valid: {', '.join(FILES_OPTIONS)})"
            )
        files = entry.get("files", entry.get("data"))
        if isinstance(files, Mapping):
            valid = {"train": "train", "validation": "val", "val": "val", "test": "test"}
            unknown = sorted(set(files) - set(valid))
            if unknown:
                raise ValueError(
                    f"{where}.files: unknown split {unknown[0]!r} (train, validation, test)"
                )
            parts = {
                valid[k]: read_table(_resolve(v, base_dir, f"{where}.files.{k}"))
                for k, v in files.items()
            }
            missing = [k for k in ("train", "val", "test") if k not in parts]
            if missing:
                raise ValueError(
                    f"{where}.files: needs train, validation and test ({missing[0]} is missing)"
                )
            source = str(_resolve(files["train"], base_dir, where))
        else:
            source = _resolve(files, base_dir, f"{where}.files")
            parts = read_parts(
                source,
                split=opts.get("split"),
                validation=opts.get("validation", 0.1),
                test=opts.get("test", 0.1),
                seed=int(entry.get("split_seed", 0)),
                options=(f"{where}.options.validation", f"{where}.options.test"),
            )
        encode = {k: opts[k] for k in _ENCODE if k in opts}
        if "max_length" in entry:
            encode["max_length"] = entry["max_length"]
        data, loss = {}, None
        for part, table in parts.items():
            batches = encode_table(
                table, hf, batch_size=max(len(table), 1), source=source, **encode
            )
            loss = batches.loss.name
            data[part] = batches.batches[0]
        return TaskData(
            name,
            train=data["train"],
            val=data["val"],
            test=data["test"],
            loss=entry.get("loss", loss),
            metric=entry.get("metric"),
        )

    return load


@contextlib.contextmanager
def _files_source(base_dir: Path) -> Iterator[None]:
    """Connect data files while the configuration loads, unless the experiment package
    already connects them itself (its own ``files`` source replaces the placeholder)."""
    from curvmerge.experiment import TASK_SOURCES, register_task_source

    current = TASK_SOURCES.get("files")
    placeholder = (
        current is None
        or getattr(current, "__module__", "") == "curvmerge.experiment.sources"
        and getattr(current, "__name__", "") == "_files_source"
    )
    if not placeholder:
        yield
        return
    register_task_source("files", files_source(base_dir))
    try:
        yield
    finally:
        if current is not None:
            register_task_source("files", current)


def run(args) -> int:
    from curvmerge.experiment import format_report, load_config, output_paths

    path = Path(args.config)
    if not path.is_file():
        raise CLIError(f"config {path} does not exist")
    with _files_source(path.parent):
        experiment = load_config(path)
    if args.force:
        experiment.force = True
    if experiment.output_dir is not None:
        check_outputs(output_paths(experiment.output_dir), experiment.force)
    log(args, f"{len(experiment.pool.models)} models, {len(experiment.methods)} methods")
    with warnings_as_messages():
        result = experiment.run(
            progress=not args.quiet,
            log=None if args.quiet else (lambda msg: log(args, msg)),
        )
    print(format_report(result, experiment.title), end="")
    if result.paths:
        print(f"wrote {len(result.paths)} files into {experiment.output_dir}")
        for what in ("markdown", "csv", "png", "report", "json"):
            if what in result.paths:
                print(f"  {result.paths[what]}")
    else:
        print("(no output_dir in the configuration: nothing written)")
    return 0
