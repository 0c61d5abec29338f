"""Spherical merging of more than two models: sequential SLERP and the spherical barycenter.

:func:`~curvmerge.merging.methods.slerp` interpolates two models along a great circle. With
:math:`T > 2` models there are two ways to go on:

- :func:`slerp_sequential` chains pairwise SLERPs with cumulative weights (the "pairwise"
  baseline); it depends on the order of the models;
- :func:`spherical_barycenter` takes the weighted Fréchet (Karcher) mean of the directions on
  the unit sphere, which is symmetric in the models and reduces to SLERP for two.

Both work on :math:`v_t = \\theta_t - \\theta_0` when a ``base`` is given (task vectors) and on
the parameters themselves otherwise, per tensor (the common practice) or on the whole
flattened vector, and return :math:`\\theta_0 + v`.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from curvmerge.merging.methods import (
    Model,
    check_finite_scalar,
    flatten_models,
    method_report,
    slerp_vectors,
)
from curvmerge.merging.report import ConvergenceWarning, MergeResult
from curvmerge.merging.system import check_weights

__all__ = ["slerp_sequential", "spherical_barycenter", "karcher_mean"]

# A weighted mean of unit directions shorter than this: the points balance around the origin
# (two opposite points, points spread evenly on a circle) and have no unique spherical mean.
_BALANCED = 1e-8
# Sines below this are zero angles (cos > 0) or antipodes (cos < 0) in float64.
_TINY_SINE = 1e-12


def _normalized(weights: list[float]) -> list[float]:
    total = sum(weights)
    return [v / total for v in weights]


def _segments(flat, per_tensor: bool) -> list[tuple[str, slice]]:
    """``(label, slice)`` of each merged piece: every tensor, or the whole flat vector."""
    if per_tensor:
        return [(f"tensor {name!r}", sl) for name, sl in flat.space.slices().items()]
    return [("the flattened parameters", slice(0, flat.space.size))]


# ---------------------------------------------------------------------------------- sequential
def slerp_sequential(
    thetas: Sequence[Model],
    *,
    weights: Sequence[float] | None = None,
    base: Model | None = None,
    per_tensor: bool = True,
    params: str | Sequence[str] | None = None,
) -> MergeResult:
    """Sequential pairwise SLERP of :math:`T` models with cumulative weights.

    .. math::

        m_1 = v_1, \\qquad m_k = \\operatorname{slerp}\\Big(m_{k-1}, v_k;\\;
        t_k = \\frac{w_k}{w_1 + \\dots + w_k}\\Big), \\qquad \\theta = \\theta_0 + m_T,

    with :func:`~curvmerge.merging.methods.slerp_vectors` (great-circle direction, linearly
    interpolated norm). Each step gives the new model its share of the weight so far, as in
    a running mean: for two models it is :func:`~curvmerge.merging.methods.slerp` with
    :math:`t = w_2 / (w_1 + w_2)`, and on a line (parallel vectors) it is the weighted mean.
    On the sphere it depends on the order of the models, unlike
    :func:`spherical_barycenter`. Models of weight 0 are skipped. Computed in float64 (in
    float32, the angle between nearly opposite vectors, and with it the result, is off by
    percents), returned in each parameter's dtype.

    Args:
        thetas: The models (one or more).
        weights: Optional per-model weights :math:`w_t \\ge 0` (default equal).
        base: Optional base model :math:`\\theta_0`: interpolate task vectors
            :math:`v_t = \\theta_t - \\theta_0` instead of the parameters.
        per_tensor: Interpolate each parameter tensor separately, or the whole flattened
            vector at once.
        params: Names or a regex selecting the merged parameters.

    Returns:
        A :class:`~curvmerge.merging.MergeResult`; its report's weights are the normalised
        :math:`w_t / \\sum_s w_s`.

    Example:
        >>> a, b = {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}
        >>> slerp_sequential([a, b]).params["w"]
        tensor([0.7071, 0.7071])
    """
    start = time.perf_counter()
    flat = flatten_models(thetas, base, params, method="slerp_sequential", needs_base=False)
    T = flat.thetas.shape[0]
    w = check_weights(weights, T, 1.0)
    origin = flat.base if flat.base is not None else torch.zeros_like(flat.thetas[0])
    order = [t for t in range(T) if w[t] > 0]
    pieces = []
    for _, sl in _segments(flat, per_tensor):
        vectors = flat.thetas[:, sl] - origin[sl]
        if len(order) == 1:  # one model carries all the weight: return it exactly
            pieces.append(vectors[order[0]])
            continue
        v = vectors.to(torch.float64)  # the angle of nearly opposite float32 vectors
        current, cumulative = v[order[0]], w[order[0]]
        for t in order[1:]:
            cumulative += w[t]
            current = slerp_vectors(current, v[t], w[t] / cumulative)
        pieces.append(current.to(vectors.dtype))
    merged = torch.cat(pieces) if pieces else torch.zeros_like(origin)
    report = method_report("slerp_sequential", flat, _normalized(w), start, per_tensor=per_tensor)
    return MergeResult(flat.unflatten(origin + merged), report)


# ---------------------------------------------------------------------------------- barycenter
def karcher_mean(
    directions: Tensor, weights: Tensor, *, tol: float = 1e-10, maxiter: int = 100
) -> tuple[Tensor | None, int, bool]:
    """Weighted Fréchet (Karcher) mean of unit vectors on the sphere.

    The fixed-point iteration of Buss & Fillmore ("Spherical averages and applications to
    spherical splines and interpolation", ACM Trans. Graph. 2001), started at the normalised
    linear mean :math:`x_0 \\propto \\sum_i w_i u_i`:

    .. math::

        g = \\sum_i w_i \\log_x(u_i), \\quad
        \\log_x(u) = \\frac{\\vartheta}{\\sin\\vartheta}\\,(u - \\cos\\vartheta\\, x),
        \\quad \\vartheta = \\angle(x, u), \\qquad
        x \\leftarrow \\cos\\|g\\|\\, x + \\sin\\|g\\| \\frac{g}{\\|g\\|},

    until :math:`\\|g\\| <` ``tol``; :math:`g = 0` is the optimality condition of
    :math:`\\min_x \\sum_i w_i \\vartheta_i(x)^2`. Angles are computed as
    :math:`\\operatorname{atan2}(\\sin, \\cos)`, accurate for small ones.

    Args:
        directions: ``[N, n]`` unit vectors :math:`u_i`.
        weights: ``[N]`` positive weights summing to 1.
        tol: Stop when the tangent step :math:`\\|g\\|` is below it.
        maxiter: At most this many steps.

    Returns:
        ``(x, steps, converged)``; ``x`` is ``None`` when the mean is not unique: the
        linear mean has norm below ``1e-8`` (points balanced around the origin) or an
        iterate is antipodal to one of the points.

    Example:
        >>> u = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> x, steps, ok = karcher_mean(u, torch.tensor([0.5, 0.5], dtype=torch.float64))
        >>> x, ok
        (tensor([0.7071, 0.7071], dtype=torch.float64), True)
    """
    mean = weights @ directions
    norm = float(torch.linalg.vector_norm(mean))
    if norm < _BALANCED:
        return None, 0, False
    x = mean / norm
    for step in range(maxiter + 1):
        cos = directions @ x
        sin = torch.sqrt(torch.clamp(1 - cos * cos, min=0))
        near = cos * cos > 0.5  # 1 - cos^2 cancels: sin from the orthogonal part itself
        if bool(near.any()):
            ortho = directions[near] - cos[near, None] * x[None, :]
            sin[near] = torch.linalg.vector_norm(ortho, dim=1)
        if bool(((sin < _TINY_SINE) & (cos < 0)).any()):
            return None, step, False
        angle = torch.atan2(sin, cos)
        coef = weights * torch.where(sin < _TINY_SINE, torch.ones_like(sin), angle / sin)
        g = coef @ directions - (coef @ cos) * x  # sum_i coef_i (u_i - cos_i x)
        g = g - (g @ x) * x  # keep the step tangent despite rounding
        size = float(torch.linalg.vector_norm(g))
        if size < tol:
            return x, step, True
        if step == maxiter:
            break
        x = math.cos(size) * x + (math.sin(size) / size) * g
        x = x / torch.linalg.vector_norm(x)
    return x, maxiter, False


def spherical_barycenter(
    thetas: Sequence[Model],
    *,
    weights: Sequence[float] | None = None,
    base: Model | None = None,
    per_tensor: bool = True,
    tol: float = 1e-10,
    maxiter: int = 100,
    params: str | Sequence[str] | None = None,
) -> MergeResult:
    """Weighted spherical barycenter: the Karcher mean of the directions, the mean norm.

    With :math:`v_t = \\theta_t - \\theta_0` (task vectors) when a ``base`` is given, the
    parameters otherwise, directions :math:`u_t = v_t / \\|v_t\\|` and normalised weights
    :math:`\\bar w_t = w_t / \\sum_s w_s`,

    .. math::

        v = \\Big(\\sum_t \\bar w_t \\|v_t\\|\\Big)\\,
        \\operatorname*{arg\\,min}_{\\|x\\| = 1} \\sum_t \\bar w_t\\, \\angle(x, u_t)^2,
        \\qquad \\theta = \\theta_0 + v,

    the weighted Fréchet mean on the unit sphere computed by :func:`karcher_mean` (Buss &
    Fillmore 2001) times the weighted mean norm. For two models with weights
    :math:`(1-t, t)` it is :func:`~curvmerge.merging.methods.slerp` at :math:`t`; it does not
    depend on the order of the models. The mean is unique when the directions lie in an open
    hemisphere (task vectors of a shared base usually do: their cosines are rarely negative);
    for points spread wider the iteration stops at a local Fréchet mean (a stationary point
    of the weighted squared-angle sum), which depends on the start.

    Degenerate tensors never give NaN:

    - zero vectors (and models of weight 0) have no direction: they are left out of the
      direction mean but count, with norm 0, in the mean norm (as :func:`slerp` does for
      one zero vector); if every vector is zero the result is zero;
    - directions with no unique mean (opposite vectors of equal weight, points balanced
      around the origin, an iterate antipodal to a point) fall back to the linear weighted
      mean :math:`\\sum_t \\bar w_t v_t`; the report counts these tensors.

    Computed in float64 per tensor (or on the whole vector), returned in each parameter's
    dtype.

    Args:
        thetas: The models (one or more).
        weights: Optional per-model weights :math:`w_t \\ge 0` (default equal).
        base: Optional base model :math:`\\theta_0`: average task vectors instead of
            parameters.
        per_tensor: One barycenter per parameter tensor, or one on the whole flattened
            vector.
        tol: Stop when the tangent step (radians) is below it.
        maxiter: At most this many steps per tensor.
        params: Names or a regex selecting the merged parameters.

    Returns:
        A :class:`~curvmerge.merging.MergeResult`; the report's options hold
        ``iterations`` (the most over tensors), ``converged`` (all tensors) and
        ``linear_fallbacks`` (how many tensors fell back to the linear mean).

    Warns:
        ConvergenceWarning: Naming each tensor that did not converge within ``maxiter``
            (its last iterate is used).

    Example:
        >>> a, b = {"w": torch.tensor([2.0, 0.0])}, {"w": torch.tensor([0.0, 2.0])}
        >>> spherical_barycenter([a, b]).params["w"]
        tensor([1.4142, 1.4142])
    """
    start = time.perf_counter()
    flat = flatten_models(thetas, base, params, method="spherical_barycenter", needs_base=False)
    T = flat.thetas.shape[0]
    w = _normalized(check_weights(weights, T, 1.0))
    tol = check_finite_scalar(tol, "tol")
    if tol <= 0:
        raise ValueError(f"tol must be positive, got {tol}")
    if isinstance(maxiter, bool) or int(maxiter) != maxiter or maxiter < 1:
        raise ValueError(f"maxiter must be a positive integer, got {maxiter!r}")
    maxiter = int(maxiter)
    origin = flat.base if flat.base is not None else torch.zeros_like(flat.thetas[0])
    weight = torch.tensor(w, dtype=torch.float64, device=origin.device)
    only = [t for t in range(T) if w[t] > 0]
    iterations, converged, fallbacks, pieces = 0, True, 0, []
    for label, sl in _segments(flat, per_tensor):
        vectors = flat.thetas[:, sl] - origin[sl]
        if len(only) == 1:  # one model carries all the weight: return it exactly
            pieces.append(vectors[only[0]])
            continue
        v = vectors.to(torch.float64)
        norms = torch.linalg.vector_norm(v, dim=1)
        alive = (norms > 0) & (weight > 0)
        mean_norm = weight @ norms
        if not bool(alive.any()):
            pieces.append(torch.zeros_like(vectors[0]))
            continue
        u = v[alive] / norms[alive, None]
        wa = weight[alive] / weight[alive].sum()
        x, steps, ok = karcher_mean(u, wa, tol=tol, maxiter=maxiter)
        iterations = max(iterations, steps)
        if x is None:
            fallbacks += 1
            pieces.append((weight @ v).to(vectors.dtype))
            continue
        if not ok:
            converged = False
            warnings.warn(
                f"spherical_barycenter: {label} did not converge in {maxiter} steps "
                f"(tol={tol:g}); using the last iterate",
                ConvergenceWarning,
                stacklevel=2,
            )
        pieces.append((mean_norm * x).to(vectors.dtype))
    merged = torch.cat(pieces) if pieces else torch.zeros_like(origin)
    report = method_report(
        "spherical_barycenter",
        flat,
        w,
        start,
        per_tensor=per_tensor,
        tol=tol,
        maxiter=maxiter,
        iterations=iterations,
        converged=converged,
        linear_fallbacks=fallbacks,
    )
    return MergeResult(flat.unflatten(origin + merged), report)
