"""Atomic writes keep the previous file and leave no temporary file behind on failure."""

import os

import pytest

from curvmerge.atomic import atomic_write_bytes, atomic_write_text


def test_write_creates_folders_and_round_trips(tmp_path):
    path = atomic_write_bytes(tmp_path / "a" / "b.bin", b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert atomic_write_text(path, "text").read_text() == "text"


@pytest.mark.parametrize("step", ["fsync", "replace"])
def test_failure_keeps_old_file_and_no_temporary(tmp_path, monkeypatch, step):
    target = tmp_path / "table.md"
    atomic_write_text(target, "old")

    def boom(*args):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, step, boom)
    with pytest.raises(OSError, match="simulated"):
        atomic_write_text(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["table.md"]
