"""Block-diagonal operators: one operator per group of parameters (per layer, say).

.. math::

    A = \\operatorname{blockdiag}(A_1, \\dots, A_B),

where block :math:`A_b` acts on a sub-space of named parameters. Parameters that no block
covers get the ``fill`` operator (zero by default). This is the shape of per-layer
curvatures (K-FAC blocks, per-layer input Gram matrices as in RegMean).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from curvmerge.operators.base import LinearOperator
from curvmerge.space import ParamSpace, SpaceMismatchError

__all__ = ["BlockDiagonalOperator"]


class BlockDiagonalOperator(LinearOperator):
    """Operators on disjoint groups of parameters, assembled into one operator.

    Args:
        space: The full parameter space.
        blocks: Operators whose spaces are disjoint sub-spaces of ``space`` (same names
            and shapes; their order inside each block is the block's own).
        fill: Scalar applied to parameters no block covers (default 0).

    Example:
        >>> space = ParamSpace(("a", "b"), ((2,), (1,)))
        >>> A = DiagonalOperator(space.select(["a"]), torch.tensor([2.0, 3.0]))
        >>> B = BlockDiagonalOperator(space, [A], fill=1.0)
        >>> B @ torch.ones(3)
        tensor([2., 3., 1.])
    """

    def __init__(self, space: ParamSpace, blocks: Sequence[LinearOperator], fill: float = 0.0):
        if not blocks:
            raise ValueError("BlockDiagonalOperator needs at least one block")
        super().__init__(space, blocks[0].dtype, blocks[0].device)
        slices = space.slices()
        seen: dict[str, int] = {}
        self._index: list[Tensor] = []
        for i, block in enumerate(blocks):
            for name, shape in block.space:
                if name not in slices:
                    raise SpaceMismatchError(f"block {i}: parameter {name!r} is not in the space")
                if space.shapes[space.names.index(name)] != shape:
                    raise SpaceMismatchError(
                        f"block {i}: parameter {name!r} has shape {tuple(shape)}, "
                        f"expected {tuple(space.shapes[space.names.index(name)])}"
                    )
                if name in seen:
                    raise SpaceMismatchError(
                        f"parameter {name!r} is in block {seen[name]} and block {i}"
                    )
                seen[name] = i
            idx = [torch.arange(slices[n].start, slices[n].stop) for n in block.space.names]
            self._index.append(torch.cat(idx).to(self.device))
        self.blocks = list(blocks)
        self.fill = float(fill)
        covered = torch.zeros(space.size, dtype=torch.bool)
        for idx in self._index:
            covered[idx.cpu()] = True
        self._uncovered = (~covered).nonzero().squeeze(1).to(self.device)
        self.SELF_ADJOINT = all(b.SELF_ADJOINT for b in blocks)

    def _matmat(self, X: Tensor) -> Tensor:
        out = torch.zeros_like(X)
        for block, idx in zip(self.blocks, self._index, strict=True):
            Y = block._matmat(X[idx].to(block.device, block.dtype))
            out[idx] = Y.to(out.device, out.dtype)
        if self.fill != 0.0 and self._uncovered.numel():
            out[self._uncovered] = self.fill * X[self._uncovered]
        return out

    def _adjoint(self) -> LinearOperator:
        return BlockDiagonalOperator(self.space, [b.adjoint() for b in self.blocks], self.fill)

    def diagonal(self) -> Tensor:
        out = torch.full((self.space.size,), self.fill, dtype=self.dtype, device=self.device)
        for block, idx in zip(self.blocks, self._index, strict=True):
            out[idx] = block.diagonal().to(out.device, out.dtype)
        return out
