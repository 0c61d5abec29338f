"""``curvmerge sweep``: a grid of merge coefficients from statistics computed once."""

from __future__ import annotations

from pathlib import Path

from curvmerge.commands.common import (
    BASE_HELP,
    DAMPING_SCALE_HELP,
    FINE_TUNED_FROM,
    MODEL_HELP,
    OUTPUT_STEM_HELP,
    PARAMS_HELP,
    CLIError,
    add_common,
    add_data_options,
    add_split_options,
    check_outputs,
    damping_scale,
    ensure_parent,
    load_base,
    load_fishers,
    load_models,
    shared_names,
    stem_outputs,
    warnings_as_messages,
)
from curvmerge.merging.system import DEFAULT_DAMPING


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="sweep merge coefficients without recomputing statistics",
        description="Merge at every point of a weight grid (and each damping) "
        "from statistics computed once, choose the point on the validation "
        "splits, report test accuracy there, and print the sweep's cost as a "
        "fraction of the Fisher computation time recorded in the Fisher files. "
        "Hugging Face models' --data files are split into train, validation and test "
        "parts (--val-size, --test-size). Writes <output>.md/.csv/.png.",
    )
    p.add_argument("models", nargs="+", metavar="model", help=MODEL_HELP + " (two: a line)")
    p.add_argument("--fisher", nargs="+", help="Fisher files (omit for weighted averaging)")
    p.add_argument(
        "--points",
        type=int,
        default=25,
        help="points on the weight line for two models (default 25); more models: "
        "a simplex grid with points-1 steps",
    )
    p.add_argument(
        "--damping",
        type=float,
        nargs="+",
        default=[DEFAULT_DAMPING],
        help=f"damping value(s) to sweep, relative as in 'merge' (default {DEFAULT_DAMPING:g})",
    )
    p.add_argument("--damping-scale", default="auto", help=DAMPING_SCALE_HELP)
    p.add_argument(
        "--prior",
        default="mean",
        choices=["mean", "zero", "base"],
        help="theta_0: mean (default), zero, base (needs --base)",
    )
    p.add_argument("--base", help=BASE_HELP + "; for --prior base")
    p.add_argument("--params", help=PARAMS_HELP)
    add_data_options(p, batch_size=256)
    add_split_options(p)
    p.add_argument("--output", "-o", required=True, help=OUTPUT_STEM_HELP)
    add_common(p)
    p.set_defaults(func=run)


def fisher_note(path: str, model) -> str:
    """What the training rows give in a sweep: nothing, the Fisher comes from a file; says
    when that file was computed on the sweep's whole data file (its validation and test rows
    included)."""
    from curvmerge.io import read_metadata

    note = f"unused; the Fisher comes from {Path(path).name}"
    data = read_metadata(path).get("data")
    own = getattr(model, "data_file", None)
    if isinstance(data, str) and own and _same_file(data, own):
        note += ", computed on this whole file: validation and test rows included"
    return note


def _same_file(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a == b


def run(args) -> int:
    import torch

    from curvmerge.merging.sweep import line_grid, simplex_grid, sweep
    from curvmerge.results import write_sweep
    from curvmerge.train import evaluate

    check_outputs(stem_outputs(args.output), args.force)
    if len(args.models) < 2:
        raise CLIError("a sweep needs at least two models")
    if args.points < 2:
        raise CLIError(f"--points must be at least 2, got {args.points}")
    models = load_models(args.models, args, need_data=True)
    base = load_base(args.base, models, args.params)
    names = shared_names(models, args.params, base)
    if args.prior == "base" and base is None:
        raise CLIError(f"--prior base needs --base {FINE_TUNED_FROM}")
    if args.fisher:
        curvatures, fisher_seconds = load_fishers(args.fisher, models, names)
    else:
        curvatures, fisher_seconds = None, None
    T = len(models)
    grid = line_grid(args.points) if T == 2 else simplex_grid(T, args.points - 1)
    notes = (
        [fisher_note(f, m) for f, m in zip(args.fisher, models, strict=True)]
        if (args.fisher)
        else ["unused: weighted averaging"] * T
    )
    splits = [m.splits(args, fisher=note) for m, note in zip(models, notes, strict=True)]
    val = [s["val"] for s in splits]
    test = [s["test"] for s in splits]

    def scores(result, data):
        out = {}
        for m, d in zip(models, data, strict=True):
            own = dict(m.model.named_parameters())
            with torch.no_grad():
                for n, v in result.params.items():
                    own[n].copy_(v)
            out[m.name] = evaluate(m.model, d, batch_size=args.batch_size, loss=m.loss_name)[
                "mse" if m.loss_name == "mse" else "accuracy"
            ] * (-1 if m.loss_name == "mse" else 1)
        return out

    originals = [{n: p.detach().clone() for n, p in m.model.named_parameters()} for m in models]
    with warnings_as_messages():
        res = sweep(
            [dict(o) for o in originals],
            curvatures,
            validate=lambda r: scores(r, val),
            test=lambda r: scores(r, test),
            weights=grid,
            dampings=args.damping,
            damping_scale=damping_scale(args.damping_scale, "--damping-scale"),
            prior=args.prior,
            base=base.model if base is not None else None,
            params=names,
            statistics_seconds=fisher_seconds or None,
            progress=not args.quiet,
            verbose=False,
        )
    print(res.summary())
    if curvatures is not None and res.cost_ratio is None:
        print("  (the Fisher files record no computation time: cost ratio unknown)")
    write_sweep(res, ensure_parent(args.output), title="coefficient sweep")
    print(f"wrote {args.output}.md/.csv/.png")
    return 0
