"""RegMean and RegMean++ against least-squares references built in float64 in the tests."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from curvmerge import merge
from curvmerge.merging.regmean import (
    RegMeanReport,
    SingularGramWarning,
    regmean,
    regmean_plus_plus,
    scale_off_diagonal,
)
from curvmerge.operators import DenseOperator
from curvmerge.operators.kronecker import KroneckerOperator
from curvmerge.space import ParamSpace
from curvmerge.statistics import LayerGrams, input_grams
from curvmerge.statistics.layers import LayerInfo
from tests.helpers import Conv1D

D = torch.float64


def Grams(grams, layers, num_rows=None):  # noqa: N802
    """A LayerGrams built by hand."""
    rows = {k: int(num_rows or 1) for k in grams}
    return LayerGrams(grams, rows, layers)


def _aug(X: Tensor) -> Tensor:
    return torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], 1)


def _tasks(T=3, d_in=4, d_out=3, n=(12, 9, 15), seed=0):
    """Inputs of T regression tasks and a linear model fitted to each (with bias)."""
    g = torch.Generator().manual_seed(seed)
    Xs, models = [], []
    for t in range(T):
        X = torch.randn(n[t], d_in, generator=g, dtype=D) * (1 + t) + t
        Y = torch.randn(n[t], d_out, generator=g, dtype=D)
        M = torch.linalg.lstsq(_aug(X), Y).solution.T  # [d_out, d_in + 1], fitted
        Xs.append(X)
        models.append({"fc.weight": M[:, :d_in].contiguous(), "fc.bias": M[:, d_in].clone()})
    return Xs, models


def _grams(Xs, bias=True, name="fc", kind="linear", d_out=3):
    d_in = Xs[0].shape[1]
    info = {
        name: LayerInfo(name, kind, f"{name}.weight", f"{name}.bias" if bias else None, d_in, d_out)
    }
    out = []
    for X in Xs:
        R = _aug(X) if bias else X
        out.append(Grams({name: R.T @ R}, info, num_rows=X.shape[0]))
    return out


def _lstsq_merge(Xs, models, weights=None, bias=True):
    """argmin_M sum_t w_t ||X_t M^T - X_t M_t^T||^2 by one stacked least-squares problem."""
    weights = weights or [1.0] * len(Xs)
    rows, targets = [], []
    for X, m, w in zip(Xs, models, weights, strict=True):
        R = _aug(X) if bias else X
        M = torch.cat([m["fc.weight"], m["fc.bias"][:, None]], 1) if bias else m["fc.weight"]
        rows.append(math.sqrt(w) * R)
        targets.append(math.sqrt(w) * R @ M.T)
    return torch.linalg.lstsq(torch.cat(rows), torch.cat(targets)).solution.T


# ---------------------------------------------------------------------------------- RegMean
@pytest.mark.parametrize("bias", [True, False])
def test_regmean_alpha_one_is_the_least_squares_merge(bias):
    Xs, models = _tasks()
    if not bias:
        models = [{"fc.weight": m["fc.weight"]} for m in models]
    out = regmean(models, _grams(Xs, bias=bias), alpha=1.0)
    ref = _lstsq_merge(Xs, models, bias=bias)
    W = out.params["fc.weight"]
    assert W.dtype == D and W.shape == (3, 4)
    torch.testing.assert_close(W, ref[:, :4], rtol=0, atol=1e-8)
    if bias:
        torch.testing.assert_close(out.params["fc.bias"], ref[:, 4], rtol=0, atol=1e-8)
    assert isinstance(out.report, RegMeanReport)
    assert out.report.layers == ["fc"] and out.report.averaged == [] and not out.report.singular
    assert out.report.options == {"alpha": 1.0, "normalize": False}
    # the merge is not an average: the regression moved it
    avg = sum(m["fc.weight"] for m in models) / 3
    assert (W - avg).abs().max() > 1e-2


def test_regmean_alpha_below_one_matches_hand_formula():
    Xs, models = _tasks()
    alpha = 0.6
    out = regmean(models, _grams(Xs), alpha=alpha)
    Gs = [(_aug(X).T @ _aug(X)) for X in Xs]
    Gt = [alpha * G + (1 - alpha) * torch.diag(torch.diag(G)) for G in Gs]
    Ms = [torch.cat([m["fc.weight"], m["fc.bias"][:, None]], 1) for m in models]
    ref = torch.linalg.solve(sum(Gt), sum(G @ M.T for G, M in zip(Gt, Ms, strict=True))).T
    torch.testing.assert_close(out.params["fc.weight"], ref[:, :4], rtol=0, atol=1e-10)
    torch.testing.assert_close(out.params["fc.bias"], ref[:, 4], rtol=0, atol=1e-10)
    # and it is not the alpha=1 solution
    plain = regmean(models, _grams(Xs), alpha=1.0).params["fc.weight"]
    assert (plain - out.params["fc.weight"]).abs().max() > 1e-3


def test_scale_off_diagonal():
    G = torch.tensor([[4.0, 2.0, -1.0], [2.0, 3.0, 0.5], [-1.0, 0.5, 2.0]], dtype=D)
    S = scale_off_diagonal(G, 0.25)
    torch.testing.assert_close(torch.diag(S), torch.diag(G))
    off = ~torch.eye(3, dtype=torch.bool)
    torch.testing.assert_close(S[off], 0.25 * G[off])


def test_regmean_weights_are_a_weighted_regression():
    Xs, models = _tasks()
    w = [1.0, 3.0, 0.5]
    out = regmean(models, _grams(Xs), alpha=1.0, weights=w)
    ref = _lstsq_merge(Xs, models, weights=w)
    torch.testing.assert_close(out.params["fc.weight"], ref[:, :4], rtol=0, atol=1e-8)
    assert out.report.weights == w
    # only ratios matter
    scaled = regmean(models, _grams(Xs), alpha=1.0, weights=[2 * v for v in w])
    torch.testing.assert_close(scaled.params["fc.bias"], out.params["fc.bias"], rtol=0, atol=1e-12)
    # a zero weight drops a task
    two = regmean(models, _grams(Xs), alpha=1.0, weights=[1.0, 1.0, 0.0])
    ref2 = _lstsq_merge(Xs[:2], models[:2])
    torch.testing.assert_close(two.params["fc.weight"], ref2[:, :4], rtol=0, atol=1e-8)


def test_parameters_without_grams_are_the_weighted_average():
    Xs, models = _tasks()
    g = torch.Generator().manual_seed(1)
    extra = [torch.randn(5, generator=g, dtype=D) for _ in models]
    full = [{**m, "norm.weight": e, "other.weight": e[:2] * 3} for m, e in zip(models, extra)]
    w = [1.0, 2.0, 5.0]
    out = regmean(full, _grams(Xs), weights=w)
    ref = sum(wi * e for wi, e in zip(w, extra, strict=True)) / sum(w)
    torch.testing.assert_close(out.params["norm.weight"], ref, rtol=0, atol=1e-15)
    torch.testing.assert_close(out.params["other.weight"], 3 * ref[:2], rtol=0, atol=1e-15)
    assert out.report.averaged == ["norm.weight", "other.weight"]
    # the regression layer is unaffected by the extra parameters
    alone = regmean(models, _grams(Xs), weights=w)
    torch.testing.assert_close(out.params["fc.weight"], alone.params["fc.weight"])


def test_layer_without_a_gram_in_every_model_is_averaged():
    Xs, models = _tasks()
    grams = _grams(Xs)
    grams[1] = Grams({}, {})
    out = regmean(models, grams)
    avg = sum(m["fc.weight"] for m in models) / 3
    torch.testing.assert_close(out.params["fc.weight"], avg, rtol=0, atol=1e-15)
    assert out.report.layers == [] and out.report.averaged == ["fc.weight", "fc.bias"]


def test_params_selects_what_is_merged():
    Xs, models = _tasks()
    out = regmean(models, _grams(Xs), alpha=1.0, params=["fc.weight"])
    assert set(out.params) == {"fc.weight"}
    # the bias is not merged: the weight is solved on the weight's block of the Gram
    nobias = [{"fc.weight": m["fc.weight"]} for m in models]
    ref = _lstsq_merge(Xs, nobias, bias=False)
    torch.testing.assert_close(out.params["fc.weight"], ref, rtol=0, atol=1e-8)
    only_bias = regmean(models, _grams(Xs), params="bias$")
    avg = sum(m["fc.bias"] for m in models) / 3
    torch.testing.assert_close(only_bias.params["fc.bias"], avg, rtol=0, atol=1e-15)
    assert only_bias.report.layers == []


def test_singular_gram_keeps_the_average_in_unseen_directions():
    Xs, models = _tasks()
    Xs = [torch.cat([X[:, :3], torch.zeros(X.shape[0], 1, dtype=D)], 1) for X in Xs]  # dead input
    for alpha in (1.0, 0.5):
        with pytest.warns(SingularGramWarning, match="'fc'.*pseudo-inverse"):
            out = regmean(models, _grams(Xs), alpha=alpha)
        assert out.report.singular == ["fc"]
        W = out.params["fc.weight"]
        avg = sum(m["fc.weight"] for m in models) / 3
        torch.testing.assert_close(W[:, 3], avg[:, 3], rtol=0, atol=1e-12)
        # the seen inputs are the regression on the live inputs
        live = [X[:, :3] for X in Xs]
        sub = [{"fc.weight": m["fc.weight"][:, :3], "fc.bias": m["fc.bias"]} for m in models]
        grams = _grams(live)
        ref = regmean(sub, grams, alpha=alpha)
        torch.testing.assert_close(W[:, :3], ref.params["fc.weight"], rtol=0, atol=1e-8)
        torch.testing.assert_close(out.params["fc.bias"], ref.params["fc.bias"], rtol=0, atol=1e-8)
    assert all(torch.isfinite(v).all() for v in out.params.values())


def test_fewer_rows_than_inputs_with_alpha_one_is_singular_not_nan():
    Xs, models = _tasks(n=(2, 1, 1))  # 4 rows, 5 inputs: the summed Gram has rank 4
    X = torch.cat([_aug(X) for X in Xs])
    null = torch.linalg.svd(X).Vh[4:]  # [1, 5]: no task's inputs reach it
    for t, m in enumerate(models):  # move each model along it: no prediction changes
        m["fc.weight"] = m["fc.weight"] + (t + 1) * null[:, :4]
        m["fc.bias"] = m["fc.bias"] + (t + 1) * null[0, 4]
    with pytest.warns(SingularGramWarning):
        out = regmean(models, _grams(Xs), alpha=1.0)
    M = torch.cat([out.params["fc.weight"], out.params["fc.bias"][:, None]], 1)
    Ms = [torch.cat([m["fc.weight"], m["fc.bias"][:, None]], 1) for m in models]
    # every task's predictions on its own rows are reproduced (4 equations, 5 unknowns)
    for Xt, Mt in zip(Xs, Ms, strict=True):
        torch.testing.assert_close(_aug(Xt) @ M.T, _aug(Xt) @ Mt.T, rtol=0, atol=1e-9)
    # and along the unseen direction the merge keeps the average (2 = mean of 1, 2, 3)
    avg = sum(Ms) / 3
    assert float((avg @ null.T).abs().min()) > 0.5
    torch.testing.assert_close(M @ null.T, avg @ null.T, rtol=0, atol=1e-9)


def test_regmean_is_the_merge_equation_with_gram_kronecker_identity():
    """F_t = G~_t (x) I on [W b] rows (dense, built here), zero elsewhere; lambda -> 0."""
    Xs, models = _tasks()
    g = torch.Generator().manual_seed(3)
    full = [{**m, "norm.weight": torch.randn(2, generator=g, dtype=D)} for m in models]
    alpha, w = 0.8, [0.5, 1.0, 2.0]
    out = regmean(full, _grams(Xs), alpha=alpha, weights=w)
    space = ParamSpace.from_tensors(full[0])
    P, d_out, d = space.size, 3, 5
    # row o of [W b] sits at W[o, :] (offset o * 4) and b[o] (offset 12 + o)
    idx = [[o * 4 + i for i in range(4)] + [12 + o] for o in range(d_out)]
    Fs = []
    for X in Xs:
        G = _aug(X).T @ _aug(X)
        Gt = alpha * G + (1 - alpha) * torch.diag(torch.diag(G))
        F = torch.zeros(P, P, dtype=D)
        for rows in idx:
            F[torch.tensor(rows)[:, None], torch.tensor(rows)[None, :]] = Gt
        Fs.append(DenseOperator(space, F, self_adjoint=True))
    ref = merge(full, Fs, weights=w, damping=1e-10, damping_scale=1.0, rtol=1e-13)
    for n in space.names:
        torch.testing.assert_close(out.params[n], ref.params[n], rtol=0, atol=1e-7)
    assert d == 5


def test_regmean_is_merge_with_kronecker_operators_of_input_grams():
    """merge(F_t = KroneckerOperator(G~_t, B=I)) at damping -> 0 on a CNN with a conv, a
    linear layer and a LayerNorm (no Gram: averaged by both)."""
    torch.manual_seed(0)
    nets = [
        nn.Sequential(
            nn.Conv1d(2, 3, 2, dtype=D),
            nn.Tanh(),
            nn.Flatten(),
            nn.LayerNorm(9, dtype=D),
            nn.Linear(9, 2, dtype=D),
        )
        for _ in range(3)
    ]
    for n in nets:  # LayerNorm parameters that differ between models
        with torch.no_grad():
            n[3].weight.normal_()
            n[3].bias.normal_()
    g = torch.Generator().manual_seed(4)
    data = [
        [(torch.randn(6, 2, 4, generator=g, dtype=D) + t, None) for _ in range(2)] for t in range(3)
    ]
    grams = [input_grams(n, d) for n, d in zip(nets, data, strict=True)]
    alpha, w = 0.7, [1.0, 0.5, 2.0]
    out = regmean(nets, grams, alpha=alpha, weights=w)
    assert out.report.layers == ["0", "4"]
    assert out.report.averaged == ["3.weight", "3.bias"]
    space = ParamSpace.from_module(nets[0])
    Fs = []
    for lg in grams:
        scaled = LayerGrams(
            {k: scale_off_diagonal(G, alpha) for k, G in lg.grams.items()}, lg.num_rows, lg.layers
        )
        Fs.append(KroneckerOperator.from_grams(space, scaled))
    ref = merge(nets, Fs, weights=w, damping=1e-11, damping_scale=1.0, rtol=1e-14)
    for n in space.names:
        torch.testing.assert_close(out.params[n], ref.params[n], rtol=0, atol=1e-9)


def test_layouts_hf_conv1d_and_conv_read_the_weight_as_rows():
    Xs, models = _tasks()
    ref = regmean(models, _grams(Xs), alpha=0.7)
    # HF Conv1D stores the weight [in, out]
    t_models = [
        {"fc.weight": m["fc.weight"].T.contiguous(), "fc.bias": m["fc.bias"]} for m in models
    ]
    out = regmean(t_models, _grams(Xs, kind="hf_conv1d"), alpha=0.7)
    torch.testing.assert_close(out.params["fc.weight"].T, ref.params["fc.weight"])
    # a convolution's weight [out, c, k] is read as weight.reshape(out, -1)
    c_models = [
        {"fc.weight": m["fc.weight"].reshape(3, 2, 2), "fc.bias": m["fc.bias"]} for m in models
    ]
    out = regmean(c_models, _grams(Xs, kind="conv"), alpha=0.7)
    assert out.params["fc.weight"].shape == (3, 2, 2)
    torch.testing.assert_close(out.params["fc.weight"].reshape(3, 4), ref.params["fc.weight"])


def test_layers_of_equal_size_solved_together_match_separate_solves():
    Xs, models = _tasks()
    Zs, others = _tasks(seed=7)
    both = [
        {**m, "fc2.weight": o["fc.weight"], "fc2.bias": o["fc.bias"]}
        for m, o in zip(models, others, strict=True)
    ]
    grams = []
    for a, b in zip(_grams(Xs), _grams(Zs, name="fc2"), strict=True):
        grams.append(Grams({**a.grams, **b.grams}, {**a.layers, **b.layers}))
    out = regmean(both, grams, alpha=1.0)
    ref1, ref2 = _lstsq_merge(Xs, models), _lstsq_merge(Zs, others)
    torch.testing.assert_close(out.params["fc.weight"], ref1[:, :4], rtol=0, atol=1e-8)
    torch.testing.assert_close(out.params["fc2.weight"], ref2[:, :4], rtol=0, atol=1e-8)
    assert out.report.layers == ["fc", "fc2"]


def test_normalize_divides_each_models_grams_by_its_rows():
    Xs, models = _tasks()
    out = regmean(models, _grams(Xs), alpha=1.0, normalize=True)
    ref = _lstsq_merge(Xs, models, weights=[1 / X.shape[0] for X in Xs])
    torch.testing.assert_close(out.params["fc.weight"], ref[:, :4], rtol=0, atol=1e-8)
    assert out.report.options["normalize"] is True


def test_regmean_keeps_dtype_and_accepts_modules():
    Xs, models = _tasks()
    mods = []
    for m in models:
        lin = nn.Linear(4, 3)
        with torch.no_grad():
            lin.weight.copy_(m["fc.weight"])
            lin.bias.copy_(m["fc.bias"])
        mods.append(nn.ModuleDict({"fc": lin}))
    out = regmean(mods, _grams(Xs), alpha=1.0)
    assert out.params["fc.weight"].dtype == torch.float32
    ref = _lstsq_merge(Xs, models)
    torch.testing.assert_close(out.params["fc.weight"].double(), ref[:, :4], rtol=0, atol=1e-4)
    assert "1 layers solved, 0 parameters averaged" in str(out.report)


def test_regmean_bad_inputs_raise_clear_errors():
    Xs, models = _tasks()
    grams = _grams(Xs)
    with pytest.raises(ValueError, match="2 Gram sets .* for 3 models"):
        regmean(models, grams[:2])
    for alpha in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            regmean(models, grams, alpha=alpha)
    bad = _grams(Xs)
    bad[2] = Grams({"fc": torch.eye(4, dtype=D)}, bad[2].layers)
    with pytest.raises(ValueError, match=r"layer 'fc': grams\[2\] has a Gram of shape \(4, 4\)"):
        regmean(models, bad)
    with pytest.raises(TypeError, match="LayerGrams"):
        regmean(models, [{"fc": torch.eye(5)}] * 3)
    with pytest.raises(TypeError, match="one LayerGrams per model"):
        regmean(models, grams[0])
    wide = [{"fc.weight": torch.zeros(3, 6, dtype=D), "fc.bias": torch.zeros(3, dtype=D)}] * 3
    with pytest.raises(ValueError, match="weight 'fc.weight' has shape"):
        regmean(wide, grams)
    with pytest.raises(ValueError, match="weights"):
        regmean(models, grams, weights=[1.0, -1.0, 1.0])
    renamed = [{k.replace("fc", "lin"): v for k, v in m.items()} for m in models]
    with pytest.raises(ValueError, match="layer 'fc'.*'fc.weight', which is not a parameter"):
        regmean(renamed, grams)
    with pytest.raises(ValueError, match="non-empty list of models"):
        regmean([], [])


def _linear_modules(models):
    mods = []
    for m in models:
        lin = nn.Linear(4, 3, dtype=D)
        with torch.no_grad():
            lin.weight.copy_(m["fc.weight"])
            lin.bias.copy_(m["fc.bias"])
        mods.append(nn.Sequential(nn.Identity(), lin))
    return mods


def test_regmean_with_input_grams_of_modules():
    Xs, models = _tasks()
    mods = _linear_modules(models)
    grams = [input_grams(m, [(X, None)]) for m, X in zip(mods, Xs, strict=True)]
    out = regmean(mods, grams, alpha=1.0)
    ref = _lstsq_merge(Xs, models)
    torch.testing.assert_close(out.params["1.weight"], ref[:, :4], rtol=0, atol=1e-8)
    torch.testing.assert_close(out.params["1.bias"], ref[:, 4], rtol=0, atol=1e-8)
    assert out.report.layers == ["1"]


# ---------------------------------------------------------------------------------- RegMean++
def _mlps(T=3, seed=0):
    torch.manual_seed(seed)
    return [
        nn.Sequential(nn.Linear(4, 5, dtype=D), nn.Tanh(), nn.Linear(5, 3, dtype=D)).eval()
        for _ in range(T)
    ]


def _task_data(T=3, batches=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        [(torch.randn(6, 4, generator=g, dtype=D) + t, None) for _ in range(batches)]
        for t in range(T)
    ]


def _stack(batches):
    return torch.cat([x for x, _ in batches])


def _hand_grams(name, Hs, d_out, bias=True):
    d_in = Hs[0].shape[1]
    info = {name: LayerInfo(name, "linear", f"{name}.weight", f"{name}.bias", d_in, d_out)}
    return [Grams({name: _aug(H).T @ _aug(H)}, info) for H in Hs]


def test_regmean_plus_plus_layer_by_layer_on_merged_inputs():
    nets, data = _mlps(), _task_data()
    alpha, w = 0.8, [1.0, 2.0, 0.5]
    out = regmean_plus_plus(nets, data, alpha=alpha, weights=w)
    params = [dict(n.named_parameters()) for n in nets]
    Xs = [_stack(d) for d in data]
    # layer 0 sees the data itself: it is RegMean's first layer
    first = [{"fc.weight": p["0.weight"], "fc.bias": p["0.bias"]} for p in params]
    ref0 = regmean(first, _grams(Xs, d_out=5), alpha=alpha, weights=w)
    torch.testing.assert_close(out.params["0.weight"], ref0.params["fc.weight"], rtol=0, atol=1e-10)
    torch.testing.assert_close(out.params["0.bias"], ref0.params["fc.bias"], rtol=0, atol=1e-10)
    # layer 2's Grams are those of the merged first layer's activations, by hand
    Hs = [torch.tanh(X @ out.params["0.weight"].T + out.params["0.bias"]) for X in Xs]
    second = [{"fc.weight": p["2.weight"], "fc.bias": p["2.bias"]} for p in params]
    ref2 = regmean(second, _hand_grams("fc", Hs, 3), alpha=alpha, weights=w)
    torch.testing.assert_close(out.params["2.weight"], ref2.params["fc.weight"], rtol=0, atol=1e-10)
    torch.testing.assert_close(out.params["2.bias"], ref2.params["fc.bias"], rtol=0, atol=1e-10)
    # which differs from RegMean's (candidate activations)
    grams = [input_grams(n, d) for n, d in zip(nets, data, strict=True)]
    plain = regmean(nets, grams, alpha=alpha, weights=w)
    torch.testing.assert_close(plain.params["0.weight"], out.params["0.weight"])
    assert (plain.params["2.weight"] - out.params["2.weight"]).abs().max() > 1e-3
    r = out.report
    assert isinstance(r, RegMeanReport) and r.method == "regmean_plus_plus"
    assert r.layers == ["0", "2"] and r.averaged == [] and r.options["alpha"] == alpha
    assert r.forwards == 1 + 2 * 3 * 2  # discovery + 2 layers x 3 tasks x 2 batches
    assert "13 batch forwards" in str(r)
    # the models are left as they were
    for n, p in zip(nets, params, strict=True):
        assert all(torch.equal(v, dict(n.named_parameters())[k]) for k, v in p.items())


def test_regmean_plus_plus_of_one_model_is_that_model():
    nets, data = _mlps(T=1), _task_data(T=1)
    out = regmean_plus_plus(nets, data, alpha=0.5)
    for k, v in nets[0].named_parameters():
        torch.testing.assert_close(out.params[k], v.detach(), rtol=0, atol=1e-12)


def test_regmean_plus_plus_unmerged_parameters_are_each_tasks_own():
    """Merging only layer 2: its Grams come from each task's own (unmerged) layer 0."""
    nets, data = _mlps(), _task_data()
    out = regmean_plus_plus(nets, data, params=r"^2\.", alpha=1.0)
    assert set(out.params) == {"2.weight", "2.bias"}
    grams = [input_grams(n, d, params=r"^2\.") for n, d in zip(nets, data, strict=True)]
    ref = regmean(nets, grams, params=r"^2\.", alpha=1.0)
    for k in out.params:
        torch.testing.assert_close(out.params[k], ref.params[k], rtol=0, atol=1e-10)


class _Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return torch.tanh(x)


def test_regmean_plus_plus_stops_each_pass_after_the_layer():
    torch.manual_seed(0)
    nets = [
        nn.Sequential(nn.Linear(4, 5, dtype=D), _Counter(), nn.Linear(5, 3, dtype=D))
        for _ in range(2)
    ]
    data = _task_data(T=2, batches=3)
    out = regmean_plus_plus(nets, data)
    # the activation runs in the discovery pass (model 0) and in layer 2's passes only
    assert nets[0][1].calls == 1 + 3 and nets[1][1].calls == 3
    assert out.report.forwards == 1 + 2 * 2 * 3


class _TwoHeads(nn.Module):
    """``a`` and ``b`` read the same tensor (like q/k/v); ``c`` reads it after an in-place
    change, so it depends on ``a``."""

    def __init__(self, inplace):
        super().__init__()
        self.a, self.b, self.c = (nn.Linear(3, 3, dtype=D) for _ in range(3))
        self.out = nn.Linear(3, 2, dtype=D)
        self.inplace = inplace

    def forward(self, x):
        x = x.clone()
        h = self.a(x) + self.b(x)
        if self.inplace:
            x.add_(h)
        else:
            x = x + h
        return self.out(torch.tanh(self.c(x)))


@pytest.mark.parametrize("inplace", [False, True])
def test_layers_reading_the_same_input_share_a_pass(inplace):
    torch.manual_seed(0)
    nets = [_TwoHeads(inplace).eval() for _ in range(2)]
    data = _task_data(T=2, batches=1)
    data = [[(x[:, :3], None) for x, _ in d] for d in data]
    out = regmean_plus_plus(nets, data, alpha=1.0)
    # groups: [a, b], [c], [out] -> 3 groups x 2 tasks x 1 batch + discovery
    assert out.report.forwards == 1 + 3 * 2
    assert out.report.layers == ["a", "b", "c", "out"]
    # a and b are RegMean on the data; c sees x + a(x) + b(x) of the merged a, b
    Xs = [_stack(d) for d in data]
    ps = [dict(n.named_parameters()) for n in nets]
    for name in ("a", "b"):
        sub = [{"fc.weight": p[f"{name}.weight"], "fc.bias": p[f"{name}.bias"]} for p in ps]
        ref = regmean(sub, _grams(Xs, d_out=3), alpha=1.0)
        torch.testing.assert_close(out.params[f"{name}.weight"], ref.params["fc.weight"])
    m = out.params
    Hs = [X + X @ m["a.weight"].T + m["a.bias"] + X @ m["b.weight"].T + m["b.bias"] for X in Xs]
    sub = [{"fc.weight": p["c.weight"], "fc.bias": p["c.bias"]} for p in ps]
    ref = regmean(sub, _hand_grams("fc", Hs, 3), alpha=1.0)
    torch.testing.assert_close(m["c.weight"], ref.params["fc.weight"], rtol=0, atol=1e-10)


def test_regmean_plus_plus_bad_inputs():
    nets, data = _mlps(T=2), _task_data(T=2)
    with pytest.raises(ValueError, match="one batch iterable per model: got 1 for 2"):
        regmean_plus_plus(nets, data[:1])
    with pytest.raises(TypeError, match=r"data\[1\] is a one-shot iterator"):
        regmean_plus_plus(nets, [data[0], iter(data[1])])
    with pytest.raises(TypeError, match="torch.nn.Module"):
        regmean_plus_plus([dict(n.named_parameters()) for n in nets], data)
    with pytest.raises(ValueError, match="alpha"):
        regmean_plus_plus(nets, data, alpha=0.0)
    with pytest.raises(ValueError, match="model 1: parameter '2.bias' is missing"):
        nobias = nn.Sequential(nn.Linear(4, 5, dtype=D), nn.Tanh(), nn.Linear(5, 3, bias=False))
        regmean_plus_plus([nets[0], nobias.double()], data)

    class Affine(nn.Module):  # a Linear's parameters in a module that is not a layer
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(3, 5, dtype=D))
            self.bias = nn.Parameter(torch.zeros(3, dtype=D))

        def forward(self, x):
            return x @ self.weight.T + self.bias

    odd = nn.Sequential(nn.Linear(4, 5, dtype=D), nn.Tanh(), Affine())
    with pytest.raises(ValueError, match="model 1 does not have the layers of model 0.*'2'"):
        regmean_plus_plus([nets[0], odd], data)


class _Tokens(nn.Module):
    """A token model taking Hugging Face style keyword inputs."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4, dtype=D)
        self.fc = nn.Linear(4, 4, dtype=D)
        self.head = nn.Linear(4, 2, dtype=D)

    def forward(self, input_ids, attention_mask):
        h = torch.tanh(self.fc(self.emb(input_ids)))
        return self.head(h[:, 0])


def test_regmean_plus_plus_token_model_uses_merged_embeddings_and_drops_padding():
    torch.manual_seed(0)
    nets = [_Tokens().eval() for _ in range(2)]
    g = torch.Generator().manual_seed(2)
    data = []
    for _ in nets:
        ids = torch.randint(0, 7, (5, 6), generator=g)
        mask = (torch.arange(6) < torch.randint(2, 7, (5, 1), generator=g)).long()
        data.append([({"input_ids": ids, "attention_mask": mask}, None)])
    w = [1.0, 3.0]
    out = regmean_plus_plus(nets, data, weights=w, alpha=1.0)
    assert out.report.layers == ["fc", "head"] and out.report.averaged == ["emb.weight"]
    ps = [dict(n.named_parameters()) for n in nets]
    E = (ps[0]["emb.weight"] + 3 * ps[1]["emb.weight"]) / 4
    torch.testing.assert_close(out.params["emb.weight"], E, rtol=0, atol=1e-15)
    # fc's rows: the averaged embedding of the non-padding tokens only
    Xs = [E[b["input_ids"]][b["attention_mask"].bool()] for ((b, _),) in data]
    sub = [{"fc.weight": p["fc.weight"], "fc.bias": p["fc.bias"]} for p in ps]
    ref = regmean(sub, _grams(Xs, d_out=4), weights=w, alpha=1.0)
    torch.testing.assert_close(out.params["fc.weight"], ref.params["fc.weight"], rtol=0, atol=1e-10)
    # head's rows: the first token's features of the merged fc, padding or not
    m = out.params
    Hs = [
        torch.tanh(E[b["input_ids"][:, 0]] @ m["fc.weight"].T + m["fc.bias"]) for ((b, _),) in data
    ]
    sub = [{"fc.weight": p["head.weight"], "fc.bias": p["head.bias"]} for p in ps]
    ref = regmean(sub, _hand_grams("fc", Hs, 2), weights=w, alpha=1.0)
    torch.testing.assert_close(m["head.weight"], ref.params["fc.weight"], rtol=0, atol=1e-10)


def test_regmean_plus_plus_conv_normalize_and_progress():
    torch.manual_seed(0)
    nets = [
        nn.Sequential(
            nn.Conv1d(2, 3, 2, dtype=D), nn.Tanh(), nn.Flatten(), nn.Linear(9, 2, dtype=D)
        )
        for _ in range(2)
    ]
    g = torch.Generator().manual_seed(5)
    data = [  # 4 and 8 examples: the tasks have different row counts
        [(torch.randn(4, 2, 4, generator=g, dtype=D) + t, None) for _ in range(t + 1)]
        for t in range(2)
    ]
    out = regmean_plus_plus(nets, data, normalize=True, progress=True)
    # the conv layer sees the data: RegMean on the candidates' (identical) Grams
    grams = [input_grams(n, d, params=r"^0\.") for n, d in zip(nets, data, strict=True)]
    ref = regmean(nets, grams, params=r"^0\.", normalize=True)
    torch.testing.assert_close(out.params["0.weight"], ref.params["0.weight"], rtol=0, atol=1e-10)
    assert out.report.options["normalize"] is True
    # normalizing halves the weight of the task with twice the rows
    plain = regmean_plus_plus(nets, data, normalize=False)
    assert (plain.params["0.weight"] - out.params["0.weight"]).abs().max() > 1e-4
    halved = regmean_plus_plus(nets, data, normalize=False, weights=[2.0, 1.0])
    for k in out.params:
        torch.testing.assert_close(halved.params[k], out.params[k], rtol=0, atol=1e-10)


def test_hf_conv1d_models_merge_like_their_linear_twins():
    torch.manual_seed(0)
    nets = [nn.Sequential(Conv1D(5, 4), nn.Tanh(), Conv1D(3, 5)) for _ in range(2)]
    twins = []
    for n in nets:
        lin = nn.Sequential(nn.Linear(4, 5, dtype=D), nn.Tanh(), nn.Linear(5, 3, dtype=D))
        with torch.no_grad():
            for i in (0, 2):
                lin[i].weight.copy_(n[i].weight.T)
                lin[i].bias.copy_(n[i].bias)
        twins.append(lin)
    data = _task_data(T=2)
    for method in ("regmean", "regmean_plus_plus"):
        if method == "regmean":
            a = regmean(nets, [input_grams(n, d) for n, d in zip(nets, data, strict=True)])
            b = regmean(twins, [input_grams(n, d) for n, d in zip(twins, data, strict=True)])
        else:
            a, b = regmean_plus_plus(nets, data), regmean_plus_plus(twins, data)
        assert a.report.layers == ["0", "2"]
        for i in ("0", "2"):
            torch.testing.assert_close(a.params[f"{i}.weight"].T, b.params[f"{i}.weight"])
            torch.testing.assert_close(a.params[f"{i}.bias"], b.params[f"{i}.bias"])


class _Shared(nn.Module):
    """``fc`` is called twice per pass, ``mid`` in between."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3, dtype=D)
        self.mid = nn.Linear(3, 3, dtype=D)

    def forward(self, x):
        return self.fc(torch.tanh(self.mid(self.fc(x))))


def test_regmean_plus_plus_shared_layer_gathers_every_call():
    torch.manual_seed(0)
    nets = [_Shared() for _ in range(2)]
    data = [[(x[:, :3], None) for x, _ in d] for d in _task_data(T=2, batches=1)]
    out = regmean_plus_plus(nets, data, alpha=1.0)
    assert out.report.layers == ["fc", "mid"]
    assert out.report.forwards == 1 + 2 * 2  # fc's passes run both of its calls
    ps = [dict(n.named_parameters()) for n in nets]
    avg = {k: (ps[0][k] + ps[1][k]) / 2 for k in ps[0]}

    def lin(p, name, x):
        return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]

    Xs = [_stack(d) for d in data]
    # fc: rows of its first call (the data) and of its second (through the averaged mid, fc)
    grams = []
    for X in Xs:
        second = torch.tanh(lin(avg, "mid", lin(avg, "fc", X)))
        grams.append(_aug(X).T @ _aug(X) + _aug(second).T @ _aug(second))
    info = {"fc": LayerInfo("fc", "linear", "fc.weight", "fc.bias", 3, 3)}
    ref = regmean(nets, [Grams({"fc": G}, info) for G in grams], alpha=1.0, params=r"^fc\.")
    torch.testing.assert_close(out.params["fc.weight"], ref.params["fc.weight"], rtol=0, atol=1e-10)
    # mid sees the merged fc's first call
    Hs = [lin(out.params, "fc", X) for X in Xs]
    sub = [{"fc.weight": p["mid.weight"], "fc.bias": p["mid.bias"]} for p in ps]
    ref = regmean(sub, _hand_grams("fc", Hs, 3), alpha=1.0)
    torch.testing.assert_close(
        out.params["mid.weight"], ref.params["fc.weight"], rtol=0, atol=1e-10
    )


def test_a_model_of_weight_zero_is_left_out():
    """Weight 0: neither its Gram nor its parameters enter (RegMean and RegMean++)."""
    Xs, models = _tasks()
    grams = _grams(Xs)
    three = regmean(models, grams, weights=[1.0, 2.0, 0.0]).params
    two = regmean(models[:2], grams[:2], weights=[1.0, 2.0]).params
    for k in two:
        torch.testing.assert_close(three[k], two[k], rtol=0, atol=1e-12)
    torch.manual_seed(0)
    nets = [
        nn.Sequential(nn.Linear(3, 4, dtype=D), nn.Tanh(), nn.Linear(4, 2, dtype=D)) for _ in "abc"
    ]
    data = [[(torch.randn(6, 3, dtype=D), None)] for _ in nets]
    three = regmean_plus_plus(nets, data, weights=[1.0, 2.0, 0.0]).params
    two = regmean_plus_plus(nets[:2], data[:2], weights=[1.0, 2.0]).params
    for k in two:
        torch.testing.assert_close(three[k], two[k], rtol=0, atol=1e-12)
