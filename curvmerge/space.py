"""The parameter space every operator acts on: an ordered list of named shapes.

A :class:`ParamSpace` plays the role that ``shape`` plays for a matrix: it fixes the
order in which a parameter dict (``{name: tensor}``, like a state dict) is flattened
into a vector of length :math:`P = \\sum_i \\prod \\text{shape}_i`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["ParamSpace", "SpaceMismatchError"]


class SpaceMismatchError(ValueError):
    """Raised when parameters, models or operators do not share a parameter space."""


@dataclass(frozen=True)
class ParamSpace:
    """An ordered list of ``(name, shape)`` pairs, with optional dtypes.

    Args:
        names: Parameter names, in flattening order.
        shapes: One shape per name.
        dtypes: Optional dtype per name (``None`` when unknown); only used to check that
            several models share a space.

    Example:
        >>> space = ParamSpace(("w", "b"), ((2, 3), (2,)))
        >>> space.size
        8
        >>> x = space.flatten({"w": torch.ones(2, 3), "b": torch.zeros(2)})
        >>> x.shape
        torch.Size([8])
        >>> space.unflatten(x)["b"]
        tensor([0., 0.])
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    dtypes: tuple[torch.dtype | None, ...] | None = None

    def __post_init__(self) -> None:
        names = tuple(self.names)
        shapes = tuple(torch.Size(s) for s in self.shapes)
        if len(names) != len(shapes):
            raise ValueError(f"got {len(names)} names but {len(shapes)} shapes")
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"parameter name {dup!r} appears more than once")
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "shapes", shapes)
        if self.dtypes is not None:
            dtypes = tuple(self.dtypes)
            if len(dtypes) != len(names):
                raise ValueError(f"got {len(names)} names but {len(dtypes)} dtypes")
            object.__setattr__(self, "dtypes", dtypes)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, Tensor], params: str | Sequence[str] | None = None
    ) -> ParamSpace:
        """Space of a dict of tensors (a state dict or a parameter dict), in its order."""
        if not isinstance(tensors, Mapping):
            raise TypeError(f"expected a mapping of name -> tensor, got {type(tensors).__name__}")
        space = cls(
            tuple(tensors),
            tuple(t.shape for t in tensors.values()),
            tuple(t.dtype for t in tensors.values()),
        )
        return space if params is None else space.select(params)

    from_state_dict = from_tensors

    @classmethod
    def from_module(
        cls, module: nn.Module, params: str | Sequence[str] | None = None
    ) -> ParamSpace:
        """Space of a module's ``named_parameters()`` (optionally a selected subset)."""
        return cls.from_tensors(dict(module.named_parameters()), params)

    @classmethod
    def of(cls, obj: nn.Module | Mapping[str, Tensor] | ParamSpace) -> ParamSpace:
        """Space of a module, a parameter dict, or a space (returned as is)."""
        if isinstance(obj, ParamSpace):
            return obj
        if isinstance(obj, nn.Module):
            return cls.from_module(obj)
        return cls.from_tensors(obj)

    # ------------------------------------------------------------------ properties
    @property
    def numels(self) -> tuple[int, ...]:
        """Number of entries of each parameter."""
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def size(self) -> int:
        """Total number of entries :math:`P`."""
        return sum(self.numels)

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self):
        return iter(zip(self.names, self.shapes, strict=True))

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __eq__(self, other: object) -> bool:
        """Spaces are equal when names and shapes agree (dtypes are not compared)."""
        if not isinstance(other, ParamSpace):
            return NotImplemented
        return self.names == other.names and self.shapes == other.shapes

    def __hash__(self) -> int:
        return hash((self.names, self.shapes))

    def __repr__(self) -> str:
        head = ", ".join(f"{n}{tuple(s)}" for n, s in list(self)[:3])
        more = f", ... ({len(self)} tensors)" if len(self) > 3 else ""
        return f"ParamSpace({head}{more}; P={self.size})"

    def slices(self) -> dict[str, slice]:
        """The slice of the flat vector that holds each parameter."""
        out, start = {}, 0
        for name, n in zip(self.names, self.numels, strict=True):
            out[name] = slice(start, start + n)
            start += n
        return out

    # ------------------------------------------------------------------ subsets
    def select(self, params: str | Sequence[str]) -> ParamSpace:
        """Sub-space of the names matching a regex (``re.search``) or listed explicitly.

        A list keeps this space's order; names not in the space raise
        :class:`SpaceMismatchError`. A regex that matches nothing raises too.
        """
        if isinstance(params, str):
            pattern = re.compile(params)
            keep = [n for n in self.names if pattern.search(n)]
            if not keep:
                raise SpaceMismatchError(f"no parameter name matches the regex {params!r}")
        else:
            wanted = list(params)
            missing = [n for n in wanted if n not in self.names]
            if missing:
                raise SpaceMismatchError(
                    f"parameter {missing[0]!r} is not in the space "
                    f"({len(missing)} of {len(wanted)} requested names missing)"
                )
            wanted_set = set(wanted)
            keep = [n for n in self.names if n in wanted_set]
        idx = [self.names.index(n) for n in keep]
        dtypes = None if self.dtypes is None else tuple(self.dtypes[i] for i in idx)
        return ParamSpace(tuple(keep), tuple(self.shapes[i] for i in idx), dtypes)

    # ------------------------------------------------------------------ checks
    def check(self, tensors: Mapping[str, Tensor], what: str = "parameters") -> None:
        """Raise :class:`SpaceMismatchError` naming the first parameter that does not fit.

        ``tensors`` may hold more names than the space (task heads, buffers); every name
        of the space must be present with the right shape (and dtype, when known).
        """
        for i, (name, shape) in enumerate(self):
            if name not in tensors:
                raise SpaceMismatchError(f"{what}: parameter {name!r} is missing")
            t = tensors[name]
            if tuple(t.shape) != tuple(shape):
                raise SpaceMismatchError(
                    f"{what}: parameter {name!r} has shape {tuple(t.shape)}, "
                    f"expected {tuple(shape)}"
                )
            if self.dtypes is not None and self.dtypes[i] is not None and t.dtype != self.dtypes[i]:
                raise SpaceMismatchError(
                    f"{what}: parameter {name!r} has dtype {t.dtype}, expected {self.dtypes[i]}"
                )

    def check_same(self, other: ParamSpace, what: str = "operator") -> None:
        """Raise :class:`SpaceMismatchError` if ``other`` differs, naming the first difference."""
        if self == other:
            return
        for i, name in enumerate(self.names):
            if i >= len(other.names) or other.names[i] != name:
                found = other.names[i] if i < len(other.names) else "<end>"
                raise SpaceMismatchError(f"{what}: parameter #{i} is {found!r}, expected {name!r}")
            if self.shapes[i] != other.shapes[i]:
                raise SpaceMismatchError(
                    f"{what}: parameter {name!r} has shape {tuple(other.shapes[i])}, "
                    f"expected {tuple(self.shapes[i])}"
                )
        raise SpaceMismatchError(f"{what}: has extra parameter {other.names[len(self.names)]!r}")

    # ------------------------------------------------------------------ (un)flattening
    def flatten(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """Concatenate the space's entries of ``tensors`` into a vector ``[P]``.

        Extra names in ``tensors`` are ignored; missing names or other shapes raise.
        """
        self.check(tensors)
        if not len(self):
            return torch.zeros(0)
        return torch.cat([tensors[n].detach().reshape(-1) for n in self.names])

    def flatten_many(self, dicts: Iterable[Mapping[str, Tensor]]) -> Tensor:
        """Stack several parameter dicts as the columns of a matrix ``[P, K]``."""
        return torch.stack([self.flatten(d) for d in dicts], dim=1)

    def unflatten(self, vec: Tensor) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Inverse of :meth:`flatten` (``[P]`` -> dict) and :meth:`flatten_many` (``[P, K]``
        -> list of dicts). Returned tensors are views of ``vec``."""
        if vec.ndim == 2:
            return [self.unflatten(vec[:, k]) for k in range(vec.shape[1])]
        if vec.ndim != 1 or vec.shape[0] != self.size:
            raise SpaceMismatchError(
                f"cannot unflatten a tensor of shape {tuple(vec.shape)} into a space of "
                f"size P={self.size}"
            )
        return {
            name: vec[sl].view(shape)
            for (name, shape), sl in zip(self, self.slices().values(), strict=True)
        }

    def zeros(self, dtype: torch.dtype | None = None, device=None) -> dict[str, Tensor]:
        """A parameter dict of zeros."""
        return {n: torch.zeros(s, dtype=dtype, device=device) for n, s in self}
