"""Feature extractors for methods whose coefficients depend on the input.

A feature extractor maps a batch of inputs (a tensor, or a dict of tensors for Hugging Face
models) to features ``[N, D]`` in at least float32, without gradients. It is frozen: data-
adaptive weight ensembling (:mod:`curvmerge.merging.weight_ensembling`) reads it, never
trains it. :func:`feature_extractor` builds one from a name or wraps a module:

- ``"penultimate"``: the input of the module's last linear layer (``nn.Linear`` or Hugging
  Face ``Conv1D``) in forward order: a CNN's penultimate activations, a sequence
  classifier's pooled output.
- ``"mean_tokens"``: the mean of the last hidden states over the tokens the attention mask
  keeps (a Hugging Face model's ``base_model``): the sentence embedding of
  sentence-transformers models such as all-MiniLM-L6-v2 (Reimers & Gurevych,
  "Sentence-BERT", EMNLP 2019).
- any ``nn.Module`` or callable: its output (a tensor, an object with
  ``last_hidden_state``, or one with ``logits``).

Outputs with more than two dimensions are pooled to ``[N, D]``: the mean over the positions
the batch's ``attention_mask`` keeps when the second dimension is its length, otherwise over
every dimension between the first and the last.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from curvmerge.batches import check_deterministic, logits_from

__all__ = ["feature_extractor", "FEATURES", "pool_features"]

#: The named feature extractors.
FEATURES = ("penultimate", "mean_tokens")


def pool_features(x: Tensor, inputs) -> Tensor:
    """``x`` (``[N, ...]``) as ``[N, D]`` in at least float32 (see the module doc)."""
    x = x.detach()
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    if x.ndim == 2:
        return x
    if x.ndim < 2:
        raise ValueError(
            f"features must have a batch and a feature dimension, got {tuple(x.shape)}"
        )
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    if x.ndim == 3 and isinstance(mask, Tensor) and tuple(mask.shape) == tuple(x.shape[:2]):
        keep = mask.to(x.dtype).unsqueeze(-1)
        return (x * keep).sum(1) / keep.sum(1).clamp_min(1.0)
    return x.reshape(x.shape[0], -1, x.shape[-1]).mean(1)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _call(module: nn.Module, inputs):
    return module(**inputs) if isinstance(inputs, Mapping) else module(inputs)


class _Penultimate:
    """The input of ``module``'s last linear layer in forward order."""

    def __init__(self, module: nn.Module) -> None:
        if not any(_is_linear(m) for m in module.modules()):
            raise ValueError(
                f"features='penultimate' needs a model with a linear layer; "
                f"{type(module).__name__} has none (pass a feature module instead)"
            )
        self.module = module
        self.last: nn.Module | None = None

    def _find_last(self, inputs) -> nn.Module:
        order: list[nn.Module] = []
        handles = [
            m.register_forward_hook(lambda mod, args, out: order.append(mod))
            for m in self.module.modules()
            if _is_linear(m)
        ]
        try:
            _call(self.module, inputs)
        finally:
            for h in handles:
                h.remove()
        if not order:
            raise ValueError(
                f"features='penultimate': no linear layer of {type(self.module).__name__} "
                "ran in its forward pass"
            )
        return order[-1]

    def __call__(self, inputs) -> Tensor:
        with torch.no_grad():
            if self.last is None:
                self.last = self._find_last(inputs)
            seen: list[Tensor] = []
            handle = self.last.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
            try:
                _call(self.module, inputs)
            finally:
                handle.remove()
        return pool_features(seen[-1], inputs)


class _MeanTokens:
    """Masked mean of ``module.base_model``'s last hidden states."""

    def __init__(self, module: nn.Module) -> None:
        body = getattr(module, "base_model", None)
        if not isinstance(body, nn.Module) or body is module:
            raise ValueError(
                f"features='mean_tokens' needs a Hugging Face model with a base_model; "
                f"{type(module).__name__} has none (use 'penultimate' or a feature module)"
            )
        self.body = body

    def __call__(self, inputs) -> Tensor:
        if not isinstance(inputs, Mapping):
            raise ValueError("features='mean_tokens' needs dict batches (input_ids, ...)")
        with torch.no_grad():
            out = self.body(**inputs)
        return pool_features(out.last_hidden_state, inputs)


class _Module:
    """Any module or callable, its output pooled to ``[N, D]``."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def __call__(self, inputs) -> Tensor:
        with torch.no_grad():
            out = _call(self.fn, inputs) if isinstance(self.fn, nn.Module) else self.fn(inputs)
        hidden = getattr(out, "last_hidden_state", None)
        x = hidden if isinstance(hidden, Tensor) else logits_from(out)
        return pool_features(x, inputs)


def feature_extractor(features: str | nn.Module | Callable, model: nn.Module | None = None):
    """A frozen feature extractor ``inputs -> [N, D]``.

    Args:
        features: ``"penultimate"``, ``"mean_tokens"`` (both read ``model``), or a module or
            callable (used as it is).
        model: The module the named extractors run (the base model, as in the paper).

    Raises:
        ValueError: An unknown name, a model the named extractor cannot read, or a feature
            module in training mode with dropout or batch norm (its features would differ
            between the adaptation and every evaluation, and batch norm would update its
            running statistics).
    """
    module = model if isinstance(features, str) else features
    if isinstance(module, nn.Module):
        try:
            check_deterministic(module)
        except ValueError as err:
            raise ValueError(f"the feature model is not frozen: {err}") from None
    if isinstance(features, str):
        if features not in FEATURES:
            raise ValueError(
                f"features must be one of {', '.join(map(repr, FEATURES))}, a module or a "
                f"callable; got {features!r}"
            )
        if not isinstance(model, nn.Module):
            raise ValueError(f"features={features!r} needs a model to run")
        return _Penultimate(model) if features == "penultimate" else _MeanTokens(model)
    if callable(features):
        return _Module(features)
    raise TypeError(f"features must be a name, a module or a callable, got {type(features)}")
