"""An operator that wraps an explicit ``[P, P]`` matrix (small spaces, tests, references)."""

from __future__ import annotations

from torch import Tensor

from curvmerge.operators.base import LinearOperator
from curvmerge.space import ParamSpace

__all__ = ["DenseOperator"]


class DenseOperator(LinearOperator):
    """:math:`A` given as a dense matrix.

    Args:
        space: The parameter space (``P = space.size``).
        matrix: Tensor of shape ``[P, P]``.
        self_adjoint: Declare the matrix symmetric, so ``adjoint()`` returns ``self``.
    """

    def __init__(self, space: ParamSpace, matrix: Tensor, *, self_adjoint: bool = False):
        P = space.size
        if matrix.shape != (P, P):
            raise ValueError(f"matrix must have shape ({P}, {P}), got {tuple(matrix.shape)}")
        super().__init__(space, matrix.dtype, matrix.device)
        self.matrix = matrix
        self.SELF_ADJOINT = self_adjoint

    def _matmat(self, X: Tensor) -> Tensor:
        return self.matrix @ X

    def _adjoint(self) -> LinearOperator:
        return DenseOperator(self.space, self.matrix.mH, self_adjoint=self.SELF_ADJOINT)

    def diagonal(self) -> Tensor:
        return self.matrix.diagonal()
