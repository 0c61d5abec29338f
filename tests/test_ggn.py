"""GGNOperator against dense float64 GGN/Fisher matrices built with torch.func Jacobians."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from curvmerge import ParamSpace, SpaceMismatchError
from curvmerge.losses import LossSpec, flatten_rows, resolve_loss, sample_targets
from curvmerge.operators.ggn import GGNOperator
from tests.fisher_cases import TokenModel

DT = torch.float64


# ---------------------------------------------------------------------------- problems
def _mlp(out=3):
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, out))


def make_problem(name: str, seed: int = 0):
    """(model, loss_fn, data, dict_inputs) for a named case."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if name == "ce":
        model = _mlp(3).to(DT)
        data = [
            (torch.randn(n, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g))
            for n in (4, 3)
        ]
        return model, nn.CrossEntropyLoss(), data
    if name == "ce_sum":
        model, _, data = make_problem("ce", seed)
        return model, nn.CrossEntropyLoss(reduction="sum"), data
    if name == "mse":
        model = _mlp(2).to(DT)
        data = [
            (torch.randn(n, 4, generator=g, dtype=DT), torch.randn(n, 2, generator=g, dtype=DT))
            for n in (4, 3)
        ]
        return model, nn.MSELoss(), data
    if name == "bce":
        model = _mlp(3).to(DT)
        data = [
            (
                torch.randn(n, 4, generator=g, dtype=DT),
                torch.randint(0, 2, (n, 3), generator=g).to(DT),
            )
            for n in (4, 3)
        ]
        return model, nn.BCEWithLogitsLoss(), data
    if name == "tokens":
        model = TokenModel().to(DT)
        data = []
        for n in (3, 2):
            y = torch.randint(0, 4, (n, 5), generator=g)
            y[0, 3:] = -100  # padding
            data.append((torch.randn(n, 5, 3, generator=g, dtype=DT), y))
        return model, nn.CrossEntropyLoss(), data
    if name == "bert":
        from curvmerge.models import tiny_bert

        model = tiny_bert(
            3, vocab_size=20, hidden_size=8, num_layers=1, num_heads=2, max_length=12
        ).to(DT)
        data = []
        for n in (3, 2):
            ids = torch.randint(1, 20, (n, 6), generator=g)
            mask = torch.ones(n, 6, dtype=torch.long)
            mask[0, 4:] = 0
            ids[mask == 0] = 0
            data.append(
                ({"input_ids": ids, "attention_mask": mask}, torch.randint(0, 3, (n,), generator=g))
            )
        return model, nn.CrossEntropyLoss(), data
    raise KeyError(name)


def _call(model, params, inputs):
    if isinstance(inputs, dict):
        out = torch.func.functional_call(model, params, (), inputs)
    else:
        out = torch.func.functional_call(model, params, (inputs,))
    return out if isinstance(out, torch.Tensor) else out.logits


def _sum_loss(spec: LossSpec, f, y):
    if spec.name == "cross_entropy":
        return nn.functional.cross_entropy(
            f.reshape(-1, f.shape[-1]), y.reshape(-1), reduction="sum", ignore_index=-100
        )
    return LossSpec(spec.name, "sum").module()(f, y)


def dense_ggn(model, loss_fn, data, names, kind="exact", op=None):
    """Float64 reference: c sum_n J_n^T Lambda_n J_n from full Jacobians (torch.func)."""
    spec = resolve_loss(loss_fn)
    params = {n: p.detach() for n, p in model.named_parameters()}
    sel = list(names)
    total = 0
    for _, y in data:
        total += int((y != -100).sum()) if spec.name == "cross_entropy" else y.numel()
    c = 1.0 / total if spec.reduction == "mean" else 1.0
    P = sum(params[n].numel() for n in sel)
    G = torch.zeros(P, P, dtype=DT)
    for index, (x, y) in enumerate(data):

        def fn(p, x=x):
            return _call(model, {**params, **p}, x)

        f = fn({}).detach()
        Jd = torch.func.jacrev(fn)({n: params[n] for n in sel})
        J = torch.cat([Jd[n].reshape(f.numel(), -1) for n in sel], dim=1)
        B = f.shape[0]
        if kind == "exact":
            H = torch.func.hessian(lambda z, y=y: _sum_loss(spec, z.reshape(f.shape), y))(
                f.reshape(-1)
            )
            G += c * J.T @ H @ J
            continue
        if kind == "empirical":
            target_sets = [y]
        else:  # rebuild the operator's label samples
            rows, _, _ = flatten_rows(spec, f, y)
            gen = torch.Generator().manual_seed(op._seed_for(index))
            samples = sample_targets(spec, rows, op.mc_samples, gen)
            target_sets = []
            for s in samples:
                if spec.name == "cross_entropy":
                    ys = y.clone().reshape(-1)
                    ys[ys != -100] = s
                    target_sets.append(ys.reshape(y.shape))
                else:
                    target_sets.append(s.reshape(y.shape))
        for ys in target_sets:
            r = torch.func.grad(lambda z, ys=ys: _sum_loss(spec, z, ys))(f)  # [B, ...]
            for n in range(B):
                rn = torch.zeros_like(r)
                rn[n] = r[n]
                gvec = J.T @ rn.reshape(-1)
                G += c / len(target_sets) * torch.outer(gvec, gvec)
    return G


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def check_products(op, G, tol=1e-6):
    g = torch.Generator().manual_seed(7)
    P = G.shape[0]
    x = torch.randn(P, generator=g, dtype=DT)
    X = torch.randn(P, 3, generator=g, dtype=DT)
    assert rel_err(op @ x, G @ x) < tol
    assert rel_err(op @ X, G @ X) < tol
    out = op @ op.space.unflatten(x)
    assert list(out) == list(op.space.names)
    assert rel_err(op.space.flatten(out), G @ x) < tol
    assert rel_err(op @ x, G @ x) < tol  # again: from the cache


# ---------------------------------------------------------------------------- products
CASES = ["ce", "ce_sum", "mse", "bce", "tokens", "bert"]
SUBSETS = {
    "ce": r"^2\.",
    "ce_sum": [
        "0.weight",
        "2.bias",
    ],
    "mse": r"^0\.",
    "bce": r"weight",
    "tokens": r"^out\.",
    "bert": r"attention\.self\.(query|value)|classifier",
}


@pytest.mark.parametrize("kind", ["exact", "empirical", "mc"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("subset", [False, True], ids=["all", "subset"])
def test_products_match_dense(case, kind, subset):
    model, loss_fn, data = make_problem(case)
    params = SUBSETS[case] if subset else None
    op = GGNOperator(model, loss_fn, data, params=params, kind=kind, mc_samples=3, seed=1)
    if subset:
        assert op.space.size < ParamSpace.from_module(model).size
    G = dense_ggn(model, loss_fn, data, op.space.names, kind, op)
    assert op.dtype == DT and op.shape == G.shape
    check_products(op, G)


@pytest.mark.parametrize("case", ["ce", "tokens", "bert"])
@pytest.mark.parametrize("cache", [False, 1], ids=["stream", "partial"])
def test_streaming_and_partial_cache_match_dense(case, cache):
    model, loss_fn, data = make_problem(case)
    for kind in ("exact", "mc"):
        op = GGNOperator(model, loss_fn, data, kind=kind, cache=cache, mc_samples=2)
        G = dense_ggn(model, loss_fn, data, op.space.names, kind, op)
        check_products(op, G)
        if cache == 1:  # a one-byte budget caches nothing
            assert op.cached_bytes == 0


def test_partial_cache_keeps_first_batch():
    model, loss_fn, data = make_problem("ce")
    full = GGNOperator(model, loss_fn, data, cache=True)
    full @ torch.zeros(full.shape[0], dtype=DT)
    first = full._batches[0].graphs.nbytes
    op = GGNOperator(model, loss_fn, data, cache=first)
    G = dense_ggn(model, loss_fn, data, op.space.names)
    check_products(op, G)
    assert op._batches[0].graphs is not None and op._batches[1].graphs is None


def test_cache_follows_parameter_updates():
    model, loss_fn, data = make_problem("ce")
    op = GGNOperator(model, loss_fn, data)
    x = torch.randn(op.shape[0], dtype=DT)
    op @ x
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    G = dense_ggn(model, loss_fn, data, op.space.names)
    assert rel_err(op @ x, G @ x) < 1e-6


def test_matches_curvlinops():
    from curvlinops import GGNLinearOperator

    for case in ["ce", "mse", "bce", "bert"]:
        model, loss_fn, data = make_problem(case)
        names = ParamSpace.from_module(model).select(SUBSETS[case]).names
        if case == "bert":

            class Wrap(nn.Module):
                def __init__(self, m):
                    super().__init__()
                    self.m = m

                def forward(self, x):
                    return self.m(**x).logits

            wrapped = Wrap(model)
            named = dict(model.named_parameters())
            ref = GGNLinearOperator(
                wrapped,
                loss_fn,
                [named[n] for n in names],
                data,
                batch_size_fn=lambda x: x["input_ids"].shape[0],
            )
        else:
            named = dict(model.named_parameters())
            ref = GGNLinearOperator(model, loss_fn, [named[n] for n in names], data)
        op = GGNOperator(model, loss_fn, data, params=list(names))
        X = torch.randn(op.shape[0], 2, dtype=DT)
        assert rel_err(op @ X, ref @ X) < 1e-6


def test_token_level_sum_matches_curvlinops():
    from curvlinops import GGNLinearOperator

    model, _, data = make_problem("tokens")

    class ClassesFirst(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x).transpose(1, 2)  # [B, C, T], torch's layout

    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    ref = GGNLinearOperator(ClassesFirst(model), loss_fn, list(model.parameters()), data)
    op = GGNOperator(model, loss_fn, data)
    X = torch.randn(op.shape[0], 2, dtype=DT)
    assert rel_err(op @ X, ref @ X) < 1e-6


# ---------------------------------------------------------------------------- Monte Carlo
def test_mc_is_reproducible_by_seed():
    model, loss_fn, data = make_problem("ce")
    x = torch.randn(ParamSpace.from_module(model).size, dtype=DT)
    a = GGNOperator(model, loss_fn, data, kind="mc", seed=3) @ x
    b = GGNOperator(model, loss_fn, data, kind="mc", seed=3, cache=False) @ x
    c = GGNOperator(model, loss_fn, data, kind="mc", seed=4) @ x
    torch.testing.assert_close(a, b)
    assert rel_err(a, c) > 1e-3


@pytest.mark.parametrize("case", ["ce", "mse", "bce"])
def test_mc_converges_to_exact(case):
    """G_S is the mean of S independent one-sample estimates, so
    E||(G_S - G) v||^2 = E||(G_1 - G) v||^2 / S; Markov's inequality bounds the error of one
    draw by 5 standard errors except with probability 1/25 (fixed seeds: deterministic)."""
    model, loss_fn, data = make_problem(case)
    exact = GGNOperator(model, loss_fn, data)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(exact.shape[0], 2, generator=g, dtype=DT)
    GX = exact @ X
    one = [
        float(((GGNOperator(model, loss_fn, data, kind="mc", seed=s) @ X - GX) ** 2).sum())
        for s in range(40)
    ]
    var1 = sum(one) / len(one)
    errs = {}
    for S in (10, 2000):
        G_S = GGNOperator(model, loss_fn, data, kind="mc", mc_samples=S, seed=100)
        errs[S] = float(((G_S @ X - GX) ** 2).sum())
        assert errs[S] <= 25 * var1 / S
    assert errs[2000] < errs[10]
    assert math.sqrt(errs[2000]) / float(GX.norm()) < 0.1


# ---------------------------------------------------------------------------- misc
def test_diagonal_matches_dense():
    model, loss_fn, data = make_problem("ce")
    op = GGNOperator(model, loss_fn, data, params=r"^2\.")
    G = dense_ggn(model, loss_fn, data, op.space.names)
    assert rel_err(op.diagonal(), G.diagonal()) < 1e-6


def test_sdpa_attention_falls_back_to_graphs():
    model, loss_fn, data = make_problem("bert")
    G = dense_ggn(model, loss_fn, data, ParamSpace.from_module(model).names)
    model.set_attn_implementation("sdpa")
    op = GGNOperator(model, loss_fn, data, cache=False)
    x = torch.randn(op.shape[0], dtype=DT)
    assert rel_err(op @ x, G @ x) < 1e-6


def test_float32_model_and_merge_of_two_tasks():
    from curvmerge import merge

    thetas, ops = [], []
    for seed in (0, 1):
        model, loss_fn, data = make_problem("ce", seed)
        model.float()
        data = [(x.float(), y) for x, y in data]
        ops.append(GGNOperator(model, loss_fn, data, params=r"^0\."))
        thetas.append(model)
    assert ops[0].dtype == torch.float32
    result = merge(thetas, ops, damping=1e-2, rtol=1e-5)
    assert result.report.converged
    assert set(result.params) == {"0.weight", "0.bias"}


def test_errors():
    model, loss_fn, data = make_problem("ce")
    with pytest.raises(ValueError, match="empty"):
        GGNOperator(model, loss_fn, [])
    with pytest.raises(ValueError, match="unsupported loss"):
        GGNOperator(model, nn.L1Loss(), data)
    with pytest.raises(ValueError, match="kind"):
        GGNOperator(model, loss_fn, data, kind="hessian")
    with pytest.raises(ValueError, match="mc_samples"):
        GGNOperator(model, loss_fn, data, kind="mc", mc_samples=0)
    with pytest.raises(ValueError, match="cache"):
        GGNOperator(model, loss_fn, data, cache="sometimes")
    with pytest.raises(ValueError, match="num_data"):
        GGNOperator(model, loss_fn, data, num_data=0)
    with pytest.raises(SpaceMismatchError):
        GGNOperator(model, loss_fn, data, params=r"^nothing")
    with pytest.raises(TypeError, match="iterable"):
        GGNOperator(model, loss_fn, data[0])
    with pytest.raises(ValueError, match="targets"):
        bad = [(x, y[:, None].expand(-1, 2)) for x, y in data]
        GGNOperator(model, loss_fn, bad) @ torch.zeros(ParamSpace.from_module(model).size)
    dropout = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.1)).double()
    with pytest.raises(ValueError, match="eval"):
        GGNOperator(dropout, loss_fn, data)
    GGNOperator(dropout.eval(), loss_fn, data)  # fine in eval mode
    with pytest.raises(ValueError, match="ignore_index"):
        GGNOperator(model, loss_fn, [(data[0][0], torch.full((4,), -100))])


# ---------------------------------------------------------------------------- trust (issue 10)
def _loader(shuffle: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(12, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (12,), generator=g)
    dataset = torch.utils.data.TensorDataset(X, y)
    gen = torch.Generator().manual_seed(1)
    return torch.utils.data.DataLoader(dataset, batch_size=5, shuffle=shuffle, generator=gen)


@pytest.mark.parametrize("kind", ["exact", "empirical", "mc"])
def test_shuffled_loader_is_refused_by_streaming_products(kind):
    from curvmerge.statistics.base import DataOrderError

    torch.manual_seed(0)
    model = _mlp(3).to(DT)
    op = GGNOperator(model, nn.CrossEntropyLoss(), _loader(shuffle=True), kind=kind, cache=False)
    x = torch.randn(op.shape[0], dtype=DT)
    with pytest.raises(DataOrderError, match="shuffle=False"):
        op @ x
        op @ x


def test_fixed_order_loader_streams_like_dense():
    torch.manual_seed(0)
    model = _mlp(3).to(DT)
    data = _loader(shuffle=False)
    for kind in ("exact", "empirical"):
        op = GGNOperator(model, nn.CrossEntropyLoss(), data, kind=kind, cache=False)
        G = dense_ggn(model, nn.CrossEntropyLoss(), list(data), op.space.names, kind, op)
        check_products(op, G)


def test_cache_follows_updates_outside_params():
    """The head is not in ``params`` but the body's curvature depends on it."""
    model, loss_fn, data = make_problem("ce")
    for cache in (True, False):
        op = GGNOperator(model, loss_fn, data, params=r"^0\.", cache=cache)
        x = torch.randn(op.shape[0], dtype=DT)
        op @ x
        with torch.no_grad():
            model[2].weight.mul_(-2.0)
        G = dense_ggn(model, loss_fn, data, op.space.names)
        assert rel_err(op @ x, G @ x) < 1e-6


@pytest.mark.parametrize("kind", ["exact", "empirical", "mc"])
def test_streamed_products_check_the_state_key_only_when_they_keep_parameter_state(
    kind, monkeypatch
):
    """An exact streamed product recomputes everything from the current parameters, so it
    need not checksum them (a tenth of a gradient pass on MiniLM); mc label samples and
    empirical gradients are kept from the first pass and must follow changes."""
    model, loss_fn, data = make_problem("ce")
    op = GGNOperator(model, loss_fn, data, kind=kind, cache=False, mc_samples=2)
    calls = []
    key = op.state_key
    monkeypatch.setattr(op, "state_key", lambda: calls.append(1) or key())
    x = torch.randn(op.shape[0], dtype=DT)
    op @ x
    with torch.no_grad():
        model[0].weight.data.mul_(1.5)  # no version-counter bump
    G = dense_ggn(model, loss_fn, data, op.space.names, kind, op)
    assert rel_err(op @ x, G @ x) < 1e-6
    assert len(calls) == (1 if kind == "exact" else 2)


def test_cache_follows_buffers_and_reassigned_parameters():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _mlp(3)
            self.register_buffer("temperature", torch.tensor(1.0))

        def forward(self, x):
            return self.net(x) / self.temperature

    model, loss_fn, data = make_problem("ce")
    scaled = Scaled().to(DT)
    scaled.net.load_state_dict(model.state_dict())
    op = GGNOperator(scaled, loss_fn, data, params=r"^net\.0\.")
    x = torch.randn(op.shape[0], dtype=DT)
    op @ x
    scaled.temperature.fill_(3.0)
    G = dense_ggn(scaled, loss_fn, data, op.space.names)
    assert rel_err(op @ x, G @ x) < 1e-6
    scaled.net[2].weight = nn.Parameter(scaled.net[2].weight.detach() * 0.5)
    G = dense_ggn(scaled, loss_fn, data, op.space.names)
    assert rel_err(op @ x, G @ x) < 1e-6


def test_diagonal_follows_parameter_updates():
    model, loss_fn, data = make_problem("ce")
    op = GGNOperator(model, loss_fn, data, params=r"^0\.")
    op.diagonal()
    assert op.diagonal_passes == 1
    op.diagonal()
    assert op.diagonal_passes == 1  # cached while nothing changed
    for module in (model[0], model[2]):  # a selected parameter, then one outside params
        with torch.no_grad():
            module.weight.mul_(1.7)
        G = dense_ggn(model, loss_fn, data, op.space.names)
        assert rel_err(op.diagonal(), G.diagonal()) < 1e-6
    assert op.diagonal_passes == 3


def test_diagonal_errors_are_not_hidden(monkeypatch):
    """No lazy import that falls back to P unit-vector products on an ImportError."""
    import curvmerge.operators.ggn as ggn

    def broken(*args, **kwargs):
        raise ImportError("a real import error inside the engine")

    monkeypatch.setattr(ggn, "diagonal_squares", broken)
    model, loss_fn, data = make_problem("ce")
    with pytest.raises(ImportError, match="real import error"):
        GGNOperator(model, loss_fn, data).diagonal()


def test_diagonal_refuses_shuffled_data():
    from curvmerge.statistics.base import DataOrderError

    torch.manual_seed(0)
    model = _mlp(3).to(DT)
    data = _loader(shuffle=True)
    op = GGNOperator(model, nn.CrossEntropyLoss(), data, kind="mc", num_data=12)
    op @ torch.randn(op.shape[0], dtype=DT)  # the first pass (num_data is given)
    with pytest.raises(DataOrderError):
        op.diagonal()  # the mc diagonal reuses the operator's label samples, batch by batch


def test_cache_follows_updates_through_data():
    """``p.data.mul_()`` changes neither the object, the storage nor the version counter."""
    model, loss_fn, data = make_problem("ce")
    op = GGNOperator(model, loss_fn, data, params=r"^0\.")
    x = torch.randn(op.shape[0], dtype=DT)
    op @ x
    op.diagonal()
    model[2].weight.data.mul_(3.0)
    G = dense_ggn(model, loss_fn, data, op.space.names)
    assert rel_err(op @ x, G @ x) < 1e-6
    assert rel_err(op.diagonal(), G.diagonal()) < 1e-6


def _keys_per_thread_count(op):
    """The operator's state key computed with 1, 2 and 3 threads."""
    threads = torch.get_num_threads()
    try:
        keys = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            keys.append(op.state_key())
    finally:
        torch.set_num_threads(threads)
    return keys


@pytest.mark.parametrize(
    "change",
    [
        lambda w: w.data.neg_(),  # a sign flip: the bit sum moves by (#neg - #pos) * 2**63
        lambda w: w.data.mul_(1 + 2**-22),  # an ulp or two of every entry
        lambda w: w.data[0, 0].add_(1e-9),  # one entry
        lambda w: w.data.copy_(w.data.flip(1)),  # a permutation of each row
    ],
    ids=["sign flip", "ulp", "one entry", "permuted rows"],
)
def test_state_key_sees_every_change_through_data_and_not_the_thread_count(change):
    """The key's checksum (exact integer sum of the bit patterns, and the values' sum) sees
    each change; computing it with another number of threads gives the same key (a float
    sum split between threads would not: a spurious 'changed' would rebuild every cache)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 200), nn.Tanh(), nn.Linear(200, 3))  # float32
    w = model[0].weight  # 60,000 entries: torch splits its sums between threads
    with torch.no_grad():  # as many negative as positive entries: a sign flip keeps the bit sum
        w.abs_().mul_(torch.tensor([1.0, -1.0]).repeat(w.numel() // 2).view_as(w))
    data = [(torch.randn(5, 300), torch.randint(0, 3, (5,)))]
    op = GGNOperator(model, nn.CrossEntropyLoss(), data)
    keys = _keys_per_thread_count(op)
    assert keys[0] == keys[1] == keys[2]
    change(w)
    assert op.state_key() != keys[0]


def test_state_key_of_a_bf16_model_sees_one_entry_and_a_sign_flip():
    """2-byte bit patterns take the int64 sum (4-byte ones the wrapping int32 sum): a bf16
    model's key is thread-independent and sees a one-entry change and a balanced sign flip."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 200), nn.Tanh(), nn.Linear(200, 3)).to(torch.bfloat16)
    w = model[0].weight
    with torch.no_grad():
        w.abs_().mul_(torch.tensor([1.0, -1.0], dtype=w.dtype).repeat(w.numel() // 2).view_as(w))
    data = [(torch.randn(5, 300, dtype=torch.bfloat16), torch.randint(0, 3, (5,)))]
    op = GGNOperator(model, nn.CrossEntropyLoss(), data)
    keys = _keys_per_thread_count(op)
    assert keys[0] == keys[1] == keys[2]
    w.data.neg_()
    flipped = op.state_key()
    assert flipped != keys[0]
    w.data[0, 0] = w.data[0, 0] * 2
    assert op.state_key() != flipped


def test_cached_products_accept_a_shuffled_loader():
    """Nothing reused per batch depends on the order when every graph is cached (the count
    of num_data and the diagonal are sums over examples)."""
    torch.manual_seed(0)
    model = _mlp(3).to(DT)
    data = _loader(shuffle=True)
    op = GGNOperator(model, nn.CrossEntropyLoss(), data, cache=True)
    G = dense_ggn(model, nn.CrossEntropyLoss(), list(_loader(shuffle=False)), op.space.names)
    x = torch.randn(op.shape[0], dtype=DT)
    assert rel_err(op @ x, G @ x) < 1e-6
    assert rel_err(op @ x, G @ x) < 1e-6
    assert rel_err(op.diagonal(), G.diagonal()) < 1e-6


def test_mc_diagonal_is_the_diagonal_of_the_mc_operator():
    model, loss_fn, data = make_problem("ce")
    op = GGNOperator(model, loss_fn, data, kind="mc", mc_samples=2, seed=3)
    G = dense_ggn(model, loss_fn, data, op.space.names, "mc", op)
    assert rel_err(op.diagonal(), G.diagonal()) < 1e-6


def test_low_precision_model_products_run_in_float32():
    model, loss_fn, data = make_problem("ce")
    low = copy.deepcopy(model).to(torch.bfloat16)
    low_data = [(x.to(torch.bfloat16), y) for x, y in data]
    op = GGNOperator(low, loss_fn, low_data)
    assert op.dtype == torch.float32
    G = dense_ggn(copy.deepcopy(low).to(DT), loss_fn, [(x.to(DT), y) for x, y in low_data],
                  op.space.names)  # fmt: skip
    x = torch.randn(op.shape[0], dtype=DT)
    assert rel_err((op @ x.float()).to(DT), G @ x) < 1e-5


def test_exact_merge_of_a_vocabulary_sized_output_falls_back_to_a_trace_scale():
    """The exact diagonal's [M, C, C] factor is refused for a large C; the merge's default
    damping scale then comes from Hutchinson products instead of failing."""
    from curvmerge import merge

    torch.manual_seed(0)
    C = 12000
    models = [nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, C)) for _ in range(2)]
    ids = torch.randint(0, 10, (4, 6))
    data = [(ids, torch.randint(0, C, (4, 6)))]
    ops = [GGNOperator(m, nn.CrossEntropyLoss(), data, params=r"^0\.") for m in models]
    result = merge(models, ops, maxiter=50)
    assert result.report.damping_scale_source.startswith("hutchinson")


@pytest.mark.parametrize("cache", [True, False])
def test_progress_shows_only_the_first_pass(capsys, cache):
    model, loss_fn, data = make_problem("ce")
    op = GGNOperator(model, loss_fn, data, cache=cache, progress=True)
    v = torch.randn(op.shape[1], dtype=DT)
    op @ v
    first = capsys.readouterr().err
    assert "GGN product (first)" in first
    for _ in range(3):
        op @ v
    assert capsys.readouterr().err == ""  # later products: no bar
    assert op.products == 4


def test_no_progress_prints_nothing(capsys):
    model, loss_fn, data = make_problem("ce")
    op = GGNOperator(model, loss_fn, data)
    op @ torch.randn(op.shape[1], 2, dtype=DT)
    assert capsys.readouterr().err == ""
    assert op.products == 2


# ---------------------------------------------------------------------------- blocks
class NormModel(nn.Module):
    """Layer norms of every form: affine over the last dim, plain over the last two, and
    weight without bias, so that the cheap double backward of each branch is checked."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.ln1 = nn.LayerNorm(4)
        self.ln2 = nn.LayerNorm((5, 4), elementwise_affine=False)
        self.ln3 = nn.LayerNorm(4, bias=False)
        self.out = nn.Linear(4, 3)

    def forward(self, x):  # x: [B, 5, 3]
        h = torch.tanh(self.ln1(self.inp(x)))
        h = self.ln3(self.ln2(h) * 1.5 + 0.1)
        return self.out(h).mean(1)


def _norm_problem():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(n, 5, 3, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g))
        for n in (4, 3)
    ]
    return NormModel().to(DT), nn.CrossEntropyLoss(), data


@pytest.mark.parametrize("kind", ["exact", "mc"])
def test_layer_norms_match_dense(kind):
    model, loss_fn, data = _norm_problem()
    for cache in (True, False):
        op = GGNOperator(model, loss_fn, data, kind=kind, cache=cache, mc_samples=2)
        G = dense_ggn(model, loss_fn, data, op.space.names, kind, op)
        check_products(op, G, tol=1e-10)


@pytest.mark.parametrize("case", ["ce", "tokens", "bert", "norms"])
def test_block_equals_column_by_column(case):
    """A ``[P, K]`` block in batched passes equals the columns one at a time and the dense
    GGN; it counts K products but one pass per batch and block of ``block_columns``."""
    model, loss_fn, data = _norm_problem() if case == "norms" else make_problem(case)
    K = 7
    ops = {b: GGNOperator(model, loss_fn, data, block_columns=b) for b in (1, 3, 16)}
    G = dense_ggn(model, loss_fn, data, ops[1].space.names)
    X = torch.randn(G.shape[0], K, generator=torch.Generator().manual_seed(3), dtype=DT)
    columns = torch.stack([ops[1] @ X[:, k] for k in range(K)], dim=1)
    assert rel_err(columns, G @ X) < 1e-10
    nb = len(data)
    for b, op in ops.items():
        before = (op.products, op.product_passes)
        Y = op @ X
        assert rel_err(Y, columns) < 1e-12 and rel_err(Y, G @ X) < 1e-10
        assert op.products - before[0] == K
        assert op.product_passes - before[1] == nb * math.ceil(K / b)
    assert ops[16].product_passes < ops[1].product_passes  # first block: the cache built too


def test_block_columns_is_checked():
    model, loss_fn, data = make_problem("ce")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="block_columns"):
            GGNOperator(model, loss_fn, data, block_columns=bad)


# ------------------------------------------------------------------ compute dtype
def test_a_compute_dtype_runs_the_products_in_it():
    """GGNOperator(dtype=float64) of a float32 (or bf16) model equals the operator of its
    float64 copy; the float32 operator differs from it by float32 rounding; half precision
    is refused."""
    torch.manual_seed(0)
    model32 = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    data = [(torch.randn(6, 5), torch.randint(0, 3, (6,))) for _ in range(2)]
    model64 = copy.deepcopy(model32).double()
    data64 = [(x.double(), y) for x, y in data]
    ref = GGNOperator(model64, "cross_entropy", data64)
    G = GGNOperator(model32, "cross_entropy", data, dtype=torch.float64)
    assert G.dtype == torch.float64 and model32[0].weight.dtype == torch.float32
    V = torch.randn(ref.shape[0], 3, dtype=torch.float64)
    want = ref @ V
    torch.testing.assert_close(G @ V, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(G.diagonal(), ref.diagonal(), rtol=1e-12, atol=1e-12)
    low = GGNOperator(model32, "cross_entropy", data)
    assert low.dtype == torch.float32
    err = float(((low @ V.float()).double() - want).norm() / want.norm())
    assert 1e-10 < err < 1e-5  # float32 rounding, which the float64 operator does not have
    bf16 = copy.deepcopy(model32).to(torch.bfloat16)
    assert GGNOperator(bf16, "cross_entropy", data, dtype=torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="never accumulate in half precision"):
        GGNOperator(model32, "cross_entropy", data, dtype=torch.bfloat16)
