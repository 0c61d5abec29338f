"""The table of merging methods: one row per method, all called the same way.

Every method is called as

.. code-block:: python

    spec = get_method("ties")
    result = spec(models, base=base, curvatures=None, weights=None, params=None, density=0.2)

and returns a :class:`~curvmerge.merging.MergeResult` (merges) or an
:class:`~curvmerge.merging.ensemble.EnsembleResult` (one module per task: the output ensemble,
a reference that is not a merge, and weight ensembling, whose merge changes with every
batch); :func:`task_models` turns either into one evaluable module per task.
``spec.statistics`` says which per-model statistics a caller must compute first:

- ``"none"``: parameters only;
- ``"diagonal_fisher"``: one :class:`~curvmerge.operators.DiagonalOperator` per model (a
  diagonal Fisher of any kind: exact, Monte-Carlo or empirical);
- ``"exact_ggn"``: one matrix-free :class:`~curvmerge.operators.LinearOperator` per model,
  normally ``curvmerge.operators.ggn.GGNOperator`` (named in ``spec.operator``, imported only
  by :meth:`MethodSpec.operator_class`);
- ``"kfac"``: one K-FAC Fisher per model, a :class:`~curvmerge.operators.KroneckerOperator`
  (:func:`~curvmerge.statistics.kfac_factors` wrapped by
  :meth:`~curvmerge.operators.KroneckerOperator.from_kfac`);
- ``"input_gram"``: one :class:`~curvmerge.statistics.LayerGrams` per model (RegMean);
- ``"data"``: each model's statistics batches, for methods that run the models on data
  while they merge (RegMean++, AdaMerging, weight ensembling).

Whatever the kind, the per-model statistics reach the method as ``curvatures``.

``spec.grid`` is the method's default coefficient grid: the points (keyword arguments of the
call, ``weights`` included) among which an experiment chooses on validation data (empty: the
method has nothing to choose and runs once at its defaults). ``spec.equation`` marks the
methods that are one point of the merge equation: a whole grid of weights and dampings is
served by one :class:`~curvmerge.merging.PreparedMerge` (statistics stacked once).
``spec.sweep_options`` are defaults a grid search uses instead of the method's own (a sweep
needs merges accurate enough to rank its points: ``fisher_exact`` caps CG at 100 iterations
per point). :meth:`MethodSpec.grid_points` checks a grid against the method's options.
"""

from __future__ import annotations

import copy
import importlib
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from curvmerge.merging.adamerging import adamerging
from curvmerge.merging.ensemble import EnsembleResult, output_ensemble
from curvmerge.merging.equation import merge
from curvmerge.merging.methods import dare, slerp, task_arithmetic, ties
from curvmerge.merging.regmean import regmean, regmean_plus_plus
from curvmerge.merging.report import MergeResult, load_merged, parameters_of
from curvmerge.merging.spectral import iso_c, iso_cts, tsv_merge
from curvmerge.merging.spherical import slerp_sequential, spherical_barycenter
from curvmerge.merging.system import DEFAULT_DAMPING, PRIORS
from curvmerge.merging.weight_ensembling import weight_ensembling
from curvmerge.operators import DiagonalOperator, LinearOperator

__all__ = [
    "MethodSpec",
    "UnknownMethodError",
    "get_method",
    "list_methods",
    "method_names",
    "methods_table",
    "method_prior",
    "rescale",
    "task_models",
    "STATISTICS",
]

#: The kinds of per-model statistics a method can need.
STATISTICS = ("none", "diagonal_fisher", "exact_ggn", "kfac", "input_gram", "data")


class UnknownMethodError(ValueError):
    """Raised for a method name that is not in the registry."""


@dataclass(frozen=True)
class MethodSpec:
    """One row of the registry.

    Attributes:
        name: The name used in configs and on the command line.
        summary: One line saying what the method does.
        reference: The paper it comes from.
        function: ``function(models, *, base, curvatures, weights, params, **options)``.
        statistics: One of :data:`STATISTICS` (see the module doc).
        options: The method's own options and their defaults.
        needs_base: Whether the base model :math:`\\theta_0` is required.
        is_merge: ``False`` for methods whose result is not one merged model (output
            ensembling, weight ensembling).
        saves: What ``curvmerge merge`` writes: ``"parameters"`` (the merged model),
            ``"network"`` (the result's ``save``: a learned coefficient network) or
            ``None`` (nothing to write: evaluate it with ``compare``).
        num_models: Number of models the method takes (``None``: any).
        weights: What ``weights`` means for this method.
        operator: ``"module:Class"`` of the operator that computes the statistics, if any.
        grid: The default coefficient grid, one mapping of keyword arguments per point
            (chosen on validation; empty: run once at the defaults).
        equation: The method is one point of the merge equation, so its ``weights`` and
            ``damping`` points can share one :class:`~curvmerge.merging.PreparedMerge`;
            its other options are those of the prepared merge.
        sweep_options: Option defaults while choosing on a grid (overridable), e.g. a CG
            iteration cap: a sweep only needs merges accurate enough to rank its points.
        scaled: The merge is :math:`\\theta_0 + s\\,\\Delta` with ``scaling`` :math:`s` and a
            :math:`\\Delta` that does not depend on it, so a grid over ``scaling`` needs one
            merge per value of the other options (:func:`rescale`).
    """

    name: str
    summary: str
    reference: str
    function: Callable[..., Any] = field(repr=False)
    statistics: str = "none"
    options: Mapping[str, Any] = field(default_factory=dict)
    needs_base: bool = False
    is_merge: bool = True
    saves: str | None = "parameters"
    num_models: int | None = None
    weights: str = "per-model coefficients w_t >= 0"
    operator: str | None = None
    grid: tuple[Mapping[str, Any], ...] = ()
    equation: bool = False
    sweep_options: Mapping[str, Any] = field(default_factory=dict)
    scaled: bool = False

    @property
    def needs(self) -> tuple[str, ...]:
        """What a caller must supply besides the models: the statistics kind (unless
        ``"none"``) and ``"base"`` when the base model is required."""
        out = () if self.statistics == "none" else (self.statistics,)
        return out + (("base",) if self.needs_base else ())

    def grid_points(
        self, grid: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]] | None = None
    ) -> list[dict[str, Any]]:
        """The grid as a list of points, checked against the method's options.

        Args:
            grid: ``None`` (the default grid), a list of points, or a mapping of option to
                values whose product is the grid (``{"damping": [1e-3, 1e-2]}``).

        Returns:
            At least one point (``[{}]``: the defaults).

        Raises:
            ValueError: A key that is neither an option of the method nor ``weights``, or an
                empty list of values.

        Example:
            >>> get_method("ties").grid_points({"density": [0.2, 0.5], "scaling": [1.0]})
            [{'density': 0.2, 'scaling': 1.0}, {'density': 0.5, 'scaling': 1.0}]
        """
        if grid is None:
            grid = self.grid
        if isinstance(grid, Mapping):
            keys = list(grid)
            values = []
            for k in keys:
                v = grid[k]
                v = list(v) if isinstance(v, (list, tuple)) else [v]
                if not v:
                    raise ValueError(f"method {self.name!r}: grid {k!r} has no values")
                values.append(v)
            points = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]
        else:
            points = [dict(p) for p in grid]
        valid = {*self.options, "weights"}
        for point in points:
            unknown = sorted(set(point) - valid)
            if unknown:
                raise ValueError(
                    f"method {self.name!r} has no option {unknown[0]!r} to choose on a grid "
                    f"(its options: {', '.join(sorted(valid))})"
                )
        return points or [{}]

    def __call__(
        self,
        models: Sequence[nn.Module | Mapping[str, Tensor]],
        *,
        base: nn.Module | Mapping[str, Tensor] | None = None,
        curvatures: Sequence[LinearOperator] | None = None,
        weights: Sequence[float] | None = None,
        params: str | Sequence[str] | None = None,
        **options,
    ) -> MergeResult | EnsembleResult:
        """Run the method after checking its requirements; see the class attributes."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            valid = ", ".join(self.options) or "none"
            raise TypeError(
                f"method {self.name!r} has no option {unknown[0]!r} (its options: {valid})"
            )
        if isinstance(models, (nn.Module, Mapping)) or not len(models):
            raise ValueError(f"method {self.name!r} needs a non-empty list of models")
        if self.num_models is not None and len(models) != self.num_models:
            raise ValueError(
                f"method {self.name!r} merges exactly {self.num_models} models, got {len(models)}"
            )
        if self.needs_base and base is None:
            raise ValueError(
                f"method {self.name!r} needs the base model (the checkpoint the models were "
                "fine-tuned from)"
            )
        if self.statistics == "none" and curvatures is not None:
            raise ValueError(f"method {self.name!r} uses no curvature; do not pass curvatures")
        if self.statistics != "none":
            _check_curvatures(self, curvatures, len(models))
        merged_options = {**self.options, **options}
        return self.function(
            models, base=base, curvatures=curvatures, weights=weights, params=params,
            **merged_options,
        )  # fmt: skip

    def operator_class(self) -> type:
        """Import and return the operator class named in ``operator`` (lazily)."""
        if self.operator is None:
            raise ValueError(f"method {self.name!r} needs no curvature operator")
        module, _, cls = self.operator.partition(":")
        try:
            return getattr(importlib.import_module(module), cls)
        except (ImportError, AttributeError) as err:
            raise ImportError(
                f"method {self.name!r} needs {self.operator}, which is not available: {err}"
            ) from err


_WHAT = {
    "diagonal_fisher": "diagonal Fisher",
    "exact_ggn": "GGN/Fisher operator",
    "kfac": "K-FAC Fisher (KroneckerOperator)",
    "input_gram": "LayerGrams (input_grams)",
    "data": "batch iterable (its statistics batches)",
}


def _check_curvatures(spec: MethodSpec, curvatures, num_models: int) -> None:
    what = _WHAT[spec.statistics]
    if curvatures is None:
        raise ValueError(
            f"method {spec.name!r} needs one {what} per model (statistics={spec.statistics!r}); "
            "compute them first"
        )
    curvatures = list(curvatures)
    if len(curvatures) != num_models:
        raise ValueError(f"got {len(curvatures)} {what}s for {num_models} models")
    if spec.statistics in ("input_gram", "data"):
        return  # checked by the method itself, against the models
    for i, F in enumerate(curvatures):
        if spec.statistics == "diagonal_fisher" and not isinstance(F, DiagonalOperator):
            raise TypeError(
                f"method {spec.name!r} needs diagonal curvatures; curvature {i} is a "
                f"{type(F).__name__} (use 'fisher_exact' for general operators)"
            )
        if not isinstance(F, LinearOperator):
            raise TypeError(f"curvature {i} is a {type(F).__name__}, not a LinearOperator")


# ---------------------------------------------------------------------------------- adapters
def rescale(result: MergeResult, base, scaling: float) -> MergeResult:
    """The merge of a :attr:`MethodSpec.scaled` method at another ``scaling``.

    ``result`` is the merge at scaling 1, :math:`\\theta_0 + \\Delta`; returns
    :math:`\\theta_0 + s\\,\\Delta` (computed in at least float32, returned in each
    parameter's dtype) with the report's ``scaling`` and coefficients updated. The unit
    merge was rounded once to the parameters' dtype: for half-precision models a rescaled
    point can differ from a direct merge at that scaling by about ``scaling`` units in the
    last place.
    """
    base_params = parameters_of(base)
    params = {}
    for name, merged in result.params.items():
        b = base_params[name].to(merged.device)
        wide = torch.promote_types(merged.dtype, torch.float32)
        delta = merged.to(wide) - b.to(wide)
        params[name] = (b.to(wide) + scaling * delta).to(merged.dtype)
    report = copy.copy(result.report)
    report.weights = [scaling * w for w in result.report.weights]
    if hasattr(report, "options"):
        report.options = {**report.options, "scaling": scaling}
    return MergeResult(params, report)


def method_prior(prior, models, *, base=None, params=None):
    """The prior :math:`\\theta_0` of an equation method, with another method's merge allowed.

    ``prior`` is passed through unless it names a registered merge method: a name
    (``"task_arithmetic"``, at the method's defaults) or a mapping ``{"method": name,
    **options}`` (``{"method": "task_arithmetic", "scaling": 0.5}``) is replaced by that
    method's merged parameters, so that the directions no curvature sees keep that method's
    answer instead of the average.

    Raises:
        ValueError: A name that is neither a prior of the equation nor a merge method, or a
            method that needs statistics (only data-free methods can serve as priors).
    """
    if isinstance(prior, str) and prior not in PRIORS:
        spec_options: dict[str, Any] = {"method": prior}
    elif isinstance(prior, Mapping) and "method" in prior:
        spec_options = dict(prior)
    else:
        return prior
    name = spec_options.pop("method")
    try:
        spec = get_method(name)
    except UnknownMethodError as err:
        raise ValueError(
            f"prior {name!r} is neither {', '.join(map(repr, PRIORS))}, a parameter dict, nor "
            f"a merge method ({', '.join(method_names())})"
        ) from err
    if spec.statistics != "none" or not spec.is_merge:
        raise ValueError(
            f"prior {spec.name!r}: only data-free merge methods can give the prior (it needs "
            f"{spec.statistics!r} statistics)"
            if spec.is_merge
            else f"prior {spec.name!r} is not a merge"
        )
    return spec(models, base=base, params=params, **spec_options).params


def _average(models, *, base, curvatures, weights, params, prior, **equation):
    prior = method_prior(prior, models, base=base, params=params)
    return merge(models, None, weights=weights, params=params, base=base, prior=prior, **equation)


def _curvature_merge(models, *, base, curvatures, weights, params, prior, **equation):
    # the curvatures' space is what is merged: the prior method merges the same parameters
    selected = params if params is not None else list(curvatures[0].space.names)
    prior = method_prior(prior, models, base=base, params=selected)
    return merge(
        models, curvatures, weights=weights, params=params, base=base, prior=prior, **equation
    )


def _on_task_vectors(method):
    """Adapter of ``method(models, base, *, weights, params, **options)``."""

    def call(models, *, base, curvatures, weights, params, **options):
        return method(models, base, weights=weights, params=params, **options)

    return call


def _on_statistics(method):
    """Adapter of ``method(models, statistics, *, weights, params, **options)``."""

    def call(models, *, base, curvatures, weights, params, **options):
        return method(models, curvatures, weights=weights, params=params, **options)

    return call


def _spherical(method):
    """Adapter of ``method(models, *, weights, base, params, **options)`` (base optional)."""

    def call(models, *, base, curvatures, weights, params, **options):
        return method(models, weights=weights, base=base, params=params, **options)

    return call


def _slerp(models, *, base, curvatures, weights, params, t, per_tensor):
    if weights is not None and t is not None:
        raise ValueError("slerp takes the option t or weights, not both")
    return slerp(models, t=t, weights=weights, base=base, per_tensor=per_tensor, params=params)


def _adamerging(models, *, base, curvatures, weights, params, **options):
    return adamerging(models, base, curvatures, weights=weights, params=params, **options)


def _weight_ensembling(models, *, base, curvatures, weights, params, **options):
    return weight_ensembling(models, base, curvatures, weights=weights, params=params, **options)


def _ensemble(models, *, base, curvatures, weights, params, combine):
    return output_ensemble(models, weights=weights, params=params, combine=combine)


_EQUATION = {"damping": DEFAULT_DAMPING, "damping_scale": "auto", "prior": "mean"}

_SOLVER = {
    **_EQUATION,
    "rtol": 1e-6,
    "maxiter": None,
    "preconditioner": None,
    "warm_start": True,
    "require_convergence": False,
}

_TABLE: tuple[MethodSpec, ...] = (
    MethodSpec(
        name="average",
        summary="weighted average of the parameters (identity curvature)",
        reference="Wortsman et al., Model soups, ICML 2022",
        function=_average,
        options={**_EQUATION, "damping": 0.0},
        equation=True,
    ),
    MethodSpec(
        name="task_arithmetic",
        summary="base + scaling * sum of task vectors",
        reference="Ilharco et al., Editing models with task arithmetic, ICLR 2023",
        function=_on_task_vectors(task_arithmetic),
        options={"scaling": 1.0},
        needs_base=True,
        weights="per-model multipliers of the task vectors (default 1)",
        grid=tuple({"scaling": s} for s in (0.3, 0.5, 0.7, 1.0)),
        scaled=True,
    ),
    MethodSpec(
        name="ties",
        summary="trim task vectors, elect signs, average the agreeing entries",
        reference="Yadav et al., TIES-Merging, NeurIPS 2023",
        function=_on_task_vectors(ties),
        options={"density": 0.2, "scaling": 1.0},
        needs_base=True,
        weights="per-model multipliers of the trimmed task vectors (default 1)",
        grid=tuple({"density": d, "scaling": s} for d in (0.2, 0.5) for s in (0.7, 1.0)),
        scaled=True,
    ),
    MethodSpec(
        name="dare",
        summary="randomly drop and rescale task-vector entries (seeded), then add them",
        reference="Yu et al., Language models are Super Mario, ICML 2024",
        function=_on_task_vectors(dare),
        options={
            "drop_rate": 0.5,
            "scaling": 1.0,
            "seed": 0,
            "combine": "task_arithmetic",
            "density": 0.2,
        },
        needs_base=True,
        weights="per-model multipliers of the task vectors (default 1)",
        grid=tuple({"drop_rate": d, "scaling": s} for d in (0.5, 0.9) for s in (0.5, 1.0)),
        scaled=True,
    ),
    MethodSpec(
        name="slerp",
        summary="spherical interpolation of two models (per tensor)",
        reference="Shoemake, Animating rotation with quaternion curves, SIGGRAPH 1985",
        function=_slerp,
        options={"t": None, "per_tensor": True},
        num_models=2,
        weights="(w1, w2) sets t = w2 / (w1 + w2)",
        grid=tuple({"t": t} for t in (0.25, 0.5, 0.75)),
    ),
    MethodSpec(
        name="slerp_sequential",
        summary="pairwise sequential SLERP with cumulative weights (per tensor)",
        reference="Shoemake 1985; the pairwise baseline of M3SB (multi-model merging via "
        "spherical barycenters)",
        function=_spherical(slerp_sequential),
        options={"per_tensor": True},
        weights="per-model weights w_t >= 0 (step k interpolates with t = w_k / (w_1+..+w_k))",
    ),
    MethodSpec(
        name="spherical_barycenter",
        summary="weighted Karcher mean of the directions on the sphere, mean norm (per tensor)",
        reference="Buss & Fillmore, Spherical averages and applications to spherical splines "
        "and interpolation, ACM TOG 2001; M3SB (multi-model merging via spherical barycenters)",
        function=_spherical(spherical_barycenter),
        options={"per_tensor": True, "tol": 1e-10, "maxiter": 100},
        weights="barycenter weights w_t >= 0 (default equal)",
    ),
    MethodSpec(
        name="tsv_merge",
        summary="task singular vectors: per-matrix low-rank SVDs of the task matrices, "
        "decorrelated (TSV-M)",
        reference="Gargiulo et al., Task singular vectors: reducing task interference in model "
        "merging, CVPR 2025",
        function=_on_task_vectors(tsv_merge),
        options={"scaling": 1.0, "rank_fraction": None, "vector_merge": "mean"},
        needs_base=True,
        weights="per-model multipliers of the task vectors (default 1)",
        grid=tuple({"scaling": s} for s in (0.5, 0.75, 1.0, 1.25)),
        scaled=True,
    ),
    MethodSpec(
        name="iso_c",
        summary="isotropic merging: flatten the spectrum of the summed task matrix (Iso-C)",
        reference="Marczak et al., No task left behind: isotropic model merging with common "
        "and task-specific subspaces, ICML 2025",
        function=_on_task_vectors(iso_c),
        options={"scaling": 1.0, "vector_merge": "mean"},
        needs_base=True,
        weights="per-model multipliers of the task vectors (default 1)",
        grid=tuple({"scaling": s} for s in (0.5, 1.0, 1.5, 2.0)),
        scaled=True,
    ),
    MethodSpec(
        name="iso_cts",
        summary="isotropic merging on common and task-specific subspaces (Iso-CTS)",
        reference="Marczak et al., No task left behind: isotropic model merging with common "
        "and task-specific subspaces, ICML 2025",
        function=_on_task_vectors(iso_cts),
        options={"scaling": 1.0, "common_fraction": 0.8, "vector_merge": "mean"},
        needs_base=True,
        weights="per-model multipliers of the task vectors (default 1)",
        grid=tuple({"scaling": s} for s in (0.5, 1.0, 1.5, 2.0)),
        scaled=True,
    ),
    MethodSpec(
        name="regmean",
        summary="per-layer regression on input Gram matrices, solved exactly (RegMean)",
        reference="Jin et al., Dataless knowledge fusion by merging weights of language "
        "models, ICLR 2023",
        function=_on_statistics(regmean),
        statistics="input_gram",
        options={"alpha": 0.9, "normalize": False},
        grid=tuple({"alpha": a} for a in (0.5, 0.9, 0.95)),
    ),
    MethodSpec(
        name="regmean_plus_plus",
        summary="RegMean with each layer's Grams taken from the merged earlier layers (RegMean++)",
        reference="Nguyen et al., RegMean++: enhancing effectiveness and generalization of "
        "regression mean for model merging, 2025",
        function=_on_statistics(regmean_plus_plus),
        statistics="data",
        options={"alpha": 0.9, "normalize": False},
        grid=tuple({"alpha": a} for a in (0.5, 0.9, 0.95)),
    ),
    MethodSpec(
        name="adamerging",
        summary="task arithmetic whose task-wise or layer-wise coefficients minimise the "
        "prediction entropy on unlabelled inputs (Adam, seeded)",
        reference="Yang et al., AdaMerging: adaptive model merging for multi-task learning, "
        "ICLR 2024",
        function=_adamerging,
        statistics="data",
        # it learns its coefficients (from the statistics batches' inputs): nothing to choose
        options={
            "granularity": "layer",
            "steps": 500,
            "lr": 1e-3,
            "init": 0.3,
            "seed": 0,
            "clamp": True,
        },
        needs_base=True,
        weights="per-model multipliers of the initial coefficient init (default 1)",
    ),
    MethodSpec(
        name="weight_ensembling",
        summary="data-adaptive weight ensembling: a small network maps each batch's features "
        "(frozen base model) to task-wise or layer-wise coefficients, trained by entropy "
        "minimisation on unlabelled inputs; every batch gets its own merge",
        reference="Tang et al., Data-adaptive weight-ensembling for multi-task model fusion, "
        "IJCV 2025",
        function=_weight_ensembling,
        statistics="data",
        options={
            "granularity": "layer",
            "features": "penultimate",
            "network": None,  # a trained CoefficientNetwork to apply (zero-shot transfer)
            "per": "batch",
            "hidden": 64,
            "depth": 2,
            "steps": 500,
            "lr": 1e-3,
            "init": 0.3,
            "seed": 0,
            "clamp": True,
        },
        needs_base=True,
        is_merge=False,
        saves="network",
        weights="per-model multipliers of the initial coefficient init (default 1)",
    ),
    MethodSpec(
        name="fisher_diagonal",
        summary="Fisher-weighted averaging with diagonal Fishers (closed form)",
        reference="Matena & Raffel, Merging models with Fisher-weighted averaging, NeurIPS 2022",
        function=_curvature_merge,
        statistics="diagonal_fisher",
        options=_EQUATION,
        grid=tuple({"damping": d} for d in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)),
        equation=True,
    ),
    MethodSpec(
        name="fisher_kfac",
        summary="K-FAC Fisher merge: one Kronecker factor pair per layer and model, the sum "
        "over models solved by CG",
        reference="Martens & Grosse, Optimizing neural networks with Kronecker-factored "
        "approximate curvature, ICML 2015; Tam et al., Merging by matching models in task "
        "parameter subspaces (MaTS), TMLR 2024",
        function=_curvature_merge,
        statistics="kfac",
        # Kronecker-of-the-sum preconditioner: benchmarks/bench_kfac_merge.py
        options={**_SOLVER, "preconditioner": "kronecker"},
        grid=tuple({"damping": d} for d in (1e-1, 1e-2, 1e-3)),
        equation=True,
        # a sweep ranks points: 1e-4 is enough, and float32 K-FAC solves stall near 1e-6
        sweep_options={"rtol": 1e-4, "maxiter": 500},
    ),
    MethodSpec(
        name="fisher_exact",
        summary="exact GGN/Fisher merge, matrix-free, solved by preconditioned CG",
        reference="Matena & Raffel 2022 (full Fisher); Martens, New insights and perspectives "
        "on the natural gradient method, JMLR 2020 (GGN)",
        function=_curvature_merge,
        statistics="exact_ggn",
        options=_SOLVER,
        operator="curvmerge.operators.ggn:GGNOperator",
        # largest first: each CG solve warm-starts from the previous, better-conditioned one
        grid=tuple({"damping": d} for d in (1e-1, 1e-2, 1e-3)),
        equation=True,
        sweep_options={"maxiter": 100},
    ),
    MethodSpec(
        name="ensemble",
        summary="output ensemble: average the models' predictions (a reference, not a merge)",
        reference="Matena & Raffel, Merging models with Fisher-weighted averaging, NeurIPS 2022",
        function=_ensemble,
        options={"combine": "probs"},
        is_merge=False,
        saves=None,
        weights="ensemble weights (default equal)",
    ),
)

_REGISTRY: dict[str, MethodSpec] = {spec.name: spec for spec in _TABLE}


def list_methods() -> list[MethodSpec]:
    """All registered methods, in table order."""
    return list(_TABLE)


def method_names() -> list[str]:
    """The registered method names, in table order."""
    return [spec.name for spec in _TABLE]


def get_method(name: str) -> MethodSpec:
    """The registry row of ``name`` (case-insensitive; ``-`` and ``_`` are the same).

    Raises:
        UnknownMethodError: Naming the valid methods.

    Example:
        >>> get_method("Task-Arithmetic").needs_base
        True
    """
    key = str(name).strip().lower().replace("-", "_")
    if key not in _REGISTRY:
        raise UnknownMethodError(
            f"unknown method {name!r}; valid methods: {', '.join(method_names())}"
        )
    return _REGISTRY[key]


def _grid_text(spec: MethodSpec) -> str:
    if not spec.grid:
        return "–"
    keys: list[str] = []
    for point in spec.grid:
        keys.extend(k for k in point if k not in keys)
    parts = []
    for k in keys:
        values = list(dict.fromkeys(p[k] for p in spec.grid if k in p))
        parts.append(f"{k} ∈ {{{', '.join(f'{v:g}' for v in values)}}}")
    return ", ".join(parts)


def methods_table() -> str:
    """A Markdown table of the registry (name, statistics, grid, summary, reference)."""
    lines = [
        "| method | statistics | grid | summary | reference |",
        "| --- | --- | --- | --- | --- |",
    ]
    for s in _TABLE:
        lines.append(
            f"| {s.name} | {s.statistics} | {_grid_text(s)} | {s.summary} | {s.reference} |"
        )
    return "\n".join(lines)


def task_models(result: MergeResult | EnsembleResult, models: Sequence[nn.Module]) -> list:
    """One evaluable module per task, whatever the method.

    For a merge, task :math:`k`'s module is a copy of ``models[k]`` with the merged parameters
    loaded (it keeps its own head and buffers); for an ensemble, the ensemble member of task
    :math:`k`.
    """
    if isinstance(result, EnsembleResult):
        return list(result.members)
    if isinstance(result, MergeResult):
        return [load_merged(m, result.params) for m in models]
    raise TypeError(f"expected a MergeResult or EnsembleResult, got {type(result).__name__}")
