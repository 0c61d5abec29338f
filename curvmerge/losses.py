"""Loss conventions shared by every curvature computer (GGN operator, diagonal Fisher).

A data set of N examples has the loss :math:`L(\\theta) = c \\sum_n \\ell_n(f_n(\\theta), y_n)`,
where :math:`\\ell_n` sums example n's loss terms (one per class row for cross-entropy,
one per output entry for MSE and BCE; padding tokens, ``ignore_index``, excluded) and
:math:`c` follows the loss's reduction over the *whole* data set: 1 for ``"sum"``, one over
the number of loss terms for ``"mean"``. Every curvature is of this :math:`L`:

- exact (GGN): :math:`c \\sum_n J_n^\\top H_n J_n`, :math:`H_n = \\nabla_f^2 \\ell_n`;
- Monte-Carlo Fisher: :math:`c \\sum_n \\frac1S \\sum_s g_{ns} g_{ns}^\\top` with
  :math:`g_{ns} = \\nabla_\\theta \\ell_n(f_n, \\tilde y_s)`, :math:`\\tilde y_s` drawn from the
  model's predictive distribution;
- empirical Fisher: :math:`c \\sum_n g_n g_n^\\top` with the true labels.

For these losses the exact Fisher equals the GGN. Per-output quantities here act on
*rows*: a ``[M, C]`` matrix of outputs, one row per loss row (a sample, or a token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "LossSpec",
    "resolve_loss",
    "SUPPORTED_LOSSES",
    "flatten_rows",
    "count_terms",
    "output_hessian_matmul",
    "output_hessian_sqrt",
    "output_grad",
    "sample_targets",
    "causal_lm_targets",
]

SUPPORTED_LOSSES = ("cross_entropy", "mse", "bce")

_ALIASES = {
    "cross_entropy": "cross_entropy",
    "ce": "cross_entropy",
    "crossentropy": "cross_entropy",
    "mse": "mse",
    "bce": "bce",
    "bce_with_logits": "bce",
}


@dataclass(frozen=True)
class LossSpec:
    """A supported loss: its name, reduction and (cross-entropy) ``ignore_index``.

    Cross-entropy outputs are read with the classes last (``[B, C]``, ``[B, T, C]``: Hugging
    Face logits). An output ``[B, T, C]`` with ``T == C`` also fits torch's own ``[B, C, T]``
    layout; such a batch is refused unless ``classes_last=True`` declares the layout.
    """

    name: str
    reduction: str = "mean"
    ignore_index: int = -100
    classes_last: bool | None = None

    def __post_init__(self) -> None:
        if self.classes_last is False:
            raise ValueError(
                "cross-entropy outputs in torch's [B, C, ...] layout are not supported: return "
                "the classes last (e.g. logits.movedim(1, -1)), as Hugging Face models do"
            )

    def module(self) -> nn.Module:
        """The equivalent ``torch.nn`` loss module."""
        if self.name == "cross_entropy":
            return nn.CrossEntropyLoss(reduction=self.reduction, ignore_index=self.ignore_index)
        if self.name == "mse":
            return nn.MSELoss(reduction=self.reduction)
        return nn.BCEWithLogitsLoss(reduction=self.reduction)


def resolve_loss(loss_fn: nn.Module | str | LossSpec) -> LossSpec:
    """Turn ``nn.CrossEntropyLoss``/``nn.MSELoss``/``nn.BCEWithLogitsLoss`` or a name into a
    :class:`LossSpec`; anything else raises ``ValueError`` naming what is supported."""
    if isinstance(loss_fn, LossSpec):
        return loss_fn
    if isinstance(loss_fn, str):
        key = loss_fn.lower().replace("-", "_")
        if key not in _ALIASES:
            raise ValueError(
                f"unsupported loss {loss_fn!r}; supported: {', '.join(SUPPORTED_LOSSES)}"
            )
        return LossSpec(_ALIASES[key])
    reduction = getattr(loss_fn, "reduction", "mean")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"loss reduction must be 'mean' or 'sum', got {reduction!r}")
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if loss_fn.weight is not None or loss_fn.label_smoothing != 0:
            raise ValueError(
                "CrossEntropyLoss with class weights or label smoothing is not supported: "
                "its Fisher is not the GGN"
            )
        return LossSpec("cross_entropy", reduction, loss_fn.ignore_index)
    if isinstance(loss_fn, nn.MSELoss):
        return LossSpec("mse", reduction)
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        if loss_fn.weight is not None or loss_fn.pos_weight is not None:
            raise ValueError("BCEWithLogitsLoss with weight or pos_weight is not supported")
        return LossSpec("bce", reduction)
    raise ValueError(
        f"unsupported loss {type(loss_fn).__name__}; supported: nn.CrossEntropyLoss, "
        "nn.MSELoss, nn.BCEWithLogitsLoss (or the names "
        f"{', '.join(SUPPORTED_LOSSES)})"
    )


def flatten_rows(spec: LossSpec, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Rows of outputs and targets, and which example each row belongs to.

    Cross-entropy: outputs ``[B, C]`` or ``[B, T, C]`` (classes last, as Hugging Face
    logits), targets ``[B]`` or ``[B, T]``; rows whose target is ``ignore_index`` are
    dropped. MSE/BCE: outputs and targets ``[B, ...]``, one row per example.

    Returns:
        ``(f, y, example)``: ``f`` is ``[M, C]``, ``y`` is ``[M]`` (CE) or ``[M, C]``, and
        ``example`` is ``[M]`` with the batch index of each row.
    """
    B = outputs.shape[0]
    if spec.name == "cross_entropy":
        if targets.shape != outputs.shape[:-1]:
            raise ValueError(
                f"cross-entropy targets must have shape {tuple(outputs.shape[:-1])} "
                f"(outputs {tuple(outputs.shape)}, classes last), got {tuple(targets.shape)}"
            )
        if (
            outputs.ndim >= 3
            and spec.classes_last is None
            and targets.shape == (B, *outputs.shape[2:])
        ):
            raise ValueError(
                f"ambiguous cross-entropy layout: outputs {tuple(outputs.shape)} with targets "
                f"{tuple(targets.shape)} fit both classes last ([B, T, C], as curvmerge and "
                "Hugging Face read them) and torch's [B, C, T]; declare the layout with "
                "loss_fn=LossSpec('cross_entropy', classes_last=True) if the classes are last, "
                "or return classes-last logits (logits.movedim(1, -1)) if they are not"
            )
        C = outputs.shape[-1]
        f = outputs.reshape(-1, C)
        y = targets.reshape(-1)
        example = torch.arange(B, device=outputs.device).repeat_interleave(f.shape[0] // B)
        keep = y != spec.ignore_index
        return f[keep], y[keep], example[keep]
    if targets.shape != outputs.shape:
        raise ValueError(
            f"{spec.name} targets must have the outputs' shape {tuple(outputs.shape)}, "
            f"got {tuple(targets.shape)}"
        )
    return (
        outputs.reshape(B, -1),
        targets.reshape(B, -1).to(outputs.dtype),
        torch.arange(B, device=outputs.device),
    )


def count_terms(spec: LossSpec, targets: Tensor) -> int:
    """Number of loss terms a batch contributes to the ``"mean"`` normaliser."""
    if spec.name == "cross_entropy":
        return int((targets != spec.ignore_index).sum())
    return targets.numel()


def output_hessian_matmul(spec: LossSpec, f: Tensor, V: Tensor) -> Tensor:
    """Row-wise :math:`H_m v_m` for rows ``f`` ``[M, C]`` and ``V`` ``[M, C]`` or
    ``[M, C, K]``, with :math:`H_m` the Hessian of row m's summed loss terms.

    Cross-entropy :math:`\\operatorname{diag}(p) - p p^\\top`; MSE :math:`2I`; BCE
    :math:`\\operatorname{diag}(\\sigma(1-\\sigma))`.
    """
    squeeze = V.ndim == 2
    if squeeze:
        V = V.unsqueeze(-1)
    if spec.name == "cross_entropy":
        p = f.softmax(dim=-1).unsqueeze(-1)
        out = p * V - p * (p * V).sum(dim=1, keepdim=True)
    elif spec.name == "mse":
        out = 2.0 * V
    else:
        s = f.sigmoid().unsqueeze(-1)
        out = s * (1 - s) * V
    return out.squeeze(-1) if squeeze else out


def output_hessian_sqrt(spec: LossSpec, f: Tensor) -> Tensor:
    """A factor ``S`` ``[M, C, C]`` with :math:`S_m S_m^\\top = H_m`.

    Cross-entropy: column c is :math:`\\sqrt{p_c}(e_c - p)`; MSE: :math:`\\sqrt2 I`; BCE:
    :math:`\\operatorname{diag}(\\sqrt{\\sigma(1-\\sigma)})`.
    """
    M, C = f.shape
    eye = torch.eye(C, dtype=f.dtype, device=f.device).expand(M, C, C)
    if spec.name == "cross_entropy":
        p = f.softmax(dim=-1)
        return (eye - p.unsqueeze(-1)) * p.sqrt().unsqueeze(1)
    if spec.name == "mse":
        return eye * 2.0**0.5
    s = f.sigmoid()
    return eye * (s * (1 - s)).sqrt().unsqueeze(1)


def output_grad(spec: LossSpec, f: Tensor, y: Tensor) -> Tensor:
    """Row-wise gradient of the summed loss terms w.r.t. the outputs, ``[M, C]``."""
    if spec.name == "cross_entropy":
        return f.softmax(dim=-1) - nn.functional.one_hot(y, f.shape[-1]).to(f.dtype)
    if spec.name == "mse":
        return 2.0 * (f - y)
    return f.sigmoid() - y


def sample_targets(
    spec: LossSpec, f: Tensor, num_samples: int, generator: torch.Generator
) -> Tensor:
    """Draw ``num_samples`` targets per row from the model's predictive distribution.

    Returns ``[S, M]`` class indices (CE) or ``[S, M, C]`` values: for MSE
    :math:`\\tilde y \\sim \\mathcal N(f, \\tfrac12 I)`, whose score covariance is the MSE
    Hessian :math:`2I`; for BCE :math:`\\tilde y \\sim \\text{Bernoulli}(\\sigma(f))`.
    Sampling runs on the CPU generator so results do not depend on the device.
    """
    f = f.detach()
    if spec.name == "cross_entropy":
        p = f.softmax(dim=-1).cpu().to(torch.float64)
        idx = torch.multinomial(p, num_samples, replacement=True, generator=generator)
        return idx.T.to(f.device)
    shape = (num_samples, *f.shape)
    if spec.name == "mse":
        noise = torch.randn(shape, generator=generator, dtype=torch.float64)
        return f.unsqueeze(0) + (noise * 0.5**0.5).to(f.device, f.dtype)
    u = torch.rand(shape, generator=generator, dtype=torch.float64).to(f.device)
    return (u < f.sigmoid().unsqueeze(0).to(u.dtype)).to(f.dtype)


def causal_lm_targets(
    input_ids: Tensor, attention_mask: Tensor | None = None, ignore_index: int = -100
) -> Tensor:
    """Next-token targets for a causal language model: ``targets[:, t] = input_ids[:, t+1]``,
    ``ignore_index`` at the last position and wherever position t or t+1 is padding (right
    or left padding)."""
    targets = torch.full_like(input_ids, ignore_index)
    targets[:, :-1] = input_ids[:, 1:]
    if attention_mask is not None:
        pad = attention_mask == 0
        targets[:, :-1][pad[:, 1:] | pad[:, :-1]] = ignore_index
    return targets
