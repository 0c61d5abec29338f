"""Sequential SLERP and the spherical barycenter against SLERP and closed forms."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from curvmerge.merging.methods import slerp
from curvmerge.merging.report import ConvergenceWarning
from curvmerge.merging.spherical import karcher_mean, slerp_sequential, spherical_barycenter

DT = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _random_models(T, seed=0, shapes=None):
    g = _gen(seed)
    shapes = shapes or {"a": (3, 4), "b": (5,)}
    return [{k: torch.randn(s, generator=g, dtype=DT) for k, s in shapes.items()} for _ in range(T)]


def _plane(n, seed=0):
    """Two orthonormal vectors of R^n."""
    q, _ = torch.linalg.qr(torch.randn(n, 2, generator=_gen(seed), dtype=DT))
    return q[:, 0], q[:, 1]


def _close(a, b, atol=1e-12):
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0)


# --------------------------------------------------------------------- sequential SLERP
@pytest.mark.parametrize("per_tensor", [True, False])
@pytest.mark.parametrize("with_base", [False, True])
def test_sequential_of_two_is_slerp(per_tensor, with_base):
    a, b, base = _random_models(3, seed=1)
    base = base if with_base else None
    for w in ([1.0, 1.0], [0.3, 0.7], [2.0, 0.5]):
        seq = slerp_sequential([a, b], weights=w, base=base, per_tensor=per_tensor)
        ref = slerp([a, b], weights=w, base=base, per_tensor=per_tensor)
        _close(seq.params, ref.params, atol=1e-14)


def test_sequential_endpoints_and_single_model():
    a, b = _random_models(2, seed=2)
    _close(slerp_sequential([a, b], weights=[1.0, 0.0]).params, a, atol=0)
    _close(slerp_sequential([a, b], weights=[0.0, 1.0]).params, b, atol=0)
    _close(slerp_sequential([a]).params, a, atol=0)


def test_sequential_on_a_line_is_the_weighted_mean():
    d = torch.randn(6, generator=_gen(3), dtype=DT)
    scales, w = [1.0, 2.5, 0.5, 4.0], [1.0, 2.0, 0.5, 1.5]
    models = [{"w": c * d} for c in scales]
    out = slerp_sequential(models, weights=w).params["w"]
    expected = sum(wi * c for wi, c in zip(w, scales, strict=True)) / sum(w) * d
    torch.testing.assert_close(out, expected, atol=1e-13, rtol=0)


def test_sequential_three_orthonormal_vectors():
    """m_2 = slerp(e1, e2; 1/2), m_3 = slerp(m_2, e3; 1/3): a closed form on the sphere."""
    e = torch.eye(3, dtype=DT)
    out = slerp_sequential([{"w": e[0]}, {"w": e[1]}, {"w": e[2]}]).params["w"]
    m2 = (e[0] + e[1]) / math.sqrt(2)
    omega = math.pi / 2  # m2 is orthogonal to e3
    m3 = (math.sin(2 / 3 * omega) * m2 + math.sin(1 / 3 * omega) * e[2]) / math.sin(omega)
    torch.testing.assert_close(out, m3, atol=1e-15, rtol=0)
    rep = slerp_sequential([{"w": e[0]}, {"w": e[1]}], weights=[1.0, 3.0]).report
    assert rep.method == "slerp_sequential" and rep.weights == [0.25, 0.75]


# --------------------------------------------------------------------- barycenter
@pytest.mark.parametrize("t", [0.0, 0.2, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("per_tensor", [True, False])
def test_barycenter_of_two_is_slerp(t, per_tensor):
    a, b = _random_models(2, seed=4)
    b = {k: 3.0 * v for k, v in b.items()}  # unequal norms: SLERP interpolates them linearly
    bary = spherical_barycenter([a, b], weights=[1 - t, t], per_tensor=per_tensor)
    ref = slerp([a, b], t=t, per_tensor=per_tensor)
    _close(bary.params, ref.params, atol=1e-12)
    assert bary.report.options["converged"]


def test_barycenter_on_a_great_circle_is_the_mean_angle():
    n = 7
    e, f = _plane(n, seed=5)
    g = _gen(6)
    phis = 0.4 + 1.2 * torch.rand(5, generator=g, dtype=DT)  # within a quarter circle
    norms = 0.5 + torch.rand(5, generator=g, dtype=DT)
    w = (0.1 + torch.rand(5, generator=g, dtype=DT)).tolist()
    models = [{"w": r * (math.cos(p) * e + math.sin(p) * f)} for p, r in zip(phis, norms)]
    out = spherical_barycenter(models, weights=w)
    wt = torch.tensor(w, dtype=DT) / sum(w)
    phi, norm = float(wt @ phis), float(wt @ norms)
    expected = norm * (math.cos(phi) * e + math.sin(phi) * f)
    torch.testing.assert_close(out.params["w"], expected, atol=1e-12, rtol=0)
    assert out.report.options["converged"] and out.report.options["iterations"] >= 1


def test_barycenter_of_symmetric_points_is_their_axis():
    """Three points at polar angle alpha around an axis, equal weights: the axis."""
    alpha = 1.1
    axis = torch.tensor([0.0, 0.0, 1.0], dtype=DT)
    pts = [
        torch.tensor(
            [math.sin(alpha) * math.cos(b), math.sin(alpha) * math.sin(b), math.cos(alpha)],
            dtype=DT,
        )
        for b in (0.0, 2 * math.pi / 3, 4 * math.pi / 3)
    ]
    out = spherical_barycenter([{"w": 2.0 * p} for p in pts]).params["w"]
    torch.testing.assert_close(out, 2.0 * axis, atol=1e-12, rtol=0)


def test_karcher_mean_is_stationary_and_minimal():
    g = _gen(7)
    u = torch.randn(6, 5, generator=g, dtype=DT) + 3.0 * torch.ones(5, dtype=DT)
    u = u / u.norm(dim=1, keepdim=True)
    w = torch.rand(6, generator=g, dtype=DT)
    w = w / w.sum()
    x, _, ok = karcher_mean(u, w, tol=1e-13)
    assert ok and abs(float(x.norm()) - 1) < 1e-14

    def cost(y):
        y = y / y.norm()
        return float(w @ torch.arccos(torch.clamp(u @ y, -1, 1)) ** 2)

    for _ in range(20):
        assert cost(x) <= cost(x + 1e-4 * torch.randn(5, generator=g, dtype=DT)) + 1e-15


def test_barycenter_is_symmetric_in_the_models():
    models = _random_models(4, seed=8)
    w = [0.1, 0.4, 1.0, 2.0]
    perm = [2, 0, 3, 1]
    a = spherical_barycenter(models, weights=w).params
    b = spherical_barycenter([models[i] for i in perm], weights=[w[i] for i in perm]).params
    _close(a, b, atol=1e-12)


def test_barycenter_of_one_model_is_that_model():
    (a,) = _random_models(1, seed=9)
    _close(spherical_barycenter([a]).params, a, atol=0)
    b, c = _random_models(2, seed=10)
    _close(spherical_barycenter([b, c], weights=[0.0, 2.0]).params, c, atol=0)


def test_barycenter_of_identical_models():
    (a,) = _random_models(1, seed=11)
    out = spherical_barycenter([a, a, a], weights=[1.0, 2.0, 3.0])
    _close(out.params, a, atol=1e-14)
    assert out.report.options["converged"] and out.report.options["linear_fallbacks"] == 0


def test_opposite_models_fall_back_to_the_linear_mean():
    v = torch.randn(5, generator=_gen(12), dtype=DT)
    out = spherical_barycenter([{"w": v}, {"w": -v}])
    torch.testing.assert_close(out.params["w"], torch.zeros(5, dtype=DT), atol=1e-15, rtol=0)
    assert out.report.options["linear_fallbacks"] == 1
    # unequal weights: no unique mean either (any great circle through them), still linear
    out = spherical_barycenter([{"w": v}, {"w": -2.0 * v}], weights=[0.7, 0.3]).params["w"]
    torch.testing.assert_close(out, 0.7 * v - 0.6 * v, atol=1e-14, rtol=0)
    # points spread evenly on a circle balance around the origin
    e, f = _plane(4, seed=13)
    angles = (0.0, 2 * math.pi / 3, 4 * math.pi / 3)
    ring = [{"w": math.cos(p) * e + math.sin(p) * f} for p in angles]
    out = spherical_barycenter(ring)
    assert float(out.params["w"].norm()) < 1e-14
    assert out.report.options["linear_fallbacks"] == 1


def test_zero_tensors():
    v = torch.randn(4, generator=_gen(14), dtype=DT)
    zero = torch.zeros(4, dtype=DT)
    # a zero vector has no direction but counts, with norm 0, in the mean norm (as SLERP)
    out = spherical_barycenter([{"w": v}, {"w": zero}], weights=[0.6, 0.4]).params["w"]
    torch.testing.assert_close(out, 0.6 * v, atol=1e-15, rtol=0)
    ref = slerp([{"w": v}, {"w": zero}], weights=[0.6, 0.4]).params["w"]
    torch.testing.assert_close(out, ref, atol=1e-15, rtol=0)
    out = spherical_barycenter([{"w": zero}, {"w": zero}, {"w": zero}]).params["w"]
    assert torch.equal(out, zero)
    for res in (
        spherical_barycenter([{"w": zero}, {"w": v}, {"w": -v}]),
        slerp_sequential([{"w": zero}, {"w": v}, {"w": -v}]),
        slerp_sequential([{"w": zero}, {"w": zero}]),
    ):
        assert torch.isfinite(res.params["w"]).all()


def test_barycenter_with_base_averages_task_vectors():
    a, b, c, base = _random_models(4, seed=15)
    out = spherical_barycenter([a, b, c], base=base, weights=[1.0, 2.0, 1.0]).params
    taus = [{k: m[k] - base[k] for k in base} for m in (a, b, c)]
    ref = spherical_barycenter(taus, weights=[1.0, 2.0, 1.0]).params
    _close(out, {k: base[k] + ref[k] for k in base}, atol=1e-13)


def test_per_tensor_and_whole_vector():
    models = _random_models(3, seed=16)
    per = spherical_barycenter(models, per_tensor=True).params
    whole = spherical_barycenter(models, per_tensor=False).params
    assert not torch.allclose(per["a"], whole["a"])
    one = [{"a": m["a"]} for m in models]
    _close(spherical_barycenter(one, per_tensor=False).params, {"a": per["a"]}, atol=1e-12)


def test_not_converged_warns_with_the_tensor_name():
    models = _random_models(4, seed=17)
    with pytest.warns(ConvergenceWarning) as record:
        out = spherical_barycenter(models, maxiter=1, tol=1e-14)
    messages = {str(r.message) for r in record}
    assert messages == {
        f"spherical_barycenter: tensor {n!r} did not converge in 1 steps (tol=1e-14); "
        "using the last iterate"
        for n in ("a", "b")
    }
    with pytest.warns(ConvergenceWarning, match="the flattened parameters did not converge"):
        spherical_barycenter(models, maxiter=1, tol=1e-14, per_tensor=False)
    assert not out.report.options["converged"]
    assert out.report.options["iterations"] == 1
    assert all(torch.isfinite(v).all() for v in out.params.values())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert spherical_barycenter(models).report.options["converged"]


def test_dtype_and_report():
    models = [{k: v.float() for k, v in m.items()} for m in _random_models(3, seed=18)]
    out = spherical_barycenter(models, weights=[1.0, 1.0, 2.0])
    assert all(v.dtype == torch.float32 for v in out.params.values())
    assert out.params["a"].shape == (3, 4)
    ref = spherical_barycenter(_random_models(3, seed=18), weights=[1.0, 1.0, 2.0]).params
    _close({k: v.double() for k, v in out.params.items()}, ref, atol=1e-6)
    opts = out.report.options
    assert out.report.weights == [0.25, 0.25, 0.5]
    assert set(opts) == {
        "per_tensor",
        "tol",
        "maxiter",
        "iterations",
        "converged",
        "linear_fallbacks",
    }


def test_bad_inputs_raise():
    models = _random_models(2)
    for fn in (slerp_sequential, spherical_barycenter):
        with pytest.raises(ValueError, match="weights"):
            fn(models, weights=[1.0, -1.0])
        with pytest.raises(ValueError, match="non-empty"):
            fn([])
    with pytest.raises(ValueError, match="tol"):
        spherical_barycenter(models, tol=0.0)
    with pytest.raises(ValueError, match="maxiter"):
        spherical_barycenter(models, maxiter=0)


def test_sequential_near_antipodal_float32_models_are_exact():
    """Two float32 vectors 1e-3 rad from antipodal: the midpoint of their great circle, as
    the float64 barycenter finds it (float32 arccos near -1 missed it by 2%)."""
    g = torch.Generator().manual_seed(0)
    u0 = torch.randn(1000, generator=g, dtype=torch.float64)
    u0 /= u0.norm()
    p = torch.randn(1000, generator=g, dtype=torch.float64)
    p -= (p @ u0) * u0
    p /= p.norm()
    angle = math.pi - 1e-3
    u1 = math.cos(angle) * u0 + math.sin(angle) * p
    exact = (u0 + u1) / (u0 + u1).norm()
    a, b = {"w": u0.float()}, {"w": u1.float()}
    out = slerp_sequential([a, b]).params["w"]
    assert out.dtype == torch.float32
    assert float((out.double() - exact).norm()) < 1e-4
