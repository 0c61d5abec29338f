"""``python -m curvmerge.verify --out DIR``: the MNIST CNN three-task verification report.

Trains a small CNN base on MNIST-5k and three task models on disjoint digit subsets
(:mod:`curvmerge.verify.mnist`), runs :func:`curvmerge.verify.run_verification` and writes
the Markdown report with plots (:func:`curvmerge.verify.write_report`). About two minutes on
two CPU cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

__all__ = ["main", "run_mnist_report", "build_parser"]


def build_parser(prog: str = "python -m curvmerge.verify") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Diagonal vs exact Fisher on the MNIST CNN three-task merge: "
        "writes report.md, results.json and PNG plots into --out.",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of data split, training, probes")
    p.add_argument("--fisher-examples", type=int, default=128, help="examples per task")
    p.add_argument("--damping", type=float, default=1e-2, help="merge damping lambda")
    p.add_argument("--k", type=int, default=10, help="eigenpairs per Lanczos run")
    p.add_argument("--products", type=int, default=40, help="products per stochastic estimate")
    p.add_argument("--task-steps", type=int, default=120, help="fine-tuning steps per task")
    p.add_argument("--base-steps", type=int, default=60, help="base training steps")
    p.add_argument("--maxiter", type=int, default=100, help="CG iterations of the exact merge")
    p.add_argument("--rtol", type=float, default=1e-3, help="CG relative tolerance")
    p.add_argument(
        "--prior-share-iters",
        type=int,
        default=0,
        help="CG iterations for the prior share of each task vector (0 skips; ~100 needed)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def run_mnist_report(
    out_dir,
    *,
    seed: int = 0,
    fisher_examples: int = 128,
    damping: float = 1e-2,
    k: int = 10,
    products: int = 40,
    task_steps: int = 120,
    base_steps: int = 60,
    maxiter: int = 100,
    rtol: float = 1e-3,
    prior_share_iters: int = 0,
    log=None,
):
    """Build the problem, verify it and write the report; returns ``(path, result)``."""
    from curvmerge.verify.mnist import mnist_three_tasks
    from curvmerge.verify.report import write_report
    from curvmerge.verify.run import run_verification

    start = time.perf_counter()
    cpu = time.process_time()
    problem = mnist_three_tasks(
        base_steps=base_steps,
        task_steps=task_steps,
        fisher_examples=fisher_examples,
        seed=seed,
        log=log,
    )
    setup = time.perf_counter() - start
    result = run_verification(
        problem.models,
        problem.fisher_data,
        problem.eval_data,
        params=problem.params,
        task_names=problem.names,
        base=problem.base,
        damping=damping,
        k=k,
        num_products=products,
        rtol=rtol,
        maxiter=maxiter,
        seed=seed,
        prior_share_maxiter=prior_share_iters or None,
        log=log,
    )
    result.seconds = {"training": setup, **result.seconds}
    result.seconds["total"] = time.perf_counter() - start
    result.seconds["cpu_total"] = time.process_time() - cpu
    result.config.update(
        {
            "problem": "MNIST-5k CNN, tasks = digits 0-2 / 3-5 / 6-9 with own heads, body merged",
            "fisher_examples": fisher_examples,
            "task_steps": task_steps,
            "base_steps": base_steps,
        }
    )
    path = write_report(result, out_dir, title="Diagonal vs exact Fisher: MNIST CNN, three tasks")
    return path, result


def main(argv=None, *, prog: str = "python -m curvmerge.verify") -> int:
    """Run the report with ``argv`` (default ``sys.argv[1:]``); ``prog`` is the program name
    of usage lines and ``--help`` (``curvmerge verify`` from the command)."""
    args = build_parser(prog).parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    start = time.perf_counter()

    def log(msg: str) -> None:
        if not args.quiet:
            print(f"[{time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    path, result = run_mnist_report(
        Path(args.out),
        seed=args.seed,
        fisher_examples=args.fisher_examples,
        damping=args.damping,
        k=args.k,
        products=args.products,
        task_steps=args.task_steps,
        base_steps=args.base_steps,
        maxiter=args.maxiter,
        rtol=args.rtol,
        prior_share_iters=args.prior_share_iters,
        log=log,
    )
    sec = result.seconds
    print(f"wrote {path} ({sec['total']:.0f} s wall, {sec['cpu_total']:.0f} s CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
