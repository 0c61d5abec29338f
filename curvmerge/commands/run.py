"""``curvmerge run CONFIG.yaml``: a whole experiment from one configuration.

The configuration (schema: :mod:`curvmerge.experiment.schema`) names a model pool, a task
pool and methods; :func:`curvmerge.experiment.load_config` loads it and
:meth:`curvmerge.experiment.Experiment.run` computes every statistic once, chooses
coefficients on validation, evaluates on test and writes the tables (Markdown, CSV), plots,
merged models and a JSON record into ``output_dir``.

Tasks with ``files:`` read data files for Hugging Face models
(:func:`curvmerge.experiment.files_task`); every path is relative to the configuration's
folder.
"""

from __future__ import annotations

from curvmerge.commands.common import (
    add_common,
    check_outputs,
    log,
    warnings_as_messages,
)


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


def run(args) -> int:
    from curvmerge.experiment import format_report, load_config, output_paths

    experiment = load_config(args.config)
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
