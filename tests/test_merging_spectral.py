"""TSV-M, Iso-C and Iso-CTS against hand-computed cases and independent numpy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.linalg import polar

from curvmerge.merging.methods import MethodReport
from curvmerge.merging.spectral import (
    iso_c,
    iso_cts,
    iso_cts_ranks,
    orthogonalize,
    tsv_merge,
)

DT = torch.float64
METHODS = [tsv_merge, iso_c, iso_cts]


def _models(deltas, base=None, name="w"):
    """Models ``base + delta`` as parameter dicts, and the base."""
    base = torch.zeros_like(deltas[0]) if base is None else base
    return [{name: base + d} for d in deltas], {name: base}


def _random(shape, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=DT) for _ in range(T)]


# --------------------------------------------------------------------- numpy references
def _np_polar(a):
    return polar(a)[0] if a.shape[0] >= a.shape[1] else polar(a.T)[0].T


def _np_tsv(deltas, k):
    parts_u, parts_s, parts_v = [], [], []
    for d in deltas:
        u, s, vt = np.linalg.svd(d, full_matrices=False)
        parts_u.append(u[:, :k])
        parts_s.append(s[:k])
        parts_v.append(vt[:k].T)
    u, s, v = np.hstack(parts_u), np.concatenate(parts_s), np.hstack(parts_v)
    return _np_polar(u) @ np.diag(s) @ _np_polar(v).T


def _np_iso_c(deltas):
    u, s, vt = np.linalg.svd(sum(deltas), full_matrices=False)
    return s.mean() * u @ vt


def _np_iso_cts(deltas, k_c, k_t):
    u, s, vt = np.linalg.svd(sum(deltas), full_matrices=False)
    us, ss, vs = [u[:, :k_c]], [s[:k_c]], [vt[:k_c].T]
    proj = u[:, :k_c] @ u[:, :k_c].T
    for d in deltas:
        ut, st, vtt = np.linalg.svd(d - proj @ d, full_matrices=False)
        us.append(ut[:, :k_t])
        ss.append(st[:k_t])
        vs.append(vtt[:k_t].T)
    su = np.concatenate(ss)
    return su.mean() * _np_polar(np.hstack(us)) @ _np_polar(np.hstack(vs)).T


# --------------------------------------------------------------------- TSV-M
def test_orthogonalize_is_the_polar_factor():
    for shape in [(5, 3), (3, 5), (4, 4)]:
        a = _random(shape, 1, seed=1)[0]
        q = orthogonalize(a)
        np.testing.assert_allclose(q.numpy(), _np_polar(a.numpy()), atol=1e-12)
        small = min(shape)
        gram = q.mT @ q if shape[0] >= shape[1] else q @ q.mT
        torch.testing.assert_close(gram, torch.eye(small, dtype=DT), atol=1e-12, rtol=0)


def test_orthogonalize_of_a_rank_deficient_matrix_is_its_partial_isometry():
    """:math:`a (a^\\top a)^{+1/2}`: the singular vectors of zero singular values are any
    completion (LAPACK's choice), so they must not enter the factor."""
    (b,) = _random((6, 2), 1, seed=4)
    a = torch.cat([b, b, b[:, :1]], dim=1)  # [6, 5] of rank 2
    vals, vecs = torch.linalg.eigh(a.mT @ a)
    inv_sqrt = torch.where(vals > 1e-10, vals.clamp_min(1e-300).rsqrt(), torch.zeros_like(vals))
    expected = a @ (vecs * inv_sqrt) @ vecs.mT
    torch.testing.assert_close(orthogonalize(a), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(orthogonalize(a.mT), expected.mT, atol=1e-12, rtol=0)
    assert orthogonalize(torch.zeros(3, 2, dtype=DT)).abs().max() == 0


def test_tsv_of_identical_models_stays_in_their_directions():
    """Two copies of one task matrix share their singular vectors: TSV-M keeps their top
    k triplets (the rank-k truncation), adding no direction the task does not have."""
    (d,) = _random((6, 4), 1, seed=7)
    models, base = _models([d, d])
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    truncation = (u[:, :2] * s[:2]) @ vh[:2]
    torch.testing.assert_close(tsv_merge(models, base).params["w"], truncation, atol=1e-12, rtol=0)
    # 1 x n matrices of parallel rows: the shared direction, with the mean length
    models, base = _models(
        [torch.tensor([[3.0, 0.0]], dtype=DT), torch.tensor([[1.0, 0.0]], dtype=DT)]
    )
    out = tsv_merge(models, base).params["w"]
    torch.testing.assert_close(out, torch.tensor([[2.0, 0.0]], dtype=DT), atol=1e-12, rtol=0)


def test_iso_cts_of_identical_models_stays_in_their_directions():
    (d,) = _random((6, 4), 1, seed=8)
    models, base = _models([d, d])
    out = iso_cts(models, base, common_fraction=0.5).params["w"]
    # common: top 2 directions; task-specific: the third, shared by both copies
    assert int(torch.linalg.matrix_rank(out)) == 3
    _, _, vh = torch.linalg.svd(d, full_matrices=False)
    torch.testing.assert_close(out @ vh[3], torch.zeros(6, dtype=DT), atol=1e-12, rtol=0)


def test_tsv_keeps_orthogonal_rank_one_tasks_exactly():
    e = torch.eye(4, dtype=DT)
    f = torch.eye(3, dtype=DT)
    d1 = 3.0 * torch.outer(e[0] + e[1], f[2]) / math.sqrt(2)
    d2 = -2.0 * torch.outer(e[0] - e[1], f[0] + f[1]) / 2
    models, base = _models([d1, d2], base=torch.full((4, 3), 0.5, dtype=DT))
    out = tsv_merge(models, base).params["w"]
    torch.testing.assert_close(out, 0.5 + d1 + d2, atol=1e-13, rtol=0)


def test_tsv_of_one_model_is_that_model():
    (d,) = _random((5, 4), 1, seed=2)
    models, base = _models([d])
    torch.testing.assert_close(tsv_merge(models, base).params["w"], d, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    ("shape", "T", "rank_fraction", "k"),
    [((2, 2), 2, None, 1), ((6, 5), 3, None, 1), ((6, 5), 2, 0.4, 2), ((4, 7), 3, 0.5, 2)],
)
def test_tsv_matches_numpy_reference(shape, T, rank_fraction, k):
    deltas = _random(shape, T, seed=3)
    models, base = _models(deltas)
    out = tsv_merge(models, base, rank_fraction=rank_fraction).params["w"]
    ref = _np_tsv([d.numpy() for d in deltas], k)
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-12)


def test_tsv_drops_tasks_that_did_not_change_a_layer():
    """A zero task matrix has arbitrary singular vectors: they must not rotate the others."""
    e, f = torch.eye(3, dtype=DT), torch.eye(4, dtype=DT)
    d1 = 2.0 * torch.outer(e[0] + e[2], f[1] - f[3]) / 2
    models, base = _models([d1, torch.zeros(3, 4, dtype=DT), torch.zeros(3, 4, dtype=DT)])
    torch.testing.assert_close(tsv_merge(models, base).params["w"], d1, atol=1e-13, rtol=0)


def test_tsv_weights_multiply_task_vectors():
    deltas = _random((5, 4), 2, seed=4)
    models, base = _models(deltas)
    out = tsv_merge(models, base, weights=[0.5, 2.0]).params["w"]
    ref = _np_tsv([0.5 * deltas[0].numpy(), 2.0 * deltas[1].numpy()], 2)
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-12)


# --------------------------------------------------------------------- Iso-C
def test_iso_c_of_diagonal_task_matrices():
    d1 = torch.diag(torch.tensor([3.0, 0.0, 0.0], dtype=DT))
    d2 = torch.diag(torch.tensor([0.0, 1.0, 2.0], dtype=DT))
    models, base = _models([d1, d2])
    out = iso_c(models, base).params["w"]
    torch.testing.assert_close(out, 2.0 * torch.eye(3, dtype=DT), atol=1e-13, rtol=0)


def test_iso_c_keeps_the_range_of_a_rank_deficient_sum():
    d1 = torch.diag(torch.tensor([3.0, 0.0, 0.0], dtype=DT))
    d2 = torch.diag(torch.tensor([0.0, 1.0, 0.0], dtype=DT))
    models, base = _models([d1, d2])
    expected = torch.diag(torch.tensor([2.0, 2.0, 0.0], dtype=DT))
    torch.testing.assert_close(iso_c(models, base).params["w"], expected, atol=1e-13, rtol=0)
    # cancelling tasks: the sum is zero and so is the merge, without NaN
    models, base = _models([d1, -d1])
    assert torch.equal(iso_c(models, base).params["w"], torch.zeros(3, 3, dtype=DT))


@pytest.mark.parametrize(("shape", "T"), [((2, 2), 2), ((6, 4), 3), ((3, 7), 2)])
def test_iso_c_matches_numpy_reference(shape, T):
    deltas = _random(shape, T, seed=5)
    models, base = _models(deltas)
    out = iso_c(models, base).params["w"]
    np.testing.assert_allclose(out.numpy(), _np_iso_c([d.numpy() for d in deltas]), atol=1e-12)


# --------------------------------------------------------------------- Iso-CTS
@pytest.mark.parametrize(
    ("rank", "T", "fraction", "expected"),
    [(768, 8, 0.8, (616, 19)), (5, 2, 0.6, (3, 1)), (4, 2, 0.5, (2, 1)), (5, 6, 0.1, (5, 0))],
)
def test_iso_cts_ranks(rank, T, fraction, expected):
    k_c, s = iso_cts_ranks(rank, T, fraction)
    assert (k_c, s) == expected
    assert k_c >= 0 and k_c + s * T == rank


@pytest.mark.parametrize(("shape", "T", "fraction"), [((6, 5), 2, 0.6), ((8, 9), 3, 0.5)])
def test_iso_cts_matches_numpy_reference(shape, T, fraction):
    deltas = _random(shape, T, seed=6)
    models, base = _models(deltas)
    out = iso_cts(models, base, common_fraction=fraction).params["w"]
    k_c, k_t = iso_cts_ranks(min(shape), T, fraction)
    assert k_t > 0
    ref = _np_iso_cts([d.numpy() for d in deltas], k_c, k_t)
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-12)


def test_iso_cts_with_full_common_space_is_iso_c():
    deltas = _random((5, 4), 3, seed=7)
    models, base = _models(deltas)
    torch.testing.assert_close(
        iso_cts(models, base, common_fraction=1.0).params["w"],
        iso_c(models, base).params["w"],
        atol=1e-12,
        rtol=0,
    )


def test_iso_cts_ignores_empty_task_specific_residuals():
    """Tasks inside the common subspace leave zero residuals: no direction is invented."""
    d1 = torch.diag(torch.tensor([3.0, 0.0, 0.0, 0.0], dtype=DT))
    d2 = torch.diag(torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=DT))
    models, base = _models([d1, d2])
    assert iso_cts_ranks(4, 2, 0.5) == (2, 1)
    out = iso_cts(models, base, common_fraction=0.5).params["w"]
    expected = torch.diag(torch.tensor([2.0, 2.0, 0.0, 0.0], dtype=DT))
    torch.testing.assert_close(out, expected, atol=1e-13, rtol=0)


# --------------------------------------------------------------------- shared behaviour
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("vector_merge", "factor"), [("mean", 0.5), ("sum", 1.0)])
def test_non_matrix_parameters_fall_back_exactly(method, vector_merge, factor):
    g = torch.Generator().manual_seed(8)
    base = {
        "w": torch.randn(3, 2, generator=g, dtype=DT),
        "b": torch.randn(3, generator=g, dtype=DT),
    }
    base["s"] = torch.tensor(0.25, dtype=DT)
    taus = [{k: torch.randn(v.shape, generator=g, dtype=DT) for k, v in base.items()} for _ in "ab"]
    models = [{k: base[k] + tau[k] for k in base} for tau in taus]
    w = [0.5, 3.0]
    out = method(models, base, scaling=0.7, weights=w, vector_merge=vector_merge).params
    for name in ("b", "s"):
        expected = base[name] + 0.7 * factor * (w[0] * taus[0][name] + w[1] * taus[1][name])
        torch.testing.assert_close(out[name], expected, atol=1e-14, rtol=0)
        assert out[name].shape == base[name].shape


@pytest.mark.parametrize("method", METHODS)
def test_conv_kernels_are_out_by_rest_matrices(method):
    deltas = _random((3, 2, 2, 2), 2, seed=9)
    models, base = _models(deltas)
    out = method(models, base).params["w"]
    flat_models, flat_base = _models([d.reshape(3, 8) for d in deltas])
    expected = method(flat_models, flat_base).params["w"].reshape(3, 2, 2, 2)
    assert out.shape == (3, 2, 2, 2)
    torch.testing.assert_close(out, expected, atol=1e-13, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_scaling_is_linear(method):
    deltas = _random((4, 3), 3, seed=10)
    models, base = _models(deltas, base=torch.ones(4, 3, dtype=DT))
    one = method(models, base, scaling=1.0).params["w"] - 1.0
    for s in (0.0, 0.3, 2.5, -1.0):
        out = method(models, base, scaling=s).params["w"] - 1.0
        torch.testing.assert_close(out, s * one, atol=1e-13, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_symmetric_in_the_models(method):
    deltas = _random((5, 4), 3, seed=11)
    models, base = _models(deltas)
    w = [0.2, 1.0, 2.0]
    a = method(models, base, weights=w).params["w"]
    b = method(models[::-1], base, weights=w[::-1]).params["w"]
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dtype_and_shape_preserved(method, dtype):
    deltas = _random((6, 4), 2, seed=12)
    models, base = _models(deltas)
    low = [{k: v.to(dtype) for k, v in m.items()} for m in models]
    out = method(low, {"w": base["w"].to(dtype)}).params["w"]
    assert out.dtype == dtype and out.shape == (6, 4)
    ref = method(models, base).params["w"]
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.to(DT), ref, atol=tol * float(ref.abs().max()), rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_module_inputs_and_params_selection(method):
    torch.manual_seed(13)
    nets = [torch.nn.Linear(3, 2).double() for _ in range(3)]
    out = method(nets[1:], nets[0], params="weight")
    assert set(out.params) == {"weight"}
    assert isinstance(out.report, MethodReport)
    assert out.report.method == method.__name__ and out.report.num_models == 2


@pytest.mark.parametrize("method", METHODS)
def test_bad_inputs_raise(method):
    models, base = _models(_random((3, 3), 2))
    with pytest.raises(ValueError, match="base"):
        method(models, None)
    with pytest.raises(ValueError, match="vector_merge"):
        method(models, base, vector_merge="max")
    with pytest.raises(ValueError, match="weights"):
        method(models, base, weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="scaling"):
        method(models, base, scaling=float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        method([models[0], {"w": torch.full((3, 3), float("nan"), dtype=DT)}], base)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan"), float("inf")])
def test_bad_fractions_raise(bad):
    models, base = _models(_random((3, 3), 2))
    with pytest.raises(ValueError, match="rank_fraction"):
        tsv_merge(models, base, rank_fraction=bad)
    with pytest.raises(ValueError, match="common_fraction"):
        iso_cts(models, base, common_fraction=bad)


def test_report_options():
    models, base = _models(_random((3, 3), 4))
    rep = tsv_merge(models, base, scaling=0.5).report
    assert rep.options == {"scaling": 0.5, "rank_fraction": 0.25, "vector_merge": "mean"}
    assert rep.weights == [0.5] * 4
    rep = iso_cts(models, base, common_fraction=0.6, vector_merge="sum").report
    assert rep.options == {"scaling": 1.0, "common_fraction": 0.6, "vector_merge": "sum"}
    assert "iso_c merge of 4 models" in str(iso_c(models, base).report)


def test_low_rank_float32_task_matrices_keep_only_their_range():
    """LoRA-like rank-2 products stored in float32: their rounding-level singular values are
    noise and must neither rotate the other task (TSV-M) nor get the isotropic value (Iso-C)."""
    g = torch.Generator().manual_seed(14)
    deltas = [
        torch.randn(16, 2, generator=g, dtype=DT) @ torch.randn(2, 12, generator=g, dtype=DT)
        for _ in range(2)
    ]
    low = [d.float() for d in deltas]
    models, base = _models(low)
    exact = [d.float().double().numpy() for d in low]
    out = tsv_merge(models, base).params["w"]  # keeps k = 6 triplets per task, 2 are real
    ref = _np_tsv(exact, 2)
    np.testing.assert_allclose(out.double().numpy(), ref, atol=1e-5 * np.abs(ref).max())
    out = iso_c(models, base).params["w"]
    u, s, vt = np.linalg.svd(sum(exact), full_matrices=False)
    ref = s[:4].mean() * u[:, :4] @ vt[:4]
    np.testing.assert_allclose(out.double().numpy(), ref, atol=1e-5 * np.abs(ref).max())
