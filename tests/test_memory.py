"""PeakMemory: the peak of a block above its start, or None where it cannot be read."""

from __future__ import annotations

from pathlib import Path

import torch

from curvmerge.memory import PeakMemory


def test_a_large_allocation_shows_in_the_peak_and_a_small_block_does_not():
    readable = Path("/proc/self/clear_refs").exists()
    with PeakMemory("cpu") as big:
        x = torch.ones(25_000_000)  # 100 MB, touched
        del x
    with PeakMemory("cpu") as small:
        y = torch.ones(10)
        del y
    if not readable:  # not Linux: "not measured", never a made-up number
        assert big.peak is None and small.peak is None
        return
    assert big.peak is not None and big.peak >= 90 * 2**20
    assert small.peak is not None and small.peak < 50 * 2**20  # reset on entry
