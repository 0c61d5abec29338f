"""AdaMerging: the entropy's gradient, layer-wise vs task-wise, labels never read, the
learned merge, seeds, the registry row and the experiment runner."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from curvmerge.merging import adamerging, get_method, task_arithmetic
from curvmerge.merging.adamerging import AdaMergingObjective, AdaMergingReport

D = torch.float64
BODY = r"^body\."


class Net(nn.Module):
    def __init__(self, classes: int, seed: int, dtype=D):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh())
        self.head = nn.Linear(5, classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self.to(dtype)

    def forward(self, x):
        return self.head(self.body(x))


def _pool(dtype=D, classes=(3, 2, 4)):
    base = Net(3, 0, dtype)
    models = []
    for t, c in enumerate(classes):
        m = Net(c, 10 + t, dtype)
        g = torch.Generator().manual_seed(20 + t)
        with torch.no_grad():
            for n, p in m.body.named_parameters():  # fine-tuned from the base's body
                b = dict(base.body.named_parameters())[n]
                p.copy_(b + 0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        models.append(m.eval())
    return base, models


def _data(n_batches=3, size=8, dtype=D, labels=lambda t, k: torch.zeros(8, dtype=torch.long)):
    out = []
    for t in range(3):
        g = torch.Generator().manual_seed(100 + t)
        out.append(
            [
                (torch.randn(size, 4, generator=g, dtype=dtype), labels(t, k))
                for k in range(n_batches)
            ]
        )
    return out


def _entropy_fn(obj, batches=None):
    return lambda lam: obj(lam, batches)[0]


# ------------------------------------------------------------------ the objective
@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_entropy_gradient_equals_finite_differences(granularity):
    base, models = _pool()
    obj = AdaMergingObjective(models, base, _data(), granularity=granularity, params=BODY)
    g = torch.Generator().manual_seed(0)
    lam = (0.2 + 0.6 * torch.rand(3, obj.num_groups, generator=g, dtype=D)).requires_grad_(True)
    f = _entropy_fn(obj, [0, 2, 1])
    (grad,) = torch.autograd.grad(f(lam), lam)
    assert grad.abs().max() > 1e-3  # not a vacuous comparison
    eps = 1e-6
    fd = torch.zeros_like(grad)
    with torch.no_grad():
        for i in range(lam.shape[0]):
            for j in range(lam.shape[1]):
                e = torch.zeros_like(lam)
                e[i, j] = eps
                fd[i, j] = (f(lam + e) - f(lam - e)) / (2 * eps)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-9)


def test_layer_wise_with_equal_coefficients_is_task_wise():
    base, models = _pool()
    data = _data()
    task = AdaMergingObjective(models, base, data, granularity="task", params=BODY)
    layer = AdaMergingObjective(models, base, data, granularity="layer", params=BODY)
    assert task.num_groups == 1 and layer.num_groups == 4  # body.0 and body.2, weight and bias
    assert layer.groups == [[n] for n in task.groups[0]]
    lam = torch.tensor([0.3, 0.7, 0.45], dtype=D)
    a, b = task.merged(task.full(lam)), layer.merged(layer.full(lam))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)  # bit for bit
    (ea, ta), (eb, tb) = task(task.full(lam)), layer(layer.full(lam))
    assert torch.equal(ea, eb) and torch.equal(ta, tb)
    # and task-wise is task arithmetic with the coefficients as weights
    ta_merge = task_arithmetic(models, base, weights=lam.tolist(), params=BODY).params
    for n in a:
        torch.testing.assert_close(a[n], ta_merge[n], rtol=0, atol=1e-12)
    # unequal layer coefficients give another merge
    other = layer.full(lam)
    other[:, 0] += 0.1
    assert not torch.equal(layer.merged(other)["body.0.weight"], a["body.0.weight"])


def test_zero_steps_give_the_initial_merge_in_both_granularities():
    base, models = _pool()
    outs = [
        adamerging(models, base, _data(), granularity=g, steps=0, init=0.3, params=BODY)
        for g in ("task", "layer")
    ]
    ta = task_arithmetic(models, base, scaling=0.3, params=BODY).params
    for n in ta:
        assert torch.equal(outs[0].params[n], outs[1].params[n])
        torch.testing.assert_close(outs[0].params[n], ta[n], rtol=0, atol=1e-12)
    assert outs[0].report.entropy_before == outs[1].report.entropy_before


def test_entropy_is_the_mean_over_tasks_of_each_tasks_mean_entropy():
    base, models = _pool()
    data = _data(n_batches=2)
    obj = AdaMergingObjective(models, base, data, granularity="task", params=BODY)
    lam = obj.full(0.4)
    merged = task_arithmetic(models, base, scaling=0.4, params=BODY).params
    want = []
    for model, batches in zip(models, data, strict=True):
        m = copy.deepcopy(model)
        m.load_state_dict(merged, strict=False)
        x = torch.cat([b[0] for b in batches])
        p = torch.softmax(m(x), -1)
        want.append(-(p * p.log()).sum(-1).mean())
    total, per_task = obj(lam)
    torch.testing.assert_close(per_task, torch.stack(want).detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(total, torch.stack(want).mean().detach(), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ the method
def test_no_label_is_read():
    base, models = _pool()

    class Poison:
        def __getattr__(self, name):
            raise AssertionError(f"a target was read ({name})")

    def random_labels(t, k):
        return torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(7 * t + k))

    runs = [
        adamerging(models, base, _data(labels=labels), steps=15, lr=5e-2, params=BODY)
        for labels in (
            lambda t, k: torch.zeros(8, dtype=torch.long),
            random_labels,
            lambda t, k: None,
            lambda t, k: Poison(),
        )
    ]
    first = runs[0]
    assert first.report.coefficients != [[0.3] * 4] * 3  # it learned something
    for r in runs[1:]:
        assert r.report.coefficients == first.report.coefficients
        assert all(torch.equal(r.params[n], first.params[n]) for n in first.params)


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_the_learned_merge_lowers_the_entropy(granularity):
    base, models = _pool()
    out = adamerging(models, base, _data(), granularity=granularity, steps=40, lr=2e-2, params=BODY)
    rep = out.report
    assert isinstance(rep, AdaMergingReport)
    assert rep.entropy_after < rep.entropy_before - 1e-3
    assert len(rep.history) == rep.steps == 40 and rep.history[-1] < rep.history[0]
    assert rep.examples == [24, 24, 24]
    assert rep.adaptation_seconds > 0 and rep.evaluation_seconds > 0 and rep.cost_ratio > 0
    assert rep.options["granularity"] == granularity and rep.options["lr"] == 2e-2
    G = 1 if granularity == "task" else 4
    assert len(rep.coefficients) == 3 and all(len(row) == G for row in rep.coefficients)
    assert all(0.0 <= c <= 1.0 for row in rep.coefficients for c in row)  # clamped
    assert rep.weights == pytest.approx([sum(r) / G for r in rep.coefficients])
    # the result is the merge at the reported coefficients, in the models' dtype
    obj = AdaMergingObjective(models, base, _data(), granularity=granularity, params=BODY)
    want = obj.merged(torch.tensor(rep.coefficients, dtype=D))
    assert set(out.params) == set(want) and all(torch.equal(out.params[n], want[n]) for n in want)
    assert all(v.dtype == D and not v.requires_grad for v in out.params.values())
    assert f"{granularity}-wise" in str(rep)


def test_models_are_not_modified_and_each_keeps_its_head():
    base, models = _pool()
    before = [copy.deepcopy(m.state_dict()) for m in models]
    out = adamerging(models, base, _data(), steps=5, lr=1e-2, params=BODY)
    for m, s in zip(models, before, strict=True):
        assert all(torch.equal(m.state_dict()[k], s[k]) for k in s)
        assert all(p.grad is None for p in m.parameters())
    assert not any(n.startswith("head.") for n in out.params)


def test_clamping_keeps_coefficients_in_the_unit_interval_and_can_be_turned_off():
    base, models = _pool()
    kw = dict(granularity="task", steps=30, lr=0.5, params=BODY)
    clamped = adamerging(models, base, _data(), **kw).report.coefficients
    free = adamerging(models, base, _data(), clamp=False, **kw).report.coefficients
    assert all(0.0 <= c <= 1.0 for row in clamped for c in row)
    assert any(c < 0.0 or c > 1.0 for row in free for c in row)


def test_seeded_runs_are_identical_and_the_seed_orders_the_batches():
    base, models = _pool()
    runs = [
        adamerging(models, base, _data(), steps=7, lr=5e-2, seed=s, params=BODY) for s in (3, 3, 4)
    ]
    assert runs[0].report.coefficients == runs[1].report.coefficients
    assert runs[0].report.history == runs[1].report.history
    assert all(torch.equal(runs[0].params[n], runs[1].params[n]) for n in runs[0].params)
    assert runs[0].report.history != runs[2].report.history


def test_weights_scale_the_initial_coefficients():
    base, models = _pool()
    out = adamerging(
        models, base, _data(), granularity="task", steps=0, weights=[1, 0, 2], params=BODY
    )
    assert [row[0] for row in out.report.coefficients] == pytest.approx([0.3, 0.0, 0.6])


def test_dict_batches_and_outputs_with_logits():
    class Text(nn.Module):
        def __init__(self, classes, seed):
            super().__init__()
            g = torch.Generator().manual_seed(seed)
            self.embed = nn.Embedding(11, 4)
            self.classifier = nn.Linear(4, classes)
            with torch.no_grad():
                for p in self.parameters():
                    p.copy_(torch.randn(p.shape, generator=g))

        def forward(self, input_ids, attention_mask):
            h = (self.embed(input_ids) * attention_mask[..., None]).sum(1)
            return SimpleNamespace(logits=self.classifier(h))

    base, models = Text(2, 0), [Text(2, 1), Text(3, 2)]
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(0, 11, (5, 6), generator=g),
        "attention_mask": torch.ones(5, 6),
    }
    data = [[(batch, torch.zeros(5))], [(batch, torch.zeros(5))]]
    out = adamerging(models, base, data, steps=10, lr=5e-2, params=r"^embed\.")
    assert set(out.params) == {"embed.weight"}
    assert out.report.entropy_after < out.report.entropy_before


# ------------------------------------------------------------------ errors
def test_bad_inputs_raise_clear_errors():
    base, models = _pool()
    data = _data()
    with pytest.raises(ValueError, match="granularity must be one of 'task', 'layer'"):
        adamerging(models, base, data, granularity="block", params=BODY)
    with pytest.raises(ValueError, match="steps must be >= 0"):
        adamerging(models, base, data, steps=-1, params=BODY)
    with pytest.raises(ValueError, match="lr must be > 0"):
        adamerging(models, base, data, lr=0.0, params=BODY)
    with pytest.raises(ValueError, match="init must be finite"):
        adamerging(models, base, data, init=float("nan"), params=BODY)
    with pytest.raises(ValueError, match="one batch iterable per model: got 2 for 3"):
        adamerging(models, base, data[:2], params=BODY)
    with pytest.raises(ValueError, match="needs the base model"):
        adamerging(models, None, data, params=BODY)
    with pytest.raises(TypeError, match="list of torch.nn.Module"):
        adamerging([dict(m.named_parameters()) for m in models], base, data, params=BODY)
    with pytest.raises(ValueError, match=r"data\[1\]: data is empty"):
        adamerging(models, base, [data[0], [], data[2]], params=BODY)
    with pytest.raises(ValueError, match=r"data\[0\]: data must yield \(inputs, targets\)"):
        adamerging(models, base, [[torch.zeros(2, 4)], data[1], data[2]], params=BODY)
    with pytest.raises(ValueError, match="got 2 weights for 3 models"):
        adamerging(models, base, data, weights=[1, 1], params=BODY)
    dropout = copy.deepcopy(models[1])
    dropout.body.append(nn.Dropout(0.1))
    dropout.train()
    with pytest.raises(ValueError, match="model 1: model is in training mode"):
        adamerging([models[0], dropout, models[2]], base, data, params=BODY)
    regression = [Net(1, 10 + t) for t in range(3)]
    with pytest.raises(ValueError, match=r"class logits \[N, C\] with C >= 2"):
        adamerging(regression, base, data, steps=1, params=BODY)
    obj = AdaMergingObjective(models, base, data, granularity="layer", params=BODY)
    with pytest.raises(ValueError, match=r"coefficients must have shape \(3, 4\)"):
        obj(torch.zeros(3, 1, dtype=D))
    with pytest.raises(
        ValueError, match="model 1: parameter .head.weight. has shape"
    ):  # select the body
        adamerging(models, base, data)


# ------------------------------------------------------------------ registry and runner
def test_registry_row_runs_with_the_statistics_batches():
    spec = get_method("adamerging")
    assert spec.statistics == "data" and spec.needs_base and spec.needs == ("data", "base")
    assert set(spec.options) == {"granularity", "steps", "lr", "init", "seed", "clamp"}
    assert spec.grid == () and spec.grid_points() == [{}]
    base, models = _pool()
    data = _data()
    out = spec(models, base=base, curvatures=data, params=BODY, steps=5, lr=1e-2)
    direct = adamerging(models, base, data, steps=5, lr=1e-2, params=BODY)
    assert out.report.coefficients == direct.report.coefficients
    assert out.report.options["granularity"] == spec.options["granularity"]
    with pytest.raises(ValueError, match="needs one batch iterable"):
        spec(models, base=base, params=BODY)
    with pytest.raises(ValueError, match="needs the base model"):
        spec(models, curvatures=data, params=BODY)
    from curvmerge.experiment.spec import DEFAULT_METHODS

    assert "adamerging" not in [getattr(m, "name", m) for m in DEFAULT_METHODS]


def test_runs_through_the_experiment_runner_give_rows_and_keep_what_they_learned(tmp_path):
    from curvmerge.data import digit_subset_tasks, pooled_digits
    from curvmerge.experiment import MethodRun, ModelPool, Settings, TaskData, run_experiment
    from curvmerge.models import make_mlp
    from curvmerge.train import finetune

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tasks = digit_subset_tasks("digits", ((0, 1, 2), (3, 4, 5)))
        base = make_mlp(64, 10, hidden=(16,), seed=0)
        finetune(base, pooled_digits(tasks), steps=10, lr=1e-2, progress=False)
        body = {k: v for k, v in base.state_dict().items() if not k.startswith("head.")}
        models = []
        for i, task in enumerate(tasks):
            model = make_mlp(64, task.num_classes, hidden=(16,), seed=i + 1)
            model.load_state_dict(body, strict=False)
            finetune(model, task.train, steps=10, lr=1e-2, seed=i, progress=False)
            models.append(model.eval())
        pool = ModelPool(models, base=base)
        task_pool = [TaskData(t.name, train=t.train, val=t.val, test=t.test) for t in tasks]
        methods = [
            "task_arithmetic",
            MethodRun("adamerging", options={"steps": 5, "granularity": "task"}),
            MethodRun("weight_ensembling", options={"steps": 5, "hidden": 8}),
        ]
        settings = Settings(fisher_examples=64, fisher_batch_size=32, references=False)
        res = run_experiment(pool, task_pool, methods, settings=settings)
    finally:
        torch.set_num_threads(threads)
    assert res.kinds["adamerging"] == "merge"
    assert set(res.metrics["adamerging"]) == {t.name for t in tasks}
    assert set(res.merged["adamerging"]) == set(pool.shared_names())
    assert res.choices["adamerging"] == {}  # nothing chosen on validation: it learns
    assert 0.0 <= res.mean("adamerging") <= 1.0
    # what they learned is kept, written to the JSON, and the network to a file
    assert res.kinds["weight_ensembling"] == "adaptive"
    assert "weight_ensembling" not in res.merged  # no single merged model
    assert set(res.metrics["weight_ensembling"]) == {t.name for t in tasks}
    learned = res.learned["adamerging"]
    assert len(learned["coefficients"]) == 2 and len(learned["coefficients"][0]) == 1
    assert learned["steps"] == 5 and learned["cost_ratio"] > 0
    assert res.learned["weight_ensembling"]["network"]["hidden"] == 8
    import json

    from curvmerge.experiment import write_results
    from curvmerge.merging import load_coefficient_network

    paths = write_results(res, tmp_path, pool=pool, plots=False)
    record = json.loads(paths["json"].read_text())
    assert record["learned"]["adamerging"]["coefficients"] == learned["coefficients"]
    assert record["kinds"]["weight_ensembling"] == "adaptive"
    net, groups, meta = load_coefficient_network(paths["network weight_ensembling"])
    assert groups == res.learned["weight_ensembling"]["groups"]
    assert meta["method"] == "weight_ensembling"
    saved = res.networks["weight_ensembling"].network.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in net.state_dict().items())
    assert "Learned on unlabelled inputs" in paths["report"].read_text()
