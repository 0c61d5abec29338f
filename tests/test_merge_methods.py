"""Task arithmetic, TIES, DARE, SLERP and output ensembling against hand-computed values."""

import math
import types

import pytest
import torch
from torch import nn

from curvmerge import SpaceMismatchError, merge
from curvmerge.merging.ensemble import OutputEnsemble, output_ensemble
from curvmerge.merging.methods import (
    MethodReport,
    dare,
    slerp,
    slerp_vectors,
    task_arithmetic,
    ties,
    trim_top_k,
)

D = torch.float64


def _d(**kw):
    return {k: torch.tensor(v, dtype=D) for k, v in kw.items()}


BASE = _d(w=[[0.0, 0.0], [0.0, 0.0]], b=[1.0, 1.0])
A = _d(w=[[1.0, -2.0], [0.5, 0.0]], b=[2.0, 1.0])
B = _d(w=[[3.0, 1.0], [-0.1, 0.0]], b=[1.0, 0.0])


# ------------------------------------------------------------------ task arithmetic
def test_task_arithmetic_hand_computed():
    out = task_arithmetic([A, B], BASE, scaling=0.5, weights=[1.0, 2.0])
    # theta_0 + 0.5 * (1 * tau_A + 2 * tau_B)
    assert torch.allclose(out.params["w"], torch.tensor([[3.5, 0.0], [0.15, 0.0]], dtype=D))
    assert torch.allclose(out.params["b"], torch.tensor([1.5, 0.0], dtype=D))
    assert out.report.method == "task_arithmetic"
    assert out.report.weights == [0.5, 1.0]
    assert isinstance(out.report, MethodReport) and out.report.options["scaling"] == 0.5


def test_task_arithmetic_one_over_t_is_average():
    out = task_arithmetic([A, B], BASE, scaling=0.5)
    avg = merge([A, B])
    for n in A:
        assert torch.allclose(out.params[n], avg.params[n])


def test_task_arithmetic_params_subset_and_dtype():
    a = {k: v.float() for k, v in A.items()}
    out = task_arithmetic([a, a], BASE, params=["b"])
    assert set(out.params) == {"b"} and out.params["b"].dtype == torch.float32


def test_task_arithmetic_accepts_modules():
    torch.manual_seed(0)
    base, m1, m2 = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)
    out = task_arithmetic([m1, m2], base, scaling=1.0)
    expect = m1.weight + m2.weight - base.weight
    assert torch.allclose(out.params["weight"], expect.detach())
    merged = out.load_into(base)
    assert torch.allclose(merged.weight, expect.detach())


# ------------------------------------------------------------------ TIES
def test_trim_top_k_keeps_largest_and_ties():
    tau = torch.tensor([0.1, -3.0, 2.0, 0.5, -2.0])
    assert torch.equal(trim_top_k(tau, 0.4), torch.tensor([0.0, -3.0, 2.0, 0.0, -2.0]))
    assert torch.equal(trim_top_k(tau, 0.2), torch.tensor([0.0, -3.0, 0.0, 0.0, 0.0]))
    assert torch.equal(trim_top_k(tau, 1.0), tau)


def test_ties_trim_elect_disjoint_merge():
    base = _d(w=[0.0, 0.0, 0.0, 0.0, 0.0])
    t1 = _d(w=[4.0, -1.0, 0.2, 3.0, -0.1])
    t2 = _d(w=[2.0, 3.0, -5.0, -1.0, 0.1])
    t3 = _d(w=[-1.0, 2.0, -0.3, 0.0, 6.0])
    # density 0.6 keeps 3 of 5 entries per task vector:
    # t1 -> [4, -1, 0, 3, 0]; t2 -> [2, 3, -5, 0, 0]; t3 -> [-1, 2, 0, 0, 6]
    # sums [5, 4, -5, 3, 6] -> elected signs [+, +, -, +, +]
    # agreeing entries: e0 {4, 2}, e1 {3, 2}, e2 {-5}, e3 {3}, e4 {6}
    out = ties([t1, t2, t3], base, density=0.6, scaling=2.0)
    expect = 2.0 * torch.tensor([3.0, 2.5, -5.0, 3.0, 6.0], dtype=D)
    assert torch.allclose(out.params["w"], expect)
    assert out.report.options == {"density": 0.6, "scaling": 2.0}


def test_ties_no_agreeing_entry_is_zero():
    base = _d(w=[1.0, 1.0])
    out = ties([_d(w=[2.0, 1.0]), _d(w=[0.0, 1.0])], base, density=1.0)
    # entry 0: +1 and -1 sum to 0 -> no elected sign -> base value
    assert torch.allclose(out.params["w"], torch.tensor([1.0, 1.0], dtype=D))


def test_ties_bad_density():
    with pytest.raises(ValueError, match="density"):
        ties([A, B], BASE, density=0.0)


# ------------------------------------------------------------------ DARE
def test_dare_seed_reproducible_and_sparse():
    torch.manual_seed(1)
    base = {"w": torch.zeros(1000, dtype=D)}
    a = {"w": torch.randn(1000, dtype=D)}
    r1 = dare([a], base, drop_rate=0.7, seed=3)
    r2 = dare([a], base, drop_rate=0.7, seed=3)
    r3 = dare([a], base, drop_rate=0.7, seed=4)
    assert torch.equal(r1.params["w"], r2.params["w"])
    assert not torch.equal(r1.params["w"], r3.params["w"])
    kept = r1.params["w"] != 0
    assert 0.2 < kept.double().mean() < 0.4
    # survivors are rescaled by 1 / (1 - p)
    assert torch.allclose(r1.params["w"][kept], a["w"][kept] / 0.3)


def test_dare_rescale_is_unbiased():
    base = {"w": torch.zeros(50, dtype=D)}
    a = {"w": torch.linspace(-1, 1, 50, dtype=D)}
    mean = sum(dare([a], base, drop_rate=0.5, seed=s).params["w"] for s in range(400)) / 400
    # each entry: mean of 400 draws of 2 tau Bernoulli(0.5): std |tau| / 20
    assert torch.all((mean - a["w"]).abs() <= 4 * a["w"].abs() / 20 + 1e-12)


def test_dare_zero_drop_is_task_arithmetic_and_ties_combine():
    ta = task_arithmetic([A, B], BASE, scaling=0.3)
    out = dare([A, B], BASE, drop_rate=0.0, scaling=0.3)
    for n in A:
        assert torch.allclose(out.params[n], ta.params[n])
    ti = ties([A, B], BASE, density=0.5)
    out = dare([A, B], BASE, drop_rate=0.0, combine="ties", density=0.5)
    for n in A:
        assert torch.allclose(out.params[n], ti.params[n])


def test_dare_bad_drop_rate():
    with pytest.raises(ValueError, match="drop_rate"):
        dare([A], BASE, drop_rate=1.0)


# ------------------------------------------------------------------ SLERP
def test_slerp_endpoints():
    for per_tensor in (True, False):
        r0 = slerp([A, B], t=0.0, per_tensor=per_tensor)
        r1 = slerp([A, B], t=1.0, per_tensor=per_tensor)
        for n in A:
            assert torch.allclose(r0.params[n], A[n])
            assert torch.allclose(r1.params[n], B[n])


def test_slerp_keeps_norm_of_equal_norm_vectors():
    torch.manual_seed(0)
    v0, v1 = torch.randn(10, dtype=D), torch.randn(10, dtype=D)
    v1 = v1 * v0.norm() / v1.norm()
    for t in (0.25, 0.5, 0.9):
        s = slerp_vectors(v0, v1, t)
        assert torch.isclose(s.norm(), v0.norm())
        assert s.norm() > ((1 - t) * v0 + t * v1).norm()  # linear interpolation shrinks it
    # unequal norms: the norm is interpolated linearly, the angle uniformly
    s = slerp_vectors(v0, 3 * v1, 0.5)
    assert torch.isclose(s.norm(), 2 * v0.norm())
    angle = torch.arccos(torch.dot(v0, v1) / v0.norm() ** 2)
    assert torch.isclose(torch.arccos(torch.dot(s, v0) / s.norm() / v0.norm()), angle / 2)


def test_slerp_hand_computed_and_weights_and_base():
    a, b = _d(w=[1.0, 0.0]), _d(w=[0.0, 1.0])
    h = math.sqrt(0.5)
    out = slerp([a, b], weights=[1.0, 1.0])
    assert torch.allclose(out.params["w"], torch.tensor([h, h], dtype=D))
    assert out.report.weights == [0.5, 0.5]
    base = _d(w=[1.0, 1.0])
    out = slerp([_d(w=[2.0, 1.0]), _d(w=[1.0, 2.0])], base=base)
    assert torch.allclose(out.params["w"], torch.tensor([1 + h, 1 + h], dtype=D))
    # parallel vectors fall back to linear interpolation
    out = slerp([a, _d(w=[3.0, 0.0])], t=0.5)
    assert torch.allclose(out.params["w"], torch.tensor([2.0, 0.0], dtype=D))


def test_slerp_needs_two_models():
    with pytest.raises(ValueError, match="exactly 2"):
        slerp([A, B, A])
    with pytest.raises(ValueError, match="t or weights"):
        slerp([A, B], t=0.1, weights=[1, 1])


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("method", [task_arithmetic, ties, dare])
def test_bad_input(method):
    with pytest.raises(ValueError, match="non-negative"):
        method([A, B], BASE, weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="2 weights for 2|got 3 weights"):
        method([A, B], BASE, weights=[1.0, 1.0, 1.0])
    with pytest.raises(SpaceMismatchError, match="shape"):
        method([A, _d(w=[1.0, 2.0], b=[1.0, 1.0])], BASE)
    with pytest.raises(SpaceMismatchError, match="missing"):
        method([A, _d(w=[[1.0, 2.0], [0.0, 0.0]])], BASE)
    with pytest.raises(ValueError, match="base model"):
        method([A, B], None)
    with pytest.raises(ValueError, match="NaN"):
        method([A, _d(w=[[math.nan, 0.0], [0.0, 0.0]], b=[1.0, 1.0])], BASE)


# ------------------------------------------------------------------ output ensembling
class _Net(nn.Module):
    def __init__(self, classes):
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.head = nn.Linear(4, classes)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def test_ensemble_per_task_heads_uses_own_head_with_every_body():
    torch.manual_seed(0)
    m1, m2 = _Net(2), _Net(3)
    x = torch.randn(5, 3)
    result = output_ensemble([m1, m2], params=r"^body\.", weights=[1.0, 3.0])
    ens2 = result.task_model(1)
    assert isinstance(ens2, OutputEnsemble)
    # task 1: model 2's head on model 1's body and on its own body
    with torch.no_grad():
        own = m2(x).softmax(-1)
        other = m2.head(torch.tanh(m1.body(x))).softmax(-1)
        expect = 0.25 * other + 0.75 * own
        assert torch.allclose(ens2(x).exp(), expect, atol=1e-6)
        assert ens2(x).shape == (5, 3) and result.task_model(0)(x).shape == (5, 2)
    # the models are untouched and not copied
    assert result.task_model(0).module is m1
    assert result.report.method == "ensemble" and result.report.weights == [0.25, 0.75]


def test_ensemble_logits_and_hf_style_outputs():
    class HF(nn.Module):
        def __init__(self, as_dict):
            super().__init__()
            self.lin, self.as_dict = nn.Linear(2, 2), as_dict

        def forward(self, input_ids):
            z = self.lin(input_ids)
            return {"logits": z} if self.as_dict else types.SimpleNamespace(logits=z, loss=None)

    for as_dict in (True, False):
        torch.manual_seed(0)
        m1, m2 = HF(as_dict), HF(as_dict)
        x = torch.randn(3, 2)
        out = output_ensemble([m1, m2], combine="logits").task_model(0)(input_ids=x)
        logits = out["logits"] if as_dict else out.logits
        assert torch.allclose(logits, (m1.lin(x) + m2.lin(x)).detach() / 2)


def test_ensemble_bad_input():
    with pytest.raises(TypeError, match="nn.Module"):
        output_ensemble([A, B])
    with pytest.raises(ValueError, match="combine"):
        output_ensemble([_Net(2)], combine="vote")
    with pytest.raises(SpaceMismatchError):
        output_ensemble([_Net(2), nn.Sequential(nn.Linear(3, 4))], params=r"^body\.")


# ------------------------------------------------------------------ registry
def test_registry_lists_working_methods_and_calls_them_alike():
    from curvmerge.merging.registry import get_method, list_methods, method_names, task_models
    from curvmerge.operators import DenseOperator, DiagonalOperator, KroneckerOperator
    from curvmerge.space import ParamSpace

    assert method_names() == [s.name for s in list_methods()]
    assert {"average", "task_arithmetic", "ties", "dare", "slerp", "slerp_sequential",
            "spherical_barycenter", "tsv_merge", "iso_c", "iso_cts", "regmean",
            "regmean_plus_plus", "adamerging", "weight_ensembling", "fisher_diagonal",
            "fisher_kfac", "fisher_exact", "ensemble"} == set(method_names())  # fmt: skip
    space = ParamSpace.from_tensors(A)
    diag = [DiagonalOperator(space, torch.rand(space.size, dtype=D) + 0.1) for _ in range(2)]
    dense = [DenseOperator(space, torch.diag(F.diagonal()), self_adjoint=True) for F in diag]
    spd = torch.tensor([[2.0, 0.5, 0.1], [0.5, 1.0, 0.2], [0.1, 0.2, 1.0]], dtype=D)
    kfac = [KroneckerOperator(space, {"layer": (spd, c * torch.eye(2, dtype=D), "w", "b")})
            for c in (1.0, 3.0)]  # fmt: skip
    curv = {"diagonal_fisher": diag, "exact_ggn": dense, "kfac": kfac, "none": None}
    results = {}
    for spec in list_methods():
        if not spec.is_merge or spec.statistics in ("input_gram", "data"):
            continue  # these run modules on data: test_registry_runs_the_data_methods
        results[spec.name] = spec([A, B], base=BASE, curvatures=curv[spec.statistics])
        assert set(results[spec.name].params) == set(A)
    assert torch.allclose(results["average"].params["w"], (A["w"] + B["w"]) / 2)
    # a dense operator holding the same diagonal gives the diagonal merge (via CG)
    for n in A:
        assert torch.allclose(
            results["fisher_exact"].params[n], results["fisher_diagonal"].params[n], atol=1e-8
        )
    # F_t = spd (x) c_t I: the K-FAC merge of one layer is the closed form with weights c_t
    M = {t: torch.cat([m["w"], m["b"][:, None]], 1) for t, m in enumerate((A, B))}
    want = (1.0 * M[0] + 3.0 * M[1]) / 4.0
    exact = get_method("fisher_kfac")([A, B], curvatures=kfac, damping=0.0, rtol=1e-12)
    got = torch.cat([exact.params["w"], exact.params["b"][:, None]], 1)
    assert torch.allclose(got, want, atol=1e-10)
    torch.manual_seed(0)
    nets = [_Net(2), _Net(2)]
    for name in ("average", "ensemble"):
        mods = task_models(get_method(name)(nets, params=r"^body\."), nets)
        assert len(mods) == 2 and mods[0](torch.randn(1, 3)).shape == (1, 2)


def test_registry_runs_the_data_methods_like_their_functions():
    from curvmerge.merging.registry import get_method
    from curvmerge.merging.regmean import regmean, regmean_plus_plus
    from curvmerge.statistics import input_grams

    torch.manual_seed(0)
    nets = [_Net(2).double(), _Net(2).double()]
    data = [[(torch.randn(8, 3, dtype=D), torch.zeros(8, dtype=torch.long))] for _ in nets]
    grams = [input_grams(n, d, params=r"^body\.") for n, d in zip(nets, data, strict=True)]
    pairs = [
        (get_method("regmean")(nets, curvatures=grams, params=r"^body\.", alpha=0.5),
         regmean(nets, grams, params=r"^body\.", alpha=0.5)),
        (get_method("regmean_plus_plus")(nets, curvatures=data, params=r"^body\."),
         regmean_plus_plus(nets, data, params=r"^body\.")),
    ]  # fmt: skip
    for got, want in pairs:
        assert set(got.params) == {"body.weight", "body.bias"}
        for n in got.params:
            assert torch.equal(got.params[n], want.params[n])
    # regmean differs from the average: the Grams matter
    avg = get_method("average")(nets, params=r"^body\.")
    assert not torch.allclose(pairs[0][0].params["body.weight"], avg.params["body.weight"])
    with pytest.raises(ValueError, match="needs one LayerGrams"):
        get_method("regmean")(nets)
    with pytest.raises(ValueError, match="got 1 batch iterable"):
        get_method("regmean_plus_plus")(nets, curvatures=data[:1])


def test_registry_errors():
    from curvmerge.merging.registry import UnknownMethodError, get_method

    with pytest.raises(UnknownMethodError, match="valid methods: average, task_arithmetic"):
        get_method("fisher")
    assert get_method("Fisher-Diagonal").name == "fisher_diagonal"
    with pytest.raises(TypeError, match="no option 'densty'.*density"):
        get_method("ties")([A, B], base=BASE, densty=0.3)
    with pytest.raises(ValueError, match="needs the base model"):
        get_method("task_arithmetic")([A, B])
    with pytest.raises(ValueError, match="needs one diagonal Fisher per model"):
        get_method("fisher_diagonal")([A, B])
    with pytest.raises(ValueError, match="exactly 2"):
        get_method("slerp")([A, B, A])
    with pytest.raises(ValueError, match="non-negative"):
        get_method("average")([A, B], weights=[1.0, -0.5])
    with pytest.raises(ValueError, match="prior"):
        get_method("average")([A, B], prior="base")
    spec = get_method("fisher_exact")
    assert spec.operator == "curvmerge.operators.ggn:GGNOperator"
    with pytest.raises(ValueError, match="needs no curvature operator"):
        get_method("ties").operator_class()


def test_registry_rows_carry_grids_and_statistics_needs():
    from curvmerge.merging.registry import get_method, list_methods, methods_table

    for spec in list_methods():
        points = spec.grid_points()  # every default point uses the method's own options
        assert points and all(isinstance(p, dict) for p in points)
        if spec.grid:
            result = (
                spec([A, B], base=BASE, curvatures=None, **points[-1])
                if (spec.statistics == "none")
                else None
            )
            assert result is None or set(result.params) == set(A)
        assert spec.needs == (
            (() if spec.statistics == "none" else (spec.statistics,))
            + (("base",) if spec.needs_base else ())
        )
    assert get_method("fisher_diagonal").needs == ("diagonal_fisher",)
    assert get_method("ties").needs == ("base",)
    assert [p["damping"] for p in get_method("fisher_exact").grid_points()] == [0.1, 0.01, 0.001]
    assert {s.name for s in list_methods() if s.equation} == {
        "average", "fisher_diagonal", "fisher_exact", "fisher_kfac"}  # fmt: skip
    # overrides: a list of points or a product of values; options are checked
    spec = get_method("fisher_diagonal")
    half = (0.5, 0.5)
    assert spec.grid_points({"damping": [1e-3, 1e-2], "weights": [half]}) == [
        {"damping": 1e-3, "weights": half},
        {"damping": 1e-2, "weights": half},
    ]
    assert spec.grid_points([{"damping": 1.0}]) == [{"damping": 1.0}]
    assert get_method("average").grid_points() == [{}]
    with pytest.raises(ValueError, match="no option 'dampng'.*damping"):
        spec.grid_points({"dampng": [1.0]})
    with pytest.raises(ValueError, match="grid 'damping' has no values"):
        spec.grid_points({"damping": []})
    assert "| ties | none | density ∈ {0.2, 0.5}, scaling ∈ {0.7, 1} |" in methods_table()


def test_another_methods_merge_as_the_prior():
    from curvmerge.merging.registry import get_method, method_prior
    from curvmerge.operators import DiagonalOperator
    from curvmerge.space import ParamSpace

    space = ParamSpace.from_tensors(A)
    # curvature on "w" only: "b" is a direction no Fisher sees and keeps the prior's value
    mask = torch.tensor([1.0] * 4 + [0.0] * 2, dtype=D)
    curv = [DiagonalOperator(space, c * mask) for c in (1.0, 3.0)]
    ta = task_arithmetic([A, B], BASE, scaling=0.5)
    for prior in ({"method": "task_arithmetic", "scaling": 0.5}, ta.params):
        out = get_method("fisher_diagonal")(
            [A, B], base=BASE, curvatures=curv, prior=prior, damping=1e-9, damping_scale=1.0
        )
        assert torch.allclose(out.params["b"], ta.params["b"], atol=1e-8)
        assert torch.allclose(out.params["w"], (A["w"] + 3 * B["w"]) / 4, atol=1e-6)
    # the default prior keeps the average there instead
    out = get_method("fisher_diagonal")([A, B], curvatures=curv, damping=1e-9, damping_scale=1.0)
    assert torch.allclose(out.params["b"], (A["b"] + B["b"]) / 2, atol=1e-8)
    assert method_prior("mean", [A, B]) == "mean"
    assert torch.equal(method_prior("task_arithmetic", [A, B], base=BASE)["w"],
                       task_arithmetic([A, B], BASE).params["w"])  # fmt: skip
    with pytest.raises(ValueError, match="neither 'mean', 'zero', 'base'.*merge method"):
        method_prior("task_arithmetc", [A, B], base=BASE)
    with pytest.raises(ValueError, match="only data-free merge methods"):
        method_prior("fisher_diagonal", [A, B])
    with pytest.raises(ValueError, match="needs the base model"):
        method_prior({"method": "ties"}, [A, B])


def test_scaled_methods_are_base_plus_scaling_times_one_delta():
    from curvmerge.merging.registry import list_methods, rescale

    C = _d(w=[[0.5, 1.0], [2.0, -1.0]], b=[0.0, 3.0])
    scaled = [s for s in list_methods() if s.scaled]
    assert {s.name for s in scaled} >= {"task_arithmetic", "ties", "tsv_merge", "iso_c"}
    for spec in scaled:
        unit = spec([A, B, C], base=BASE, scaling=1.0)
        for scaling in (0.3, 1.7):
            want = spec([A, B, C], base=BASE, scaling=scaling)
            got = rescale(unit, BASE, scaling)
            for n in want.params:
                assert torch.allclose(got.params[n], want.params[n], atol=1e-12), spec.name
            assert got.report.options["scaling"] == scaling
            assert got.report.weights == pytest.approx(want.report.weights)
            assert unit.report.options["scaling"] == 1.0  # the unit merge is not changed


def test_slerp_of_near_antipodal_float32_models_is_exact():
    """Two float32 unit vectors 1e-3 rad from antipodal: the midpoint of their great circle
    (float32 arccos near -1 misses it; the interpolation runs in float64)."""
    g = torch.Generator().manual_seed(0)
    u0 = torch.randn(1000, generator=g, dtype=D)
    u0 /= u0.norm()
    p = torch.randn(1000, generator=g, dtype=D)
    p -= (p @ u0) * u0
    p /= p.norm()
    angle = math.pi - 1e-3
    u1 = math.cos(angle) * u0 + math.sin(angle) * p
    exact = (u0 + u1) / (u0 + u1).norm()
    out = slerp([{"w": u0.float()}, {"w": u1.float()}], t=0.5).params["w"]
    assert out.dtype == torch.float32
    assert float((out.double() - exact).norm()) < 1e-4
