"""Model and data conventions shared by curvature computers.

``data`` is any iterable of ``(inputs, targets)`` batches (a ``DataLoader``, a list):
``inputs`` is a tensor or a dict of tensors (Hugging Face batches with ``input_ids`` and
``attention_mask``); the model's output is a tensor or has ``.logits``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

__all__ = [
    "model_outputs",
    "logits_from",
    "move_batch",
    "iterate_batches",
    "check_deterministic",
    "batch_size",
    "model_device",
]


def logits_from(output) -> Tensor:
    """The logits of a model output: the tensor itself, ``output.logits`` (Hugging Face),
    ``output["logits"]``, or the first element of a tuple."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not isinstance(logits, Tensor):
        raise TypeError(
            f"model output of type {type(output).__name__} is neither a tensor nor has .logits"
        )
    return logits


def model_outputs(model: nn.Module, inputs) -> Tensor:
    """Call ``model`` on ``inputs`` (a tensor, or a dict passed as keyword arguments) and
    return the output tensor (``.logits`` for Hugging Face outputs)."""
    return logits_from(model(**inputs) if isinstance(inputs, Mapping) else model(inputs))


def move_batch(obj, device: torch.device, dtype: torch.dtype | None = None):
    """Move a tensor or a dict of tensors to ``device``; floating tensors are cast to
    ``dtype`` when given (integer ids and masks keep theirs)."""
    if isinstance(obj, Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype)
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: move_batch(v, device, dtype) for k, v in obj.items()}
    return obj


def batch_size(inputs) -> int:
    """Number of examples in a batch of inputs."""
    if isinstance(inputs, Mapping):
        return next(iter(inputs.values())).shape[0]
    return inputs.shape[0]


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def iterate_batches(data: Iterable, allow_empty: bool = False) -> Iterator[tuple[object, Tensor]]:
    """Iterate ``(inputs, targets)`` batches, raising ``ValueError`` on empty data (unless
    ``allow_empty``: one process's shard of distributed data may be) or on a batch that is
    not a pair."""
    empty = True
    for batch in data:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(
                "data must yield (inputs, targets) pairs; got a "
                f"{type(batch).__name__}"
                + (f" of length {len(batch)}" if hasattr(batch, "__len__") else "")
            )
        inputs, targets = batch
        if batch_size(inputs) == 0:
            continue
        empty = False
        yield inputs, targets
    if empty and not allow_empty:
        raise ValueError("data is empty: it yielded no examples")


_STOCHASTIC = (nn.modules.dropout._DropoutNd,)
_BATCH_DEPENDENT = (nn.modules.batchnorm._BatchNorm,)


def check_deterministic(model: nn.Module) -> None:
    """Refuse a model whose forward pass is random or batch-dependent in training mode.

    Raises:
        ValueError: naming the first dropout (p > 0) or batch-norm module in training mode.
    """
    for name, module in model.named_modules():
        if not module.training:
            continue
        if isinstance(module, _STOCHASTIC) and module.p > 0:
            raise ValueError(
                f"model is in training mode and module {name or '<root>'!r} "
                f"({type(module).__name__}, p={module.p}) makes the forward pass random; "
                "call model.eval() before computing curvature"
            )
        if isinstance(module, _BATCH_DEPENDENT):
            raise ValueError(
                f"model is in training mode and module {name!r} ({type(module).__name__}) "
                "uses batch statistics; call model.eval() before computing curvature"
            )
        for attr in ("attention_dropout", "dropout_prob", "hidden_dropout_prob"):
            p = getattr(module, attr, 0.0)
            if isinstance(p, float) and p > 0:
                raise ValueError(
                    f"model is in training mode and module {name!r} has {attr}={p}; "
                    "call model.eval() before computing curvature"
                )
