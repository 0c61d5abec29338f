"""Merging: the curvature equation and the methods that are not curvature-shaped."""

from curvmerge.merge.equation import (
    ConvergenceError,
    ConvergenceWarning,
    MergeReport,
    MergeResult,
    load_merged,
    merge,
    parameters_of,
)

__all__ = [
    "merge",
    "MergeResult",
    "MergeReport",
    "ConvergenceWarning",
    "ConvergenceError",
    "load_merged",
    "parameters_of",
]
