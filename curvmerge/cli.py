"""The ``curvmerge`` command: fine-tune, compute Fishers, merge, evaluate, sweep, compare.

The subcommands mirror the workflow::

    curvmerge finetune --task digits --model mlp --steps 200 --output base.safetensors
    curvmerge finetune --task digits:0,1,2,3,4 --base base.safetensors --output a.safetensors
    curvmerge finetune --task digits:5,6,7,8,9 --base base.safetensors --output b.safetensors
    curvmerge fisher a.safetensors --output a.fisher.safetensors
    curvmerge fisher b.safetensors --output b.fisher.safetensors
    curvmerge merge a.safetensors b.safetensors --method fisher_diagonal \\
        --fisher a.fisher.safetensors b.fisher.safetensors --output merged.safetensors
    curvmerge eval a.safetensors b.safetensors --body merged.safetensors
    curvmerge sweep a.safetensors b.safetensors --fisher a.fisher.safetensors \\
        b.fisher.safetensors --output results/sweep
    curvmerge compare a.safetensors b.safetensors --base base.safetensors \\
        --fisher a.fisher.safetensors b.fisher.safetensors --output results/compare
    curvmerge demo            # MNIST-5k, every method, under 3 minutes on 2 cores
    curvmerge demo --text     # MiniLM on three text tasks

Checkpoints are safetensors files written by ``finetune``: the header records the model
architecture and the task, so later commands rebuild the model without pickles and know
which data to use. Only ``.safetensors`` files are read (no pickled code is ever executed).
A merge writes the merged *shared* parameters (the body); ``eval --body`` reads every task
model with that body and its own head.

Errors a user can fix (missing or corrupt files, mismatched architectures, bad options)
print ``curvmerge: error: <message>`` and exit with status 2; failures while running exit
with status 1. Every output is written atomically and an existing output is only replaced
with ``--force``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from curvmerge._optional import require
from curvmerge.merging.system import DEFAULT_DAMPING

__all__ = ["main", "build_parser", "CLIError"]

PROG = "curvmerge"
CHECKPOINT_FORMAT = "curvmerge-state-dict"
MERGED_FORMAT = "curvmerge-merged-params"
VISION = ("mnist", "digits")


class CLIError(Exception):
    """An error in the user's input: printed without a traceback, exit status 2."""


class CLIRuntimeError(Exception):
    """A failure while running: printed without a traceback, exit status 1."""


# ---------------------------------------------------------------------------------- helpers
def _log(args, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(f"[curvmerge] {msg}", file=sys.stderr, flush=True)


def _check_outputs(paths: Sequence[str | os.PathLike], force: bool) -> None:
    """Refuse existing outputs before any work is done (unless ``--force``)."""
    for p in paths:
        path = Path(p)
        if path.exists() and not force:
            raise CLIError(f"{path} already exists; pass --force to replace it")
        if not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)


def _stem_outputs(stem: str) -> list[Path]:
    s = Path(stem)
    return [s.with_suffix(x) for x in (".md", ".csv", ".png")]


def _require_safetensors(path: str, what: str = "checkpoint") -> Path:
    p = Path(path)
    if not p.exists():
        raise CLIError(f"{what} {p} does not exist")
    if p.is_dir():
        raise CLIError(f"{what} {p} is a folder; give a .safetensors file")
    if p.suffix != ".safetensors":
        raise CLIError(
            f"{what} {p} is not a .safetensors file; curvmerge only reads safetensors "
            "(it never unpickles). Convert it with safetensors.torch.save_file."
        )
    return p


def _parse_task(spec: str):
    """``digits``, ``mnist``, ``digits:0,1,2`` (a digit subset) or a text task name."""
    from curvmerge.data import TWEET_DOMAINS, digit_subset_tasks, text_tasks, vision_task

    name, _, subset = spec.partition(":")
    if name in VISION:
        if not subset:
            return vision_task(name)
        try:
            digits = [int(d) for d in subset.split(",") if d.strip()]
        except ValueError:
            raise CLIError(f"task {spec!r}: digits must be integers like {name}:0,1,2") from None
        try:
            return digit_subset_tasks(name, [digits])[0]
        except ValueError as err:
            raise CLIError(f"task {spec!r}: {err}") from None
    if name == "rotten_tomatoes" or name in TWEET_DOMAINS:
        if subset:
            raise CLIError(f"task {spec!r}: text tasks take no ':' suffix")
        return text_tasks([name])[0]
    valid = ", ".join([*VISION, "rotten_tomatoes", *TWEET_DOMAINS])
    raise CLIError(
        f"unknown task {spec!r}; use one of {valid}, or a digit subset such as digits:0,1,2"
    )


def _is_text(task_spec: str) -> bool:
    return task_spec.partition(":")[0] not in VISION


def _model_spec(kind: str, task, task_spec: str, args) -> dict[str, Any]:
    if _is_text(task_spec):
        if kind not in ("minilm", "auto"):
            raise CLIError(f"text task {task_spec!r} needs --model minilm, not {kind!r}")
        return {"kind": "minilm", "num_classes": task.num_classes}
    size = int(task.train.inputs.shape[-1])
    if kind in ("auto", "cnn"):
        channels = [8, 16] if size >= 16 else [8]
        return {
            "kind": "cnn",
            "num_classes": task.num_classes,
            "image_size": size,
            "channels": channels,
            "hidden": args.hidden,
        }
    if kind == "mlp":
        return {
            "kind": "mlp",
            "num_classes": task.num_classes,
            "in_features": size * size,
            "hidden": [args.hidden],
        }
    raise CLIError(f"model {kind!r} cannot run image task {task_spec!r}; use cnn or mlp")


def _build_model(spec: dict[str, Any], seed: int = 0):
    from curvmerge import models

    kind = spec.get("kind")
    try:
        if kind == "cnn":
            return models.make_cnn(
                spec["num_classes"],
                image_size=spec["image_size"],
                channels=tuple(spec["channels"]),
                hidden=spec["hidden"],
                seed=seed,
            )
        if kind == "mlp":
            return models.make_mlp(
                spec["in_features"], spec["num_classes"], hidden=tuple(spec["hidden"]), seed=seed
            )
        if kind == "minilm":
            return models.load_minilm(spec["num_classes"], seed=seed)
    except KeyError as err:
        raise CLIError(f"the checkpoint's model description lacks {err}") from None
    raise CLIError(f"unknown model kind {kind!r} in the checkpoint header")


class Checkpoint:
    """A checkpoint written by ``curvmerge finetune``: the model, its task and the header."""

    def __init__(self, path: str):
        from curvmerge.io import load_checkpoint, read_metadata

        self.path = _require_safetensors(path)
        meta = read_metadata(self.path)
        if meta.get("format") != CHECKPOINT_FORMAT or "model" not in meta:
            raise CLIError(
                f"{self.path} was not written by 'curvmerge finetune' (its header has no model "
                "description); merged bodies are read with 'eval --body'"
            )
        self.meta = meta
        self.spec = meta["model"]
        self.task_spec = meta.get("task")
        self.model = load_checkpoint(_build_model(self.spec), self.path)
        self._task = None

    @property
    def task(self):
        if self._task is None:
            if not self.task_spec:
                raise CLIError(f"{self.path} does not record its task")
            self._task = _parse_task(self.task_spec)
        return self._task

    @property
    def name(self) -> str:
        return self.task_spec or self.path.stem

    def split(self, which: str):
        """The task's split as model data (text is tokenised)."""
        data = getattr(self.task, which)
        if self.spec["kind"] == "minilm":
            from curvmerge.data import tokenize
            from curvmerge.models import load_minilm_tokenizer

            return tokenize(data, load_minilm_tokenizer())
        return data

    def body_names(self, regex: str | None = None) -> list[str]:
        from curvmerge.models import body_names

        names = body_names(self.model)
        if regex:
            try:
                pattern = re.compile(regex)
            except re.error as err:
                raise CLIError(
                    f"--params {regex!r} is not a valid regular expression: {err}"
                ) from None
            names = [n for n in names if pattern.search(n)]
            if not names:
                raise CLIError(f"--params {regex!r} selects no shared parameter of {self.path}")
        return names


def _load_checkpoints(paths: Sequence[str]) -> list[Checkpoint]:
    return [Checkpoint(p) for p in paths]


def _shared_names(ckpts: Sequence[Checkpoint], regex: str | None) -> list[str]:
    """The shared body names, after checking that every checkpoint has them with one shape."""
    from curvmerge.io import CheckpointMismatchError

    names = ckpts[0].body_names(regex)
    ref = dict(ckpts[0].model.named_parameters())
    for c in ckpts[1:]:
        own = dict(c.model.named_parameters())
        missing = [n for n in names if n not in own]
        if missing:
            raise CheckpointMismatchError(
                f"{c.path} and {ckpts[0].path} have different architectures: {c.path} has no "
                f"parameter {missing[0]!r}"
            )
        for n in names:
            if own[n].shape != ref[n].shape:
                raise CheckpointMismatchError(
                    f"{c.path} and {ckpts[0].path} have different architectures: parameter "
                    f"{n!r} has shape {tuple(own[n].shape)} vs {tuple(ref[n].shape)}"
                )
    return names


def _fisher_batches(ckpt: Checkpoint, examples: int, batch_size: int, seed: int):
    import torch

    from curvmerge.train import as_examples, iter_batches

    inputs, labels = as_examples(ckpt.split("train"))
    n = int(labels.shape[0])
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(examples, n)]
    if isinstance(inputs, dict):
        sub: Any = {**{k: v[idx] for k, v in inputs.items()}, "labels": labels[idx]}
    else:
        sub = (inputs[idx], labels[idx])
    return list(iter_batches(sub, batch_size))


def _load_fishers(paths: Sequence[str], ckpts: Sequence[Checkpoint], names: list[str]):
    from curvmerge.fisher import load_fisher
    from curvmerge.operators import DiagonalOperator
    from curvmerge.space import ParamSpace

    if len(paths) != len(ckpts):
        raise CLIError(f"got {len(paths)} Fisher files for {len(ckpts)} checkpoints")
    out, seconds = [], 0.0
    from curvmerge.io import read_metadata

    for p, c in zip(paths, ckpts, strict=True):
        path = _require_safetensors(p, "Fisher file")
        meta = read_metadata(path)  # raises a clear error for a truncated file
        F = load_fisher(path, c.model)
        missing = [n for n in names if n not in F.space.names]
        if missing:
            raise CLIError(f"Fisher file {path} has no entry for parameter {missing[0]!r}")
        if list(F.space.names) != names:
            d = F.as_dict()
            space = ParamSpace.from_tensors(d, names)
            F = DiagonalOperator(space, space.flatten(d))
        out.append(F)
        seconds += float(meta.get("seconds", 0.0) or 0.0)
    return out, seconds


def _parse_options(items: Sequence[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CLIError(f"--option {item!r}: use key=value, e.g. --option density=0.2")
        try:
            import yaml

            out[key.strip()] = yaml.safe_load(value)
        except Exception:
            out[key.strip()] = value
    return out


def _check_weights(weights, n: int, where: str) -> list[float] | None:
    from curvmerge.merging.system import check_weights

    if weights is None:
        return None
    if not isinstance(weights, (list, tuple)):
        raise CLIError(f"{where}: weights must be a list of numbers, got {weights!r}")
    try:
        return check_weights([float(x) for x in weights], n, 1.0)
    except (TypeError, ValueError) as err:
        raise CLIError(f"{where}: {err}") from None


def _evaluate_tasks(ckpts, body, split: str, batch_size: int, progress: bool):
    import torch

    from curvmerge.train import evaluate

    scores = {}
    for c in ckpts:
        model = c.model
        if body is not None:
            own = dict(model.named_parameters())
            with torch.no_grad():
                for n, v in body.items():
                    own[n].copy_(v)
        scores[c.name] = evaluate(model, c.split(split), batch_size=batch_size, progress=progress)[
            "accuracy"
        ]
    return scores


@contextlib.contextmanager
def _warnings_as_messages() -> Iterator[None]:
    """Print the library's warnings (damping dominates, CG not converged) as
    ``curvmerge: warning: ...`` lines instead of Python warning records."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        if issubclass(w.category, UserWarning):
            print(f"{PROG}: warning: {w.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


# ---------------------------------------------------------------------------------- commands
def cmd_finetune(args) -> int:
    from curvmerge.io import save_checkpoint
    from curvmerge.models import body_names, replace_head
    from curvmerge.train import evaluate, finetune

    _check_outputs([args.output], args.force)
    if args.output.suffix != ".safetensors":
        raise CLIError(f"--output {args.output} must end in .safetensors")
    task = _parse_task(args.task)
    if args.base:
        base = Checkpoint(args.base)
        spec = dict(base.spec, num_classes=task.num_classes)
        if _is_text(args.task) != (spec["kind"] == "minilm"):
            raise CLIError(f"base {args.base} ({spec['kind']}) cannot run task {args.task!r}")
        if spec["kind"] == "cnn" and spec["image_size"] != task.train.inputs.shape[-1]:
            raise CLIError(f"base {args.base} expects {spec['image_size']}px images")
        model = replace_head(base.model, task.num_classes, seed=args.seed)
        if spec["kind"] == "minilm":  # replace_head keeps the config in step
            spec = {"kind": "minilm", "num_classes": task.num_classes}
    else:
        spec = _model_spec(args.model, task, args.task, args)
        model = _build_model(spec, seed=args.seed)
    ck = Checkpoint.__new__(Checkpoint)
    ck.spec, ck.task_spec, ck._task, ck.model = spec, args.task, task, model
    train = ck.split("train")
    _log(args, f"fine-tuning {spec['kind']} on {args.task} ({len(task.train)} examples)")
    start = time.perf_counter()
    finetune(
        model,
        train,
        steps=args.steps,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=not args.quiet,
        desc=f"finetune {args.task}",
    )
    seconds = time.perf_counter() - start
    val = evaluate(model, ck.split("val"))["accuracy"]
    meta = {
        "model": spec,
        "task": args.task,
        "seed": args.seed,
        "steps": args.steps,
        "lr": args.lr,
        "base": str(args.base) if args.base else "",
        "body": body_names(model),
        "val_accuracy": val,
        "seconds": seconds,
    }
    save_checkpoint(model, args.output, force=args.force, metadata=meta)
    print(f"{args.output}: {args.task}, validation accuracy {val:.4f} ({seconds:.1f} s)")
    return 0


def cmd_fisher(args) -> int:
    from curvmerge.fisher import diagonal_fisher, save_fisher

    _check_outputs([args.output], args.force)
    ckpt = Checkpoint(args.checkpoint)
    names = ckpt.body_names(args.params)
    data = _fisher_batches(ckpt, args.examples, args.batch_size, args.seed)
    start = time.perf_counter()
    F = diagonal_fisher(
        ckpt.model,
        "cross_entropy",
        data,
        params=names,
        kind=args.kind,
        mc_samples=args.mc_samples,
        seed=args.seed,
        progress=not args.quiet,
    )
    seconds = time.perf_counter() - start
    save_fisher(
        args.output,
        F,
        metadata={"seconds": f"{seconds:.6f}", "checkpoint": str(ckpt.path), "task": ckpt.name},
    )
    print(
        f"{args.output}: {args.kind} diagonal Fisher of {ckpt.path} on {F.num_examples} "
        f"examples, {F.shape[0]:,} parameters ({seconds:.2f} s)"
    )
    return 0


def _merge_settings(args) -> dict[str, Any]:
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
        known = {
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
            "options",
            "force",
        }
        unknown = sorted(set(loaded) - known)
        if unknown:
            raise CLIError(
                f"config {path}: unknown setting {unknown[0]!r}; valid: {', '.join(sorted(known))}"
            )
        cfg = loaded
        base_dir = path.parent

        def rel(p):
            return str(p) if Path(str(p)).is_absolute() else str(base_dir / str(p))

        for key in ("models", "fisher"):
            if key in cfg and cfg[key] is not None:
                if not isinstance(cfg[key], list):
                    raise CLIError(f"config {path}: {key} must be a list of paths")
                cfg[key] = [rel(p) for p in cfg[key]]
        for key in ("base", "output"):
            if cfg.get(key):
                cfg[key] = rel(cfg[key])
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
    }
    for k, v in flags.items():
        if v is not None:
            cfg[k] = v
    opts = dict(cfg.get("options") or {})
    opts.update(_parse_options(args.option))
    cfg["options"] = opts
    cfg["force"] = bool(args.force or cfg.get("force", False))
    where = f"config {args.config}" if args.config else "command line"
    if not cfg.get("models"):
        raise CLIError(f"{where}: no models to merge (give checkpoints or 'models:')")
    if not cfg.get("output"):
        raise CLIError(f"{where}: no output path (--output or 'output:')")
    cfg["method"] = cfg.get("method") or "average"
    cfg["weights"] = _check_weights(cfg.get("weights"), len(cfg["models"]), where)
    if cfg.get("damping") is not None:
        try:
            d = float(cfg["damping"])
        except (TypeError, ValueError):
            raise CLIError(f"{where}: damping must be a number, got {cfg['damping']!r}") from None
        if not (math.isfinite(d) and d >= 0):
            raise CLIError(f"{where}: damping must be finite and >= 0, got {d:g}")
        cfg["damping"] = d
    if cfg.get("damping_scale") is not None:
        cfg["damping_scale"] = _damping_scale(cfg["damping_scale"], where)
    return cfg


def _damping_scale(value, where: str) -> str | float:
    """``auto`` or a positive number (the scale that multiplies the damping)."""
    from curvmerge.merging.system import check_damping_scale

    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        scale = check_damping_scale(float(value))
    except (TypeError, ValueError):
        raise CLIError(
            f"{where}: damping_scale must be 'auto' or a positive number, got {value!r}"
        ) from None
    return scale


def cmd_merge(args) -> int:
    from curvmerge.io import save_params
    from curvmerge.merging.registry import get_method

    cfg = _merge_settings(args)
    spec = get_method(cfg["method"])  # UnknownMethodError names the valid methods
    output = Path(cfg["output"])
    _check_outputs([output], cfg["force"])
    if spec.is_merge is False:
        raise CLIError(f"method {spec.name!r} is not a merge (use 'compare' to evaluate it)")
    ckpts = _load_checkpoints(cfg["models"])
    names = _shared_names(ckpts, cfg.get("params"))
    base = Checkpoint(cfg["base"]) if cfg.get("base") else None
    if base is not None:
        _shared_names([ckpts[0], base], cfg.get("params"))
    options = dict(cfg["options"])
    if cfg.get("damping") is not None:
        options["damping"] = cfg["damping"]
    if cfg.get("prior") is not None:
        options["prior"] = cfg["prior"]
    if cfg.get("damping_scale") is not None:
        options["damping_scale"] = cfg["damping_scale"]
    curvatures = None
    if spec.statistics == "diagonal_fisher":
        if not cfg.get("fisher"):
            raise CLIError(
                f"method {spec.name!r} needs one --fisher file per model "
                "(compute them with 'curvmerge fisher')"
            )
        curvatures, _ = _load_fishers(cfg["fisher"], ckpts, names)
    elif spec.statistics == "exact_ggn":
        ggn = spec.operator_class()
        curvatures = [
            ggn(
                c.model,
                "cross_entropy",
                _fisher_batches(c, args.examples, args.batch_size, 0),
                params=names,
                progress=not args.quiet,
            )
            for c in ckpts
        ]
    elif cfg.get("fisher"):
        raise CLIError(f"method {spec.name!r} uses no Fisher; drop --fisher")
    models = [c.model for c in ckpts]
    kwargs: dict[str, Any] = {"weights": cfg["weights"], "curvatures": curvatures}
    if spec.statistics == "none":
        kwargs["params"] = names
    try:
        with _warnings_as_messages():
            result = spec(models, base=base.model if base else None, **kwargs, **options)
    except TypeError as err:
        raise CLIError(str(err)) from None
    meta = {
        "format": MERGED_FORMAT,
        "method": spec.name,
        "models": [str(c.path) for c in ckpts],
        "tasks": [c.name for c in ckpts],
        "weights": result.report.weights,
        "options": {k: v for k, v in options.items() if not isinstance(v, dict)},
        "report": str(result.report),
    }
    save_params(result.params, output, force=cfg["force"], metadata=meta)
    print(f"{output}: {result.report} ({len(result.params)} tensors)")
    return 0


def _read_body(path: str, ckpts: Sequence[Checkpoint]):
    from curvmerge.io import check_compatible, load_params, read_metadata

    p = _require_safetensors(path, "merged parameters")
    meta = read_metadata(p)
    body = load_params(p)
    if meta.get("format") == CHECKPOINT_FORMAT:  # a whole checkpoint: use its body
        from curvmerge.models import body_names

        shared = set(body_names(ckpts[0].model))
        body = {k: v for k, v in body.items() if k in shared}
    for c in ckpts:
        check_compatible(dict(c.model.named_parameters()), body, source=str(p), allow_missing=True)
    return body


def cmd_eval(args) -> int:
    from curvmerge.results import markdown_table, write_comparison

    stems = _stem_outputs(args.output) if args.output else []
    _check_outputs(stems, args.force)
    ckpts = _load_checkpoints(args.checkpoints)
    body = _read_body(args.body, ckpts) if args.body else None
    scores = _evaluate_tasks(ckpts, body, args.split, args.batch_size, not args.quiet)
    row = "merged" if body is not None else "fine-tuned"
    rows = {row: scores}
    print(markdown_table(rows, percent=True, highlight_best=False), end="")
    if args.output:
        write_comparison(rows, args.output, title=f"{args.split} accuracy")
        print(f"wrote {args.output}.md/.csv/.png")
    if args.json:
        print(json.dumps(scores))
    return 0


def _setup_from(ckpts, base, names, args):
    from curvmerge.demo import DemoSetup

    fisher_data = [_fisher_batches(c, args.examples, args.batch_size, 0) for c in ckpts]
    return DemoSetup(
        names=[c.name for c in ckpts],
        models=[c.model for c in ckpts],
        base=base.model if base else None,
        params=names,
        val=[c.split("val") for c in ckpts],
        test=[c.split("test") for c in ckpts],
        fisher_data=fisher_data,
    )


def cmd_sweep(args) -> int:
    import torch

    from curvmerge.merging.sweep import line_grid, simplex_grid, sweep
    from curvmerge.results import write_sweep
    from curvmerge.train import evaluate

    _check_outputs(_stem_outputs(args.output), args.force)
    ckpts = _load_checkpoints(args.checkpoints)
    if len(ckpts) < 2:
        raise CLIError("a sweep needs at least two checkpoints")
    names = _shared_names(ckpts, args.params)
    base = Checkpoint(args.base) if args.base else None
    if base is not None:
        _shared_names([ckpts[0], base], args.params)
    if args.prior == "base" and base is None:
        raise CLIError("--prior base needs --base (the checkpoint the models were fine-tuned from)")
    if args.fisher:
        curvatures, fisher_seconds = _load_fishers(args.fisher, ckpts, names)
    else:
        curvatures, fisher_seconds = None, None
    if args.points < 2:
        raise CLIError(f"--points must be at least 2, got {args.points}")
    T = len(ckpts)
    grid = line_grid(args.points) if T == 2 else simplex_grid(T, args.points - 1)
    val = [c.split("val") for c in ckpts]
    test = [c.split("test") for c in ckpts]

    def scores(result, data):
        out = {}
        for c, d in zip(ckpts, data, strict=True):
            own = dict(c.model.named_parameters())
            with torch.no_grad():
                for n, v in result.params.items():
                    own[n].copy_(v)
            out[c.name] = evaluate(c.model, d, batch_size=args.batch_size)["accuracy"]
        return out

    originals = [{n: p.detach().clone() for n, p in c.model.named_parameters()} for c in ckpts]
    models = [dict(o) for o in originals]
    with _warnings_as_messages():
        res = sweep(
            models,
            curvatures,
            validate=lambda r: scores(r, val),
            test=lambda r: scores(r, test),
            weights=grid,
            dampings=args.damping,
            damping_scale=_damping_scale(args.damping_scale, "--damping-scale"),
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
    write_sweep(res, args.output, title="coefficient sweep")
    print(f"wrote {args.output}.md/.csv/.png")
    return 0


def cmd_compare(args) -> int:
    from curvmerge.demo import ALL_METHODS, compare_methods, format_report, write_outputs
    from curvmerge.merging.registry import get_method

    methods = [m.strip() for m in args.methods.split(",")] if args.methods else list(ALL_METHODS)
    methods = [get_method(m).name for m in methods]
    _check_outputs(_stem_outputs(args.output), args.force)
    ckpts = _load_checkpoints(args.checkpoints)
    names = _shared_names(ckpts, args.params)
    base = Checkpoint(args.base) if args.base else None
    if base is not None:
        _shared_names([ckpts[0], base], args.params)
    setup = _setup_from(ckpts, base, names, args)
    res = compare_methods(
        setup,
        methods=methods,
        sweep_points=0,
        progress=not args.quiet,
        log=None if args.quiet else (lambda m: _log(args, m)),
    )
    out = Path(args.output)
    write_outputs(res, out.parent, out.name, "comparison")
    print(format_report(res, "comparison"), end="")
    print(f"wrote {out}.md/.csv/.png")
    return 0


def cmd_demo(args) -> int:
    from curvmerge.demo import format_report, run_text_demo, run_vision_demo

    stem = "minilm" if args.text else ("digits_quick" if args.quick else "mnist")
    out = Path(args.output_dir)
    _check_outputs([out / f"{stem}{s}" for s in (".md", ".csv", ".png")], args.force)
    log = None if args.quiet else (lambda m: _log(args, m))
    start = time.perf_counter()
    if args.text:
        kwargs = {"steps": args.steps} if args.steps else {}
        res = run_text_demo(
            out, exact=args.exact, progress=not args.quiet, log=log, threads=args.threads, **kwargs
        )
        title = "MiniLM, three text tasks"
    else:
        methods = None
        if args.no_exact:
            from curvmerge.demo import ALL_METHODS

            methods = [m for m in ALL_METHODS if m != "fisher_exact"]
        res = run_vision_demo(
            out,
            quick=args.quick,
            progress=not args.quiet,
            log=log,
            threads=args.threads or 1,
            **({"methods": methods} if methods else {}),
        )
        title = "MNIST-5k, three digit-subset tasks, small CNN"
    print(format_report(res, title), end="")
    print(
        f"wall time {time.perf_counter() - start:.1f} s; wrote "
        + ", ".join(str(p) for p in res.paths.values())
    )
    return 0


def cmd_methods(args) -> int:
    from curvmerge.merging.registry import methods_table

    print(methods_table())
    return 0


def cmd_verify(args) -> int:
    import importlib.util

    if importlib.util.find_spec("curvmerge.verify.__main__") is None:
        raise CLIError("this installation has no verification report (curvmerge.verify)")
    from curvmerge.verify.__main__ import main as verify_main

    return int(verify_main(list(args.verify_args)) or 0)


# ---------------------------------------------------------------------------------- parser
def _add_common(p, *, force: bool = True):
    if force:
        p.add_argument(
            "--force",
            action="store_true",
            help="replace existing outputs (without it, existing files are kept "
            "and the command stops)",
        )
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress bars or log lines (results are still printed)",
    )


DAMPING_HELP = (
    "damping >= 0 of curvature merges, relative: lambda = damping x the mean diagonal of "
    f"sum_t w_t F_t (default {DEFAULT_DAMPING:g}; the same for every Fisher scale)"
)
DAMPING_SCALE_HELP = (
    "what the damping multiplies: auto (the mean diagonal of the weighted curvature, "
    "default) or a number; 1 makes the damping an absolute lambda"
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``curvmerge`` command."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Merge neural networks with curvature. Checkpoints are safetensors files "
        "written by 'curvmerge finetune'; every output is written atomically and kept unless "
        "--force is given. Exit status: 0 ok, 2 bad input, 1 failure while running.",
        epilog="Run 'curvmerge <command> --help' for the options of a command.",
    )
    parser.add_argument(
        "--traceback",
        action="store_true",
        help="show the Python traceback of errors (for bug reports)",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")

    task_help = (
        "task: digits or mnist (10 classes), a digit subset such as digits:0,1,2 or "
        "mnist:5,6,7 (labels renumbered, own head), rotten_tomatoes, or a tweet domain "
        "(airline, deflategate, coachella, apple, driverless, claritin)"
    )

    p = sub.add_parser(
        "finetune",
        help="fine-tune a model on a task and save a checkpoint",
        description="Fine-tune a model on one task (a new head when --base is "
        "given) with a seeded AdamW loop and save it as a safetensors checkpoint "
        "whose header records the architecture and the task.",
    )
    p.add_argument("--task", required=True, help=task_help)
    p.add_argument("--base", help="checkpoint to start from (its body; a fresh head is made)")
    p.add_argument(
        "--model",
        default="auto",
        choices=["auto", "cnn", "mlp", "minilm"],
        help="architecture when no --base is given (auto: cnn for images, minilm for text)",
    )
    p.add_argument(
        "--hidden",
        type=int,
        default=24,
        help="width of the last body layer of cnn/mlp (default 24)",
    )
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default 1 epoch)")
    p.add_argument("--epochs", type=int, default=None, help="passes over the training split")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default 2e-3)")
    p.add_argument("--batch-size", type=int, default=64, help="examples per step (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of init, head and data order")
    p.add_argument("--output", "-o", type=Path, required=True, help="output .safetensors file")
    _add_common(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser(
        "fisher",
        help="compute a diagonal Fisher and save it",
        description="Compute the diagonal Fisher of a checkpoint's shared "
        "parameters on its task's training split and save it (safetensors, with "
        "kind, number of examples and computation time in the header).",
    )
    p.add_argument("checkpoint", help="checkpoint written by 'curvmerge finetune'")
    p.add_argument("--output", "-o", type=Path, required=True, help="output .safetensors file")
    p.add_argument(
        "--kind",
        default="exact",
        choices=["exact", "mc", "empirical"],
        help="exact: expectation over the model's predictions; mc: sampled labels; "
        "empirical: true labels (default exact)",
    )
    p.add_argument(
        "--examples", type=int, default=512, help="training examples to average over (default 512)"
    )
    p.add_argument("--mc-samples", type=int, default=1, help="labels sampled per example (mc)")
    p.add_argument("--batch-size", type=int, default=64, help="examples per batch (default 64)")
    p.add_argument("--params", help="regex selecting shared parameters (default: the whole body)")
    p.add_argument("--seed", type=int, default=0, help="seed of example choice and mc labels")
    _add_common(p)
    p.set_defaults(func=cmd_fisher)

    p = sub.add_parser(
        "merge",
        help="merge checkpoints' shared parameters",
        description="Merge the shared (body) parameters of checkpoints with one "
        "method and write them to a safetensors file. Settings come from flags "
        "or a YAML config (keys: models, method, weights, damping, prior, params, "
        "fisher, base, options, output); flags override the config. Read the "
        "result with 'curvmerge eval CKPT... --body OUTPUT'.",
    )
    p.add_argument("models", nargs="*", help="checkpoints to merge")
    p.add_argument("--config", "-c", help="YAML file with the settings")
    p.add_argument(
        "--method",
        "-m",
        help="average, task_arithmetic, ties, dare, slerp, fisher_diagonal, "
        "fisher_exact (see 'curvmerge methods'; default average)",
    )
    p.add_argument(
        "--weights", "-w", type=float, nargs="+", help="one non-negative coefficient per model"
    )
    p.add_argument("--damping", type=float, help=DAMPING_HELP)
    p.add_argument("--damping-scale", help=DAMPING_SCALE_HELP)
    p.add_argument(
        "--prior",
        choices=["mean", "zero", "base"],
        help="theta_0 of curvature merges: mean (weighted average, default), zero "
        "(textbook form), base (needs --base)",
    )
    p.add_argument("--params", help="regex selecting the merged parameters (default: the body)")
    p.add_argument("--fisher", nargs="+", help="one Fisher file per model (fisher_diagonal)")
    p.add_argument("--base", help="base checkpoint (task arithmetic, TIES, DARE, prior=base)")
    p.add_argument(
        "--option",
        action="append",
        metavar="KEY=VALUE",
        help="method option, e.g. --option scaling=0.5 --option density=0.2",
    )
    p.add_argument(
        "--examples",
        type=int,
        default=256,
        help="training examples per model for fisher_exact (default 256)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="batch size for fisher_exact")
    p.add_argument("--output", "-o", type=Path, help="output .safetensors file")
    _add_common(p)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser(
        "eval",
        help="evaluate checkpoints, optionally with a merged body",
        description="Evaluate each checkpoint on its own task; with --body, each "
        "runs with the merged shared parameters and its own head.",
    )
    p.add_argument("checkpoints", nargs="+", help="checkpoints written by 'curvmerge finetune'")
    p.add_argument("--body", help="merged parameters written by 'curvmerge merge'")
    p.add_argument(
        "--split",
        default="test",
        choices=["train", "val", "test"],
        help="which split to score (default test)",
    )
    p.add_argument("--batch-size", type=int, default=256, help="examples per forward pass")
    p.add_argument("--output", "-o", help="also write <output>.md/.csv/.png")
    p.add_argument("--json", action="store_true", help="also print the scores as JSON")
    _add_common(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "sweep",
        help="sweep merge coefficients without recomputing statistics",
        description="Merge at every point of a weight grid (and each damping) "
        "from statistics computed once, choose the point on the validation "
        "splits, report test accuracy there, and print the sweep's cost as a "
        "fraction of the Fisher computation time recorded in the Fisher files. "
        "Writes <output>.md/.csv/.png.",
    )
    p.add_argument("checkpoints", nargs="+", help="checkpoints (two for a line of weights)")
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
    p.add_argument("--base", help="base checkpoint, for --prior base")
    p.add_argument("--params", help="regex selecting the merged parameters (default: the body)")
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    p.add_argument("--output", "-o", required=True, help="output stem (writes .md/.csv/.png)")
    _add_common(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser(
        "compare",
        help="compare methods side by side (table and plot)",
        description="Merge checkpoints with several methods (coefficients chosen "
        "on validation) and compare test accuracy per task with each fine-tuned "
        "model, the base and output ensembling. Writes <output>.md/.csv/.png.",
    )
    p.add_argument("checkpoints", nargs="+", help="checkpoints written by 'curvmerge finetune'")
    p.add_argument("--base", help="the checkpoint they were fine-tuned from")
    p.add_argument(
        "--methods",
        help="comma-separated registry names (default: "
        "average,task_arithmetic,ties,fisher_diagonal,fisher_exact,ensemble)",
    )
    p.add_argument(
        "--examples",
        type=int,
        default=512,
        help="training examples per model for the Fishers (default 512)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="Fisher batch size")
    p.add_argument("--params", help="regex selecting the merged parameters (default: the body)")
    p.add_argument("--output", "-o", required=True, help="output stem (writes .md/.csv/.png)")
    _add_common(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "demo",
        help="run the embedded demo (MNIST-5k; --text: MiniLM)",
        description="Fine-tune task models from one base, merge them with every "
        "method, print the table of test accuracies and write Markdown, CSV and "
        "PNG. Default: MNIST-5k digit subsets with a small CNN (under 3 minutes "
        "on 2 cores). --text: all-MiniLM-L6-v2 on Rotten Tomatoes, airline and "
        "deflategate (about 10 minutes).",
    )
    p.add_argument("--text", action="store_true", help="run the MiniLM three-task demo")
    p.add_argument("--quick", action="store_true", help="a reduced vision run (smoke test)")
    p.add_argument(
        "--exact",
        action="store_true",
        help="with --text: include the exact-Fisher merge (slow on a CPU)",
    )
    p.add_argument("--no-exact", action="store_true", help="vision: leave out the exact Fisher")
    p.add_argument("--steps", type=int, help="with --text: fine-tuning steps per task (150)")
    p.add_argument(
        "--threads", type=int, help="torch CPU threads (vision default 1: fastest on shared cores)"
    )
    p.add_argument(
        "--output-dir", default="demo_out", help="folder for the outputs (default demo_out)"
    )
    _add_common(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "methods",
        help="list the merging methods",
        description="Print the method registry as a Markdown table.",
    )
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser(
        "verify",
        help="diagonal vs exact Fisher report (curvmerge.verify)",
        description="Run the verification report; arguments are passed to "
        "'python -m curvmerge.verify' (try 'curvmerge verify --help').",
        add_help=False,
    )
    p.add_argument("verify_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_verify)
    return parser


# ---------------------------------------------------------------------------------- main
def _input_errors() -> tuple[type[BaseException], ...]:
    from curvmerge.io import CheckpointError
    from curvmerge.merging.registry import UnknownMethodError
    from curvmerge.space import SpaceMismatchError

    return (
        CLIError,
        CheckpointError,
        UnknownMethodError,
        SpaceMismatchError,
        ValueError,
        FileNotFoundError,
        FileExistsError,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``curvmerge`` command; returns the exit status."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BaseException as err:  # noqa: BLE001 - turned into a message and an exit status
        if isinstance(err, SystemExit):
            raise
        if args.traceback:
            raise
        message = str(err) or type(err).__name__
        if isinstance(err, _input_errors()):
            print(f"{PROG}: error: {message}", file=sys.stderr)
            return 2
        print(f"{PROG}: error: {type(err).__name__}: {message}", file=sys.stderr)
        print(f"{PROG}: (run with --traceback for details)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
