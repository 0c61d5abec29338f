"""
Diagonal vs exact Fisher on a real CNN
======================================

How far is the diagonal Fisher from the exact one, and what does that do to a merge?
:mod:`curvmerge.verify` measures it. Here on the MNIST-5k CNN (20,088 shared parameters):
three tasks classify disjoint digit subsets (0–2, 3–5, 6–9), each fine-tuned from one base
with its own head; only the body is merged.

We look at

- the diagonal of the exact GGN (= Fisher for cross-entropy) against the Monte-Carlo and
  empirical Fisher diagonals and against three stochastic estimators that see the operator
  only through products — Hutchinson (1989), Diag++ (Meyer et al. 2021's Hutch++ applied to
  the diagonal) and XDiag (Epperly, Tropp & Webber 2024) — each with its error bar;
- how much of the Fisher the diagonal holds, :math:`\\|F - \\operatorname{diag}F\\|_F /
  \\|F\\|_F`, per layer;
- the top of the spectrum by Lanczos, the trace and the intrinsic dimension
  :math:`\\operatorname{tr}F / \\lambda_\\max`;
- how much of each task vector lies in directions the Fishers barely see;
- naive, diagonal-Fisher and exact-Fisher merges, evaluated per task.

The same report comes out of ``python -m curvmerge.verify --out DIR``.
"""

# %%
# Three tasks from one base
# -------------------------
# A base CNN trains briefly on all ten digits; each task fine-tunes a copy with a fresh
# head. To keep this example near a minute, training is short and the curvatures use 96
# training examples per task (``python -m curvmerge.verify`` uses 128 and longer training).
import time

import torch

from curvmerge.verify import run_verification
from curvmerge.verify.mnist import mnist_three_tasks
from curvmerge.verify.report import (
    plot_cg_history,
    plot_diagonal_scatter,
    plot_layer_share,
    plot_merges,
    plot_spectra,
    render_markdown,
)

torch.manual_seed(0)
start = time.perf_counter()
problem = mnist_three_tasks(base_steps=40, task_steps=80, fisher_examples=96, seed=0, log=print)
print(f"{len(problem.params)} merged tensors, tasks {problem.names}")

# %%
# Run every check
# ---------------
# ``run_verification`` builds each task's matrix-free GGN operator and its diagonal Fishers
# (exact, MC with one sample, empirical), then measures everything below. Error bars are
# ``Z_SCORE = 3`` standard errors.
result = run_verification(
    problem.models,
    problem.fisher_data,
    problem.eval_data,
    params=problem.params,
    task_names=problem.names,
    base=problem.base,
    damping=1e-2,
    k=8,
    num_products=30,
    rtol=1e-3,
    maxiter=60,
    log=print,
)
print(f"verification took {result.seconds['total']:.0f} s")

# %%
# Diagonals against the exact diagonal
# ------------------------------------
# Each panel plots one diagonal against the exact one (task 0–2, log-log; red points are
# non-positive estimates). Plain Hutchinson is dominated by the off-diagonal mass, the
# deflated estimators (Diag++, XDiag) are an order of magnitude closer for the same 30
# products, and the MC and empirical Fisher diagonals scatter around the exact one.
plot_diagonal_scatter(result)
for c in result.tasks[0].comparisons:
    bar = "" if c.error_bar is None else f" (error bar {c.error_bar:.3f})"
    print(f"{c.name:>14}: relative error {c.relative_error:.3f}{bar}")

# %%
# How much of the Fisher the diagonal holds
# -----------------------------------------
# The share of the Frobenius norm off the diagonal, per layer (rows of the layer's block).
plot_layer_share(result)
for tv in result.tasks:
    print(f"{tv.name}: off-diagonal share {tv.share.share:.4f} ± {tv.share.error_bar():.4f}")

# %%
# Spectra
# -------
# Top eigenvalues of each task's Fisher and of the merge's :math:`\sum_t w_t F_t`; the
# dotted line is the damping, below which the merge keeps the prior.
plot_spectra(result)

# %%
# Task vectors and merges
# -----------------------
print(render_markdown(result).split("## Task vectors")[1].split("## Merges")[0])
plot_merges(result)
plot_cg_history(result)
for m in result.merges.methods:
    print(f"{m.name:>9}: mean accuracy {m.mean_accuracy:.3f}")
print(f"total {time.perf_counter() - start:.0f} s")

# %%
# Checks
# ------
t0 = result.tasks[0]
comp = {c.name: c for c in t0.comparisons}
# every stochastic estimate is within its own error bar
for name in ("hutchinson", "diag++", "xdiag"):
    assert comp[name].within_error_bar, name
# deflation pays off on a Fisher this far from diagonal
assert comp["diag++"].relative_error < comp["hutchinson"].relative_error
assert comp["xdiag"].relative_error < comp["hutchinson"].relative_error
for tv in result.tasks:
    # the diagonal holds little of the Frobenius mass
    assert tv.share.share > 0.9
    lam = tv.spectrum.eigenvalues
    assert bool((lam[:-1] >= lam[1:]).all()) and float(lam[-1]) > 0
    # Lanczos eigenvalues cannot add up to more than the exact trace
    assert float(lam.sum()) <= tv.spectrum.trace.value * (1 + 1e-5)
    assert 1.0 <= tv.spectrum.intrinsic_dimension.value
    assert 0.0 <= tv.directions_own.rayleigh_share <= 1.0 + 1e-6
merges = {m.name: m for m in result.merges.methods}
assert merges["exact"].report["method"] == "cg"
hist = result.merges.residual_history["exact"]
assert hist[-1] < hist[0]
for name in ("naive", "diagonal", "exact"):
    assert merges[name].mean_accuracy < merges["task"].mean_accuracy
    assert merges[name].mean_accuracy > 0.4  # well above chance (1/3 to 1/4)
