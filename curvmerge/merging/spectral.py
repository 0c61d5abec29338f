"""Spectral task-vector merging: TSV-M, Iso-C and Iso-CTS.

These methods merge each weight matrix through the singular value decompositions of the task
matrices :math:`\\Delta_t = w_t(\\theta_t - \\theta_0)` (restricted to one layer), instead of
adding them entry by entry:

- :func:`tsv_merge` (TSV-M) keeps the top singular triplets of every task and decorrelates
  the tasks' singular vectors before summing them;
- :func:`iso_c` flattens the spectrum of the summed task matrix :math:`\\Delta_{TA}`;
- :func:`iso_cts` does the same on a basis made of :math:`\\Delta_{TA}`'s top directions and
  each task's own directions outside them.

A parameter with two or more dimensions is a matrix ``[out, -1]`` (linear weights; convolution
kernels reshaped). Other parameters (biases, norms, scalars) have no spectrum and fall back to
the average of the task vectors (``vector_merge="mean"``, what the authors' code does) or to
their sum (``"sum"``, task arithmetic). Every method returns :math:`\\theta_0 + \\lambda
\\Delta` with :math:`\\lambda` = ``scaling``.

Singular triplets whose value is numerically zero,
:math:`\\sigma \\le \\max(m, n)\\,\\epsilon\\,\\sigma_{\\max}` (the default tolerance of
:func:`torch.linalg.matrix_rank` in the working dtype; :math:`\\sigma_{\\max}` is the largest
singular value of the task matrices, or of :math:`\\Delta_{TA}`, in play), span no direction
of the data: any orthonormal completion is an equally valid SVD. They are dropped everywhere,
so that a layer a task left unchanged, or a low-rank (LoRA) task matrix, neither rotates the
other tasks' directions (TSV-M) nor receives the isotropic singular value (Iso-C, Iso-CTS).
On task matrices of full numerical rank this changes nothing; pass float64 models to keep
every singular value above float64's tolerance. For the same reason the whitening
(:func:`orthogonalize`) of concatenated singular vectors that are linearly dependent (tasks
that share a direction, two copies of one model) keeps their range only.

Computation runs per matrix in the models' dtype promoted to at least float32; the result
has each parameter's dtype and device.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from curvmerge.merging.methods import (
    FlatModels,
    Model,
    check_finite_scalar,
    flatten_models,
    method_report,
)
from curvmerge.merging.report import MergeResult
from curvmerge.merging.system import check_weights

__all__ = ["tsv_merge", "iso_c", "iso_cts", "orthogonalize", "iso_cts_ranks"]

_VECTOR_MERGES = ("mean", "sum")


# ---------------------------------------------------------------------------------- helpers
def orthogonalize(a: Tensor) -> Tensor:
    """The orthogonal polar factor of ``a``: :math:`P_r Q_r^\\top` for the SVD
    :math:`a = P S Q^\\top` restricted to the :math:`r` numerically non-zero singular values
    (above :math:`\\max(m, n)\\,\\epsilon\\, s_{\\max}`, as :func:`torch.linalg.matrix_rank`).

    .. math::

        \\operatorname{orthogonalize}(a) = a\\,(a^\\top a)^{+1/2} = P_r Q_r^\\top .

    For a full-rank ``a`` it is the matrix with orthonormal columns (rows, when ``a`` is
    wide) closest to ``a`` in Frobenius norm (the "whitening" of TSV-M); columns that are
    already orthonormal are returned unchanged. For a rank-deficient ``a`` (tasks that
    share a singular vector) it is the partial isometry on ``a``'s range: the singular
    vectors of zero singular values are any orthonormal completion (the LAPACK routine's
    choice), and would add directions that ``a`` does not have.

    Example:
        >>> a = torch.tensor([[2.0, 0.0], [0.0, 0.5]])
        >>> orthogonalize(a)
        tensor([[1., 0.],
                [0., 1.]])
        >>> orthogonalize(torch.tensor([[1.0, 1.0], [0.0, 0.0]]))  # rank one
        tensor([[0.7071, 0.7071],
                [0.0000, 0.0000]])
    """
    if a.numel() == 0:
        return a.clone()
    p, s, qh = torch.linalg.svd(a, full_matrices=False)
    keep = s > max(a.shape[-2:]) * torch.finfo(a.dtype).eps * s[0]
    return p[:, keep] @ qh[keep]


def _check_fraction(value: float | None, name: str) -> float | None:
    if value is None:
        return None
    value = check_finite_scalar(value, name)
    if not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return value


def _check_vector_merge(vector_merge: str) -> str:
    if vector_merge not in _VECTOR_MERGES:
        raise ValueError(f"vector_merge must be 'mean' or 'sum', got {vector_merge!r}")
    return vector_merge


def _floor(x: float) -> int:
    """``floor(x)`` that does not lose an integer to rounding (``(1/7) * 14``)."""
    return math.floor(x + 1e-9)


def _zero_tolerance(mats: Tensor, singular_values: Tensor) -> float:
    """Numerical-rank tolerance for the singular values of the task matrices ``[T, m, n]``.

    ``max(m, n) * eps * sigma_ref`` (the default of :func:`torch.linalg.matrix_rank`), with
    ``sigma_ref`` the largest of ``singular_values`` and of the lower bounds
    :math:`\\|\\Delta_t\\|_F / \\sqrt{\\min(m, n)}` of the tasks' top singular values (so that
    the rounding noise left by tasks that cancel is not taken for a direction).
    """
    m, n = mats.shape[-2:]
    lower = torch.linalg.matrix_norm(mats).max() / math.sqrt(min(m, n))
    scale = max(float(lower), float(singular_values.max()) if singular_values.numel() else 0.0)
    return max(m, n) * torch.finfo(mats.dtype).eps * scale


def _spectral_merge(
    flat: FlatModels, weights: list[float], vector_merge: str, merge_matrix
) -> Tensor:
    """The merged task vector ``[P]``: ``merge_matrix([T, m, n]) -> [m, n]`` on the weighted
    task matrices :math:`w_t(\\theta_t - \\theta_0)` of each matrix parameter, mean or sum of
    the weighted task vectors elsewhere."""
    T = flat.thetas.shape[0]
    coeffs = torch.tensor(weights, dtype=flat.thetas.dtype, device=flat.thetas.device)
    merged = torch.empty_like(flat.base)
    slices = flat.space.slices()
    for name, shape in flat.space:
        sl = slices[name]
        block = coeffs[:, None] * (flat.thetas[:, sl] - flat.base[sl])  # [T, numel]
        if len(shape) >= 2 and block.shape[1] > 0:
            merged[sl] = merge_matrix(block.reshape(T, shape[0], -1)).reshape(-1)
        else:
            total = block.sum(0)
            merged[sl] = total / T if vector_merge == "mean" else total
    return merged


def _spectral_method(
    method: str,
    thetas: Sequence[Model],
    base: Model,
    params: str | Sequence[str] | None,
    weights: Sequence[float] | None,
    scaling: float,
    vector_merge: str,
    matrix_merge,
) -> MergeResult:
    """The shared frame of the spectral methods: checks, :func:`_spectral_merge` with the
    merge ``matrix_merge(T)`` returns, :math:`\\theta_0 + \\lambda \\Delta` and the report.

    ``matrix_merge(T)`` gets the number of models and returns ``(merge_matrix, options)``:
    the function ``[T, m, n] -> [m, n]`` and the method's own report options."""
    start = time.perf_counter()
    flat = flatten_models(thetas, base, params, method=method, needs_base=True)
    T = flat.thetas.shape[0]
    w = check_weights(weights, T, 1.0)
    scaling = check_finite_scalar(scaling, "scaling")
    vector_merge = _check_vector_merge(vector_merge)
    merge_matrix, options = matrix_merge(T)
    merged = _spectral_merge(flat, w, vector_merge, merge_matrix)
    report = method_report(
        method,
        flat,
        [scaling * v for v in w],
        start,
        scaling=scaling,
        **options,
        vector_merge=vector_merge,
    )
    return MergeResult(flat.unflatten(flat.base + scaling * merged), report)


def _concat_triplets(parts: list[tuple[Tensor, Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    """Concatenate ``(U [m, k], s [k], Vh [k, n])`` triplets, orthogonalise U and V."""
    u = torch.cat([p[0] for p in parts], dim=1)
    s = torch.cat([p[1] for p in parts])
    vh = torch.cat([p[2] for p in parts], dim=0)
    return orthogonalize(u), s, orthogonalize(vh)


# ---------------------------------------------------------------------------------- methods
def tsv_merge(
    thetas: Sequence[Model],
    base: Model,
    *,
    scaling: float = 1.0,
    rank_fraction: float | None = None,
    vector_merge: str = "mean",
    weights: Sequence[float] | None = None,
    params: str | Sequence[str] | None = None,
) -> MergeResult:
    """TSV-M (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model
    Merging", CVPR 2025).

    Per matrix, each task matrix :math:`\\Delta_t = w_t(\\theta_t-\\theta_0) = U_t S_t
    V_t^\\top` keeps its top :math:`k = \\lfloor f \\min(m, n) \\rfloor` singular triplets
    (at least one; :math:`f` = ``rank_fraction``, default :math:`1/T`). The kept vectors are
    concatenated, :math:`U = [U_1^k \\cdots U_T^k]`, :math:`S = \\operatorname{blockdiag}
    (S_1^k, \\dots, S_T^k)`, :math:`V = [V_1^k \\cdots V_T^k]`, and decorrelated by their
    orthogonal polar factors (:func:`orthogonalize`, :math:`U_\\perp = P Q^\\top` for
    :math:`U = P \\Sigma Q^\\top`):

    .. math::

        \\Delta = U_\\perp S V_\\perp^\\top, \\qquad \\theta = \\theta_0 + \\lambda \\Delta.

    Tasks whose kept singular vectors are already orthogonal to each other's are summed
    exactly (:math:`\\Delta = \\sum_t \\Delta_t` when the kept triplets are the tasks' full
    SVDs). Numerically zero triplets are dropped (see the module docstring). Non-matrix
    parameters: mean (default, as in the authors' code) or sum of the task vectors.

    Args:
        thetas: The fine-tuned models (modules or parameter dicts).
        base: The base model :math:`\\theta_0` they were fine-tuned from.
        scaling: :math:`\\lambda` (the paper uses 1).
        rank_fraction: :math:`f \\in (0, 1]`, the fraction of each matrix's rank kept per
            task (default :math:`1/T`: :math:`\\lfloor r/T \\rfloor` triplets per task,
            which fill at most the rank :math:`r`). At least one triplet is kept per task,
            so with :math:`fT > 1`, or a matrix of rank :math:`r < T`, the concatenated
            vectors outnumber the dimensions and the polar factors are no longer
            isometries (a ``[1, n]`` matrix of :math:`T` tasks with orthogonal rows merges
            to :math:`\\sum_t \\Delta_t / \\sqrt{T}`).
        vector_merge: ``"mean"`` or ``"sum"`` of the task vectors for parameters that are
            not matrices.
        weights: Optional per-model multipliers :math:`w_t \\ge 0` of the task vectors
            (default 1).
        params: Names or a regex selecting the merged parameters (default: all of the first
            model's parameters).

    Returns:
        A :class:`~curvmerge.merging.MergeResult`; its report's options hold ``scaling``,
        ``rank_fraction`` (the value used) and ``vector_merge``.

    Example:
        >>> base = {"w": torch.zeros(2, 2)}
        >>> a = {"w": torch.tensor([[1.0, 0.0], [0.0, 0.0]])}
        >>> b = {"w": torch.tensor([[0.0, 0.0], [0.0, 2.0]])}
        >>> tsv_merge([a, b], base).params["w"]
        tensor([[1., 0.],
                [0., 2.]])
    """
    fraction = _check_fraction(rank_fraction, "rank_fraction")

    def matrix_merge(T: int):
        def merge_matrix(mats: Tensor) -> Tensor:
            r = min(mats.shape[-2:])
            k = max(1, r // T if fraction is None else _floor(fraction * r))
            u, s, vh = torch.linalg.svd(mats, full_matrices=False)
            tol = _zero_tolerance(mats, s[:, 0])
            parts = []
            for t in range(T):
                keep = s[t, :k] > tol
                parts.append((u[t, :, :k][:, keep], s[t, :k][keep], vh[t, :k][keep]))
            u_perp, s_cat, vh_perp = _concat_triplets(parts)
            return (u_perp * s_cat) @ vh_perp

        return merge_matrix, {"rank_fraction": 1.0 / T if fraction is None else fraction}

    return _spectral_method(
        "tsv_merge", thetas, base, params, weights, scaling, vector_merge, matrix_merge
    )


def _isotropic(u: Tensor, s: Tensor, vh: Tensor) -> Tensor:
    """:math:`\\bar\\sigma U V^\\top` with :math:`\\bar\\sigma` the mean of ``s`` (0 if empty)."""
    if s.numel() == 0:
        return torch.zeros(u.shape[0], vh.shape[1], dtype=u.dtype, device=u.device)
    return s.mean() * (u @ vh)


def iso_c(
    thetas: Sequence[Model],
    base: Model,
    *,
    scaling: float = 1.0,
    vector_merge: str = "mean",
    weights: Sequence[float] | None = None,
    params: str | Sequence[str] | None = None,
) -> MergeResult:
    """Iso-C (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
    Task-Specific Subspaces", ICML 2025): task arithmetic with a flattened spectrum.

    Per matrix, :math:`\\Delta_{TA} = \\sum_t w_t(\\theta_t - \\theta_0) = U S V^\\top`
    and

    .. math::

        \\Delta = \\bar\\sigma\\, U V^\\top, \\quad
        \\bar\\sigma = \\frac{1}{r}\\sum_{i=1}^{r} \\sigma_i, \\qquad
        \\theta = \\theta_0 + \\lambda \\Delta,

    so every direction of :math:`\\Delta_{TA}` gets the same singular value, keeping its
    trace norm. :math:`r` counts the numerically non-zero singular values (on a full-rank
    :math:`\\Delta_{TA}`, all :math:`\\min(m, n)`; a rank-deficient one keeps its range, so
    Iso-C of a rank-one matrix is that matrix). Non-matrix parameters: mean (default, as in
    the authors' code) or sum of the task vectors.

    Args:
        thetas: The fine-tuned models.
        base: The base model :math:`\\theta_0`.
        scaling: :math:`\\lambda` (the paper tunes it on validation data).
        vector_merge: ``"mean"`` or ``"sum"`` for parameters that are not matrices.
        weights: Optional per-model multipliers :math:`w_t \\ge 0` of the task vectors.
        params: Names or a regex selecting the merged parameters.

    Returns:
        A :class:`~curvmerge.merging.MergeResult`.

    Example:
        >>> base = {"w": torch.zeros(2, 2)}
        >>> a = {"w": torch.tensor([[3.0, 0.0], [0.0, 0.0]])}
        >>> b = {"w": torch.tensor([[0.0, 0.0], [0.0, 1.0]])}
        >>> iso_c([a, b], base).params["w"]
        tensor([[2., 0.],
                [0., 2.]])
    """

    def merge_matrix(mats: Tensor) -> Tensor:
        u, s, vh = torch.linalg.svd(mats.sum(0), full_matrices=False)
        keep = s > _zero_tolerance(mats, s[:1])
        return _isotropic(u[:, keep], s[keep], vh[keep])

    return _spectral_method(
        "iso_c", thetas, base, params, weights, scaling, vector_merge, lambda T: (merge_matrix, {})
    )


def iso_cts_ranks(rank: int, num_tasks: int, common_fraction: float) -> tuple[int, int]:
    """Sizes ``(k_c, s)`` of the common subspace and of each task's subspace in Iso-CTS.

    As in the authors' code, :math:`k_c = \\lfloor f r \\rfloor` is adjusted so that the
    rest divides evenly: :math:`s = \\operatorname{round}((r - k_c)/T)` directions per task
    (capped at :math:`\\lfloor r/T \\rfloor`, so :math:`k_c \\ge 0`) and
    :math:`k_c = r - sT`.

    Example:
        >>> iso_cts_ranks(768, 8, 0.8)
        (616, 19)
    """
    common = _floor(common_fraction * rank)
    per_task = min(round((rank - common) / num_tasks), rank // num_tasks)
    return rank - per_task * num_tasks, per_task


def iso_cts(
    thetas: Sequence[Model],
    base: Model,
    *,
    scaling: float = 1.0,
    common_fraction: float = 0.8,
    vector_merge: str = "mean",
    weights: Sequence[float] | None = None,
    params: str | Sequence[str] | None = None,
) -> MergeResult:
    """Iso-CTS (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
    Task-Specific Subspaces", ICML 2025): an isotropic merge on common and task-specific
    directions.

    Per matrix, with :math:`\\Delta_t = w_t(\\theta_t - \\theta_0)`, rank
    :math:`r = \\min(m, n)` and sizes :math:`(k_c, s)` from :func:`iso_cts_ranks`:

    1. **Common subspace**: the top :math:`k_c` singular triplets
       :math:`(U_c, S_c, V_c)` of :math:`\\Delta_{TA} = \\sum_t \\Delta_t`.
    2. **Task-specific subspaces**: the top :math:`s` singular triplets
       :math:`(U_t, S_t, V_t)` of each :math:`\\Delta_t - U_c U_c^\\top \\Delta_t`
       (the task matrix with its common part projected out).
    3. **Combine**: :math:`U = [U_c\\, U_1 \\cdots U_T]`, :math:`V` likewise, whitened to
       their orthogonal polar factors :math:`U_\\perp, V_\\perp` (as in :func:`tsv_merge`).
    4. **Isotropic scaling**:

    .. math::

        \\Delta = \\bar\\sigma\\, U_\\perp V_\\perp^\\top, \\quad
        \\bar\\sigma = \\operatorname{mean}(S_c, S_1, \\dots, S_T), \\qquad
        \\theta = \\theta_0 + \\lambda\\Delta.

    :math:`\\bar\\sigma` is the mean of the concatenated spectrum (the :math:`k_c` common
    singular values of :math:`\\Delta_{TA}` and the :math:`sT` task-specific ones), exactly
    as the authors' code computes it; with ``common_fraction=1`` there are no task-specific
    directions and Iso-CTS is :func:`iso_c`. Numerically zero triplets are dropped (see the
    module docstring). Non-matrix parameters: mean (default, as in the authors' code) or sum
    of the task vectors.

    Args:
        thetas: The fine-tuned models.
        base: The base model :math:`\\theta_0`.
        scaling: :math:`\\lambda` (the paper tunes it on validation data).
        common_fraction: :math:`f \\in (0, 1]`, the share of the rank given to the common
            subspace (paper: 0.8).
        vector_merge: ``"mean"`` or ``"sum"`` for parameters that are not matrices.
        weights: Optional per-model multipliers :math:`w_t \\ge 0` of the task vectors.
        params: Names or a regex selecting the merged parameters.

    Returns:
        A :class:`~curvmerge.merging.MergeResult`.

    Example:
        >>> base = {"w": torch.zeros(2, 2)}
        >>> a = {"w": torch.tensor([[3.0, 0.0], [0.0, 0.0]])}
        >>> b = {"w": torch.tensor([[0.0, 0.0], [0.0, 1.0]])}
        >>> iso_cts([a, b], base, common_fraction=0.5).params["w"]
        tensor([[2., 0.],
                [0., 2.]])
    """
    common_fraction = _check_fraction(common_fraction, "common_fraction")

    def matrix_merge(T: int):
        def merge_matrix(mats: Tensor) -> Tensor:
            k_c, s_task = iso_cts_ranks(min(mats.shape[-2:]), T, common_fraction)
            u, s, vh = torch.linalg.svd(mats.sum(0), full_matrices=False)
            tol = _zero_tolerance(mats, s[:1])
            keep = s[:k_c] > tol
            u_c = u[:, :k_c][:, keep]
            parts = [(u_c, s[:k_c][keep], vh[:k_c][keep])]
            if s_task > 0:
                residual = mats - u_c @ (u_c.mT @ mats)
                ut, st, vht = torch.linalg.svd(residual, full_matrices=False)
                for t in range(T):
                    kept = st[t, :s_task] > tol
                    parts.append(
                        (ut[t, :, :s_task][:, kept], st[t, :s_task][kept], vht[t, :s_task][kept])
                    )
            u_perp, s_cat, vh_perp = _concat_triplets(parts)
            return _isotropic(u_perp, s_cat, vh_perp)

        return merge_matrix, {"common_fraction": common_fraction}

    return _spectral_method(
        "iso_cts", thetas, base, params, weights, scaling, vector_merge, matrix_merge
    )
