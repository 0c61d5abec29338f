"""A reduced run of the embedded demo (sklearn digits, few steps) through ``curvmerge demo``."""

from __future__ import annotations

import contextlib
import io
import json

import torch

from curvmerge.cli import main
from curvmerge.demo import ALL_METHODS, VISION_EXACT_OPTIONS


def _tables(text: str) -> dict[str, dict[str, list[float]]]:
    """``{section: {row: cells}}`` of the Markdown tables under ``#### <section>`` headings."""
    out: dict[str, dict[str, list[float]]] = {}
    section = None
    for line in text.splitlines():
        if line.startswith("#### "):
            section = line[5:].strip()
            out[section] = {}
        elif section and line.startswith("| ") and not line.startswith(("| method", "| ---")):
            cells = [c.strip().strip("*") for c in line.split("|")[1:-1]]
            out[section][cells[0]] = [float(c) for c in cells[1:]]
        elif section and out[section] and not line.startswith("|"):
            section = None  # the table ended (a cost table may follow)
    return out


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
    tables = _tables(text)
    assert set(tables) == {"accuracy (%)", "macro-F1 (%)"}
    for rows in tables.values():
        assert {"base", "majority class", "model: digits-0-1-2", *ALL_METHODS} <= set(rows)
        for cells in rows.values():
            assert len(cells) == 4 and all(0.0 <= c <= 100.0 for c in cells)
    # the majority class predicts one class: its F1 is 2a / (1 + a) at accuracy a, the
    # others' 0, so macro-F1 = 2a / (1 + a) / (number of classes)
    acc, f1 = tables["accuracy (%)"]["majority class"], tables["macro-F1 (%)"]["majority class"]
    for k, classes in ((0, 3), (2, 4)):
        a = acc[k] / 100
        assert abs(f1[k] - 100 * 2 * a / (1 + a) / classes) < 0.2
    assert "Chosen on validation" in text and "% of the" in text
    for name in (
        "digits_quick.md",
        "digits_quick.csv",
        "digits_quick.png",
        "digits_quick_report.md",
        "digits_quick_sweep.md",
        "sweeps/fisher_diagonal.csv",
    ):
        assert (tmp_path / name).stat().st_size > 0
    record = json.loads((tmp_path / "digits_quick.json").read_text())
    assert record["choices"]["fisher_exact"]["damping"] in (0.1, 0.01, 0.001)
    assert record["costs"]["statistics"]["diagonal_fisher"]["computed"] == 3
    # the exact rows: the demo's documented tolerance, reached by one multi-shift run
    # without hitting the cap (the runner notes a stop at maxiter)
    options = {m["label"]: m["options"] for m in record["settings"]["methods"]}
    assert options["fisher_exact"] == VISION_EXACT_OPTIONS
    assert not any("fisher_exact: CG stopped" in note for note in record["notes"])
    exact = record["costs"]["methods"]["fisher_exact"]
    assert exact["points"] == 3 and 0 < exact["products"] < VISION_EXACT_OPTIONS["maxiter"]
    # a second run refuses to overwrite without --force
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as e:
        assert main(["demo", "--quick", "-q", "--output-dir", str(tmp_path)]) == 2
    assert "already exists" in e.getvalue()
