"""The per-layer hook engine: layer discovery, input rows, padding rows, output gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvmerge.statistics.layers import LayerHooks, find_layers, row_mask
from tests.helpers import Conv1D

DT = torch.float64


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.hf = Conv1D(4, 3)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2, bias=False)

    def forward(self, x):  # x [B, 2, 4, 4]
        h = self.conv(x).flatten(2).transpose(1, 2)  # [B, 16, 3]
        return self.head(self.norm(self.hf(h))).sum(1)


def test_find_layers_maps_layers_to_parameters_and_reports_the_rest():
    model = Mixed().double()
    names = [n for n, _ in model.named_parameters()]
    layers, unsupported = find_layers(model, names)
    assert list(layers) == ["conv", "hf", "head"]
    assert (layers["conv"].weight, layers["conv"].bias) == ("conv.weight", "conv.bias")
    assert (layers["conv"].d_in, layers["conv"].d_out, layers["conv"].size) == (18, 3, 19)
    assert (layers["hf"].kind, layers["hf"].d_in, layers["hf"].d_out) == ("hf_conv1d", 3, 4)
    assert layers["head"].bias is None and layers["head"].size == 4
    assert unsupported == ["norm.weight", "norm.bias"]
    # a bias without its weight is not a layer; a weight without its bias has bias None
    layers, unsupported = find_layers(model, ["conv.bias", "hf.weight"])
    assert list(layers) == ["hf"] and layers["hf"].bias is None
    assert unsupported == ["conv.bias"]


def test_tied_weights_are_reported_and_grouped_convs_refused():
    emb = nn.Embedding(5, 3)
    head = nn.Linear(3, 5, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    layers, unsupported = find_layers(model, ["emb.weight"])
    assert layers == {} and unsupported == ["emb.weight"]
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match=r"layer '0'.*groups=2"):
        find_layers(grouped, ["0.weight"])


def test_one_module_registered_under_two_names_is_one_layer():
    """A module reachable under two names holds its weight alone: it is one layer (first
    name), and its calls add their rows, not a tied parameter left to averaging."""
    lin = nn.Linear(3, 3, dtype=DT)
    model = nn.Sequential(lin, nn.Tanh(), lin)
    layers, unsupported = find_layers(model, [n for n, _ in model.named_parameters()])
    assert list(layers) == ["0"] and unsupported == []
    assert (layers["0"].weight, layers["0"].bias) == ("0.weight", "0.bias")
    seen = []
    x = torch.randn(2, 3, dtype=DT)
    with LayerHooks(model, layers, lambda info, rows: seen.append(rows)) as hooks:
        hooks.start(x)
        model(x)
    assert len(seen) == 2
    torch.testing.assert_close(seen[0], x)
    torch.testing.assert_close(seen[1], torch.tanh(lin(x)).detach())


def test_rows_of_linear_and_conv_and_padding_mask():
    torch.manual_seed(0)
    model = Mixed().double()
    layers, _ = find_layers(model, [n for n, _ in model.named_parameters()])
    seen = {}
    x = torch.randn(2, 2, 4, 4, dtype=DT)
    with LayerHooks(model, layers, lambda info, r: seen.setdefault(info.module, r)) as hooks:
        hooks.start(x)
        model(x)
    U = nn.functional.unfold(x, 3, padding=1)  # [B, 18, 16]
    torch.testing.assert_close(seen["conv"], U.transpose(1, 2).reshape(-1, 18))
    assert seen["hf"].shape == (32, 3) and seen["head"].shape == (32, 4)

    lin = nn.Linear(3, 2).double()
    layers, _ = find_layers(lin, ["weight", "bias"])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    ids = torch.randn(2, 3, 3, dtype=DT)
    rows = []
    with LayerHooks(lin, layers, lambda info, r: rows.append(r)) as hooks:
        hooks.start({"x": ids, "attention_mask": mask})
        lin(ids)  # [B, T, d]: padding dropped
        lin(ids.reshape(6, 3))  # [B * T, d] flattened: padding dropped
        lin(ids.transpose(0, 1))  # [T, B, d] sequence first: padding dropped
        lin(ids[:, 0])  # [B, d] pooled: every row
    torch.testing.assert_close(rows[0], ids[mask.bool()])
    torch.testing.assert_close(rows[1], ids[mask.bool()])
    torch.testing.assert_close(rows[2], ids.transpose(0, 1)[mask.T.bool()])
    torch.testing.assert_close(rows[3], ids[:, 0])
    assert row_mask(ids) is None and row_mask({"input_ids": ids}) is None


def test_output_grads_survive_in_place_activations():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)).double()
    layers, _ = find_layers(model, [n for n, _ in model.named_parameters()])
    x = torch.randn(5, 3, dtype=DT)
    V = torch.randn(2, 5, 2, dtype=DT)
    for p in model.parameters():
        p.requires_grad_(True)
    with LayerHooks(model, layers, keep_outputs=True) as hooks:
        hooks.start(x)
        out = model(x)
        batched = hooks.output_grads(out, V, batched=True)
        single = hooks.output_grads(out, V[1])
    # by hand: d out / d h1 = V W2, through the ReLU mask
    h1 = model[0](x)
    g1 = (V @ model[2].weight) * (h1 > 0)
    torch.testing.assert_close(batched[0], g1.detach())
    torch.testing.assert_close(batched[1], V)
    torch.testing.assert_close(single[0], g1[1].detach())
