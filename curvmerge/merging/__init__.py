"""Merging: the curvature equation, the methods that are not curvature-shaped, the method
registry, and coefficient sweeps that reuse per-model statistics.

The subpackage is :mod:`curvmerge.merging`; the merge function is :func:`curvmerge.merge`.
"""

from curvmerge.merging.adamerging import AdaMergingReport, adamerging
from curvmerge.merging.ensemble import EnsembleResult, OutputEnsemble, output_ensemble
from curvmerge.merging.equation import merge
from curvmerge.merging.methods import MethodReport, dare, slerp, task_arithmetic, ties
from curvmerge.merging.prepared import PreparedMerge
from curvmerge.merging.registry import (
    MethodSpec,
    UnknownMethodError,
    get_method,
    list_methods,
    method_names,
    task_models,
)
from curvmerge.merging.regmean import (
    RegMeanReport,
    SingularGramWarning,
    regmean,
    regmean_plus_plus,
)
from curvmerge.merging.report import (
    ConvergenceError,
    ConvergenceWarning,
    DampingWarning,
    MergeCosts,
    MergeReport,
    MergeResult,
    load_merged,
    parameters_of,
)
from curvmerge.merging.spectral import iso_c, iso_cts, tsv_merge
from curvmerge.merging.spherical import slerp_sequential, spherical_barycenter
from curvmerge.merging.sweep import (
    SweepPoint,
    SweepResult,
    grid_search,
    line_grid,
    scaling_grid,
    simplex_grid,
    sweep,
)
from curvmerge.merging.system import DEFAULT_DAMPING
from curvmerge.merging.weight_ensembling import (
    CoefficientNetwork,
    WeightEnsemblingReport,
    WeightEnsemblingResult,
    load_coefficient_network,
    save_coefficient_network,
    weight_ensembling,
)

__all__ = [
    # the equation
    "merge",
    "MergeResult",
    "MergeReport",
    "MergeCosts",
    "DEFAULT_DAMPING",
    "ConvergenceWarning",
    "ConvergenceError",
    "DampingWarning",
    "load_merged",
    "parameters_of",
    # other methods
    "task_arithmetic",
    "ties",
    "dare",
    "slerp",
    "slerp_sequential",
    "spherical_barycenter",
    "tsv_merge",
    "iso_c",
    "iso_cts",
    "regmean",
    "regmean_plus_plus",
    "RegMeanReport",
    "SingularGramWarning",
    "adamerging",
    "AdaMergingReport",
    "weight_ensembling",
    "WeightEnsemblingResult",
    "WeightEnsemblingReport",
    "CoefficientNetwork",
    "save_coefficient_network",
    "load_coefficient_network",
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
