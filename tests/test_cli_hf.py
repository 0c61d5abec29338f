"""The command with Hugging Face models and data files: end to end through the console
script (fisher -> merge -o DIR -> from_pretrained equals the closed-form diagonal-Fisher
merge of the Fisher files) for sentence classification, sentence pairs and a causal LM, and
the other commands (eval, sweep, compare, run) on the same models."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.test_cli_support import (
    run_main,
    run_script,
    save_bert,
    save_gpt2,
    write_lm_csv,
    write_pair_csv,
    write_text_csv,
)

pytest.importorskip("transformers")

TASKS = {
    # name: (labels or None for a causal LM, model writer, data writer)
    "text": (("neg", "pos"), ("neg", "neu", "pos")),
    "pair": (("entailment", "not_entailment"), ("entailment", "not_entailment")),
}


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """Two tiny BERT classifiers (2 and 3 labels), two sentence-pair classifiers and two
    GPT-2 language models, saved with save_pretrained and their tokenizers, with CSV files."""
    d = tmp_path_factory.mktemp("hf")
    labels_a, labels_b = TASKS["text"]
    save_bert(d / "sentiment", labels_a, seed=1)
    save_bert(d / "weather", labels_b, seed=2)
    write_text_csv(d / "sentiment.csv", labels_a, seed=1)
    write_text_csv(d / "weather.csv", labels_b, seed=2)
    for k, seed in (("rte", 3), ("mnli", 4)):
        save_bert(d / k, TASKS["pair"][0], seed=seed)
        write_pair_csv(d / f"{k}.csv", seed=seed)
    for k, seed in (("lm_a", 5), ("lm_b", 6)):
        save_gpt2(d / k, seed=seed)
        write_lm_csv(d / f"{k}.csv", seed=seed)
    return d


def _closed_form(auto_class, folders, fishers, **kwargs):
    """The diagonal-Fisher merge computed here from the Fisher files (library merge)."""
    import curvmerge
    from curvmerge.fisher import load_fisher

    models = [auto_class.from_pretrained(f) for f in folders]
    Fs = [load_fisher(p, m) for p, m in zip(fishers, models)]
    return models, curvmerge.merge(models, Fs, **kwargs)


def _check_folder(folder, auto_class, expected, own=None):
    """``from_pretrained(folder)`` works; its merged tensors are the expected ones and every
    other parameter (the head) is the task model's own."""
    loaded = auto_class.from_pretrained(folder).eval()
    params = dict(loaded.named_parameters())
    for name, value in expected.params.items():
        assert torch.allclose(params[name], value, rtol=1e-6, atol=1e-8), name
    if own is not None:
        theirs = dict(own.named_parameters())
        others = [n for n in params if n not in expected.params]
        assert others, "a task head"
        for n in others:
            assert torch.equal(params[n], theirs[n]), n
    return loaded


@pytest.mark.parametrize(
    "case",
    ["sentence", "pair", "causal_lm"],
)
def test_fisher_then_merge_to_hugging_face_folders(hf, case, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    folders = {
        "sentence": ("sentiment", "weather"),
        "pair": ("rte", "mnli"),
        "causal_lm": ("lm_a", "lm_b"),
    }[case]
    auto = AutoModelForCausalLM if case == "causal_lm" else AutoModelForSequenceClassification
    models = [hf / f for f in folders]
    data = [hf / f"{f}.csv" for f in folders]
    fishers = [tmp_path / f"{f}.fisher.safetensors" for f in folders]
    extra = (
        ["--text-column", "premise", "--text-pair-column", "hypothesis"] if case == "pair" else []
    )
    r = run_script("fisher", *models, "--data", *data, *extra, "-o", *fishers, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    from curvmerge.io import read_metadata

    meta = read_metadata(fishers[0])
    assert meta["num_examples"] == (32 if case == "causal_lm" else 48)
    assert meta["kind"] == ("mc" if case == "causal_lm" else "exact")
    assert str(meta["data"]).endswith(f"{folders[0]}.csv")

    out = tmp_path / "merged"
    r = run_script(
        "merge", *models, "-m", "fisher_diagonal", "--fisher", *fishers,
        "--damping", "0.01", "-o", out, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    task_models, expected = _closed_form(auto, models, fishers, damping=0.01)
    if case == "causal_lm":
        # tied embeddings: no head of its own, so one folder holds the merged model
        assert (out / "config.json").is_file() and not (out / folders[0]).exists()
        loaded = _check_folder(out, auto, expected)
        assert torch.equal(loaded.lm_head.weight, loaded.transformer.wte.weight)
        assert set(expected.params) == {n for n, _ in loaded.named_parameters()}
    else:
        assert sorted(p.name for p in out.iterdir()) == sorted(folders)
        for folder, own in zip(folders, task_models):
            loaded = _check_folder(out / folder, auto, expected, own=own)
            assert loaded.config.id2label == own.config.id2label
            assert (out / folder / "tokenizer.json").is_file()
        # the merged body moved away from both models and from their average
        body = next(iter(expected.params))
        mean = (dict(task_models[0].named_parameters())[body] + dict(
            task_models[1].named_parameters())[body]) / 2  # fmt: skip
        assert not torch.allclose(expected.params[body], mean)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_eval_merged_folders_and_body_file(hf, tmp_path):
    models = [hf / "sentiment", hf / "weather"]
    data = [hf / "sentiment.csv", hf / "weather.csv"]
    status, out, err = run_main("merge", *models, "-o", tmp_path / "avg.safetensors", "-q")
    assert status == 0, err
    status, out, err = run_main(
        "eval", *models, "--data", *data, "--body", tmp_path / "avg.safetensors", "--json", "-q",
        "-o", tmp_path / "scores",
    )  # fmt: skip
    assert status == 0, err
    scores = json.loads(out.strip().splitlines()[-1])
    assert set(scores) == {"sentiment", "weather"}
    assert "macro-F1" in out and (tmp_path / "scores.csv").is_file()
    status, _, err = run_main("merge", *models, "-o", tmp_path / "avg", "-q")
    assert status == 0, err
    status, out2, err = run_main(
        "eval", tmp_path / "avg" / "sentiment", tmp_path / "avg" / "weather",
        "--data", *data, "--json", "-q",
    )  # fmt: skip
    assert status == 0, err
    assert json.loads(out2.strip().splitlines()[-1]) == scores  # the same merged models


def test_base_model_folder_for_task_arithmetic_and_prior(hf, tmp_path):
    models = [hf / "sentiment", hf / "weather"]
    status, out, err = run_main(
        "merge", *models, "-m", "task_arithmetic", "--base", hf / "rte",
        "--option", "scaling=0.5", "-o", tmp_path / "ta.safetensors", "-q",
    )  # fmt: skip
    assert status == 0, err
    from transformers import AutoModelForSequenceClassification as Auto

    from curvmerge.io import load_params
    from curvmerge.models import body_names

    a, b, base = (Auto.from_pretrained(hf / n) for n in ("sentiment", "weather", "rte"))
    merged = load_params(tmp_path / "ta.safetensors")
    pa, pb, p0 = (dict(m.named_parameters()) for m in (a, b, base))
    for n in body_names(a)[:3]:
        expected = p0[n] + 0.5 * ((pa[n] - p0[n]) + (pb[n] - p0[n]))
        assert torch.allclose(merged[n], expected, atol=1e-6), n
    # a base of another architecture is refused, naming the difference
    status, _, err = run_main(
        "merge", *models, "-m", "ties", "--base", hf / "lm_a", "-o", tmp_path / "t.safetensors"
    )
    assert status == 2 and "different architectures" in err and "model_type" in err


def test_sweep_and_compare_on_data_files(hf, tmp_path):
    models = [hf / "sentiment", hf / "weather"]
    data = [hf / "sentiment.csv", hf / "weather.csv"]
    fishers = [tmp_path / "fa.safetensors", tmp_path / "fb.safetensors"]
    status, _, err = run_main("fisher", *models, "--data", *data, "-o", *fishers, "-q")
    assert status == 0, err
    status, out, err = run_main(
        "sweep", *models, "--data", *data, "--fisher", *fishers, "--points", "3", "-q",
        "-o", tmp_path / "sweep",
    )  # fmt: skip
    assert status == 0, err
    assert "3 points" in out and "% of the" in out and (tmp_path / "sweep.csv").is_file()
    status, out, err = run_main(
        "compare", *models, "--data", *data, "--methods", "average,fisher_diagonal,ensemble",
        "--examples", "16", "-q", "-o", tmp_path / "cmp" / "table",
    )  # fmt: skip
    assert status == 0, err
    for row in ("model: sentiment", "majority class", "average", "fisher_diagonal", "ensemble"):
        assert f"| {row} |" in out
    record = json.loads((tmp_path / "cmp" / "table.json").read_text())
    assert set(record["metrics"]["average"]) == {"sentiment", "weather"}
    assert (tmp_path / "cmp" / "table.md").is_file() and (tmp_path / "cmp" / "table.png").is_file()


def test_compare_keeps_the_data_loss(hf, tmp_path):
    """compare reads data files through the library: token-level LM data keep their
    LossSpec (classes_last=True) and come in batches of --batch-size."""
    status, out, err = run_main(
        "compare", hf / "lm_a", hf / "lm_b", "--data", hf / "lm_a.csv", hf / "lm_b.csv",
        "--methods", "average,fisher_diagonal", "--examples", "6", "--batch-size", "4", "-q",
        "-o", tmp_path / "lm",
    )  # fmt: skip
    assert status == 0, err
    assert "| fisher_diagonal |" in out and "| majority class |" in out
    record = json.loads((tmp_path / "lm.json").read_text())
    specs = [t["loss_spec"] for t in record["settings"]["tasks"]]
    assert [(s["name"], s["classes_last"]) for s in specs] == [("cross_entropy", True)] * 2
    assert record["costs"]["statistics"]["diagonal_fisher"]["examples"] == [6, 6]


def test_run_config_with_data_files(hf, tmp_path, monkeypatch):
    import shutil

    import curvmerge.commands.run as run_command
    from curvmerge.experiment import TASK_SOURCES, files_task

    # the command registers no loader of its own: the library reads the data files
    assert not hasattr(run_command, "files_source") and "files_task" not in vars(run_command)
    assert TASK_SOURCES["files"].__module__ == files_task.__module__
    (tmp_path / "data").mkdir()
    for name in ("sentiment", "weather"):
        shutil.copy(hf / f"{name}.csv", tmp_path / "data" / f"{name}.csv")
    models = os.path.relpath(hf, tmp_path)  # ../hf0: relative to the config's folder
    cfg = tmp_path / "experiment.yaml"
    cfg.write_text(
        f"""
title: two tiny BERTs
output_dir: results
models:
  finetuned:
    sentiment: {models}/sentiment
    weather: {models}/weather
tasks:
  sentiment: {{files: data/sentiment.csv, options: {{validation: 0.25, test: 0.25}}}}
  weather:
    files: data/weather.csv
    split_seed: 1
methods: [average, fisher_diagonal, ensemble]
fisher: {{examples: 16}}
outputs: {{merged: hf, sweeps: false}}
"""
    )
    monkeypatch.chdir(hf)  # not the config's folder
    status, out, err = run_main("run", cfg, "-q")
    assert status == 0, err
    assert "| fisher_diagonal |" in out and "majority class" in out
    res = tmp_path / "results"
    for name in ("results.md", "results.csv", "results.png", "results.json"):
        assert (res / name).is_file(), name
    from transformers import AutoModelForSequenceClassification

    record = json.loads((res / "results.json").read_text())
    assert record["config"]["tasks"]["weather"]["files"] == str(tmp_path / "data" / "weather.csv")
    assert record["costs"]["statistics"]["diagonal_fisher"]["examples"] == [16, 16]
    merged = res / "merged" / "fisher_diagonal" / "sentiment"
    assert AutoModelForSequenceClassification.from_pretrained(merged).config.num_labels == 2
    # a second run refuses to overwrite, before any work
    status, _, err = run_main("run", cfg, "-q")
    assert status == 2 and "already exists" in err and "--force" in err
