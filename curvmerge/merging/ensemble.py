"""Output ensembling: the reference that merging is measured against. It is not a merge.

An ensemble runs every model and averages their predictive distributions,

.. math::

    p(y \\mid x) = \\sum_t \\bar w_t\\, \\operatorname{softmax}(f_{\\theta_t}(x)), \\quad
    \\bar w_t = w_t / \\textstyle\\sum_s w_s,

at :math:`T` times the inference cost of one model. Matena & Raffel ("Merging models with
Fisher-weighted averaging", NeurIPS 2022) compare Fisher merging against it.

Models fine-tuned for different tasks usually share a body and keep their own heads. Then the
ensemble for task :math:`k` combines the bodies in output space the way a merge combines them
in parameter space: member :math:`t` is model :math:`k` with its shared parameters (the
``params`` selection) replaced by model :math:`t`'s, so every member uses task :math:`k`'s
head, and the members' outputs are averaged. The merged counterpart is model :math:`k` with
the merged body. No model is copied: members swap tensors in with
:func:`torch.func.functional_call`.
"""

from __future__ import annotations

import time
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call

from curvmerge.batches import logits_from
from curvmerge.merging.methods import MethodReport
from curvmerge.merging.system import check_weights
from curvmerge.space import ParamSpace

__all__ = ["OutputEnsemble", "EnsembleResult", "output_ensemble"]

_COMBINE = ("probs", "logits")


def _wrap_like(output, logits: Tensor):
    if isinstance(output, Tensor):
        return logits
    try:
        return type(output)(logits=logits)  # Hugging Face ModelOutput classes
    except TypeError:
        return types.SimpleNamespace(logits=logits)


class OutputEnsemble(nn.Module):
    """Average the outputs of several parameter sets run through one module.

    Args:
        module: The module whose ``forward`` runs (for task :math:`k`: model :math:`k`).
        sources: One mapping of tensors per member, swapped into ``module`` for that member
            (names missing from a mapping keep ``module``'s tensors). An empty mapping runs
            ``module`` as it is.
        weights: Member weights :math:`w_t \\ge 0` (default equal); normalised to sum to 1.
        combine: ``"probs"``: average the softmax probabilities (over the last dimension) and
            return their logarithm, which ranks classes like the averaged probabilities and
            can be fed to a cross-entropy as logits; ``"logits"``: average the raw outputs
            (regression, or logit averaging).

    The output has the members' format: a tensor, or an object with ``.logits``.
    """

    def __init__(
        self,
        module: nn.Module,
        sources: Sequence[Mapping[str, Tensor]],
        *,
        weights: Sequence[float] | None = None,
        combine: str = "probs",
    ):
        super().__init__()
        if combine not in _COMBINE:
            raise ValueError(f"combine must be one of {_COMBINE}, got {combine!r}")
        if not len(sources):
            raise ValueError("an ensemble needs at least one member")
        self.module = module
        self.sources = [dict(s) for s in sources]  # plain attribute: not in state_dict
        w = check_weights(weights, len(self.sources), 1.0)
        self.weights = [v / sum(w) for v in w]
        self.combine = combine

    def _run(self, source: Mapping[str, Tensor], args, kwargs):
        if not source:
            return self.module(*args, **kwargs)
        return functional_call(self.module, source, args, kwargs, strict=False)

    def forward(self, *args, **kwargs):
        total, first = None, None
        for w, source in zip(self.weights, self.sources, strict=True):
            if w == 0:
                continue
            out = self._run(source, args, kwargs)
            logits = logits_from(out)
            first = out if first is None else first
            term = torch.softmax(logits.float(), dim=-1) if self.combine == "probs" else logits
            total = w * term if total is None else total + w * term
        if self.combine == "probs":
            total = torch.log(total.clamp_min(torch.finfo(total.dtype).tiny))
        return _wrap_like(first, total)


@dataclass
class EnsembleResult:
    """The task models of an output ensemble (one per task) and a report.

    Attributes:
        members: ``members[k]`` evaluates task :math:`k` (an :class:`OutputEnsemble`).
        report: A :class:`~curvmerge.merging.methods.MethodReport` with ``method="ensemble"``.
    """

    kind: ClassVar[str] = "ensemble"  # the experiment tables' row kind
    members: list[OutputEnsemble]
    report: MethodReport

    def task_model(self, k: int) -> OutputEnsemble:
        """The module that evaluates task :math:`k`."""
        return self.members[k]


def _state(model: nn.Module) -> dict[str, Tensor]:
    state = {n: p.detach() for n, p in model.named_parameters()}
    state.update({n: b for n, b in model.named_buffers()})
    return state


def output_ensemble(
    models: Sequence[nn.Module],
    *,
    weights: Sequence[float] | None = None,
    params: str | Sequence[str] | None = None,
    combine: str = "probs",
) -> EnsembleResult:
    """Output ensembles of ``models``, one per task (see the module docstring).

    Args:
        models: The task models (modules: an ensemble runs them).
        weights: Member weights :math:`w_t \\ge 0` (default equal).
        params: The shared parameters (and buffers), as names or a regex over
            ``named_parameters()`` and ``named_buffers()``; the rest is each task's head.
            ``None`` (default) shares everything: every task gets the same plain ensemble of
            the whole models. Pass the same selection as to the merge it is compared with
            (a regex also selects matching buffers such as batch-norm statistics; a list
            selects exactly the names listed).
        combine: ``"probs"`` or ``"logits"`` (see :class:`OutputEnsemble`).

    Returns:
        An :class:`EnsembleResult`; ``result.task_model(k)`` evaluates task :math:`k`.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> models = [nn.Linear(3, 2), nn.Linear(3, 2)]
        >>> ens = output_ensemble(models).task_model(0)
        >>> x = torch.randn(4, 3)
        >>> p = (models[0](x).softmax(-1) + models[1](x).softmax(-1)) / 2
        >>> torch.allclose(ens(x).exp(), p)
        True
    """
    start = time.perf_counter()
    if isinstance(models, nn.Module) or not len(models):
        raise ValueError("output_ensemble needs a non-empty list of models")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise TypeError(
                f"model {i} is a {type(m).__name__}: an output ensemble runs the models, "
                "so it needs nn.Module instances, not parameter dicts"
            )
    T = len(models)
    w = check_weights(weights, T, 1.0)
    if params is None:
        members = [
            OutputEnsemble(models[0], [_state(m) for m in models], weights=w, combine=combine)
        ] * T
        shared = None
    else:
        states = [_state(m) for m in models]
        space = ParamSpace.from_tensors(states[0], params)
        for i, s in enumerate(states):
            ParamSpace(space.names, space.shapes).check(s, what=f"model {i}")
        shared = [{n: s[n] for n in space.names} for s in states]
        members = [
            OutputEnsemble(
                models[k],
                [{} if t == k else shared[t] for t in range(T)],
                weights=w,
                combine=combine,
            )
            for k in range(T)
        ]
    report = MethodReport(
        method="ensemble",
        num_models=T,
        weights=[v / sum(w) for v in w],
        damping=0.0,
        prior="none",
        seconds=time.perf_counter() - start,
        options={"combine": combine, "shared": "all" if shared is None else len(shared[0])},
    )
    return EnsembleResult(members, report)
