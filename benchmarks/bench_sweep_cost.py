"""Cost of a 25-point coefficient sweep against the Fisher statistics it reuses (issue 6).

Two MiniLM sequence classifiers (body parameters, 22.7M), diagonal Fishers of the exact kind
on N examples each (length 64), then a 25-point sweep of ``w = (a, 1 - a)`` with
:class:`curvmerge.PreparedMerge` (statistics prepared once, each point elementwise work only).
Evaluation is excluded. The models are the pretrained body with fresh heads: the costs do not
depend on fine-tuning. Prints, for each N, the Fisher time, the sweep time (preparation plus
25 merges) and their ratio, measured in one process.

Run: ``python benchmarks/bench_sweep_cost.py [--examples 256 512 1024] [--threads 2]``
"""

from __future__ import annotations

import argparse
import time

import torch

from curvmerge.data import text_tasks, tokenize
from curvmerge.fisher import diagonal_fisher
from curvmerge.merging import PreparedMerge, line_grid
from curvmerge.models import body_names, load_minilm, load_minilm_tokenizer
from curvmerge.train import iter_batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--points", type=int, default=25)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = load_minilm_tokenizer()
    tasks = text_tasks(("airline", "deflategate"))
    models = [load_minilm(3, seed=i + 1) for i in range(2)]
    names = body_names(models[0])
    print(
        f"MiniLM body: {sum(p.numel() for n, p in models[0].named_parameters() if n in names):,}"
        f" parameters, {torch.get_num_threads()} threads, {args.points} points"
    )
    print("| examples per model | Fisher (2 models) s | sweep s (prepare + merges) | ratio |")
    print("| --- | --- | --- | --- |")
    for n in args.examples:
        fishers, fisher_seconds = [], 0.0
        for model, task in zip(models, tasks, strict=True):
            train = tokenize(task.train, tokenizer)
            data = list(iter_batches({k: v[:n] for k, v in train.items()}, 16))
            start = time.perf_counter()
            fishers.append(
                diagonal_fisher(model, "cross_entropy", data, params=names, progress=False)
            )
            fisher_seconds += time.perf_counter() - start
        start = time.perf_counter()
        prepared = PreparedMerge(models, fishers, damping_scale=1.0)  # absolute damping
        for w in line_grid(args.points):
            prepared.merge(w, damping=1e-8)
        sweep_seconds = time.perf_counter() - start
        print(
            f"| {n} | {fisher_seconds:.1f} | {sweep_seconds:.2f} | "
            f"{100 * sweep_seconds / fisher_seconds:.2f}% |",
            flush=True,
        )


if __name__ == "__main__":
    main()
