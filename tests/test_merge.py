"""The merge equation against weighted averages, elementwise closed forms and dense solves."""

import warnings

import pytest
import torch
from torch import nn

from curvmerge import (
    ConvergenceError,
    ConvergenceWarning,
    DenseOperator,
    DiagonalOperator,
    IdentityOperator,
    ParamSpace,
    SpaceMismatchError,
    load_merged,
    merge,
)
from tests.helpers import random_space, random_spd

SPACE = random_space()
P = SPACE.size
T = 3


def _thetas(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [SPACE.unflatten(torch.randn(P, generator=g, dtype=dtype).clone()) for _ in range(T)]


def _flat(d):
    return SPACE.flatten(d)


def _dense_reference(thetas, Fs, w, damping, theta0):
    """θ* = (λI + Σ w F)^{-1} (Σ w F θ + λ θ0), dense float64."""
    A = damping * torch.eye(P, dtype=torch.float64) + sum(wt * F for wt, F in zip(w, Fs))
    b = sum(wt * F @ _flat(th) for wt, F, th in zip(w, Fs, thetas)) + damping * theta0
    return torch.linalg.solve(A, b)


@pytest.mark.parametrize("weights", [None, [0.2, 0.5, 0.3], [1.0, 2.0, 0.0]])
def test_identity_curvature_is_the_weighted_average(weights):
    thetas = _thetas()
    w = [1 / T] * T if weights is None else weights
    expected = sum(wt * _flat(th) for wt, th in zip(w, thetas)) / sum(w)
    result = merge(thetas, weights=weights)
    torch.testing.assert_close(_flat(result.params), expected, rtol=1e-14, atol=1e-14)
    assert result.report.method == "average"


@pytest.mark.parametrize("prior", ["mean", None, "given"])
def test_diagonal_curvature_is_the_elementwise_closed_form(prior):
    thetas = _thetas(1)
    g = torch.Generator().manual_seed(2)
    ds = [torch.rand(P, generator=g, dtype=torch.float64) for _ in range(T)]
    w, damping = [0.5, 0.3, 0.2], 0.1
    theta0 = {
        "mean": sum(wt * _flat(th) for wt, th in zip(w, thetas)),
        None: torch.zeros(P, dtype=torch.float64),
        "given": torch.randn(P, generator=g, dtype=torch.float64),
    }[prior]
    prior_arg = SPACE.unflatten(theta0) if prior == "given" else prior
    expected = (sum(wt * d * _flat(th) for wt, d, th in zip(w, ds, thetas)) + damping * theta0) / (
        sum(wt * d for wt, d in zip(w, ds)) + damping
    )
    Fs = [DiagonalOperator(SPACE, d) for d in ds]
    result = merge(thetas, Fs, weights=w, damping=damping, prior=prior_arg)
    torch.testing.assert_close(_flat(result.params), expected, rtol=1e-13, atol=1e-13)
    assert result.report.method == "diagonal"


def test_diagonal_entries_seen_by_no_model_keep_the_prior():
    thetas = _thetas(3)
    d = torch.ones(P, dtype=torch.float64)
    d[:4] = 0.0
    result = merge(thetas, [DiagonalOperator(SPACE, d)] * T, damping=0.0)
    mean = sum(_flat(th) for th in thetas) / T
    torch.testing.assert_close(_flat(result.params)[:4], mean[:4])
    assert result.report.unseen == 4


@pytest.mark.parametrize("prior", ["mean", None])
@pytest.mark.parametrize("preconditioner", ["diagonal", None])
def test_dense_curvature_matches_dense_float64_solve(prior, preconditioner):
    thetas = _thetas(4)
    Fs_dense = [random_spd(P, seed=10 + t, cond_shift=0.0) for t in range(T)]
    Fs = [DenseOperator(SPACE, F, self_adjoint=True) for F in Fs_dense]
    w, damping = [0.2, 0.5, 0.3], 1e-3
    theta0 = (
        sum(wt * _flat(th) for wt, th in zip(w, thetas))
        if prior == "mean"
        else torch.zeros(P, dtype=torch.float64)
    )
    expected = _dense_reference(thetas, Fs_dense, w, damping, theta0)
    result = merge(
        thetas,
        Fs,
        weights=w,
        damping=damping,
        prior=prior,
        rtol=1e-12,
        preconditioner=preconditioner,
    )
    got = _flat(result.params)
    assert float((got - expected).norm() / expected.norm()) < 1e-8
    report = result.report
    assert report.method == "cg" and report.converged
    assert report.relative_residual <= 1e-12
    assert report.products >= report.iterations + T
    assert report.warm_start == (report.residual_history[0] < 1.0)


def test_modules_params_subset_and_load_merged():
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)) for _ in range(2)]
    result = merge(models, params=r"^0\.")
    assert set(result.params) == {"0.weight", "0.bias"}
    expected = (models[0][0].weight + models[1][0].weight) / 2
    torch.testing.assert_close(result.params["0.weight"], expected.detach())
    merged = result.load_into(models[0])
    assert merged is not models[0]
    torch.testing.assert_close(merged[0].weight.detach(), expected.detach())
    torch.testing.assert_close(merged[1].weight, models[0][1].weight)  # head kept
    with pytest.raises(SpaceMismatchError, match="'x' is not a parameter"):
        load_merged(models[0], {"x": torch.zeros(1)})


def test_merge_keeps_float32_dtype():
    thetas = [{k: v.float() for k, v in th.items()} for th in _thetas(5)]
    out = merge(thetas, [DiagonalOperator(SPACE, torch.ones(P))] * T).params
    assert all(v.dtype == torch.float32 for v in out.values())


def test_nonconvergence_warns_and_can_raise():
    thetas = _thetas(6)
    Fs = [
        DenseOperator(SPACE, random_spd(P, seed=t, cond_shift=0.0), self_adjoint=True)
        for t in range(T)
    ]
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        result = merge(thetas, Fs, maxiter=1, rtol=1e-12, warm_start=False, preconditioner=None)
    assert not result.report.converged
    assert "NOT CONVERGED" in str(result.report)
    with pytest.raises(ConvergenceError):
        merge(thetas, Fs, maxiter=1, rtol=1e-12, require_convergence=True)


def test_bad_input_gets_clear_errors():
    thetas = _thetas(7)
    with pytest.raises(ValueError, match="non-empty list"):
        merge([])
    with pytest.raises(ValueError, match="3 weights for 2 models"):
        merge(thetas[:2], weights=[1, 1, 1])
    with pytest.raises(ValueError, match="non-negative"):
        merge(thetas, weights=[1, -1, 1])
    with pytest.raises(ValueError, match="damping"):
        merge(thetas, damping=-1.0)
    bad = dict(thetas[1])
    bad["p1"] = torch.zeros(5, dtype=torch.float64)
    with pytest.raises(SpaceMismatchError, match=r"model 1: parameter 'p1' has shape \(5,\)"):
        merge([thetas[0], bad])
    missing = {k: v for k, v in thetas[1].items() if k != "p2"}
    with pytest.raises(SpaceMismatchError, match="model 1: parameter 'p2' is missing"):
        merge([thetas[0], missing])
    nan = {k: v.clone() for k, v in thetas[1].items()}
    nan["p2"][0, 0, 1] = float("inf")
    with pytest.raises(ValueError, match="model 1 contains NaN or Inf.*'p2'"):
        merge([thetas[0], nan])
    d = torch.ones(P, dtype=torch.float64)
    d[0] = float("nan")
    with pytest.raises(ValueError, match="curvature 1 contains NaN"):
        merge(
            thetas[:2],
            [
                DiagonalOperator(SPACE, torch.ones(P, dtype=torch.float64)),
                DiagonalOperator(SPACE, d),
            ],
        )
    other = ParamSpace(("q",), ((P,),))
    with pytest.raises(SpaceMismatchError):
        merge(thetas[:2], [IdentityOperator(SPACE), IdentityOperator(other)])
    with pytest.raises(TypeError, match="as_operator"):
        merge(thetas[:1], [torch.eye(P)])
    with pytest.raises(ValueError, match="prior"):
        merge(thetas, prior="median")


def test_textbook_form_shrinks_unseen_directions_to_zero():
    """With prior=None a direction no Fisher sees is pulled to 0; prior='mean' keeps it."""
    thetas = _thetas(8)
    d = torch.ones(P, dtype=torch.float64)
    d[0] = 0.0
    Fs = [DiagonalOperator(SPACE, d)] * T
    zero = merge(thetas, Fs, prior=None, damping=1e-3).params
    mean = merge(thetas, Fs, prior="mean", damping=1e-3).params
    avg = sum(_flat(th) for th in thetas) / T
    assert float(_flat(zero)[0]) == 0.0
    torch.testing.assert_close(_flat(mean)[0], avg[0])


def test_no_warning_for_converged_merge():
    thetas = _thetas(9)
    Fs = [DenseOperator(SPACE, random_spd(P, seed=t), self_adjoint=True) for t in range(T)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merge(thetas, Fs)
