"""``curvmerge fisher``: the diagonal Fisher of each model's body on its training data."""

from __future__ import annotations

import time
from pathlib import Path

from curvmerge.commands.common import (
    MODEL_HELP,
    CLIError,
    add_common,
    add_data_options,
    check_outputs,
    ensure_parent,
    load_models,
    log,
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "fisher",
        help="compute diagonal Fishers and save them",
        description="Compute the diagonal Fisher of each model's shared (body) "
        "parameters and save it (safetensors, with kind, number of examples and "
        "computation time in the header). A checkpoint uses its bundled task's training "
        "split; a Hugging Face model uses its --data file (the loss follows the data: "
        "token-level cross-entropy for causal LMs and token classification, padding "
        "excluded). Several models take one --data file and one --output each.",
    )
    p.add_argument("models", nargs="+", metavar="model", help=MODEL_HELP)
    p.add_argument(
        "--output",
        "-o",
        type=Path,
        nargs="+",
        required=True,
        help="output .safetensors file, one per model",
    )
    p.add_argument(
        "--kind",
        default="auto",
        choices=["auto", "exact", "mc", "empirical"],
        help="exact: expectation over the model's predictions; mc: sampled labels; "
        "empirical: true labels; auto (default): exact, or mc for causal LMs (an exact "
        "Fisher costs one backward pass per vocabulary entry)",
    )
    add_data_options(
        p,
        batch_size=64,
        examples=512,
        examples_help="training examples per model, a seeded random draw (default 512)",
    )
    p.add_argument("--mc-samples", type=int, default=1, help="labels sampled per example (mc)")
    p.add_argument("--params", help="regex selecting shared parameters (default: the whole body)")
    p.add_argument("--seed", type=int, default=0, help="seed of example choice and mc labels")
    add_common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from curvmerge.distributed import on_main_process, shard
    from curvmerge.fisher import diagonal_fisher, save_fisher

    outputs = list(args.output)
    if len(outputs) != len(args.models):
        raise CLIError(f"got {len(outputs)} --output files for {len(args.models)} models")
    if len(set(outputs)) != len(outputs):
        raise CLIError("two models would write the same --output file")
    for out in outputs:
        if out.suffix != ".safetensors":
            raise CLIError(f"--output {out} must end in .safetensors")
    check_outputs(outputs, args.force)
    models = load_models(args.models, args, need_data=True)
    jobs = []
    for m in models:  # every model's data is read and checked before any Fisher is computed
        names = m.body_names(args.params)
        batches, loss = m.statistics_batches(args, args.examples, args.seed)
        # under torchrun: this process's share of the batches; the Fisher sums the shares
        jobs.append((m, names, shard(batches), loss))
    # every Fisher is computed before any file is written: an error in the data of a later
    # model leaves no file of an earlier one
    results = []
    for (m, names, batches, loss), out in zip(jobs, outputs, strict=True):
        kind = args.kind
        if kind == "auto":
            kind = "mc" if getattr(m, "kind", None) == "causal_lm" else "exact"
        log(args, f"{kind} diagonal Fisher of {m.path}")
        start = time.perf_counter()
        try:
            F = diagonal_fisher(
                m.model,
                loss,
                batches,
                params=names,
                kind=kind,
                mc_samples=args.mc_samples,
                seed=args.seed,
                progress=not args.quiet,
            )
        except ValueError as err:
            where = getattr(m, "data_file", None) or m.path
            raise CLIError(f"{where}: {err}") from err
        seconds = time.perf_counter() - start
        meta = {"seconds": f"{seconds:.6f}", "checkpoint": str(m.path), "task": m.name}
        local = Path(str(m.path)).expanduser()
        if local.exists():  # merge and sweep check that a Fisher file is the model's
            meta["model_path"] = str(local.resolve())
        if getattr(m, "data_file", None):
            meta["data"] = str(m.data_file)
        results.append((out, F, meta, kind, m, seconds))

    def write() -> None:
        for out, F, meta, kind, m, seconds in results:
            save_fisher(ensure_parent(out), F, metadata=meta)
            print(
                f"{out}: {kind} diagonal Fisher of {m.path} on {F.num_examples} "
                f"examples, {F.shape[0]:,} parameters ({seconds:.2f} s)"
            )

    # every process holds the same Fishers: rank 0 writes them, no process ends before
    on_main_process(write)
    return 0
