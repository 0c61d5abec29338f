"""Learned merging coefficients: AdaMerging beside task arithmetic on the demo's CNNs.

AdaMerging (Yang et al., ICLR 2024) is task arithmetic, θ = θ₀ + Σ_t λ_t τ_t, whose
coefficients are learned by Adam on the prediction entropy of unlabelled inputs of every
task: one λ per task (task-wise) or one per task and parameter tensor (layer-wise). Here the
inputs are the demo's statistics batches (training images, labels unread); task arithmetic
chooses its scaling on the validation labels, AdaMerging chooses nothing on validation.

The script prints mean test accuracy of each row, then, for AdaMerging, the entropy before
and after, the adaptation's time as a ratio to one evaluation pass over the same inputs
(measured in the same run) and the learned coefficients. The runner keeps only the merged
parameters, so the reports come from the same seeded runs called directly (checked to give
the same merge).

Run::

    python examples/adamerging.py            # the MNIST demo's three CNNs, a few minutes
    python examples/adamerging.py --lr 1e-2  # Adam moves a coefficient about lr per step
    python examples/adamerging.py --quick    # scikit-learn digits, seconds (smoke test)
"""

from __future__ import annotations

import argparse
import time

import torch

from curvmerge.demo import compare_methods, vision_setup
from curvmerge.experiment import MethodRun
from curvmerge.merging import adamerging

GRANULARITIES = ("task", "layer")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits, small models (seconds)")
    parser.add_argument("--steps", type=int, default=None, help="Adam steps (default 500)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    if args.quick:
        setup = vision_setup(
            dataset="digits", base_steps=30, task_steps=40, fisher_examples=128, progress=False
        )
        steps = args.steps or 20
    else:
        setup = vision_setup(progress=False)
        steps = args.steps or 500
    runs = [MethodRun("task_arithmetic")] + [
        MethodRun(
            "adamerging",
            label=f"adamerging ({g}-wise)",
            options={"granularity": g, "steps": steps, "lr": args.lr},
        )
        for g in GRANULARITIES
    ]
    res = compare_methods(setup, methods=runs, sweep_points=0, progress=False, log=None)
    print(f"{'method':24s} {'mean test acc':>13s}  " + "  ".join(res.tasks))
    for run in runs:
        per_task = "  ".join(f"{100 * res.metrics[run.name][t]['accuracy']:.1f}" for t in res.tasks)
        print(f"{run.name:24s} {100 * res.mean(run.name):13.1f}  {per_task}")
    print(f"task arithmetic's scaling (chosen on validation): {res.choices['task_arithmetic']}")
    for g, run in zip(GRANULARITIES, runs[1:], strict=True):
        out = adamerging(
            setup.models, setup.base, setup.fisher_data, granularity=g, steps=steps,
            lr=args.lr, params=res.settings["params"]["names"],
        )  # fmt: skip
        for name, value in out.params.items():  # the runner's merge, reproduced
            assert torch.allclose(value, res.merged[run.name][name]), name
        r = out.report
        print(
            f"{run.name}: {r.steps} steps on {sum(r.examples)} unlabelled inputs, entropy "
            f"{r.entropy_before:.4f} -> {r.entropy_after:.4f}, adaptation "
            f"{r.adaptation_seconds:.1f} s = {r.cost_ratio:.0f}x one evaluation pass "
            f"({r.evaluation_seconds:.3f} s)"
        )
        groups = ["all"] if g == "task" else [names[0] for names in r.groups]
        for task, row in zip(res.tasks, r.coefficients, strict=True):
            coeffs = ", ".join(f"{n}={c:.3f}" for n, c in zip(groups, row, strict=True))
            print(f"  {task}: {coeffs}")
    for note in res.notes:
        print("note:", note)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
