"""Gallery scripts are documentation and smoke tests: each must run and pass its asserts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

GALLERY = Path(__file__).resolve().parents[1] / "gallery"
SCRIPTS = sorted(GALLERY.glob("plot_*.py"))


def test_gallery_has_scripts():
    assert SCRIPTS, f"no gallery scripts found in {GALLERY}"


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_gallery_script_runs(script, tmp_path):
    threads = os.environ.get("CURVMERGE_TEST_THREADS", "1")  # see conftest.py
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": threads}
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (
        f"{script.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
