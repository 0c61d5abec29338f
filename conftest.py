"""Shared pytest set-up: names available to every doctest."""

import pytest
import torch

import curvmerge


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    doctest_namespace["torch"] = torch
    doctest_namespace["curvmerge"] = curvmerge
    for name in curvmerge.__all__:
        doctest_namespace[name] = getattr(curvmerge, name)
