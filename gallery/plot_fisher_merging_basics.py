"""
Fisher merging basics: averaging, diagonal and exact Fisher
===========================================================

Three small regression tasks, three models fine-tuned from one base network, merged three
ways with :func:`curvmerge.merge`:

- **naive averaging** (identity curvature),
- **diagonal Fisher** (Matena & Raffel, 2022), closed form,
- **exact Fisher**, matrix-free (:class:`curvmerge.GGNOperator`) and solved by conjugate
  gradients.

All three solve one equation,

.. math::

    \\theta^* = (\\lambda I + \\sum_t w_t F_t)^{-1}(\\sum_t w_t F_t\\theta_t + \\lambda\\theta_0),

with different :math:`F_t`. We then compare the two choices of prior :math:`\\theta_0`:
``prior=None`` (:math:`\\theta_0 = 0`, the textbook form) and ``prior="mean"`` (the average).
"""

# %%
# Tasks and models
# ----------------
# A 7→5→5→3 MLP with ReLU and Sigmoid, 20 points per task, mean squared error. Each task's
# targets come from a perturbed copy of a base network, and each task model is fine-tuned
# from that base, as in real merging workflows.
import torch
from torch import nn

import curvmerge

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)
NUM_TASKS, N, D_IN, D_OUT = 3, 20, 7, 3


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(D_IN, 5), nn.ReLU(), nn.Linear(5, 5), nn.Sigmoid(), nn.Linear(5, D_OUT)
    )


base = make_model()
tasks = []
for _ in range(NUM_TASKS):
    X = torch.randn(N, D_IN)
    teacher = make_model()
    teacher.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.3 * torch.randn_like(p))
        Y = teacher(X)
    tasks.append((X, Y))

loss_fn = nn.MSELoss()
models = []
for X, Y in tasks:
    model = make_model()
    model.load_state_dict(base.state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        loss_fn(model(X), Y).backward()
        opt.step()
    models.append(model.eval())

space = curvmerge.ParamSpace.from_module(base)
print(f"parameters: P = {space.size}")

# %%
# Curvatures
# ----------
# The exact Fisher of each task is a matrix-free :class:`curvmerge.GGNOperator`: it
# multiplies with :math:`F = c \sum_n J_n^\top H_n J_n` (here :math:`H_n = 2I` and
# :math:`c = 1/(N\cdot C)`, the ``"mean"`` reduction of :class:`torch.nn.MSELoss`) by one
# Jacobian-vector and one vector-Jacobian product, without forming it. Its ``diagonal()``
# gives the diagonal Fisher of the same data.
exact = [
    curvmerge.GGNOperator(m, loss_fn, [(X, Y)]) for m, (X, Y) in zip(models, tasks, strict=True)
]
diagonal = [curvmerge.DiagonalOperator(space, F.diagonal()) for F in exact]

# %%
# Merging
# -------
# The damping is relative: :math:`\lambda` is ``damping`` times the mean diagonal entry of
# :math:`\sum_t w_t F_t`, so the same value means the same thing whatever the scale of the
# Fisher (``damping_scale=1.0`` would make it absolute). Each report states
# :math:`\lambda` and what the merge cost. We take ten times the default (``1e-3``) so that
# the section below has weakly seen directions to show.
DAMPING = 1e-2
merged = {
    "average": curvmerge.merge(models),
    "diagonal Fisher": curvmerge.merge(models, diagonal, damping=DAMPING),
    "exact Fisher": curvmerge.merge(models, exact, damping=DAMPING, rtol=1e-10),
}
print(merged["exact Fisher"].report)
LAMBDA = merged["exact Fisher"].report.effective_damping  # the damping in the equation


def task_losses(params: dict) -> list[float]:
    model = curvmerge.load_merged(base, params)
    with torch.no_grad():
        return [loss_fn(model(X), Y).item() for X, Y in tasks]


rows = {f"model {t}": task_losses(dict(m.named_parameters())) for t, m in enumerate(models)}
rows.update({name: task_losses(result.params) for name, result in merged.items()})

header = "| method | " + " | ".join(f"task {t}" for t in range(NUM_TASKS)) + " | mean |"
print(header)
print("|" + " --- |" * (NUM_TASKS + 2))
for name, losses in rows.items():
    cells = " | ".join(f"{v:.4f}" for v in losses)
    print(f"| {name} | {cells} | {sum(losses) / NUM_TASKS:.4f} |")

# %%
# On these three unrelated tasks no merge comes close to the individual models, and the
# Fisher-weighted merges do not beat plain averaging at this damping: each model sits far
# from the others, where the quadratic model behind Fisher merging
# (:math:`\mathcal L_t(\theta) \approx \tfrac12\|\theta-\theta_t\|^2_{F_t}`) no longer
# holds. The real-model benchmarks show where curvature pays off.
#
# What the Fishers barely see, and what each prior does there
# -----------------------------------------------------------
# Each task's Fisher has rank at most :math:`N \cdot C = 60 < P = 88`. In eigendirections
# of :math:`\sum_t w_t F_t` whose eigenvalue is far below the damping :math:`\lambda`, the
# merge is held only by the damping, which pulls it to :math:`\theta_0`: to zero for
# ``prior=None``, to the average for ``prior="mean"``.
fishers_dense = [F.to_dense() for F in exact]  # 88 x 88: small enough to look at
total = sum(fishers_dense) / NUM_TASKS
eigvals, eigvecs = torch.linalg.eigh(total)
for t, F in enumerate(fishers_dense):
    rank = int((torch.linalg.eigvalsh(F) > 1e-10 * eigvals.max()).sum())
    print(f"task {t}: Fisher rank {rank} of {space.size}")
weak = eigvals < 1e-2 * LAMBDA
print(f"directions the Fishers barely see (eigenvalue < λ/100): {int(weak.sum())} of {space.size}")

textbook = curvmerge.merge(models, exact, damping=DAMPING, prior=None, rtol=1e-10)
with_mean = merged["exact Fisher"]
weak_basis = eigvecs[:, weak]
average = space.flatten(merged["average"].params)
print(f"{'average':>13}: norm in those directions {(weak_basis.T @ average).norm():.3f}")
for name, result in [("prior=None", textbook), ("prior='mean'", with_mean)]:
    theta = space.flatten(result.params)
    print(
        f"{name:>13}: norm in those directions {(weak_basis.T @ theta).norm():.3f}, distance "
        f"to the average there {(weak_basis.T @ (theta - average)).norm():.3f}; mean task "
        f"loss {sum(task_losses(result.params)) / NUM_TASKS:.4f}"
    )

# %%
# Checks
# ------
# The exact merge matches a dense float64 solve with Fishers built independently from
# :mod:`torch.func` Jacobians, and the two priors differ as described in the weakly seen
# directions.


def dense_fisher(model: nn.Module, X: torch.Tensor) -> torch.Tensor:
    params = {n: p.detach() for n, p in model.named_parameters()}

    def outputs(flat):
        return torch.func.functional_call(model, space.unflatten(flat), (X,))

    J = torch.func.jacrev(outputs)(space.flatten(params)).reshape(-1, space.size)
    return 2.0 * J.T @ J / J.shape[0]


reference_fishers = [dense_fisher(m, X) for m, (X, _) in zip(models, tasks, strict=True)]
A = LAMBDA * torch.eye(space.size) + sum(reference_fishers) / NUM_TASKS
b = sum(
    F @ space.flatten(dict(m.named_parameters())) / NUM_TASKS
    for F, m in zip(reference_fishers, models, strict=True)
)
reference = torch.linalg.solve(A, b.detach())
error = (space.flatten(textbook.params) - reference).norm() / reference.norm()
print(f"exact merge (prior=None) vs dense solve: relative error {error:.2e}")
assert error < 1e-6
assert textbook.report.converged and with_mean.report.converged
assert weak.sum() > 0
# prior=None lands far closer to zero than to the average there; prior="mean" the reverse
for result, anchor, other in [(textbook, 0 * average, average), (with_mean, average, 0 * average)]:
    theta = space.flatten(result.params)
    assert (weak_basis.T @ (theta - anchor)).norm() < 0.5 * (weak_basis.T @ (theta - other)).norm()
