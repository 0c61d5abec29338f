"""GPU paths (issue 14, item 4): every engine on a CUDA device against float64 CPU references.

Marked ``gpu`` and skipped ("needs a CUDA GPU") where ``torch.cuda.is_available()`` is false,
so the default run (``make test``) passes on CPU-only machines and CI. A GPU machine runs them
with ``pytest -m gpu tests/test_gpu.py`` (part of ``benchmarks/gpu_check.sh``).
``CURVMERGE_GPU_TEST_DEVICE=cpu`` runs the same tests with the CPU as the device under test
(float32 on the CPU against the same float64 references): a dry run of the tests' own code
on a machine without a GPU.

The device runs float32 with TF32 off (cuDNN would otherwise run convolutions in TF32, 10-bit
mantissas); the references are float64 copies of the same weights and data on the CPU.
Tolerances (relative errors in norm, unless stated):

- GGN products (vector, ``[P, 3]`` block, diagonal; cached and streaming), diagonal Fisher
  (exact, empirical), input Grams, K-FAC factors of an MLP, a CNN and a tiny BERT: 1e-4
  (float32 on the CPU gives at most 7e-7 here; the margin is for cuDNN's float32 algorithms,
  Winograd or FFT, and atomic adds; TF32, about 1e-3, or half precision would fail it);
- CG on the device (``curvmerge.cg`` on a damped GGN operator, condition number about 500,
  to rtol 1e-4): 1e-3 of the float64 dense solve; an exact-Fisher merge by CG (rtol 1e-5,
  relative damping 0.1; its reported true residual below 1e-4): merged parameters 1e-3;
  RegMean (its solve runs in float64 from float32 Grams): 1e-4;
- AdaMerging and weight ensembling (5 Adam steps from float32 gradients; Adam steps by about
  ``lr`` in sign, so a gradient entry below float32 noise could flip one): learned
  coefficients within 1e-4 (absolute), merged parameters and outputs within 1e-4.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from curvmerge import (
    GGNOperator,
    IdentityOperator,
    adamerging,
    cg,
    diagonal_fisher,
    input_grams,
    kfac_factors,
    merge,
    regmean,
    weight_ensembling,
)
from curvmerge.memory import PeakMemory
from curvmerge.models import make_cnn, make_mlp

DEVICE = torch.device(os.environ.get("CURVMERGE_GPU_TEST_DEVICE", "cuda"))
F64 = torch.float64
BODY = r"^body\."
#: float32 on the device against float64 on the CPU (see the module docstring)
TOL = 1e-4

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE.type == "cuda" and not torch.cuda.is_available(),
        reason="needs a CUDA GPU (torch.cuda.is_available() is False)",
    ),
]


@pytest.fixture(autouse=True)
def no_tf32():
    """float32 on the device, not TF32 (convolutions and matrix products)."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error in norm of a device result against a float64 CPU reference."""
    return float((a.detach().cpu().to(F64) - ref).norm() / ref.norm())


def to_device(batches, dtype=torch.float32):
    """Batches on the device, floating tensors in ``dtype``."""

    def move(t):
        if isinstance(t, dict):
            return {k: move(v) for k, v in t.items()}
        return t.to(DEVICE, dtype) if t.is_floating_point() else t.to(DEVICE)

    return [(move(x), move(y)) for x, y in batches]


# --------------------------------------------------------------------------- problems
def mlp_problem(seed=0):
    model = make_mlp(12, 4, hidden=(16,), seed=seed).double()
    g = torch.Generator().manual_seed(100 + seed)
    data = [(torch.randn(8, 12, generator=g, dtype=F64), torch.randint(0, 4, (8,), generator=g))
            for _ in range(3)]  # fmt: skip
    return model, data


def cnn_problem(seed=0):
    model = make_cnn(4, image_size=8, channels=(4, 6), hidden=10, seed=seed).double()
    g = torch.Generator().manual_seed(200 + seed)
    x = torch.randn(12, 1, 8, 8, generator=g, dtype=F64)
    y = torch.randint(0, 4, (12,), generator=g)
    data = [(x[:6], y[:6]), (x[6:], y[6:])]
    return model, data


def bert_problem(seed=0):
    pytest.importorskip("transformers")
    from curvmerge.models import tiny_bert

    model = tiny_bert(3, vocab_size=40, hidden_size=16, num_layers=2, seed=seed).double()
    g = torch.Generator().manual_seed(300 + seed)
    data = []
    for _ in range(2):
        ids = torch.randint(1, 40, (4, 7), generator=g)
        mask = torch.ones(4, 7, dtype=torch.long)
        mask[0, 5:] = 0  # padding
        data.append(
            ({"input_ids": ids, "attention_mask": mask}, torch.randint(0, 3, (4,), generator=g))
        )
    return model, data


PROBLEMS = {"mlp": mlp_problem, "cnn": cnn_problem, "bert": bert_problem}


def pair(name, seed=0):
    """(float64 CPU model, its data, float32 device copy, its data)."""
    model, data = PROBLEMS[name](seed)
    dev = copy.deepcopy(model).float().to(DEVICE)
    return model, data, dev, to_device(data)


# --------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("name", list(PROBLEMS))
@pytest.mark.parametrize("cache", [True, False])
def test_ggn_products_match_float64_cpu(name, cache):
    model, data, dev, ddata = pair(name)
    ref = GGNOperator(model, nn.CrossEntropyLoss(), data)
    op = GGNOperator(dev, nn.CrossEntropyLoss(), ddata, cache=cache)
    assert op.device.type == DEVICE.type and op.dtype == torch.float32
    g = torch.Generator().manual_seed(1)
    V = torch.randn(ref.shape[0], 3, generator=g, dtype=F64)
    out = op @ V[:, 0].to(DEVICE, torch.float32)
    assert out.device.type == DEVICE.type
    assert rel(out, ref @ V[:, 0]) < TOL
    assert rel(op @ V.to(DEVICE, torch.float32), ref @ V) < TOL
    assert rel(op.diagonal(), ref.diagonal()) < TOL


@pytest.mark.parametrize("name", list(PROBLEMS))
@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_diagonal_fisher_matches_float64_cpu(name, kind):
    model, data, dev, ddata = pair(name)
    ref = diagonal_fisher(model, nn.CrossEntropyLoss(), data, kind=kind, progress=False)
    F = diagonal_fisher(dev, nn.CrossEntropyLoss(), ddata, kind=kind, progress=False)
    d = F.diagonal()
    assert d.device.type == DEVICE.type and d.dtype == torch.float32
    assert F.num_examples == ref.num_examples
    assert rel(d, ref.diagonal()) < TOL


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_input_grams_and_kfac_factors_match_float64_cpu(name):
    model, data, dev, ddata = pair(name)
    g_ref, g = input_grams(model, data), input_grams(dev, ddata)
    assert set(g.grams) == set(g_ref.grams) and g.num_rows == g_ref.num_rows
    for layer, G in g.grams.items():
        assert G.device.type == DEVICE.type and G.dtype == torch.float32
        assert rel(G, g_ref.grams[layer]) < TOL, layer
    for kind in ("exact", "empirical"):
        k_ref = kfac_factors(model, nn.CrossEntropyLoss(), data, kind=kind)
        k = kfac_factors(dev, nn.CrossEntropyLoss(), ddata, kind=kind)
        assert set(k.A) == set(k_ref.A)
        for layer in k.A:
            assert k.A[layer].device.type == DEVICE.type
            assert rel(k.A[layer], k_ref.A[layer]) < TOL, (kind, layer)
            assert rel(k.B[layer], k_ref.B[layer]) < TOL, (kind, layer)


# --------------------------------------------------------------------------- solves and merges
def test_cg_on_a_device_operator_matches_a_float64_dense_solve():
    model, data, dev, ddata = pair("mlp")
    ref = GGNOperator(model, nn.CrossEntropyLoss(), data)
    damping = 0.1 * float(ref.diagonal().mean())  # condition number about 500
    A_dense = ref.to_dense() + damping * torch.eye(ref.shape[0], dtype=F64)
    b = torch.randn(ref.shape[0], generator=torch.Generator().manual_seed(2), dtype=F64)
    x_ref = torch.linalg.solve(A_dense, b)
    op = GGNOperator(dev, nn.CrossEntropyLoss(), ddata)
    A = op + damping * IdentityOperator(op.space, dtype=torch.float32, device=DEVICE)
    x, info = cg(A, b.to(DEVICE, torch.float32), rtol=1e-4, maxiter=2000)
    assert info == 0 and x.device.type == DEVICE.type
    assert rel(x, x_ref) < 1e-3


def _task_models(n=3):
    """Fine-tuned MLPs: one base body perturbed per task, own heads, float64 on the CPU."""
    base, _ = mlp_problem(0)
    models = []
    for t in range(n):
        m = copy.deepcopy(base)
        m.head = make_mlp(12, 3 + t, hidden=(16,), seed=10 + t).head.double()
        g = torch.Generator().manual_seed(20 + t)
        with torch.no_grad():
            for p in m.body.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=F64))
        models.append(m.eval())
    data = []
    for t, m in enumerate(models):
        g = torch.Generator().manual_seed(30 + t)
        classes = m.head.out_features
        data.append([(torch.randn(8, 12, generator=g, dtype=F64),
                      torch.randint(0, classes, (8,), generator=g)) for _ in range(2)])  # fmt: skip
    return base, models, data


def _on_device(models):
    return [copy.deepcopy(m).float().to(DEVICE) for m in models]


def test_exact_fisher_merge_by_cg_matches_float64_cpu():
    _, models, data = _task_models()
    loss = nn.CrossEntropyLoss()
    ops_ref = [GGNOperator(m, loss, d, params=BODY) for m, d in zip(models, data)]
    ref = merge(models, ops_ref, damping=0.1, rtol=1e-10)
    dev = _on_device(models)
    ops = [GGNOperator(m, loss, to_device(d), params=BODY) for m, d in zip(dev, data)]
    res = merge(dev, ops, damping=0.1, rtol=1e-5, maxiter=2000)
    assert res.report.relative_residual < 1e-4 and res.report.products > 0
    flat = torch.cat([res.params[n].reshape(-1).cpu() for n in ref.params])
    flat_ref = torch.cat([ref.params[n].reshape(-1) for n in ref.params])
    assert {t.device.type for t in res.params.values()} == {DEVICE.type}
    assert rel(flat, flat_ref) < 1e-3
    # the merge moved away from plain averaging: the comparison is not vacuous
    avg = merge(models, params=BODY).params
    flat_avg = torch.cat([avg[n].reshape(-1) for n in ref.params])
    assert float((flat_ref - flat_avg).norm() / flat_ref.norm()) > 10 * 1e-3


def test_regmean_from_device_grams_matches_float64_cpu():
    _, models, data = _task_models()
    ref = regmean(models, [input_grams(m, d, params=BODY) for m, d in zip(models, data)],
                  params=BODY)  # fmt: skip
    dev = _on_device(models)
    grams = [input_grams(m, to_device(d), params=BODY) for m, d in zip(dev, data)]
    res = regmean(dev, grams, params=BODY)
    assert {t.device.type for t in res.params.values()} == {DEVICE.type}
    for n, p in ref.params.items():
        assert rel(res.params[n], p) < TOL, n


def test_adamerging_runs_with_models_on_the_device():
    base, models, data = _task_models()
    kw = dict(steps=5, lr=1e-2, params=BODY, seed=0)
    ref = adamerging(models, base, data, **kw)
    res = adamerging(_on_device(models), copy.deepcopy(base).float().to(DEVICE),
                     [to_device(d) for d in data], **kw)  # fmt: skip
    assert {t.device.type for t in res.params.values()} == {DEVICE.type}
    lam, lam_ref = torch.tensor(res.report.coefficients), torch.tensor(ref.report.coefficients)
    assert float((lam_ref - 0.3).abs().max()) > 1e-2  # it moved from init: not vacuous
    torch.testing.assert_close(lam.double(), lam_ref.double(), rtol=0, atol=1e-4)
    for n, p in ref.params.items():
        assert rel(res.params[n], p) < TOL, n


def test_weight_ensembling_runs_with_models_on_the_device():
    base, models, data = _task_models()
    kw = dict(steps=5, lr=1e-2, params=BODY, seed=0, hidden=8)
    ref = weight_ensembling(models, base, data, **kw)
    res = weight_ensembling(_on_device(models), copy.deepcopy(base).float().to(DEVICE),
                            [to_device(d) for d in data], **kw)  # fmt: skip
    lam, lam_ref = torch.tensor(res.report.coefficients), torch.tensor(ref.report.coefficients)
    torch.testing.assert_close(lam.double(), lam_ref.double(), rtol=0, atol=1e-4)
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(9), dtype=F64)
    for k in range(len(models)):
        out = res.task_model(k)(x.to(DEVICE, torch.float32))
        assert out.device.type == DEVICE.type
        assert rel(out, ref.task_model(k)(x)) < TOL


# --------------------------------------------------------------------------- memory
def test_peak_memory_sees_a_large_device_allocation():
    with PeakMemory(DEVICE) as big:
        x = torch.ones(64 * 2**20, device=DEVICE)  # 256 MiB, touched
        del x
    with PeakMemory(DEVICE) as small:
        y = torch.ones(10, device=DEVICE)
        del y
    if DEVICE.type != "cuda" and big.peak is None:  # CPU dry run where /proc is not readable
        pytest.skip("the CPU peak cannot be read here")
    assert big.peak is not None and big.peak >= 250 * 2**20
    assert small.peak is not None and small.peak < 16 * 2**20
