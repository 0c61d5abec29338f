"""``curvmerge finetune``: fine-tune a built-in model on a bundled task, save a checkpoint."""

from __future__ import annotations

import time
from pathlib import Path

from curvmerge.commands.common import (
    Checkpoint,
    CLIError,
    add_common,
    build_model,
    check_outputs,
    ensure_parent,
    is_text,
    log,
    model_spec,
    parse_task,
    quick,
)

TASK_HELP = (
    "task: digits or mnist (10 classes), a digit subset such as digits:0,1,2 or "
    "mnist:5,6,7 (labels renumbered, own head), rotten_tomatoes, or a tweet domain "
    "(airline, deflategate, coachella, apple, driverless, claritin)"
)
QUICK_STEPS = 20


def add_parser(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a model on a task and save a checkpoint",
        description="Fine-tune a model on one task (a new head when --base is "
        "given) with a seeded AdamW loop and save it as a safetensors checkpoint "
        "whose header records the architecture and the task. With --steps 0 it saves "
        "the model untrained (a fresh head on --base).",
    )
    p.add_argument("--task", required=True, help=TASK_HELP)
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
    add_common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from curvmerge.io import save_checkpoint
    from curvmerge.models import body_names, replace_head
    from curvmerge.train import evaluate, finetune

    check_outputs([args.output], args.force)
    if args.output.suffix != ".safetensors":
        raise CLIError(f"--output {args.output} must end in .safetensors")
    task = parse_task(args.task)
    if args.base:
        base = Checkpoint(args.base)
        spec = dict(base.spec, num_classes=task.num_classes)
        if is_text(args.task) != (spec["kind"] == "minilm"):
            raise CLIError(f"base {args.base} ({spec['kind']}) cannot run task {args.task!r}")
        if spec["kind"] == "cnn" and spec["image_size"] != task.train.inputs.shape[-1]:
            raise CLIError(f"base {args.base} expects {spec['image_size']}px images")
        model = replace_head(base.model, task.num_classes, seed=args.seed)
        if spec["kind"] == "minilm":  # replace_head keeps the config in step
            spec = {"kind": "minilm", "num_classes": task.num_classes}
    else:
        spec = model_spec(args.model, task, args.task, args)
        model = build_model(spec, seed=args.seed)
    ck = Checkpoint.from_parts(spec, args.task, task, model)
    train = ck.split("train")
    steps, epochs = args.steps, args.epochs
    if quick() and steps != 0:
        steps, epochs = min(steps or QUICK_STEPS, QUICK_STEPS), None
    if steps is not None and steps < 0:
        raise CLIError(f"--steps must be >= 0, got {steps}")
    log(args, f"fine-tuning {spec['kind']} on {args.task} ({len(task.train)} examples)")
    start = time.perf_counter()
    if steps != 0:
        finetune(
            model,
            train,
            steps=steps,
            epochs=epochs,
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
        "steps": steps,
        "lr": args.lr,
        "base": str(args.base) if args.base else "",
        "body": body_names(model),
        "val_accuracy": val,
        "seconds": seconds,
    }
    save_checkpoint(model, ensure_parent(args.output), force=args.force, metadata=meta)
    print(f"{args.output}: {args.task}, validation accuracy {val:.4f} ({seconds:.1f} s)")
    return 0
