"""The merge equation, prepared once and solved at any weights and damping.

.. math::

    \\theta^*(w, \\lambda) = \\theta_0 + (\\lambda I + \\textstyle\\sum_t w_t F_t)^{-1}
    \\textstyle\\sum_t w_t F_t (\\theta_t - \\theta_0), \\qquad
    \\lambda = \\text{damping} \\cdot s(w).

:class:`PreparedMerge` is the one implementation of the equation: :func:`~curvmerge.merge` is
one point of it, a coefficient sweep is many. What does not depend on :math:`w` and
:math:`\\lambda` is computed once:

- diagonal (and identity) curvatures: the stacks :math:`d_t` and :math:`g_t = d_t \\odot
  \\theta_t`, so that with :math:`D = \\sum_t w_t d_t` and :math:`G = \\sum_t w_t g_t` a point
  costs elementwise work only,

  .. math::

      \\theta^* = \\theta_0 + \\frac{G - D \\odot \\theta_0}{\\lambda + D};

- operator curvatures (exact GGN/Fisher): the products :math:`F_t \\theta_s` (or
  :math:`F_t(\\theta_t - \\theta_0)` for a fixed prior) when they fit in ``cache_bytes``, so
  that the right-hand side costs no operator product, and each solve warm-starts CG from
  the previous point's solution;
- the damping scale: the mean diagonal entry :math:`s_t` of each :math:`F_t` (its diagonal
  when cheap, else a Hutchinson estimate), so that the scale of :math:`\\sum_t w_t F_t` is
  :math:`s(w) = \\sum_t w_t s_t` at every point.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from curvmerge.merging.report import (
    ConvergenceError,
    ConvergenceWarning,
    DampingWarning,
    MergeCosts,
    MergeReport,
    MergeResult,
)
from curvmerge.merging.system import (
    DAMPING_DOMINANCE,
    DEFAULT_DAMPING,
    check_damping,
    check_damping_scale,
    check_finite,
    check_inputs,
    check_preconditioner,
    check_weights,
    has_cheap_diagonal,
    make_preconditioner,
    mean_diagonals,
    resolve_prior,
    solve_system,
    system_operator,
    warn_user,
)
from curvmerge.operators import DiagonalOperator, IdentityOperator, LinearOperator
from curvmerge.solve import cg_shifts
from curvmerge.space import ParamSpace

__all__ = ["PreparedMerge", "DampingGridResults", "CROSS_PRODUCT_CACHE_BYTES"]

#: Largest cache of products :math:`F_t \theta_s` (bytes) a :class:`PreparedMerge` keeps.
CROSS_PRODUCT_CACHE_BYTES = 2**30


class DampingGridResults(list):
    """The :class:`~curvmerge.merging.MergeResult` of every damping of a grid
    (:meth:`PreparedMerge.merge_dampings`), in the grid's order.

    Attributes:
        products: Operator products the grid cost, shared ones counted once (the reports'
            ``products`` state what each point needed, so their sum overstates it; their
            ``spent_products`` sum to this).
        shared: Whether the grid was solved by one multi-shift CG run.
        costs: The grid's products and seconds, each counted once
            (:class:`~curvmerge.merging.MergeCosts`).
    """

    def __init__(
        self, results=(), *, products: int = 0, shared: bool = False, costs: MergeCosts = None
    ):
        super().__init__(results)
        self.products = products
        self.shared = shared
        self.costs = costs if costs is not None else MergeCosts()

    @property
    def relative_residual(self) -> float:
        """The largest true relative residual over the grid."""
        return max((r.report.relative_residual for r in self), default=0.0)


def _curvature_keys(curvatures) -> tuple:
    """The cache key of every curvature that computes from a model (its ``state_key()``,
    as :class:`~curvmerge.GGNOperator` has), ``None`` for the others."""
    return tuple(
        F.state_key() if callable(getattr(F, "state_key", None)) else None for F in curvatures or ()
    )


def _flatten_into(space: ParamSpace, tensors: Mapping[str, Tensor], out: Tensor) -> None:
    """Copy the space's entries of ``tensors`` into the flat row ``out`` (no temporary)."""
    for (name, _), sl in zip(space, space.slices().values(), strict=True):
        out[sl].copy_(tensors[name].detach().reshape(-1))


def _norm(x: Tensor) -> float:
    return float(torch.linalg.vector_norm(x, dtype=torch.float64))


class PreparedMerge:
    """The merge equation with its per-model statistics prepared once; :meth:`merge` solves
    it at any weights and damping, exactly as :func:`~curvmerge.merge` does.

    Args:
        thetas: The models (modules or parameter dicts).
        curvatures: One operator per model; ``None`` means identity (weighted averaging).
            All :class:`~curvmerge.operators.DiagonalOperator` gives the elementwise path,
            anything else the CG path.
        prior: :math:`\\theta_0`, as in :func:`~curvmerge.merge`: ``"mean"``, ``"zero"``
            (or ``None``), ``"base"`` (with ``base``) or a parameter dict.
        base: The model the tasks were fine-tuned from (for ``prior="base"``).
        params: Names or a regex of the merged parameters (see :func:`~curvmerge.merge`).
        damping_scale: ``"auto"`` (the mean diagonal of :math:`\\sum_t w_t F_t`) or a fixed
            positive scale (``1.0`` makes the damping absolute).
        rtol: CG relative tolerance (operator path).
        maxiter: CG iteration limit (default ``10 * P``).
        preconditioner: As in :func:`~curvmerge.merge`.
        warm_start: Start each CG solve from the previous point's solution (the first from
            the diagonal merge, when the curvatures have a cheap diagonal).
        cache_bytes: Memory allowed for the products :math:`F_t \\theta_s` (mean prior) or
            :math:`F_t (\\theta_t - \\theta_0)` (fixed prior) that make the right-hand side
            free; above it (and with ``0``, as :func:`~curvmerge.merge` uses), each point
            pays one product per model.

    Attributes:
        kind: ``"identity"``, ``"diagonal"`` or ``"operator"``.
        prepare_costs: Products, diagonal passes and their seconds spent preparing
            (:class:`~curvmerge.merging.MergeCosts`).
        prepare_seconds: Wall-clock time of the preparation.

    Example:
        >>> a, b = {"w": torch.tensor([0.0, 2.0])}, {"w": torch.tensor([2.0, 4.0])}
        >>> prepared = PreparedMerge([a, b])
        >>> prepared.merge([0.25, 0.75]).params["w"]
        tensor([1.5000, 3.5000])
    """

    #: Entries on which a closed-form point measures how much of its undamped step it kept
    #: (``MergeReport.curvature_share``): evenly spaced, all of them in smaller spaces.
    SHARE_ENTRIES = 2**16

    def __init__(
        self,
        thetas: Sequence[nn.Module | Mapping[str, Tensor]],
        curvatures: Sequence[LinearOperator] | None = None,
        *,
        prior: str | Mapping[str, Tensor] | None = "mean",
        base: nn.Module | Mapping[str, Tensor] | None = None,
        params: str | Sequence[str] | None = None,
        damping_scale: str | float = "auto",
        rtol: float = 1e-6,
        maxiter: int | None = None,
        preconditioner: str | LinearOperator | None = None,
        warm_start: bool = True,
        cache_bytes: int = CROSS_PRODUCT_CACHE_BYTES,
    ):
        start = time.perf_counter()
        dicts, curvatures, space, dtype, device = check_inputs(thetas, curvatures, params)
        T, P = len(dicts), space.size
        self.num_models, self.space = T, space
        self.dtype, self.device = dtype, device
        self._reference = {n: dicts[0][n] for n in space.names}
        self.prior_name, self._prior = resolve_prior(prior, base, space, dtype, device)
        self._given_scale = check_damping_scale(damping_scale)
        check_preconditioner(preconditioner, P, curvatures)
        self.rtol, self.maxiter = float(rtol), maxiter
        self.preconditioner, self.warm_start = preconditioner, warm_start
        self.curvatures = curvatures
        costs = MergeCosts()
        self._d = self._g = self._stack = self._rhs = self._cross = None
        self._last: Tensor | None = None

        self.thetas = torch.empty(T, P, dtype=dtype, device=device)
        for i, d in enumerate(dicts):
            _flatten_into(space, d, self.thetas[i])
            check_finite(self.thetas[i], f"model {i}", space)

        if curvatures is None:
            self.kind, self._method = "identity", "average"
            self._means, self._scale_source = [1.0] * T, "identity"
        elif all(isinstance(F, DiagonalOperator) for F in curvatures):
            self.kind = "diagonal"
            identity = all(isinstance(F, IdentityOperator) for F in curvatures)
            self._method = "average" if identity else "diagonal"
            # one stack [d_1..d_T, 1 | g_1..g_T, theta_1..theta_T (or theta_0)]: a point is
            # two matrix-vector products over contiguous blocks and one division
            rows = 2 * T + 1 + (T if self._prior is None else 1)
            self._stack = torch.empty(rows, P, dtype=dtype, device=device)
            self._d = self._stack[:T]
            self._means, _, source = mean_diagonals(
                curvatures, space, dtype, device, need_diagonal=True, costs=costs, out=self._d
            )
            self._scale_source = "identity" if identity else source
            self._stack[T].fill_(1.0)
            self._g = self._stack[T + 1 : 2 * T + 1]
            torch.mul(self._d, self.thetas, out=self._g)
            if self._prior is None:
                self._stack[2 * T + 1 :].copy_(self.thetas)
                self.thetas = self._stack[2 * T + 1 :]
            else:
                self._stack[2 * T + 1].copy_(self._prior)
                self.thetas = None  # only needed for g_t = d_t * theta_t
            # a seeded random subset of entries, copied once, on which each point measures its
            # step (a stride could line up with the rows of a weight matrix)
            if P <= self.SHARE_ENTRIES:
                self._share = self._stack
            else:
                g = torch.Generator().manual_seed(0)
                pick = torch.randperm(P, generator=g)[: self.SHARE_ENTRIES].sort().values
                self._share = self._stack[:, pick.to(device)].contiguous()
        else:
            self.kind, self._method = "operator", "cg"
            stack = warm_start or preconditioner == "diagonal"
            self._means = self._scale_source = None
            if self._given_scale is None:
                self._means, self._d, self._scale_source = mean_diagonals(
                    curvatures, space, dtype, device, need_diagonal=stack, costs=costs
                )
            elif stack and all(has_cheap_diagonal(F) for F in curvatures):
                # a given scale: diagonals only for warm starts and Jacobi, never estimated
                _, self._d, _ = mean_diagonals(
                    curvatures, space, dtype, device, need_diagonal=True, costs=costs
                )
            self._prepare_rhs(cache_bytes, costs)
        self.prepare_costs = costs
        # what was prepared from the curvatures (right-hand sides, diagonals, scales) holds
        # only while the models they read stay as they were
        self._curvature_keys = _curvature_keys(self.curvatures)
        self.prepare_seconds = time.perf_counter() - start

    def _prepare_rhs(self, cache_bytes: int, costs: MergeCosts) -> None:
        T, P = self.num_models, self.space.size
        size = self.thetas.element_size() * P * T
        t0 = time.perf_counter()
        if self._prior is not None and size <= cache_bytes:
            # fixed prior: F_t (theta_t - theta_0), one product per model
            self._rhs = torch.stack(
                [
                    (F @ (self.thetas[t] - self._prior)).to(self.device, self.dtype)
                    for t, F in enumerate(self.curvatures)
                ]
            )
            costs.rhs_products += T
        elif self._prior is None and size * T <= cache_bytes:
            # mean prior: F_t theta_s for all s, one block product per model
            self._cross = torch.stack(
                [F.matmat(self.thetas.T).to(self.device, self.dtype) for F in self.curvatures]
            )  # [T, P, T]
            costs.rhs_products += T * T
        costs.rhs_seconds += time.perf_counter() - t0

    @property
    def prepare_products(self) -> int:
        """Operator products spent preparing (``prepare_costs.products``)."""
        return self.prepare_costs.products

    def reset(self) -> None:
        """Forget the previous solution (the next CG solve starts cold or from the diagonal)."""
        self._last = None

    def resume_from(self, params: Mapping[str, Tensor]) -> None:
        """Start the next CG solve from these merged parameters (a warm start, kept only if
        it beats :math:`x = 0`), for example to re-solve a point found at a loose tolerance.

        Args:
            params: Merged parameters over this merge's space (a ``MergeResult.params``).
        """
        flat = torch.empty(self.space.size, dtype=self.dtype, device=self.device)
        _flatten_into(self.space, {n: params[n].to(self.device, self.dtype) for n in params}, flat)
        check_finite(flat, "the parameters to resume from", self.space)
        self._last = flat

    # ------------------------------------------------------------------ merging
    def merge(
        self,
        weights: Sequence[float] | None = None,
        damping: float = DEFAULT_DAMPING,
        *,
        require_convergence: bool = False,
        callback=None,
    ) -> MergeResult:
        """The merge at ``weights`` (default :math:`1/T`) and ``damping``.

        Args:
            weights: Coefficients :math:`w_t \\ge 0`.
            damping: Relative to the damping scale (see :func:`~curvmerge.merge`).
            require_convergence: Raise :class:`~curvmerge.merging.ConvergenceError` instead
                of warning when CG misses its tolerance.
            callback: Passed to CG (called with the task-vector iterate).

        Returns:
            A :class:`~curvmerge.merging.MergeResult`, as :func:`~curvmerge.merge` returns
            it; its report counts this point's costs (see ``prepare_costs`` for the rest).
        """
        start = time.perf_counter()
        wl, w, report, lam, scale, source = self._point(weights, damping)
        if self.kind == "identity":
            merged = self._identity(w, lam, report)
        elif self.kind == "diagonal":
            merged = self._closed_form(w, lam, report)
        else:
            merged = self._solve(w, lam, report, callback)
        return self._result(merged, report, scale, source, start, require_convergence)

    def merge_dampings(
        self,
        weights: Sequence[float] | None = None,
        dampings: Sequence[float] = (DEFAULT_DAMPING,),
        *,
        require_convergence: bool = False,
        callback=None,
    ) -> DampingGridResults:
        """The merges at ``weights`` for every damping of a grid, as :meth:`merge` at each.

        With operator curvatures and no preconditioner, the systems :math:`(\\lambda_j I +
        \\sum_t w_t F_t)\\, y = b` (:math:`\\lambda_j = \\text{damping}_j \\cdot s(w)`) are
        shifts of one operator with one right-hand side: they are solved together by
        multi-shift CG (:func:`~curvmerge.solve.cg_shifts`) from one Krylov space, at the
        cost of the hardest (smallest) damping alone, each with its own stopping test and
        true residual. Multi-shift CG starts from zero (no warm start). A damping whose true
        residual misses the tolerance although its recurrence passed (low precision) is
        finished by a warm-started :meth:`merge`-style CG solve (its products are added)
        within the iterations the shared run left of ``maxiter``, so that the grid's
        iterations stay within ``maxiter``.
        Closed forms, a preconditioner or a single damping: :meth:`merge` per damping.

        Args:
            weights: Coefficients :math:`w_t \\ge 0` (default :math:`1/T`).
            dampings: The damping grid, relative to the damping scale.
            require_convergence: As in :meth:`merge`.
            callback: Passed to the multi-shift CG run (called with the ``[P, S]`` block of
                task-vector iterates; a :class:`~curvmerge.merging.SolveProgress` is one bar
                for the grid), or to each :meth:`merge` when the grid is not shared.

        Returns:
            A :class:`DampingGridResults`: one :class:`~curvmerge.merging.MergeResult` per
            damping, in order. Each report states the products its own point needed (the
            right-hand side, the shared iterations until its own test passed, its column
            of the true-residual block) and its true residual; the products were shared,
            so the list's ``products`` and ``costs`` count them once (the grid's total
            cost), and the reports' ``spent_products`` put them on the first result.
        """
        try:
            dampings = [check_damping(d) for d in dampings]
        except ValueError as err:
            raise ValueError(f"dampings: {err}") from None
        if self.kind != "operator" or self.preconditioner is not None or len(dampings) < 2:
            results = [
                self.merge(weights, d, require_convergence=require_convergence, callback=callback)
                for d in dampings
            ]
            costs = MergeCosts()
            for r in results:
                costs = costs + r.report.costs
            return DampingGridResults(
                results, products=sum(r.report.products for r in results), costs=costs
            )
        start = time.perf_counter()
        points = [self._point(weights, d) for d in dampings]
        wl, w = points[0][0], points[0][1]
        lams = [pt[3] for pt in points]
        grid_costs = MergeCosts()
        theta0, b = self._rhs_of(w, wl, grid_costs)
        A = system_operator(self.curvatures, wl, 0.0, self.space, self.dtype, self.device)
        t0 = time.perf_counter()
        solved = cg_shifts(A, b, lams, rtol=self.rtol, maxiter=self.maxiter, callback=callback)
        cg_seconds = time.perf_counter() - t0
        grid_costs.cg_products += solved.products
        grid_costs.cg_seconds += cg_seconds
        grid_costs.curvatures = points[0][2].costs.curvatures
        bn = _norm(b)
        results = []
        budget = None if self.maxiter is None else max(self.maxiter - solved.iterations, 0)
        for pt, lam, r in zip(points, lams, solved, strict=True):
            report = pt[2]
            costs = report.costs
            costs.rhs_products += grid_costs.rhs_products
            costs.rhs_seconds += grid_costs.rhs_seconds
            costs.cg_products += r.products
            costs.cg_seconds += cg_seconds  # shared by the grid
            report.method, report.warm_start = "cg", False
            report.shared_solve = len(dampings)
            report.spent_products = 0  # the run's products go on the first result below
            report.converged, report.iterations = r.converged, r.iterations
            report.relative_residual = r.relative_residual
            report.residual_history = list(r.residuals)
            y = r.x
            if r.info > 0 and budget != 0:  # budget 0: the run hit maxiter
                # the recurrence passed, the true residual missed (low precision): finish from
                # this x, within what the shared run left of maxiter (the grid's bound)
                Aj = system_operator(self.curvatures, wl, lam, self.space, self.dtype, self.device)
                before = MergeCosts(**vars(costs))
                history = report.residual_history
                y = solve_system(Aj, b, y, None, report, rtol=self.rtol, maxiter=budget)
                if budget is not None:
                    budget -= report.iterations
                report.iterations += r.iterations
                report.residual_history = history + report.residual_history
                for k in ("cg", "warm_start"):  # the finishing solve's own products
                    for unit in ("products", "seconds"):
                        name = f"{k}_{unit}"
                        spent = getattr(costs, name) - getattr(before, name)
                        setattr(grid_costs, name, getattr(grid_costs, name) + spent)
            if lam > 0 and bn > 0:
                report.curvature_share = min(1.0, _norm(b - lam * y) / bn)
            merged = theta0 + y
            check_finite(merged, "the merged parameters", self.space)
            self._last = merged
            results.append(
                self._result(merged, report, pt[4], pt[5], start, require_convergence, fresh=True)
            )
        results[0].report.spent_products = grid_costs.products
        return DampingGridResults(
            results, products=grid_costs.products, shared=True, costs=grid_costs
        )

    def merge_subspace(
        self,
        points: Sequence[tuple[Sequence[float] | None, float]],
        *,
        rtol: float | None = None,
        max_vectors: int | None = None,
        check_every: int = 5,
        require_convergence: bool = False,
        callback=None,
    ) -> DampingGridResults:
        """The merges at many ``(weights, damping)`` points from one reduced basis.

        Every point's system :math:`(\\lambda I + \\sum_t w_t F_t)\\, y = b_w` is solved in
        one shared, growing subspace (:func:`~curvmerge.reduced_basis.reduced_basis_solve`):
        its basis vectors cost one product per model each, made once; every point's
        Galerkin solution and true residual then cost no product. The basis grows until
        every point's true relative residual is at most ``rtol`` (or it has
        ``max_vectors`` vectors: the points above ``rtol`` are reported as not converged).
        Meant for screening a sweep (a loose ``rtol``) whose chosen point is then solved
        accurately by :meth:`merge` (:meth:`resume_from` its screened solution). Operator
        curvatures only; memory about :math:`(T + 1)` vectors of size :math:`P` per basis
        vector (at most ``max_vectors`` of them) plus one merged vector per point (the
        right-hand sides are formed from the prepared products while needed, when the
        preparation kept them).

        Args:
            points: ``(weights, damping)`` pairs (``None`` weights: :math:`1/T`).
            rtol: The tolerance every point must reach (default: this merge's ``rtol``).
            max_vectors: Basis size limit (default: ``maxiter``, else 500).
            check_every: Basis vectors between two checks of every point's residual.
            require_convergence: As in :meth:`merge`.
            callback: Called with the basis size and the worst relative residual after
                each check.

        Returns:
            A :class:`DampingGridResults` in the points' order; reports state the basis size
            as ``iterations``, each point's true residual, and put the basis's products on
            the first result (``spent_products``).

        Raises:
            ValueError: Not operator curvatures, or a bad point.
        """
        from curvmerge.reduced_basis import combine, reduced_basis_solve

        if self.kind != "operator":
            raise ValueError(
                f"merge_subspace needs operator curvatures (these merge by {self._method}: "
                "every point is already cheap with merge())"
            )
        rtol = self.rtol if rtol is None else float(rtol)
        cap = max_vectors or self.maxiter or 500
        start = time.perf_counter()
        prepared = [self._point(w, d) for w, d in points]
        grid_costs = MergeCosts()
        pieces = self._rhs_pieces()
        for c in pieces or ():
            check_finite(c, "a prepared right-hand side F_t theta", self.space)
        systems = []
        for wl, w, report, lam, _, _ in prepared:
            if pieces is not None:  # b_w combines prepared products: formed when needed
                systems.append((wl, lam, self._rhs_coefficients(w)))
                continue
            _, b = self._rhs_of(w, wl, report.costs)  # the point's own right-hand side
            grid_costs.rhs_products += report.costs.rhs_products
            grid_costs.rhs_seconds += report.costs.rhs_seconds
            systems.append((wl, lam, b))
        t0 = time.perf_counter()
        solved = reduced_basis_solve(
            self.curvatures, systems, rhs_pieces=pieces, rtol=rtol, max_vectors=cap,
            check_every=check_every, callback=callback,
        )  # fmt: skip
        grid_costs.cg_products += solved.vectors
        grid_costs.cg_seconds += time.perf_counter() - t0
        # the curvatures each basis vector was multiplied by: those some point weighs
        grid_costs.curvatures = sum(
            any(wl[t] != 0 for wl, _, _ in systems) for t in range(self.num_models)
        )
        results = []
        for i, (pt, res, ok) in enumerate(
            zip(prepared, solved.relative_residuals, solved.converged, strict=True)
        ):
            y, solved.solutions[i] = solved.solutions[i], None  # one point's vectors at a time
            report, lam, b = pt[2], pt[3], systems[i][2]
            if pieces is not None:
                b = combine(b, pieces)
            report.method, report.warm_start = "subspace", False
            report.costs.cg_products += solved.vectors
            report.costs.cg_seconds += grid_costs.cg_seconds  # shared by the points
            report.costs.curvatures = grid_costs.curvatures
            report.shared_solve = len(points)
            report.spent_products = 0
            report.converged, report.iterations = ok, solved.vectors
            report.relative_residual = res
            report.residual_history = list(solved.history)  # the worst point's, per check
            bn = _norm(b)
            if lam > 0 and bn > 0:
                report.curvature_share = min(1.0, _norm(b - lam * y) / bn)
            merged = y.add_(self._theta0(pt[1]))  # in place: theta_0 + y
            check_finite(merged, "the merged parameters", self.space)
            results.append(
                self._result(merged, report, pt[4], pt[5], start, require_convergence, fresh=True)
            )
        results[0].report.spent_products = grid_costs.products
        return DampingGridResults(
            results, products=grid_costs.products, shared=True, costs=grid_costs
        )

    def _rhs_pieces(self) -> list[Tensor] | None:
        """Prepared vectors :math:`c_j` that every right-hand side combines (``None`` when
        none were prepared): :math:`F_t (\\theta_t - \\theta_0)` for a fixed prior,
        :math:`F_t \\theta_s` for the mean prior (:meth:`_rhs_coefficients`)."""
        if self._rhs is not None:
            return list(self._rhs)
        if self._cross is not None:
            T = self.num_models
            return [self._cross[t, :, s] for t in range(T) for s in range(T)]
        return None

    def _rhs_coefficients(self, w: Tensor) -> list[float]:
        """:math:`a` with :math:`b_w = \\sum_j a_j c_j` over :meth:`_rhs_pieces`: the
        weights for a fixed prior; for the mean prior
        :math:`b_w = \\sum_t w_t F_t \\theta_t - \\sum_{t,s} w_t \\frac{w_s}{W}
        F_t \\theta_s`."""
        if self._rhs is not None:
            return w.tolist()
        a = torch.diag(w) - torch.outer(w, w / w.sum())  # [t, s]
        return a.flatten().tolist()

    def _point(self, weights, damping):
        """Checked weights, the point's report, its λ and damping scale."""
        if _curvature_keys(self.curvatures) != self._curvature_keys:
            changed = next(
                i
                for i, (a, b) in enumerate(
                    zip(_curvature_keys(self.curvatures), self._curvature_keys, strict=True)
                )
                if a != b
            )
            raise RuntimeError(
                f"curvature {changed} changed since this PreparedMerge was prepared (its "
                "model's parameters or buffers were updated): its prepared right-hand sides "
                "and diagonals are stale; prepare a new PreparedMerge"
            )
        T = self.num_models
        wl = check_weights(weights, T, 1.0 / T)
        damping = check_damping(damping)
        w = torch.tensor(wl, dtype=self.dtype, device=self.device)
        report = MergeReport(
            method=self._method, num_models=T, weights=wl, damping=damping, prior=self.prior_name
        )
        if self._given_scale is not None:
            scale, source = self._given_scale, "given"
        else:
            scale = sum(wt * s for wt, s in zip(wl, self._means, strict=True))
            source = self._scale_source
        lam = damping * scale
        if self.kind == "identity" and self._prior is None:
            report.damping = None  # the average, whatever the damping
        else:
            report.damping_scale, report.damping_scale_source = scale, source
            report.effective_damping = lam
        return wl, w, report, lam, scale, source

    def _result(
        self, merged, report, scale, source, start, require_convergence, fresh=False
    ) -> MergeResult:
        """Warnings, the parameter dict and the timing of a point."""
        wl, damping, lam = report.weights, report.damping, report.effective_damping
        if self.kind == "operator" and not report.converged:
            msg = (
                f"CG did not converge at weights={wl}, damping={damping:g} (λ={lam:.3g}): "
                f"relative residual {report.relative_residual:.2e} > rtol={self.rtol:g} "
                f"after {report.iterations} iterations; the merged parameters are "
                "inaccurate. Raise maxiter or the damping, or use a preconditioner."
            )
            if require_convergence:
                raise ConvergenceError(msg)
            warn_user(msg, ConvergenceWarning)
        report.damping_dominates = report.curvature_share < DAMPING_DOMINANCE
        if report.damping_dominates:
            hint = (
                "leave damping_scale='auto' so that the damping is relative to the curvature"
                if source == "given"
                else "lower the damping"
            )
            warn_user(
                f"the damping dominates the curvature: the merge kept "
                f"{report.curvature_share:.1e} of its undamped step, so it is within about "
                f"that fraction of its prior ({self.prior_name}); λ = {lam:.3g} = damping "
                f"{damping:g} x scale {scale:.3g} ({source}). To merge by curvature, {hint}.",
                DampingWarning,
            )
        out = {}
        for name, value in self.space.unflatten(merged).items():
            ref = self._reference[name]
            converted = value.to(device=ref.device, dtype=ref.dtype)
            # closed forms return a fresh tensor; CG's is kept as the next warm start
            new = fresh is False and (converted is not value or self.kind != "operator")
            out[name] = converted if new else converted.clone()
        report.products = report.costs.products
        if report.spent_products is None:
            report.spent_products = report.products
        report.seconds = time.perf_counter() - start
        return MergeResult(out, report)

    def _theta0(self, w: Tensor) -> Tensor:
        if self._prior is not None:
            return self._prior
        return torch.mv(self.thetas.T, w / w.sum())

    def _identity(self, w: Tensor, lam: float, report: MergeReport) -> Tensor:
        """:math:`\\theta_0 + \\frac{W}{W + \\lambda}(\\bar\\theta - \\theta_0)`."""
        W = float(w.sum())
        average = torch.mv(self.thetas.T, w / W)
        if self._prior is None:
            return average
        a = W / (W + lam)
        if lam > 0 and bool((average != self._prior).any()):
            report.curvature_share = a
        return torch.add(average.mul_(a), self._prior, alpha=1.0 - a)

    def _closed_form(self, w: Tensor, lam: float, report: MergeReport) -> Tensor:
        """:math:`(\\lambda\\theta_0 + G) / (\\lambda + D)`, with :math:`\\theta_0` where
        :math:`\\lambda + D = 0`."""
        T = self.num_models
        W = w.sum()
        lam_t = w.new_tensor([lam])
        denom = torch.mv(self._stack[: T + 1].T, torch.cat([w, lam_t]))  # lambda + D
        if self._prior is None:  # theta_0 = sum_t (w_t / W) theta_t
            coeff = torch.cat([w, w * (lam / W)])
        else:
            coeff = torch.cat([w, lam_t])
        numer = torch.mv(self._stack[T + 1 :].T, coeff)  # G + lambda theta_0
        if lam > 0:
            report.curvature_share = self._kept_share(w, lam)
            return numer.div_(denom)
        unseen = denom == 0
        report.unseen = int(unseen.sum())
        if not report.unseen:
            return numer.div_(denom)
        return torch.where(unseen, self._theta0(w), numer / torch.where(unseen, 1.0, denom))

    def _kept_share(self, w: Tensor, lam: float) -> float:
        """:math:`\\|y\\| / \\|y_{\\lambda=0}\\|` of the closed form's step :math:`y =
        (G - D\\theta_0)/(\\lambda + D)`, on at most :attr:`SHARE_ENTRIES` entries (a
        seeded random subset; all of them in spaces that small): a sweep point stays two
        products."""
        T, sub = self.num_models, self._share
        D = torch.mv(sub[:T].T, w)
        G = torch.mv(sub[T + 1 : 2 * T + 1].T, w)
        if self._prior is None:
            theta0 = torch.mv(sub[2 * T + 1 :].T, w / w.sum())
        else:
            theta0 = sub[2 * T + 1]
        b = torch.addcmul(G, D, theta0, value=-1.0)
        full = _norm(torch.nan_to_num_(b / D, nan=0.0, posinf=0.0, neginf=0.0))
        if full == 0:
            return 1.0
        return min(1.0, _norm(b.div_(D.add_(lam))) / full)

    def _rhs_of(self, w: Tensor, wl: list[float], costs: MergeCosts) -> tuple[Tensor, Tensor]:
        """:math:`\\theta_0` and :math:`b = \\sum_t w_t F_t (\\theta_t - \\theta_0)` (checked)."""
        space, dtype, device = self.space, self.dtype, self.device
        theta0 = self._theta0(w)
        if self._rhs is not None:
            b = w @ self._rhs
        elif self._cross is not None:
            idx = torch.arange(self.num_models, device=device)
            own = self._cross[idx, :, idx]  # F_t theta_t, [T, P]
            b = w @ (own - self._cross @ (w / w.sum()))
        else:
            t0 = time.perf_counter()
            b = torch.zeros(space.size, dtype=dtype, device=device)
            for wt, F, th in zip(wl, self.curvatures, self.thetas, strict=True):
                if wt != 0:
                    b = b + wt * (F @ (th - theta0)).to(device, dtype)
                    costs.rhs_products += 1
            costs.rhs_seconds += time.perf_counter() - t0
        check_finite(b, "the right-hand side sum_t w_t F_t (theta_t - theta_0)", space)
        return theta0, b

    def _solve(self, w: Tensor, lam: float, report: MergeReport, callback) -> Tensor:
        space, dtype, device = self.space, self.dtype, self.device
        wl = w.tolist()
        A = system_operator(self.curvatures, wl, lam, space, dtype, device)
        theta0, b = self._rhs_of(w, wl, report.costs)

        diag = None if self._d is None else torch.mv(self._d.T, w)
        M = make_preconditioner(self.preconditioner, self.curvatures, wl, lam, diag, space, report)
        x0 = None
        if self.warm_start and self._last is not None:
            x0 = self._last - theta0  # the previous point
        elif self.warm_start and diag is not None:
            denom = diag + lam
            numer = w @ (self._d * (self.thetas - theta0))
            x0 = torch.where(denom > 0, numer / torch.where(denom > 0, denom, 1.0), 0.0)
        y = solve_system(
            A, b, x0, M, report, rtol=self.rtol, maxiter=self.maxiter, callback=callback
        )
        bn = _norm(b)
        if lam > 0 and bn > 0:
            report.curvature_share = min(1.0, _norm(b - lam * y) / bn)
        merged = theta0 + y
        check_finite(merged, "the merged parameters", space)
        self._last = merged
        return merged
