"""The experiment runner on tiny offline tasks: statistics once, validation chooses, test
reports, files written atomically, Fisher files reused, configurations checked."""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import os
import warnings

import pytest
import torch

from curvmerge.data import TensorSplit, digit_subset_tasks, pooled_digits
from curvmerge.experiment import (
    REFERENCE_ROW,
    Experiment,
    MethodRun,
    ModelPool,
    Settings,
    StatisticsStore,
    TaskData,
    load_config,
    run_experiment,
    validate_config,
)
from curvmerge.models import make_mlp
from curvmerge.train import OneClassWarning, finetune, iter_batches

HIDDEN = (16,)
SUBSETS = ((0, 1, 2), (3, 4, 5))
SETTINGS = dict(fisher_examples=64, fisher_batch_size=32, exact_examples=32)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train():
    tasks = digit_subset_tasks("digits", SUBSETS)
    base = make_mlp(64, 10, hidden=HIDDEN, seed=0)
    finetune(base, pooled_digits(tasks), steps=20, lr=1e-2, progress=False)
    body = {k: v for k, v in base.state_dict().items() if not k.startswith("head.")}
    models = []
    for i, task in enumerate(tasks):
        model = make_mlp(64, task.num_classes, hidden=HIDDEN, seed=i + 1)
        model.load_state_dict(body, strict=False)
        finetune(model, task.train, steps=15, lr=1e-2, seed=i, progress=False)
        models.append(model)
    return tasks, base, models


@pytest.fixture(scope="module")
def trained():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train()
    finally:
        torch.set_num_threads(threads)


def _pools(trained, *, poison=False):
    tasks, base, models = trained
    out = []
    for k, t in enumerate(tasks):
        test = t.test
        if poison:
            g = torch.Generator().manual_seed(k)
            test = TensorSplit(t.test.inputs, torch.randint(0, 3, t.test.labels.shape, generator=g))
        out.append(TaskData(t.name, train=t.train, val=t.val, test=test))
    return ModelPool(models, base=base), out


METHODS = [
    "average",
    "task_arithmetic",
    "ties",
    "fisher_diagonal",
    {"method": "fisher_diagonal", "label": "fisher_diagonal (weights)",
     "grid": {"weights": [(0.3, 0.7), (0.5, 0.5), (0.7, 0.3)], "damping": [1e-4]}},
    {"method": "fisher_exact", "grid": {"damping": [1e-1, 1e-2]}, "options": {"maxiter": 8}},
    {"method": "fisher_exact", "label": "fisher_exact (1e-3)", "grid": [{"damping": 1e-3}],
     "options": {"maxiter": 8, "prior": "base"}},
    "ensemble",
]  # fmt: skip


def test_every_statistic_is_computed_once(trained, monkeypatch):
    import curvmerge.experiment.statistics as stats_module
    import curvmerge.operators.ggn as ggn

    calls = {"diagonal": 0, "ggn": 0}
    real = stats_module.diagonal_fisher

    def counting(*args, **kwargs):
        calls["diagonal"] += 1
        return real(*args, **kwargs)

    built = []

    class Counting(ggn.GGNOperator):
        def __init__(self, *args, **kwargs):
            calls["ggn"] += 1
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(stats_module, "diagonal_fisher", counting)
    monkeypatch.setattr(ggn, "GGNOperator", Counting)
    pool, tasks = _pools(trained)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CG caps, damping notes
        res = run_experiment(pool, tasks, METHODS, settings=Settings(**SETTINGS))
    T = len(tasks)
    assert calls == {"diagonal": T, "ggn": T}
    # the GGN diagonal (damping scale, warm start) once per model for both exact methods
    assert sum(op.diagonal_passes for op in built) == T
    stats = res.costs["statistics"]
    assert stats["diagonal_fisher"]["computed"] == T and stats["exact_ggn"]["built"] == T
    assert stats["exact_ggn"]["diagonal_passes"] == T
    rows = list(res.metrics)
    assert rows[: T + 2] == [f"model: {t.name}" for t in tasks] + ["base", REFERENCE_ROW]
    assert rows[T + 2 :] == [MethodRun.parse(m).name for m in METHODS]
    # the test split is read once per row and task; validation once per point and task
    points = sum(c["points"] for c in res.costs["methods"].values())
    assert points == sum(len(s.points) for s in res.sweeps.values()) + 3  # 3 single points
    assert res.costs["evaluation"]["calls"] == {"test": (len(rows) - 1) * T, "val": points * T}
    assert res.choices["fisher_diagonal (weights)"]["weights"] in [(0.3, 0.7), (0.5, 0.5),
                                                                   (0.7, 0.3)]  # fmt: skip
    assert res.costs["methods"]["fisher_exact"]["products"] > 0
    assert set(res.merged) == {r for r in rows[T + 2 :] if r != "ensemble"}
    for task in tasks:  # every row has accuracy and macro-F1 on every task
        for row in rows:
            m = res.metrics[row][task.name]
            assert 0 <= m["accuracy"] <= 1 and 0 <= m["macro_f1"] <= 1
    assert res.table("macro_f1").keys() == res.table("accuracy").keys()
    assert res.mean("fisher_exact") > res.mean(REFERENCE_ROW)


def test_layer_statistics_computed_once_and_every_cost_in_the_table(trained, monkeypatch):
    import curvmerge.experiment.statistics as stats_module
    from curvmerge.experiment.outputs import cost_table, format_report

    calls = {"input_grams": 0, "kfac_factors": 0}
    for name in calls:
        real = getattr(stats_module, name)

        def counting(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(stats_module, name, counting)
    pool, tasks = _pools(trained)
    methods = [
        "regmean",
        {"method": "regmean", "label": "regmean (alpha 1)", "grid": [{"alpha": 1.0}]},
        "regmean_plus_plus",
        {"method": "fisher_kfac", "grid": {"damping": [1e-1]}},
        {"method": "fisher_kfac", "label": "kfac (base)", "grid": [{"damping": 1e-2}],
         "options": {"prior": "base", "maxiter": 20}},
        {"method": "fisher_diagonal", "label": "diagonal (TA prior)", "grid": [{"damping": 1e-2}],
         "options": {"prior": {"method": "task_arithmetic", "scaling": 0.5}}},
        "tsv_merge",
        "iso_c",
        "iso_cts",
        "spherical_barycenter",
    ]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CG caps
        res = run_experiment(pool, tasks, methods, settings=Settings(**SETTINGS))
    T = len(tasks)
    assert calls == {"input_grams": T, "kfac_factors": T}
    stats = res.costs["statistics"]
    assert stats["input_gram"]["computed"] == T and stats["kfac"]["computed"] == T
    assert len(stats["kfac"]["seconds"]) == T and res.seconds["K-FAC factors"] > 0
    unit = res.costs["gradient_pass_seconds"]
    assert unit > 0
    table = cost_table(res)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split(" | ")[0][2:] for r in rows[1:]] == [MethodRun.parse(m).name for m in methods]
    kfac_row = next(r for r in rows if r.startswith("| fisher_kfac |")).split(" | ")
    assert kfac_row[1] == "kfac" and float(kfac_row[3]) == pytest.approx(
        sum(stats["kfac"]["seconds"]) / unit, rel=0.06, abs=0.06
    )
    assert int(kfac_row[6]) == res.costs["methods"]["fisher_kfac"]["products"] > 0
    assert table in format_report(res, "t")
    for row in res.metrics:  # every method merged to something sensible
        if res.kinds[row] == "merge":
            assert res.mean(row) > res.mean(REFERENCE_ROW)


def test_a_scaling_grid_costs_one_merge(trained, monkeypatch):
    import curvmerge.merging.registry as registry
    from curvmerge.merging.spectral import tsv_merge

    calls = []
    spec = registry.get_method("tsv_merge")

    def counting(*args, **kwargs):
        calls.append(kwargs.get("scaling"))
        return spec.function(*args, **kwargs)

    counted = dataclasses.replace(spec, function=counting)
    monkeypatch.setitem(registry._REGISTRY, "tsv_merge", counted)
    pool, tasks = _pools(trained)
    grid = {"scaling": [0.5, 1.0, 1.5, 2.0]}
    res = run_experiment(
        pool, tasks, [{"method": "tsv_merge", "grid": grid}], settings=Settings(**SETTINGS)
    )
    assert calls == [1.0]  # one merge for the four points
    chosen = res.choices["tsv_merge"]["scaling"]
    names = list(res.merged["tsv_merge"])
    want = tsv_merge(pool.models, pool.base, scaling=chosen, params=names).params
    for n in names:
        torch.testing.assert_close(res.merged["tsv_merge"][n], want[n], rtol=1e-5, atol=1e-6)
    assert len(res.sweeps["tsv_merge"].points) == 4


def test_frozen_models_run_without_a_gradient_pass_unit(trained):
    from curvmerge.experiment.outputs import cost_table, format_report

    pool, tasks = _pools(trained)
    frozen = [copy.deepcopy(m).requires_grad_(False) for m in pool.models]
    res = run_experiment(
        ModelPool(frozen, base=pool.base), tasks, ["average", "task_arithmetic"],
        settings=Settings(**SETTINGS),
    )  # fmt: skip
    assert res.costs["gradient_pass_seconds"] is None and cost_table(res) is None
    assert "task_arithmetic" in format_report(res, "t")
    assert all(not p.requires_grad for m in frozen for p in m.parameters())


def test_test_labels_never_choose(trained):
    methods = ["task_arithmetic", "ties", "fisher_diagonal"]
    results = []
    for poison in (False, True):
        pool, tasks = _pools(trained, poison=poison)
        results.append(run_experiment(pool, tasks, methods, settings=Settings(**SETTINGS)))
    clean, poisoned = results
    assert clean.choices == poisoned.choices
    assert clean.validation == poisoned.validation
    for m in methods:
        assert all(torch.equal(clean.merged[m][n], poisoned.merged[m][n]) for n in clean.merged[m])
    assert clean.table("accuracy") != poisoned.table("accuracy")
    # the majority class learns from training labels, not test labels
    assert clean.metrics[REFERENCE_ROW] != poisoned.metrics[REFERENCE_ROW]


def _files(folder):
    return sorted(
        os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs
    )


def test_outputs_written_atomically_and_fisher_files_reused(trained, tmp_path, monkeypatch):
    import curvmerge.experiment.statistics as stats_module
    from curvmerge.io import load_params

    calls = []
    real = stats_module.diagonal_fisher
    monkeypatch.setattr(stats_module, "diagonal_fisher",
                        lambda *a, **k: calls.append(1) or real(*a, **k))  # fmt: skip
    pool, tasks = _pools(trained)
    out = tmp_path / "run"
    methods = ["average", "fisher_diagonal", "ties"]
    exp = Experiment(pool, tasks, methods, settings=Settings(**SETTINGS), output_dir=out,
                     title="digits")  # fmt: skip
    res = exp.run()
    assert len(calls) == 2
    files = _files(out)
    assert not [f for f in files if f.endswith(".tmp") or "/." in f or f.startswith(".")]
    for name in ("results.md", "results.csv", "results.png", "results_report.md",
                 "results.json", "sweeps/fisher_diagonal.csv", "sweeps/ties.png",
                 "merged/fisher_diagonal.safetensors"):  # fmt: skip
        assert name in files and (out / name).stat().st_size > 0
    assert len([f for f in files if f.startswith("fishers/")]) == 2
    with open(out / "results.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert {r["metric"] for r in table} == {"accuracy", "macro_f1"}
    acc = {r["method"]: float(r["mean"]) for r in table if r["metric"] == "accuracy"}
    assert acc["fisher_diagonal"] == pytest.approx(res.mean("fisher_diagonal"))
    md = (out / "results.md").read_text()
    assert "### accuracy (%)" in md and "### macro-F1 (%)" in md and "| majority class |" in md
    record = json.loads((out / "results.json").read_text())
    assert record["settings"]["fisher_examples"] == 64
    assert record["settings"]["methods"][1]["grid"][0] == {"damping": 1e-6}
    assert record["choices"]["fisher_diagonal"] == res.choices["fisher_diagonal"]
    assert record["seconds"]["total"] > 0 and "diagonal Fishers" in record["seconds"]
    assert record["costs"]["statistics"]["diagonal_fisher"]["computed"] == 2
    merged = load_params(out / "merged/fisher_diagonal.safetensors")
    assert all(torch.equal(merged[n], res.merged["fisher_diagonal"][n]) for n in merged)

    # existing results are refused before any work
    with pytest.raises(FileExistsError, match="already exists"):
        exp.run()
    assert len(calls) == 2

    # a rerun reuses the Fisher files: no Fisher computed, the same merges
    exp.force = True
    again = exp.run()
    assert len(calls) == 2
    assert again.costs["statistics"]["diagonal_fisher"]["loaded"] == 2
    assert again.choices == res.choices
    assert torch.equal(again.merged["fisher_diagonal"]["body.1.weight"],
                       res.merged["fisher_diagonal"]["body.1.weight"])  # fmt: skip

    # a changed model invalidates its file (the key covers every parameter)
    with torch.no_grad():
        pool.models[1].body[1].weight.mul_(1.01)
    try:
        third = exp.run()
    finally:
        with torch.no_grad():
            pool.models[1].body[1].weight.div_(1.01)
    assert len(calls) == 3
    stats = third.costs["statistics"]["diagonal_fisher"]
    assert stats["computed"] == 1 and stats["loaded"] == 1
    assert any("recomputed" in n for n in third.notes)


class _Biased(torch.nn.Module):
    """A task model whose head always favours class 0 by a wide margin."""

    def __init__(self, model):
        super().__init__()
        self.body, self.head = model.body, model.head

    def forward(self, x):
        out = self.head(self.body(x))
        return out + torch.tensor([100.0] + [0.0] * (out.shape[1] - 1))


def test_one_class_warning_in_the_runner(trained):
    import copy

    pool, tasks = _pools(trained)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OneClassWarning)  # a good pool does not warn
        good = run_experiment(pool, tasks, ["average"], settings=Settings(**SETTINGS))
    assert not good.one_class
    biased = ModelPool([_Biased(copy.deepcopy(m)) for m in pool.models], base=pool.base,
                       params=r"^body\.")  # fmt: skip
    with pytest.warns(OneClassWarning) as caught:
        res = run_experiment(biased, tasks, ["average"], settings=Settings(**SETTINGS))
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and "average on digits-0-1-2 (test) predicts class 0" in messages[0]
    rows = {(e["row"], e["task"]) for e in res.one_class}
    assert ("average", "digits-0-1-2") in rows and ("majority class", "digits-0-1-2") not in rows
    m = res.metrics["average"]["digits-0-1-2"]
    assert m["predicted_share"] == 1.0 and m["macro_f1"] < m["accuracy"]


def test_regression_task_reports_mse(trained):
    tasks, base, _ = trained
    t = tasks[0]

    def target(split):  # regress the digit's mean pixel, a smooth target
        return TensorSplit(split.inputs, split.inputs.mean(dim=(1, 2, 3)).unsqueeze(1) * 10)

    models = []
    for i in range(2):  # one initialisation, two training orders
        model = make_mlp(64, 1, hidden=HIDDEN, seed=0)
        finetune(model, target(t.train), steps=60, lr=1e-2, seed=i, progress=False,
                 loss_fn=torch.nn.functional.mse_loss)  # fmt: skip
        models.append(model)
    reg = [TaskData(f"pixels-{i}", train=target(t.train), val=target(t.val), test=target(t.test),
                    loss="mse") for i in range(2)]  # fmt: skip
    res = run_experiment(ModelPool(models), reg, ["average", "fisher_diagonal"],
                         settings=Settings(**SETTINGS))  # fmt: skip
    assert set(res.tables()) == {"mse"}
    assert res.rows == res.table("mse")
    assert res.metrics[REFERENCE_ROW]["pixels-0"]["mse"] > res.metrics["average"]["pixels-0"]["mse"]
    assert res.validation["fisher_diagonal"] <= 0  # scores are -MSE: higher is better


# ---------------------------------------------------------------------------------- configs
def _save_checkpoints(trained, folder):
    from curvmerge.io import save_checkpoint

    tasks, base, models = trained
    folder.mkdir(parents=True, exist_ok=True)
    spec = {"kind": "mlp", "in_features": 64, "hidden": list(HIDDEN)}
    save_checkpoint(base, folder / "base.safetensors",
                    metadata={"model": {**spec, "num_classes": 10}, "task": "digits"})  # fmt: skip
    for subset, task, model in zip(SUBSETS, tasks, models, strict=True):
        save_checkpoint(
            model,
            folder / f"{task.name}.safetensors",
            metadata={"model": {**spec, "num_classes": 3},
                      "task": "digits:" + ",".join(map(str, subset))},
        )  # fmt: skip


def test_yaml_config_runs_end_to_end(trained, tmp_path):
    import yaml

    _save_checkpoints(trained, tmp_path / "ckpt")
    config = {
        "title": "digits from a config",
        "output_dir": "out",
        "models": {
            "base": "ckpt/base.safetensors",
            "finetuned": {
                "digits-0-1-2": "ckpt/digits-0-1-2.safetensors",
                "digits-3-4-5": {"kind": "mlp", "in_features": 64, "num_classes": 3,
                                 "hidden": list(HIDDEN), "checkpoint":
                                 "ckpt/digits-3-4-5.safetensors"},
            },
        },
        "tasks": {"digits-0-1-2": None, "digits-3-4-5": {"data": "digits:3,4,5",
                                                          "metric": "macro_f1"}},
        "methods": ["average", {"method": "task_arithmetic", "grid": {"scaling": ["5e-1", 1]}},
                    {"method": "fisher_diagonal", "grid": {"damping": ["1e-4", "1e-2"]}}],
        "fisher": {"examples": 64, "batch_size": 32},
        "outputs": {"merged": "none"},
    }  # fmt: skip
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    exp = load_config(path)
    assert [t.metric for t in exp.tasks] == ["accuracy", "macro_f1"]
    res = exp.run()
    assert res.choices["task_arithmetic"]["scaling"] in (0.5, 1.0)
    assert res.choices["fisher_diagonal"]["damping"] in (1e-4, 1e-2)
    out = tmp_path / "out"
    assert (out / "results.md").read_text().startswith("## digits from a config")
    assert len(list((out / "fishers").iterdir())) == 2 and not (out / "merged").exists()
    record = json.loads((out / "results.json").read_text())
    assert record["config"]["models"]["finetuned"]["digits-0-1-2"]["source"] == "checkpoint"
    assert record["models"][0]["path"].endswith("digits-0-1-2.safetensors")
    # the same models as the fixture's: the same test accuracy of the fine-tuned rows
    pool, tasks = _pools(trained)
    direct = run_experiment(pool, tasks, ["average"], settings=Settings(**SETTINGS))
    assert res.metrics["average"] == direct.metrics["average"]


BASE_CONFIG = {
    "models": {"finetuned": {"a": {"kind": "mlp", "in_features": 64, "num_classes": 3}}},
    "tasks": {"a": "digits:0,1,2"},
}


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"fishr": {}}, r"config: unknown key 'fishr'"),
        ({"fisher": {"kind": "full"}}, r"fisher\.kind: must be one of exact, mc, empirical"),
        ({"fisher": {"examples": 0}}, r"fisher\.examples: must be at least 1"),
        ({"fisher": {"exampels": 3}}, r"fisher: unknown key 'exampels'"),
        ({"seed": "zero"}, r"seed: expected an integer"),
        ({"methods": ["fisher"]}, r"methods\[0\]: unknown method 'fisher'"),
        ({"methods": [{"method": "ties", "grid": {"densty": [0.1]}}]},
         r"methods\[0\]: .*no option 'densty'"),
        ({"methods": [{"method": "ties", "options": {"sclaing": 1}}]},
         r"methods\[0\]: .*no option 'sclaing'"),
        ({"methods": [{"method": "ties", "grid": 3}]}, r"methods\[0\]\.grid"),
        ({"methods": ["average", "average"]}, r"methods\[1\]: the row 'average' appears twice"),
        ({"evaluation": {"one_class_share": 2}}, r"evaluation\.one_class_share: must be in"),
        ({"outputs": {"merged": "pickle"}}, r"outputs\.merged: must be one of"),
        ({"tasks": {"a": {"loss": "hinge"}}}, r"tasks\.a\.loss: must be one of"),
        ({"tasks": {"b": "digits"}}, r"tasks\.b: no model in models\.finetuned"),
        ({"tasks": {"a": {"data": "digits", "colour": 1}}}, r"tasks\.a: unknown key 'colour'"),
        ({"models": {"finetuned": {}}}, r"models\.finetuned: a mapping"),
        ({"models": {"finetuned": {"a": {"kind": "mlp", "widht": 3}}}},
         r"models\.finetuned\.a: unknown key 'widht'"),
        ({"models": {"finetuned": {"a": {"source": "ftp", "path": "x"}}}},
         r"models\.finetuned\.a\.source: unknown model source 'ftp'"),
        ({"models": {"finetuned": {"a": "a.safetensors"}, "params": "("}},
         r"models\.params: not a valid regular expression"),
    ],
)  # fmt: skip
def test_config_errors_name_the_key(change, match):
    config = {**BASE_CONFIG, **change}
    with pytest.raises(ValueError, match=match):
        validate_config(config)


def test_config_errors_at_load_time(tmp_path):
    with pytest.raises(ValueError, match=r"models\.finetuned\.a: a mlp model needs 'in_features'"):
        Experiment.from_config({"models": {"finetuned": {"a": {"kind": "mlp", "num_classes": 2}}},
                                "tasks": {"a": "digits:0,1"}})  # fmt: skip
    with pytest.raises(ValueError, match=r"tasks\.a\.data: unknown bundled task 'digitz'"):
        Experiment.from_config({**BASE_CONFIG, "tasks": {"a": "digitz"}})
    with pytest.raises(ValueError, match=r"tasks\.a: give 'data'"):
        Experiment.from_config({**BASE_CONFIG, "tasks": {}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [a, b")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        load_config(bad)
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")


def test_documented_schema_is_valid(tmp_path):
    import yaml

    import curvmerge.experiment.schema as schema

    doc = schema.__doc__
    block = doc[doc.index("::\n") + 3 : doc.index("\nA model is")]
    config = yaml.safe_load(block)
    cfg = validate_config(config, base_dir=tmp_path)
    assert cfg["models"]["params"] == r"^body\."
    assert cfg["models"]["finetuned"]["digits-0-1-2"]["source"] == "checkpoint"
    assert cfg["models"]["finetuned"]["digits-3-4-5"]["source"] == "builtin"
    assert [r.name for r in cfg["methods"]][-1] == "fisher_exact (80 iterations)"
    assert cfg["fisher"]["dir"] == str(tmp_path / "results/digits/fishers")


def test_grids_over_other_options_and_label_checks(trained):
    pool, tasks = _pools(trained)
    grid = {"prior": ["mean", "base"], "damping": [1e-3]}
    res = run_experiment(pool, tasks, [{"method": "fisher_diagonal", "grid": grid}],
                         settings=Settings(**SETTINGS))  # fmt: skip
    assert res.choices["fisher_diagonal"]["prior"] in ("mean", "base")
    assert [p.coefficients["prior"] for p in res.sweeps["fisher_diagonal"].points] == [
        "mean", "base"]  # fmt: skip
    with pytest.raises(ValueError, match="row label 'base' is taken"):
        run_experiment(pool, tasks, [{"method": "average", "label": "base"}])
    with pytest.raises(ValueError, match="prior 'base' needs a base model"):
        run_experiment(ModelPool(pool.models), tasks,
                       [{"method": "fisher_diagonal", "options": {"prior": "base"}}])  # fmt: skip
    with pytest.raises(ValueError, match="2 models for 1 tasks"):
        run_experiment(pool, tasks[:1], ["average"])
    skipped = run_experiment(ModelPool(pool.models), tasks, ["ties", "average"],
                             settings=Settings(**SETTINGS, references=False))  # fmt: skip
    assert list(skipped.metrics) == ["average"] and "ties: skipped (no base model)" in skipped.notes


def test_tasks_given_as_batches(trained):
    from curvmerge.train import iter_batches

    pool, tasks = _pools(trained)
    batched = [
        TaskData(t.name, train=list(iter_batches(t.train, 40)), val=list(iter_batches(t.val, 40)),
                 test=list(iter_batches(t.test, 40)))
        for t in tasks
    ]  # fmt: skip
    methods = ["average", "fisher_diagonal"]
    a = run_experiment(pool, tasks, methods, settings=Settings(**SETTINGS))
    b = run_experiment(pool, batched, methods, settings=Settings(**SETTINGS))
    for row in ("model: digits-0-1-2", "base", REFERENCE_ROW, "average"):
        for task in a.tasks:
            for k in ("accuracy", "macro_f1", "predicted_share"):
                assert a.metrics[row][task][k] == pytest.approx(b.metrics[row][task][k])
    # the statistics take exactly fisher_examples examples: 40 + the first 24 of batch 2
    assert b.costs["statistics"]["diagonal_fisher"]["examples"] == [64, 64]


def _float64_pools(trained):
    tasks, base, models = trained

    def split(t, k):
        return TensorSplit(getattr(t, k).inputs.double(), getattr(t, k).labels)

    pool = ModelPool([copy.deepcopy(m).double() for m in models], base=copy.deepcopy(base).double())
    return pool, [TaskData(t.name, **{k: split(t, k) for k in ("train", "val", "test")})
                  for t in tasks]  # fmt: skip


def test_exact_fisher_damping_grid_is_one_krylov_space_in_the_runner(trained, monkeypatch):
    import curvmerge.experiment.runner as runner
    from curvmerge.merging import PreparedMerge

    pool, tasks = _float64_pools(trained)
    seen = []
    real = runner.grid_search

    def recording(make, points, **kwargs):
        return real(lambda **p: seen.append(make(**p)) or seen[-1], points, **kwargs)

    monkeypatch.setattr(runner, "grid_search", recording)
    dampings, rtol = [1e-1, 1e-2, 1e-3], 1e-10
    method = {"method": "fisher_exact", "grid": {"damping": dampings},
              "options": {"rtol": rtol, "maxiter": 1000}}  # fmt: skip
    names = pool.shared_names()
    store = StatisticsStore(pool.models, [list(iter_batches(t.train, 32))[:1] for t in tasks],
                            ["cross_entropy"] * 2, names, exact_examples=32)  # fmt: skip
    res = run_experiment(pool, tasks, [method], store=store,
                         settings=Settings(**SETTINGS, references=False))  # fmt: skip
    found = res.sweeps["fisher_exact"]
    assert [r.report.damping for r in seen] == dampings
    assert all(r.report.shared_solve == 3 and r.report.converged for r in seen)
    assert all(r.report.relative_residual <= rtol for r in seen)  # each its own true residual
    # each point equals a separate solve of its own (the same operators) to the tolerance
    from curvmerge.operators.ggn import GGNOperator

    curvatures = store.operators(GGNOperator)
    alone = PreparedMerge(pool.models, curvatures, base=pool.base, params=names,
                          rtol=rtol, maxiter=1000, warm_start=False)  # fmt: skip
    separate = [alone.merge(damping=d) for d in dampings]
    for got, ref in zip(seen, separate, strict=True):
        assert ref.report.converged
        for n, v in ref.params.items():
            assert torch.allclose(got.params[n], v, rtol=0, atol=1e-7 * float(v.abs().max())), n
    # the grid costs about its hardest point alone; the products are counted once
    hardest = separate[-1].report.products
    spent = found.products - found.prepare_products
    assert spent <= 1.3 * hardest
    assert sum(p.products for p in found.points) > spent  # the points' needs overlap
    assert res.costs["methods"]["fisher_exact"]["products"] == found.products
    assert sum(r.report.products for r in separate) > 2 * spent


# ------------------------------------------------------------------ token-level batches
V = 6  # vocabulary size == sequence length of the first batches: [B, T, C] with T == C


class _Tagger(torch.nn.Module):
    """Token-level logits ``[B, T, V]`` (classes last, like Hugging Face models)."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.body = torch.nn.Embedding(V, 8)
        self.head = torch.nn.Linear(8, V)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def _token_batches(seed, lengths=(V, V, 4)):
    """Batches of token ids with next-token targets, padded (-100) at random tails; the
    batches have different lengths, as data-file batches padded per batch do."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for T in lengths:
        x = torch.randint(0, V, (3, T), generator=g)
        y = (x + 1) % V
        for row, keep in enumerate(torch.randint(2, T + 1, (3,), generator=g).tolist()):
            y[row, keep:] = -100
        out.append((x, y))
    return out


def test_token_level_task_with_sequence_length_equal_to_vocabulary():
    from curvmerge.losses import LossSpec

    pool = ModelPool([_Tagger(1), _Tagger(2)], params=r"^body\.")
    token_loss = LossSpec("cross_entropy", classes_last=True)
    tasks = [
        TaskData(f"tokens-{k}", train=_token_batches(k), val=_token_batches(10 + k),
                 test=_token_batches(20 + k), loss=token_loss)
        for k in range(2)
    ]  # fmt: skip
    assert all(t.loss is token_loss for t in tasks)  # the LossSpec is kept as given
    methods = [
        "average",
        "fisher_diagonal",
        {"method": "fisher_exact", "grid": [{"damping": 1e-2}], "options": {"maxiter": 5}},
    ]
    settings = Settings(fisher_examples=6, fisher_batch_size=3, exact_examples=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CG caps
        res = run_experiment(pool, tasks, methods, settings=settings)
    for row in ("model: tokens-0", REFERENCE_ROW, "average", "fisher_diagonal", "fisher_exact"):
        for task in ("tokens-0", "tokens-1"):
            assert 0 <= res.metrics[row][task]["accuracy"] <= 1, (row, task)
    assert res.metrics[REFERENCE_ROW]["tokens-0"]["n"] == 9  # examples, not tokens
    assert res.settings["tasks"][0]["loss"] == "cross_entropy"
    assert res.settings["tasks"][0]["loss_spec"]["classes_last"] is True
    # a name loses the layout: the statistics refuse the ambiguous [B, T, C] outputs
    named = [TaskData(t.name, train=t.train, val=t.val, test=t.test) for t in tasks]
    with pytest.raises(ValueError, match="ambiguous cross-entropy layout"):
        run_experiment(pool, named, ["fisher_diagonal"], settings=settings)


def test_majority_metrics_over_batches_of_different_lengths():
    from curvmerge.experiment import majority_metrics
    from curvmerge.losses import LossSpec

    x, P = torch.zeros, -100
    train = [
        (x(2, 5, dtype=torch.long), torch.tensor([[1, 1, 2, P, P], [0, 1, P, P, P]])),
        (x(3, 3, dtype=torch.long), torch.tensor([[2, 1, P], [0, 1, 1], [1, P, P]])),
    ]
    test = [
        (x(1, 4, dtype=torch.long), torch.tensor([[1, 0, P, P]])),
        (x(2, 2, dtype=torch.long), torch.tensor([[1, 1], [2, P]])),
    ]
    task = TaskData("tok", train=train, val=test, test=test,
                    loss=LossSpec("cross_entropy", classes_last=True))  # fmt: skip
    assert task.reference_labels().tolist() == [1, 1, 2, 0, 1, 2, 1, 0, 1, 1, 1]
    m = majority_metrics(task)
    assert m["n"] == 3 and m["accuracy"] == pytest.approx(3 / 5)  # class 1 on 5 tokens
    assert m["predicted_class"] == 1 and m["predicted_share"] == 1.0
    # another ignore_index is honoured
    other = [(i, torch.where(t == -100, torch.full_like(t, 7), t)) for i, t in train]
    task = TaskData("tok", train=other, val=test, test=test,
                    loss=LossSpec("cross_entropy", ignore_index=7))  # fmt: skip
    assert task.reference_labels().tolist() == [1, 1, 2, 0, 1, 2, 1, 0, 1, 1, 1]
    # regression targets, batch by batch: the mean training target
    reg_train = [(x(2, 1), torch.tensor([[1.0], [3.0]])), (x(1, 1), torch.tensor([[5.0]]))]
    reg_test = [(x(1, 1), torch.tensor([[3.0]])), (x(2, 1), torch.tensor([[1.0], [5.0]]))]
    reg = TaskData("reg", train=reg_train, val=reg_test, test=reg_test, loss="mse")
    m = majority_metrics(reg)
    assert m["n"] == 3 and m["mse"] == pytest.approx(8 / 3)


# ------------------------------------------------------------------------- data files
def test_validate_config_resolves_data_file_paths(tmp_path):
    cfg = validate_config(
        {"models": {"finetuned": {"a": "a.safetensors", "b": "b.safetensors"}},
         "tasks": {"a": {"files": "data/a.csv"},
                   "b": {"files": {"train": "b/train.csv", "validation": "/abs/val.csv",
                                   "test": "~/test.csv"}}}},
        base_dir=tmp_path,
    )  # fmt: skip
    assert cfg["tasks"]["a"]["source"] == "files"
    assert cfg["tasks"]["a"]["files"] == str(tmp_path / "data" / "a.csv")
    files = cfg["tasks"]["b"]["files"]
    assert files["train"] == str(tmp_path / "b" / "train.csv")
    assert files["validation"] == "/abs/val.csv"
    assert files["test"] == os.path.expanduser("~/test.csv")
    for bad, match in (
        ({"files": {"train": "a.csv", "dev": "b.csv"}}, r"tasks\.a\.files: unknown split 'dev'"),
        ({"files": {"train": "a.csv"}}, r"tasks\.a\.files: needs train, validation and test"),
        ({"files": 3}, r"tasks\.a\.files: expected a path"),
        ({"files": "a.csv", "options": {"text_colum": "x"}},
         r"tasks\.a\.options: unknown key 'text_colum'"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            validate_config({"models": {"finetuned": {"a": "a.safetensors"}},
                             "tasks": {"a": bad}})  # fmt: skip


def test_config_with_relative_data_files_and_hf_folders(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    yaml = pytest.importorskip("yaml")
    from curvmerge.losses import LossSpec
    from curvmerge.train import is_batches
    from tests.test_cli_support import save_bert, write_text_csv

    proj = tmp_path / "project"
    (proj / "data").mkdir(parents=True)
    save_bert(proj / "models" / "sentiment", ("neg", "pos"), seed=1)
    save_bert(proj / "models" / "weather", ("neg", "neu", "pos"), seed=2)
    write_text_csv(proj / "data" / "sentiment.csv", ("neg", "pos"), seed=1)
    for split, seed in (("train", 2), ("validation", 3), ("test", 4)):
        write_text_csv(proj / "data" / f"weather_{split}.csv", ("neg", "neu", "pos"), n=24,
                       seed=seed)  # fmt: skip
    config = {
        "title": "two tiny BERTs",
        "output_dir": "results",
        "models": {"finetuned": {"sentiment": "models/sentiment", "weather": "models/weather"}},
        "tasks": {
            "sentiment": {"files": "data/sentiment.csv",
                          "options": {"validation": 0.25, "test": 0.25}},
            "weather": {"files": {"train": "data/weather_train.csv",
                                  "validation": "data/weather_validation.csv",
                                  "test": "data/weather_test.csv"}, "max_length": 16},
        },
        "methods": ["average", "fisher_diagonal"],
        "fisher": {"examples": 10, "batch_size": 4},
        "evaluation": {"batch_size": 8},
        "outputs": {"merged": "none", "plots": False, "sweeps": False},
    }  # fmt: skip
    (proj / "experiment.yaml").write_text(yaml.safe_dump(config))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # paths are relative to the config's folder, not the cwd
    exp = load_config(proj / "experiment.yaml")
    for task in exp.tasks:
        assert isinstance(task.loss, LossSpec) and task.loss.name == "cross_entropy"
        for split, size in (("train", 4), ("val", 8), ("test", 8)):
            data = getattr(task, split)
            assert is_batches(data) and max(len(t) for _, t in data) == size, (task.name, split)
    sentiment, weather = exp.tasks
    assert sum(len(t) for _, t in sentiment.test) == 12  # 0.25 of 48 rows
    assert sum(len(t) for _, t in weather.val) == 24
    assert max(x["input_ids"].shape[1] for x, _ in weather.train) <= 16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OneClassWarning)  # untrained tiny models
        res = exp.run()
    assert res.costs["statistics"]["diagonal_fisher"]["examples"] == [10, 10]
    assert set(res.metrics["fisher_diagonal"]) == {"sentiment", "weather"}
    assert res.metrics[REFERENCE_ROW]["weather"]["n"] == 24
    assert (proj / "results" / "results.md").is_file() and not (elsewhere / "results").exists()
    # a missing file is named with its resolved path and the key
    config["tasks"]["sentiment"]["files"] = "data/missing.csv"
    (proj / "bad.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=r"tasks\.sentiment.*data/missing\.csv does not exist"):
        load_config(proj / "bad.yaml")


def test_exact_fisher_grid_shows_one_bar_and_says_its_bound(trained, capsys):
    pool, tasks = _pools(trained)
    method = {"method": "fisher_exact", "grid": {"damping": [1e-1, 1e-3]},
              "options": {"maxiter": 5}}  # fmt: skip
    lines = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the cap
        res = run_experiment(pool, tasks, [method], settings=Settings(**SETTINGS, references=False),
                             progress=True, log=lines.append)  # fmt: skip
    err = capsys.readouterr().err
    assert "fisher_exact CG (2 dampings)" in err and "residual" in err
    assert "fisher_exact CG:" not in err  # no bar per damping
    assert "GGN product:" not in err and "GGN product (cached)" not in err
    assert any("at most 5 iterations" in line for line in lines)  # the bound, said up front
    assert any("stopped at maxiter=5" in line for line in lines)  # and when it stops
    assert res.sweeps["fisher_exact"].points[0].iterations == 5


def test_an_mc_fisher_file_is_keyed_on_the_number_of_processes(monkeypatch):
    # under torch.distributed each process draws its own mc labels on its own share, so a
    # 2-process mc Fisher is another estimate than a 1-process one: its file was reused by
    # runs on any number of processes (the key ignored it; fails on c96500f)
    import curvmerge.experiment.statistics as statistics

    model = make_mlp(4, 3, hidden=(5,)).eval()
    batches = [[(torch.randn(6, 4), torch.randint(0, 3, (6,)))]]
    names = [n for n, _ in model.named_parameters()]

    def settings(kind, processes):
        monkeypatch.setattr(statistics, "world_size", lambda: processes)
        store = StatisticsStore([model], batches, ["cross_entropy"], names, fisher_kind=kind)
        return store.fisher_settings(0)

    assert settings("mc", 2) != settings("mc", 1) != settings("mc", 3)
    assert settings("exact", 2) == settings("exact", 1)  # the same Fisher on any number
    assert "processes" not in settings("mc", 1)  # one process's files keep their keys


def test_a_row_of_weight_ensembling_is_checked_for_one_class_once(monkeypatch):
    # method rows are checked for one-class predictions where they are evaluated; the last
    # loop checks the other rows (models, base) but skipped only the kinds "merge",
    # "ensemble" and "reference", so weight ensembling's rows (kind "adaptive") were listed
    # twice in one_class (fails on b462713)
    from curvmerge.experiment import runner

    monkeypatch.setattr(runner, "check_one_class", lambda *a, **k: True)  # every row
    tasks = digit_subset_tasks("digits", ((0, 1, 2), (3, 4, 5)))
    base = make_mlp(64, 10, hidden=(8,), seed=0).eval()
    models = [make_mlp(64, t.num_classes, hidden=(8,), seed=i + 1).eval() for i, t in
              enumerate(tasks)]  # fmt: skip
    pool = ModelPool(models, base=base)
    task_pool = [TaskData(t.name, train=t.train, val=t.val, test=t.test) for t in tasks]
    methods = ["task_arithmetic", MethodRun("weight_ensembling", options={"steps": 0})]
    settings = Settings(fisher_examples=32, fisher_batch_size=32, references=False)
    res = run_experiment(pool, task_pool, methods, settings=settings)
    entries = [(e["row"], e["task"]) for e in res.one_class]
    assert len(entries) == len(set(entries))
    assert entries.count(("weight_ensembling", tasks[0].name)) == 1
