"""A small, seeded fine-tuning loop and evaluation for classifiers and regressors.

Data come in one of three forms, all with integer class labels:

- a :class:`~curvmerge.data.TensorSplit` (``inputs``, ``labels``);
- a tuple ``(inputs, labels)`` of tensors;
- a Hugging Face batch dict ``{"input_ids", "attention_mask", ..., "labels"}`` as made by
  :func:`curvmerge.data.tokenize`; the model is called as ``model(**inputs)`` without
  ``labels``, and trailing columns that are padding in the whole mini-batch are cut off.

Models return logits ``[N, C]`` or an output object with ``.logits``.

Evaluation (:func:`evaluate`) reports accuracy *and* macro-F1 for classifiers, MSE for
regressors, and how much of the data the model sends to its most frequent class: a model
that predicts one class for nearly every input can keep a respectable accuracy on skewed data,
and :func:`check_one_class` warns about it (:class:`OneClassWarning`).

Example:
    >>> from curvmerge.train import finetune, evaluate
    >>> from curvmerge.models import make_mlp
    >>> x = torch.randn(64, 4); y = (x[:, 0] > 0).long()
    >>> model = finetune(make_mlp(4, 2, seed=0), (x, y), steps=50, lr=0.05, progress=False)
    >>> evaluate(model, (x, y))["accuracy"] > 0.9
    True
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
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
    "is_batches",
    "iter_batches",
    "num_examples",
    "predict",
    # metrics
    "METRICS",
    "ONE_CLASS_SHARE",
    "OneClassWarning",
    "check_one_class",
    "classification_metrics",
    "macro_f1",
    "regression_metrics",
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


def is_batches(data: Any) -> bool:
    """Whether ``data`` is an iterable of ``(inputs, targets)`` batches rather than
    :data:`Data` (a ``TensorSplit``, an ``(inputs, labels)`` pair or a batch dict)."""
    if isinstance(data, (TensorSplit, TextSplit, Mapping, Tensor, str)):
        return False
    if (
        isinstance(data, tuple)
        and len(data) == 2
        and isinstance(data[0], (Tensor, Mapping))
        and isinstance(data[1], Tensor)
    ):
        return False
    return hasattr(data, "__iter__")


def _targets_like(targets: Tensor, outputs: Tensor) -> Tensor:
    targets = targets.float()
    return targets.reshape(outputs.shape) if targets.numel() == outputs.numel() else targets


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Data | Iterable[tuple[Any, Tensor]],
    *,
    batch_size: int = 256,
    loss_fn: LossFn | None = None,
    loss: str = "cross_entropy",
    progress: bool = False,
) -> dict[str, Any]:
    """Return the metrics of ``model`` on ``data``; the model is put in eval mode.

    Args:
        model: A classifier (logits ``[N, C]``, or ``[N, T, C]`` with ``-100`` marking
            padded targets) or a regressor (outputs shaped like the targets).
        data: Examples with labels (see :data:`Data`), or an iterable of ``(inputs,
            targets)`` batches (such as statistics batches or a ``DataLoader``).
        batch_size: Examples per forward pass (for :data:`Data`).
        loss_fn: ``loss_fn(outputs, targets) -> mean loss`` of a batch; default: the loss
            named by ``loss``.
        loss: ``"cross_entropy"`` (classes; predictions are the arg-max),
            ``"bce"`` (binary labels, logits thresholded at 0) or ``"mse"`` (regression).
        progress: Show a tqdm progress bar.

    Returns:
        For classifiers, :func:`classification_metrics` (``accuracy``, ``macro_f1``,
        ``predicted_class``, ``predicted_share``, ``label_share``) plus ``loss`` and ``n``;
        for ``"mse"``, :func:`regression_metrics` (``mse``) plus ``loss`` and ``n``. The loss
        is the mean over loss terms (rows, non-padding tokens, or entries).

    Example:
        >>> model = nn.Linear(2, 2)
        >>> sorted(evaluate(model, (torch.randn(8, 2), torch.arange(8) % 2)))
        ['accuracy', 'label_share', 'loss', 'macro_f1', 'n', 'predicted_class', 'predicted_share']
    """
    if loss not in _LOSSES:
        raise ValueError(f"loss must be one of {', '.join(_LOSSES)}, got {loss!r}")
    device = _device_of(model)
    if is_batches(data):
        from curvmerge.batches import move_batch

        batches = ((move_batch(x, device), y) for x, y in data)
        total = len(data) if hasattr(data, "__len__") else None
    else:
        n_all = num_examples(data)
        batches = iter_batches(data, batch_size, device=device)
        total = -(-n_all // batch_size)
    model.eval()
    preds, targets, sse = [], [], 0.0
    n = terms = 0
    loss_sum = 0.0
    for inputs, y in tqdm(batches, total=total, desc="evaluate", disable=not progress, leave=False):
        out = model_outputs(model, inputs).float().cpu()
        y = torch.as_tensor(y).cpu()
        n += int(y.shape[0])
        if loss in ("mse", "bce"):
            t = _targets_like(y, out)
            rows = out.numel()
            if loss == "mse":
                batch_loss = F.mse_loss(out, t, reduction="sum") / max(rows, 1)
                sse += float(((out - t.reshape(out.shape)) ** 2).sum(dtype=torch.float64))
            else:
                batch_loss = F.binary_cross_entropy_with_logits(out, t)
                preds.append((out > 0).long().reshape(-1))
                targets.append(t.long().reshape(-1))
        else:
            if out.dim() == 3:  # token level: [N, T, C] with -100 marking padding
                r, t = out.reshape(-1, out.shape[-1]), y.reshape(-1)
                keep = t != -100
                r, t = r[keep], t[keep]
            else:
                r, t = out, y
            rows = int(t.shape[0])
            batch_loss = F.cross_entropy(r, t) if rows else torch.zeros(())
            preds.append(r.argmax(dim=-1))
            targets.append(t)
        if loss_fn is not None:
            batch_loss = loss_fn(out, y)
        loss_sum += float(batch_loss) * rows
        terms += rows
    value = loss_sum / terms if terms else math.nan
    if loss == "mse":
        return {"mse": sse / terms if terms else math.nan, "loss": value, "n": n}
    p = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
    t = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long)
    return {**classification_metrics(p, t), "loss": value, "n": n}


# ---------------------------------------------------------------------------------- metrics
_LOSSES = ("cross_entropy", "bce", "mse")

#: The metrics :func:`evaluate` reports, and whether higher values are better.
METRICS: dict[str, bool] = {"accuracy": True, "macro_f1": True, "mse": False, "loss": False}

#: Share of the inputs in one predicted class above which :func:`check_one_class` warns.
ONE_CLASS_SHARE = 0.95


class OneClassWarning(UserWarning):
    """A model predicts one class for nearly every input while the labels are not that skewed.

    Accuracy alone can hide it (a merged model that says "neutral" to every tweet still
    scores the share of neutral tweets); macro-F1 and the majority-class reference show it.
    """


def macro_f1(predictions: Tensor, labels: Tensor) -> float:
    r"""The unweighted mean over classes of the per-class F1 score.

    .. math::

        \text{macro-F1} = \frac{1}{|K|} \sum_{k \in K}
        \frac{2\,\mathrm{TP}_k}{2\,\mathrm{TP}_k + \mathrm{FP}_k + \mathrm{FN}_k}

    over the classes :math:`K` that occur in the labels or the predictions (scikit-learn's
    ``f1_score(average="macro")``); a class with no true or predicted example scores 0.

    Args:
        predictions: Predicted classes ``[N]`` (integers).
        labels: True classes ``[N]``.

    Example:
        >>> macro_f1(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 1, 1]))  # F1 2/3 and 0
        0.3333333333333333
    """
    predictions = torch.as_tensor(predictions).reshape(-1).long().cpu()
    labels = torch.as_tensor(labels).reshape(-1).long().cpu()
    if predictions.shape != labels.shape:
        raise ValueError(f"{predictions.numel()} predictions but {labels.numel()} labels")
    if labels.numel() == 0:
        return math.nan
    classes, index = torch.unique(torch.cat([labels, predictions]), return_inverse=True)
    K, n = classes.numel(), labels.numel()
    y, p = index[:n], index[n:]
    confusion = torch.bincount(y * K + p, minlength=K * K).reshape(K, K).double()
    tp = confusion.diagonal()
    denom = confusion.sum(0) + confusion.sum(1)  # 2 TP + FP + FN
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(tp))
    return float(f1.mean())


def _top_share(values: Tensor) -> tuple[int, float]:
    classes, counts = torch.unique(values, return_counts=True)
    top = int(counts.argmax())
    return int(classes[top]), float(counts[top]) / values.numel()


def classification_metrics(predictions: Tensor, labels: Tensor) -> dict[str, float]:
    """Accuracy, macro-F1 and how concentrated the predictions and labels are.

    Args:
        predictions: Predicted classes ``[N]``.
        labels: True classes ``[N]``.

    Returns:
        ``accuracy``, ``macro_f1`` (:func:`macro_f1`), ``predicted_class`` (the most
        frequent prediction), ``predicted_share`` (its share of the inputs) and
        ``label_share`` (the share of the most frequent true class); NaN when empty.

    Example:
        >>> m = classification_metrics(torch.tensor([1, 1, 1, 1]), torch.tensor([0, 1, 1, 0]))
        >>> m["accuracy"], m["predicted_class"], m["predicted_share"], m["label_share"]
        (0.5, 1, 1.0, 0.5)
    """
    predictions = torch.as_tensor(predictions).reshape(-1).long().cpu()
    labels = torch.as_tensor(labels).reshape(-1).long().cpu()
    if predictions.shape != labels.shape:
        raise ValueError(f"{predictions.numel()} predictions but {labels.numel()} labels")
    if labels.numel() == 0:
        nan = math.nan
        return {
            "accuracy": nan,
            "macro_f1": nan,
            "predicted_class": -1,
            "predicted_share": nan,
            "label_share": nan,
        }
    cls, share = _top_share(predictions)
    return {
        "accuracy": float((predictions == labels).double().mean()),
        "macro_f1": macro_f1(predictions, labels),
        "predicted_class": cls,
        "predicted_share": share,
        "label_share": _top_share(labels)[1],
    }


def regression_metrics(outputs: Tensor, targets: Tensor) -> dict[str, float]:
    """The mean squared error over all entries (``{"mse": ...}``).

    Example:
        >>> regression_metrics(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]))
        {'mse': 2.5}
    """
    outputs, targets = torch.as_tensor(outputs).double(), torch.as_tensor(targets).double()
    if outputs.numel() == 0:
        return {"mse": math.nan}
    return {"mse": float(((outputs - targets.reshape(outputs.shape)) ** 2).mean())}


def check_one_class(
    metrics: Mapping[str, Any],
    *,
    what: str = "the model",
    threshold: float = ONE_CLASS_SHARE,
    warn: bool = True,
) -> bool:
    """Whether ``metrics`` show one class predicted for nearly every input; warns if so.

    The test is ``predicted_share > threshold`` while ``label_share <= threshold``: the model
    puts more than ``threshold`` of the inputs in one class although the labels are not that
    skewed. Metrics without class shares (regression) never trigger it.

    Args:
        metrics: From :func:`evaluate` or :func:`classification_metrics`.
        what: Names the model and data in the warning (``"average on airline"``).
        threshold: The share, in (0, 1].
        warn: Issue a :class:`OneClassWarning` (else only return the answer).

    Example:
        >>> m = classification_metrics(torch.zeros(100), torch.arange(100) % 3)
        >>> check_one_class(m, warn=False)
        True
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    share, labels = metrics.get("predicted_share"), metrics.get("label_share")
    if share is None or labels is None or math.isnan(share) or math.isnan(labels):
        return False
    if not (share > threshold and labels <= threshold):
        return False
    if warn:
        warnings.warn(
            f"{what} predicts class {metrics.get('predicted_class')} for {100 * share:.1f}% of "
            f"the inputs, while the most frequent label covers {100 * labels:.1f}%: "
            "accuracy alone hides this; look at macro-F1 and the majority-class row",
            OneClassWarning,
            stacklevel=2,
        )
    return True
