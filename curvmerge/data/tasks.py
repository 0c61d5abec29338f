"""Containers for classification tasks and seeded, stratified splitting."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
from torch import Tensor

__all__ = ["Task", "TensorSplit", "TextSplit", "stratified_split"]


@dataclass(frozen=True)
class TensorSplit:
    """Examples as tensors.

    Attributes:
        inputs: Inputs, ``[N, ...]`` (images are ``[N, 1, H, W]`` float32 in ``[0, 1]``).
        labels: Integer class labels, ``[N]`` (int64).
    """

    inputs: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.inputs.shape[0] != self.labels.shape[0]:
            raise ValueError(
                f"inputs have {self.inputs.shape[0]} examples but labels {self.labels.shape[0]}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class TextSplit:
    """Examples as raw strings; turn them into model batches with :func:`tokenize`.

    Attributes:
        texts: The texts.
        labels: Integer class labels, one per text.
    """

    texts: list[str]
    labels: list[int]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.texts)


S = TypeVar("S", TensorSplit, TextSplit)


@dataclass(frozen=True)
class Task(Generic[S]):
    """A classification task with train, validation and test splits.

    Attributes:
        name: Short name (e.g. ``"digits-0-4"``, ``"airline"``).
        num_classes: Number of classes; labels are ``0 .. num_classes - 1``.
        label_names: Human-readable name of each class.
        train: Training split.
        val: Validation split (choose hyper-parameters and merge coefficients here).
        test: Test split (report only).
    """

    name: str
    num_classes: int
    label_names: tuple[str, ...]
    train: S
    val: S
    test: S

    def sizes(self) -> dict[str, int]:
        """Return ``{"train": n, "val": n, "test": n}``."""
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def stratified_split(
    labels: Sequence[int] | Tensor,
    fractions: Sequence[float],
    *,
    seed: int,
) -> list[Tensor]:
    """Split example indices into disjoint parts with the same class proportions.

    Within each class, indices are shuffled with a generator seeded by ``seed`` and cut into
    consecutive pieces of ``round(fraction * class_size)`` examples. When the fractions sum to 1,
    the last part takes the rounding remainder so that every example is used; when they sum to
    less, the leftover examples are left out.

    Args:
        labels: Class label of each example.
        fractions: Size of each part as a fraction of each class; non-negative, sum at most 1.
        seed: Seed of the shuffle.

    Returns:
        One sorted ``int64`` index tensor per fraction.

    Raises:
        ValueError: Negative fractions or fractions summing to more than 1.

    Example:
        >>> from curvmerge.data.tasks import stratified_split
        >>> parts = stratified_split([0, 0, 0, 0, 1, 1, 1, 1], [0.5, 0.25, 0.25], seed=0)
        >>> [len(p) for p in parts]
        [4, 2, 2]
    """
    y = torch.as_tensor(labels, dtype=torch.long)
    fracs = [float(f) for f in fractions]
    total = sum(fracs)
    if any(f < 0 for f in fracs) or total > 1 + 1e-9:
        raise ValueError(
            f"split fractions must be non-negative and sum to at most 1, got {list(fractions)}"
        )
    use_all = abs(total - 1) <= 1e-9
    parts: list[list[Tensor]] = [[] for _ in fracs]
    gen = torch.Generator().manual_seed(seed)
    for cls in torch.unique(y).tolist():
        idx = torch.nonzero(y == cls).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        start = 0
        for p, f in enumerate(fracs):
            if use_all and p == len(fracs) - 1:
                stop = idx.numel()
            else:
                stop = min(idx.numel(), start + round(f * idx.numel()))
            parts[p].append(idx[start:stop])
            start = stop
    return [
        torch.sort(torch.cat(p)).values if p else torch.empty(0, dtype=torch.long) for p in parts
    ]
