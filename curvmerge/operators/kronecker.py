"""Kronecker-factored operators: one :math:`A \\otimes B` block per layer (K-FAC, RegMean).

A block covers the weight :math:`W` (``[d_out, d_in]``; a convolution's weight read as
``weight.reshape(d_out, -1)``, a Hugging Face ``Conv1D`` weight ``[d_in, d_out]`` transposed)
and optionally the bias :math:`b` of one layer. On their joint matrix
:math:`M = [W\\; b]` (``[d_out, d_in + 1]``, or :math:`W` alone) the block acts as

.. math::

    M \\mapsto B\\, M\\, A,

i.e. as :math:`B \\otimes A` on the row-major :math:`\\operatorname{vec}(M)`, with
:math:`A` ``[d_in (+1), d_in (+1)]`` over inputs (the bias entry last) and :math:`B`
``[d_out, d_out]`` over outputs, both symmetric (the operator is self-adjoint; K-FAC
factors and Gram matrices are, and a non-symmetric factor would act as its transpose in
:meth:`adjoint`). ``B=None`` is the identity at no cost: then each row of
:math:`M` is multiplied by :math:`A`, the shape of RegMean's per-layer problem (Jin et al.,
ICLR 2023; Tam et al., "Merging by matching models in task parameter subspaces", TMLR
2024). With the K-FAC factors of :mod:`curvmerge.statistics.kfac` it is K-FAC's Fisher
(Martens & Grosse, ICML 2015; Grosse & Martens, ICML 2016).

Parameters of the space that no block covers act as **zero**: the merge equation's
damping and prior decide them (with the default prior, the weighted average).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from curvmerge.operators.base import LinearOperator
from curvmerge.space import ParamSpace, SpaceMismatchError
from curvmerge.statistics.layers import weight_dims

__all__ = ["KroneckerOperator", "KroneckerBlock"]


@dataclass(frozen=True)
class KroneckerBlock:
    """One layer's block: factors and the parameters it covers.

    Attributes:
        A: Input factor ``[d_in, d_in]``, or ``[d_in + 1, d_in + 1]`` with a bias.
        B: Output factor ``[d_out, d_out]``, or ``None`` for the identity.
        weight: Parameter name of the weight.
        bias: Parameter name of the bias, or ``None``.
        transposed: The weight is stored ``[d_in, d_out]`` (Hugging Face ``Conv1D``).
    """

    A: Tensor
    B: Tensor | None
    weight: str
    bias: str | None = None
    transposed: bool = False


def _as_block(layer: str, value) -> KroneckerBlock:
    if isinstance(value, KroneckerBlock):
        return value
    if isinstance(value, (tuple, list)) and len(value) in (4, 5):
        return KroneckerBlock(*value)
    raise TypeError(
        f"block {layer!r} must be a KroneckerBlock or a tuple (A, B, weight name, bias name"
        f"[, transposed]), got {type(value).__name__}"
    )


class KroneckerOperator(LinearOperator):
    """Block-diagonal operator with one Kronecker-factored block per layer.

    Args:
        space: The parameter space.
        blocks: Layer name -> :class:`KroneckerBlock` or a tuple ``(A, B, weight, bias)``
            (optionally a fifth entry ``transposed``). Blocks cover disjoint parameters.

    Raises:
        SpaceMismatchError: A block names a parameter not in the space, or covers one twice.
        ValueError: Factor sizes that do not fit the weight's shape, or non-square factors.

    Example:
        >>> space = ParamSpace(("w", "b"), ((2, 1), (2,)))
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 1.0]])
        >>> K = KroneckerOperator(space, {"layer": (A, None, "w", "b")})
        >>> K @ torch.tensor([1.0, 0.0, 0.0, 0.0])  # M = [[1, 0], [0, 0]] -> M A
        tensor([2., 0., 1., 0.])
        >>> K.diagonal()
        tensor([2., 2., 1., 1.])
    """

    SELF_ADJOINT = True

    def __init__(self, space: ParamSpace, blocks: Mapping[str, KroneckerBlock | tuple]):
        if not blocks:
            raise ValueError("KroneckerOperator needs at least one block")
        blocks = {k: _as_block(k, v) for k, v in blocks.items()}
        first = next(iter(blocks.values())).A
        dtype = first.dtype if first.is_floating_point() else torch.get_default_dtype()
        for blk in blocks.values():
            for f in (blk.A, blk.B):
                if f is not None and f.is_floating_point():
                    dtype = torch.promote_types(dtype, f.dtype)
        super().__init__(space, dtype, first.device)
        slices = space.slices()
        shapes = dict(zip(space.names, space.shapes, strict=True))
        owner: dict[str, str] = {}
        self._blocks: list[tuple] = []
        self._names: dict[str, tuple] = {}
        for layer, blk in blocks.items():
            for name in (blk.weight, blk.bias):
                if name is None:
                    continue
                if name not in slices:
                    raise SpaceMismatchError(
                        f"block {layer!r}: parameter {name!r} is not in the space"
                    )
                if name in owner:
                    raise SpaceMismatchError(
                        f"parameter {name!r} is in block {owner[name]!r} and block {layer!r}"
                    )
                owner[name] = layer
            wshape = tuple(shapes[blk.weight])
            dims = weight_dims(wshape, blk.transposed)
            if dims is None:
                raise ValueError(
                    f"block {layer!r}: weight {blk.weight!r} of shape {wshape} is not a matrix "
                    "(or a convolution kernel)"
                )
            d_out, d_in = dims
            if blk.bias is not None and tuple(shapes[blk.bias]) != (d_out,):
                raise ValueError(
                    f"block {layer!r}: bias {blk.bias!r} has shape {tuple(shapes[blk.bias])}, "
                    f"expected ({d_out},)"
                )
            size = d_in + (blk.bias is not None)
            A = self._factor(layer, "A", blk.A, size)
            B = None if blk.B is None else self._factor(layer, "B", blk.B, d_out)
            b_sl = slices[blk.bias] if blk.bias is not None else None
            self._names[layer] = (blk.weight, blk.bias, blk.transposed)
            self._blocks.append(
                (layer, A, B, slices[blk.weight], b_sl, d_out, d_in, blk.transposed)
            )
        self.layers = list(blocks)

    def _factor(self, layer: str, what: str, F: Tensor, size: int) -> Tensor:
        if not isinstance(F, Tensor) or F.shape != (size, size):
            shape = tuple(F.shape) if isinstance(F, Tensor) else type(F).__name__
            raise ValueError(
                f"block {layer!r}: factor {what} must have shape ({size}, {size}) for the "
                f"layer's parameters, got {shape}"
            )
        return F.to(device=self.device, dtype=self.dtype)

    @classmethod
    def _from_layers(cls, space, layers, factor_a, factor_b) -> KroneckerOperator:
        blocks = {}
        for k, info in layers.items():
            if info.weight not in space:
                continue  # a layer outside the merged space (a task head)
            A, bias = factor_a[k], info.bias
            if bias is not None and bias not in space:
                A, bias = A[:-1, :-1], None  # the weight's own block
            B = None if factor_b is None else factor_b[k]
            blocks[k] = KroneckerBlock(A, B, info.weight, bias, info.kind == "hf_conv1d")
        if not blocks:
            raise ValueError("no layer of the statistics has its weight in the space")
        return cls(space, blocks)

    @classmethod
    def from_grams(cls, space: ParamSpace, grams) -> KroneckerOperator:
        """RegMean's curvature: :math:`A` = a layer's input Gram, :math:`B = I`.

        Layers whose weight is not in ``space`` are left out; a bias not in ``space`` is
        dropped with its row and column of :math:`A`.

        Args:
            space: The parameter space.
            grams: :class:`~curvmerge.statistics.gram.LayerGrams`.
        """
        return cls._from_layers(space, grams.layers, grams.grams, None)

    @classmethod
    def from_kfac(cls, space: ParamSpace, factors) -> KroneckerOperator:
        """K-FAC's Fisher from :class:`~curvmerge.statistics.kfac.KFACFactors` (layers and
        biases outside ``space`` are left out as in :meth:`from_grams`)."""
        return cls._from_layers(space, factors.layers, factors.A, factors.B)

    # ------------------------------------------------------------------ layout
    def _joint(self, X: Tensor, w_sl, b_sl, d_out, d_in, transposed) -> Tensor:
        """``[d_out, d_in (+1), K]`` joint matrices of the columns of ``X``."""
        K = X.shape[1]
        W = X[w_sl]
        W = W.view(d_in, d_out, K).transpose(0, 1) if transposed else W.view(d_out, d_in, K)
        if b_sl is None:
            return W
        return torch.cat([W, X[b_sl].view(d_out, 1, K)], dim=1)

    def _scatter(self, out: Tensor, M: Tensor, w_sl, b_sl, d_out, d_in, transposed) -> None:
        K = M.shape[-1]
        W = M[:, :d_in]
        out[w_sl] = (W.transpose(0, 1) if transposed else W).reshape(-1, K)
        if b_sl is not None:
            out[b_sl] = M[:, d_in]

    def _matmat(self, X: Tensor) -> Tensor:
        out = torch.zeros_like(X)
        for _, A, B, w_sl, b_sl, d_out, d_in, tr in self._blocks:
            M = self._joint(X, w_sl, b_sl, d_out, d_in, tr)
            M = torch.einsum("okv,kl->olv", M, A)
            if B is not None:
                M = torch.einsum("io,olv->ilv", B, M)
            self._scatter(out, M, w_sl, b_sl, d_out, d_in, tr)
        return out

    def diagonal(self) -> Tensor:
        """:math:`\\operatorname{diag}(B) \\otimes \\operatorname{diag}(A)` per block, zero
        elsewhere (exact, no products)."""
        out = torch.zeros(self.space.size, 1, dtype=self.dtype, device=self.device)
        for _, A, B, w_sl, b_sl, d_out, d_in, tr in self._blocks:
            dB = torch.ones(d_out, dtype=self.dtype, device=self.device) if B is None else B.diag()
            D = (dB.unsqueeze(1) * A.diag().unsqueeze(0)).unsqueeze(-1)
            self._scatter(out, D, w_sl, b_sl, d_out, d_in, tr)
        return out.squeeze(1)

    def to(self, device=None, dtype=None) -> KroneckerOperator:
        """Copy on another device and/or dtype."""
        blocks = {}
        for layer, A, B, *_ in self._blocks:
            blocks[layer] = KroneckerBlock(
                A.to(device=device, dtype=dtype),
                None if B is None else B.to(device=device, dtype=dtype),
                *self._names[layer],
            )
        return KroneckerOperator(self.space, blocks)

    def factors(self) -> dict[str, tuple[Tensor, Tensor | None]]:
        """Layer -> ``(A, B)`` (``B`` is ``None`` for the identity)."""
        return {layer: (A, B) for layer, A, B, *_ in self._blocks}

    def blocks(self) -> dict[str, KroneckerBlock]:
        """Layer -> :class:`KroneckerBlock` with the stored factors (this operator's device
        and dtype) and the parameters each block covers."""
        return {
            layer: KroneckerBlock(A, B, *self._names[layer]) for layer, A, B, *_ in self._blocks
        }
