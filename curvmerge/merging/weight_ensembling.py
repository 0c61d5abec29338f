"""Data-adaptive weight ensembling: merging coefficients that depend on the input.

Tang et al., "Data-Adaptive Weight-Ensembling for Multi-Task Model Fusion" (IJCV 2025;
FusionBench's ``dawe``). Task arithmetic whose coefficients a small network computes from
each input's features,

.. math::

    \\lambda(x) = g_\\phi\\big(\\hat z(x)\\big) \\in \\mathbb{R}^{T \\times G}, \\qquad
    \\hat z(x) = \\frac{z(x) - \\mu}{\\sigma}, \\qquad
    \\theta^{(g)}(B) = \\theta_0^{(g)} + \\sum_t \\bar\\lambda_{t,g}(B)\\, \\tau_t^{(g)}, \\qquad
    \\bar\\lambda(B) = \\frac{1}{|B|} \\sum_{x \\in B} \\lambda(x),

where :math:`z` is a frozen feature extractor (by default the base model's penultimate
activations; :mod:`curvmerge.merging.features`), :math:`\\mu, \\sigma` the mean and standard
deviation of the adaptation inputs' features (stored with the network), :math:`g_\\phi` an MLP
(:class:`CoefficientNetwork`), and the groups those of AdaMerging
(:class:`~curvmerge.merging.adamerging.GroupedTaskArithmetic`: one per task, or one per
task and merged tensor). ``per="batch"`` (the default, the paper's batch-reduced variant)
merges once per batch with :math:`\\bar\\lambda(B)`; ``per="input"`` merges once per example
with :math:`\\lambda(x)` (:math:`|B|` merges and forward passes per batch).

:math:`\\phi` is learned by test-time adaptation: Adam on AdaMerging's objective, the mean
prediction entropy of every task's merged model on unlabelled inputs of that task, with
every batch merged with its own coefficients. The labels are never read. The trained network
(with its feature normalisation) can be saved and applied to another pool of models of the
same architecture (:func:`save_coefficient_network`, ``network=``).

The result is not one merged model: each task's module (:class:`AdaptiveMergedModel`)
computes its coefficients and merges for every batch it is given, so its predictions depend
on the batch (and on the batch size) under ``per="batch"``.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from curvmerge.atomic import atomic_write_bytes
from curvmerge.merging.adamerging import (
    AdaMergingObjective,
    AdaptationReport,
    GroupedTaskArithmetic,
    adaptation_fields,
    check_adaptation,
    entropy,
    entropy_steps,
    run_task_model,
)
from curvmerge.merging.ensemble import EnsembleResult
from curvmerge.merging.features import feature_extractor
from curvmerge.merging.methods import method_report
from curvmerge.merging.report import parameters_of
from curvmerge.merging.system import check_weights

__all__ = [
    "weight_ensembling",
    "CoefficientNetwork",
    "AdaptiveMerge",
    "AdaptiveMergedModel",
    "WeightEnsemblingObjective",
    "WeightEnsemblingReport",
    "WeightEnsemblingResult",
    "save_coefficient_network",
    "load_coefficient_network",
    "PER",
]

#: How often the merge is recomputed: once per batch or once per input.
PER = ("batch", "input")

NETWORK_FORMAT = "curvmerge.coefficient_network"
_VERSION = "1"

Model = nn.Module | Mapping[str, Tensor]


class CoefficientNetwork(nn.Module):
    """The map :math:`g_\\phi` from features ``[N, D]`` to coefficients ``[N, T, G]``.

    ``depth`` hidden layers of width ``hidden`` with ReLU (``depth=0``: one linear map), on
    standardised features :math:`(z - \\mu) / \\sigma` (the buffers ``feature_mean`` and
    ``feature_scale``, set by :meth:`standardize`). Every layer's weights start small
    (normal, standard deviation 0.01, seeded; not PyTorch's default initialisation), the
    hidden biases at 0 and the output bias at ``initial``, so the first coefficients are
    close to ``initial`` for every input: task arithmetic at that scaling.

    Args:
        feature_dim: :math:`D`.
        num_models: :math:`T`.
        num_groups: :math:`G`.
        hidden: Width of the hidden layers.
        depth: Number of hidden layers (0, 1 or 2 in the paper's code).
        initial: The output bias: a number, or ``[T, G]`` values.
        seed: Seed of the initial weights.
        dtype: Parameter dtype.

    Attributes:
        groups: The parameter names of each group the network was trained for (set by
            :func:`weight_ensembling` and :func:`load_coefficient_network`; ``None`` for a
            network built by hand): a pool it is applied to must merge the same groups.
    """

    def __init__(
        self,
        feature_dim: int,
        num_models: int,
        num_groups: int,
        *,
        hidden: int = 64,
        depth: int = 2,
        initial: float | Tensor = 0.3,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("feature_dim", feature_dim, 1),
            ("num_models", num_models, 1),
            ("num_groups", num_groups, 1),
            ("hidden", hidden, 1),
            ("depth", depth, 0),
        ):
            if int(value) != value or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value}")
        self.feature_dim, self.num_models, self.num_groups = feature_dim, num_models, num_groups
        self.groups: list[list[str]] | None = None
        self.hidden, self.depth = hidden, depth
        widths = [feature_dim] + [hidden] * depth + [num_models * num_groups]
        layers: list[nn.Module] = []
        for i in range(len(widths) - 1):
            layers.append(nn.Linear(widths[i], widths[i + 1], dtype=dtype))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        self.mlp = nn.Sequential(*layers)
        self.register_buffer("feature_mean", torch.zeros(feature_dim, dtype=dtype))
        self.register_buffer("feature_scale", torch.ones(feature_dim, dtype=dtype))
        g = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            for layer in self.mlp:
                if isinstance(layer, nn.Linear):
                    layer.weight.copy_(0.01 * torch.randn(layer.weight.shape, generator=g))
                    layer.bias.zero_()
            bias = torch.as_tensor(initial, dtype=dtype).expand(num_models, num_groups)
            self.mlp[-1].bias.copy_(bias.reshape(-1))

    def standardize(self, features: Tensor) -> None:
        """Set :math:`\\mu, \\sigma` to the mean and standard deviation of ``features``
        (``[M, D]``; a dimension that does not vary keeps :math:`\\sigma = 1`)."""
        f = features.detach().to(self.feature_mean)
        with torch.no_grad():
            self.feature_mean.copy_(f.mean(0))
            std = f.std(0, unbiased=False) if f.shape[0] > 1 else torch.ones_like(f[0])
            self.feature_scale.copy_(torch.where(std > 1e-8, std, torch.ones_like(std)))

    def forward(self, features: Tensor) -> Tensor:
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(
                f"features must be [N, {self.feature_dim}], got {tuple(features.shape)}"
            )
        z = (features.to(self.feature_mean) - self.feature_mean) / self.feature_scale
        return self.mlp(z).reshape(-1, self.num_models, self.num_groups)

    def config(self) -> dict[str, int]:
        """The sizes that rebuild the network."""
        return {
            "feature_dim": self.feature_dim,
            "num_models": self.num_models,
            "num_groups": self.num_groups,
            "hidden": self.hidden,
            "depth": self.depth,
        }


class AdaptiveMerge:
    """Coefficients from features, and a task model run on the merge they give.

    Args:
        merger: The task vectors and groups (:class:`GroupedTaskArithmetic`).
        network: :math:`g_\\phi` (``None`` until it is set: features only).
        extractor: The frozen feature extractor (``inputs -> [N, D]``).
        per: ``"batch"`` or ``"input"`` (see the module doc).
        clamp: Clip each input's coefficients to :math:`[0, 1]` before they are averaged.
    """

    def __init__(
        self,
        merger: GroupedTaskArithmetic,
        network: CoefficientNetwork | None,
        extractor: Callable,
        *,
        per: str = "batch",
        clamp: bool = True,
    ) -> None:
        if per not in PER:
            raise ValueError(f"per must be one of {', '.join(map(repr, PER))}, got {per!r}")
        self.merger, self.network, self.extractor = merger, network, extractor
        self.per, self.clamp = per, bool(clamp)

    def features(self, inputs) -> Tensor:
        """The extractor's features ``[N, D]`` in the merge's dtype and device (the network
        standardises them)."""
        return self.extractor(inputs).to(device=self.merger.device, dtype=self.merger.dtype)

    def coefficients(self, features: Tensor) -> Tensor:
        """Per input ``[N, T, G]`` (clipped when ``clamp``)."""
        lam = self.network(features)
        return lam.clamp(0.0, 1.0) if self.clamp else lam

    def logits(self, model: nn.Module, own: Mapping[str, Tensor], inputs, features=None):
        """``model``'s logits on ``inputs``, run on the merge of each batch (or input)."""
        feats = self.features(inputs) if features is None else features
        lam = self.coefficients(feats)
        if self.per == "batch":
            return run_task_model(model, {**own, **self.merger.merged(lam.mean(0))}, inputs)
        rows = [
            run_task_model(model, {**own, **self.merger.merged(lam[i])}, _example(inputs, i))
            for i in range(lam.shape[0])
        ]
        return torch.cat(rows)


def _example(inputs, i: int):
    if isinstance(inputs, Mapping):
        return {k: v[i : i + 1] if isinstance(v, Tensor) else v for k, v in inputs.items()}
    return inputs[i : i + 1]


class AdaptiveMergedModel(nn.Module):
    """Task :math:`k`'s module: model :math:`k` run, batch by batch, on the merge the
    batch's coefficients give (its own head and unmerged parameters kept). Returns logits."""

    def __init__(self, module: nn.Module, adaptive: AdaptiveMerge) -> None:
        super().__init__()
        self.module = module
        self.adaptive = adaptive
        self.own = {n: p.detach() for n, p in module.named_parameters()}

    def forward(self, *args, **kwargs) -> Tensor:
        if kwargs and not args:
            inputs = dict(kwargs)
        elif len(args) == 1 and not kwargs:
            inputs = args[0]
        else:
            raise TypeError("an AdaptiveMergedModel takes one input tensor or keyword inputs")
        with torch.no_grad():
            return self.adaptive.logits(self.module, self.own, inputs)


class WeightEnsemblingObjective(AdaMergingObjective):
    """AdaMerging's entropy objective with every batch's coefficients from the network.

    Computes the (frozen) features of every adaptation batch once. Calling it returns the
    mean over tasks of each task's mean prediction entropy and the per-task means, both
    differentiable in the network's parameters.

    Args:
        models, base, data, granularity, params: As :class:`AdaMergingObjective`.
        network: :math:`g_\\phi`, or ``None``: a new :class:`CoefficientNetwork` standardised
            on the adaptation features, built from ``network_options``.
        features: The feature extractor (see :func:`~curvmerge.merging.features.feature_extractor`);
            named extractors run the base model (if ``base`` is a parameter dict: a copy of
            the first model with the base's parameters).
        per, clamp: As :class:`AdaptiveMerge`.
        network_options: ``hidden``, ``depth``, ``initial``, ``seed`` of a new network.
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        base: Model,
        data: Sequence[Any],
        *,
        granularity: str = "layer",
        params: str | Sequence[str] | None = None,
        network: CoefficientNetwork | None = None,
        features: str | nn.Module | Callable = "penultimate",
        per: str = "batch",
        clamp: bool = True,
        network_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(
            models, base, data, granularity=granularity, params=params,
            method="weight_ensembling",
        )  # fmt: skip
        extractor = feature_extractor(features, _feature_model(models, base))
        # the network comes after the features: a new one is standardised on them
        self.adaptive = AdaptiveMerge(self, None, extractor, per=per, clamp=clamp)
        tic = time.perf_counter()
        self.features = [[self.adaptive.features(x) for x in batches] for batches in self.inputs]
        self.feature_seconds = time.perf_counter() - tic
        dim = int(self.features[0][0].shape[1])
        if network is None:
            network = CoefficientNetwork(
                dim, self.num_models, self.num_groups, dtype=self.dtype, **(network_options or {})
            ).to(self.device)
            network.standardize(torch.cat([f for task in self.features for f in task]))
        else:
            _check_network(network, dim, self.num_models, self.groups)
        self.network = self.adaptive.network = network

    def __call__(self, batches: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
        """The objective and the per-task mean entropies (see
        :meth:`~curvmerge.merging.adamerging.AdaMergingObjective.mean_entropies`), every
        batch merged with its own coefficients."""

        def entropies(t: int, b: int) -> Tensor:
            logits = self.adaptive.logits(
                self.models[t], self.own[t], self.inputs[t][b], self.features[t][b]
            )
            return entropy(logits)

        return self.mean_entropies(entropies, batches)

    def batch_coefficients(self) -> Tensor:
        """Every adaptation batch's coefficients ``[batches, T, G]`` (no gradient)."""
        with torch.no_grad():
            return torch.stack(
                [self.adaptive.coefficients(f).mean(0) for task in self.features for f in task]
            )


def _feature_model(models: Sequence[nn.Module], base: Model) -> nn.Module:
    if isinstance(base, nn.Module):
        return base
    model = copy.deepcopy(models[0])
    own = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in parameters_of(base).items():
            if name in own:
                own[name].copy_(value)
    return model


def _check_network(network, dim: int, T: int, groups: Sequence[Sequence[str]]) -> None:
    if not isinstance(network, CoefficientNetwork):
        raise TypeError(f"network must be a CoefficientNetwork, got {type(network).__name__}")
    want = {"feature_dim": dim, "num_models": T, "num_groups": len(groups)}
    have = {k: getattr(network, k) for k in want}
    if have != want:
        diff = ", ".join(
            f"{k} {have[k]} (these models: {want[k]})" for k in want if have[k] != want[k]
        )
        raise ValueError(f"the coefficient network does not fit these models: {diff}")
    trained = getattr(network, "groups", None)
    if trained is not None:
        for g, (there, here) in enumerate(zip(trained, groups, strict=True)):
            if list(there) != list(here):
                raise ValueError(
                    f"the coefficient network was trained for other merged parameters: group "
                    f"{g} is {list(there)} there, {list(here)} here (select the same "
                    "parameters, with the same granularity, of the same architecture)"
                )


@dataclass
class WeightEnsemblingReport(AdaptationReport):
    """An :class:`~curvmerge.merging.adamerging.AdaptationReport` of a weight-ensembling
    run (its ``cost_ratio`` counts the features' seconds too).

    Attributes:
        network: The network's sizes (:meth:`CoefficientNetwork.config`).
        coefficients: The mean over the adaptation batches of the batch coefficients,
            ``[T][G]``.
        coefficient_spread: Their standard deviation over the batches, ``[T][G]``: how much
            the coefficients adapt to the data.
        feature_seconds: Time of the frozen features of the adaptation inputs.
    """

    network: dict[str, int] = field(default_factory=dict)
    coefficients: list[list[float]] = field(default_factory=list)
    coefficient_spread: list[list[float]] = field(default_factory=list)
    feature_seconds: float = 0.0

    def learned(self) -> dict[str, Any]:
        """:meth:`AdaptationReport.learned` with the spread, the network's sizes and the
        features' seconds (the network itself is saved with :func:`save_coefficient_network`)."""
        return {
            **super().learned(),
            "coefficient_spread": self.coefficient_spread,
            "network": self.network,
            "feature_seconds": self.feature_seconds,
        }

    def __str__(self) -> str:
        o = self.options
        return (
            f"weight ensembling ({o['granularity']}-wise, per {o['per']}, {self.num_models} "
            f"models x {len(self.groups)} groups): {self.steps} Adam steps, entropy "
            f"{self.entropy_before:.4g} -> {self.entropy_after:.4g}, "
            f"{self.cost_ratio:.3g}x one evaluation pass"
        )


@dataclass
class WeightEnsemblingResult(EnsembleResult):
    """One :class:`AdaptiveMergedModel` per task, the report and the trained network.

    Attributes:
        members: ``members[k]`` evaluates task :math:`k`.
        report: A :class:`WeightEnsemblingReport`.
        network: The trained :class:`CoefficientNetwork` (save it with :meth:`save`).
    """

    kind: ClassVar[str] = "adaptive"
    network: CoefficientNetwork | None = None

    def save(self, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
        """Write the network and its groups (:func:`save_coefficient_network`)."""
        save_coefficient_network(
            path, self.network, self.report.groups,
            metadata={"granularity": self.report.options["granularity"], **(metadata or {})},
        )  # fmt: skip


def save_coefficient_network(
    path: str | os.PathLike,
    network: CoefficientNetwork,
    groups: Sequence[Sequence[str]],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Save a :class:`CoefficientNetwork` (weights, feature normalisation, sizes) and the
    parameter names of its groups to a safetensors file, atomically.

    Raises:
        ValueError: ``groups`` does not have one entry per network group, or ``metadata``
            uses a reserved key.
    """
    from safetensors.torch import save

    if not isinstance(network, CoefficientNetwork):
        raise TypeError(f"network must be a CoefficientNetwork, got {type(network).__name__}")
    if len(groups) != network.num_groups:
        raise ValueError(f"{len(groups)} groups for a network with {network.num_groups}")
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    reserved = ("format", "version", "config", "groups", "tensors")
    clash = [k for k in meta if k in reserved]
    if clash:
        raise ValueError(f"metadata key {clash[0]!r} is reserved by the network file format")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in network.state_dict().items()}
    meta.update(
        format=NETWORK_FORMAT,
        version=_VERSION,
        config=json.dumps(network.config()),
        groups=json.dumps([list(g) for g in groups]),
        tensors=json.dumps(sorted(tensors)),
    )
    atomic_write_bytes(path, save(tensors, metadata=meta))


def load_coefficient_network(
    path: str | os.PathLike,
) -> tuple[CoefficientNetwork, list[list[str]], dict[str, str]]:
    """Read what :func:`save_coefficient_network` wrote.

    Returns:
        The network (in its saved dtype, on the CPU), the parameter names of its groups and
        the file's other metadata.

    Raises:
        FileNotFoundError: No such file.
        ValueError: Not a coefficient-network file, or a truncated or corrupt one.
    """
    from curvmerge.statistics.files import read_safetensors

    meta, tensors = read_safetensors(
        path, NETWORK_FORMAT, "coefficient-network", lambda m: json.loads(m["tensors"])
    )
    config = json.loads(meta["config"])
    dtype = tensors["feature_mean"].dtype
    network = CoefficientNetwork(**config, dtype=dtype)
    try:
        network.load_state_dict(tensors)
    except RuntimeError as err:
        raise ValueError(f"{os.fspath(path)!r} is corrupt: {err}") from err
    groups = json.loads(meta["groups"])
    network.groups = [list(g) for g in groups]
    extra = {
        k: v
        for k, v in meta.items()
        if k not in ("format", "version", "config", "groups", "tensors")
    }
    return network, groups, extra


def weight_ensembling(
    models: Sequence[nn.Module],
    base: Model,
    data: Sequence[Any],
    *,
    granularity: str = "layer",
    features: str | nn.Module | Callable = "penultimate",
    network: CoefficientNetwork | None = None,
    hidden: int = 64,
    depth: int = 2,
    steps: int = 500,
    lr: float = 1e-3,
    init: float = 0.3,
    seed: int = 0,
    clamp: bool = True,
    per: str = "batch",
    weights: Sequence[float] | None = None,
    params: str | Sequence[str] | None = None,
    progress: bool = False,
) -> WeightEnsemblingResult:
    """Data-adaptive weight ensembling (Tang et al., IJCV 2025): task arithmetic whose
    coefficients a network computes from each batch's features (see the module doc).

    The network starts at :math:`\\lambda = \\text{init} \\cdot w_t` for every input (task
    arithmetic at that scaling) and takes ``steps`` Adam steps on the mean prediction
    entropy, one batch per task per step (batch orders seeded by ``seed``, as in
    :func:`~curvmerge.merging.adamerging.adamerging`). Only the inputs of the ``(inputs,
    targets)`` batches are read.

    **Zero-shot transfer.** ``network=`` (for example from :func:`load_coefficient_network`)
    applies a trained network to these models: its feature normalisation is kept, it must
    have this pool's number of models, groups and feature size, and ``steps=0`` applies it
    as it is (a copy is used; the given network is never modified).

    **Cost.** The features of every adaptation input are computed once (the extractor is
    frozen). Each step is a forward and backward pass of every task's model over one batch
    plus, per task, one merge :math:`\\theta_0 + \\sum_t \\bar\\lambda_t \\tau_t`; the report
    gives the seconds, the peak memory of the steps and their ratio to one evaluation pass
    over the same inputs.

    Args:
        models: The fine-tuned modules (eval mode, or free of dropout and batch norm).
        base: The base model :math:`\\theta_0`.
        data: One iterable of ``(inputs, targets)`` batches per model, read once.
        granularity: ``"task"`` or ``"layer"`` (one coefficient per model and merged tensor).
        features: ``"penultimate"``, ``"mean_tokens"``, or a frozen module or callable
            (:func:`~curvmerge.merging.features.feature_extractor`).
        network: A trained :class:`CoefficientNetwork` to start from (see above).
        hidden: Hidden width of a new network (a given one keeps its own).
        depth: Hidden layers of a new network (a given one keeps its own).
        steps: Adam steps (>= 0).
        lr: Adam's learning rate.
        init: The initial coefficient of a new network (unused with ``network=``; the report
            then records ``init=None`` and ``network="given"``).
        seed: Seed of a new network's initial weights and of the batch order.
        clamp: Clip each input's coefficients to :math:`[0, 1]`.
        per: ``"batch"`` or ``"input"``.
        weights: Optional per-model multipliers :math:`w_t \\ge 0` of ``init``.
        params: The merged parameters (pass the shared body so each task keeps its head).
        progress: One progress bar over the steps.

    Returns:
        A :class:`WeightEnsemblingResult`: one module per task, the report, the network.

    Raises:
        TypeError: A model is not a module, or ``network`` is not a
            :class:`CoefficientNetwork`.
        ValueError: Bad options, data without one entry per model, a network that does not
            fit the models, outputs that are not class logits.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> base = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> nets = [nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)) for _ in "ab"]
        >>> data = [[(torch.randn(8, 3), None)] for _ in nets]
        >>> out = weight_ensembling(nets, base, data, steps=5, params="^0\\\\.")
        >>> out.task_model(0)(torch.randn(4, 3)).shape
        torch.Size([4, 2])
    """
    start = time.perf_counter()
    steps, lr, init = check_adaptation(steps, lr, init)
    T = len(models) if not isinstance(models, nn.Module) else 1
    w = check_weights(weights, T, 1.0)
    given = network is not None
    if given:
        if not isinstance(network, CoefficientNetwork):
            raise TypeError(f"network must be a CoefficientNetwork, got {type(network).__name__}")
        network = copy.deepcopy(network)  # adapted and moved: the caller's stays as it is
    objective = WeightEnsemblingObjective(
        models, base, data, granularity=granularity, params=params, features=features,
        per=per, clamp=clamp, network=network,
        network_options={
            "hidden": hidden, "depth": depth, "seed": seed,
            "initial": torch.as_tensor(w, dtype=torch.float64).reshape(-1, 1) * init,
        },
    )  # fmt: skip
    net = objective.network.to(device=objective.device, dtype=objective.dtype)

    tic = time.perf_counter()
    with torch.no_grad():
        before, task_before = objective()
    evaluation_seconds = time.perf_counter() - tic

    net.requires_grad_(True)
    history, adaptation_seconds, peak = entropy_steps(
        list(net.parameters()), lambda batches: objective(batches)[0],
        [len(b) for b in objective.inputs], steps=steps,
        lr=lr, seed=seed, desc=f"weight ensembling ({granularity}-wise)", progress=progress,
    )  # fmt: skip
    net.requires_grad_(False)
    net.groups = [list(g) for g in objective.groups]

    tic = time.perf_counter()
    with torch.no_grad():
        after, task_after = objective()
    evaluation_seconds = min(evaluation_seconds, time.perf_counter() - tic)
    lam = objective.batch_coefficients()
    mean = lam.mean(0)
    spread = lam.std(0, unbiased=False)
    report = method_report(
        "weight_ensembling",
        objective.flat,
        mean.mean(1).tolist(),
        start,
        granularity=granularity,
        features=features if isinstance(features, str) else type(features).__name__,
        per=per,
        steps=steps,
        lr=lr,
        init=None if given else init,  # a given network starts where it was trained
        seed=int(seed),
        clamp=bool(clamp),
        hidden=net.hidden,
        depth=net.depth,
        network="given" if given else "new",
    )
    fields = adaptation_fields(
        objective, (before, task_before), (after, task_after), history,
        objective.feature_seconds + adaptation_seconds, evaluation_seconds, peak,
    )  # fmt: skip
    fields["adaptation_seconds"] = adaptation_seconds  # the ratio counts the features too
    report = WeightEnsemblingReport(
        **vars(report),
        **fields,
        network=net.config(),
        coefficients=mean.tolist(),
        coefficient_spread=spread.tolist(),
        feature_seconds=objective.feature_seconds,
    )
    merger = GroupedTaskArithmetic(objective.flat, granularity)  # without the inputs
    adaptive = AdaptiveMerge(merger, net, objective.adaptive.extractor, per=per, clamp=clamp)
    members = [AdaptiveMergedModel(m, adaptive) for m in objective.models]
    report.seconds = time.perf_counter() - start
    return WeightEnsemblingResult(members=members, report=report, network=net)
