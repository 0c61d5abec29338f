"""Merging: the curvature equation, the methods that are not curvature-shaped, the method
registry, and coefficient sweeps that reuse per-model statistics."""

from curvmerge.merge.ensemble import EnsembleResult, OutputEnsemble, output_ensemble
from curvmerge.merge.equation import (
    ConvergenceError,
    ConvergenceWarning,
    MergeReport,
    MergeResult,
    load_merged,
    merge,
    parameters_of,
)
from curvmerge.merge.methods import MethodReport, dare, slerp, task_arithmetic, ties
from curvmerge.merge.prepared import PreparedMerge
from curvmerge.merge.registry import (
    MethodSpec,
    UnknownMethodError,
    get_method,
    list_methods,
    method_names,
    task_models,
)
from curvmerge.merge.sweep import (
    SweepPoint,
    SweepResult,
    grid_search,
    line_grid,
    scaling_grid,
    simplex_grid,
    sweep,
)

__all__ = [
    # the equation
    "merge",
    "MergeResult",
    "MergeReport",
    "ConvergenceWarning",
    "ConvergenceError",
    "load_merged",
    "parameters_of",
    # other methods
    "task_arithmetic",
    "ties",
    "dare",
    "slerp",
    "MethodReport",
    "output_ensemble",
    "OutputEnsemble",
    "EnsembleResult",
    # registry
    "MethodSpec",
    "UnknownMethodError",
    "get_method",
    "list_methods",
    "method_names",
    "task_models",
    # sweeps
    "PreparedMerge",
    "sweep",
    "grid_search",
    "SweepResult",
    "SweepPoint",
    "line_grid",
    "simplex_grid",
    "scaling_grid",
]
