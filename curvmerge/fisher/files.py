"""Fisher files: a diagonal Fisher computed once, saved to safetensors, reused by many merges.

A file holds one tensor per parameter (named as in ``model.named_parameters()``) and the
metadata ``format``, ``version``, ``kind``, ``num_examples``, ``names`` (the parameter order,
JSON) and, when known, ``loss``, ``reduction`` and ``mc_samples``. Writes are atomic: the file
is written next to its destination and moved into place with ``os.replace``.

``curvmerge fisher`` adds the model it was computed for (``checkpoint``: the path or hub id as
given; ``model_path``: the resolved path of a local model), ``task``, ``data`` and
``seconds``; ``curvmerge merge`` and ``sweep`` refuse a file whose recorded model is not the
model at its position.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from curvmerge.atomic import atomic_write_bytes
from curvmerge.fisher.diagonal import FISHER_KINDS, DiagonalFisher
from curvmerge.operators import DiagonalOperator
from curvmerge.space import ParamSpace, SpaceMismatchError
from curvmerge.statistics.files import read_safetensors

__all__ = ["save_fisher", "load_fisher", "FISHER_FORMAT"]

FISHER_FORMAT = "curvmerge.diagonal_fisher"
_VERSION = "1"


def save_fisher(
    path: str | os.PathLike,
    fisher: DiagonalOperator | Mapping[str, Tensor],
    *,
    kind: str | None = None,
    num_examples: int | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Save a diagonal Fisher to a safetensors file.

    Args:
        path: Destination (conventionally ``*.safetensors``).
        fisher: A :class:`~curvmerge.fisher.DiagonalFisher` (its kind and number of examples
            are stored), any :class:`~curvmerge.operators.DiagonalOperator`, or a parameter
            dict of diagonals.
        kind: Overrides (or, for operators without it, supplies) the Fisher kind.
        num_examples: Overrides (or supplies) the number of examples.
        metadata: Extra string metadata to store.

    Raises:
        ValueError: When the kind or the number of examples is unknown or invalid.

    Example:
        >>> import tempfile, os
        >>> space = ParamSpace(("w",), ((2,),))
        >>> F = DiagonalFisher(space, torch.tensor([1.0, 2.0]), kind="exact", num_examples=3)
        >>> path = os.path.join(tempfile.mkdtemp(), "fisher.safetensors")
        >>> save_fisher(path, F)
        >>> G = load_fisher(path)
        >>> G.diagonal(), G.kind, G.num_examples
        (tensor([1., 2.]), 'exact', 3)
    """
    from safetensors.torch import save

    if isinstance(fisher, DiagonalOperator):
        tensors = fisher.as_dict()
        kind = kind if kind is not None else getattr(fisher, "kind", None)
        if num_examples is None:
            num_examples = getattr(fisher, "num_examples", None)
        extra = {
            k: getattr(fisher, k)
            for k in ("loss", "reduction", "mc_samples")
            if getattr(fisher, k, None) is not None
        }
    elif isinstance(fisher, Mapping):
        tensors = dict(fisher)
        extra = {}
    else:
        raise TypeError(
            f"fisher must be a DiagonalOperator or a dict of tensors, got {type(fisher).__name__}"
        )
    if kind not in FISHER_KINDS:
        raise ValueError(f"kind must be one of {', '.join(FISHER_KINDS)}; got {kind!r}")
    if num_examples is None or int(num_examples) < 0:
        raise ValueError(f"num_examples must be a non-negative integer, got {num_examples!r}")
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.update({k: str(v) for k, v in extra.items()})
    meta.update(
        format=FISHER_FORMAT,
        version=_VERSION,
        kind=kind,
        num_examples=str(int(num_examples)),
        names=json.dumps(list(tensors)),
    )
    # safetensors refuses tensors that share memory (views of one flat diagonal)
    data = {n: t.detach().to("cpu").clone().contiguous() for n, t in tensors.items()}
    atomic_write_bytes(path, save(data, metadata=meta))


def _check_against(
    names: list[str], shapes: dict[str, torch.Size], target, path: str
) -> ParamSpace:
    """The space of the file, checked against a model, a parameter dict or a space."""
    file_space = ParamSpace(tuple(names), tuple(shapes[n] for n in names))
    if target is None:
        return file_space
    if isinstance(target, ParamSpace):
        try:
            target.check_same(file_space, what=f"Fisher file {path!r}")
        except SpaceMismatchError:
            missing = [n for n in target.names if n not in shapes]
            if missing:
                raise SpaceMismatchError(
                    f"Fisher file {path!r} has no parameter {missing[0]!r} of the space"
                ) from None
            raise
        return target
    tensors = dict(target.named_parameters()) if isinstance(target, nn.Module) else target
    if not isinstance(tensors, Mapping):
        raise TypeError(
            f"expected a model, a parameter dict or a ParamSpace, got {type(target).__name__}"
        )
    for n in names:
        if n not in tensors:
            raise SpaceMismatchError(
                f"Fisher file {path!r} holds parameter {n!r}, which the model does not have"
            )
        if tuple(tensors[n].shape) != tuple(shapes[n]):
            raise SpaceMismatchError(
                f"Fisher file {path!r}: parameter {n!r} has shape {tuple(shapes[n])} in the "
                f"file but {tuple(tensors[n].shape)} in the model"
            )
    return file_space


def load_fisher(
    path: str | os.PathLike,
    model: nn.Module | Mapping[str, Tensor] | ParamSpace | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> DiagonalFisher:
    """Load a diagonal Fisher saved by :func:`save_fisher`.

    Args:
        path: The file.
        model: Optional model, parameter dict or :class:`ParamSpace` to check the file
            against. A model (or dict) must hold every parameter of the file with the same
            shape (it may hold more, such as task heads); a space must match exactly.
        device: Device of the loaded diagonal (default CPU).
        dtype: Dtype of the loaded diagonal (default as stored).

    Raises:
        SpaceMismatchError: Naming the first parameter whose name or shape does not match.
        ValueError: When the file is not a curvmerge Fisher file.
    """
    path = os.fspath(path)
    meta, tensors = read_safetensors(
        path, FISHER_FORMAT, "Fisher", lambda m: json.loads(m["names"])
    )
    names = list(tensors)
    shapes = {n: t.shape for n, t in tensors.items()}
    space = _check_against(names, shapes, model, path)
    flat = (
        torch.cat([tensors[n].reshape(-1) for n in space.names]) if len(space) else torch.zeros(0)
    )
    flat = flat.to(device=device or "cpu", dtype=dtype or flat.dtype)
    mc = meta.get("mc_samples")
    return DiagonalFisher(
        ParamSpace(space.names, space.shapes),
        flat,
        kind=meta["kind"],
        num_examples=int(meta["num_examples"]),
        loss=meta.get("loss"),
        reduction=meta.get("reduction"),
        mc_samples=int(mc) if mc is not None else None,
    )
