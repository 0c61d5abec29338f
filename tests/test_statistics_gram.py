"""Input Gram matrices (RegMean's statistic) against Gram matrices built by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvmerge.space import SpaceMismatchError
from curvmerge.statistics.files import load_grams, save_grams
from curvmerge.statistics.gram import input_grams

DT = torch.float64


def _aug(X):
    return torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], 1)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2, bias=False)).double()


def test_linear_grams_equal_xtx_by_hand():
    model = _mlp()
    xs = [torch.randn(5, 3, dtype=DT), torch.randn(2, 3, dtype=DT)]
    data = [(x, torch.zeros(len(x))) for x in xs]
    g = input_grams(model, data)
    X = torch.cat(xs)
    H = torch.tanh(model[0](X)).detach()
    torch.testing.assert_close(g.grams["0"], _aug(X).T @ _aug(X))
    torch.testing.assert_close(g.grams["2"], H.T @ H)
    assert g.grams["0"].dtype == DT and g.num_rows == {"0": 7, "2": 7}
    assert g.weight_names == {"0": "0.weight", "2": "2.weight"}
    assert g.bias_names == {"0": "0.bias", "2": None}
    assert g.unsupported == [] and g.num_examples == 7


def test_float32_at_least_and_unsupported_reported():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)).to(torch.bfloat16)
    x = torch.randn(4, 3)
    g = input_grams(model, [(x, torch.zeros(4))])
    assert g.grams["0"].dtype == torch.float32
    assert g.unsupported == ["1.weight", "1.bias"]
    with pytest.raises(ValueError, match="no selected parameter belongs to a supported layer"):
        input_grams(model, [(x, torch.zeros(4))], params=["1.weight"])


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_conv_grams_equal_unfolded_inputs(padding_mode):
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, (2, 3), stride=(1, 2), padding=1, padding_mode=padding_mode).double()
    conv1 = nn.Conv1d(2, 2, 3, dilation=2, bias=False).double()
    x = torch.randn(3, 2, 5, 6, dtype=DT)
    g = input_grams(conv, [(x, torch.zeros(3))])
    mode = "constant" if padding_mode == "zeros" else "reflect"
    xp = nn.functional.pad(x, (1, 1, 1, 1), mode=mode)
    U = nn.functional.unfold(xp, (2, 3), stride=(1, 2)).transpose(1, 2).reshape(-1, 12)
    torch.testing.assert_close(g.grams[""], _aug(U).T @ _aug(U))
    assert g.num_rows[""] == U.shape[0]
    s = torch.randn(2, 2, 9, dtype=DT)
    g1 = input_grams(conv1, [(s, torch.zeros(2))])
    rows = torch.stack([s[:, :, t : t + 5 : 2].reshape(2, 6) for t in range(5)], 1).reshape(-1, 6)
    torch.testing.assert_close(g1.grams[""], rows.T @ rows)


class TinyTokenModel(nn.Module):
    """Embedding, a per-token linear layer, masked mean pooling and a head (HF-style call)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 3)
        self.proj = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, input_ids, attention_mask):
        h = torch.relu(self.proj(self.emb(input_ids)))
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


def test_padding_rows_are_excluded_in_a_token_model():
    torch.manual_seed(2)
    model = TinyTokenModel().double()
    ids = torch.randint(1, 7, (3, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    ids[mask == 0] = 0
    data = [({"input_ids": ids[:2], "attention_mask": mask[:2]}, torch.zeros(2))]
    data.append(({"input_ids": ids[2:], "attention_mask": mask[2:]}, torch.zeros(1)))
    g = input_grams(model, data, params=r"proj\..*|head\.weight")
    ref = torch.zeros(4, 4, dtype=DT)
    for b in range(3):
        for t in range(5):
            if mask[b, t]:
                x = _aug(model.emb(ids[b, t]).detach().unsqueeze(0))[0]
                ref += torch.outer(x, x)
    torch.testing.assert_close(g.grams["proj"], ref)
    assert g.num_rows == {"proj": 9, "head": 3}
    assert g.bias_names == {"proj": "proj.bias", "head": None}
    assert g.unsupported == []  # head.bias, emb.weight not selected


def test_save_load_round_trip_and_mismatches(tmp_path):
    model = _mlp()
    x = torch.randn(6, 3, dtype=DT)
    g = input_grams(model, [(x, torch.zeros(6))])
    path = tmp_path / "grams.safetensors"
    save_grams(path, g, {"task": "a"})
    h = load_grams(path, model, metadata={"task": "a"})
    assert list(h.grams) == list(g.grams) and h.layers == g.layers
    for k in g.grams:
        torch.testing.assert_close(h.grams[k], g.grams[k], rtol=0, atol=0)
    assert h.num_rows == g.num_rows and h.num_examples == 6
    with pytest.raises(ValueError, match=r"saved with task='a', expected task='b'"):
        load_grams(path, metadata={"task": "b"})
    other = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2, bias=False)).double()
    with pytest.raises(SpaceMismatchError, match=r"layer '0' maps 3 -> 4 .* but 5 -> 4"):
        load_grams(path, other)
    with pytest.raises(ValueError, match="reserved"):
        save_grams(path, g, {"layers": "x"})
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, bad, metadata={"format": "other"})
    with pytest.raises(ValueError, match="not a curvmerge Gram file"):
        load_grams(bad)


def test_a_layer_called_twice_adds_the_rows_of_both_calls():
    torch.manual_seed(4)
    lin = nn.Linear(3, 3).double()
    model = nn.Sequential()
    model.forward = lambda x: lin(torch.tanh(lin(x)))  # noqa: E731 (one shared layer)
    model.lin = lin
    x = torch.randn(4, 3, dtype=DT)
    g = input_grams(model, [(x, torch.zeros(4))])
    h = torch.tanh(lin(x)).detach()
    X = _aug(torch.cat([x, h]))
    torch.testing.assert_close(g.grams["lin"], X.T @ X)
    assert g.num_rows == {"lin": 8}


def test_layers_never_called_are_reported_not_zero():
    torch.manual_seed(5)

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)  # F.linear(out_proj)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))

    model = Attn().double().eval()
    x = torch.randn(3, 5, 4, dtype=DT)
    g = input_grams(model, [(x, torch.zeros(3))])
    assert list(g.grams) == ["head"]
    assert "attn.out_proj.weight" in g.unsupported and "attn.in_proj_weight" in g.unsupported
    with pytest.raises(ValueError, match="was called on the data"):
        input_grams(model, [(x, torch.zeros(3))], params=r"attn\..*")


@pytest.mark.slow
def test_bert_grams_equal_the_unpadded_examples_one_by_one():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=30,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        num_labels=3,
        attn_implementation="eager",
    )
    model = transformers.BertForSequenceClassification(cfg).double().eval()
    ids = torch.randint(1, 30, (3, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    g = input_grams(model, [({"input_ids": ids, "attention_mask": mask}, torch.zeros(3))])
    query = model.bert.encoder.layer[0].attention.self.query
    rows = []
    hook = query.register_forward_hook(lambda mod, args, out: rows.append(args[0][0]))
    with torch.no_grad():
        for b in range(3):
            n = int(mask[b].sum())
            model(input_ids=ids[b : b + 1, :n], attention_mask=mask[b : b + 1, :n])
    hook.remove()
    X = _aug(torch.cat(rows))
    name = "bert.encoder.layer.0.attention.self.query"
    torch.testing.assert_close(g.grams[name], X.T @ X)
    assert g.num_rows[name] == 12 and g.num_rows["classifier"] == 3
    assert "bert.embeddings.word_embeddings.weight" in g.unsupported
