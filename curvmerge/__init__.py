r"""curvmerge: merge neural networks with curvature.

.. math::

    \theta^* = (\lambda I + \sum_t w_t F_t)^{-1} (\sum_t w_t F_t \theta_t + \lambda \theta_0)
"""

from curvmerge.merge import (
    ConvergenceError,
    ConvergenceWarning,
    MergeReport,
    MergeResult,
    load_merged,
    merge,
    parameters_of,
)
from curvmerge.operators import (
    BlockDiagonalOperator,
    DenseOperator,
    DiagonalOperator,
    IdentityOperator,
    LinearOperator,
)

# solver
from curvmerge.solve import CGResult, cg, solve_cg
from curvmerge.space import ParamSpace, SpaceMismatchError

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
    # solver
    "cg",
    "solve_cg",
    "CGResult",
    # merging
    "merge",
    "MergeResult",
    "MergeReport",
    "ConvergenceWarning",
    "ConvergenceError",
    "load_merged",
    "parameters_of",
]
