"""The ``curvmerge`` command: the finetune -> fisher -> merge -> eval path through the console
script, and clear messages with non-zero exit codes for bad input."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from curvmerge.cli import main
from curvmerge.io import load_params, read_metadata

TINY = ["--model", "mlp", "--hidden", "16", "--steps", "15", "-q"]


def _command() -> list[str]:
    script = Path(sys.executable).parent / "curvmerge"
    return [str(script)] if script.exists() else [sys.executable, "-m", "curvmerge"]


def run_script(*args, cwd) -> subprocess.CompletedProcess:
    """Run the console script (a fresh process, as a shell user would)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [*_command(), *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def run_main(*args) -> tuple[int, str, str]:
    """Run :func:`curvmerge.cli.main` in this process (fast); returns (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main([str(a) for a in args])
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A base and a second task model made in-process; the first task model is left to the
    console-script test."""
    d = tmp_path_factory.mktemp("cli")
    assert run_main("finetune", "--task", "digits", *TINY, "-o", d / "base.safetensors")[0] == 0
    status, _, err = run_main(
        "finetune",
        "--task",
        "digits:5,6,7,8,9",
        "--base",
        d / "base.safetensors",
        *TINY,
        "-o",
        d / "b.safetensors",
    )
    assert status == 0, err
    status, _, err = run_main(
        "fisher", d / "b.safetensors", "--examples", "64", "-q", "-o", d / "fb.safetensors"
    )
    assert status == 0, err
    return d


def test_console_script_workflow(work):
    d = work
    r = run_script(
        "finetune",
        "--task",
        "digits:0,1,2,3,4",
        "--base",
        "base.safetensors",
        *TINY,
        "-o",
        "a.safetensors",
        cwd=d,
    )
    assert r.returncode == 0, r.stderr
    meta = read_metadata(d / "a.safetensors")
    assert meta["task"] == "digits:0,1,2,3,4" and meta["model"]["num_classes"] == 5
    assert "validation accuracy" in r.stdout

    r = run_script(
        "fisher", "a.safetensors", "--examples", "64", "-q", "-o", "fa.safetensors", cwd=d
    )
    assert r.returncode == 0, r.stderr
    fmeta = read_metadata(d / "fa.safetensors")
    assert fmeta["kind"] == "exact" and fmeta["num_examples"] == 64 and fmeta["seconds"] > 0

    r = run_script(
        "merge",
        "a.safetensors",
        "b.safetensors",
        "-m",
        "fisher_diagonal",
        "--fisher",
        "fa.safetensors",
        "fb.safetensors",
        "-o",
        "merged.safetensors",
        cwd=d,
    )
    assert r.returncode == 0, r.stderr
    merged = load_params(d / "merged.safetensors")
    assert set(merged) == {"body.1.weight", "body.1.bias"}  # the body only; heads stay
    assert read_metadata(d / "merged.safetensors")["method"] == "fisher_diagonal"

    r = run_script(
        "eval",
        "a.safetensors",
        "b.safetensors",
        "--body",
        "merged.safetensors",
        "--json",
        "-q",
        "-o",
        "scores",
        cwd=d,
    )
    assert r.returncode == 0, r.stderr
    scores = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(scores) == {"digits:0,1,2,3,4", "digits:5,6,7,8,9"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert (
        (d / "scores.md").exists() and (d / "scores.csv").exists() and (d / "scores.png").exists()
    )

    # bad input through the console script: a clear message, exit status 2, no traceback
    r = run_script("eval", "missing.safetensors", cwd=d)
    assert r.returncode == 2
    assert "curvmerge: error: checkpoint missing.safetensors does not exist" in r.stderr
    assert "Traceback" not in r.stderr


def _error(*args) -> str:
    status, _, err = run_main(*args)
    assert status == 2, err
    assert err.startswith("curvmerge: error: "), err
    assert "Traceback" not in err
    return err


def test_missing_checkpoint(work):
    err = _error(
        "merge", work / "nope.safetensors", work / "b.safetensors", "-o", work / "m.safetensors"
    )
    assert "nope.safetensors does not exist" in err


def test_different_architectures(work):
    status, _, _ = run_main(
        "finetune",
        "--task",
        "digits",
        "--model",
        "mlp",
        "--hidden",
        "8",
        "--steps",
        "2",
        "-q",
        "-o",
        work / "other.safetensors",
    )
    assert status == 0
    err = _error(
        "merge", work / "b.safetensors", work / "other.safetensors", "-o", work / "m.safetensors"
    )
    assert "different architectures" in err and "body.1.weight" in err
    assert not (work / "m.safetensors").exists()


def test_config_unknown_method(work):
    cfg = work / "unknown.yaml"
    cfg.write_text(
        "models: [base.safetensors, b.safetensors]\nmethod: magic\noutput: m.safetensors\n"
    )
    err = _error("merge", "--config", cfg)
    assert "unknown method 'magic'" in err and "fisher_diagonal" in err


def test_config_negative_weight(work):
    cfg = work / "negative.yaml"
    cfg.write_text(
        "models: [base.safetensors, b.safetensors]\nmethod: average\nweights: [0.5, -1]\n"
        "output: m.safetensors\n"
    )
    err = _error("merge", "--config", cfg)
    assert "non-negative" in err and "-1" in err


def test_truncated_safetensors(work):
    data = (work / "b.safetensors").read_bytes()
    (work / "cut.safetensors").write_bytes(data[: len(data) // 2])
    err = _error("eval", work / "cut.safetensors")
    assert "cut.safetensors" in err and "truncated or corrupt" in err


def test_pickles_are_refused(work):
    (work / "model.pt").write_bytes(b"not even a pickle")
    err = _error("eval", work / "model.pt")
    assert "only reads safetensors" in err


def test_existing_output_needs_force(work):
    out = work / "avg.safetensors"
    args = ("merge", work / "b.safetensors", work / "b.safetensors", "-o", out)
    assert run_main(*args)[0] == 0
    before = out.read_bytes()
    err = _error(*args)
    assert "already exists" in err and "--force" in err
    assert out.read_bytes() == before
    assert run_main(*args, "--weights", "1", "3", "--force")[0] == 0


def test_flags_override_config_and_options(work):
    cfg = work / "ta.yaml"
    cfg.write_text(
        "models: [b.safetensors, b.safetensors]\nmethod: task_arithmetic\nbase: base.safetensors\n"
        "options: {scaling: 0.5}\noutput: ta.safetensors\n"
    )
    status, out, err = run_main("merge", "--config", cfg, "--option", "scaling=0.25")
    assert status == 0, err
    meta = read_metadata(work / "ta.safetensors")
    assert meta["method"] == "task_arithmetic" and meta["options"]["scaling"] == 0.25
    err = _error("merge", "--config", cfg, "--option", "bogus=1", "--force")
    assert "no option 'bogus'" in err


def test_sweep_prints_cost(work):
    status, out, err = run_main(
        "sweep",
        work / "b.safetensors",
        work / "b.safetensors",
        "--fisher",
        work / "fb.safetensors",
        work / "fb.safetensors",
        "--points",
        "5",
        "-q",
        "-o",
        work / "sweep",
    )
    assert status == 0, err
    assert "5 points" in out and "% of the" in out and "computing the statistics" in out
    assert (work / "sweep.md").exists() and (work / "sweep.png").exists()


def test_help_explains_options():
    with pytest.raises(SystemExit) as exc, contextlib.redirect_stdout(io.StringIO()) as out:
        main(["merge", "--help"])
    assert exc.value.code == 0
    text = out.getvalue()
    for option in (
        "--config",
        "--method",
        "--weights",
        "--damping",
        "--prior",
        "--params",
        "--fisher",
        "--output",
        "--force",
    ):
        assert option in text
    assert run_main()[0] == 2  # no command: help and a usage status


def _tiny_fishers(d):
    """Fisher files of base and b, and copies 1e-6 times smaller (made once)."""
    from curvmerge.fisher import load_fisher, save_fisher

    if not (d / "fb_tiny.safetensors").exists():
        status, _, err = run_main(
            "fisher", d / "base.safetensors", "--examples", "64", "-q",
            "-o", d / "fbase.safetensors",
        )  # fmt: skip
        assert status == 0, err
        for name in ("fbase", "fb"):
            F = load_fisher(d / f"{name}.safetensors")
            save_fisher(d / f"{name}_tiny.safetensors", 1e-6 * F, kind=F.kind,
                        num_examples=F.num_examples)  # fmt: skip
    return d


def test_merge_with_the_methods_that_read_data(work):
    """RegMean, RegMean++ and the K-FAC merge compute their statistics from the models'
    data; another method's merge can be the prior."""
    import torch

    d = work
    models = (d / "base.safetensors", d / "b.safetensors")
    status, _, err = run_main("merge", *models, "-o", d / "avg.safetensors", "--force")
    assert status == 0, err
    average = load_params(d / "avg.safetensors")
    runs = {
        "regmean": ["-m", "regmean"],
        "regmean_plus_plus": ["-m", "regmean_plus_plus"],
        "fisher_kfac": ["-m", "fisher_kfac"],
        "kfac_ta": ["-m", "fisher_kfac", "--prior", "task_arithmetic", "--base", models[0]],
    }
    for tag, flags in runs.items():
        out = d / f"{tag}.safetensors"
        status, printed, err = run_main(
            "merge", *models, *flags, "--examples", "32", "-q", "-o", out, "--force"
        )
        assert status == 0, (tag, err)
        merged = load_params(out)
        assert set(merged) == set(average)
        moved = sum(float((merged[n] - average[n]).norm()) for n in average)
        assert moved > 1e-4, tag  # the statistics were used: not the average
        assert all(torch.isfinite(v).all() for v in merged.values())
    status, _, err = run_main(
        "merge", *models, "-m", "fisher_kfac", "--prior", "task_arithmetc", "--base", models[0],
        "--examples", "32", "-q", "-o", d / "bad.safetensors",
    )  # fmt: skip
    assert status == 2 and "merge method" in err and not (d / "bad.safetensors").exists()


def test_merge_with_weight_ensembling_writes_its_coefficient_network(work):
    """Weight ensembling is not one merged model: the command writes the network it learned
    (readable by load_coefficient_network), and refuses a folder output."""
    from curvmerge.merging import load_coefficient_network

    d = work
    models = (d / "b.safetensors", d / "b.safetensors")
    out = d / "net.safetensors"
    status, printed, err = run_main(
        "merge", *models, "-m", "weight_ensembling", "--base", d / "base.safetensors",
        "--option", "steps=3", "--examples", "32", "-q", "-o", out, "--force",
    )  # fmt: skip
    assert status == 0, err
    assert "coefficient network" in printed
    net, groups, meta = load_coefficient_network(out)
    assert net.num_models == 2 and len(groups) == net.num_groups > 1
    assert meta["method"] == "weight_ensembling"
    status, _, err = run_main(
        "merge", *models, "-m", "weight_ensembling", "--base", d / "base.safetensors",
        "-q", "-o", d / "folder",
    )  # fmt: skip
    assert status == 2 and "FILE.safetensors" in err and not (d / "folder").exists()
    status, _, err = run_main("merge", *models, "-m", "ensemble", "-o", d / "e.safetensors")
    assert status == 2 and "not a merge" in err


def test_merge_of_a_tiny_fisher_is_the_same_merge(work):
    """Fisher files 1e-6 times smaller give the same diagonal-Fisher merge with the
    command's defaults (the damping is relative to the curvature), not the average."""
    import torch

    d = _tiny_fishers(work)
    models = (d / "base.safetensors", d / "b.safetensors")
    outputs = {}
    for tag, fishers in (("plain", ("fbase", "fb")), ("tiny", ("fbase_tiny", "fb_tiny"))):
        out = d / f"tiny_{tag}.safetensors"
        status, printed, err = run_main(
            "merge", *models, "-m", "fisher_diagonal", "--fisher",
            *(d / f"{f}.safetensors" for f in fishers), "-o", out, "--force",
        )  # fmt: skip
        assert status == 0, err
        outputs[tag] = load_params(out)
    status, _, err = run_main("merge", *models, "-o", d / "tiny_avg.safetensors", "--force")
    assert status == 0, err
    average = load_params(d / "tiny_avg.safetensors")
    for n in outputs["plain"]:
        plain, tiny = outputs["plain"][n], outputs["tiny"][n]
        assert torch.allclose(tiny, plain, rtol=1e-5, atol=1e-7), n
    moved = sum(float((outputs["plain"][n] - average[n]).norm()) for n in average)
    assert moved > 1e-3  # not the average
    assert "λ" in printed  # the report states the effective damping


def test_absolute_damping_on_a_tiny_fisher_says_it_dominates(work):
    d = _tiny_fishers(work)
    fishers = (d / "fbase_tiny.safetensors", d / "fb_tiny.safetensors")
    models = (d / "base.safetensors", d / "b.safetensors")
    status, out, err = run_main(
        "merge", *models, "-m", "fisher_diagonal", "--fisher", *fishers,
        "--damping", "1e-3", "--damping-scale", "1", "-o", d / "abs.safetensors", "--force",
    )  # fmt: skip
    assert status == 0, err
    assert "damping dominates" in out and "(given)" in out
    assert "curvmerge: warning: the damping dominates the curvature" in err
    err = _error(
        "merge", *models, "-m", "fisher_diagonal", "--fisher", *fishers,
        "--damping-scale", "-2", "-o", d / "abs.safetensors", "--force",
    )  # fmt: skip
    assert "damping_scale" in err


def test_sweep_prior_base(work):
    d = _tiny_fishers(work)
    args = [
        "sweep", d / "b.safetensors", d / "b.safetensors", "--fisher", d / "fb.safetensors",
        d / "fb.safetensors", "--points", "3", "-q", "--prior", "base",
    ]  # fmt: skip
    err = _error(*args, "-o", d / "sweep_base")
    assert "--prior base needs --base" in err
    status, out, err = run_main(*args, "--base", d / "base.safetensors", "-o", d / "sweep_base")
    assert status == 0, err
    assert "3 points" in out


def test_fisher_of_several_checkpoints_in_one_call(work):
    outs = [work / "f1.safetensors", work / "f2.safetensors"]
    args = ["fisher", work / "base.safetensors", work / "b.safetensors", "--examples", "32", "-q"]
    err = _error(*args, "-o", outs[0])
    assert "1 --output files for 2 models" in err
    status, out, err = run_main(*args, "-o", *outs)
    assert status == 0, err
    assert [read_metadata(p)["num_examples"] for p in outs] == [32, 32]
    assert read_metadata(outs[1])["task"] == "digits:5,6,7,8,9"


def test_compare_checkpoints_through_the_runner(work):
    status, out, err = run_main(
        "compare", work / "base.safetensors", work / "b.safetensors",
        "--methods", "average,fisher_diagonal,ensemble", "--examples", "64", "-q",
        "-o", work / "cmp" / "table",
    )  # fmt: skip
    assert status == 0, err
    assert "| majority class |" in out and "| fisher_diagonal |" in out
    record = json.loads((work / "cmp" / "table.json").read_text())
    assert record["settings"]["fisher_examples"] == 64
    err = _error("compare", work / "b.safetensors", "-o", work / "cmp" / "table")
    assert "already exists" in err


def test_verify_passes_every_argument_to_the_report():
    with pytest.raises(SystemExit) as exc, contextlib.redirect_stdout(io.StringIO()) as out:
        main(["verify", "--help"])
    assert exc.value.code == 0
    assert "--fisher-examples" in out.getvalue() and "--out" in out.getvalue()
    assert out.getvalue().startswith("usage: curvmerge verify "), out.getvalue()[:80]
    # the module keeps its own name when run as python -m curvmerge.verify
    from curvmerge.verify.__main__ import build_parser

    assert build_parser().format_usage().startswith("usage: python -m curvmerge.verify ")


def test_finetune_steps_zero_saves_a_fresh_head(work, monkeypatch):
    out = work / "fresh.safetensors"
    status, _, err = run_main(
        "finetune", "--task", "digits:0,1", "--base", work / "base.safetensors",
        "--steps", "0", "-q", "-o", out,
    )  # fmt: skip
    assert status == 0, err
    base, fresh = load_params(work / "base.safetensors"), load_params(out)
    assert all(fresh[n].equal(base[n]) for n in ("body.1.weight", "body.1.bias"))
    monkeypatch.setenv("CURVMERGE_QUICK", "1")  # smoke-test sizes: at most 20 steps
    status, _, err = run_main(
        "finetune", "--task", "digits:0,1", "--model", "mlp", "--hidden", "8", "--epochs", "50",
        "-q", "-o", work / "quick.safetensors",
    )  # fmt: skip
    assert status == 0, err
    assert read_metadata(work / "quick.safetensors")["steps"] == 20


@pytest.mark.parametrize("quiet", [True, False])
def test_compare_exact_fisher_shows_one_bar_per_solve_unless_quiet(work, capsys, quiet):
    args = [
        "compare", work / "base.safetensors", work / "b.safetensors",
        "--methods", "fisher_exact", "--examples", "16",
        "-o", work / "cmp_exact" / ("q" if quiet else "v"),
    ]  # fmt: skip
    status, out, err = run_main(*args, *(["-q"] if quiet else []))
    err += capsys.readouterr().err
    assert status == 0, err
    if quiet:
        assert err == ""
    else:
        assert "fisher_exact CG" in err  # one bar per solve
        assert "each at most 100 iterations" in err  # the stage's default bound, said first
        assert "GGN product (cached)" not in err and "GGN product:" not in err
