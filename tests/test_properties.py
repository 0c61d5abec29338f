"""Property-based tests (hypothesis) of the curvature engines against float64 references.

Random small architectures (batch-first and sequence-first, classification and token-level
with padding), batch sizes, batch orders (lists and shuffled loaders), dtypes, kinds and
parameter subsets: ``GGNOperator`` against the dense float64 GGN/Fisher of
``tests/test_ggn.py``, ``diagonal_fisher`` against the per-example loop of
``tests/fisher_cases.py``. Every case matches, or (token outputs with T == C and no declared
layout) is refused with an error that names the problem; shuffled loaders are read by
passes that do not reuse per-batch state and must match (refusals are tested in test_ggn).
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from curvmerge import GGNOperator, diagonal_fisher
from curvmerge.losses import LossSpec
from tests.fisher_cases import brute_force
from tests.test_ggn import dense_ggn, rel_err

DT = torch.float64
PROPERTIES = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,  # the same cases on every run: CI never flakes on a new draw
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# relative error allowed against the float64 reference, by the model's dtype
TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-3, torch.bfloat16: 8e-2}


class MLP(nn.Module):
    def __init__(self, d, h, c):
        super().__init__()
        self.inp = nn.Linear(d, h)
        self.out = nn.Linear(h, c)

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x)))


class Tokens(nn.Module):
    """Token-level outputs ``[B, T, C]`` from layers that see ``[B, T, D]`` (batch first) or
    ``[T, B, D]`` (sequence first, as ``nn.Transformer*`` by default); positions are mixed
    by a causal running mean, examples never."""

    def __init__(self, d, h, c, sequence_first):
        super().__init__()
        self.sequence_first = sequence_first
        self.inp = nn.Linear(d, h)
        self.norm = nn.LayerNorm(h)
        self.out = nn.Linear(h, c)

    def forward(self, x):
        axis = 1
        if self.sequence_first:
            x, axis = x.transpose(0, 1), 0
        h = torch.tanh(self.norm(self.inp(x)))
        steps = torch.arange(1, h.shape[axis] + 1, dtype=h.dtype)
        h = h.cumsum(axis) / (steps[:, None, None] if axis == 0 else steps[None, :, None])
        y = self.out(h)
        return y.transpose(0, 1) if self.sequence_first else y


@st.composite
def problems(draw, kinds=("exact", "empirical", "mc")):
    """(model, loss_fn, batches as a list, kind, selected names, dtype, shuffled)."""
    arch = draw(st.sampled_from(["mlp", "mlp_mse", "tokens", "sequence_first"]))
    d, h, c = draw(st.integers(2, 4)), draw(st.integers(2, 5)), draw(st.integers(2, 4))
    T = draw(st.integers(2, 4))
    sizes = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    if arch == "sequence_first" and draw(st.booleans()):
        sizes = [T] * len(sizes)  # T == B: a shape test cannot tell positions from examples
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if arch.startswith("mlp"):
        model = MLP(d, h, c)
    else:
        model = Tokens(d, h, c, sequence_first=arch == "sequence_first")
    model = model.to(DT)
    loss_fn = nn.MSELoss() if arch == "mlp_mse" else nn.CrossEntropyLoss()
    if arch in ("tokens", "sequence_first") and draw(st.booleans()):
        loss_fn = LossSpec("cross_entropy", classes_last=True)  # declared: T == C is fine
    data = []
    for n in sizes:
        if arch.startswith("mlp"):
            x = torch.randn(n, d, generator=g, dtype=DT)
            if arch == "mlp_mse":
                y = torch.randn(n, c, generator=g, dtype=DT)
            else:
                y = torch.randint(0, c, (n,), generator=g)
        else:
            x = torch.randn(n, T, d, generator=g, dtype=DT)
            y = torch.randint(0, c, (n, T), generator=g)
            y[0, 0] = -100  # padding
        data.append((x, y))
    names = [n for n, _ in model.named_parameters()]
    chosen = draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
    selected = [n for n in names if n in chosen]  # model order
    dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
    kind = draw(st.sampled_from(kinds))
    shuffled = draw(st.booleans()) and not arch.startswith("tokens")
    return model, loss_fn, data, kind, selected, dtype, shuffled


def _ambiguous(loss_fn, data) -> bool:
    """Token outputs [B, T, C] with T == C and an undeclared layout: refused, by design."""
    x, y = data[0]
    return isinstance(loss_fn, nn.CrossEntropyLoss) and y.ndim == 2 and y.shape[1] == x.shape[1]


def _cast(model, data, dtype):
    model = copy.deepcopy(model).to(dtype)
    data = [(x.to(dtype), y.to(dtype) if y.is_floating_point() else y) for x, y in data]
    return model, data


def _shuffled_loader(data, seed=0):
    """The same examples, served by a shuffling DataLoader (one fixed batch size)."""
    X = torch.cat([x for x, _ in data])
    Y = torch.cat([y for _, y in data])
    gen = torch.Generator().manual_seed(seed)
    dataset = torch.utils.data.TensorDataset(X, Y)
    size = max(1, X.shape[0] // 2)
    return torch.utils.data.DataLoader(dataset, batch_size=size, shuffle=True, generator=gen)


@PROPERTIES
@given(problem=problems())
def test_ggn_operator_matches_dense_or_refuses(problem):
    model, loss_fn, data, kind, names, dtype, shuffled = problem
    if shuffled and kind == "mc":
        kind = "exact"  # mc labels are drawn per batch: a reshuffled batch is another matrix
    low, low_data = _cast(model, data, dtype)
    source = _shuffled_loader(low_data) if shuffled else low_data
    op = GGNOperator(low, loss_fn, source, params=names, kind=kind, cache=False)
    assert op.dtype == torch.promote_types(dtype, torch.float32)  # products in float32+
    x = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(3), dtype=DT)
    try:
        got = (op @ x.to(op.dtype)).to(DT)
        diag = op.diagonal().to(DT)
    except ValueError as err:
        assert "ambiguous cross-entropy layout" in str(err) and _ambiguous(loss_fn, data)
        return
    ref_data = low_data if not shuffled else [(x_, y_) for x_, y_ in source]
    # the reference in float64 on the same (possibly rounded) weights and data
    ref_model, ref_data = _cast(low, ref_data, DT)
    G = dense_ggn(ref_model, loss_fn, ref_data, names, kind, op)
    assert rel_err(got, G @ x) < TOLERANCE[op.dtype]
    # the diagonal runs the model in its own dtype (per-example gradients of a bf16 model)
    assert rel_err(diag, G.diagonal()) < TOLERANCE[dtype]


@PROPERTIES
@given(problem=problems())
def test_diagonal_fisher_matches_per_example_loop(problem):
    model, loss_fn, data, kind, names, dtype, shuffled = problem
    if shuffled and kind == "mc":
        shuffled = False  # mc labels follow the order of the examples
    low, low_data = _cast(model, data, dtype)
    source = _shuffled_loader(low_data) if shuffled else low_data
    try:
        F = diagonal_fisher(low, loss_fn, source, params=names, kind=kind, progress=False)
    except ValueError as err:
        assert "ambiguous cross-entropy layout" in str(err) and _ambiguous(loss_fn, data)
        return
    assert F.dtype == torch.promote_types(dtype, torch.float32)  # accumulates in float32+
    ref_model, ref_data = _cast(low, low_data, DT)
    ref = brute_force(ref_model, loss_fn, ref_data, kind, names)
    assert rel_err(F.diagonal().to(DT), ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_shuffled_loader_gives_the_diagonal_of_the_same_examples(kind):
    """One pass: the order does not matter for these kinds, so a shuffled loader is fine."""
    torch.manual_seed(0)
    model = MLP(3, 4, 3).to(DT)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 3, generator=g, dtype=DT), torch.randint(0, 3, (4,), generator=g))]
    data.append((torch.randn(4, 3, generator=g, dtype=DT), torch.randint(0, 3, (4,), generator=g)))
    F = diagonal_fisher(model, nn.CrossEntropyLoss(), _shuffled_loader(data), kind=kind,
                        progress=False)  # fmt: skip
    assert rel_err(F.diagonal(), brute_force(model, nn.CrossEntropyLoss(), data, kind)) < 1e-10
