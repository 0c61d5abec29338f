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
    LinearOperator,
    ParamSpace,
    SpaceMismatchError,
    load_merged,
    merge,
)
from curvmerge.merging.system import SCALE_PROBES
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


@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("prior", ["mean", None, "given"])
def test_diagonal_curvature_is_the_elementwise_closed_form(prior, absolute):
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
    D = sum(wt * d for wt, d in zip(w, ds))
    lam = damping if absolute else damping * float(D.mean())  # relative to the mean diagonal
    expected = (sum(wt * d * _flat(th) for wt, d, th in zip(w, ds, thetas)) + lam * theta0) / (
        D + lam
    )
    Fs = [DiagonalOperator(SPACE, d) for d in ds]
    result = merge(
        thetas, Fs, weights=w, damping=damping, prior=prior_arg,
        damping_scale=1.0 if absolute else "auto",
    )  # fmt: skip
    torch.testing.assert_close(_flat(result.params), expected, rtol=1e-13, atol=1e-13)
    assert result.report.method == "diagonal"
    assert result.report.effective_damping == pytest.approx(lam, rel=1e-12)


def test_diagonal_entries_seen_by_no_model_keep_the_prior():
    thetas = _thetas(3)
    d = torch.ones(P, dtype=torch.float64)
    d[:4] = 0.0
    result = merge(thetas, [DiagonalOperator(SPACE, d)] * T, damping=0.0)
    mean = sum(_flat(th) for th in thetas) / T
    torch.testing.assert_close(_flat(result.params)[:4], mean[:4])
    assert result.report.unseen == 4


@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("prior", ["mean", None])
@pytest.mark.parametrize("preconditioner", ["diagonal", None])
def test_dense_curvature_matches_dense_float64_solve(prior, preconditioner, absolute):
    thetas = _thetas(4)
    Fs_dense = [random_spd(P, seed=10 + t, cond_shift=0.0) for t in range(T)]
    Fs = [DenseOperator(SPACE, F, self_adjoint=True) for F in Fs_dense]
    w, damping = [0.2, 0.5, 0.3], 1e-3
    theta0 = (
        sum(wt * _flat(th) for wt, th in zip(w, thetas))
        if prior == "mean"
        else torch.zeros(P, dtype=torch.float64)
    )
    scale = float(sum(wt * F.diagonal() for wt, F in zip(w, Fs_dense)).mean())
    lam = damping if absolute else damping * scale
    expected = _dense_reference(thetas, Fs_dense, w, lam, theta0)
    result = merge(
        thetas,
        Fs,
        weights=w,
        damping=damping,
        damping_scale=1.0 if absolute else "auto",
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


# ------------------------------------------------------------------ issue 10: one equation
def _minilm_like_diagonals(seed=20, scale=1e-6):
    """Diagonal Fishers shaped like those of three MiniLM classifiers: entries spread over
    1e-7..1e-5 of the scale's order (log-uniform), half of them exactly zero."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(T):
        d = scale * 10 ** (2 * torch.rand(P, generator=g, dtype=torch.float64) - 1)
        d[torch.rand(P, generator=g) < 0.5] = 0.0
        out.append(DiagonalOperator(SPACE, d))
    return out


def test_prior_vocabulary_zero_and_base_everywhere():
    """'zero' is None; 'base' takes base=; the same words in merge, PreparedMerge, registry."""
    from curvmerge.merging.prepared import PreparedMerge
    from curvmerge.merging.registry import get_method

    thetas = _thetas(30)
    base = _thetas(31)[0]
    Fs = [DiagonalOperator(SPACE, torch.rand(P, dtype=torch.float64) + 0.1) for _ in range(T)]
    for curv in (None, Fs):
        textbook = merge(thetas, curv, prior=None, damping=0.5)
        zero = merge(thetas, curv, prior="zero", damping=0.5)
        torch.testing.assert_close(_flat(zero.params), _flat(textbook.params), rtol=0, atol=0)
        assert zero.report.prior == textbook.report.prior == "zero"
        given = merge(thetas, curv, prior=base, damping=0.5)
        named = merge(thetas, curv, prior="base", base=base, damping=0.5)
        torch.testing.assert_close(_flat(named.params), _flat(given.params), rtol=0, atol=0)
        assert named.report.prior == "base"
        prepared = PreparedMerge(thetas, curv, prior="base", base=base)
        torch.testing.assert_close(
            _flat(prepared.merge(None, 0.5).params), _flat(given.params), rtol=1e-12, atol=1e-12
        )
        prepared = PreparedMerge(thetas, curv, prior="zero")
        torch.testing.assert_close(
            _flat(prepared.merge(None, 0.5).params), _flat(zero.params), rtol=1e-12, atol=1e-12
        )
    spec = get_method("fisher_diagonal")
    via_registry = spec(thetas, base=base, curvatures=Fs, prior="base", damping=0.5)
    direct = merge(thetas, Fs, prior="base", base=base, damping=0.5)
    torch.testing.assert_close(_flat(via_registry.params), _flat(direct.params), rtol=0, atol=0)
    with pytest.raises(ValueError, match="prior='base' needs the base"):
        merge(thetas, Fs, prior="base")
    with pytest.raises(ValueError, match="prior='base' needs the base"):
        PreparedMerge(thetas, Fs, prior="base")


def test_params_with_curvatures_must_select_their_space():
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).double() for _ in range(2)]
    space = ParamSpace.from_module(models[0], r"^0\.")
    Fs = [DiagonalOperator(space, torch.rand(space.size, dtype=torch.float64)) for _ in range(2)]
    same = merge(models, Fs, params=["0.weight", "0.bias"])  # exactly the curvatures' space
    assert set(same.params) == {"0.weight", "0.bias"}
    with pytest.raises(ValueError, match="params.*curvatures"):
        merge(models, Fs, params=r"^1\.")
    with pytest.raises(ValueError, match="params.*curvatures"):
        merge(models, Fs, params=r".")  # selects more than the space


def test_tiny_fisher_diagonal_merge_is_scale_free_with_default_arguments():
    """Fisher 1e-6 times smaller (a model whose Fisher is tiny in absolute terms): the same
    diagonal-Fisher merge with default arguments."""
    thetas = _thetas(32)
    Fs = _minilm_like_diagonals(scale=1.0)
    tiny = [DiagonalOperator(SPACE, 1e-6 * F.diagonal()) for F in Fs]
    ref, got = merge(thetas, Fs), merge(thetas, tiny)
    err = (_flat(got.params) - _flat(ref.params)).norm() / _flat(ref.params).norm()
    assert float(err) <= 1e-10
    assert got.report.damping == ref.report.damping
    assert got.report.effective_damping == pytest.approx(1e-6 * ref.report.effective_damping)


def test_tiny_fisher_exact_merge_is_scale_free_with_default_arguments():
    thetas = _thetas(33)
    dense = [random_spd(P, seed=40 + t, cond_shift=0.0) for t in range(T)]
    for tiny in (
        [DenseOperator(SPACE, 1e-6 * F, self_adjoint=True) for F in dense],
        [1e-6 * DenseOperator(SPACE, F, self_adjoint=True) for F in dense],
    ):
        Fs = [DenseOperator(SPACE, F, self_adjoint=True) for F in dense]
        ref, got = merge(thetas, Fs, rtol=1e-10), merge(thetas, tiny, rtol=1e-10)
        assert ref.report.method == got.report.method == "cg"
        assert ref.report.converged and got.report.converged
        err = (_flat(got.params) - _flat(ref.params)).norm() / _flat(ref.params).norm()
        assert float(err) <= 1e-8


def test_realistic_small_fisher_diagonal_merge_differs_from_averaging():
    """A diagonal Fisher with MiniLM-like entries (1e-7..1e-5, half zero) used to return the
    average to 1e-4 with merge's default damping; now it is the Fisher-weighted merge."""
    thetas = _thetas(34)
    Fs = _minilm_like_diagonals()
    average = _flat(merge(thetas).params)
    fisher = _flat(merge(thetas, Fs).params)
    undamped = _flat(merge(thetas, Fs, damping=0.0).params)
    moved = float((fisher - average).norm() / (undamped - average).norm())
    assert moved > 0.5  # it was 1e-3 with the absolute default


def test_report_states_relative_damping_scale_and_lambda():
    thetas = _thetas(35)
    Fs = _minilm_like_diagonals()
    w = [0.5, 0.3, 0.2]
    report = merge(thetas, Fs, weights=w, damping=1e-2).report
    scale = float(sum(wt * F.diagonal() for wt, F in zip(w, Fs)).mean())
    assert report.damping == 1e-2
    assert report.damping_scale == pytest.approx(scale, rel=1e-12)
    assert report.effective_damping == pytest.approx(1e-2 * scale, rel=1e-12)
    assert "1e-02" in str(report) or "0.01" in str(report)
    assert f"{report.effective_damping:.3g}" in str(report)
    absolute = merge(thetas, Fs, weights=w, damping=1e-8, damping_scale=1.0).report
    assert absolute.effective_damping == 1e-8 and absolute.damping_scale == 1.0
    # averaging with the mean prior: the damping does not apply and is not shown
    average = merge(thetas, damping=0.3).report
    assert average.method == "average" and average.damping is None
    assert average.effective_damping is None and "damping" not in str(average)
    # identity curvature: scale 1 (default weights sum to 1), so averaging is unchanged
    assert merge(thetas, prior="zero", damping=0.3).report.damping_scale == pytest.approx(1.0)


def test_damping_that_dominates_the_curvature_is_flagged_and_warns():
    from curvmerge import DampingWarning

    thetas = _thetas(36)
    Fs = _minilm_like_diagonals()
    with pytest.warns(DampingWarning, match="dominates"):
        result = merge(thetas, Fs, damping=1e-3, damping_scale=1.0)  # the old absolute default
    assert result.report.damping_dominates and "dominates" in str(result.report)
    dense = [
        DenseOperator(SPACE, 1e-6 * random_spd(P, seed=50 + t, cond_shift=0.0), self_adjoint=True)
        for t in range(T)
    ]
    with pytest.warns(DampingWarning):
        assert merge(thetas, dense, damping=1e-3, damping_scale=1.0).report.damping_dominates
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not merge(thetas, Fs).report.damping_dominates
        assert not merge(thetas, dense).report.damping_dominates
        assert not merge(thetas).report.damping_dominates  # the average: nothing to dominate


class _Counting(DenseOperator):
    """A dense operator that counts the columns it multiplies (one column = one product)."""

    def __init__(self, space, matrix):
        super().__init__(space, matrix, self_adjoint=True)
        self.columns = 0

    def _matmat(self, X):
        self.columns += X.shape[1]
        return super()._matmat(X)


class _GGNLike(_Counting):
    """Has its own diagonal, computed by a counted 'pass' over data (like GGNOperator)."""

    def __init__(self, space, matrix):
        super().__init__(space, matrix)
        self.diagonal_passes = 0

    def diagonal(self):
        self.diagonal_passes += 1
        return self.matrix.diagonal()


class _NoDiagonal(_Counting):
    """Has no cheap diagonal (like a curvlinops adapter): the base class would probe."""

    diagonal = LinearOperator.diagonal


def _columns_identity(report, ops):
    """Columns multiplied by the curvatures = what the report says, product by product."""
    c = report.costs
    T_ = len(ops)
    system = c.cg_products + c.warm_start_products + c.sketch_products
    assert sum(F.columns for F in ops) == T_ * system + c.rhs_products + c.scale_products
    assert report.products == c.products == (
        c.rhs_products + c.cg_products + c.warm_start_products + c.scale_products
        + c.sketch_products
    )  # fmt: skip


def test_every_cost_is_in_the_report():
    space = ParamSpace(("w",), ((300,),))
    g = torch.Generator().manual_seed(0)
    thetas = [{"w": torch.randn(300, generator=g, dtype=torch.float64)} for _ in range(T)]
    mats = []
    for _ in range(T):
        J = torch.randn(40, 300, generator=g, dtype=torch.float64)
        mats.append(J.T @ J / 40)
    # an operator with its own (counted) diagonal pass: scale and warm start from it
    ops = [_GGNLike(space, M) for M in mats]
    report = merge(thetas, ops, rtol=1e-8).report
    assert report.costs.diagonal_passes == T and report.costs.diagonal_seconds >= 0
    assert report.costs.scale_products == 0 and report.warm_start
    assert report.costs.rhs_products == T and report.costs.warm_start_products == 1
    _columns_identity(report, ops)
    assert "diagonal passes" in str(report) and f"{report.products} products" in str(report)
    # no cheap diagonal: a Hutchinson scale from one [P, k] block per curvature, no probing,
    # no warm start from a probed diagonal
    ops = [_NoDiagonal(space, M) for M in mats]
    report = merge(thetas, ops, rtol=1e-8).report
    assert report.costs.diagonal_passes == 0 and not report.warm_start
    assert report.costs.scale_products == SCALE_PROBES * T
    assert report.damping_scale_source.startswith("hutchinson")
    _columns_identity(report, ops)
    assert sum(F.columns for F in ops) < 300  # nothing probed P unit vectors
    exact = float(sum(M.diagonal().mean() for M in mats) / T)
    assert report.damping_scale == pytest.approx(exact, rel=0.5)  # an estimate
    # the Nystrom sketch
    ops = [_GGNLike(space, M) for M in mats]
    report = merge(thetas, ops, rtol=1e-8, preconditioner="nystrom:10").report
    assert report.costs.sketch_products == 10
    _columns_identity(report, ops)
    for field in ("rhs", "cg", "warm_start", "scale", "sketch", "diagonal"):
        assert getattr(report.costs, f"{field}_seconds") >= 0


def test_prepared_merge_reports_its_prepare_costs():
    from curvmerge.merging.prepared import PreparedMerge

    space = ParamSpace(("w",), ((50,),))
    g = torch.Generator().manual_seed(1)
    thetas = [{"w": torch.randn(50, generator=g, dtype=torch.float64)} for _ in range(2)]
    mats = [torch.diag(torch.rand(50, generator=g, dtype=torch.float64)) for _ in range(2)]
    ops = [_GGNLike(space, M) for M in mats]
    prepared = PreparedMerge(thetas, ops)
    costs = prepared.prepare_costs
    assert costs.diagonal_passes == 2 and costs.rhs_products == 4  # F_t theta_s, cached
    assert prepared.prepare_products == costs.products
    ops = [_NoDiagonal(space, M) for M in mats]
    prepared = PreparedMerge(thetas, ops)
    assert prepared.prepare_costs.scale_products > 0
    assert prepared.prepare_costs.diagonal_passes == 0
    point = prepared.merge([0.5, 0.5])
    assert point.report.costs.rhs_products == 0  # from the cached cross products
    one_shot = merge(thetas, ops)  # prepare and the point in one report
    assert one_shot.report.costs.scale_products == prepared.prepare_costs.scale_products


def test_one_default_damping_everywhere():
    import inspect

    from curvmerge.cli import build_parser
    from curvmerge.merging.prepared import PreparedMerge
    from curvmerge.merging.registry import get_method
    from curvmerge.merging.sweep import sweep

    default = inspect.signature(merge).parameters["damping"].default
    assert inspect.signature(PreparedMerge.merge).parameters["damping"].default == default
    assert tuple(inspect.signature(sweep).parameters["dampings"].default) == (default,)
    for name in ("fisher_diagonal", "fisher_exact"):
        assert get_method(name).options["damping"] == default
    args = build_parser().parse_args(["sweep", "a.safetensors", "b.safetensors", "-o", "x"])
    assert args.damping == [default]


def test_tiny_ggn_merge_matches_and_counts_its_diagonal_passes():
    """Real GGN operators of small MLPs and the same operators times 1e-6 (a model whose
    Fisher is tiny in absolute terms): the same exact merge with default arguments; the
    report counts the diagonal passes the scale and warm start ran (none once cached)."""
    from curvmerge import GGNOperator

    torch.manual_seed(0)
    X = torch.randn(16, 3, dtype=torch.float64)
    models, ops = [], []
    for _ in range(2):
        m = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
        models.append(m)
        ops.append(GGNOperator(m, nn.MSELoss(), [(X, torch.zeros(16, 2, dtype=torch.float64))]))
    ref = merge(models, ops, rtol=1e-10)
    assert ref.report.converged and ref.report.costs.diagonal_passes == 2
    tiny = merge(models, [1e-6 * F for F in ops], rtol=1e-10)
    assert tiny.report.costs.diagonal_passes == 0  # cached by the operators
    assert tiny.report.effective_damping == pytest.approx(1e-6 * ref.report.effective_damping)
    space = ops[0].space
    err = (space.flatten(tiny.params) - space.flatten(ref.params)).norm()
    assert float(err / space.flatten(ref.params).norm()) <= 1e-8


def test_large_closed_form_measures_its_step_on_a_subsample():
    """Past PreparedMerge.SHARE_ENTRIES entries the kept share is measured on evenly spaced
    entries; it still tells a dominated merge from a normal one."""
    from curvmerge import DampingWarning
    from curvmerge.merging.prepared import PreparedMerge

    n = 3 * PreparedMerge.SHARE_ENTRIES + 7
    space = ParamSpace(("w",), ((n,),))
    g = torch.Generator().manual_seed(3)
    thetas = [{"w": torch.randn(n, generator=g)} for _ in range(2)]
    Fs = [DiagonalOperator(space, 1e-6 * torch.rand(n, generator=g)) for _ in range(2)]
    assert 0.5 < merge(thetas, Fs).report.curvature_share <= 1.0
    with pytest.warns(DampingWarning):
        assert merge(thetas, Fs, damping=1e-3, damping_scale=1.0).report.damping_dominates


def test_a_diagonal_that_declines_falls_back_to_the_hutchinson_scale():
    class Declines(_GGNLike):
        def diagonal(self):
            raise NotImplementedError("no engine")

    space = ParamSpace(("w",), ((30,),))
    g = torch.Generator().manual_seed(4)
    thetas = [{"w": torch.randn(30, generator=g, dtype=torch.float64)} for _ in range(2)]
    ops = [Declines(space, torch.diag(torch.rand(30, generator=g, dtype=torch.float64)))
           for _ in range(2)]  # fmt: skip
    report = merge(thetas, ops, rtol=1e-10).report
    assert report.converged and not report.warm_start
    assert report.damping_scale_source.startswith("hutchinson")
    assert report.costs.scale_products > 0


# ------------------------------------------------------------ damping grids, one Krylov space
GRID = [1e-4, 1e-3, 1e-2, 0.1, 1.0]


def _psd(seed, spread=3):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    S = (Q * torch.logspace(-spread, 0, P, dtype=torch.float64)) @ Q.T
    return (S + S.T) / 2


def _ggn_problem():
    from curvmerge import GGNOperator

    torch.manual_seed(0)
    X = torch.randn(16, 3, dtype=torch.float64)
    models, ops = [], []
    for _ in range(2):
        m = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
        models.append(m)
        ops.append(GGNOperator(m, nn.MSELoss(), [(X, torch.zeros(16, 2, dtype=torch.float64))]))
    return models, ops


def _grid_problem(kind):
    if kind == "dense":
        Fs = [_psd(30 + t) for t in range(T)]
        return _thetas(seed=31), [DenseOperator(SPACE, F, self_adjoint=True) for F in Fs]
    return _ggn_problem()


@pytest.mark.parametrize("kind", ["dense", "ggn"])
@pytest.mark.parametrize("prior", ["mean", "zero"])
def test_damping_grid_from_one_krylov_space_equals_separate_merges(kind, prior):
    from curvmerge import PreparedMerge

    thetas, ops = _grid_problem(kind)
    rtol = 1e-10
    weights = [0.7, 0.3] if len(ops) == 2 else [0.2, 0.5, 0.3]
    prepared = PreparedMerge(thetas, ops, prior=prior, rtol=rtol, warm_start=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the largest dampings may dominate
        grid = prepared.merge_dampings(weights, GRID)
        separate = [prepared.merge(weights, d) for d in GRID]
    assert grid.shared and len(grid) == len(GRID)
    space = ops[0].space
    for d, g, s in zip(GRID, grid, separate, strict=True):
        assert g.report.damping == d and g.report.converged
        assert g.report.effective_damping == pytest.approx(s.report.effective_damping)
        assert g.report.relative_residual <= rtol  # the true residual, per damping
        assert g.report.products == g.report.costs.products
        x, y = space.flatten(g.params), space.flatten(s.params)
        assert float((x - y).norm() / y.norm()) <= 1e-6
    total_separate = sum(s.report.products for s in separate)
    hardest = max(s.report.products for s in separate)
    rhs = grid[0].report.costs.rhs_products
    cg_total = grid.products - rhs
    assert grid.products < total_separate
    # the true-residual block is one product per damping; each report counts its own column
    extra = len(GRID) - 1
    assert cg_total <= max(g.report.costs.cg_products for g in grid) + extra
    assert grid.products <= hardest + 2 + extra
    print(f"{kind}/{prior}: grid {grid.products} products, separate {total_separate}")


def test_damping_grid_falls_back_to_merge_per_damping():
    from curvmerge import PreparedMerge

    thetas, ops = _grid_problem("dense")
    diag = [DiagonalOperator(SPACE, F.to_dense().diagonal()) for F in ops]
    for prepared in (
        PreparedMerge(thetas, diag),
        PreparedMerge(thetas, ops, preconditioner="diagonal"),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            grid = prepared.merge_dampings(None, GRID[1:3])
            separate = [prepared.merge(None, d) for d in GRID[1:3]]
        assert not grid.shared
        assert grid.products == sum(g.report.products for g in grid)
        for g, s in zip(grid, separate, strict=True):
            x, y = SPACE.flatten(g.params), SPACE.flatten(s.params)
            assert float((x - y).norm() / y.norm()) <= 1e-5
    with pytest.raises(ValueError, match="dampings"):
        PreparedMerge(thetas, ops).merge_dampings(None, [1e-3, -1.0])


def test_prepared_merge_refuses_curvatures_changed_since_prepare():
    """PreparedMerge keeps F_t (theta_t - theta_0) and diagonals from prepare time: once a
    GGN's model changes they are stale, so a point is refused rather than silently mixed."""
    from curvmerge import GGNOperator, PreparedMerge

    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
              for _ in range(2)]  # fmt: skip
    data = [(torch.randn(6, 3), torch.randint(0, 2, (6,)))]
    ops = [GGNOperator(m, "cross_entropy", data, params=r"^0\.") for m in models]
    prepared = PreparedMerge(models, ops, prior="zero")
    prepared.merge(damping=1e-2)
    with torch.no_grad():
        models[1][2].weight.mul_(2.0)  # the head, outside the merged parameters
    with pytest.raises(RuntimeError, match="curvature 1 changed"):
        prepared.merge(damping=1e-2)
