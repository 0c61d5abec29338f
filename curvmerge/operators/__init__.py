"""Torch-native linear operators over a parameter space (see :mod:`curvmerge.operators.base`)."""

from curvmerge.operators.adapters import CurvlinopsOperator, ScipyOperator, as_operator
from curvmerge.operators.base import (
    AdjointOperator,
    LinearOperator,
    ProductOperator,
    ScaledOperator,
    SumOperator,
)
from curvmerge.operators.block import BlockDiagonalOperator
from curvmerge.operators.dense import DenseOperator
from curvmerge.operators.diagonal import DiagonalOperator, IdentityOperator
from curvmerge.operators.ggn import GGN_KINDS, GGNOperator
from curvmerge.operators.kronecker import KroneckerBlock, KroneckerOperator

__all__ = [
    "LinearOperator",
    "SumOperator",
    "ScaledOperator",
    "ProductOperator",
    "AdjointOperator",
    "DenseOperator",
    "DiagonalOperator",
    "IdentityOperator",
    "BlockDiagonalOperator",
    "KroneckerOperator",
    "KroneckerBlock",
    "GGNOperator",
    "GGN_KINDS",
    "as_operator",
    "CurvlinopsOperator",
    "ScipyOperator",
]
