"""Smoke tests of the scripts in ``examples/``: each runs in ``--quick`` mode in a fresh
process (one torch thread, no network), as a user would run it, and its outputs are checked.
The FusionBench-style configuration is run through the ``curvmerge run`` console script."""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from curvmerge.experiment import validate_config
from curvmerge.merging import method_names

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args, cwd: Path) -> str:
    """Run ``examples/<name> --quick ...`` in a fresh process; its stdout."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONHASHSEED": "0",
    }
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--quick", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def read_rows(path: Path) -> list[dict[str, str]]:
    assert path.is_file(), f"{path} was not written"
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def check_accuracies(rows: list[dict[str, str]], skip=("method", "metric")) -> None:
    for row in rows:
        for key, value in row.items():
            if key not in skip and value:
                assert 0.0 <= float(value) <= 1.0, (row, key)


def test_every_example_is_tested():
    scripts = {p.name for p in EXAMPLES.glob("*.py")}
    assert scripts == {
        "mergelib_fisher_vs_isotropic.py",
        "fusionbench_run.py",
        "m3sb_experiment.py",
        "merge_text_classifiers_hf.py",
        "curvature_prior.py",
        "learned_coefficients.py",
    }


def test_mergelib_fisher_vs_isotropic(tmp_path):
    out = tmp_path / "out"
    stdout = run_example("mergelib_fisher_vs_isotropic.py", "--out", out, cwd=tmp_path)
    # one line per method: coefficient chosen on validation, validation and test accuracy
    for method in ("isotropic", "fisher", "ensemble"):
        line = re.search(rf"^{method}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", stdout, re.M)
        assert line, f"no result line for {method}:\n{stdout}"
        a, val, test = map(float, line.groups())
        assert min(abs(a - i / 24) for i in range(25)) < 1e-4  # a point of the 25-point grid
        assert 0 < val <= 1 and 0 < test <= 1
    fraction = re.search(r"sweep cost as a fraction of the Fisher time: (\S+)", stdout)
    assert fraction, stdout
    value = float(fraction.group(1))
    assert math.isfinite(value) and value > 0
    rows = read_rows(out / "results.csv")
    assert [r["method"] for r in rows] == [
        "fine-tune A",
        "fine-tune B",
        "base",
        "isotropic",
        "fisher",
        "ensemble",
    ]
    check_accuracies(rows)
    for method in ("isotropic", "fisher", "ensemble"):
        points = read_rows(out / f"sweep_{method}.csv")
        assert len(points) == 25 and sum(p["chosen"] == "True" for p in points) == 1
    assert (out / "results.png").is_file() and (out / "results.md").is_file()


def test_fusionbench_config_lists_every_registered_method():
    config = yaml.safe_load((EXAMPLES / "fusionbench_config.yaml").read_text())
    checked = validate_config(config, base_dir=EXAMPLES)  # nothing is loaded
    names = list(dict.fromkeys(run.spec.name for run in checked["methods"]))
    assert names == method_names()


def test_fusionbench_config_through_curvmerge_run(tmp_path):
    stdout = run_example("fusionbench_run.py", "--workdir", tmp_path, cwd=tmp_path)
    assert "$ curvmerge run " in stdout
    assert (tmp_path / "fusionbench_config.yaml").read_text() == (
        EXAMPLES / "fusionbench_config.yaml"
    ).read_text()
    results = tmp_path / "runs" / "fusionbench" / "results"
    rows = read_rows(results / "results.csv")
    accuracy = [r for r in rows if r["metric"] == "accuracy"]
    names = [r["method"] for r in accuracy]
    for method in method_names():  # a row per registered method, none skipped
        assert names.count(method) == 1, (method, names)
    assert {"base", "majority class", "model: digits-0-4", "model: digits-5-9"} <= set(names)
    check_accuracies(rows)
    for name in ("results.md", "results.png", "results_report.md", "results.json"):
        assert (results / name).is_file(), name
    assert "| fisher_exact |" in (results / "results.md").read_text()
    assert (results / "merged" / "fisher_diagonal.safetensors").is_file()
    assert (results / "sweeps" / "fisher_diagonal.csv").is_file()
    # the console script on the same YAML reproduces the table (reusing the Fisher files)
    script = Path(sys.executable).with_name("curvmerge")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "curvmerge"]
    config = tmp_path / "fusionbench_config.yaml"
    proc = subprocess.run(
        [*command, "run", str(config), "--force", "-q"],
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reused from Fisher files" in proc.stdout
    assert read_rows(results / "results.csv") == rows


def test_m3sb_experiment(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "m3sb_experiment", EXAMPLES / "m3sb_experiment.py"
    )
    m3sb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m3sb)  # its configuration; main() runs only as a script
    out = tmp_path / "out"
    stdout = run_example("m3sb_experiment.py", "--out", out, cwd=tmp_path)
    assert "Chosen on validation" in stdout
    for name in (
        "base",
        *(f"digits-{'-'.join(map(str, d))}" for d in m3sb.DATASETS.values()),
    ):
        assert (out / "checkpoints" / f"{name}.safetensors").is_file(), name
    rows = read_rows(out / "results" / "results.csv")
    names = [r["method"] for r in rows if r["metric"] == "accuracy"]
    labels = [c.get("label", c["method"]) for c in m3sb.MERGE_CONFIGS]
    for label in labels:  # a row per merge configuration
        assert names.count(label) == 1, (label, names)
    check_accuracies(rows)
    for name in ("results.md", "results.png", "results_report.md", "results.json"):
        assert (out / "results" / name).is_file(), name


def test_merge_text_classifiers_hf(tmp_path):
    out = tmp_path / "out"
    stdout = run_example("merge_text_classifiers_hf.py", "--out", out, cwd=tmp_path)
    tasks = ("reviews", "tweets", "news")
    for task in tasks:
        for split in ("train", "validation", "test"):
            assert (out / "data" / task / f"{split}.csv").is_file()
        assert (out / "models" / task / "config.json").is_file()
        for method in ("fisher", "average"):
            folder = out / "merged" / method / task
            for name in ("config.json", "model.safetensors", "tokenizer.json"):
                assert (folder / name).is_file(), folder / name
    assert stdout.count("reloaded tensors differ by 0.0e+00") == 2, stdout
    rows = read_rows(out / "results.csv")
    assert [r["method"] for r in rows] == ["fine-tuned", "fisher", "average"]
    assert list(rows[0])[1:] == [*tasks, "mean"]
    check_accuracies(rows)
    assert re.search(r"sweep \(diagonal\): 4 points; chosen on validation", stdout)


def test_curvature_prior(tmp_path):
    stdout = run_example("curvature_prior.py", cwd=tmp_path)
    rows = re.findall(r"^(fisher_\w+)\s+(average|task arithmetic [\d.]+)\s+([\d.]+)", stdout, re.M)
    assert len(rows) == 9, stdout  # three curvature merges x three priors
    assert all(0 < float(acc) <= 100 for *_, acc in rows)
    assert re.search(r"^task_arithmetic\s+-\s+[\d.]+", stdout, re.M), stdout


def test_learned_coefficients(tmp_path):
    stdout = run_example("learned_coefficients.py", cwd=tmp_path)
    learned = r"(?:adamerging|weight_ensembling) \((?:task|layer)-wise\)"
    rows = dict(re.findall(rf"^(task_arithmetic|{learned})\s+([\d.]+)", stdout, re.M))
    assert len(rows) == 5, stdout
    assert all(0 < float(acc) <= 100 for acc in rows.values())
    lines = re.findall(
        rf"^({learned}): 20 steps on \d+ unlabelled inputs, entropy ([\d.]+) -> ([\d.]+), "
        r"adaptation [\d.]+ s = (\d+)x one evaluation pass .*, peak memory (\d+ MiB|not measured)",
        stdout,
        re.M,
    )
    assert len(lines) == 4, stdout
    for name, before, after, ratio, _ in lines:
        assert float(after) < float(before) and int(ratio) > 0, name
    assert len(re.findall(r"spread between batches [\d.]+", stdout)) == 6  # 3 tasks x 2
