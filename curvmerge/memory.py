"""Peak memory of a block of code, for cost reports.

On a CUDA device the peak is ``torch.cuda.max_memory_allocated`` above its value at the
start (the statistics are reset on entry). On the CPU it is the process's peak resident set
(``VmHWM`` of ``/proc/self/status``, reset on entry through ``/proc/self/clear_refs``) above
its resident set at the start: memory the block allocated and touched, including what
PyTorch's allocator keeps. Where neither can be read (not Linux, no permission), the peak is
``None``: a report says "not measured" rather than a wrong number.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["PeakMemory"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        return None
    return None


class PeakMemory:
    """``with PeakMemory(device) as m: ...``, then ``m.peak``: bytes above the start, or
    ``None`` where the peak cannot be read.

    Args:
        device: Where the block allocates (``"cuda:0"``, ``"cpu"``, a ``torch.device``).
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.peak: int | None = None
        self._start: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        try:
            _CLEAR_REFS.write_text("5")  # resets VmHWM to the current resident set
        except OSError:
            self._start = None
            return self
        self._start = _status_bytes("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self._start is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            high = torch.cuda.max_memory_allocated(self.device)
        else:
            high = _status_bytes("VmHWM")
        if high is not None:
            self.peak = max(0, high - self._start)
