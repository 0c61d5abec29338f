"""Markdown, CSV and PNG outputs of comparisons and sweeps; atomic writes."""

import csv
import math
import os

import pytest
import torch
from matplotlib.image import imread

from curvmerge.merging.sweep import grid_search, sweep
from curvmerge.operators import DiagonalOperator
from curvmerge.results import (
    comparison_csv,
    markdown_table,
    write_comparison,
    write_sweep,
)
from curvmerge.space import ParamSpace

ROWS = {
    "base": {"digits": 0.40, "mnist": 0.35},
    "average": {"digits": 0.91, "mnist": 0.88},
    "fisher_diagonal": {"digits": 0.93, "mnist": 0.90},
    "ensemble": {"digits": 0.95},  # a missing task
}


def _is_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_markdown_table():
    md = markdown_table(ROWS)
    lines = md.strip().splitlines()
    assert lines[0] == "| method | digits | mnist | mean |"
    assert lines[3] == "| average | 0.910 | 0.880 | 0.895 |"
    assert lines[4] == "| fisher_diagonal | 0.930 | **0.900** | **0.915** |"
    assert lines[5] == "| ensemble | **0.950** | – | – |"
    pct = markdown_table(ROWS, percent=True, highlight_best=False, tasks=["mnist"])
    assert "| average | 88.0 | 88.0 |" in pct


def test_write_comparison_files_parse(tmp_path):
    paths = write_comparison(ROWS, tmp_path / "sub" / "compare", title="MNIST tasks")
    assert set(paths) == {"markdown", "csv", "png"}
    text = paths["markdown"].read_text()
    assert text.startswith("## MNIST tasks") and "| fisher_diagonal |" in text
    with open(paths["csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["method"] for r in table] == list(ROWS)
    assert float(table[2]["mean"]) == pytest.approx(0.915)
    assert table[3]["mnist"] == "" and table[3]["mean"] == ""
    _is_png(paths["png"])
    assert not [p for p in os.listdir(paths["csv"].parent) if p.endswith(".tmp")]


def test_comparison_bad_input():
    with pytest.raises(ValueError, match="at least one row"):
        markdown_table({})
    with pytest.raises(ValueError, match="task column"):
        comparison_csv({"a": {}})


def test_write_sweep_files(tmp_path):
    space = ParamSpace(("w",), ((3,),))
    models = [{"w": torch.tensor([0.0, 1.0, 2.0])}, {"w": torch.tensor([2.0, 1.0, 0.0])}]
    fishers = [DiagonalOperator(space, torch.tensor(d)) for d in ([1.0, 2.0, 3.0], [3.0, 2.0, 1.0])]

    def validate(result):
        w = result.params["w"]
        return {"task_a": float(-abs(w[0] - 0.5)), "task_b": float(-abs(w[2] - 1.5))}

    out = sweep(models, fishers, validate=validate, test=lambda r: 0.8, dampings=[1e-3, 1.0],
                statistics_seconds=5.0, verbose=False)  # fmt: skip
    paths = write_sweep(out, tmp_path / "sweep", title="two models")
    with open(paths["csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 50
    assert {"weights_1", "weights_2", "damping", "validation", "validation_task_a"} <= set(table[0])
    chosen = [r for r in table if r["chosen"] == "True"]
    assert len(chosen) == 1 and float(chosen[0]["validation"]) == out.best_point.validation
    md = paths["markdown"].read_text()
    assert "test at the chosen point: 0.8000" in md and "% of the 5 s" in md
    assert md.count("**yes**") == 1
    _is_png(paths["png"])
    # a sweep over one option of another method (x axis: that option)
    out = grid_search(lambda scaling: scaling, [{"scaling": s} for s in (0.1, 0.5, 1.0)],
                      validate=lambda r: -math.fabs(r - 0.5))  # fmt: skip
    _is_png(write_sweep(out, tmp_path / "scaling")["png"])


def test_metric_tables_markdown_csv_png(tmp_path):
    from curvmerge.results import metrics_markdown, write_metrics

    tables = {
        "accuracy": {"average": {"a": 0.9, "b": 0.8}, "majority class": {"a": 0.5, "b": 0.6}},
        "macro_f1": {"average": {"a": 0.85, "b": 0.7}, "majority class": {"a": 0.33, "b": 0.4}},
        "mse": {"average": {"r": 2.0}, "majority class": {"r": 1.0}},
    }
    md = metrics_markdown(tables)
    assert "### accuracy (%)" in md and "### macro-F1 (%)" in md and "### MSE" in md
    assert "| average | **90.0** | **80.0** | **85.0** |" in md
    assert "| majority class | **1.000** | **1.000** |" in md  # lower MSE is better
    paths = write_metrics(tables, tmp_path / "out" / "results", title="T", preamble="hello")
    text = paths["markdown"].read_text()
    assert text.startswith("## T\n\nhello\n\n### accuracy")
    with open(paths["csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["method", "metric", "a", "b", "r", "mean"]
    assert [(r["method"], r["metric"]) for r in table][:3] == [
        ("average", "accuracy"),
        ("majority class", "accuracy"),
        ("average", "macro_f1"),
    ]
    assert float(table[0]["mean"]) == pytest.approx(0.85) and table[0]["r"] == ""
    assert float(table[4]["mean"]) == 2.0 and table[4]["a"] == ""
    _is_png(paths["png"])
    assert not [p for p in os.listdir(paths["csv"].parent) if p.endswith(".tmp")]
