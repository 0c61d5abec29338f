"""The unit of the benchmarks' gradient-pass equivalents, timed in the benchmark's own run."""

from __future__ import annotations

import statistics
import time

import torch

from curvmerge.batches import model_outputs
from curvmerge.losses import flatten_rows


def gradient_pass_seconds(ops, repeats: int = 3) -> float:
    """Seconds of one gradient pass (forward, loss, backward to the operator's parameters)
    over a curvature operator's own data: the median of ``repeats``, the mean over ``ops``.
    A product that costs ``s`` seconds is then ``s / unit`` gradient-pass equivalents."""
    per_op = []
    for op in ops:
        named = dict(op.model.named_parameters())
        params = [named[n] for n in op.space.names]
        fn = op.loss.module()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _, inputs, targets in op.batches():
                with torch.enable_grad():
                    f, y, _ = flatten_rows(op.loss, model_outputs(op.model, inputs), targets)
                    torch.autograd.grad(fn(f, y), params)
            times.append(time.perf_counter() - start)
        per_op.append(statistics.median(times))
    return sum(per_op) / len(per_op)
