"""Test helpers: the one dense-reference check every operator goes through."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from curvmerge import LinearOperator, ParamSpace


def random_space(sizes=((3, 2), (4,), (2, 1, 2))) -> ParamSpace:
    """A small space with tensors of several ranks."""
    return ParamSpace(tuple(f"p{i}" for i in range(len(sizes))), sizes)


def random_spd(P: int, seed: int = 0, cond_shift: float = 1.0) -> torch.Tensor:
    """A well-conditioned symmetric positive definite float64 matrix."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(P, P, generator=g, dtype=torch.float64)
    return A @ A.T / P + cond_shift * torch.eye(P, dtype=torch.float64)


def assert_matches_dense(op: LinearOperator, dense: torch.Tensor, rtol: float = 1e-10) -> None:
    """Check ``op`` against a float64 dense matrix for vector, matrix, dict and scipy
    inputs, its adjoint, ``to_dense()`` and ``diagonal()``."""
    dense = dense.to(torch.float64)
    P = dense.shape[0]
    assert op.shape == (P, P)
    g = torch.Generator().manual_seed(123)
    x = torch.randn(P, generator=g, dtype=torch.float64)
    X = torch.randn(P, 3, generator=g, dtype=torch.float64)

    def close(a, b):
        torch.testing.assert_close(a.to(torch.float64), b, rtol=rtol, atol=rtol * b.abs().max())

    close(op @ x, dense @ x)
    close(op @ X, dense @ X)
    out = op @ op.space.unflatten(x)
    assert isinstance(out, dict) and list(out) == list(op.space.names)
    close(op.space.flatten(out), dense @ x)
    x32 = x.float()  # a dict in another dtype goes the way of a tensor in that dtype
    out32 = op @ op.space.unflatten(x32)
    torch.testing.assert_close(op.space.flatten(out32), op @ x32, rtol=0, atol=0)
    close(op.adjoint() @ X, dense.T @ X)
    close(op.to_dense(), dense)
    close(op.diagonal(), dense.diagonal())
    sp = op.to_scipy()
    assert sp.dtype == np.dtype(np.float64) or op.dtype != torch.float64
    np.testing.assert_allclose(sp @ x.numpy(), (dense @ x).numpy(), rtol=rtol * 10, atol=1e-12)
    np.testing.assert_allclose(
        sp.matmat(X.numpy()), (dense @ X).numpy(), rtol=rtol * 10, atol=1e-12
    )
    np.testing.assert_allclose(
        sp.rmatvec(x.numpy()), (dense.T @ x).numpy(), rtol=rtol * 10, atol=1e-12
    )


class Conv1D(nn.Module):
    """Hugging Face GPT-2's ``Conv1D`` (recognised by class name): :math:`y = x W + b` with
    ``W`` ``[in, out]``, random float64 parameters from torch's global generator."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf, dtype=torch.float64))
        self.bias = nn.Parameter(torch.randn(nf, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias
