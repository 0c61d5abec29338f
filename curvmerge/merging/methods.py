"""Merging methods that are not the curvature equation: task arithmetic, TIES, DARE, SLERP.

Task-vector methods work on :math:`\\tau_t = \\theta_t - \\theta_0`, the difference between a
fine-tuned model and the base :math:`\\theta_0` it was fine-tuned from, and return
:math:`\\theta_0 + \\lambda\\,\\tau_m` for a combined task vector :math:`\\tau_m`.

Every function takes modules or parameter dicts, merges the parameters selected by ``params``
(names or a regex; default: every parameter of the first model) and returns a
:class:`~curvmerge.merging.MergeResult`, exactly like :func:`~curvmerge.merge`, so callers treat
all methods alike. Its ``report`` is a :class:`MethodReport` that also records the method's
options (density, drop rate, seed, ...).

Parameters are combined in flat form, in at least float32, and returned in each parameter's
original dtype and device.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from curvmerge.merging.report import MergeReport, MergeResult, parameters_of
from curvmerge.merging.system import check_weights
from curvmerge.space import ParamSpace

__all__ = [
    "MethodReport",
    "task_arithmetic",
    "ties",
    "dare",
    "slerp",
    "trim_top_k",
    "trim_count",
    "trim_below",
    "ties_disjoint_merge",
    "dare_drop",
    "slerp_vectors",
    # helpers for method modules (not in curvmerge.__all__)
    "FlatModels",
    "flatten_models",
    "method_report",
    "check_finite_scalar",
]

Model = nn.Module | Mapping[str, Tensor]


@dataclass
class MethodReport(MergeReport):
    """A :class:`~curvmerge.merging.MergeReport` plus the method's own options.

    Attributes:
        options: The method's hyper-parameters (``{"density": 0.2, "scaling": 1.0}``, ...).
    """

    options: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        opts = ", ".join(
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.options.items()
        )
        return f"{self.method} merge of {self.num_models} models ({opts})"


# ---------------------------------------------------------------------------------- helpers
def check_finite_scalar(value: float, name: str) -> float:
    """``value`` as a float; ``ValueError`` naming ``name`` unless it is finite."""
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


@dataclass
class FlatModels:
    """Selected parameters of the models (and base) as rows of one matrix.

    Attributes:
        space: The merged parameters (names and shapes, flattening order).
        thetas: ``[T, P]``, one flattened model per row, in at least float32.
        base: ``[P]`` flattened base model, or ``None``.
        reference: The first model's tensors, whose dtype and device outputs take.
    """

    space: ParamSpace
    thetas: Tensor  # [T, P]
    base: Tensor | None  # [P]
    reference: dict[str, Tensor]  # first model's tensors: output dtype and device

    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        out = {}
        for name, value in self.space.unflatten(vec).items():
            ref = self.reference[name]
            out[name] = value.to(device=ref.device, dtype=ref.dtype).clone()
        return out

    @property
    def task_vectors(self) -> Tensor:
        return self.thetas - self.base


def flatten_models(
    thetas: Sequence[Model],
    base: Model | None,
    params: str | Sequence[str] | None,
    *,
    method: str,
    needs_base: bool,
    num_models: int | None = None,
) -> FlatModels:
    """Flatten the ``params`` of ``thetas`` (and ``base``) into a :class:`FlatModels`.

    Checks that there is a non-empty list of models (exactly ``num_models`` if given), that
    they share the first model's space, that a base is given when ``needs_base``, and that
    nothing is NaN or Inf; errors name ``method``.
    """
    if isinstance(thetas, (nn.Module, Mapping)) or not len(thetas):
        raise ValueError(f"{method} needs a non-empty list of models")
    dicts = [parameters_of(t) for t in thetas]
    if num_models is not None and len(dicts) != num_models:
        raise ValueError(f"{method} merges exactly {num_models} models, got {len(dicts)}")
    if needs_base and base is None:
        raise ValueError(
            f"{method} needs the base model theta_0 (the checkpoint the models were "
            "fine-tuned from): pass base=..."
        )
    space = ParamSpace.from_tensors(dicts[0], params)
    for i, d in enumerate(dicts):
        space.check(d, what=f"model {i}")
    dtype = torch.promote_types(dicts[0][space.names[0]].dtype, torch.float32)
    device = dicts[0][space.names[0]].device
    rows = torch.stack([space.flatten(d).to(device=device, dtype=dtype) for d in dicts])
    base_flat = None
    if base is not None:
        base_dict = parameters_of(base)
        untyped = ParamSpace(space.names, space.shapes)  # the base may be stored in another dtype
        untyped.check(base_dict, what="base")
        base_flat = untyped.flatten(base_dict).to(device=device, dtype=dtype)
    for i in range(rows.shape[0]):
        if not bool(torch.isfinite(rows[i]).all()):
            raise ValueError(f"model {i} contains NaN or Inf")
    if base_flat is not None and not bool(torch.isfinite(base_flat).all()):
        raise ValueError("base contains NaN or Inf")
    reference = {n: dicts[0][n] for n in space.names}
    return FlatModels(space, rows, base_flat, reference)


def method_report(
    method: str, flat: FlatModels, weights: list[float], start: float, **options
) -> MethodReport:
    """The :class:`MethodReport` of a method run that started at ``start``
    (``time.perf_counter()``), with ``options`` as the method's hyper-parameters."""
    return MethodReport(
        method=method,
        num_models=flat.thetas.shape[0],
        weights=weights,
        damping=None,
        prior="given" if flat.base is not None else "none",
        seconds=time.perf_counter() - start,
        options=options,
    )


# ---------------------------------------------------------------------------------- methods
def task_arithmetic(
    thetas: Sequence[Model],
    base: Model,
    *,
    scaling: float = 1.0,
    weights: Sequence[float] | None = None,
    params: str | Sequence[str] | None = None,
) -> MergeResult:
    """Task arithmetic (Ilharco et al., "Editing models with task arithmetic", ICLR 2023).

    .. math::

        \\theta = \\theta_0 + \\lambda \\sum_t w_t (\\theta_t - \\theta_0).

    With :math:`\\lambda = 1/T` and :math:`w_t = 1` it is plain averaging; a negative
    ``scaling`` negates the task vectors (forgetting by negation).

    Args:
        thetas: The fine-tuned models (modules or parameter dicts).
        base: The base model :math:`\\theta_0` they were fine-tuned from.
        scaling: :math:`\\lambda`, the scaling of the summed task vectors (tune it on
            validation data; the paper searches 0 to 1).
        weights: Optional per-model coefficients :math:`w_t \\ge 0` (default 1).
        params: Names or a regex selecting the merged parameters (default: all of the first
            model's parameters).

    Returns:
        A :class:`~curvmerge.merging.MergeResult`.

    Example:
        >>> base = {"w": torch.tensor([1.0, 1.0])}
        >>> a, b = {"w": torch.tensor([2.0, 1.0])}, {"w": torch.tensor([1.0, 3.0])}
        >>> task_arithmetic([a, b], base, scaling=0.5).params["w"]
        tensor([1.5000, 2.0000])
    """
    start = time.perf_counter()
    flat = flatten_models(thetas, base, params, method="task_arithmetic", needs_base=True)
    T = flat.thetas.shape[0]
    w = check_weights(weights, T, 1.0)
    scaling = check_finite_scalar(scaling, "scaling")
    coeffs = torch.tensor(w, dtype=flat.thetas.dtype, device=flat.thetas.device)
    merged = flat.base + scaling * (coeffs @ flat.task_vectors)
    report = method_report(
        "task_arithmetic", flat, [scaling * v for v in w], start, scaling=scaling
    )
    return MergeResult(flat.unflatten(merged), report)


def trim_count(n: int, density: float) -> int:
    """How many of ``n`` entries TIES keeps at ``density``: :math:`\\min(n, \\max(1,
    \\lceil \\text{density} \\cdot n \\rceil))`."""
    return min(n, max(1, math.ceil(density * n)))


def trim_below(tau: Tensor, threshold: Tensor | float) -> Tensor:
    """``tau`` with the entries of magnitude below ``threshold`` set to zero (a new tensor)."""
    return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))


def trim_top_k(tau: Tensor, density: float) -> Tensor:
    """Keep the ``ceil(density * n)`` largest-magnitude entries of ``tau``, zero the rest.

    Entries tied with the smallest kept magnitude are kept too, so the result does not depend
    on the order of the entries.
    """
    n = tau.numel()
    k = trim_count(n, density)
    if k == n:
        return tau.clone()
    magnitude = tau.abs()
    threshold = torch.kthvalue(magnitude.reshape(-1).cpu(), n - k + 1).values.to(tau.device)
    return trim_below(tau, threshold)


def ties_disjoint_merge(trimmed: Tensor) -> Tensor:
    """TIES's elect and disjoint-merge steps on trimmed (and weighted) task vectors
    ``[T, ...]``, entry by entry:

    .. math::

        \\gamma = \\operatorname{sign}\\Big(\\sum_t \\hat\\tau_t\\Big), \\quad
        \\tau_m = \\frac{1}{|A|} \\sum_{t \\in A} \\hat\\tau_t, \\quad
        A = \\{t : \\operatorname{sign}(\\hat\\tau_t) = \\gamma \\ne 0\\},

    0 where :math:`A` is empty. Returns ``[...]``.

    Example:
        >>> ties_disjoint_merge(torch.tensor([[1.0, -2.0, 0.0], [3.0, 1.0, 0.0]]))
        tensor([ 2., -2.,  0.])
    """
    elected = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == elected) & (elected != 0)
    count = agree.sum(0)
    total = torch.where(agree, trimmed, torch.zeros_like(trimmed)).sum(0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def ties(
    thetas: Sequence[Model],
    base: Model,
    *,
    density: float = 0.2,
    scaling: float = 1.0,
    weights: Sequence[float] | None = None,
    params: str | Sequence[str] | None = None,
) -> MergeResult:
    """TIES merging (Yadav et al., "TIES-Merging: resolving interference when merging
    models", NeurIPS 2023): trim, elect sign, disjoint merge.

    1. **Trim**: keep the top ``density`` fraction of each task vector by magnitude
       (over all merged parameters at once), :math:`\\hat\\tau_t`; with ``weights``,
       :math:`\\hat\\tau_t \\leftarrow w_t \\hat\\tau_t`.
    2. **Elect**: :math:`\\gamma = \\operatorname{sign}(\\sum_t \\hat\\tau_t)` per entry.
    3. **Disjoint merge**: average, per entry, only the task vectors that agree with the
       elected sign,

    .. math::

        \\tau_m^p = \\frac{1}{|A^p|} \\sum_{t \\in A^p} \\hat\\tau_t^p, \\quad
        A^p = \\{t : \\operatorname{sign}(\\hat\\tau_t^p) = \\gamma^p \\ne 0\\},

    (0 where :math:`A^p` is empty), and :math:`\\theta = \\theta_0 + \\lambda \\tau_m`.

    Args:
        thetas: The fine-tuned models.
        base: The base model :math:`\\theta_0`.
        density: Fraction :math:`k \\in (0, 1]` of entries kept per task vector (paper: 0.2).
        scaling: :math:`\\lambda` (paper: tuned on validation, 1 is a good default).
        weights: Optional per-model multipliers of the trimmed task vectors (default 1).
        params: Names or a regex selecting the merged parameters.

    Returns:
        A :class:`~curvmerge.merging.MergeResult`.

    Example:
        >>> base = {"w": torch.zeros(3)}
        >>> a = {"w": torch.tensor([1.0, -2.0, 0.5])}
        >>> b = {"w": torch.tensor([3.0, 1.0, -0.1])}
        >>> ties([a, b], base, density=1.0).params["w"]
        tensor([ 2.0000, -2.0000,  0.5000])
    """
    start = time.perf_counter()
    flat = flatten_models(thetas, base, params, method="ties", needs_base=True)
    T = flat.thetas.shape[0]
    density = check_finite_scalar(density, "density")
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    scaling = check_finite_scalar(scaling, "scaling")
    w = check_weights(weights, T, 1.0)
    tau = flat.task_vectors
    trimmed = torch.stack([w[t] * trim_top_k(tau[t], density) for t in range(T)])
    merged = flat.base + scaling * ties_disjoint_merge(trimmed)
    report = method_report(
        "ties", flat, [scaling * v for v in w], start, density=density, scaling=scaling
    )
    return MergeResult(flat.unflatten(merged), report)


def dare_drop(tau: Tensor, drop_rate: float, generator: torch.Generator) -> Tensor:
    """Drop each entry of ``tau`` with probability ``drop_rate``, rescale the rest.

    .. math::

        \\tilde\\tau = \\frac{(1 - m) \\odot \\tau}{1 - p}, \\quad m_i \\sim
        \\operatorname{Bernoulli}(p),

    so :math:`\\mathbb{E}[\\tilde\\tau] = \\tau`. The mask is drawn on the CPU from
    ``generator``, so a seed gives the same mask on every device.
    """
    if drop_rate == 0:
        return tau.clone()
    keep = torch.rand(tau.shape, generator=generator, dtype=torch.float64) >= drop_rate
    keep = keep.to(tau.device)
    return torch.where(keep, tau / (1.0 - drop_rate), torch.zeros_like(tau))


def dare(
    thetas: Sequence[Model],
    base: Model,
    *,
    drop_rate: float = 0.5,
    scaling: float = 1.0,
    weights: Sequence[float] | None = None,
    seed: int = 0,
    combine: str = "task_arithmetic",
    density: float = 0.2,
    params: str | Sequence[str] | None = None,
) -> MergeResult:
    """DARE (Yu et al., "Language models are Super Mario: absorbing abilities from homologous
    models as a free lunch", ICML 2024): drop and rescale each task vector, then combine.

    Each task vector is sparsified by :func:`dare_drop` (unbiased: its expectation is the
    task vector), then combined by task arithmetic,
    :math:`\\theta = \\theta_0 + \\lambda \\sum_t w_t \\tilde\\tau_t`, or by TIES
    (``combine="ties"``, DARE-TIES).

    Args:
        thetas: The fine-tuned models.
        base: The base model :math:`\\theta_0`.
        drop_rate: Drop probability :math:`p \\in [0, 1)`. The paper drops up to 90% of the
            delta of large language models; small models tolerate less.
        scaling: :math:`\\lambda`.
        weights: Optional per-model coefficients (default 1).
        seed: Seed of the masks (drawn in model order from one generator).
        combine: ``"task_arithmetic"`` or ``"ties"``.
        density: TIES trim density (``combine="ties"`` only).
        params: Names or a regex selecting the merged parameters.

    Returns:
        A :class:`~curvmerge.merging.MergeResult`; the same seed gives the same result.

    Example:
        >>> base = {"w": torch.zeros(4)}
        >>> a = {"w": torch.ones(4)}
        >>> dare([a], base, drop_rate=0.0).params["w"]
        tensor([1., 1., 1., 1.])
    """
    start = time.perf_counter()
    flat = flatten_models(thetas, base, params, method="dare", needs_base=True)
    T = flat.thetas.shape[0]
    drop_rate = check_finite_scalar(drop_rate, "drop_rate")
    if not 0 <= drop_rate < 1:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
    scaling = check_finite_scalar(scaling, "scaling")
    w = check_weights(weights, T, 1.0)
    if combine not in ("task_arithmetic", "ties"):
        raise ValueError(f"combine must be 'task_arithmetic' or 'ties', got {combine!r}")
    generator = torch.Generator().manual_seed(int(seed))
    tau = flat.task_vectors
    dropped = torch.stack([dare_drop(tau[t], drop_rate, generator) for t in range(T)])
    sparse = [
        {n: v for n, v in flat.space.unflatten(flat.base + dropped[t]).items()} for t in range(T)
    ]
    base_dict = flat.space.unflatten(flat.base)
    if combine == "ties":
        inner = ties(sparse, base_dict, density=density, scaling=scaling, weights=w)
        options = {
            "drop_rate": drop_rate,
            "seed": int(seed),
            "combine": combine,
            "density": density,
            "scaling": scaling,
        }
    else:
        inner = task_arithmetic(sparse, base_dict, scaling=scaling, weights=w)
        options = {
            "drop_rate": drop_rate,
            "seed": int(seed),
            "combine": combine,
            "scaling": scaling,
        }
    merged = flat.space.flatten(inner.params)
    report = method_report("dare", flat, [scaling * v for v in w], start, **options)
    return MergeResult(flat.unflatten(merged), report)


def slerp_vectors(v0: Tensor, v1: Tensor, t: float, eps: float = 1e-7) -> Tensor:
    """Spherical interpolation of directions, linear interpolation of norms.

    .. math::

        \\operatorname{slerp}(v_0, v_1; t) = \\big((1-t)\\|v_0\\| + t\\|v_1\\|\\big)
        \\frac{\\sin((1-t)\\Omega)\\,\\hat v_0 + \\sin(t\\Omega)\\,\\hat v_1}{\\sin\\Omega},
        \\quad \\cos\\Omega = \\hat v_0 \\cdot \\hat v_1,

    with :math:`\\hat v = v/\\|v\\|` (Shoemake, "Animating rotation with quaternion curves",
    SIGGRAPH 1985). For vectors of equal norm it is the classic slerp, which keeps the norm
    that linear interpolation shrinks. Falls back to linear interpolation when a vector is zero
    or the two are (anti)parallel within ``eps``, where the great circle is undefined.
    """
    n0, n1 = torch.linalg.vector_norm(v0), torch.linalg.vector_norm(v1)
    lerp = (1 - t) * v0 + t * v1
    if float(n0) == 0 or float(n1) == 0:
        return lerp
    u0, u1 = v0 / n0, v1 / n1
    cos = torch.clamp((u0 * u1).sum(), -1.0, 1.0)
    if float(cos.abs()) > 1 - eps:
        return lerp
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    direction = (torch.sin((1 - t) * omega) * u0 + torch.sin(t * omega) * u1) / sin
    return ((1 - t) * n0 + t * n1) * direction


def slerp(
    thetas: Sequence[Model],
    *,
    t: float | None = None,
    weights: Sequence[float] | None = None,
    base: Model | None = None,
    per_tensor: bool = True,
    params: str | Sequence[str] | None = None,
) -> MergeResult:
    """Spherical linear interpolation of two models (see :func:`slerp_vectors`).

    .. math::

        \\theta = \\theta_0 + \\operatorname{slerp}(\\theta_1 - \\theta_0,
        \\theta_2 - \\theta_0; t),

    with :math:`\\theta_0 = 0` when no ``base`` is given. ``t = 0`` gives the first model,
    ``t = 1`` the second.

    Args:
        thetas: Exactly two models.
        t: Interpolation position in :math:`[0, 1]` (default 0.5).
        weights: Alternative to ``t`` so that SLERP sweeps like the other methods:
            :math:`(w_1, w_2)` means :math:`t = w_2 / (w_1 + w_2)`.
        base: Optional base model: interpolate task vectors instead of parameters.
        per_tensor: Interpolate each parameter tensor separately (the common practice for
            networks), or the whole flattened vector at once.
        params: Names or a regex selecting the merged parameters.

    Returns:
        A :class:`~curvmerge.merging.MergeResult`.

    Example:
        >>> a, b = {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}
        >>> slerp([a, b], t=0.5).params["w"]
        tensor([0.7071, 0.7071])
    """
    start = time.perf_counter()
    flat = flatten_models(thetas, base, params, method="slerp", needs_base=False, num_models=2)
    if t is not None and weights is not None:
        raise ValueError("slerp takes t or weights, not both")
    if weights is not None:
        w = check_weights(weights, 2, 0.5)
        t = w[1] / (w[0] + w[1])
    t = 0.5 if t is None else check_finite_scalar(t, "t")
    if not 0 <= t <= 1:
        raise ValueError(f"t must be in [0, 1], got {t}")
    origin = flat.base if flat.base is not None else torch.zeros_like(flat.thetas[0])

    def interpolate(sl) -> Tensor:  # in float64: float32 arccos near +-1 loses the angle
        o = origin[sl].double()
        v0, v1 = flat.thetas[0][sl].double() - o, flat.thetas[1][sl].double() - o
        return (o + slerp_vectors(v0, v1, t)).to(flat.thetas.dtype)

    if per_tensor:
        merged = torch.cat([interpolate(sl) for sl in flat.space.slices().values()])
    else:
        merged = interpolate(slice(None))
    report = method_report("slerp", flat, [1 - t, t], start, t=t, per_tensor=per_tensor)
    return MergeResult(flat.unflatten(merged), report)
