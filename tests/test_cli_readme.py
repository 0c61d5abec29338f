"""Every command shown in README.md runs as written.

The commands are extracted from the README's ``bash`` blocks and from inline code that
starts with ``curvmerge``, ``python`` or ``make``, and run in README order in one folder,
with ``CURVMERGE_QUICK=1`` (smoke-test sizes: ``finetune`` takes at most 20 steps, ``demo``
runs its quick mode) after the test has made the files the README assumes: tiny Hugging Face
models under ``models/``, CSV files under ``data/``, and each ``yaml`` block whose first line
is ``# NAME`` written to ``NAME``.

``curvmerge``/``python -m curvmerge`` commands run through :func:`curvmerge.cli.main` in this
process (the console script calls the same function; importing torch and transformers once
keeps the test quick). What cannot run quickly is checked without running it, and said so:

- ``curvmerge demo --text`` (MiniLM fine-tuning, about 10 minutes): ``--help``;
- ``python benchmarks/...`` (minutes each): ``--help``, and every option the README passes
  must be among the script's options;
- ``make TARGET``: ``make -n TARGET`` (the target exists; nothing is run);
- a bare ``curvmerge COMMAND`` named in prose: ``curvmerge COMMAND --help``;
- ``pip install ...``: not run (it needs a package registry).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_cli_support import run_main, save_bert, write_text_csv

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
LONG = {("demo", "--text"): "MiniLM fine-tuning takes about 10 minutes"}


def readme_commands(text: str) -> list[str]:
    """Shell commands of the README in order: ``bash`` block lines and inline code."""
    out: list[tuple[int, str]] = []
    for m in re.finditer(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S):
        joined = m.group(1).replace("\\\n", " ")
        offset = m.start()
        for line in joined.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out.append((offset, line))
                offset += 1
    fenced = [(m.start(), m.end()) for m in re.finditer(r"```.*?```", text, re.S)]
    for m in re.finditer(r"`([^`\n]+)`", text):
        if any(a <= m.start() < b for a, b in fenced):
            continue
        code = m.group(1).strip()
        if re.match(r"(curvmerge|python|make) ", code):
            out.append((m.start(), code))
    return [c for _, c in sorted(out)]


def readme_files(text: str) -> dict[str, str]:
    """``yaml`` blocks whose first line is ``# NAME``: the files the commands read."""
    files = {}
    for m in re.finditer(r"```ya?ml\n# ([\w./-]+)\n(.*?)```", text, re.S):
        files[m.group(1)] = m.group(2)
    return files


def test_readme_extraction_finds_the_commands():
    commands = readme_commands(README.read_text())
    joined = "\n".join(commands)
    for expected in (
        "curvmerge finetune",
        "curvmerge merge models/sentiment",
        "curvmerge run experiment.yaml",
        "python -m curvmerge verify --help",
        "make demo",
    ):
        assert expected in joined, expected


def _save_headless_base(folder):
    """The base as sentence-transformers saves one: a ``BertModel`` folder, no head."""
    from transformers import BertModel

    from curvmerge.models import tiny_bert
    from tests.test_cli_support import word_tokenizer

    tok = word_tokenizer()
    model = tiny_bert(2, vocab_size=len(tok), hidden_size=8, num_layers=1, max_length=64, seed=0)
    body = BertModel(model.config).eval()
    body.load_state_dict(model.bert.state_dict())
    body.save_pretrained(folder)
    tok.save_pretrained(folder)


@pytest.fixture
def work(tmp_path, monkeypatch):
    """The files the README's commands read, and a quick-mode environment."""
    text = README.read_text()
    _save_headless_base(tmp_path / "models" / "base")
    save_bert(tmp_path / "models" / "sentiment", ("neg", "pos"), seed=1)
    save_bert(tmp_path / "models" / "weather", ("cold", "mild", "warm"), seed=2)
    (tmp_path / "data").mkdir()
    write_text_csv(tmp_path / "data" / "sentiment.csv", ("neg", "pos"), n=40, seed=1)
    write_text_csv(tmp_path / "data" / "weather.csv", ("cold", "mild", "warm"), n=40, seed=2)
    write_text_csv(tmp_path / "data" / "sentiment_test.csv", ("neg", "pos"), n=20, seed=3)
    write_text_csv(tmp_path / "data" / "weather_test.csv", ("cold", "mild", "warm"), n=20, seed=4)
    for name, content in readme_files(text).items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(content)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CURVMERGE_QUICK", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def _curvmerge(argv: list[str]) -> tuple[list[str], str | None]:
    """The arguments to run and why they differ from the README's (``None``: as written)."""
    for key, why in LONG.items():
        if tuple(argv[: len(key)]) == key:
            return [*key, "--help"], why
    if len(argv) == 1 and not argv[0].startswith("-"):
        return [argv[0], "--help"], "a command named in prose"
    return argv, None


def _run_inline(argv: list[str]) -> tuple[int, str, str]:
    import torch

    threads = torch.get_num_threads()
    try:
        return run_main(*argv)
    except SystemExit as exc:  # --help
        return int(exc.code or 0), "", ""
    finally:
        torch.set_num_threads(threads)


def test_every_readme_command_runs(work):
    commands = readme_commands(README.read_text())
    ran, checked = [], []
    for line in commands:
        tokens = shlex.split(line, comments=True)
        if tokens[:3] == ["python", "-m", "curvmerge"] or tokens[0] == "curvmerge":
            argv = tokens[3:] if tokens[0] == "python" else tokens[1:]
            argv, why = _curvmerge(argv)
            status, out, err = _run_inline(argv)
            assert status == 0, f"{line}\n{out}\n{err}"
            (checked if why else ran).append(line)
        elif tokens[0] == "python" and tokens[1].startswith(("benchmarks/", "examples/")):
            r = subprocess.run(
                [sys.executable, tokens[1], "--help"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=120,
                env={**os.environ, "HF_HUB_OFFLINE": "1"},
            )
            assert r.returncode == 0, f"{line}\n{r.stderr}"
            for option in (t for t in tokens[2:] if t.startswith("--")):
                assert option in r.stdout, f"{line}: {tokens[1]} has no option {option}"
            checked.append(line)
        elif tokens[0] == "make":
            r = subprocess.run(
                ["make", "-n", *tokens[1:]], cwd=ROOT, capture_output=True, text=True
            )
            assert r.returncode == 0, f"{line}\n{r.stderr}"
            checked.append(line)
        else:
            pytest.fail(f"the README shows a command this test does not know: {line}")
    assert len(ran) >= 12
    # what the commands wrote
    assert (work / "merged" / "sentiment" / "config.json").is_file()
    assert (work / "task_arithmetic" / "weather" / "model.safetensors").is_file()
    assert (work / "results" / "compare.md").is_file()
    assert (work / "results" / "experiment" / "results.json").is_file()
