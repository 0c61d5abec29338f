"""A small, seeded fine-tuning loop and evaluation for classifiers.

Data come in one of three forms, all with integer class labels:

- a :class:`~curvmerge.data.TensorSplit` (``inputs``, ``labels``);
- a tuple ``(inputs, labels)`` of tensors;
- a Hugging Face batch dict ``{"input_ids", "attention_mask", ..., "labels"}`` as made by
  :func:`curvmerge.data.tokenize`; the model is called as ``model(**inputs)`` without
  ``labels``, and trailing columns that are padding in the whole mini-batch are cut off.

Models return logits ``[N, C]`` or an output object with ``.logits``.

Example:
    >>> from curvmerge.train import finetune, evaluate
    >>> from curvmerge.models import make_mlp
    >>> x = torch.randn(64, 4); y = (x[:, 0] > 0).long()
    >>> model = finetune(make_mlp(4, 2, seed=0), (x, y), steps=50, lr=0.05, progress=False)
    >>> evaluate(model, (x, y))["accuracy"] > 0.9
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeAlias

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from curvmerge.batches import model_outputs
from curvmerge.data.tasks import TensorSplit, TextSplit

__all__ = [
    "Data",
    "as_examples",
    "evaluate",
    "finetune",
    "iter_batches",
    "num_examples",
    "predict",
]

Data: TypeAlias = TensorSplit | tuple[Tensor, Tensor] | Mapping[str, Tensor]
"""Examples with labels: a ``TensorSplit``, ``(inputs, labels)`` or an HF dict with ``labels``."""

Inputs: TypeAlias = Tensor | dict[str, Tensor]
LossFn: TypeAlias = Callable[[Tensor, Tensor], Tensor]

_SEQUENCE_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def as_examples(data: Data) -> tuple[Inputs, Tensor]:
    """Split data into ``(inputs, labels)``; inputs are a tensor or a dict without labels.

    Raises:
        TypeError: ``data`` is raw text or of an unknown type.
        ValueError: Labels are missing or their count differs from the inputs'.
    """
    if isinstance(data, TextSplit):
        raise TypeError("text must be tokenised first: curvmerge.data.tokenize(split, tokenizer)")
    if isinstance(data, TensorSplit):
        inputs, labels = data.inputs, data.labels
    elif isinstance(data, tuple) and len(data) == 2:
        inputs, labels = data
    elif isinstance(data, Mapping):
        if "labels" not in data:
            raise ValueError("a batch dict needs a 'labels' entry (tokenize a TextSplit)")
        inputs = {k: v for k, v in data.items() if k != "labels"}
        labels = data["labels"]
    else:
        raise TypeError(
            "expected a TensorSplit, an (inputs, labels) tuple or a dict with 'labels', "
            f"got {type(data).__name__}"
        )
    labels = torch.as_tensor(labels)
    n = _count(inputs)
    if labels.shape[0] != n:
        raise ValueError(f"{n} inputs but {labels.shape[0]} labels")
    return inputs, labels


def _count(inputs: Inputs) -> int:
    if isinstance(inputs, Tensor):
        return int(inputs.shape[0])
    sizes = {int(v.shape[0]) for v in inputs.values()}
    if len(sizes) != 1:
        raise ValueError(f"batch dict entries differ in length: {sorted(sizes)}")
    return sizes.pop()


def num_examples(data: Data) -> int:
    """Return the number of examples in ``data``."""
    return int(as_examples(data)[1].shape[0])


def _take(inputs: Inputs, idx: Tensor, device: torch.device | None, trim: bool) -> Inputs:
    if isinstance(inputs, Tensor):
        return inputs[idx].to(device) if device is not None else inputs[idx]
    batch = {k: v[idx] for k, v in inputs.items()}
    mask = batch.get("attention_mask")
    if trim and mask is not None and mask.dim() == 2 and mask.shape[1] > 0:
        used = torch.nonzero(mask.any(dim=0)).flatten()
        length = int(used.max()) + 1 if used.numel() else 1
        if length < mask.shape[1]:
            batch = {
                k: (v[:, :length] if k in _SEQUENCE_KEYS and v.dim() == 2 else v)
                for k, v in batch.items()
            }
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    return batch


def iter_batches(
    data: Data,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    trim_padding: bool = True,
) -> Iterator[tuple[Inputs, Tensor]]:
    """Yield mini-batches ``(inputs, labels)`` of ``data``.

    Args:
        data: Examples (see :data:`Data`).
        batch_size: Examples per batch (the last one may be smaller).
        shuffle: Visit examples in a random order drawn from ``generator``.
        generator: Random generator for shuffling.
        device: Move each batch there.
        trim_padding: For dict inputs with an ``attention_mask``, cut the trailing columns that
            are padding in every example of the batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    inputs, labels = as_examples(data)
    n = labels.shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    dev = torch.device(device) if device is not None else None
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        y = labels[idx].to(dev) if dev is not None else labels[idx]
        yield _take(inputs, idx, dev, trim_padding), y


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def finetune(
    model: nn.Module,
    train_data: Data,
    *,
    epochs: int | None = None,
    steps: int | None = None,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    weight_decay: float = 0.0,
    optimizer: str = "adamw",
    schedule: str = "constant",
    max_grad_norm: float | None = None,
    loss_fn: LossFn | None = None,
    train_mode: bool = True,
    progress: bool = True,
    desc: str = "finetune",
    callback: Callable[[int, float], None] | None = None,
) -> nn.Module:
    """Fine-tune ``model`` in place with mini-batch gradient steps; return it in eval mode.

    Runs are reproducible: the order of examples comes from a generator seeded with ``seed``
    and dropout draws from torch's global RNG seeded with ``seed`` inside the loop (the global
    RNG state is restored afterwards).

    Args:
        model: A classifier returning logits or an output with ``.logits``.
        train_data: Training examples (see :data:`Data`).
        epochs: Passes over the data (default 1 when ``steps`` is not given).
        steps: Number of optimiser steps instead of epochs (reshuffles after each pass).
        lr: Learning rate.
        batch_size: Examples per step.
        seed: Seed of shuffling and dropout.
        weight_decay: Decoupled weight decay (AdamW) or L2 penalty (SGD).
        optimizer: ``"adamw"``, ``"adam"`` or ``"sgd"`` (momentum 0.9).
        schedule: ``"constant"`` or ``"linear"`` (learning rate decays linearly to 0).
        max_grad_norm: Clip the gradient norm to this value when given.
        loss_fn: ``loss_fn(logits, labels) -> scalar``; default mean cross-entropy.
        train_mode: Put the model in train mode (dropout, batch-norm updates) while training;
            ``False`` keeps eval mode, e.g. to freeze batch-norm statistics.
        progress: Show a tqdm progress bar with the running loss.
        desc: Label of the progress bar.
        callback: Called as ``callback(step, loss)`` after every step.

    Returns:
        The same model, in eval mode.
    """
    if epochs is not None and steps is not None:
        raise ValueError("give epochs or steps, not both")
    n = num_examples(train_data)
    if n == 0:
        raise ValueError("no training examples")
    per_epoch = -(-n // batch_size)
    total = steps if steps is not None else per_epoch * (1 if epochs is None else epochs)
    if total < 0:
        raise ValueError("epochs and steps must be non-negative")
    if schedule not in ("constant", "linear"):
        raise ValueError(f"schedule must be 'constant' or 'linear', got {schedule!r}")
    loss_fn = loss_fn or F.cross_entropy
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _make_optimizer(optimizer, params, lr, weight_decay)
    sched = (
        torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / max(total, 1)))
        if schedule == "linear"
        else None
    )
    device = _device_of(model)
    gen = torch.Generator().manual_seed(seed)
    model.train(train_mode)
    step = 0
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False, unit="step")
    try:
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
            torch.manual_seed(seed)
            while step < total:
                for inputs, labels in iter_batches(
                    train_data, batch_size, shuffle=True, generator=gen, device=device
                ):
                    loss = loss_fn(model_outputs(model, inputs), labels)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if max_grad_norm is not None:
                        nn.utils.clip_grad_norm_(params, max_grad_norm)
                    opt.step()
                    if sched is not None:
                        sched.step()
                    step += 1
                    value = float(loss.detach())
                    bar.update(1)
                    bar.set_postfix(loss=f"{value:.4f}", refresh=False)
                    if callback is not None:
                        callback(step, value)
                    if step >= total:
                        break
    finally:
        bar.close()
        model.eval()
    return model


def _make_optimizer(
    name: str, params: list[nn.Parameter], lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'adamw', 'adam' or 'sgd', got {name!r}")


@torch.no_grad()
def predict(
    model: nn.Module,
    data: Data | Tensor | Mapping[str, Tensor],
    *,
    batch_size: int = 256,
    progress: bool = False,
) -> Tensor:
    """Return the logits ``[N, C]`` of ``model`` on ``data`` (labels optional), on the CPU.

    The model is put in eval mode.

    Args:
        model: A classifier.
        data: Examples (see :data:`Data`), or bare inputs: a tensor or a batch dict.
        batch_size: Examples per forward pass.
        progress: Show a tqdm progress bar.
    """
    if isinstance(data, Tensor):
        data = (data, torch.zeros(data.shape[0], dtype=torch.long))
    elif isinstance(data, Mapping) and "labels" not in data:
        first = next(iter(data.values()))
        data = {**data, "labels": torch.zeros(first.shape[0], dtype=torch.long)}
    model.eval()
    device = _device_of(model)
    chunks = []
    n = num_examples(data)
    for inputs, _ in tqdm(
        iter_batches(data, batch_size, device=device),
        total=-(-n // batch_size),
        desc="predict",
        disable=not progress,
        leave=False,
    ):
        chunks.append(model_outputs(model, inputs).float().cpu())
    if not chunks:
        return torch.empty(0, 0)
    return torch.cat(chunks)


def evaluate(
    model: nn.Module,
    data: Data,
    *,
    batch_size: int = 256,
    loss_fn: LossFn | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Return accuracy and mean loss of ``model`` on ``data``; the model is put in eval mode.

    Args:
        model: A classifier.
        data: Examples with labels (see :data:`Data`).
        batch_size: Examples per forward pass.
        loss_fn: ``loss_fn(logits, labels) -> mean loss``; default cross-entropy.
        progress: Show a tqdm progress bar.

    Returns:
        ``{"accuracy": float, "loss": float, "n": int}``; loss is the mean over examples.
    """
    _, labels = as_examples(data)
    logits = predict(model, data, batch_size=batch_size, progress=progress)
    n = int(labels.shape[0])
    if n == 0:
        return {"accuracy": float("nan"), "loss": float("nan"), "n": 0}
    labels = labels.cpu()
    if loss_fn is None:
        loss = float(F.cross_entropy(logits, labels, reduction="mean"))
    else:
        loss = float(loss_fn(logits, labels))
    accuracy = float((logits.argmax(dim=-1) == labels).float().mean())
    return {"accuracy": accuracy, "loss": loss, "n": n}
