"""Does another method's merge make a better prior for the curvature merges?

The merge equation keeps the prior θ₀ in every direction the Fishers do not see:

    θ* = (λI + Σ_t w_t F_t)⁻¹ (Σ_t w_t F_t θ_t + λ θ₀).

By default θ₀ is the weighted average of the models. With ``prior="task_arithmetic"`` (or
``{"method": "task_arithmetic", "scaling": 0.5}``) it is task arithmetic's merge instead,
so the curvature corrects task arithmetic where the data say so and keeps it elsewhere.
This script runs the diagonal-Fisher, K-FAC and exact-Fisher merges of the MNIST demo's
three CNNs with both priors, dampings chosen on validation, and prints mean test accuracy
beside task arithmetic's.

Run::

    python examples/curvature_prior.py           # the MNIST demo's models, about 2 minutes
    python examples/curvature_prior.py --quick   # scikit-learn digits, seconds (smoke test)
"""

from __future__ import annotations

import argparse
import time

import torch

from curvmerge.demo import VISION_EXACT_OPTIONS, compare_methods, vision_setup
from curvmerge.experiment import MethodRun

PRIORS = {
    "average": "mean",
    "task arithmetic 0.5": {"method": "task_arithmetic", "scaling": 0.5},
    "task arithmetic 1.0": {"method": "task_arithmetic", "scaling": 1.0},
}
CURVATURE_METHODS = ("fisher_diagonal", "fisher_kfac", "fisher_exact")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits, small models (seconds)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    if args.quick:
        setup = vision_setup(
            dataset="digits", base_steps=30, task_steps=40, fisher_examples=128, progress=False
        )
    else:
        setup = vision_setup(progress=False)
    runs = [MethodRun("task_arithmetic")]
    for method in CURVATURE_METHODS:
        for name, prior in PRIORS.items():
            options = {"prior": prior}
            if method == "fisher_exact":
                options.update(VISION_EXACT_OPTIONS)
            runs.append(MethodRun(method, label=f"{method} | {name}", options=options))
    res = compare_methods(setup, methods=runs, progress=False, log=None)
    print(f"{'method':22s} {'prior':22s} {'mean test acc':>13s}  chosen")
    for run in runs:
        method, _, prior = run.name.partition(" | ")
        choice = ", ".join(f"{k}={v:g}" for k, v in res.choices[run.name].items())
        print(f"{method:22s} {prior or '-':22s} {100 * res.mean(run.name):13.1f}  {choice}")
    for note in res.notes:
        print("note:", note)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
