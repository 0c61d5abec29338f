"""A reduced run of the embedded demo (sklearn digits, few steps) through ``curvmerge demo``."""

from __future__ import annotations

import contextlib
import io

import torch

from curvmerge.cli import main
from curvmerge.demo import ALL_METHODS


def test_quick_demo(tmp_path):
    threads = torch.get_num_threads()
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main(
                ["demo", "--quick", "--threads", "1", "-q", "--output-dir", str(tmp_path)]
            )
    finally:
        torch.set_num_threads(threads)
    assert status == 0, err.getvalue()
    text = out.getvalue()
    table = [line for line in text.splitlines() if line.startswith("| ")]
    rows = {line.split("|")[1].strip() for line in table[2:]}
    assert {"base", "model: digits-0-1-2", *ALL_METHODS} <= rows
    for line in table[2:]:
        for cell in line.split("|")[2:-1]:
            assert 0.0 <= float(cell.strip().strip("*")) <= 100.0
    assert "chosen on validation" in text and "% of the" in text
    for name in (
        "digits_quick.md",
        "digits_quick.csv",
        "digits_quick.png",
        "digits_quick_sweep.md",
    ):
        assert (tmp_path / name).stat().st_size > 0
    # a second run refuses to overwrite without --force
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as e:
        assert main(["demo", "--quick", "-q", "--output-dir", str(tmp_path)]) == 2
    assert "already exists" in e.getvalue()
