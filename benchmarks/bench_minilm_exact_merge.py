"""Exact-Fisher merge of three MiniLM models (body parameters) on the offline text tasks.

Fine-tunes all-MiniLM-L6-v2 from the same checkpoint on Rotten Tomatoes (2 classes), airline
and deflategate tweets (3 classes each), each with its own head, builds a ``GGNOperator`` per
task on the body parameters and a few training examples, and merges the bodies with
``merge(models, curvatures=..., prior="mean")`` by preconditioned CG to ``--rtol``.

Prints, measured in one process: the wall time of the merge (products, diagonals for the warm
start, everything from cold operators), the time of one gradient pass (forward + backward of the
body over the same Fisher data of all three tasks, median of 3), their ratio (the merge's time
in gradient passes), CG iterations, operator products and the final relative residual, and the
per-task test accuracy of the exact-Fisher merge against weighted averaging and the diagonal
Fisher merge (``curvmerge.fisher.diagonal_fisher`` on the same data), each task evaluated with
its own head on the merged body.

Usage: ``python benchmarks/bench_minilm_exact_merge.py [--quick] [--steps 100]
[--fisher-examples 32] [--damping 1e-1] [--rtol 1e-6] [--preconditioner none]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from curvmerge import merge  # noqa: E402
from curvmerge.batches import model_outputs  # noqa: E402
from curvmerge.data import text_tasks, tokenize  # noqa: E402
from curvmerge.fisher import diagonal_fisher  # noqa: E402
from curvmerge.models import body_names, load_minilm, load_minilm_tokenizer  # noqa: E402
from curvmerge.operators.ggn import GGNOperator  # noqa: E402
from curvmerge.train import evaluate, finetune, iter_batches  # noqa: E402


def log(msg: str) -> None:
    print(msg, flush=True)


def setup(args):
    """Fine-tuned models, Fisher batches (trailing padding trimmed) and test sets per task."""
    tasks = text_tasks(n_train=2000, n_val=250, n_test=args.n_test, seed=args.seed)
    tokenizer = load_minilm_tokenizer()
    models, fisher_data, tests = [], [], []
    for t, task in enumerate(tasks):
        start = time.perf_counter()
        train = tokenize(task.train, tokenizer, max_length=args.max_length)
        model = load_minilm(task.num_classes, seed=args.seed + 1 + t)
        finetune(
            model,
            train,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed + 1 + t,
            progress=False,
        )
        models.append(model.eval())
        g = torch.Generator().manual_seed(args.seed + 100 + t)
        idx = torch.randperm(len(task.train), generator=g)[: args.fisher_examples]
        sub = {k: v[idx] for k, v in train.items()}
        fisher_data.append(list(iter_batches(sub, args.batch_size)))
        tests.append(tokenize(task.test, tokenizer, max_length=args.max_length))
        lengths = [int(x["input_ids"].shape[1]) for x, _ in fisher_data[-1]]
        log(
            f"{task.name}: {task.num_classes} classes, fine-tuned {args.steps} steps in "
            f"{time.perf_counter() - start:.0f} s; Fisher batches of lengths {lengths}"
        )
    return [t.name for t in tasks], models, fisher_data, tests


def gradient_pass_seconds(models, fisher_data, names, repeats=3) -> float:
    """Median time of one forward + backward of the body over all tasks' Fisher data."""
    loss_fn = nn.CrossEntropyLoss()
    selected = set(names)

    def one_pass():
        for model, data in zip(models, fisher_data, strict=True):
            n = sum(int(y.shape[0]) for _, y in data)
            for p in model.parameters():
                p.grad = None
            for x, y in data:
                (loss_fn(model_outputs(model, x), y) * (y.shape[0] / n)).backward()

    flags = [{n: p.requires_grad for n, p in m.named_parameters()} for m in models]
    for m in models:
        for n, p in m.named_parameters():
            p.requires_grad_(n in selected)
    one_pass()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - t)
    for m, f in zip(models, flags, strict=True):
        for n, p in m.named_parameters():
            p.requires_grad_(f[n])
            p.grad = None
    return statistics.median(times)


def accuracies(models, tests, params) -> list[float]:
    """Test accuracy of each task's model (own head) with the merged body ``params``."""
    out = []
    for model, test in zip(models, tests, strict=True):
        merged = model if params is None else _with_body(model, params)
        out.append(float(evaluate(merged, test, batch_size=128)["accuracy"]))
    return out


def _with_body(model, params):
    from curvmerge.merging import load_merged

    return load_merged(model, params)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, examples, tests")
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps (100)")
    parser.add_argument(
        "--fisher-examples", type=int, default=None, help="Fisher examples per task (32)"
    )
    parser.add_argument("--n-test", type=int, default=None, help="test examples per task (300)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--damping", type=float, default=1e-1)
    parser.add_argument("--rtol", type=float, default=1e-6)
    parser.add_argument("--maxiter", type=int, default=300)
    parser.add_argument(
        "--preconditioner",
        default="none",
        help="passed to merge(): none (plain CG, the default here), diagonal, nystrom:<rank>",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    defaults = (40, 16, 200) if args.quick else (100, 32, 300)
    args.steps = defaults[0] if args.steps is None else args.steps
    args.fisher_examples = defaults[1] if args.fisher_examples is None else args.fisher_examples
    args.n_test = defaults[2] if args.n_test is None else args.n_test
    pre = {} if args.preconditioner is None else {"preconditioner": args.preconditioner}
    if pre.get("preconditioner") == "none":
        pre["preconditioner"] = None
    if args.threads:
        torch.set_num_threads(args.threads)
    log(
        f"# Exact-Fisher merge of three MiniLM models: torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {args.steps} steps, {args.fisher_examples} Fisher "
        f"examples per task, batch {args.batch_size}, length <= {args.max_length}, "
        f"damping {args.damping:g}, rtol {args.rtol:g}, "
        f"preconditioner {args.preconditioner or 'merge() default'}"
    )
    task_names, models, fisher_data, tests = setup(args)
    names = body_names(models[0])
    loss_fn = nn.CrossEntropyLoss()

    grad = gradient_pass_seconds(models, fisher_data, names)
    log(f"gradient pass (body, all three tasks' Fisher data): {grad:.2f} s")

    ops = [
        GGNOperator(m, loss_fn, d, params=names) for m, d in zip(models, fisher_data, strict=True)
    ]
    P = ops[0].shape[0]
    calls = [0]

    def progress(_x):
        calls[0] += 1
        if calls[0] % 10 == 0:
            log(f"  CG iteration {calls[0]}: {time.perf_counter() - start:.0f} s")

    start = time.perf_counter()
    exact = merge(
        models,
        curvatures=ops,
        damping=args.damping,
        damping_scale=1.0,  # --damping is the absolute lambda
        prior="mean",
        rtol=args.rtol,
        maxiter=args.maxiter,
        callback=progress,
        **pre,
    )
    merge_s = time.perf_counter() - start
    r = exact.report
    cache = sum(op.cached_bytes for op in ops) / 2**20
    if all(op._diagonal is not None for op in ops):  # computed by merge for the warm start
        d = sum(op.diagonal() for op in ops) / len(ops)
        log(
            f"mean curvature diagonal (1/T) sum_t diag F_t: mean {float(d.mean()):.2e}, "
            f"max {float(d.max()):.2e}; damping / mean = {args.damping / float(d.mean()):.1e}"
        )
    ops = None  # free the caches

    t = time.perf_counter()
    diags = [
        diagonal_fisher(m, loss_fn, d, params=names, progress=False)
        for m, d in zip(models, fisher_data, strict=True)
    ]
    diag_s = time.perf_counter() - t
    diag = merge(models, curvatures=diags, damping=args.damping, damping_scale=1.0, prior="mean")
    avg = merge(models, params=names)

    acc = {
        "fine-tuned (own model)": accuracies(models, tests, None),
        "averaging": accuracies(models, tests, avg.params),
        "diagonal Fisher": accuracies(models, tests, diag.params),
        "exact Fisher (CG)": accuracies(models, tests, exact.params),
    }

    log(f"\n## Exact merge: P = {P:,} body parameters, caches {cache:.0f} MiB in all")
    log(f"{r}")
    log("| quantity | value |")
    log("| --- | --- |")
    log(f"| merge wall time | {merge_s:.1f} s |")
    log(f"| one gradient pass (3 tasks' Fisher data) | {grad:.2f} s |")
    log(f"| merge time in gradient passes | {merge_s / grad:.0f} |")
    log(f"| CG iterations | {r.iterations} |")
    log(f"| products (incl. right-hand side and warm-start check) | {r.products} |")
    log(f"| merge time per product, in gradient passes | {merge_s / grad / r.products:.2f} |")
    log(f"| final relative residual | {r.relative_residual:.1e} (converged: {r.converged}) |")
    log(f"| preconditioner / warm start | {r.preconditioner} / {r.warm_start} |")
    log(f"| diagonal Fisher (3 tasks) | {diag_s:.1f} s = {diag_s / grad:.1f} gradient passes |")
    if r.residual_history:
        marks = [h for h in (1e-2, 1e-4, 1e-6) if min(r.residual_history) <= h]
        # the history starts with the initial guess: entry i is after i iterations
        hit = {h: next(i for i, v in enumerate(r.residual_history) if v <= h) for h in marks}
        log(
            "CG iterations to relative residual: "
            + ", ".join(f"{h:g}: {i}" for h, i in hit.items())
        )

    log(f"\n## Test accuracy ({args.n_test} examples per task, own head on the merged body)")
    log("| method | " + " | ".join(task_names) + " | mean |")
    log("| --- |" + " --- |" * (len(task_names) + 1))
    for k, v in acc.items():
        log(f"| {k} | " + " | ".join(f"{a:.3f}" for a in v) + f" | {sum(v) / len(v):.3f} |")


if __name__ == "__main__":
    main()
