"""``curvmerge compare``: several methods side by side, through the experiment runner.

Hugging Face models' ``--data`` files are read by :func:`curvmerge.experiment.files_task`
(batches of ``--batch-size`` training rows, the data's loss), as ``curvmerge run`` reads
``files:`` tasks."""

from __future__ import annotations

from pathlib import Path

from curvmerge.commands.common import (
    BASE_HELP,
    MODEL_HELP,
    OUTPUT_STEM_HELP,
    PARAMS_HELP,
    add_common,
    add_data_options,
    add_split_options,
    check_outputs,
    count_rows,
    load_base,
    load_models,
    log,
    needs_base_error,
    rows_line,
    shared_names,
    split_description,
    warnings_as_messages,
)


def add_parser(sub) -> None:
    from curvmerge.experiment import DEFAULT_METHODS

    p = sub.add_parser(
        "compare",
        help="compare methods side by side (table and plot)",
        description="Merge models with several methods through the experiment runner "
        "(every statistic computed once, coefficients chosen on validation from each "
        "method's registry grid) and compare test accuracy and macro-F1 per task with each "
        "fine-tuned model, the base, the majority class and output ensembling. Hugging Face "
        "models' --data files are split into train, validation and test parts. Writes "
        "<output>.md/.csv/.png, <output>_report.md and <output>.json.",
    )
    p.add_argument("models", nargs="+", metavar="model", help=MODEL_HELP)
    p.add_argument("--base", help=BASE_HELP)
    p.add_argument(
        "--methods",
        help="comma-separated registry names (default: " + ",".join(DEFAULT_METHODS) + ")",
    )
    p.add_argument(
        "--fisher-kind",
        default="exact",
        choices=["exact", "mc", "empirical"],
        help="kind of the diagonal Fishers (default exact)",
    )
    add_data_options(
        p,
        batch_size=64,
        examples=512,
        examples_help="training examples per model for the Fishers (default 512)",
    )
    add_split_options(p)
    p.add_argument("--params", help=PARAMS_HELP)
    p.add_argument("--output", "-o", required=True, help=OUTPUT_STEM_HELP)
    add_common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from curvmerge.distributed import barrier, is_main_process, on_main_process
    from curvmerge.experiment import (
        DEFAULT_METHODS,
        ModelPool,
        Settings,
        TaskData,
        files_task,
        format_report,
        output_paths,
        run_experiment,
        write_results,
    )
    from curvmerge.merging.registry import get_method

    methods = [m.strip() for m in args.methods.split(",")] if args.methods else DEFAULT_METHODS
    methods = [get_method(m).name for m in methods if m]
    if args.methods and not args.base:
        need = [m for m in methods if get_method(m).needs_base]
        if need:
            raise needs_base_error(need[0])
    out = Path(args.output)
    check_outputs(output_paths(out.parent, out.name), args.force)
    models = load_models(args.models, args, need_data=True)
    base = load_base(args.base, models, args.params)
    names = shared_names(models, args.params, base)
    settings = Settings(
        fisher_kind=args.fisher_kind,
        fisher_examples=args.examples,
        fisher_batch_size=args.batch_size,
        exact_examples=min(args.examples, 256),
    )
    tasks = []
    for m in models:
        if m.is_hf:  # data files: batches and their loss, read by the library
            tasks.append(
                files_task(
                    m.name,
                    m.hf,
                    m.data_file,
                    **m.data_options,
                    split=args.split,
                    validation=args.val_size,
                    test=args.test_size,
                    split_seed=args.split_seed,
                    max_length=args.max_length,
                    batch_size=args.batch_size,
                    eval_batch_size=settings.batch_size,
                )
            )
            task = tasks[-1]
            counts = {k: count_rows(getattr(task, k)) for k in ("train", "val", "test")}
            fisher = f"Fisher: {min(args.examples, counts['train'])} of them"
            how = split_description(m.data_file, args)
            log(args, rows_line(m.describe_data(args), counts, fisher=fisher, how=how))
            continue
        parts = m.splits(args)
        tasks.append(
            TaskData(
                m.name, train=parts["train"], val=parts["val"], test=parts["test"], loss=m.loss_name
            )
        )
    pool = ModelPool(
        [m.model for m in models],
        base=base.model if base is not None else None,
        params=names,
        names=[m.name for m in models],
        info=[{"path": str(m.path), "data": getattr(m, "data_file", None)} for m in models],
        handles=[m.hf for m in models] if models[0].is_hf else [],
    )
    with warnings_as_messages():
        res = run_experiment(
            pool,
            tasks,
            methods,
            settings=settings,
            progress=not args.quiet,
            log=None if args.quiet else (lambda msg: log(args, msg)),
        )
    barrier()  # under torchrun: once every process has checked the outputs, rank 0 writes

    def write() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_results(res, out.parent, stem=out.name, title="comparison", merged=None, pool=pool)

    on_main_process(write)
    if not is_main_process():
        return 0
    print(format_report(res, "comparison"), end="")
    print(f"wrote {out}.md/.csv/.png, {out}_report.md and {out}.json")
    return 0
