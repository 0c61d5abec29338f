"""K-FAC factors against curvlinops' KFACLinearOperator, factors built by hand, and a K-FAC
merge against a dense solve."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvmerge
from curvmerge import ParamSpace
from curvmerge.operators import KroneckerOperator
from curvmerge.statistics.kfac import kfac_factors
from tests.helpers import Conv1D

DT = torch.float64


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 2, 2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 16, 3)
    ).double()


def _data(loss, seed=1, shape=(3,)):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(7, *shape, generator=g, dtype=DT)
    if isinstance(loss, nn.CrossEntropyLoss):
        y = torch.randint(0, 3, (7,), generator=g)
    else:
        y = torch.randn(7, 3, generator=g, dtype=DT)
    return [(X[:4], y[:4]), (X[4:], y[4:])]


def _curvlinops_dense(model, loss, data, fisher_type):
    from curvlinops import KFACLinearOperator

    params = list(model.parameters())
    K = KFACLinearOperator(
        model,
        loss,
        params,
        data,
        fisher_type=fisher_type,
        separate_weight_and_bias=False,
        check_deterministic=False,
    )
    P = sum(p.numel() for p in params)
    return K @ torch.eye(P, dtype=DT)


CASES = [
    ("mlp", nn.CrossEntropyLoss(), "exact", "type-2"),
    ("mlp", nn.CrossEntropyLoss(), "empirical", "empirical"),
    ("mlp", nn.CrossEntropyLoss(reduction="sum"), "exact", "type-2"),
    ("mlp", nn.MSELoss(), "exact", "type-2"),
    ("mlp", nn.MSELoss(), "empirical", "empirical"),
    ("mlp", nn.MSELoss(reduction="sum"), "empirical", "empirical"),
    ("cnn", nn.CrossEntropyLoss(), "exact", "type-2"),
    ("cnn", nn.CrossEntropyLoss(), "empirical", "empirical"),
]


@pytest.mark.parametrize(("net", "loss", "kind", "fisher_type"), CASES)
def test_products_equal_curvlinops_kfac(net, loss, kind, fisher_type):
    model = _mlp() if net == "mlp" else _cnn()
    data = _data(loss, shape=(3,) if net == "mlp" else (2, 3, 3))
    factors = kfac_factors(model, loss, data, kind=kind)
    K = KroneckerOperator.from_kfac(ParamSpace.from_module(model), factors)
    ref = _curvlinops_dense(model, loss, data, fisher_type)
    torch.testing.assert_close(K.to_dense(), ref, rtol=1e-10, atol=1e-12)
    assert factors.A["0"].dtype == DT and factors.num_examples == 7


def test_factors_equal_formulas_by_hand():
    model = _mlp()
    data = _data(nn.CrossEntropyLoss())
    f = kfac_factors(model, "cross_entropy", data, kind="exact")
    X = torch.cat([x for x, _ in data])
    N = X.shape[0]
    Xa = torch.cat([X, torch.ones(N, 1, dtype=DT)], 1)
    with torch.no_grad():
        z = torch.tanh(model[0](X))
        p = model(X).softmax(-1)
    Za = torch.cat([z, torch.ones(N, 1, dtype=DT)], 1)
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # [N, C, C]
    J = model[2].weight.detach()[None] * (1 - z**2)[:, None, :]  # d f / d h1, [N, C, 4]
    c = 1.0 / N
    torch.testing.assert_close(f.A["0"], Xa.T @ Xa / N)
    torch.testing.assert_close(f.A["2"], Za.T @ Za / N)
    torch.testing.assert_close(f.B["2"], c * H.sum(0))
    torch.testing.assert_close(f.B["0"], c * (J.transpose(1, 2) @ H @ J).sum(0))
    assert f.num_rows == {"0": N, "2": N} and f.num_terms == N
    # the operator is the dense Kronecker product of these factors, laid out [W | b]
    K = KroneckerOperator.from_kfac(ParamSpace.from_module(model), f)
    D2 = torch.kron(c * H.sum(0), Za.T @ Za / N)  # row-major vec of the joint [W2 b2]
    # 0.weight (12), 0.bias (4), then 2.weight at 16 and 2.bias at 28
    idx = [16 + (o * 4 + j if j < 4 else 12 + o) for o in range(3) for j in range(5)]
    idx = torch.tensor(idx)
    torch.testing.assert_close(K.to_dense()[idx[:, None], idx[None, :]], D2)


def test_mc_is_seeded_and_approaches_exact():
    model = _mlp()
    data = _data(nn.CrossEntropyLoss())
    exact = kfac_factors(model, "cross_entropy", data, kind="exact")
    a = kfac_factors(model, "cross_entropy", data, kind="mc", mc_samples=3, seed=5)
    b = kfac_factors(model, "cross_entropy", data, kind="mc", mc_samples=3, seed=5)
    c = kfac_factors(model, "cross_entropy", data, kind="mc", mc_samples=3, seed=6)
    torch.testing.assert_close(a.B["0"], b.B["0"], rtol=0, atol=0)
    assert not torch.allclose(a.B["0"], c.B["0"])
    torch.testing.assert_close(a.A["0"], exact.A["0"])  # A does not depend on the labels
    many = kfac_factors(model, "cross_entropy", data, kind="mc", mc_samples=3000, seed=0)
    for k in ("0", "2"):
        err = (many.B[k] - exact.B[k]).norm() / exact.B[k].norm()
        assert err < 0.1, (k, float(err))


class TokenTagger(nn.Module):
    """Per-token classifier: embedding, a linear layer, tanh and a head (HF-style call)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(6, 3)
        self.proj = nn.Linear(3, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, input_ids, attention_mask):
        return self.head(torch.tanh(self.proj(self.emb(input_ids))))


def test_padding_rows_are_left_out_of_both_factors():
    torch.manual_seed(3)
    model = TokenTagger().double()
    ids = torch.randint(1, 6, (2, 4))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    y = torch.randint(0, 3, (2, 4))
    y[mask == 0] = -100
    data = [({"input_ids": ids, "attention_mask": mask}, y)]
    f = kfac_factors(model, nn.CrossEntropyLoss(), data, params=r"proj\..*|head\..*")
    A = torch.zeros(4, 4, dtype=DT)
    B = torch.zeros(3, 3, dtype=DT)
    with torch.no_grad():
        for b, t in mask.nonzero().tolist():
            x = torch.cat([model.emb(ids[b, t]), torch.ones(1, dtype=DT)])
            A += torch.outer(x, x)
            p = model(ids[b : b + 1], None)[0, t].softmax(-1)
            B += torch.diag(p) - torch.outer(p, p)
    torch.testing.assert_close(f.A["proj"], A / 5)
    torch.testing.assert_close(f.B["head"], B / 5)
    assert f.num_rows == {"proj": 5, "head": 5} and f.unsupported == []


def test_kfac_merge_equals_dense_solve():
    models = [_mlp(s) for s in (0, 1)]
    loss = nn.CrossEntropyLoss()
    data = _data(loss)
    space = ParamSpace.from_module(models[0])
    Fs = [KroneckerOperator.from_kfac(space, kfac_factors(m, loss, data)) for m in models]
    lam = 0.05
    res = curvmerge.merge(models, Fs, damping=lam, damping_scale=1.0, rtol=1e-12)
    thetas = [space.flatten(dict(m.named_parameters())).detach() for m in models]
    dense = [F.to_dense() for F in Fs]
    prior = (thetas[0] + thetas[1]) / 2
    lhs = lam * torch.eye(space.size, dtype=DT) + 0.5 * (dense[0] + dense[1])
    rhs = 0.5 * (dense[0] @ thetas[0] + dense[1] @ thetas[1]) + lam * prior
    ref = torch.linalg.solve(lhs, rhs)
    torch.testing.assert_close(space.flatten(res.params).to(DT), ref, rtol=1e-8, atol=1e-10)
    assert not torch.allclose(ref, prior, atol=1e-4)  # K-FAC moved it off the average


def test_bad_kind_and_no_layer_are_refused():
    model = _mlp()
    data = _data(nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="kind must be one of"):
        kfac_factors(model, "cross_entropy", data, kind="type-2")
    norm = nn.Sequential(nn.LayerNorm(3))
    with pytest.raises(ValueError, match="no selected parameter belongs to a supported layer"):
        kfac_factors(norm, "mse", [(torch.randn(2, 3), torch.randn(2, 3))])


def test_exact_past_the_memory_budget_is_refused_and_frozen_layers_get_zero_b():
    from curvmerge.statistics.diagonal import DiagonalTooCostlyError

    model = _mlp()
    data = _data(nn.CrossEntropyLoss())
    with pytest.raises(DiagonalTooCostlyError, match="kind='mc'"):
        kfac_factors(model, "cross_entropy", data, memory_budget=100)

    class Frozen(nn.Module):  # the first layer runs without autograd
        def __init__(self):
            super().__init__()
            self.net = _mlp()

        def forward(self, x):
            with torch.no_grad():
                h = torch.tanh(self.net[0](x))
            return self.net[2](h)

    frozen = Frozen()
    f = kfac_factors(frozen, "cross_entropy", data)
    ref = kfac_factors(model, "cross_entropy", data)
    assert f.B["net.0"].abs().max() == 0
    torch.testing.assert_close(f.A["net.0"], ref.A["0"])
    torch.testing.assert_close(f.B["net.2"], ref.B["2"])


def test_hf_conv1d_is_a_transposed_linear_layer():
    lin = _mlp()
    hf = nn.Sequential(Conv1D(4, 3), nn.Tanh(), Conv1D(3, 4))
    with torch.no_grad():
        for i in (0, 2):
            hf[i].weight.copy_(lin[i].weight.T)
            hf[i].bias.copy_(lin[i].bias)
    data = _data(nn.CrossEntropyLoss())
    K_lin = KroneckerOperator.from_kfac(ParamSpace.from_module(lin), kfac_factors(lin, "ce", data))
    space = ParamSpace.from_module(hf)
    K_hf = KroneckerOperator.from_kfac(space, kfac_factors(hf, "ce", data))
    v = torch.randn(space.size, dtype=DT)
    d = space.unflatten(v)
    as_lin = {k: (t.T if t.ndim == 2 else t) for k, t in d.items()}
    out = K_hf @ d
    ref = K_lin @ as_lin
    for k in d:
        torch.testing.assert_close(out[k], ref[k].T if out[k].ndim == 2 else ref[k])


def test_num_data_sets_the_mean_normaliser():
    model = _mlp()
    data = _data(nn.CrossEntropyLoss())
    counted = kfac_factors(model, "cross_entropy", data)
    given = kfac_factors(model, "cross_entropy", data, num_data=14)
    torch.testing.assert_close(given.B["0"], counted.B["0"] / 2)
    torch.testing.assert_close(given.A["0"], counted.A["0"])


def test_ignored_targets_stay_rows_of_a_but_are_no_loss_terms():
    """Without an attention_mask, a position whose target is ignore_index is a real input:
    it stays in A (and in its row count); only the mean normaliser leaves it out."""
    model = _mlp()
    g = torch.Generator().manual_seed(3)
    X = torch.randn(2, 5, 3, generator=g, dtype=DT)
    y = torch.randint(0, 3, (2, 5), generator=g)
    y[0, 3:] = -100
    f = kfac_factors(model, "cross_entropy", [(X, y)])
    rows = torch.cat([X.reshape(-1, 3), torch.ones(10, 1, dtype=DT)], dim=1)
    torch.testing.assert_close(f.A["0"], rows.T @ rows / 10)
    assert f.num_rows["0"] == 10 and f.num_terms == 8


@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_batch_order_does_not_change_the_factors(kind):
    """K-FAC sums over examples in one pass: a shuffled loader gives the same factors."""
    model, loss = _mlp(), nn.CrossEntropyLoss()
    data = _data(loss)
    g = torch.Generator().manual_seed(3)
    X, y = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
    perm = torch.randperm(len(y), generator=g)
    shuffled = [(X[perm][:3], y[perm][:3]), (X[perm][3:], y[perm][3:])]
    a, b = (
        kfac_factors(model, loss, data, kind=kind),
        kfac_factors(model, loss, shuffled, kind=kind),
    )
    for layer in a.A:
        torch.testing.assert_close(b.A[layer], a.A[layer], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(b.B[layer], a.B[layer], rtol=1e-12, atol=1e-14)


def test_bf16_model_accumulates_in_float32():
    """A bf16 model's factors are float32 sums: equal to the float32 model's (same bf16
    weights and inputs) to bf16 forward precision, not to bf16 accumulation."""
    model = _mlp().float()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    loss = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(5)
    X = torch.randn(512, 3, generator=g).to(torch.bfloat16).float()
    y = torch.randint(0, 3, (512,), generator=g)
    data = [(X[i : i + 64], y[i : i + 64]) for i in range(0, 512, 64)]
    ref = kfac_factors(model, loss, data)
    low = kfac_factors(model.to(torch.bfloat16), loss, [(x.to(torch.bfloat16), t) for x, t in data])
    for layer in ref.A:
        assert low.A[layer].dtype == torch.float32 and low.B[layer].dtype == torch.float32
        torch.testing.assert_close(low.A[layer], ref.A[layer], rtol=2e-2, atol=1e-3)
        torch.testing.assert_close(low.B[layer], ref.B[layer], rtol=5e-2, atol=1e-3)
