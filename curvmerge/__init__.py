r"""curvmerge: merge neural networks with curvature.

.. math::

    \theta^* = (\lambda I + \sum_t w_t F_t)^{-1} (\sum_t w_t F_t \theta_t + \lambda \theta_0)

Submodules with their own namespaces: :mod:`curvmerge.data` (offline tasks; user files in
:mod:`curvmerge.data.files`), :mod:`curvmerge.hf` (Hugging Face models in and out),
:mod:`curvmerge.experiment` (the experiment runner),
:mod:`curvmerge.models`, :mod:`curvmerge.train`, :mod:`curvmerge.io`,
:mod:`curvmerge.results`, :mod:`curvmerge.verify`, :mod:`curvmerge.losses`.
"""

from curvmerge.fisher import diagonal_fisher, load_fisher, save_fisher
from curvmerge.merging import (
    ConvergenceError,
    ConvergenceWarning,
    DampingWarning,
    MergeCosts,
    MergeReport,
    MergeResult,
    PreparedMerge,
    adamerging,
    dare,
    get_method,
    iso_c,
    iso_cts,
    list_methods,
    load_merged,
    merge,
    output_ensemble,
    parameters_of,
    regmean,
    regmean_plus_plus,
    slerp,
    slerp_sequential,
    spherical_barycenter,
    sweep,
    task_arithmetic,
    ties,
    tsv_merge,
    weight_ensembling,
)
from curvmerge.operators import (
    BlockDiagonalOperator,
    DenseOperator,
    DiagonalOperator,
    GGNOperator,
    IdentityOperator,
    KroneckerOperator,
    LinearOperator,
    as_operator,
)
from curvmerge.precondition import KroneckerPreconditioner, NystromPreconditioner
from curvmerge.solve import CGResult, ShiftedCGResults, cg, cg_shifts, solve_cg
from curvmerge.space import ParamSpace, SpaceMismatchError
from curvmerge.statistics import (
    KFACFactors,
    LayerGrams,
    input_grams,
    kfac_factors,
    load_grams,
    save_grams,
)
from curvmerge.statistics.base import DataOrderError
from curvmerge.train import OneClassWarning

__version__ = "0.1.0"

__all__ = [
    # parameter space
    "ParamSpace",
    "SpaceMismatchError",
    # operators
    "LinearOperator",
    "IdentityOperator",
    "DiagonalOperator",
    "DenseOperator",
    "BlockDiagonalOperator",
    "GGNOperator",
    "KroneckerOperator",
    "as_operator",
    # curvature statistics
    "diagonal_fisher",
    "DataOrderError",
    "save_fisher",
    "load_fisher",
    "input_grams",
    "LayerGrams",
    "save_grams",
    "load_grams",
    "kfac_factors",
    "KFACFactors",
    # solver
    "cg",
    "solve_cg",
    "cg_shifts",
    "ShiftedCGResults",
    "CGResult",
    "NystromPreconditioner",
    "KroneckerPreconditioner",
    # merging
    "merge",
    "MergeResult",
    "MergeReport",
    "MergeCosts",
    "ConvergenceWarning",
    "ConvergenceError",
    "DampingWarning",
    "OneClassWarning",
    "load_merged",
    "parameters_of",
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
    "adamerging",
    "weight_ensembling",
    "output_ensemble",
    "get_method",
    "list_methods",
    "PreparedMerge",
    "sweep",
]
