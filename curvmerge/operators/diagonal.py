"""Diagonal and identity operators: the curvature of naive and Fisher-weighted averaging.

Both are closed under ``+`` and scalar ``*`` (the sum of diagonals is a diagonal, the
identity is a diagonal) and have an analytic :meth:`~DiagonalOperator.inverse`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from curvmerge.operators.base import LinearOperator, is_scalar
from curvmerge.space import ParamSpace

__all__ = ["DiagonalOperator", "IdentityOperator"]


def _first_bad_entry(space: ParamSpace, mask: Tensor) -> str:
    """Name and index of the first flagged entry of a flat mask, for error messages."""
    idx = int(mask.nonzero()[0, 0])
    for name, sl in space.slices().items():
        if sl.start <= idx < sl.stop:
            return f"parameter {name!r}, entry {idx - sl.start}"
    return f"entry {idx}"


class DiagonalOperator(LinearOperator):
    """:math:`D = \\operatorname{diag}(d)`.

    Args:
        space: The parameter space.
        diag: The diagonal, as a flat tensor ``[P]`` or a parameter dict.

    Example:
        >>> space = ParamSpace(("w",), ((3,),))
        >>> D = DiagonalOperator(space, torch.tensor([1.0, 2.0, 4.0]))
        >>> (D + 2 * D) @ torch.ones(3)
        tensor([ 3.,  6., 12.])
        >>> D.inverse(damping=1.0).diagonal()
        tensor([0.5000, 0.3333, 0.2000])
    """

    SELF_ADJOINT = True

    def __init__(self, space: ParamSpace, diag: Tensor | Mapping[str, Tensor]):
        if isinstance(diag, Mapping):
            diag = space.flatten(diag)
        if not isinstance(diag, Tensor) or diag.ndim != 1 or diag.shape[0] != space.size:
            shape = tuple(diag.shape) if isinstance(diag, Tensor) else type(diag).__name__
            raise ValueError(f"diag must have shape [{space.size}], got {shape}")
        if not diag.is_floating_point():
            diag = diag.to(torch.get_default_dtype())
        super().__init__(space, diag.dtype, diag.device)
        self._diag = diag

    def _matmat(self, X: Tensor) -> Tensor:
        return self._diag.unsqueeze(1) * X

    def diagonal(self) -> Tensor:
        return self._diag

    def to(self, device=None, dtype=None) -> DiagonalOperator:
        """Copy on another device and/or dtype."""
        return DiagonalOperator(self.space, self._diag.to(device=device, dtype=dtype))

    def as_dict(self) -> dict[str, Tensor]:
        """The diagonal as a parameter dict."""
        return self.space.unflatten(self._diag)

    def inverse(self, damping: float = 0.0) -> DiagonalOperator:
        """:math:`(D + \\delta I)^{-1}`, refusing zero or negative entries of ``D + δI``."""
        d = self._diag + damping
        bad = ~(d > 0)
        if bool(bad.any()):
            raise ValueError(
                f"cannot invert a diagonal operator with damping={damping}: "
                f"{int(bad.sum())} of {d.numel()} entries of D + damping*I are zero, "
                f"negative or NaN (first at {_first_bad_entry(self.space, bad)}); "
                "increase the damping"
            )
        return DiagonalOperator(self.space, 1.0 / d)

    def __add__(self, other):
        if isinstance(other, DiagonalOperator):
            self._check_compatible(other)
            other_diag = other.diagonal().to(self.device, self.dtype)
            return DiagonalOperator(self.space, self._diag + other_diag)
        return super().__add__(other)

    def __mul__(self, c):
        if not is_scalar(c):
            return NotImplemented
        return DiagonalOperator(self.space, float(c) * self._diag)

    __rmul__ = __mul__


class IdentityOperator(DiagonalOperator):
    """:math:`c I`, stored as a scalar: costs no memory however large the space.

    Example:
        >>> space = ParamSpace(("w",), ((2,),))
        >>> (IdentityOperator(space) + IdentityOperator(space)).scale
        2.0
    """

    def __init__(
        self,
        space: ParamSpace,
        scale: float = 1.0,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
    ):
        LinearOperator.__init__(self, space, dtype or torch.get_default_dtype(), device)
        self.scale = float(scale)

    def _matmat(self, X: Tensor) -> Tensor:
        return self.scale * X

    def diagonal(self) -> Tensor:
        return torch.full((self.space.size,), self.scale, dtype=self.dtype, device=self.device)

    @property
    def _diag(self) -> Tensor:  # used by DiagonalOperator.__add__ of the other operand
        return self.diagonal()

    def to(self, device=None, dtype=None) -> IdentityOperator:
        return IdentityOperator(
            self.space, self.scale, dtype=dtype or self.dtype, device=device or self.device
        )

    def inverse(self, damping: float = 0.0) -> IdentityOperator:
        d = self.scale + damping
        if not d > 0:
            raise ValueError(
                f"cannot invert {self.scale} * I with damping={damping}: "
                "scale + damping must be positive"
            )
        return IdentityOperator(self.space, 1.0 / d, dtype=self.dtype, device=self.device)

    def __add__(self, other):
        if isinstance(other, IdentityOperator):
            self._check_compatible(other)
            return IdentityOperator(
                self.space, self.scale + other.scale, dtype=self.dtype, device=self.device
            )
        return super().__add__(other)

    def __mul__(self, c):
        if not is_scalar(c):
            return NotImplemented
        return IdentityOperator(
            self.space, float(c) * self.scale, dtype=self.dtype, device=self.device
        )

    __rmul__ = __mul__
