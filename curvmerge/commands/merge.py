"""``curvmerge merge``: merge models' shared parameters with one method.

``-o FILE.safetensors`` writes the merged shared parameters (the body; read them with
``curvmerge eval MODEL... --body FILE``). ``-o DIR`` writes Hugging Face model folders
(:func:`curvmerge.hf.save_merged`): one per task head, each with the merged body, its own
head, its config and tokenizer (or ``DIR`` itself when the heads are identical), loadable
with ``from_pretrained``. Both are written atomically.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from curvmerge._optional import require
from curvmerge.commands.common import (
    BASE_HELP,
    DAMPING_HELP,
    DAMPING_SCALE_HELP,
    FINE_TUNED_FROM,
    MERGED_FORMAT,
    MODEL_HELP,
    PARAMS_HELP,
    CLIError,
    add_common,
    add_data_options,
    check_outputs,
    check_weights,
    damping_scale,
    ensure_parent,
    load_base,
    load_fishers,
    load_models,
    needs_base_error,
    parse_options,
    shared_names,
    warnings_as_messages,
)

CONFIG_KEYS = (
    "models",
    "method",
    "weights",
    "damping",
    "damping_scale",
    "prior",
    "params",
    "output",
    "fisher",
    "base",
    "data",
    "options",
    "force",
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "merge",
        help="merge models' shared parameters",
        description="Merge the shared (body) parameters of models with one method. "
        "-o FILE.safetensors writes the merged parameters (read them with 'curvmerge eval "
        "MODEL... --body FILE'); -o DIR writes Hugging Face model folders (Hugging Face "
        "models only): one per task head with the merged body, or one when the heads are "
        "identical. Settings come from flags or a YAML config (keys: "
        + ", ".join(CONFIG_KEYS)
        + "); flags override the config.",
    )
    p.add_argument("models", nargs="*", metavar="model", help=MODEL_HELP)
    p.add_argument("--config", "-c", help="YAML file with the settings")
    p.add_argument(
        "--method",
        "-m",
        help="a registry method: average (default), task_arithmetic, ties, tsv_merge, iso_c, "
        "regmean, fisher_diagonal, fisher_kfac, fisher_exact, ... (all: 'curvmerge methods'); "
        "regmean, regmean_plus_plus, fisher_kfac and fisher_exact read --data",
    )
    p.add_argument(
        "--weights", "-w", type=float, nargs="+", help="one non-negative coefficient per model"
    )
    p.add_argument("--damping", type=float, help=DAMPING_HELP)
    p.add_argument("--damping-scale", help=DAMPING_SCALE_HELP)
    p.add_argument(
        "--prior",
        metavar="PRIOR",
        help="theta_0 of curvature merges: mean (weighted average, default), zero "
        "(textbook form), base (needs --base), or a data-free method's merge at its "
        "defaults (e.g. task_arithmetic, needs --base)",
    )
    p.add_argument("--params", help=PARAMS_HELP)
    p.add_argument("--fisher", nargs="+", help="one Fisher file per model (fisher_diagonal)")
    p.add_argument("--base", help=BASE_HELP)
    p.add_argument(
        "--option",
        action="append",
        metavar="KEY=VALUE",
        help="method option, e.g. --option scaling=0.5 --option density=0.2",
    )
    add_data_options(
        p,
        batch_size=64,
        examples=256,
        examples_help="training examples per model for the statistics of fisher_exact, "
        "fisher_kfac, regmean and regmean_plus_plus (default 256)",
    )
    p.add_argument(
        "--output",
        "-o",
        type=Path,
        help="output: FILE.safetensors (merged parameters) or a folder (Hugging Face models)",
    )
    p.add_argument(
        "--stream",
        action="store_true",
        help="merge tensor by tensor from (sharded) safetensors checkpoints or folders into "
        "a sharded output folder, never holding whole models (curvmerge.streaming; every "
        "floating tensor unless --params)",
    )
    p.add_argument("--max-shard-size", default="5GB", help="--stream: largest output shard")
    add_common(p)
    p.set_defaults(func=run)


def _run_stream(cfg: dict[str, Any], output: Path, args) -> int:
    """``--stream``: :func:`curvmerge.streaming.stream_merge` into the folder ``output``."""
    from curvmerge.streaming import STREAM_METHODS, stream_merge

    if cfg["method"] not in STREAM_METHODS:
        raise CLIError(f"--stream merges with {', '.join(STREAM_METHODS)}; not {cfg['method']!r}")
    if output.suffix == ".safetensors":
        raise CLIError(f"--stream writes a folder of shards, not {output}")
    options = dict(cfg["options"])
    options.update(
        {k: cfg[k] for k in ("damping", "prior", "damping_scale") if cfg.get(k) is not None}
    )
    try:
        with warnings_as_messages():
            report = stream_merge(
                cfg["models"],
                ensure_parent(output),
                method=cfg["method"],
                base=cfg.get("base"),
                fishers=cfg.get("fisher"),
                weights=cfg["weights"],
                params=cfg.get("params"),
                max_shard_size=args.max_shard_size,
                force=cfg["force"],
                progress=not args.quiet,
                **options,
            )
    except (ValueError, OSError) as err:  # checkpoint errors derive from both
        raise CLIError(str(err)) from None
    print(f"{output}: {report}")
    return 0


def _statistics(spec, models, names, args) -> list:
    """Per-model statistics computed from ``--data`` (``--examples`` per model): GGN
    operators, K-FAC Fishers (exact kind), input Grams, or the batches themselves."""
    from curvmerge.distributed import shard
    from curvmerge.operators import KroneckerOperator
    from curvmerge.space import ParamSpace
    from curvmerge.statistics import input_grams, kfac_factors

    purpose = {"exact_ggn": "GGN", "kfac": "K-FAC", "input_gram": "Gram", "data": spec.name}
    data = [
        m.statistics_batches(args, args.examples, 0, purpose=purpose[spec.statistics])
        for m in models
    ]
    out = []
    for m, (batches, loss) in zip(models, data, strict=True):
        if spec.statistics != "data":  # under torchrun: this process's share, summed
            batches = shard(batches)
        if spec.statistics == "exact_ggn":
            ggn = spec.operator_class()
            out.append(ggn(m.model, loss, batches, params=names, progress=not args.quiet))
        elif spec.statistics == "kfac":
            factors = kfac_factors(m.model, loss, batches, params=names, progress=not args.quiet)
            out.append(KroneckerOperator.from_kfac(ParamSpace.from_module(m.model, names), factors))
        elif spec.statistics == "input_gram":
            out.append(input_grams(m.model, batches, params=names, progress=not args.quiet))
        else:
            out.append(batches)
    return out


def _settings(args) -> dict[str, Any]:
    """Flags, overlaid on the YAML config when one is given (flags win)."""
    cfg: dict[str, Any] = {}
    if args.config:
        require("yaml", "a YAML --config")
        import yaml

        path = Path(args.config)
        if not path.is_file():
            raise CLIError(f"config {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise CLIError(f"config {path} is not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise CLIError(f"config {path} must be a mapping of settings")
        unknown = sorted(set(loaded) - set(CONFIG_KEYS))
        if unknown:
            raise CLIError(
                f"config {path}: unknown setting {unknown[0]!r}; valid: "
                f"{', '.join(sorted(CONFIG_KEYS))}"
            )
        cfg = loaded
        base_dir = path.parent

        def rel(p):
            local = base_dir / str(p)
            if Path(str(p)).is_absolute() or not (local.exists() or "/" not in str(p)):
                return str(p)  # absolute, or a hub id
            return str(local)

        for key in ("models", "fisher", "data"):
            if key in cfg and cfg[key] is not None:
                if not isinstance(cfg[key], list):
                    raise CLIError(f"config {path}: {key} must be a list of paths")
                cfg[key] = [rel(p) for p in cfg[key]]
        for key in ("base", "output"):
            if cfg.get(key):
                cfg[key] = str(base_dir / str(cfg[key])) if key == "output" else rel(cfg[key])
    flags = {
        "models": args.models or None,
        "method": args.method,
        "weights": args.weights,
        "damping": args.damping,
        "damping_scale": args.damping_scale,
        "prior": args.prior,
        "params": args.params,
        "output": str(args.output) if args.output else None,
        "fisher": args.fisher,
        "base": args.base,
        "data": args.data,
    }
    for k, v in flags.items():
        if v is not None:
            cfg[k] = v
    opts = dict(cfg.get("options") or {})
    opts.update(parse_options(args.option))
    cfg["options"] = opts
    cfg["force"] = bool(args.force or cfg.get("force", False))
    where = f"config {args.config}" if args.config else "command line"
    if not cfg.get("models"):
        raise CLIError(f"{where}: no models to merge (give models or 'models:')")
    if not cfg.get("output"):
        raise CLIError(f"{where}: no output path (--output or 'output:')")
    cfg["method"] = cfg.get("method") or "average"
    cfg["weights"] = check_weights(cfg.get("weights"), len(cfg["models"]), where)
    if cfg.get("damping") is not None:
        try:
            d = float(cfg["damping"])
        except (TypeError, ValueError):
            raise CLIError(f"{where}: damping must be a number, got {cfg['damping']!r}") from None
        if not (math.isfinite(d) and d >= 0):
            raise CLIError(f"{where}: damping must be finite and >= 0, got {d:g}")
        cfg["damping"] = d
    if cfg.get("damping_scale") is not None:
        cfg["damping_scale"] = damping_scale(cfg["damping_scale"], where)
    return cfg


def run(args) -> int:
    from curvmerge.distributed import is_distributed, on_main_process
    from curvmerge.merging.registry import get_method

    cfg = _settings(args)
    spec = get_method(cfg["method"])  # UnknownMethodError names the valid methods
    output = Path(cfg["output"])
    to_file = output.suffix == ".safetensors"
    check_outputs([output], cfg["force"])
    if args.stream:
        if is_distributed():
            raise CLIError("--stream merges in one process; run it without torchrun")
        return _run_stream(cfg, output, args)
    if spec.saves is None:
        raise CLIError(f"method {spec.name!r} is not a merge (use 'compare' to evaluate it)")
    if spec.saves == "network" and not to_file:
        raise CLIError(
            f"--output {output}: method {spec.name!r} learns a coefficient network, written "
            "to a FILE.safetensors (it is not one merged model; 'compare' evaluates it)"
        )
    if not cfg.get("base"):
        if spec.needs_base:
            raise needs_base_error(spec.name)
        if cfg.get("prior") == "base" or cfg["options"].get("prior") == "base":
            raise CLIError(f"--prior base needs the base model: pass --base {FINE_TUNED_FROM}")
    args.data = cfg.get("data")
    models = load_models(cfg["models"], args)
    if not to_file and not models[0].is_hf:
        raise CLIError(
            f"--output {output}: checkpoints merge into a FILE.safetensors (folders are "
            "written for Hugging Face models)"
        )
    base = load_base(cfg.get("base"), models, cfg.get("params"))
    names = shared_names(models, cfg.get("params"), base)
    options = dict(cfg["options"])
    for key in ("damping", "prior", "damping_scale"):
        if cfg.get(key) is not None:
            options[key] = cfg[key]
    curvatures = None
    if spec.statistics == "diagonal_fisher":
        if not cfg.get("fisher"):
            raise CLIError(
                f"method {spec.name!r} needs one --fisher file per model "
                "(compute them with 'curvmerge fisher')"
            )
        curvatures, _ = load_fishers(cfg["fisher"], models, names)
    elif spec.statistics in ("exact_ggn", "kfac", "input_gram", "data"):
        curvatures = _statistics(spec, models, names, args)
    elif cfg.get("fisher"):
        raise CLIError(f"method {spec.name!r} uses no Fisher; drop --fisher")
    kwargs: dict[str, Any] = {"weights": cfg["weights"], "curvatures": curvatures}
    if spec.statistics in ("none", "input_gram", "data"):
        kwargs["params"] = names
    try:
        with warnings_as_messages():
            result = spec(
                [m.model for m in models],
                base=base.model if base is not None else None,
                **kwargs,
                **options,
            )
    except TypeError as err:
        raise CLIError(str(err)) from None
    # under torchrun every process holds the same merge: rank 0 writes it, the others wait
    return on_main_process(lambda: _write(spec, result, models, output, to_file, options, cfg)) or 0


def _write(spec, result, models, output: Path, to_file: bool, options, cfg) -> int:
    """Write the merged model (a safetensors file or Hugging Face folders), or the learned
    coefficient network, and say what was written."""
    from curvmerge.io import save_params

    if spec.saves == "network":
        result.save(
            ensure_parent(output),
            metadata={"method": spec.name, "tasks": json.dumps([m.name for m in models])},
        )
        print(f"{output}: {result.report} (the coefficient network; not a merged model)")
        return 0
    if to_file:
        meta = {
            "format": MERGED_FORMAT,
            "method": spec.name,
            "models": [str(m.path) for m in models],
            "tasks": [m.name for m in models],
            "weights": result.report.weights,
            "options": {k: v for k, v in options.items() if not isinstance(v, dict)},
            "report": str(result.report),
        }
        save_params(result.params, ensure_parent(output), force=cfg["force"], metadata=meta)
        print(f"{output}: {result.report} ({len(result.params)} tensors)")
        return 0
    from curvmerge.hf import save_merged

    folders = save_merged(
        [m.hf for m in models],
        result.params,
        output,
        force=cfg["force"],
        names=[m.name for m in models],
    )
    print(f"{output}: {result.report} ({len(result.params)} merged tensors)")
    for folder in folders:
        print(f"  wrote {folder}")
    return 0
