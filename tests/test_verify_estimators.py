"""Stochastic estimators of curvmerge.verify: unbiasedness in the limits where they are exact,
and error bars that cover the dense truth in at least 19 of 20 fixed seeds.

Error bars are ``Z_SCORE = 3`` standard errors (Student-t quantile of the same level for
scalar estimates with few probes). With at most one miss allowed in 20 seeds, z = 2 would
fail about one time in four even for a perfectly calibrated estimator; z = 3 does not.
"""

from __future__ import annotations

import math

import pytest
import torch

from curvmerge.operators import DenseOperator, DiagonalOperator
from curvmerge.space import ParamSpace
from curvmerge.verify.estimators import (
    DIAGONAL_METHODS,
    TRACE_METHODS,
    Z_SCORE,
    estimate_diagonal,
    estimate_frobenius_norm,
    estimate_trace,
)
from curvmerge.verify.share import estimate_diagonal_share, exact_diagonal_share

SEEDS = list(range(20))
SPACE = ParamSpace(("conv.weight", "conv.bias", "fc.weight"), ((4, 2, 3), (6,), (5, 6)))
P = SPACE.size  # 60


def psd(kind: str, seed: int = 0) -> torch.Tensor:
    """Random float64 PSD test matrices with different spectra."""
    g = torch.Generator().manual_seed(1000 + seed)
    if kind == "lowrank":  # a GGN J^T H J with N*C = 24 < P: rank-deficient
        J = torch.randn(24, P, generator=g, dtype=torch.float64)
        J[:, :24] *= 3.0  # layers with larger gradients
        return J.T @ J / 24
    U, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    if kind == "decay":
        lam = torch.arange(1, P + 1, dtype=torch.float64) ** -1.5
    elif kind == "flat":
        lam = torch.rand(P, generator=g, dtype=torch.float64) + 0.1
    else:
        raise ValueError(kind)
    M = (U * lam) @ U.T
    return (M + M.T) / 2


KINDS = ["lowrank", "decay", "flat"]


def op(M: torch.Tensor) -> DenseOperator:
    return DenseOperator(SPACE, M, self_adjoint=True)


def _require_coverage(hits: list[bool], ratios: list[float]) -> None:
    assert sum(hits) >= 19, f"covered in only {sum(hits)}/20 seeds; ratios {ratios}"
    # the error bars must be informative, not vacuous: the typical error is a sizeable
    # fraction of one standard error
    med = sorted(ratios)[len(ratios) // 2]
    assert 0.1 < med < 2.5, f"median |error| / stderr = {med}"


# ------------------------------------------------------------------ exact limits
def test_hutchinson_is_exact_on_diagonal_operators():
    d = torch.linspace(0.1, 2.0, P, dtype=torch.float64)
    est = estimate_diagonal(DiagonalOperator(SPACE, d), 4, seed=3)
    torch.testing.assert_close(est.value, d, rtol=1e-12, atol=0)
    assert est.norm_stderr < 1e-12


@pytest.mark.parametrize("method", ["diag++", "xdiag"])
def test_deflated_estimators_are_exact_when_the_sketch_spans_the_range(method):
    g = torch.Generator().manual_seed(0)
    J = torch.randn(5, P, generator=g, dtype=torch.float64)
    M = J.T @ J  # rank 5
    est = estimate_diagonal(op(M), 30, method=method, seed=1)  # sketch of 10 >= rank
    torch.testing.assert_close(est.value, M.diagonal(), rtol=1e-9, atol=1e-9)
    assert est.covers(M.diagonal())


def test_hutchpp_trace_is_exact_on_low_rank():
    g = torch.Generator().manual_seed(0)
    J = torch.randn(5, P, generator=g, dtype=torch.float64)
    M = J.T @ J
    est = estimate_trace(op(M), 30, method="hutch++", seed=1)
    assert abs(est.value - float(M.trace())) <= 1e-9 * float(M.trace())
    assert est.covers(float(M.trace()))


def test_product_counts():
    M = psd("decay")
    assert estimate_diagonal(op(M), 30, method="hutchinson").num_products == 30
    assert estimate_diagonal(op(M), 30, method="diag++").num_products == 30
    assert estimate_diagonal(op(M), 31, method="xdiag").num_products == 30
    assert estimate_trace(op(M), 30, method="hutch++").num_products == 30


def test_unknown_method_and_too_few_products():
    M = psd("decay")
    with pytest.raises(ValueError, match="unknown diagonal method"):
        estimate_diagonal(op(M), 10, method="nope")
    with pytest.raises(ValueError, match="unknown trace method"):
        estimate_trace(op(M), 10, method="nope")
    with pytest.raises(ValueError, match="at least"):
        estimate_diagonal(op(M), 1)


# ------------------------------------------------------------------ coverage over 20 seeds
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", DIAGONAL_METHODS)
def test_diagonal_error_within_error_bar(kind, method):
    M = psd(kind)
    d = M.diagonal()
    hits, ratios = [], []
    for seed in SEEDS:
        est = estimate_diagonal(op(M), 30, method=method, seed=seed)
        err = float(torch.linalg.vector_norm(est.value - d))
        hits.append(est.covers(d))
        ratios.append(err / est.norm_stderr)
    _require_coverage(hits, ratios)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["hutchinson", "diag++"])
def test_diagonal_entries_within_error_bars(kind, method):
    """Per entry: at least 95% of the P * 20 entries lie within z standard errors."""
    M = psd(kind)
    d = M.diagonal()
    inside = 0
    for seed in SEEDS:
        est = estimate_diagonal(op(M), 30, method=method, seed=seed)
        inside += int(((est.value - d).abs() <= Z_SCORE * est.stderr).sum())
    assert inside >= 0.95 * P * len(SEEDS)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", TRACE_METHODS)
def test_trace_error_within_error_bar(kind, method):
    M = psd(kind)
    tr = float(M.trace())
    hits, ratios = [], []
    for seed in SEEDS:
        est = estimate_trace(op(M), 60, method=method, seed=seed)
        hits.append(est.covers(tr))
        ratios.append(abs(est.value - tr) / est.stderr)
    _require_coverage(hits, ratios)


@pytest.mark.parametrize("kind", KINDS)
def test_frobenius_norm_within_error_bar(kind):
    M = psd(kind)
    fro = float(torch.linalg.matrix_norm(M))
    hits, ratios = [], []
    for seed in SEEDS:
        est = estimate_frobenius_norm(op(M), 40, seed=seed)
        hits.append(est.covers(fro))
        ratios.append(abs(est.value - fro) / est.stderr)
    _require_coverage(hits, ratios)


@pytest.mark.parametrize("kind", KINDS)
def test_diagonal_share_within_error_bar(kind):
    M = psd(kind)
    exact = exact_diagonal_share(op(M))
    hits, ratios = [], []
    layer_hits = {n: 0 for n in SPACE.names}
    frac_hits = {n: 0 for n in SPACE.names}
    for seed in SEEDS:
        est = estimate_diagonal_share(op(M), M.diagonal(), 60, seed=seed)
        hits.append(abs(est.share - exact.share) <= est.error_bar())
        ratios.append(abs(est.share - exact.share) / est.stderr)
        for n in SPACE.names:
            layer_hits[n] += abs(est.per_layer[n] - exact.per_layer[n]) <= est.layer_error_bar(n)
            frac_err = abs(est.per_layer_fraction[n] - exact.per_layer_fraction[n])
            frac_hits[n] += frac_err <= est.fraction_error_bar(n)
        assert math.isclose(est.frobenius_norm, exact.frobenius_norm, rel_tol=0.5)
    _require_coverage(hits, ratios)
    for n, h in layer_hits.items():
        assert h >= 19, f"layer {n}: covered in {h}/20 seeds"
        assert frac_hits[n] >= 19, f"layer {n}: fraction covered in {frac_hits[n]}/20 seeds"
