"""``curvmerge eval``: evaluate models on their tasks, optionally with a merged body."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from curvmerge.commands.common import (
    CHECKPOINT_FORMAT,
    MODEL_HELP,
    TaskModel,
    add_common,
    add_data_options,
    check_outputs,
    count_rows,
    draw,
    ensure_parent,
    evaluate_body,
    load_models,
    log,
    require_safetensors,
    stem_outputs,
    warnings_as_messages,
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate models, optionally with a merged body",
        description="Evaluate each model on its own task: a checkpoint on its bundled "
        "task's split, a Hugging Face model on its --data file (a merged folder written by "
        "'curvmerge merge -o DIR' is a Hugging Face model). With --body, each model runs with "
        "the merged shared parameters and its own head. Prints accuracy and macro-F1 (MSE "
        "for regression), one row per folder of models (merge -o DIR's task folders) or "
        "per model, and the majority class (the most frequent label of the evaluated rows, "
        "predicted for all), and warns when a model predicts one class for nearly every "
        "input. Evaluate on held-out rows: eval uses the whole --data file.",
    )
    p.add_argument("models", nargs="+", metavar="model", help=MODEL_HELP)
    p.add_argument(
        "--body", help="merged parameters written by 'curvmerge merge -o FILE.safetensors'"
    )
    add_data_options(
        p,
        batch_size=256,
        split_default="test",
        examples_help="evaluate a seeded random draw of N examples per model (default: all)",
    )
    p.add_argument("--output", "-o", help="also write <output>.md/.csv/.png")
    p.add_argument("--json", action="store_true", help="also print the accuracies as JSON")
    add_common(p)
    p.set_defaults(func=run)


def read_body(path: str, models: Sequence[TaskModel]):
    """The merged parameters of a file, checked against every model."""
    from curvmerge.io import check_compatible, load_params, read_metadata

    p = require_safetensors(path, "merged parameters")
    meta = read_metadata(p)
    body = load_params(p)
    if meta.get("format") == CHECKPOINT_FORMAT:  # a whole checkpoint: use its body
        shared = set(models[0].body_names())
        body = {k: v for k, v in body.items() if k in shared}
    for m in models:
        check_compatible(dict(m.model.named_parameters()), body, source=str(p), allow_missing=True)
    return body


def row_labels(models: Sequence[TaskModel], body: str | None) -> list[str]:
    """The table row of each model: the ``--body`` file's name; else, for models in one
    local folder (``merge -o DIR``'s task folders), that folder's name; else each model's
    path as given."""
    if body is not None:
        return [Path(body).name] * len(models)
    paths = [Path(str(m.path).rstrip("/\\")) for m in models]
    parents = {p.parent for p in paths}
    if len(models) > 1 and len(parents) == 1:
        parent = parents.pop()
        if parent.name and parent.is_dir():
            return [parent.name] * len(models)
    return [str(m.path) for m in models]


def majority(models: Sequence[TaskModel], data: Sequence) -> dict[str, dict]:
    """The majority-class reference of each task (:func:`curvmerge.experiment.
    majority_metrics`): the most frequent label of the evaluated rows, predicted for every
    row (eval has no training split); regression: the mean target."""
    from curvmerge.experiment import TaskData, majority_metrics

    out = {}
    for m, d in zip(models, data, strict=True):
        task = TaskData(m.name, train=d, val=d, test=d, loss=m.loss_name)
        out[m.name] = majority_metrics(task)
    return out


def run(args) -> int:
    from curvmerge.experiment.spec import REFERENCE_ROW
    from curvmerge.results import metrics_markdown, write_metrics
    from curvmerge.train import check_one_class

    stems = stem_outputs(args.output) if args.output else []
    check_outputs(stems, args.force)
    models = load_models(args.models, args, need_data=True)
    body = read_body(args.body, models) if args.body else None
    split = args.split or "test"
    data = []
    for m in models:
        rows = m.split(split, args)
        data.append(draw(rows, args.examples))
        if m.is_hf:
            n, k = count_rows(rows), count_rows(data[-1])
            how = "a seeded draw of --examples" if k < n else "the whole file"
            log(
                args,
                f"{m.describe_data(args)}: {k} of {n} rows evaluated ({how}: give held-out "
                "rows, not the rows the model was trained or its Fisher computed on)",
            )
    metrics = evaluate_body(models, body, data, args.batch_size)
    rows = row_labels(models, args.body)
    reference = majority(models, data)
    tables: dict[str, dict[str, dict[str, float]]] = {}
    for metric in ("accuracy", "macro_f1", "mse"):
        table: dict[str, dict[str, float]] = {}
        for (task, m), row in zip(metrics.items(), rows, strict=True):
            if metric in m:
                table.setdefault(row, {})[task] = float(m[metric])
        if table:
            ref = {t: float(m[metric]) for t, m in reference.items() if metric in m}
            tables[metric] = {**table, **({REFERENCE_ROW: ref} if ref else {})}
    print(metrics_markdown(tables, highlight_best=False, label="model"), end="")
    with warnings_as_messages():
        for (task, m), row in zip(metrics.items(), rows, strict=True):
            if "accuracy" in m:
                check_one_class(m, what=f"{row} on {task}")
    if args.output:
        write_metrics(tables, ensure_parent(args.output), title=f"{split} metrics", label="model")
        print(f"wrote {args.output}.md/.csv/.png")
    if args.json:
        print(json.dumps({t: m.get("accuracy", m.get("mse")) for t, m in metrics.items()}))
    return 0
