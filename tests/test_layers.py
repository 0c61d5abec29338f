"""The arrows point one way (DESIGN.md "Layers"): checked on the import statements."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "curvmerge"

# package (or module) -> curvmerge packages it must never import
FORBIDDEN = {
    "statistics": ["operators", "fisher", "merging", "cli", "verify", "demo"],
    "operators": ["fisher", "merging", "cli", "verify", "demo"],
    "solve.py": ["fisher", "merging", "cli", "verify", "demo", "statistics"],
    "merging": ["cli", "demo"],
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {n for n in names if n.startswith("curvmerge.")}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_point_one_way(layer):
    target = ROOT / layer
    files = [target] if target.suffix == ".py" else sorted(target.rglob("*.py"))
    assert files
    for path in files:
        for name in _imports(path):
            top = name.split(".")[1]
            assert top not in FORBIDDEN[layer], f"{path.relative_to(ROOT)} imports {name}"


def test_no_module_imports_another_modules_private_names():
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("curvmerge"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.relative_to(ROOT)} imports {private} from {node.module}"
