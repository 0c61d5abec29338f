"""Foreign linear operators as curvmerge operators.

:func:`as_operator` wraps

- curvlinops operators (``GGNLinearOperator``, ``KFACLinearOperator``,
  ``EKFACLinearOperator``, ``EFLinearOperator``, ``FisherMCLinearOperator``,
  ``HessianLinearOperator``, their sums and inverses, ...; Dangel et al., "curvlinops:
  Linear operators for curvature matrices in PyTorch"), through their public ``@``
  interface on ``[P, K]`` tensors;
- :class:`scipy.sparse.linalg.LinearOperator` (and anything with ``shape`` and ``matmat``,
  dense numpy arrays included), through numpy on the CPU;

so they can be added to curvmerge operators and passed to :func:`curvmerge.merge`. Neither
library is imported here: objects are recognised by their interface.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor, nn

from curvmerge.operators.base import TORCH_TO_NUMPY, LinearOperator
from curvmerge.operators.dense import DenseOperator
from curvmerge.space import ParamSpace

__all__ = ["as_operator", "CurvlinopsOperator", "ScipyOperator"]

_NUMPY_TO_TORCH = {np.dtype(v): k for k, v in TORCH_TO_NUMPY.items()}


def _resolve_space(space, P: int) -> ParamSpace:
    if space is None:
        return ParamSpace(("x",), ((P,),))
    if isinstance(space, (nn.Module, Mapping)):
        space = ParamSpace.of(space)
    if not isinstance(space, ParamSpace):
        raise TypeError(
            f"space must be a ParamSpace, a module or a parameter dict, got {type(space).__name__}"
        )
    if space.size != P:
        raise ValueError(
            f"the operator has shape ({P}, {P}) but the space has P={space.size} "
            f"({space!r}); pass the space of exactly the parameters the operator acts on"
        )
    return space


def _is_curvlinops(op) -> bool:
    return any(c.__module__.split(".")[0] == "curvlinops" for c in type(op).__mro__)


class CurvlinopsOperator(LinearOperator):
    """A curvlinops ``PyTorchLinearOperator`` on a curvmerge :class:`ParamSpace`.

    Products go through the operator's public ``op @ X`` with ``X`` of shape ``[P, K]``,
    on its device and dtype. The space's order must be the order of the ``params`` the
    curvlinops operator was built with (``ParamSpace.from_module(model, names)`` keeps
    the model's order, as does passing ``[p for n, p in model.named_parameters() if ...]``).

    Args:
        op: The curvlinops operator.
        space: Its parameter space.
    """

    def __init__(self, op, space: ParamSpace):
        rows, cols = op.shape
        if rows != cols:
            raise ValueError(f"curvature operators are square; got shape {op.shape}")
        space = _resolve_space(space, cols)
        super().__init__(space, op.dtype, op.device)
        self.op = op
        self.SELF_ADJOINT = bool(getattr(op, "SELF_ADJOINT", False))

    def _matmat(self, X: Tensor) -> Tensor:
        return self.op @ X

    def _adjoint(self) -> LinearOperator:
        return CurvlinopsOperator(self.op.adjoint(), self.space)


class ScipyOperator(LinearOperator):
    """A :class:`scipy.sparse.linalg.LinearOperator` (numpy, CPU) on a :class:`ParamSpace`.

    Args:
        op: Anything with ``shape`` and ``matmat`` (or ``@``) on numpy arrays.
        space: Its parameter space.
        self_adjoint: Declare the operator symmetric (skips ``rmatmat``).
    """

    def __init__(self, op, space: ParamSpace, *, self_adjoint: bool = False):
        rows, cols = op.shape
        if rows != cols:
            raise ValueError(f"curvature operators are square; got shape {op.shape}")
        space = _resolve_space(space, cols)
        np_dtype = np.dtype(getattr(op, "dtype", None) or np.float64)
        dtype = _NUMPY_TO_TORCH.get(np_dtype)
        if dtype is None:
            raise TypeError(f"unsupported dtype {np_dtype} of the scipy operator")
        super().__init__(space, dtype, "cpu")
        self.op = op
        self.SELF_ADJOINT = bool(self_adjoint)

    def _matmat(self, X: Tensor) -> Tensor:
        x = X.detach().cpu().numpy()
        y = self.op.matmat(x) if hasattr(self.op, "matmat") else self.op @ x
        return torch.as_tensor(np.asarray(y), dtype=self.dtype).reshape(X.shape)

    def _adjoint(self) -> LinearOperator:
        adj = self.op.H if hasattr(self.op, "H") else self.op.conj().T
        return ScipyOperator(adj, self.space)


def as_operator(op, space: ParamSpace | nn.Module | Mapping | None = None) -> LinearOperator:
    """Wrap a foreign operator as a curvmerge :class:`~curvmerge.LinearOperator`.

    Args:
        op: A curvlinops operator, a scipy ``LinearOperator`` or numpy array, a square torch
            tensor, or a curvmerge operator (returned as is).
        space: The parameter space the operator acts on (a :class:`ParamSpace`, a module,
            or a parameter dict), in the order of the operator's parameters. Without one,
            the space is a single flat vector ``"x"`` of size P, which is enough for
            algebra and solves but cannot be summed with operators on a model's space.

    Returns:
        A :class:`CurvlinopsOperator`, :class:`ScipyOperator`,
        :class:`~curvmerge.DenseOperator`, or ``op`` itself.

    Example:
        >>> import scipy.sparse.linalg as sla
        >>> A = as_operator(sla.aslinearoperator(np.diag([1.0, 2.0])))
        >>> A @ torch.ones(2, dtype=torch.float64)
        tensor([1., 2.], dtype=torch.float64)
    """
    if isinstance(op, LinearOperator):
        if space is not None:
            op.space.check_same(_resolve_space(space, op.shape[0]), what="as_operator space")
        return op
    if isinstance(op, Tensor):
        if op.ndim != 2 or op.shape[0] != op.shape[1]:
            raise ValueError(f"a dense operator must be square, got shape {tuple(op.shape)}")
        return DenseOperator(_resolve_space(space, op.shape[0]), op)
    if _is_curvlinops(op):
        return CurvlinopsOperator(op, _resolve_space(space, op.shape[1]))
    if isinstance(op, np.ndarray) or (
        hasattr(op, "shape") and (hasattr(op, "matmat") or hasattr(op, "__matmul__"))
    ):
        if isinstance(op, np.ndarray) and (op.ndim != 2 or op.shape[0] != op.shape[1]):
            raise ValueError(f"a dense operator must be square, got shape {op.shape}")
        return ScipyOperator(op, _resolve_space(space, op.shape[1]))
    raise TypeError(
        f"cannot wrap a {type(op).__name__} as a curvmerge operator; expected a curvlinops "
        "operator, a scipy LinearOperator, a numpy array or a torch tensor"
    )
