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
    count_rows,
    log,
    rows_line,
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


def rows_lines(experiment) -> list[str]:
    """One line per task: its training rows (and how many the Fisher takes), validation rows
    (choose coefficients) and test rows (reported), and where they come from."""
    tasks_cfg = (experiment.config or {}).get("tasks") or {}
    examples = experiment.settings.fisher_examples
    lines = []
    for task in experiment.tasks:
        entry = tasks_cfg.get(task.name) or {}
        counts = {
            k: count_rows(getattr(task, k))
            for k in ("train", "val", "test")
            if getattr(task, k) is not None
        }
        if len(counts) < 3:
            continue
        n = counts["train"]
        fisher = f"Fisher: {n if examples is None else min(examples, n)} of them"
        files = entry.get("files")
        if isinstance(files, str):
            opts = entry.get("options") or {}
            source = files
            how = (
                f"split by split_seed {entry.get('split_seed', 0)}, validation "
                f"{opts.get('validation', 0.1):g}, test {opts.get('test', 0.1):g}"
            )
        elif isinstance(files, dict):
            source, how = ", ".join(str(v) for v in files.values()), "one file per split"
        else:
            source, how = str(entry.get("data") or "bundled task"), ""
        lines.append(rows_line(f"tasks.{task.name} ({source})", counts, fisher=fisher, how=how))
    return lines


def run(args) -> int:
    from curvmerge.distributed import is_main_process
    from curvmerge.experiment import format_report, load_config, output_paths

    experiment = load_config(args.config)
    if args.force:
        experiment.force = True
    if experiment.output_dir is not None:
        check_outputs(output_paths(experiment.output_dir), experiment.force)
    log(args, f"{len(experiment.pool.models)} models, {len(experiment.methods)} methods")
    for line in rows_lines(experiment):
        log(args, line)
    with warnings_as_messages():
        result = experiment.run(
            progress=not args.quiet,
            log=None if args.quiet else (lambda msg: log(args, msg)),
        )
    if not is_main_process():  # rank 0 prints (and wrote the files)
        return 0
    print(format_report(result, experiment.title), end="")
    if result.paths:
        print(f"wrote {len(result.paths)} files into {experiment.output_dir}")
        for what in ("markdown", "csv", "png", "report", "json"):
            if what in result.paths:
                print(f"  {result.paths[what]}")
    else:
        print("(no output_dir in the configuration: nothing written)")
    return 0
