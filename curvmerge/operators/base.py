"""The operator protocol: torch-native linear operators over a :class:`ParamSpace`.

Conventions follow :class:`scipy.sparse.linalg.LinearOperator`: an operator has a
``shape == (P, P)``, a ``dtype``, and is applied with ``A @ x``. Subclasses implement two
hooks, ``_matmat`` (``[P, K] -> [P, K]``) and ``_adjoint``; a class that sets
``SELF_ADJOINT = True`` needs only ``_matmat``.

Operators form a vector space: ``A + B``, ``A - B``, ``c * A``, ``A / c``, and ``0 + A``
is ``A`` (so ``sum(operators)`` works); structured operators keep their type.

``A @ x`` accepts a flat vector ``[P]``, a matrix ``[P, K]`` or a parameter dict and
returns the same format. Inputs (every tensor of a dict) are moved to the operator's
device and dtype, and results come back in the operator's dtype.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from curvmerge.space import ParamSpace

__all__ = [
    "LinearOperator",
    "SumOperator",
    "ScaledOperator",
    "ProductOperator",
    "AdjointOperator",
    "DENSE_LIMIT",
    "probe_diagonal",
]

#: Largest space (P) that :meth:`LinearOperator.to_dense` materialises by default.
DENSE_LIMIT = 20_000

TORCH_TO_NUMPY = {
    torch.float64: np.float64,
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.complex64: np.complex64,
    torch.complex128: np.complex128,
}


def _scipy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype scipy sees for an operator of ``dtype``: half precisions (which
    numpy lacks or scipy's solvers refuse) are computed in torch and seen as float32."""
    if dtype in (torch.bfloat16, torch.float16):
        return np.dtype(np.float32)
    if dtype not in TORCH_TO_NUMPY:
        raise TypeError(f"to_scipy: no numpy dtype for an operator of dtype {dtype}")
    return np.dtype(TORCH_TO_NUMPY[dtype])


def rademacher(
    P: int, K: int, generator: torch.Generator, dtype=torch.float64, device="cpu"
) -> Tensor:
    """``[P, K]`` independent random signs, the probes of Hutchinson's estimates (drawn on
    the CPU generator, so results do not depend on the device)."""
    signs = torch.randint(0, 2, (P, K), generator=generator, dtype=torch.int8)
    return (2.0 * signs.to(torch.float64) - 1.0).to(device=device, dtype=dtype)


def is_scalar(x) -> bool:
    if isinstance(x, numbers.Number):
        return True
    return isinstance(x, Tensor) and x.ndim == 0


def _is_zero(x) -> bool:
    """The scalar 0 (``sum`` starts from it): the neutral element of operator addition."""
    return is_scalar(x) and bool(x == 0)


def probe_diagonal(A: LinearOperator, block: int = 256) -> Tensor:
    """The diagonal :math:`d_j = e_j^\\top A e_j` by products with blocks of ``block`` unit
    vectors (:math:`P` products in all), whatever ``A``'s structure."""
    P = A.shape[0]
    out = torch.empty(P, dtype=A.dtype, device=A.device)
    for start in range(0, P, block):
        stop = min(start + block, P)
        idx = torch.arange(start, stop, device=A.device)
        E = torch.zeros(P, stop - start, dtype=A.dtype, device=A.device)
        E[idx, idx - start] = 1.0
        out[start:stop] = (A @ E)[idx, idx - start]
    return out


class LinearOperator:
    """Base class of curvmerge's linear operators on a parameter space.

    Args:
        space: The parameter space the operator acts on (rows and columns).
        dtype: Floating dtype of the results.
        device: Device on which products are computed.
    """

    SELF_ADJOINT: bool = False

    def __init__(self, space: ParamSpace, dtype: torch.dtype, device: torch.device | str):
        if not isinstance(space, ParamSpace):
            raise TypeError(f"space must be a ParamSpace, got {type(space).__name__}")
        self.space = space
        self.dtype = dtype
        self.device = torch.device(device)

    # ------------------------------------------------------------------ protocol hooks
    def _matmat(self, X: Tensor) -> Tensor:
        """Multiply with a matrix ``X`` of shape ``[P, K]`` on ``self.device``/``self.dtype``."""
        raise NotImplementedError

    def _adjoint(self) -> LinearOperator:
        """Return the adjoint operator (needed unless ``SELF_ADJOINT``)."""
        return AdjointOperator(self)

    # ------------------------------------------------------------------ basic properties
    @property
    def shape(self) -> tuple[int, int]:
        """``(P, P)``."""
        P = self.space.size
        return (P, P)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, device={self.device})"
        )

    # ------------------------------------------------------------------ application
    def _prepare(self, X: Tensor) -> Tensor:
        if not isinstance(X, Tensor):
            raise TypeError(f"cannot multiply an operator with {type(X).__name__}")
        if X.ndim not in (1, 2) or X.shape[0] != self.shape[1]:
            raise ValueError(
                f"operator of shape {self.shape} cannot multiply a tensor of shape "
                f"{tuple(X.shape)}: expected [{self.shape[1]}] or [{self.shape[1]}, K]"
            )
        return X.to(device=self.device, dtype=self.dtype)

    def matmat(self, X: Tensor) -> Tensor:
        """``A @ X`` for ``X`` of shape ``[P, K]``."""
        X = self._prepare(X)
        if X.ndim != 2:
            raise ValueError(f"matmat expects a matrix [P, K], got shape {tuple(X.shape)}")
        return self._matmat(X)

    def matvec(self, x: Tensor) -> Tensor:
        """``A @ x`` for ``x`` of shape ``[P]``."""
        x = self._prepare(x)
        if x.ndim != 1:
            raise ValueError(f"matvec expects a vector [P], got shape {tuple(x.shape)}")
        return self._matmat(x.unsqueeze(1)).squeeze(1)

    def _flatten(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """A parameter dict as a flat vector on the operator's device and dtype. Names and
        shapes are checked; dtypes are not (inputs are cast, as tensors are)."""
        ParamSpace(self.space.names, self.space.shapes).check(tensors)
        parts = [tensors[n].reshape(-1) for n in self.space.names]
        if not parts:
            return torch.zeros(0, device=self.device, dtype=self.dtype)
        return torch.cat([t.to(device=self.device, dtype=self.dtype) for t in parts])

    def _apply(self, X: Tensor) -> Tensor:
        """``A @ X`` for ``[P]`` or ``[P, K]``: the one path every input takes."""
        X = self._prepare(X)
        if X.ndim == 1:
            return self._matmat(X.unsqueeze(1)).squeeze(1)
        return self._matmat(X)

    def __matmul__(self, other):
        if isinstance(other, LinearOperator):
            return ProductOperator(self, other)
        if isinstance(other, Mapping):
            y = self._apply(self._flatten(other))
            return {k: v.clone() for k, v in self.space.unflatten(y).items()}
        if isinstance(other, np.ndarray):
            raise TypeError(
                "curvmerge operators take torch tensors; use A.to_scipy() for numpy arrays"
            )
        return self._apply(other)

    def __call__(self, x):
        return self @ x

    # ------------------------------------------------------------------ algebra
    def _check_compatible(self, other: LinearOperator) -> None:
        self.space.check_same(other.space, what="operand of the operator sum")

    def __add__(self, other):
        if _is_zero(other):
            return self
        if not isinstance(other, LinearOperator):
            return NotImplemented
        self._check_compatible(other)
        return SumOperator([self, other])

    def __radd__(self, other):
        # ``0 + A`` (``sum`` starts from 0) and operators whose ``__add__`` declined:
        # addition commutes, so ``self.__add__`` keeps the structured types' closure.
        return self.__add__(other)

    def __sub__(self, other):
        if _is_zero(other):
            return self
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return self + (-1.0) * other

    def __rsub__(self, other):
        return (-self).__add__(other)

    def __neg__(self):
        return (-1.0) * self

    def __mul__(self, c):
        if not is_scalar(c):
            return NotImplemented
        return ScaledOperator(self, float(c))

    __rmul__ = __mul__

    def __truediv__(self, c):
        if not is_scalar(c):
            return NotImplemented
        c = float(c)
        if c == 0.0:
            raise ZeroDivisionError("division of an operator by zero")
        return self * (1.0 / c)

    def adjoint(self) -> LinearOperator:
        """The adjoint :math:`A^H` (the transpose for real operators)."""
        return self if self.SELF_ADJOINT else self._adjoint()

    @property
    def H(self) -> LinearOperator:  # noqa: N802 (scipy's name)
        return self.adjoint()

    @property
    def T(self) -> LinearOperator:  # noqa: N802 (scipy's name)
        return self.adjoint()

    # ------------------------------------------------------------------ conversions
    def to_dense(self, max_size: int = DENSE_LIMIT) -> Tensor:
        """Materialise the ``[P, P]`` matrix by multiplying with the identity.

        Raises:
            MemoryError: if ``P > max_size`` (pass a larger ``max_size`` to force it).
        """
        P = self.shape[0]
        if P > max_size:
            raise MemoryError(
                f"to_dense() would materialise a {P} x {P} matrix "
                f"({P * P * torch.finfo(self.dtype).bits // 8 / 2**30:.1f} GiB); "
                f"P exceeds max_size={max_size}. Use products, diagonal() or to_scipy()"
            )
        eye = torch.eye(P, dtype=self.dtype, device=self.device)
        return self @ eye

    def diagonal(self) -> Tensor:
        """The diagonal ``[P]``. The default probes unit vectors in blocks, which costs P
        products; structured operators override it, and it refuses spaces larger than
        :data:`DENSE_LIMIT`."""
        P = self.shape[0]
        if P > DENSE_LIMIT:
            raise NotImplementedError(
                f"{type(self).__name__} has no cheap diagonal and P={P} is too large to "
                "probe with unit vectors; estimate it instead (curvmerge.verify)"
            )
        return probe_diagonal(self)

    def to_scipy(self, dtype: np.dtype | type | None = None):
        """A :class:`scipy.sparse.linalg.LinearOperator` view (numpy in, numpy out).

        Products are computed in torch in the operator's dtype; inputs are cast to it and
        results to ``dtype``.

        Args:
            dtype: The numpy dtype scipy sees; defaults to the operator's dtype, or float32
                for bfloat16 and float16 operators.
        """
        from scipy.sparse.linalg import LinearOperator as ScipyLinearOperator

        np_dtype = np.dtype(dtype) if dtype is not None else _scipy_dtype(self.dtype)
        out_dtype = torch.from_numpy(np.zeros(0, dtype=np_dtype)).dtype

        def apply(op, x):
            X = torch.as_tensor(np.ascontiguousarray(x)).to(self.device, self.dtype)
            return (op @ X).detach().to(device="cpu", dtype=out_dtype).numpy()

        adj = self.adjoint()
        return ScipyLinearOperator(
            shape=self.shape,
            dtype=np_dtype,
            matvec=lambda x: apply(self, x.reshape(-1)),
            rmatvec=lambda x: apply(adj, x.reshape(-1)),
            matmat=lambda X: apply(self, X),
            rmatmat=lambda X: apply(adj, X),
        )


class SumOperator(LinearOperator):
    """Lazy sum :math:`\\sum_i A_i` of operators on one space."""

    def __init__(self, operators: Sequence[LinearOperator]):
        flat: list[LinearOperator] = []
        for op in operators:
            flat.extend(op.operators if isinstance(op, SumOperator) else [op])
        if not flat:
            raise ValueError("SumOperator needs at least one operator")
        first = flat[0]
        for op in flat[1:]:
            first.space.check_same(op.space, what="operand of the operator sum")
        super().__init__(first.space, first.dtype, first.device)
        self.operators = flat
        self.SELF_ADJOINT = all(op.SELF_ADJOINT for op in flat)

    def _matmat(self, X: Tensor) -> Tensor:
        out = self.operators[0]._matmat(X.to(self.operators[0].device, self.operators[0].dtype))
        for op in self.operators[1:]:
            out = out + op._matmat(X.to(op.device, op.dtype)).to(out.device, out.dtype)
        return out

    def _adjoint(self) -> LinearOperator:
        return SumOperator([op.adjoint() for op in self.operators])

    def diagonal(self) -> Tensor:
        out = self.operators[0].diagonal()
        for op in self.operators[1:]:
            out = out + op.diagonal().to(out.device, out.dtype)
        return out


class ScaledOperator(LinearOperator):
    """Lazy scaling :math:`c A`."""

    def __init__(self, operator: LinearOperator, scale: float):
        super().__init__(operator.space, operator.dtype, operator.device)
        if isinstance(operator, ScaledOperator):
            operator, scale = operator.operator, scale * operator.scale
        self.operator = operator
        self.scale = float(scale)
        self.SELF_ADJOINT = operator.SELF_ADJOINT

    def _matmat(self, X: Tensor) -> Tensor:
        return self.scale * self.operator._matmat(X)

    def _adjoint(self) -> LinearOperator:
        return ScaledOperator(self.operator.adjoint(), self.scale)

    def diagonal(self) -> Tensor:
        return self.scale * self.operator.diagonal()


class ProductOperator(LinearOperator):
    """Lazy composition :math:`A B` (``A @ B``)."""

    def __init__(self, A: LinearOperator, B: LinearOperator):
        A.space.check_same(B.space, what="operand of the operator product")
        super().__init__(A.space, A.dtype, A.device)
        self.A, self.B = A, B

    def _matmat(self, X: Tensor) -> Tensor:
        Y = self.B._matmat(X.to(self.B.device, self.B.dtype))
        return self.A._matmat(Y.to(self.A.device, self.A.dtype))

    def _adjoint(self) -> LinearOperator:
        return ProductOperator(self.B.adjoint(), self.A.adjoint())


class AdjointOperator(LinearOperator):
    """Adjoint of an operator whose ``_adjoint`` is not specialised: needs ``_rmatmat``."""

    def __init__(self, operator: LinearOperator):
        super().__init__(operator.space, operator.dtype, operator.device)
        if not hasattr(operator, "_rmatmat"):
            raise NotImplementedError(
                f"{type(operator).__name__} implements neither _adjoint nor _rmatmat"
            )
        self.operator = operator

    def _matmat(self, X: Tensor) -> Tensor:
        return self.operator._rmatmat(X)

    def _adjoint(self) -> LinearOperator:
        return self.operator
