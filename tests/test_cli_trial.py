"""A new user's trial of the command with Hugging Face models and their own data files:
column options per data file, a headless base model, Fisher files in the wrong order,
messages that name flags, eval's rows and the rows each command uses."""

from __future__ import annotations

import csv
import shutil

import pytest

from tests.test_cli_support import run_main, save_bert, write_text_csv

pytest.importorskip("transformers")

LABELS_A = ("neg", "pos")
LABELS_B = ("cold", "mild", "warm")


def _rename(src, dst, columns):
    """A copy of a ``text,label`` CSV with other column names."""
    with open(src, newline="") as fh:
        rows = list(csv.reader(fh))
    with open(dst, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(columns)
        w.writerows(rows[1:])
    return dst


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    d = tmp_path_factory.mktemp("trial")
    save_bert(d / "sentiment", LABELS_A, seed=1)
    save_bert(d / "weather", LABELS_B, seed=2)
    write_text_csv(d / "weather.csv", LABELS_B, seed=2)
    write_text_csv(d / "plain.csv", LABELS_A, seed=1)
    _rename(d / "plain.csv", d / "sentiment.csv", ["review", "rating"])
    return d


# ------------------------------------------------------------------ A: columns per data file
def test_column_options_per_data_file(d, tmp_path):
    models = [d / "sentiment", d / "weather"]
    data = [d / "sentiment.csv", d / "weather.csv"]
    cols = ["--text-column", "review", "text", "--label-column", "rating", "-"]
    fishers = [tmp_path / "fs.safetensors", tmp_path / "fw.safetensors"]
    status, out, err = run_main("fisher", *models, "--data", *data, *cols, "-o", *fishers, "-q")
    assert status == 0, err
    status, out, err = run_main("eval", *models, "--data", *data, *cols, "-q")
    assert status == 0, err
    status, out, err = run_main(
        "sweep", *models, "--data", *data, *cols, "--fisher", *fishers, "--points", "2", "-q",
        "-o", tmp_path / "sweep",
    )  # fmt: skip
    assert status == 0, err
    status, out, err = run_main(
        "compare", *models, "--data", *data, *cols, "--methods", "average", "--examples", "8",
        "-q", "-o", tmp_path / "cmp",
    )  # fmt: skip
    assert status == 0, err
    status, out, err = run_main(
        "merge", *models, "-m", "fisher_exact", "--data", *data, *cols, "--examples", "4",
        "-o", tmp_path / "exact.safetensors", "-q",
    )  # fmt: skip
    assert status == 0, err
    # one value for all files still works (both files use the same names here)
    status, out, err = run_main(
        "eval", *models, "--data", d / "plain.csv", d / "weather.csv", "--text-column", "text", "-q"
    )
    assert status == 0, err


def test_column_options_count_must_fit_the_data_files(d):
    status, out, err = run_main(
        "eval", d / "sentiment", d / "weather", "--data", d / "sentiment.csv", d / "weather.csv",
        "--label-column", "rating", "label", "label",
    )  # fmt: skip
    assert status == 2
    assert "3 --label-column values for 2 data files" in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------ B: a headless base model
@pytest.fixture(scope="module")
def headless(d):
    """The base as sentence-transformers saves it: a ``BertModel`` folder (no head)."""
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    from curvmerge.models import tiny_bert
    from tests.test_cli_support import word_tokenizer

    tok = word_tokenizer()
    model = tiny_bert(2, vocab_size=len(tok), hidden_size=8, num_layers=1, max_length=64, seed=0)
    body = BertModel(model.config).eval()
    body.load_state_dict(model.bert.state_dict())
    hf_logging.disable_progress_bar()
    body.save_pretrained(d / "base")
    tok.save_pretrained(d / "base")
    return d / "base"


def test_headless_base_in_merge_compare_and_run(d, headless, tmp_path):
    import json

    models = [d / "sentiment", d / "weather"]
    status, out, err = run_main(
        "merge", *models, "-m", "task_arithmetic", "--base", headless,
        "-o", tmp_path / "ta.safetensors", "-q",
    )  # fmt: skip
    assert status == 0, err
    status, out, err = run_main(
        "compare", *models, "--base", headless, "--data", d / "plain.csv", d / "weather.csv",
        "--methods", "task_arithmetic", "--examples", "8", "-q", "-o", tmp_path / "cmp",
    )  # fmt: skip
    assert status == 0, err
    assert "| base |" in out
    (tmp_path / "data").mkdir()
    for name in ("plain", "weather"):
        shutil.copy(d / f"{name}.csv", tmp_path / "data" / f"{name}.csv")
    cfg = tmp_path / "experiment.yaml"
    cfg.write_text(
        f"""
title: a headless base
output_dir: results
models:
  base: {headless}
  finetuned:
    sentiment: {d / "sentiment"}
    weather: {d / "weather"}
tasks:
  sentiment: {{files: data/plain.csv}}
  weather: {{files: data/weather.csv}}
methods: [task_arithmetic]
fisher: {{examples: 8}}
outputs: {{merged: null, plots: false, sweeps: false}}
"""
    )
    status, out, err = run_main("run", cfg, "-q")
    assert status == 0, err
    assert "| task_arithmetic |" in out and "| base |" in out
    record = json.loads((tmp_path / "results" / "results.json").read_text())
    assert "task_arithmetic" in record["metrics"]


# ------------------------------------------------------------------ C: Fisher files in order
@pytest.fixture(scope="module")
def fishers(d, tmp_path_factory):
    out = tmp_path_factory.mktemp("fishers")
    paths = [out / "fs.safetensors", out / "fw.safetensors"]
    status, _, err = run_main(
        "fisher", d / "sentiment", d / "weather", "--data", d / "plain.csv", d / "weather.csv",
        "--examples", "8", "-o", *paths, "-q",
    )  # fmt: skip
    assert status == 0, err
    return paths


@pytest.mark.parametrize("command", ["merge", "sweep"])
def test_fisher_files_in_the_wrong_order_are_refused(d, fishers, tmp_path, command):
    models = [d / "sentiment", d / "weather"]
    out = ["-o", tmp_path / "m.safetensors"] if command == "merge" else ["-o", tmp_path / "s"]
    extra = ["-m", "fisher_diagonal"] if command == "merge" else ["--points", "2"]
    data = ["--data", d / "plain.csv", d / "weather.csv"] if command == "sweep" else []
    args = [command, *models, *extra, *data, *out, "-q"]
    status, _, err = run_main(*args[:-1], "--fisher", *fishers[::-1], "-q")
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "fw.safetensors" in err and str(d / "weather") in err and str(d / "sentiment") in err
    assert not list(tmp_path.iterdir())
    status, _, err = run_main(*args[:-1], "--fisher", *fishers, "-q")
    assert status == 0, err


def test_fisher_file_of_a_relative_path_is_matched_from_elsewhere(d, tmp_path, monkeypatch):
    monkeypatch.chdir(d)
    status, _, err = run_main(
        "fisher", "sentiment", "weather", "--data", "plain.csv", "weather.csv", "--examples", "4",
        "-o", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "-q",
    )  # fmt: skip
    assert status == 0, err
    monkeypatch.chdir(tmp_path)
    status, _, err = run_main(
        "merge", d / "sentiment", d / "weather", "-m", "fisher_diagonal", "--fisher",
        "a.safetensors", "b.safetensors", "-o", "m.safetensors", "-q",
    )  # fmt: skip
    assert status == 0, err


def test_fisher_file_with_other_shapes_is_refused(d, fishers, tmp_path):
    import torch

    from curvmerge.fisher import load_fisher, save_fisher
    from curvmerge.io import read_metadata

    meta = read_metadata(fishers[0])
    F = load_fisher(fishers[0]).as_dict()
    name = next(iter(F))
    F[name] = torch.ones(3, 3)
    bad = tmp_path / "bad.safetensors"
    keep = {k: meta[k] for k in ("checkpoint", "model_path", "task") if k in meta}
    save_fisher(bad, F, kind="exact", num_examples=8, metadata=keep)
    status, _, err = run_main(
        "merge", d / "sentiment", d / "weather", "-m", "fisher_diagonal", "--fisher", bad,
        fishers[1], "-o", tmp_path / "m.safetensors",
    )  # fmt: skip
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "bad.safetensors" in err and name in err and "(3, 3)" in err


# ------------------------------------------------------------------ D: messages name flags
@pytest.fixture(scope="module")
def renamed(d):
    """plain.csv with the labels 'negative'/'positive' (the model has 'neg'/'pos')."""
    with open(d / "plain.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    full = {"neg": "negative", "pos": "positive"}
    with open(d / "long.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(rows[0])
        w.writerows([text, full[label]] for text, label in rows[1:])
    return d / "long.csv"


def test_label2id_option(d, renamed, tmp_path):
    models = [d / "sentiment", d / "weather"]
    data = ["--data", renamed, d / "weather.csv"]
    status, _, err = run_main("eval", *models, *data, "-q")
    assert status == 2 and "--label2id" in err and "label2id=" not in err, err
    status, out, err = run_main(
        "eval", *models, *data, "--label2id", "negative=0,positive=1", "-", "-q", "--json"
    )
    assert status == 0, err
    (tmp_path / "labels.json").write_text('{"negative": 0, "positive": 1}')
    status, out2, err = run_main(
        "eval", *models, *data, "--label2id", tmp_path / "labels.json", "-", "-q", "--json"
    )
    assert status == 0, err
    assert out2.splitlines()[-1] == out.splitlines()[-1]
    status, _, err = run_main(
        "fisher", *models, *data, "--label2id", "negative=0,positive=1", "-", "--examples", "4",
        "-o", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "-q",
    )  # fmt: skip
    assert status == 0, err
    for bad, words in (("negative=0,positive", "negative=0,positive"), ("neg=0,pos=3", "0...1")):
        status, _, err = run_main("eval", *models, *data, "--label2id", bad, "-")
        assert status == 2 and "--label2id" in err and words in err, err


def test_messages_name_flags(d, tmp_path):
    (tmp_path / "nolabel.csv").write_text("text,stars\nthe movie,1\n")
    status, _, err = run_main("eval", d / "sentiment", "--data", tmp_path / "nolabel.csv")
    assert status == 2 and "--label-column" in err and "label_column=" not in err, err
    models = [d / "sentiment", d / "weather"]
    status, _, err = run_main("merge", *models, "-m", "task_arithmetic", "-o", tmp_path / "m")
    assert status == 2 and "--base" in err, err
    status, _, err = run_main(
        "merge", *models, "-m", "fisher_exact", "--prior", "base", "-o", tmp_path / "m"
    )
    assert status == 2 and "--base" in err, err
    status, _, err = run_main(
        "compare", *models, "--data", d / "plain.csv", d / "weather.csv", "--methods",
        "average,ties", "-o", tmp_path / "c",
    )  # fmt: skip
    assert status == 2 and "'ties'" in err and "--base" in err, err
    assert not list(p for p in tmp_path.iterdir() if p.name != "nolabel.csv")


# ------------------------------------------------------------------ E: eval's rows
def _majority_share(path) -> float:
    with open(path, newline="") as fh:
        labels = [row["label"] for row in csv.DictReader(fh)]
    return max(labels.count(x) for x in set(labels)) / len(labels)


def test_eval_rows_name_the_models_and_the_majority_class(d, tmp_path):
    models = [d / "sentiment", d / "weather"]
    data = [d / "plain.csv", d / "weather.csv"]
    status, _, err = run_main("merge", *models, "-o", tmp_path / "avg", "-q")
    assert status == 0, err
    status, out, err = run_main(
        "eval", tmp_path / "avg" / "sentiment", tmp_path / "avg" / "weather", "--data", *data,
        "-q", "-o", tmp_path / "scores",
    )  # fmt: skip
    assert status == 0, err
    assert "fine-tuned" not in out and "| avg |" in out and "| majority class |" in out
    row = next(line for line in out.splitlines() if line.startswith("| majority class |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[1]) == pytest.approx(100 * _majority_share(data[0]), abs=0.05)
    assert float(cells[2]) == pytest.approx(100 * _majority_share(data[1]), abs=0.05)
    assert "avg" in (tmp_path / "scores.csv").read_text()
    # models in different folders: one row each, named by its path
    status, out, err = run_main("eval", models[0], tmp_path / "avg" / "weather", "--data", *data)
    assert status == 0, err
    assert f"| {models[0]} |" in out and f"| {tmp_path / 'avg' / 'weather'} |" in out
    # a merged body: the row is the body file's
    status, _, err = run_main("merge", *models, "-o", tmp_path / "avg.safetensors", "-q")
    assert status == 0, err
    status, out, err = run_main(
        "eval", *models, "--data", *data, "--body", tmp_path / "avg.safetensors", "-q"
    )
    assert status == 0, err
    assert "| avg.safetensors |" in out and "| majority class |" in out


# ------------------------------------------------------------------ G, H: rows used, for what
def _lines(err: str, name: str) -> list[str]:
    return [line for line in err.splitlines() if name in line and line.startswith("[curvmerge]")]


def test_commands_say_which_rows_they_use(d, tmp_path):
    models = [d / "sentiment", d / "weather"]
    data = [d / "plain.csv", d / "weather.csv"]  # 48 rows each
    fishers = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    status, _, err = run_main("fisher", *models, "--data", *data, "--examples", "8", "-o", *fishers)
    assert status == 0, err
    (line,) = _lines(err, "plain.csv")
    assert "8 of 48 rows" in line and "Fisher" in line
    status, _, err = run_main("eval", *models, "--data", *data)
    assert status == 0, err
    (line,) = _lines(err, "weather.csv")
    assert "48 of 48 rows" in line and "held-out" in line
    status, _, err = run_main(
        "sweep", *models, "--data", *data, "--fisher", *fishers, "--points", "2",
        "-o", tmp_path / "sweep",
    )  # fmt: skip
    assert status == 0, err
    (line,) = _lines(err, "plain.csv")
    for words in ("38 training", "5 validation", "5 test", "--val-size 0.1", "--test-size 0.1",
                  "--split-seed 0", "a.safetensors"):  # fmt: skip
        assert words in line, line
    status, _, err = run_main(
        "compare", *models, "--data", *data, "--methods", "average", "--examples", "8",
        "--val-size", "6", "--split-seed", "3", "-o", tmp_path / "cmp",
    )  # fmt: skip
    assert status == 0, err
    (line,) = _lines(err, "weather.csv")
    for words in ("37 training", "Fisher: 8", "6 validation", "5 test", "--split-seed 3"):
        assert words in line, line
    # -q: no such lines
    status, _, err = run_main("eval", *models, "--data", *data, "-q")
    assert status == 0 and not _lines(err, "weather.csv"), err


def test_run_says_which_rows_it_uses(d, tmp_path):
    cfg = tmp_path / "experiment.yaml"
    cfg.write_text(
        f"""
models:
  finetuned:
    sentiment: {d / "sentiment"}
    weather: {d / "weather"}
tasks:
  sentiment: {{files: {d / "plain.csv"}, options: {{validation: 8, test: 0.25}}}}
  weather: {{files: {d / "weather.csv"}}}
methods: [average]
fisher: {{examples: 16}}
"""
    )
    status, _, err = run_main("run", cfg)
    assert status == 0, err
    (line,) = _lines(err, "tasks.sentiment")
    for words in ("28 training", "Fisher: 16", "8 validation", "12 test", "plain.csv"):
        assert words in line, line
