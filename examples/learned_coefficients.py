"""Learned merging coefficients: AdaMerging and data-adaptive weight ensembling beside task
arithmetic on the demo's CNNs.

Both learn from unlabelled inputs of every task (here the demo's statistics batches:
training images, labels never read) by minimising the prediction entropy with Adam:

- AdaMerging (Yang et al., ICLR 2024): task arithmetic θ = θ₀ + Σ_t λ_t τ_t with learned
  coefficients, one per task (task-wise) or one per task and parameter tensor (layer-wise);
- weight ensembling (Tang et al., IJCV 2025): a small network maps each batch's features
  (the base model's penultimate activations) to those coefficients, so every test batch
  gets its own merge.

Task arithmetic chooses its scaling on the validation labels; the learned methods choose
nothing on validation. The script prints the mean test accuracy of each row, then what each
learned method learned (the runner keeps it: ``result.learned``): entropy before and after,
the adaptation's cost as a ratio to one evaluation pass over the same inputs (measured in
the same run), its peak memory, and the coefficients (weight ensembling: their mean over the
adaptation batches and their spread between batches).

Run::

    python examples/learned_coefficients.py            # the MNIST demo's three CNNs, minutes
    python examples/learned_coefficients.py --lr 1e-2  # Adam moves a coefficient ~lr per step
    python examples/learned_coefficients.py --quick    # scikit-learn digits, seconds (smoke test)
    python examples/learned_coefficients.py --transfer # + the trained network on a second pool
    python examples/learned_coefficients.py --text     # MiniLM, three text tasks (100 steps;
                                                       # weight ensembling reads the sentence
                                                       # embedding: mean over tokens)
"""

from __future__ import annotations

import argparse
import time

import torch

from curvmerge.demo import compare_methods, text_setup, vision_setup
from curvmerge.experiment import MethodRun

METHODS = ("adamerging", "weight_ensembling")
GRANULARITIES = ("task", "layer")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits, small models (seconds)")
    parser.add_argument("--text", action="store_true", help="MiniLM on three text tasks")
    parser.add_argument(
        "--steps", type=int, default=None, help="Adam steps (default 500; --text: 100)"
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    parser.add_argument(
        "--transfer",
        action="store_true",
        help="also apply the layer-wise weight-ensembling network, as trained, to a second "
        "pool of CNNs (another seed: other splits, base and fine-tunes), beside task "
        "arithmetic and a network adapted on that pool",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(2 if args.text else 1)
    start = time.perf_counter()
    features = "penultimate"
    if args.text:
        setup = text_setup(progress=False)
        steps = args.steps or 100
        features = "mean_tokens"  # the sentence embedding all-MiniLM-L6-v2 was trained for
    elif args.quick:
        setup = vision_setup(
            dataset="digits", base_steps=30, task_steps=40, fisher_examples=128, progress=False
        )
        steps = args.steps or 20
    else:
        setup = vision_setup(progress=False)
        steps = args.steps or 500
    runs = [MethodRun("task_arithmetic")] + [
        MethodRun(
            method,
            label=f"{method} ({g}-wise)",
            options={"granularity": g, "steps": steps, "lr": args.lr}
            | ({"features": features} if method == "weight_ensembling" else {}),
        )
        for method in METHODS
        for g in GRANULARITIES
    ]
    res = compare_methods(
        setup,
        methods=runs,
        sweep_points=0,
        batch_size=128 if args.text else 256,  # as the demos evaluate
        progress=False,
        log=None,
    )
    print(f"{'method':30s} {'mean test acc':>13s}  " + "  ".join(res.tasks))
    for run in runs:
        per_task = "  ".join(f"{100 * res.metrics[run.name][t]['accuracy']:.1f}" for t in res.tasks)
        print(f"{run.name:30s} {100 * res.mean(run.name):13.1f}  {per_task}")
    print(f"task arithmetic's scaling (chosen on validation): {res.choices['task_arithmetic']}")
    for run in runs[1:]:
        info = res.learned[run.name]
        memory = info["peak_memory_bytes"]
        print(
            f"{run.name}: {info['steps']} steps on {sum(info['examples'])} unlabelled inputs, "
            f"entropy {info['entropy_before']:.4f} -> {info['entropy_after']:.4f}, adaptation "
            f"{info['adaptation_seconds']:.1f} s = {info['cost_ratio']:.0f}x one evaluation "
            f"pass ({info['evaluation_seconds']:.3f} s), peak memory "
            + (f"{memory / 2**20:.0f} MiB" if memory is not None else "not measured")
        )
        spread = info.get("coefficient_spread")
        for k, (task, row) in enumerate(zip(res.tasks, info["coefficients"], strict=True)):
            text = f"mean {sum(row) / len(row):.3f}, range {min(row):.3f}-{max(row):.3f}"
            if spread is not None:
                text += f", spread between batches {max(spread[k]):.3f}"
            print(f"  {task}: {text}")
    for note in res.notes:
        print("note:", note)
    if args.transfer and not args.text:
        _transfer(res, steps, args, quick=args.quick)
    print(f"total {time.perf_counter() - start:.0f} s")


def _transfer(res, steps: int, args, quick: bool) -> None:
    """The trained network applied, without adaptation, to a second pool (zero-shot)."""
    kwargs = dict(dataset="digits", base_steps=30, task_steps=40, fisher_examples=128)
    other = vision_setup(seed=1, progress=False, **(kwargs if quick else {}))
    network = res.networks["weight_ensembling (layer-wise)"].network
    runs = [
        MethodRun("task_arithmetic"),
        MethodRun(
            "weight_ensembling",
            label="network of the first pool, as trained",
            options={"granularity": "layer", "network": network, "steps": 0},
        ),
        MethodRun(
            "weight_ensembling",
            label="network adapted on this pool",
            options={"granularity": "layer", "steps": steps, "lr": args.lr},
        ),
    ]
    out = compare_methods(other, methods=runs, sweep_points=0, progress=False, log=None)
    print("\nsecond pool (seed 1):")
    for run in runs:
        per_task = "  ".join(f"{100 * out.metrics[run.name][t]['accuracy']:.1f}" for t in out.tasks)
        print(f"{run.name:40s} {100 * out.mean(run.name):6.1f}  {per_task}")


if __name__ == "__main__":
    main()
