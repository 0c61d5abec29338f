"""Experiments from one configuration: a mapping (or a YAML file) in, results out.

:meth:`Experiment.from_config` validates the configuration first
(:func:`~curvmerge.experiment.schema.validate_config`: the schema, with every key, is in
:mod:`curvmerge.experiment.schema`), then loads its models and tasks through the sources of
:mod:`curvmerge.experiment.sources`; :func:`load_config` does the same for a YAML file, with
paths relative to the file's folder. :meth:`Experiment.run` runs
:func:`~curvmerge.experiment.run_experiment` and writes the files.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curvmerge._optional import require
from curvmerge.distributed import barrier, on_main_process
from curvmerge.experiment.outputs import output_paths, write_results
from curvmerge.experiment.pools import ModelPool, TaskData
from curvmerge.experiment.runner import run_experiment
from curvmerge.experiment.schema import validate_config
from curvmerge.experiment.sources import TASK_SOURCES, load_base_entry, load_model_entry
from curvmerge.experiment.spec import DEFAULT_METHODS, ExperimentResult, Settings

__all__ = ["Experiment", "load_config"]


@dataclass
class Experiment:
    """A whole experiment: model pool, task pool, methods, settings, outputs.

    Build one from Python objects, or from a configuration with :meth:`from_config` /
    :func:`load_config`; :meth:`run` computes, and writes the files when ``output_dir`` is set.

    Attributes:
        pool: The models.
        tasks: One task per model.
        methods: Registry names or :class:`~curvmerge.experiment.MethodRun` entries.
        settings: Statistics and evaluation settings.
        output_dir: Where :func:`~curvmerge.experiment.write_results` writes (``None``:
            nothing is written).
        title: Heading of tables and plots.
        force: Replace existing result files (otherwise :meth:`run` refuses before working).
        save_fishers: Keep Fisher files in ``settings.fisher_dir`` (default
            ``<output_dir>/fishers``) and reuse them on a rerun.
        merged: Format of the merged models written (``None``: none).
        plots: Write PNG plots.
        sweeps: Write each method's grid.
        config: The validated configuration it came from (recorded in the JSON).
    """

    pool: ModelPool
    tasks: list[TaskData]
    methods: list[Any] = field(default_factory=lambda: list(DEFAULT_METHODS))
    settings: Settings = field(default_factory=Settings)
    output_dir: str | os.PathLike | None = None
    title: str = "experiment"
    force: bool = False
    save_fishers: bool = True
    merged: str | None = "safetensors"
    plots: bool = True
    sweeps: bool = True
    config: dict[str, Any] | None = None

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], *, base_dir: str | os.PathLike | None = None
    ) -> Experiment:
        """Validate ``config`` (see the module docstring), then load its models and tasks.

        Args:
            config: The configuration mapping.
            base_dir: Folder that relative paths are relative to (default: the current one).

        Raises:
            ValueError: An unknown key or a bad value, naming it.
        """
        cfg = validate_config(config, base_dir=base_dir)
        finetuned = cfg["models"]["finetuned"]
        loaded = {
            name: load_model_entry(entry, f"models.finetuned.{name}")
            for name, entry in finetuned.items()
        }
        first = next(iter(loaded.values()))
        params = cfg["models"]["params"] if cfg["models"]["params"] is not None else first.params
        base = (
            load_base_entry(cfg["models"]["base"], "models.base", first, params)
            if cfg["models"]["base"] is not None
            else None
        )
        tasks = []
        context = {
            "_base_dir": str(base_dir) if base_dir is not None else None,
            "_batch_size": cfg["fisher"]["batch_size"],
            "_eval_batch_size": cfg["evaluation"]["batch_size"],
        }
        for name, entry in cfg["tasks"].items():
            source = entry.get("source", "bundled")
            task = TASK_SOURCES[source](
                name, {**entry, **context, "_where": f"tasks.{name}"}, loaded[name]
            )
            if not isinstance(task, TaskData):
                raise TypeError(f"tasks.{name}: the task source {source!r} returned no TaskData")
            tasks.append(task)
        pool = ModelPool(
            [m.module for m in loaded.values()],
            base=base.module if base is not None else None,
            params=params,
            names=list(loaded),
            info=[{"task": n, **m.info} for n, m in loaded.items()]
            + ([{"base": True, **base.info}] if base is not None else []),
            tokenizer=first.tokenizer,
            handles=[m.handle for m in loaded.values()] if first.handle is not None else [],
        )
        f, ev = cfg["fisher"], cfg["evaluation"]
        fisher_dir = f["dir"]
        if fisher_dir is None and f["save"] and cfg["output_dir"] is not None:
            fisher_dir = str(Path(cfg["output_dir"]) / "fishers")
        settings = Settings(
            fisher_kind=f["kind"],
            fisher_examples=f["examples"],
            fisher_batch_size=f["batch_size"],
            mc_samples=f["mc_samples"],
            exact_examples=cfg["exact"]["examples"],
            seed=cfg["seed"],
            batch_size=ev["batch_size"],
            references=ev["references"],
            one_class_share=ev["one_class_share"],
            fisher_dir=fisher_dir if f["save"] else None,
        )
        record = {
            **cfg,
            "methods": [
                {
                    "method": r.spec.name,
                    "label": r.label,
                    "grid": r.grid,
                    "options": dict(r.options),
                }
                for r in cfg["methods"]
            ],
        }
        return cls(
            pool,
            tasks,
            methods=cfg["methods"],
            settings=settings,
            output_dir=cfg["output_dir"],
            title=cfg["title"],
            force=cfg["force"],
            save_fishers=f["save"],
            merged=cfg["outputs"]["merged"],
            plots=cfg["outputs"]["plots"],
            sweeps=cfg["outputs"]["sweeps"],
            config=record,
        )

    def check_outputs(self) -> None:
        """Refuse existing result files unless ``force`` (before any work is done).

        Raises:
            FileExistsError: Naming the first existing file.
        """
        if self.output_dir is None or self.force:
            return
        for path in output_paths(self.output_dir):
            if path.exists():
                raise FileExistsError(f"{path} already exists; set force to replace it")

    def run(
        self, *, progress: bool = False, log: Callable[[str], None] | None = None
    ) -> ExperimentResult:
        """Run the experiment (see :func:`~curvmerge.experiment.run_experiment`) and write its
        files when ``output_dir`` is set (under torch.distributed: every process runs it,
        rank 0 writes; ``docs/distributed.md``).

        Args:
            progress: Progress bars while computing statistics.
            log: Called with progress lines.
        """
        self.check_outputs()
        settings = self.settings
        if self.output_dir is not None and self.save_fishers and settings.fisher_dir is None:
            settings = Settings(
                **{**vars(settings), "fisher_dir": Path(self.output_dir) / "fishers"}
            )
        result = run_experiment(
            self.pool, self.tasks, self.methods, settings=settings, progress=progress, log=log
        )
        result.settings["title"] = self.title
        if self.output_dir is None:
            return result
        # under torch.distributed every process has the same result: rank 0 writes it, once
        # every process has checked the outputs and finished; none returns before the files
        barrier()
        on_main_process(
            lambda: write_results(
                result,
                self.output_dir,
                title=self.title,
                plots=self.plots,
                sweeps=self.sweeps,
                merged=self.merged,
                pool=self.pool,
                config=self.config,
            )
        )
        return result


def load_config(path: str | os.PathLike) -> Experiment:
    """Read a YAML configuration (see the module docstring) into an :class:`Experiment`;
    relative paths in it are relative to the file's folder.

    Raises:
        FileNotFoundError: No such file.
        ValueError: Not valid YAML, not a mapping, or an unknown key or bad value (named).
    """
    require("yaml", "curvmerge.experiment.load_config")
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"config {p} is not valid YAML: {err}") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"config {p}: expected a mapping of settings")
    try:
        return Experiment.from_config(data, base_dir=p.parent)
    except ValueError as err:
        raise ValueError(f"config {p}: {err}") from err
