"""Merges that reuse per-model statistics: prepare once, merge at many coefficients.

A coefficient sweep calls the merge equation

.. math::

    \\theta^*(w, \\lambda) = \\theta_0 + (\\lambda I + \\textstyle\\sum_t w_t F_t)^{-1}
    \\textstyle\\sum_t w_t F_t (\\theta_t - \\theta_0)

at many weights :math:`w` and dampings :math:`\\lambda`. :class:`PreparedMerge` computes what
does not depend on them once:

- diagonal (and identity) curvatures: the stacks :math:`d_t` and :math:`g_t = d_t \\odot
  \\theta_t`, so that with :math:`D = \\sum_t w_t d_t` and :math:`G = \\sum_t w_t g_t` a point
  costs elementwise work only,

  .. math::

      \\theta^* = \\theta_0 + \\frac{G - D \\odot \\theta_0}{\\lambda + D};

- operator curvatures (exact GGN/Fisher): the products :math:`F_t \\theta_s` (or
  :math:`F_t(\\theta_t - \\theta_0)` for a fixed prior), so that the right-hand side costs no
  operator product, and each solve warm-starts CG from the previous point's solution.

Every point equals :func:`~curvmerge.merge` called with the same arguments (up to rounding,
and CG's tolerance for operators).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from curvmerge.merging.equation import (
    ConvergenceWarning,
    MergeReport,
    MergeResult,
    check_inputs,
    check_weights,
    make_preconditioner,
    solve_system,
    system_operator,
)
from curvmerge.operators import DiagonalOperator, IdentityOperator, LinearOperator
from curvmerge.space import ParamSpace

__all__ = ["PreparedMerge"]

#: Largest cache of cross products :math:`F_t \theta_s` (bytes) kept for the mean prior.
CROSS_PRODUCT_CACHE_BYTES = 2**30


def _finite(x: Tensor, what: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what} contains NaN or Inf")


def _check_row(x: Tensor, what: str, nonnegative: bool = False) -> None:
    """One pass: NaN/Inf anywhere (NaN propagates through min/max), and the sign."""
    lo, hi = torch.aminmax(x) if x.numel() else (x.new_zeros(()), x.new_zeros(()))
    if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
        raise ValueError(f"{what} contains NaN or Inf")
    if nonnegative and float(lo) < 0:
        raise ValueError(f"{what} has negative diagonal entries: not PSD")


def _flatten_into(space: ParamSpace, tensors: Mapping[str, Tensor], out: Tensor) -> None:
    """Copy the space's entries of ``tensors`` into the flat row ``out`` (no temporary)."""
    for (name, _), sl in zip(space, space.slices().values(), strict=True):
        out[sl].copy_(tensors[name].detach().reshape(-1))


class PreparedMerge:
    """Per-model statistics prepared once; :meth:`merge` at any weights and damping.

    Args:
        thetas: The models (modules or parameter dicts).
        curvatures: One operator per model; ``None`` means identity (weighted averaging).
            All :class:`~curvmerge.operators.DiagonalOperator` gives the elementwise path,
            anything else the CG path.
        prior: ``"mean"`` (the :math:`w`-weighted average), ``None`` (zero) or a parameter
            dict (for example the base model), as in :func:`~curvmerge.merge`.
        params: Names or a regex of the merged parameters when ``curvatures`` is ``None``.
        rtol: CG relative tolerance (operator path).
        maxiter: CG iteration limit (default ``10 * P``).
        preconditioner: ``None`` (plain CG, the default, as :func:`~curvmerge.merge`),
            ``"diagonal"`` (Jacobi, when the operators have a diagonal) or a fixed operator
            approximating the inverse.
        warm_start: Start each CG solve from the previous point's solution (the first from the
            diagonal merge, when diagonals are available).
        cache_bytes: Memory allowed for the cross products :math:`F_t \\theta_s` that make the
            mean prior's right-hand side free; above it, each point pays :math:`T` products.

    Attributes:
        kind: ``"identity"``, ``"diagonal"`` or ``"operator"``.
        prepare_seconds: Time spent preparing (flattening, stacking, products).
        prepare_products: Operator products spent preparing.

    Example:
        >>> a, b = {"w": torch.tensor([0.0, 2.0])}, {"w": torch.tensor([2.0, 4.0])}
        >>> prepared = PreparedMerge([a, b])
        >>> prepared.merge([0.25, 0.75]).params["w"]
        tensor([1.5000, 3.5000])
    """

    def __init__(
        self,
        thetas: Sequence[nn.Module | Mapping[str, Tensor]],
        curvatures: Sequence[LinearOperator] | None = None,
        *,
        prior: str | Mapping[str, Tensor] | None = "mean",
        params: str | Sequence[str] | None = None,
        rtol: float = 1e-6,
        maxiter: int | None = None,
        preconditioner: str | LinearOperator | None = None,
        warm_start: bool = True,
        cache_bytes: int = CROSS_PRODUCT_CACHE_BYTES,
    ):
        start = time.perf_counter()
        dicts, curvatures, space, dtype, device = check_inputs(thetas, curvatures, params)
        self.num_models = len(dicts)
        self.space = space
        self._reference = {n: dicts[0][n] for n in space.names}
        self.dtype, self.device = dtype, device
        T, P = self.num_models, space.size

        if isinstance(prior, str) and prior == "mean":
            self.prior_name, self._prior = "mean", None
        elif prior is None:
            self.prior_name = "zero"
            self._prior = torch.zeros(P, dtype=dtype, device=device)
        elif isinstance(prior, Mapping):
            self.prior_name = "given"
            self._prior = space.flatten(prior).to(device=device, dtype=dtype)
            _check_row(self._prior, "the prior")
        else:
            raise ValueError(f"prior must be 'mean', None or a parameter dict, got {prior!r}")

        self.rtol, self.maxiter = float(rtol), maxiter
        self.preconditioner, self.warm_start = preconditioner, warm_start
        self.curvatures = curvatures
        self.prepare_products = 0
        self._diags = self._stack = self._rhs = self._cross = None
        self._last: Tensor | None = None

        diagonal = curvatures is not None and all(
            isinstance(F, DiagonalOperator) for F in curvatures
        )
        if diagonal:
            # one stack [d_1..d_T, 1 | g_1..g_T, theta_1..theta_T (or theta_0)], filled in
            # place: a point is two matrix-vector products over contiguous blocks
            # (denominator, numerator) and one division
            rows = 2 * T + 1 + (T if self._prior is None else 1)
            self._stack = torch.empty(rows, P, dtype=dtype, device=device)
            self._diags = self._stack[:T]
            self._stack[T].fill_(1.0)
            if self._prior is None:
                self.thetas = self._stack[2 * T + 1 :]
            else:
                self._stack[2 * T + 1].copy_(self._prior)
                self.thetas = torch.empty(T, P, dtype=dtype, device=device)
        else:
            self.thetas = torch.empty(T, P, dtype=dtype, device=device)
        for i, d in enumerate(dicts):
            _flatten_into(space, d, self.thetas[i])
            _check_row(self.thetas[i], f"model {i}")

        if curvatures is None:
            self.kind, self._method = "identity", "average"
        elif diagonal:
            self.kind = "diagonal"
            identity = all(isinstance(F, IdentityOperator) for F in curvatures)
            self._method = "average" if identity else "diagonal"
            self._diag_stack(curvatures, out=self._diags)
            torch.mul(self._diags, self.thetas, out=self._stack[T + 1 : 2 * T + 1])
            if self._prior is not None:
                self.thetas = None  # only needed for g_t = d_t * theta_t
        else:
            self.kind, self._method = "operator", "cg"
            try:
                self._diags = self._diag_stack(curvatures)
            except NotImplementedError:
                self._diags = None
            if self._prior is not None:  # fixed prior: F_t (theta_t - theta_0), once
                self._rhs = torch.stack(
                    [
                        (F @ (self.thetas[t] - self._prior)).to(device, dtype)
                        for t, F in enumerate(curvatures)
                    ]
                )
                self.prepare_products = T
            elif T * T * space.size * self.thetas.element_size() <= cache_bytes:
                # mean prior: F_t theta_s for all s, one block product per model
                self._cross = torch.stack(
                    [F.matmat(self.thetas.T).to(device, dtype) for F in curvatures]
                )  # [T, P, T]
                self.prepare_products = T * T
        self.prepare_seconds = time.perf_counter() - start

    def _diag_stack(self, curvatures, out: Tensor | None = None) -> Tensor:
        if out is None:
            out = torch.empty(
                len(curvatures), self.space.size, dtype=self.dtype, device=self.device
            )
        for i, F in enumerate(curvatures):
            out[i].copy_(F.diagonal())
            _check_row(out[i], f"curvature {i}", nonnegative=True)
        return out

    # ------------------------------------------------------------------ merging
    def _theta0(self, w: Tensor) -> Tensor:
        if self._prior is not None:
            return self._prior
        return (w @ self.thetas) / w.sum()

    def reset(self) -> None:
        """Forget the previous solution (the next CG solve starts cold or from the diagonal)."""
        self._last = None

    def merge(self, weights: Sequence[float] | None = None, damping: float = 1e-3) -> MergeResult:
        """The merge at ``weights`` (default :math:`1/T`) and ``damping``.

        Returns:
            A :class:`~curvmerge.merging.MergeResult`, as :func:`~curvmerge.merge` returns it.
        """
        start = time.perf_counter()
        wl = check_weights(weights, self.num_models, 1.0 / self.num_models)
        damping = float(damping)
        if not damping >= 0:
            raise ValueError(f"damping must be >= 0, got {damping}")
        w = torch.tensor(wl, dtype=self.dtype, device=self.device)
        report = MergeReport(
            method="",
            num_models=self.num_models,
            weights=wl,
            damping=damping,
            prior=self.prior_name,
        )
        if self.kind == "operator":
            theta0 = self._theta0(w)
            merged = theta0 + self._solve(w, damping, theta0, report)
            self._last = merged
        else:
            merged = self._closed_form(w, damping, report)
        if self.kind == "operator":  # closed forms of finite, checked inputs stay finite
            _finite(merged, "the merged parameters")
        out = {}
        for name, value in self.space.unflatten(merged).items():
            ref = self._reference[name]
            converted = value.to(device=ref.device, dtype=ref.dtype)
            # closed forms return a fresh tensor: views of it need no copy
            fresh = converted is not value or self.kind != "operator"
            out[name] = converted if fresh else converted.clone()
        report.seconds = time.perf_counter() - start
        return MergeResult(out, report)

    def _closed_form(self, w: Tensor, damping: float, report: MergeReport) -> Tensor:
        """:math:`(\\lambda\\theta_0 + G) / (\\lambda + D)`, with :math:`\\theta_0` where
        :math:`\\lambda + D = 0`."""
        report.method = self._method
        W = w.sum()
        if self._stack is None:  # identity (curvatures=None): D = W, G = sum_t w_t theta_t
            average = torch.mv(self.thetas.T, w / W)
            if self._prior is None:
                return average
            a = float(W / (W + damping))
            return torch.add(average.mul_(a), self._prior, alpha=1.0 - a)
        T = self.num_models
        # denominator  lambda + sum_t w_t d_t
        cd = torch.cat([w, w.new_tensor([damping])])
        denom = torch.mv(self._stack[: T + 1].T, cd)
        # numerator  sum_t w_t g_t + lambda theta_0
        if self._prior is None:  # theta_0 = sum_t (w_t / W) theta_t
            cn = torch.cat([w, w * (damping / W)])
        else:
            cn = torch.cat([w, w.new_tensor([damping])])
        numer = torch.mv(self._stack[T + 1 :].T, cn)
        if damping:
            return numer.div_(denom)
        unseen = denom == 0
        report.unseen = int(unseen.sum())
        if not report.unseen:
            return numer.div_(denom)
        theta0 = self._theta0(w)
        return torch.where(unseen, theta0, numer / torch.where(unseen, 1.0, denom))

    def _solve(self, w: Tensor, damping: float, theta0: Tensor, report: MergeReport) -> Tensor:
        space, dtype, device = self.space, self.dtype, self.device
        wl = w.tolist()
        A = system_operator(self.curvatures, wl, damping, space, dtype, device)
        rhs_products = 0
        if self._rhs is not None:
            b = w @ self._rhs
        elif self._cross is not None:
            coeff = w / w.sum()
            idx = torch.arange(self.num_models, device=device)
            own = self._cross[idx, :, idx]  # F_t theta_t, [T, P]
            b = w @ (own - self._cross @ coeff)
        else:
            b = torch.zeros(space.size, dtype=dtype, device=device)
            for wt, F, th in zip(wl, self.curvatures, self.thetas, strict=True):
                if wt != 0:
                    b = b + wt * (F @ (th - theta0)).to(device, dtype)
                    rhs_products += 1
        _finite(b, "the right-hand side")

        diag = None if self._diags is None else w @ self._diags
        M, sketch_products = make_preconditioner(
            self.preconditioner, self.curvatures, wl, damping, diag, space, report
        )
        x0 = None
        if self.warm_start and self._last is not None:
            x0 = self._last - theta0  # the previous point
        elif self.warm_start and diag is not None:
            denom = diag + damping
            numer = w @ (self._diags * (self.thetas - theta0))
            x0 = torch.where(denom > 0, numer / torch.where(denom > 0, denom, 1.0), 0.0)
        y = solve_system(
            A,
            b,
            x0,
            M,
            report,
            rtol=self.rtol,
            maxiter=self.maxiter,
            extra_products=rhs_products + sketch_products,
        )
        if not report.converged:
            warnings.warn(
                f"PreparedMerge: CG did not converge at weights={report.weights}, "
                f"damping={damping:g}: relative residual {report.relative_residual:.2e} > "
                f"rtol={self.rtol:g} after {report.iterations} iterations",
                ConvergenceWarning,
                stacklevel=3,
            )
        return y
