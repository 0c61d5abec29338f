"""The per-example squared-gradient engine against per-example loops (one example at a time
through the whole model): sequence-first layouts, retries of batched accumulation, and
low-precision models."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from curvmerge.fisher import diagonal_fisher
from curvmerge.statistics import per_example
from curvmerge.statistics.per_example import PerExampleSquares
from tests.fisher_cases import brute_force, mlp_plain, tensor_batches


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def one_at_a_time(model, loss_fn, data, kind):
    """The per-example loop: every example alone through the whole model, its loss term's
    gradient squared (``brute_force`` on batches of one example; the mean reduction divides
    by the number of loss terms of the whole data)."""
    single = [(x[n : n + 1], y[n : n + 1]) for x, y in data for n in range(len(y))]
    return brute_force(model, loss_fn, single, kind)


# --------------------------------------------------------------------------- layouts
class SeqFirstAttention(nn.Module):
    """``nn.MultiheadAttention(batch_first=False)`` on inputs transposed inside the model; its
    key padding mask stays batch-first (one module, two batch axes)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(3, 8)
        self.mha = nn.MultiheadAttention(8, 2)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        mask = x[..., 0] > 1.2  # [B, T]
        mask[:, 0] = False
        h = self.emb(x).transpose(0, 1)  # [T, B, 8]
        h, _ = self.mha(h, h, h, key_padding_mask=mask, need_weights=False)
        return self.head(h.mean(0))


class SeqFirstEncoder(nn.Module):
    """``nn.TransformerEncoderLayer(batch_first=False)``: its Linear and LayerNorm layers see
    ``[T, B, D]``."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(3, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.layer(self.emb(x).transpose(0, 1))
        return self.head(h.mean(0))


class SeqFirstLinear(nn.Module):
    """A Linear applied to ``[T, B, D]``."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.lin(x.transpose(0, 1)))
        return self.head(h.sum(0))


LAYOUTS = {
    "mha_seq_first": SeqFirstAttention,
    "encoder_layer_seq_first": SeqFirstEncoder,
    "linear_seq_first": SeqFirstLinear,
}


def _layout_data(T, Bs, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(B, T, 3, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (B,), generator=g),
        )
        for B in Bs
    ]


@pytest.mark.parametrize("kind", ["exact", "empirical"])
@pytest.mark.parametrize("T", [4, 3], ids=["T_eq_B", "T_ne_B"])
@pytest.mark.parametrize("case", list(LAYOUTS))
def test_sequence_first_layouts_match_per_example_loop(case, T, kind):
    """Batches of 4 examples with T == 4 (positions must not be taken as examples) or T == 3,
    and a batch of one example (the probe then duplicates it)."""
    torch.manual_seed(0)
    model = LAYOUTS[case]().double().eval()
    data = _layout_data(T, (4, 4, 1))
    loss = nn.CrossEntropyLoss()
    F = diagonal_fisher(model, loss, data, kind=kind, progress=False)
    ref = one_at_a_time(model, loss, data, kind)
    assert ref.abs().max() > 0
    assert rel_err(F.diagonal(), ref) < 1e-8


def _engine_plan(model, names, x):
    with PerExampleSquares(model, names) as engine:
        engine.forward(model, x)
        return {n: sorted({c.module_name for c, _ in e}) for n, e in engine.plan.items()}


def test_sequence_first_layers_use_their_closed_forms():
    """Linear and LayerNorm layers on ``[T, B, D]`` keep their closed forms (no fallback to
    the whole model); attention is vmapped along its own batch axis."""
    torch.manual_seed(0)
    model = SeqFirstEncoder().double().eval()
    names = ["layer.linear1.weight", "layer.norm2.bias", "layer.self_attn.out_proj.weight"]
    plan = _engine_plan(model, names, _layout_data(4, (4,))[0][0])
    assert plan == {
        "layer.linear1.weight": ["layer.linear1"],
        "layer.norm2.bias": ["layer.norm2"],
        "layer.self_attn.out_proj.weight": ["layer.self_attn"],
    }


class BatchLastConv(nn.Module):
    """A Conv1d of kernel size one applied along the examples (``[C, B]``, unbatched)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 2, 1)
        self.head = nn.Linear(2, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x.mean(1).T)).T)


def test_convolution_needs_batch_at_axis_zero():
    torch.manual_seed(0)
    model = BatchLastConv().double().eval()
    data = _layout_data(4, (4, 1))
    assert _engine_plan(model, ["conv.weight"], data[0][0]) == {"conv.weight": [""]}
    F = diagonal_fisher(model, "cross_entropy", data, kind="empirical", progress=False)
    ref = one_at_a_time(model, nn.CrossEntropyLoss(), data, "empirical")
    assert rel_err(F.diagonal(), ref) < 1e-8


def test_untraceable_batch_axis_raises_naming_the_module():
    """Examples flattened together (``[B * T, D]``) with no enclosing module called on the
    batch: refused, naming the module and the fix."""
    torch.manual_seed(0)
    model = SeqFirstLinear().double()
    x = _layout_data(4, (4,))[0][0]

    def call(x):
        return model.lin(x.reshape(-1, 3)).view(x.shape[0], -1, 5).sum(1)

    with PerExampleSquares(model, ["lin.weight"]) as engine:
        with pytest.raises(RuntimeError, match=r"'lin' \(Linear\).*batch-first"):
            engine.forward(call, x)


def test_output_must_be_batch_first():
    torch.manual_seed(0)
    model = SeqFirstLinear().double()
    x = _layout_data(3, (4,))[0][0]
    with PerExampleSquares(model, ["lin.weight"]) as engine:
        with pytest.raises(RuntimeError, match="model output must have the batch dimension first"):
            engine.forward(lambda x: model.lin(x.transpose(0, 1)), x)


# --------------------------------------------------------------------------- retries
def test_failed_batched_accumulation_never_counts_twice(monkeypatch):
    """A RuntimeError inside batched accumulation after a first layer has added its squares
    propagates: it is never retried over layers already added (which counted them twice)."""
    model = mlp_plain().double().eval()
    data = tensor_batches((5,), n_batches=1, B=6)
    original = per_example._SQ_INTO["linear"]
    batched = []

    def flaky(engine, module, x, d, accs, scale, reps=1):
        if reps > 1 and batched:
            raise RuntimeError("injected failure")
        original(engine, module, x, d, accs, scale, reps=reps)
        batched.append(reps > 1)

    monkeypatch.setitem(per_example._SQ_INTO, "linear", flaky)
    with pytest.raises(RuntimeError, match="injected failure"):
        diagonal_fisher(model, "cross_entropy", data, kind="exact", progress=False)
    assert batched[0]  # the first layer did accumulate in the batched attempt


def test_batched_backward_without_batching_rule_falls_back(monkeypatch):
    """The shared (vmapped) backward pass failing: one cotangent at a time, same result."""
    model = mlp_plain().double().eval()
    data = tensor_batches((5,), n_batches=2, B=6)
    ref = one_at_a_time(model, nn.CrossEntropyLoss(), data, "exact")
    grad = torch.autograd.grad
    refused = []

    def no_batching_rule(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            refused.append(True)
            raise RuntimeError("no batching rule")
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_batching_rule)
    F = diagonal_fisher(model, "cross_entropy", data, kind="exact", progress=False)
    assert refused
    assert rel_err(F.diagonal(), ref) < 1e-8


# --------------------------------------------------------------------------- precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models_accumulate_in_float32(dtype):
    """4096 examples of small gradients in 1024 batches: sums in bfloat16 stop taking
    increments once they are about 2^9 times larger, squares in float16 underflow to zero.
    The statistics are summed in float32 and match a float64 copy of the same weights (on
    the same rounded inputs) to the model's forward precision, entry by entry."""
    torch.manual_seed(0)
    low = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype).eval()
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(4096, 6, generator=g) * 3e-4).to(dtype)
    y = torch.randint(0, 3, (4096,), generator=g)
    data = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 4096, 4)]
    F = diagonal_fisher(low, "cross_entropy", data, kind="empirical", progress=False)
    high = copy.deepcopy(low).double()
    # the reference is the per-example loop on a float64 copy, not the engine under test
    ref = brute_force(high, nn.CrossEntropyLoss(), [(x.double(), y)], "empirical")
    assert F.dtype == torch.float32
    d = F.diagonal().double()
    assert ref.min() > 0 and not (d == 0).any()
    assert float(((d - ref).abs() / ref).max()) < 5e-2
    with PerExampleSquares(low, ["0.weight", "2.bias"]) as engine:
        assert {s.dtype for s in engine.squares.values()} == {torch.float32}


class Recurrent(nn.Module):
    """``nn.LSTM``/``nn.GRU`` (fused over the batch: no vmap batching rule), batch first or
    sequence first (the hidden states are ``[layers, B, H]`` either way)."""

    def __init__(self, cell, batch_first):
        super().__init__()
        self.batch_first = batch_first
        self.rnn = cell(3, 5, batch_first=batch_first)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        h, _ = self.rnn(x if self.batch_first else x.transpose(0, 1))
        return self.head(h[:, -1] if self.batch_first else h[-1])


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("batch_first", [True, False])
def test_recurrent_layers_match_per_example_loop(cell, batch_first):
    torch.manual_seed(0)
    model = Recurrent(cell, batch_first).double()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 4, 3, generator=g, dtype=torch.float64), torch.tensor([0, 1, 1, 0]))]
    for kind in ("exact", "empirical"):
        F = diagonal_fisher(model, nn.CrossEntropyLoss(), data, kind=kind, progress=False)
        ref = one_at_a_time(model, nn.CrossEntropyLoss(), data, kind)
        assert rel_err(F.diagonal(), ref) < 1e-10


class Squeezed(nn.Module):
    """A single output squeezed away: ``[B, 1] -> [B]``, and ``[] `` for one example."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 1)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).squeeze()


class InPlaceInput(nn.Module):
    """Scales its input in place (a view of the user's batch when nothing copies it)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x.mul_(2.0))


def test_probe_handles_squeezed_outputs_and_in_place_inputs():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    bce = [(x, (torch.rand(5, generator=g) < 0.5).double())]
    model = Squeezed().double()
    F = diagonal_fisher(model, nn.BCEWithLogitsLoss(), bce, progress=False)
    assert rel_err(F.diagonal(), brute_force(model, nn.BCEWithLogitsLoss(), bce, "exact")) < 1e-10
    model = InPlaceInput().double()
    data = [(x.clone(), torch.tensor([0, 1, 1, 0, 1]))]
    F = diagonal_fisher(model, nn.CrossEntropyLoss(), data, progress=False)
    ref = brute_force(model, nn.CrossEntropyLoss(), [(x.clone(), data[0][1])], "exact")
    assert rel_err(F.diagonal(), ref) < 1e-10
