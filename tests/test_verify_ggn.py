"""curvmerge.verify on real (tiny, float64) networks: the GGN operator, the diagonal Fisher
engine and the whole verification run against a dense GGN built from autograd Jacobians."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from curvmerge.operators import DenseOperator
from curvmerge.operators.ggn import GGNOperator
from curvmerge.space import ParamSpace
from curvmerge.verify import (
    Z_SCORE,
    compare_diagonals,
    direction_share,
    estimate_diagonal,
    estimate_diagonal_share,
    exact_diagonal,
    exact_diagonal_share,
    mc_diagonal,
    run_verification,
    spectrum,
    write_report,
)
from curvmerge.verify.report import FIGURES

RTOL = 1e-8
BODY = ["body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias"]


class Net(nn.Module):
    def __init__(self, classes: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh())
        self.head = nn.Linear(4, classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        self.double().eval()

    def forward(self, x):
        return self.head(self.body(x))


def batch(seed: int, n: int = 12, classes: int = 3):
    g = torch.Generator().manual_seed(100 + seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(
        0, classes, (n,), generator=g
    )


def dense_ggn(model: nn.Module, X, names) -> torch.Tensor:
    """c * sum_n J_n^T (diag p - p p^T) J_n from autograd Jacobians (mean reduction)."""
    params = dict(model.named_parameters())
    space = ParamSpace.from_module(model, names)

    def f(flat):
        new = dict(params)
        new.update(space.unflatten(flat))
        return torch.func.functional_call(model, new, (X,))

    theta = space.flatten(params).clone()
    J = torch.autograd.functional.jacobian(f, theta)  # [N, C, P]
    p = f(theta).softmax(-1).detach()
    H = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    return torch.einsum("ncp,ncd,ndq->pq", J, H, J) / X.shape[0]


@pytest.fixture(scope="module")
def setting():
    model = Net(3, 0)
    X, y = batch(0)
    data = [(X[:6], y[:6]), (X[6:], y[6:])]
    F = GGNOperator(model, nn.CrossEntropyLoss(), data, params=BODY)
    return model, data, F, dense_ggn(model, X, BODY)


def test_operator_and_engine_match_dense_ggn(setting):
    from curvmerge.fisher import diagonal_fisher

    model, data, F, M = setting
    torch.testing.assert_close(F.to_dense(), M, rtol=RTOL, atol=RTOL * float(M.abs().max()))
    d = M.diagonal()
    torch.testing.assert_close(exact_diagonal(F), d, rtol=RTOL, atol=0)
    engine = diagonal_fisher(model, nn.CrossEntropyLoss(), data, params=BODY, progress=False)
    torch.testing.assert_close(engine.diagonal(), d, rtol=RTOL, atol=0)
    assert compare_diagonals(engine, d).relative_error < RTOL


def test_exact_quantities_of_the_ggn(setting):
    _, _, F, M = setting
    lam = np.sort(np.linalg.eigvalsh(M.numpy()))[::-1]
    s = spectrum(F, k=5, exact=False, diagonal=M.diagonal())
    np.testing.assert_allclose(s.eigenvalues.numpy(), lam[:5], rtol=RTOL)
    assert abs(s.trace.value - float(M.trace())) <= RTOL * float(M.trace())
    sd = spectrum(F)
    np.testing.assert_allclose(sd.eigenvalues.numpy(), lam, rtol=RTOL, atol=RTOL * lam[0])
    sh = exact_diagonal_share(F)
    D = torch.diag(M.diagonal())
    assert abs(sh.share - float((M - D).norm() / M.norm())) <= RTOL * sh.share


# Coverage over 20 seeds on the real GGN matrix: the estimators only see products, so the
# dense copy (checked against the operator above) stands in for the slower operator.
@pytest.mark.parametrize("method", ["hutchinson", "diag++", "xdiag"])
def test_estimators_on_the_ggn_cover_the_truth(setting, method):
    _, _, F, M = setting
    G = DenseOperator(F.space, M, self_adjoint=True)
    d = M.diagonal()
    hits = sum(estimate_diagonal(G, 24, method=method, seed=s).covers(d) for s in range(20))
    assert hits >= 19
    assert estimate_diagonal(F, 24, method=method, seed=0).covers(d)  # the operator itself


def test_share_estimate_on_the_ggn_covers_the_truth(setting):
    _, _, F, M = setting
    G = DenseOperator(F.space, M, self_adjoint=True)
    exact = exact_diagonal_share(F)
    hits = 0
    for s in range(20):
        est = estimate_diagonal_share(G, M.diagonal(), 40, seed=s)
        hits += abs(est.share - exact.share) <= est.error_bar()
    assert hits >= 19


def test_mc_diagonal_covers_the_exact_diagonal(setting):
    model, data, _, M = setting
    d = M.diagonal()
    hits, inside = 0, 0
    for s in range(20):
        est = mc_diagonal(model, nn.CrossEntropyLoss(), data, params=BODY, repeats=6, seed=10 * s)
        hits += est.covers(d)
        inside += int(((est.value - d).abs() <= Z_SCORE * est.stderr).sum())
    assert hits >= 19  # the norm of the error: within the error bar
    # single entries: squared gradients are skewed and 6 repeats estimate the spread poorly,
    # so per-entry bars cover less than their nominal level (measured: 87%)
    assert inside >= 0.8 * 20 * d.numel()


def test_empirical_diagonal_differs_from_exact(setting):
    from curvmerge.fisher import diagonal_fisher

    model, data, _, M = setting
    emp = diagonal_fisher(
        model, nn.CrossEntropyLoss(), data, params=BODY, kind="empirical", progress=False
    )
    c = compare_diagonals(emp, M.diagonal(), name="empirical")
    assert c.relative_error > 1e-3  # a different quantity, not an estimate of it


def test_direction_share_on_the_ggn(setting):
    model, _, F, M = setting
    delta = torch.linspace(-1, 1, F.shape[0], dtype=torch.float64)
    d = direction_share(F, delta, spectrum(F), threshold=1e-3)
    lam, V = torch.linalg.eigh(M)
    c2 = (V.T @ delta) ** 2
    expect = float(c2[lam < 1e-3].sum() / (delta @ delta))
    assert abs(d.unseen_fraction - expect) <= RTOL * max(expect, 1e-300)


def test_run_verification_and_report(tmp_path):
    models = [Net(3, 1), Net(2, 2), Net(4, 3)]
    base = Net(3, 0)
    with torch.no_grad():  # tasks = base + a small task vector in the body
        for t, m in enumerate(models):
            for n, p in m.named_parameters():
                if n.startswith("body."):
                    p.copy_(dict(base.named_parameters())[n] + 0.1 * (t + 1) * p / p.norm())
    fisher = [[batch(t, 16, m.head.out_features)] for t, m in enumerate(models)]
    evals = [batch(10 + t, 20, m.head.out_features) for t, m in enumerate(models)]
    res = run_verification(
        models,
        fisher,
        evals,
        params=BODY,
        base=base,
        damping=1e-2,
        k=4,
        num_products=24,
        rtol=1e-10,
        maxiter=500,
        task_names=["a", "b", "c"],
        prior_share_maxiter=200,
        prior_share_rtol=1e-12,
    )
    assert [t.name for t in res.tasks] == ["a", "b", "c"]
    for tv, (X, _) in zip(res.tasks, [f[0] for f in fisher], strict=True):
        M = dense_ggn(models[["a", "b", "c"].index(tv.name)], X, BODY)
        lam = np.sort(np.linalg.eigvalsh(M.numpy()))[::-1]
        np.testing.assert_allclose(tv.spectrum.eigenvalues.numpy(), lam[:4], rtol=1e-7)
        assert abs(tv.spectrum.trace.value - float(M.trace())) <= RTOL * float(M.trace())
        exact_share = exact_diagonal_share(M).share
        assert abs(tv.share.share - exact_share) <= max(tv.share.error_bar(), 1e-12)
    S = sum(
        dense_ggn(m, X, BODY) / 3 for m, (X, _) in zip(models, [f[0] for f in fisher], strict=True)
    )
    A = S + 1e-2 * torch.eye(S.shape[0], dtype=torch.float64)
    theta0 = ParamSpace.from_module(base, BODY).flatten(dict(base.named_parameters()))
    for m, tv in zip(models, res.tasks, strict=True):
        d = ParamSpace.from_module(m, BODY).flatten(dict(m.named_parameters())) - theta0
        rho = 1e-2 * float(d @ torch.linalg.solve(A, d)) / float(d @ d)
        assert abs(tv.directions_merge.prior_share - rho) <= 1e-8 * rho
    mc = res.merges
    assert [m.name for m in mc.methods] == ["task", "naive", "diagonal", "exact"]
    exact = mc.method("exact")
    assert exact.report["converged"] and exact.report["method"] == "cg"
    assert mc.residual_history["exact"][-1] <= 1e-10
    assert mc.distances["naive"]["naive"] == 0.0
    path = write_report(res, tmp_path)
    text = path.read_text()
    assert "| task |" in text and "Merges" in text
    for name in FIGURES:
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "results.json").exists()
    assert not list(tmp_path.glob(".*.tmp"))
