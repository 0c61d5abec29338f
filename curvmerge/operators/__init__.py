"""Torch-native linear operators over a parameter space (see :mod:`curvmerge.operators.base`)."""

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
]
