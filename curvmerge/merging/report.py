"""What a merge returns: the merged parameters, a report of what it did and what it cost,
and the warnings it raises."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor, nn

from curvmerge.distributed import is_main_process
from curvmerge.space import SpaceMismatchError

__all__ = [
    "ConvergenceWarning",
    "ConvergenceError",
    "DampingWarning",
    "MergeCosts",
    "MergeReport",
    "MergeResult",
    "SolveProgress",
    "load_merged",
    "parameters_of",
]


class ConvergenceWarning(UserWarning):
    """CG stopped before reaching the requested tolerance."""


class ConvergenceError(RuntimeError):
    """CG stopped before reaching the requested tolerance (``require_convergence=True``)."""


class DampingWarning(UserWarning):
    """The damping dominates the curvature: the merge stayed close to its prior."""


_PRODUCTS = (
    ("rhs", "right-hand side"),
    ("cg", "CG"),
    ("warm_start", "warm-start check"),
    ("scale", "scale probes"),
    ("sketch", "sketch"),
)

#: The products with the summed system (each applies every curvature of non-zero weight).
_SUM = ("cg", "warm_start", "sketch")


@dataclass
class MergeCosts:
    """Every operator product, diagonal pass and second a merge (or its preparation) spent.

    A *product* is one column multiplied by one operator. Products with the system
    :math:`\\lambda I + \\sum_t w_t F_t` (CG, the warm-start check, the Nyström sketch) count
    once each although every one applies all :math:`F_t`; products with a single
    :math:`F_t` (right-hand side, scale probes) count once per curvature and column.

    Attributes:
        rhs_products: Products :math:`F_t v` forming the right-hand side
            :math:`\\sum_t w_t F_t (\\theta_t - \\theta_0)` (or the cached
            :math:`F_t \\theta_s` of a sweep).
        cg_products: Products with the system inside CG (iterations, the initial residual of
            a warm start, true-residual checks).
        warm_start_products: The product that checks a warm start beats :math:`x = 0`.
        scale_products: Hutchinson probes estimating the damping scale of curvatures
            without a cheap diagonal (one ``[P, k]`` block per curvature).
        sketch_products: Products of the Nyström preconditioner's sketch.
        curvatures: Curvatures each product of the system applies (those with non-zero
            weight): a product of the sum costs this many per-model products.
        diagonal_passes: Passes over data that curvatures ran to compute their diagonals
            (a :class:`~curvmerge.GGNOperator`'s diagonal Fisher; cached diagonals cost none).
        rhs_seconds, cg_seconds, warm_start_seconds, scale_seconds, sketch_seconds,
        diagonal_seconds: Wall-clock time of each.
    """

    rhs_products: int = 0
    cg_products: int = 0
    warm_start_products: int = 0
    scale_products: int = 0
    sketch_products: int = 0
    curvatures: int = 0
    diagonal_passes: int = 0
    rhs_seconds: float = 0.0
    cg_seconds: float = 0.0
    warm_start_seconds: float = 0.0
    scale_seconds: float = 0.0
    sketch_seconds: float = 0.0
    diagonal_seconds: float = 0.0

    @property
    def products(self) -> int:
        """All products: right-hand side, CG, warm-start check, scale probes and sketch."""
        return sum(getattr(self, f"{k}_products") for k, _ in _PRODUCTS)

    @property
    def seconds(self) -> float:
        """Time of the products and diagonal passes (the rest of a merge is elementwise)."""
        return sum(getattr(self, f"{k}_seconds") for k, _ in _PRODUCTS) + self.diagonal_seconds

    @property
    def sum_products(self) -> int:
        """Products of the summed system :math:`\\lambda I + \\sum_t w_t F_t` (CG, the
        warm-start check and the sketch)."""
        return sum(getattr(self, f"{k}_products") for k in _SUM)

    @property
    def per_model_products(self) -> int:
        """Products with a single :math:`F_t`: each product of the sum counts
        ``curvatures`` times (at least once); right-hand side and scale probes once each."""
        return self.sum_products * max(self.curvatures, 1) + self.products - self.sum_products

    @property
    def seconds_per_product(self) -> float:
        """Seconds per product of the sum (0 when there was none)."""
        n = self.sum_products
        return sum(getattr(self, f"{k}_seconds") for k in _SUM) / n if n else 0.0

    def __add__(self, other: MergeCosts) -> MergeCosts:
        if not isinstance(other, MergeCosts):
            return NotImplemented
        out = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        out["curvatures"] = max(self.curvatures, other.curvatures)  # a count, not a cost
        return MergeCosts(**out)

    def __str__(self) -> str:
        parts = [
            f"{getattr(self, f'{k}_products')} {label}"
            for k, label in _PRODUCTS
            if getattr(self, f"{k}_products")
        ]
        s = f"{self.products} products"
        if parts:
            s += f" ({', '.join(parts)})"
        if self.diagonal_passes:
            s += f", {self.diagonal_passes} diagonal passes ({self.diagonal_seconds:.3g} s)"
        return s


@dataclass
class MergeReport:
    """What a merge did.

    Attributes:
        method: ``"average"`` (identity), ``"diagonal"`` (closed form) or ``"cg"``.
        num_models: Number of merged models.
        weights: The coefficients :math:`w_t`.
        damping: The damping as given: relative to ``damping_scale`` (``None`` where it does
            not apply: averaging with the mean prior, and methods that are not the equation).
        prior: ``"mean"``, ``"zero"``, ``"base"`` or ``"given"``.
        damping_scale: The scale :math:`s` of the damping, :math:`\\lambda = \\text{damping}
            \\cdot s`: by default the mean diagonal entry of :math:`\\sum_t w_t F_t`.
        damping_scale_source: ``"mean diagonal"``, ``"hutchinson (k probes)"`` (curvatures
            without a cheap diagonal), ``"identity"`` or ``"given"`` (``damping_scale=``).
        effective_damping: :math:`\\lambda`, the damping in the equation.
        converged: Whether the solve reached its tolerance (closed forms: always).
        iterations: CG iterations (0 for closed forms).
        products: All operator products, ``costs.products``.
        relative_residual: :math:`\\|b - Ax\\| / \\|b\\|` at the end (0 for closed forms).
        residual_history: Relative residual after each CG iteration.
        preconditioner: Name of the preconditioner used.
        warm_start: Whether CG started from a previous solution or the diagonal merge.
        unseen: Entries that no curvature sees and damping does not hold
            (:math:`\\lambda + \\sum_t w_t d_t = 0`), set to the prior (diagonal form only).
        curvature_share: How much of the undamped step the merge kept, in
            :math:`[0, 1]`: for closed forms :math:`\\|\\theta^*-\\theta_0\\| /
            \\|\\theta^*_{\\lambda=0}-\\theta_0\\|`; for CG :math:`\\|\\sum_t w_t F_t
            (\\theta^*-\\theta_0)\\| / \\|b\\|` (the same ratio measured through the
            curvature, free at the solution). 1 when there is no step to keep.
        damping_dominates: ``curvature_share`` is below
            :data:`~curvmerge.merging.system.DAMPING_DOMINANCE`: the damping holds the merge
            at its prior (a :class:`DampingWarning` was issued).
        costs: Every product, diagonal pass and their seconds (:class:`MergeCosts`).
        seconds: Wall-clock time of the merge.
        shared_solve: How many dampings one multi-shift CG run solved together with this
            one (:meth:`~curvmerge.PreparedMerge.merge_dampings`; 0: solved on its own).
            ``products`` then states what this point needed, shared products included.
        spent_products: The products this result cost, so that a sum over results counts
            each product once: ``products`` for a point solved on its own; in a damping grid
            solved together, the whole run's products on its first result and 0 on the
            others (``None`` until the merge finished).
    """

    method: str
    num_models: int
    weights: list[float]
    damping: float | None
    prior: str
    damping_scale: float | None = None
    damping_scale_source: str | None = None
    effective_damping: float | None = None
    converged: bool = True
    iterations: int = 0
    products: int = 0
    relative_residual: float = 0.0
    residual_history: list[float] = field(default_factory=list)
    preconditioner: str | None = None
    warm_start: bool = False
    unseen: int = 0
    curvature_share: float = 1.0
    damping_dominates: bool = False
    costs: MergeCosts = field(default_factory=MergeCosts)
    seconds: float = 0.0
    shared_solve: int = 0
    spent_products: int | None = None

    def __post_init__(self) -> None:
        if not self.costs.curvatures:
            self.costs.curvatures = sum(1 for w in self.weights if w != 0)

    def __str__(self) -> str:
        s = f"{self.method} merge of {self.num_models} models (prior={self.prior}"
        if self.effective_damping is not None:
            s += (
                f", damping {self.damping:g} x scale {self.damping_scale:.3g} "
                f"({self.damping_scale_source}) = λ {self.effective_damping:.3g}"
            )
        s += ")"
        if self.method == "cg":
            state = "converged" if self.converged else "NOT CONVERGED"
            s += (
                f": {state} after {self.iterations} iterations, "
                f"relative residual {self.relative_residual:.2e}"
            )
            if self.shared_solve:
                s += f" (one multi-shift run for {self.shared_solve} dampings)"
            c = self.costs
            if c.sum_products:
                s += (
                    f" ({self.iterations} iterations / {c.sum_products} products of the sum"
                    f" = {c.sum_products * max(c.curvatures, 1)} per-model products, "
                    f"{c.seconds_per_product:.2g} s each)"
                )
        if self.costs.products or self.costs.diagonal_passes:
            s += f"; {self.costs}"
        s += f"; {self.seconds:.3g} s"
        if self.damping_dominates:
            s += (
                f"; the damping dominates the curvature (the merge kept "
                f"{self.curvature_share:.1e} of its undamped step)"
            )
        return s


class SolveProgress:
    """One progress bar for one CG solve (opt-in: built only where progress is asked for).

    Pass it as the solve's ``callback``: each call is one iteration (one product of the
    sum). While the solve runs the bar counts iterations and shows the relative residual
    (the solver passes it to :meth:`on_residual`) and the per-model products of
    curvatures that count their own (a :class:`~curvmerge.GGNOperator`'s ``products``);
    :meth:`finish` writes the outcome (true relative residual, products of the sum)
    before closing it. A multi-shift solve of a damping grid is one solve: one bar. Under
    torch.distributed (CG in lockstep on every process) only rank 0 shows it.

    Args:
        curvatures: The merge's curvatures (``None`` for none).
        callback: Called after the bar with the iterate (the caller's own callback).
        total: The iteration cap, if known.
        desc: The bar's label.
    """

    def __init__(self, curvatures=None, *, callback=None, total=None, desc="CG solve"):
        from tqdm.auto import tqdm

        self._counted = [
            F for F in curvatures or () if isinstance(getattr(F, "products", None), int)
        ]
        self._start = sum(F.products for F in self._counted)
        self._callback = callback
        self.iterations = 0
        self.residual: float | None = None
        self.bar = tqdm(
            total=total,
            desc=desc,
            unit="it",
            leave=False,
            dynamic_ncols=True,
            disable=not is_main_process(),  # under torch.distributed: rank 0's bar only
        )

    def per_model_products(self) -> int:
        """Products the counting curvatures ran since the bar started."""
        return sum(F.products for F in self._counted) - self._start

    def on_residual(self, residual: float) -> None:
        """The relative residual after the iteration about to be counted (the solver's)."""
        self.residual = residual

    def __call__(self, x) -> None:
        self.iterations += 1
        self.bar.update(1)
        parts = []
        if self.residual is not None:
            parts.append(f"residual {self.residual:.1e}")
        if self._counted:
            parts.append(f"{self.per_model_products()} per-model products")
        if parts:
            self.bar.set_postfix_str(", ".join(parts), False)
        if self._callback is not None:
            self._callback(x)

    def finish(
        self,
        report: MergeReport | None = None,
        *,
        costs: MergeCosts | None = None,
        residual: float | None = None,
    ) -> None:
        """Show the outcome on the bar and close it: a CG ``report``'s true relative
        residual and products, or (a multi-shift solve) the largest true ``residual`` over
        its dampings and the run's ``costs``."""
        if report is not None and report.method == "cg":
            costs, residual = report.costs, report.relative_residual
        if costs is not None and residual is not None:
            self.bar.set_postfix_str(
                f"residual {residual:.2e}, {costs.sum_products} products of the sum = "
                f"{costs.sum_products * max(costs.curvatures, 1)} per-model",
            )
        self.bar.close()

    def __enter__(self) -> SolveProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()  # idempotent


@dataclass
class MergeResult:
    """The merged parameters and a :class:`MergeReport`."""

    params: dict[str, Tensor]
    report: MergeReport

    def load_into(self, module: nn.Module) -> nn.Module:
        """A copy of ``module`` with the merged parameters (see :func:`load_merged`)."""
        return load_merged(module, self.params)


def parameters_of(model: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The parameter dict of a module (detached) or a mapping, as a plain dict."""
    if isinstance(model, nn.Module):
        return {n: p.detach() for n, p in model.named_parameters()}
    if isinstance(model, Mapping):
        return dict(model)
    raise TypeError(f"expected a module or a parameter dict, got {type(model).__name__}")


def load_merged(module: nn.Module, params: Mapping[str, Tensor], *, copy_module: bool = True):
    """Load merged parameters into (a deep copy of) ``module``.

    Parameters not in ``params`` (task heads, buffers) keep the module's values.
    """
    target = copy.deepcopy(module) if copy_module else module
    own = dict(target.named_parameters())
    for name, value in params.items():
        if name not in own:
            raise SpaceMismatchError(f"merged parameter {name!r} is not a parameter of the module")
        if own[name].shape != value.shape:
            raise SpaceMismatchError(
                f"merged parameter {name!r} has shape {tuple(value.shape)}, "
                f"the module's has {tuple(own[name].shape)}"
            )
        with torch.no_grad():
            own[name].copy_(value)
    return target
