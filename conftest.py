"""Shared pytest set-up: one torch thread, and names available to every doctest.

The tests use tiny models, for which one thread is fastest; with two threads on a shared
2-core machine, small kernels spin-wait and the suite runs many times slower.
"""

import os

import pytest
import torch

import curvmerge

torch.set_num_threads(int(os.environ.get("CURVMERGE_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    doctest_namespace["torch"] = torch
    doctest_namespace["curvmerge"] = curvmerge
    for name in curvmerge.__all__:
        doctest_namespace[name] = getattr(curvmerge, name)
