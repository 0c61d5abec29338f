"""Data-adaptive weight ensembling: the entropy's gradient in the network's parameters, the
reduction to task arithmetic, per-batch and per-input merges, labels never read, saving and
zero-shot transfer, feature extractors, the registry row."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from curvmerge.merging import (
    get_method,
    load_coefficient_network,
    save_coefficient_network,
    task_arithmetic,
    weight_ensembling,
)
from curvmerge.merging.adamerging import run_task_model
from curvmerge.merging.features import feature_extractor, pool_features
from curvmerge.merging.weight_ensembling import (
    AdaptiveMergedModel,
    CoefficientNetwork,
    WeightEnsemblingObjective,
    WeightEnsemblingResult,
)
from tests.test_merging_adamerging import BODY, D, _data, _pool


def _objective(granularity="layer", **kw):
    base, models = _pool()
    return WeightEnsemblingObjective(
        models, base, _data(), granularity=granularity, params=BODY,
        network_options={"hidden": 5, "depth": 2, "seed": 3}, **kw,
    )  # fmt: skip


def _constant(net: CoefficientNetwork, value) -> CoefficientNetwork:
    """``net`` made to output ``value`` ([T, G] or a number) for every input."""
    with torch.no_grad():
        net.mlp[-1].weight.zero_()
        v = torch.as_tensor(value, dtype=net.mlp[-1].bias.dtype)
        net.mlp[-1].bias.copy_(v.expand(net.num_models, net.num_groups).reshape(-1))
    return net


# ------------------------------------------------------------------ the objective
@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_entropy_gradient_in_the_network_equals_finite_differences(granularity):
    obj = _objective(granularity, clamp=False)
    net = obj.network
    with torch.no_grad():  # weights large enough that the coefficients vary per input
        for p in net.parameters():
            p.mul_(30.0)
    params = dict(net.named_parameters())

    def f():
        return obj([0, 2, 1])[0]

    grads = torch.autograd.grad(f(), list(params.values()))
    assert max(float(g.abs().max()) for g in grads) > 1e-4  # not a vacuous comparison
    eps = 1e-6
    g = torch.Generator().manual_seed(0)
    for (name, p), grad in zip(params.items(), grads, strict=True):
        flat = p.detach().view(-1)
        for i in torch.randperm(flat.numel(), generator=g)[:4].tolist():
            with torch.no_grad():
                flat[i] += eps
                up = float(f())
                flat[i] -= 2 * eps
                down = float(f())
                flat[i] += eps
            fd = (up - down) / (2 * eps)
            assert abs(float(grad.view(-1)[i]) - fd) <= 1e-6 * max(1.0, abs(fd)), name


@pytest.mark.parametrize("per", ["batch", "input"])
def test_a_constant_network_is_task_arithmetic_and_layer_wise_equal_is_task_wise(per):
    base, models = _pool()
    data = _data()
    x = torch.randn(5, 4, dtype=D, generator=torch.Generator().manual_seed(9))
    outs = {}
    for granularity in ("task", "layer"):
        res = weight_ensembling(
            models, base, data, granularity=granularity, steps=0, per=per, params=BODY
        )
        _constant(res.network, 0.45)
        outs[granularity] = [res.task_model(k)(x) for k in range(3)]
    merged = task_arithmetic(models, base, scaling=0.45, params=BODY).params
    for k, model in enumerate(models):
        ref = copy.deepcopy(model)
        ref.load_state_dict(merged, strict=False)
        torch.testing.assert_close(outs["task"][k], ref(x), rtol=0, atol=1e-12)
        assert torch.equal(outs["task"][k], outs["layer"][k])  # bit for bit


def test_zero_steps_start_at_task_arithmetic_with_init():
    base, models = _pool()
    res = weight_ensembling(models, base, _data(), steps=0, init=0.3, params=BODY)
    lam = torch.tensor(res.report.coefficients)
    torch.testing.assert_close(lam, torch.full_like(lam, 0.3), rtol=0, atol=0.05)  # ~ init
    assert res.report.steps == 0 and res.report.history == []


# ------------------------------------------------------------------ merges per batch / input
def test_each_batch_is_merged_with_its_own_coefficients():
    base, models = _pool()
    res = weight_ensembling(models, base, _data(), steps=30, lr=5e-2, params=BODY, clamp=False)
    member = res.task_model(1)
    assert isinstance(member, AdaptiveMergedModel) and isinstance(res, WeightEnsemblingResult)
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(6, 4, dtype=D, generator=gen)
    b = 3.0 * torch.randn(6, 4, dtype=D, generator=gen)
    extract = member.adaptive.extractor
    merger = member.adaptive.merger
    for x in (a, b):  # by hand: features, network, mean over the batch, merge, model 1
        lam = res.network(extract(x)).mean(0)
        own = {n: p.detach() for n, p in models[1].named_parameters()}
        want = run_task_model(models[1], {**own, **merger.merged(lam)}, x)
        torch.testing.assert_close(member(x), want, rtol=1e-12, atol=1e-12)
    la, lb = (res.network(extract(x)).mean(0) for x in (a, b))
    assert (la - lb).abs().max() > 1e-3  # the coefficients depend on the batch
    spread = torch.tensor(res.report.coefficient_spread)
    assert spread.max() > 0  # and they differ between the adaptation batches


def test_per_input_merges_each_example_alone():
    base, models = _pool()
    kw = dict(steps=10, lr=5e-2, params=BODY)
    per_input = weight_ensembling(models, base, _data(), per="input", **kw)
    x = torch.randn(4, 4, dtype=D, generator=torch.Generator().manual_seed(5))
    batch = AdaptiveMergedModel(
        models[2],
        type(per_input.task_model(2).adaptive)(
            per_input.task_model(2).adaptive.merger,
            per_input.network,
            per_input.task_model(2).adaptive.extractor,
            per="batch",
        ),
    )
    want = torch.cat([batch(x[i : i + 1]) for i in range(4)])  # a batch of one = one input
    torch.testing.assert_close(per_input.task_model(2)(x), want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ the method
def test_no_label_is_read_and_seeded_runs_are_identical():
    base, models = _pool()

    class Poison:
        def __getattr__(self, name):
            raise AssertionError(f"a target was read ({name})")

    runs = [
        weight_ensembling(models, base, _data(labels=labels), steps=12, lr=5e-2, params=BODY)
        for labels in (
            lambda t, k: torch.zeros(8, dtype=torch.long),
            lambda t, k: torch.randint(0, 3, (8,)),
            lambda t, k: Poison(),
        )
    ]
    first = runs[0].network.state_dict()
    start = weight_ensembling(models, base, _data(), steps=0, params=BODY).network.state_dict()
    assert any(not torch.equal(first[k], start[k]) for k in first)  # it learned something
    for r in runs[1:]:
        state = r.network.state_dict()
        assert all(torch.equal(state[k], first[k]) for k in first)  # bit for bit


def test_adaptation_lowers_the_entropy_and_reports_its_cost():
    base, models = _pool()
    res = weight_ensembling(models, base, _data(), steps=40, lr=2e-2, params=BODY)
    r = res.report
    assert r.entropy_after < r.entropy_before
    assert len(r.history) == 40 and r.examples == [24, 24, 24]
    assert r.adaptation_seconds > 0 and r.evaluation_seconds > 0 and r.cost_ratio > 1
    assert r.peak_memory is None or r.peak_memory >= 0
    info = r.learned()
    assert info["coefficients"] == r.coefficients and info["network"] == r.network
    assert len(r.coefficients) == 3 and len(r.coefficients[0]) == len(r.groups) == 4


def test_models_are_not_modified():
    base, models = _pool()
    before = [copy.deepcopy(m.state_dict()) for m in models]
    weight_ensembling(models, base, _data(), steps=5, lr=5e-2, params=BODY)
    for m, b in zip(models, before, strict=True):
        assert all(torch.equal(v, b[k]) for k, v in m.state_dict().items())


# ------------------------------------------------------------------ saving and transfer
def test_a_saved_network_reloads_and_transfers_to_another_pool(tmp_path):
    base, models = _pool()
    res = weight_ensembling(models, base, _data(), steps=10, lr=5e-2, params=BODY)
    path = tmp_path / "net.safetensors"
    res.save(path, metadata={"note": "pool A"})
    net, groups, meta = load_coefficient_network(path)
    assert groups == res.report.groups and meta["note"] == "pool A"
    assert meta["granularity"] == "layer"
    state = res.network.state_dict()
    assert all(torch.equal(v.to(state[k].dtype), state[k]) for k, v in net.state_dict().items())

    # another pool of the same architecture: the saved network, applied as it is
    other_base, other = _pool()
    with torch.no_grad():
        for m in other:
            for p in m.body.parameters():
                p.add_(0.1)
    kept = copy.deepcopy(net.state_dict())
    out = weight_ensembling(other, other_base, _data(), network=net, steps=0, params=BODY)
    assert all(torch.equal(v, kept[k]) for k, v in net.state_dict().items())  # not modified
    x = torch.randn(5, 4, dtype=D, generator=torch.Generator().manual_seed(8))
    member = out.task_model(0)
    lam = net.to(D)(member.adaptive.extractor(x)).clamp(0, 1).mean(0)
    merged = member.adaptive.merger.merged(lam)
    torch.testing.assert_close(  # the merge is of the other pool's task vectors
        merged["body.0.weight"],
        other_base.body[0].weight
        + sum(
            lam[t, 0] * (m.body[0].weight - other_base.body[0].weight) for t, m in enumerate(other)
        ),
    )
    own = {n: p.detach() for n, p in other[0].named_parameters()}
    torch.testing.assert_close(
        member(x), run_task_model(other[0], {**own, **merged}, x), rtol=1e-12, atol=1e-12
    )
    assert out.report.options["network"] == "given" and out.report.options["init"] is None
    assert res.report.options["network"] == "new" and res.report.options["init"] == 0.3
    # adapting from a given network leaves the caller's network as it was
    weight_ensembling(other, other_base, _data(), network=net, steps=3, lr=1e-1, params=BODY)
    assert all(torch.equal(v, kept[k].to(v.dtype)) for k, v in net.state_dict().items())


def test_a_network_that_does_not_fit_is_refused(tmp_path):
    base, models = _pool()
    res = weight_ensembling(models, base, _data(), granularity="task", steps=0, params=BODY)
    with pytest.raises(ValueError, match=r"num_groups 1 \(these models: 4\)"):
        weight_ensembling(models, base, _data(), network=res.network, steps=0, params=BODY)
    with pytest.raises(ValueError, match=r"num_models 3 \(these models: 2\)"):
        weight_ensembling(
            models[:2], base, _data()[:2], granularity="task", network=res.network, params=BODY
        )
    with pytest.raises(TypeError, match="CoefficientNetwork"):
        weight_ensembling(models, base, _data(), network=nn.Linear(2, 2), params=BODY)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a file")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_coefficient_network(bad)
    with pytest.raises(ValueError, match="3 groups for a network with 1"):
        save_coefficient_network(tmp_path / "x.safetensors", res.network, [["a"], ["b"], ["c"]])


def test_bad_options_raise_clear_errors():
    base, models = _pool()
    data = _data()
    with pytest.raises(ValueError, match="per must be one of"):
        weight_ensembling(models, base, data, per="example", params=BODY)
    with pytest.raises(ValueError, match="features must be one of"):
        weight_ensembling(models, base, data, features="cls", params=BODY)
    with pytest.raises(ValueError, match="mean_tokens' needs a Hugging Face model"):
        weight_ensembling(models, base, data, features="mean_tokens", params=BODY)
    with pytest.raises(ValueError, match="steps must be >= 0"):
        weight_ensembling(models, base, data, steps=-1, params=BODY)
    with pytest.raises(ValueError, match="needs the base model"):
        weight_ensembling(models, None, data, params=BODY)
    with pytest.raises(ValueError, match="depth must be an integer"):
        CoefficientNetwork(4, 3, 1, depth=-1)


# ------------------------------------------------------------------ feature extractors
def test_penultimate_features_are_the_last_linear_layers_input():
    base, models = _pool()
    x = torch.randn(7, 4, dtype=D)
    feats = feature_extractor("penultimate", base)(x)
    torch.testing.assert_close(feats, base.body(x), rtol=0, atol=0)
    # a module or callable is used as it is; its [N, T, D] output is pooled over T
    seq = feature_extractor(lambda inp: inp.reshape(7, 2, 2))(x)
    torch.testing.assert_close(seq, x.reshape(7, 2, 2).mean(1))


def test_pooling_keeps_only_the_tokens_the_attention_mask_keeps():
    x = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = pool_features(x, {"attention_mask": mask})
    torch.testing.assert_close(out[0], x[0, :2].mean(0))
    torch.testing.assert_close(out[1], x[1, 0])
    assert pool_features(x.double(), None).dtype == torch.float64
    assert pool_features(x.half(), None).dtype == torch.float32  # at least float32


def test_mean_token_features_of_a_hugging_face_model():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, max_position_embeddings=16, num_labels=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    batch = {
        "input_ids": torch.randint(0, 50, (2, 5)),
        "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
    }
    feats = feature_extractor("mean_tokens", model)(batch)
    hidden = model.bert(**batch).last_hidden_state
    torch.testing.assert_close(feats[0], hidden[0, :3].mean(0))
    torch.testing.assert_close(feats[1], hidden[1].mean(0))
    pen = feature_extractor("penultimate", model)(batch)  # the classifier's input: pooled CLS
    torch.testing.assert_close(pen, model.bert(**batch).pooler_output)


# ------------------------------------------------------------------ registry
def test_registry_row():
    spec = get_method("weight_ensembling")
    assert spec.statistics == "data" and spec.needs_base and not spec.is_merge
    assert spec.grid == ()
    base, models = _pool()
    data = _data()
    out = spec(models, base=base, curvatures=data, params=BODY, steps=4, lr=1e-2, hidden=5)
    direct = weight_ensembling(models, base, data, steps=4, lr=1e-2, hidden=5, params=BODY)
    assert out.report.coefficients == direct.report.coefficients
    assert out.kind == "adaptive"


def test_a_feature_model_in_training_mode_is_refused():
    # the features are computed once for the adaptation and again at every evaluation: a
    # base in training mode with dropout gave other features each time, and its batch norm
    # updated the caller's running statistics (fails on 3f88e38)
    base, models = _pool()
    noisy = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Linear(6, 3))  # training mode
    with pytest.raises(ValueError, match="feature model.*model.eval"):
        feature_extractor("penultimate", noisy)
    bn = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6)).to(D)
    with pytest.raises(ValueError, match="feature model.*batch statistics"):
        weight_ensembling(models, base, _data(), features=bn, steps=0, params=BODY)
    feature_extractor("penultimate", noisy.eval())  # in eval mode: accepted


class _Renamed(nn.Module):
    """The test pool's network with its body under another name (same shapes)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.trunk, self.head = net.body, net.head

    def forward(self, x):
        return self.head(self.trunk(x))


def test_a_network_is_refused_on_other_merged_parameters(tmp_path):
    # the groups saved with a network were never compared with the pool's: a layer-wise
    # network applied to another selection of as many tensors (here: other names) gave
    # each tensor another tensor's coefficient, silently (fails on c2eb1cb)
    base, models = _pool()
    res = weight_ensembling(models, base, _data(), steps=0, params=BODY)
    path = tmp_path / "net.safetensors"
    res.save(path)
    loaded, groups, _ = load_coefficient_network(path)
    other = [_Renamed(m).eval() for m in models]
    for net in (res.network, loaded):
        with pytest.raises(ValueError, match=r"group 0 is \['body.0.weight'\] there"):
            weight_ensembling(other, _Renamed(base), _data(), network=net, steps=0,
                              params=r"^trunk\.")  # fmt: skip
    # the same parameters: accepted (and a network built by hand has no groups to check)
    weight_ensembling(models, base, _data(), network=loaded, steps=0, params=BODY)
    fresh = CoefficientNetwork(5, 3, 4, dtype=D)
    weight_ensembling(other, _Renamed(base), _data(), network=fresh, steps=0, params=r"^trunk\.")
