"""Matrix-free generalised Gauss-Newton and Fisher operators.

For a data set with loss :math:`L(\\theta) = c \\sum_n \\ell_n(f_n(\\theta), y_n)` (the
normalisation :math:`c` of :mod:`curvmerge.losses`), the operator multiplies with

.. math::

    G = c \\sum_n J_n^\\top \\Lambda_n J_n, \\qquad J_n = \\partial f_n / \\partial \\theta,

without forming it, where :math:`\\Lambda_n` is

- ``kind="exact"``: the loss Hessian :math:`\\nabla_f^2 \\ell_n` in closed form (the GGN of
  Schraudolph 2002, which equals the Fisher for cross-entropy, MSE and BCE-with-logits);
- ``kind="mc"``: :math:`\\frac1S \\sum_s r_{ns} r_{ns}^\\top` with
  :math:`r_{ns} = \\nabla_f \\ell_n(f_n, \\tilde y_{ns})`, labels sampled from the model;
- ``kind="empirical"``: :math:`r_n r_n^\\top` with the true labels (Kunstner, Hennig & Balles,
  "Limitations of the empirical Fisher approximation", NeurIPS 2019).

Every kind is per example: for token-level language modelling, :math:`r_n` stacks the
gradients of all of sequence n's tokens.

Each product costs one Jacobian-vector product :math:`J v` and one vector-Jacobian product
:math:`J^\\top u`. Two ways are implemented:

- **cached** (the default while a memory budget allows): on the first product the forward
  graph of each batch is kept, together with the graph of :math:`u \\mapsto J^\\top u` built
  once with ``create_graph``. Since :math:`J^\\top u` is linear in :math:`u`, differentiating
  it with respect to :math:`u` along :math:`v` gives :math:`J v` (the "double-backward"
  trick, e.g. Townsend 2017, "A new trick for calculating Jacobian vector products"). Later
  products then cost one backward pass through each of the two stored graphs and no
  forward pass, which is what makes the repeated products of a CG solve cheap;
- **streaming** (no cache, or past the budget): one column takes one forward pass with
  dual numbers (:mod:`torch.autograd.forward_ad`) that gives :math:`J v` while autograd
  records the graph :math:`J^\\top u` runs back through; a block of columns takes
  forward-mode :func:`torch.func.jvp` and reverse-mode :func:`torch.func.vjp` vectorised
  with :func:`torch.vmap` (the scheme of curvlinops' ``GGNLinearOperator``, Dangel et al.).

Blocks of columns (Hutchinson probes, sketches) can run through the cached graphs in
batched backward passes (``is_grads_batched``), ``block_columns`` columns at a time. Layer norms
are recorded with a double backward written out, and the dual-number pass runs layer norms,
linear layers and softmaxes with forward-mode derivatives written out, each cheaper than
PyTorch's general rule (:mod:`curvmerge.operators.derivatives`).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from curvmerge.batches import model_outputs, move_batch
from curvmerge.losses import (
    LossSpec,
    flatten_rows,
    output_grad,
    output_hessian_matmul,
    sample_targets,
)
from curvmerge.operators.base import LinearOperator
from curvmerge.operators.derivatives import CheapDoubleBackward, CheapForwardAD
from curvmerge.space import ParamSpace
from curvmerge.statistics.base import CurvatureComputer
from curvmerge.statistics.diagonal import FISHER_KINDS, check_kind, diagonal_squares

__all__ = ["GGNOperator", "GGN_KINDS"]

#: The supported curvature kinds (those of the diagonal Fisher).
GGN_KINDS = FISHER_KINDS


def _default_cache_budget(device: torch.device) -> int:
    """Half the free memory of a CUDA device; a quarter of the available RAM otherwise."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 4
    except OSError:  # pragma: no cover - not Linux
        pass
    return 2 * 2**30


@contextlib.contextmanager
def _eager_attention(model: nn.Module):
    """Switch a Hugging Face model to eager attention while curvature is computed.

    PyTorch's fused attention kernels have neither forward-mode nor double-backward
    derivatives; the eager implementation computes the same function with plain ops.
    """
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    switch = getattr(model, "set_attn_implementation", None)
    if current in (None, "eager") or switch is None:
        yield
        return
    switch("eager")
    try:
        yield
    finally:
        switch(current)


@dataclass
class _Batch:
    """What one batch needs across products: inputs, targets, output-space data."""

    inputs: object
    targets: Tensor
    num_examples: int = 0
    keep: Tensor | None = None  # rows that carry loss terms ([M_all] bool), CE only
    example: Tensor | None = None  # example index of each kept row
    scores: Tensor | None = None  # [S, M, C] loss gradients for mc/empirical
    graphs: _Graphs | None = None


@dataclass
class _Graphs:
    """The stored graphs of one batch: output ``f``, the dummy cotangent ``u0``, and
    :math:`J^\\top u_0` built with ``create_graph`` (``used``: its non-empty entries)."""

    f: Tensor
    u0: Tensor
    leaves: list[Tensor]
    vjp_u: tuple
    used: list[int]
    nbytes: int


class GGNOperator(LinearOperator, CurvatureComputer):
    """The GGN / Fisher of a model's loss over a data set, as a matrix-free operator.

    .. math::

        G = c \\sum_n J_n^\\top \\Lambda_n J_n

    (see :mod:`curvmerge.operators.ggn` for :math:`\\Lambda_n` of each kind and
    :mod:`curvmerge.losses` for :math:`c`).

    Args:
        model: A ``torch.nn.Module`` whose output is a tensor or has ``.logits`` (Hugging
            Face ``transformers`` models included; they are switched to eager attention while
            products run, since fused attention kernels lack forward-mode and
            double-backward derivatives). In training mode it must be free of dropout and
            batch norm.
        loss_fn: ``nn.CrossEntropyLoss`` (classification ``[B, C]`` or token-level
            ``[B, T, C]`` with ``ignore_index`` padding), ``nn.MSELoss``,
            ``nn.BCEWithLogitsLoss``, or one of their names.
        data: Iterable of ``(inputs, targets)`` batches; ``inputs`` is a tensor or a dict
            (passed as keyword arguments), the batch dimension first. It is read on every
            streamed product and must yield the same batches in the same order each time:
            a shuffled ``DataLoader`` or random augmentation is refused with a
            :class:`~curvmerge.statistics.base.DataOrderError`. Batches are moved to the
            model's device.
        params: Names or a regex of the parameters the operator acts on (default: all);
            the others stay fixed (task heads).
        kind: ``"exact"``, ``"mc"`` or ``"empirical"``.
        mc_samples: Labels sampled per example for ``kind="mc"``.
        seed: Seed of the labels sampled for ``kind="mc"`` (drawn once per batch and kept,
            so the operator is a fixed matrix).
        num_data: The normaliser of a ``"mean"`` loss, i.e. the number of loss terms over
            the whole data set (examples for classification, non-padding tokens for
            token-level cross-entropy, entries for MSE/BCE). Counted from the targets in
            one pass over ``data`` when ``None``.
        cache: Keep each batch's graphs between products: ``"auto"`` (while they fit in
            half the free GPU memory or a quarter of the available RAM), ``True``
            (always), ``False`` (never), or a budget in bytes. Batches past the budget are
            streamed. The cache is keyed on every parameter and buffer of the model (see
            :meth:`~curvmerge.statistics.base.CurvatureComputer.state_key`), selected or
            not: it is rebuilt after any in-place update, reassignment or mode switch.
        block_columns: Columns of a ``[P, K]`` block multiplied together in one pass of
            the cached graphs (backward passes batched over the columns with
            ``is_grads_batched``); the gradients of that many columns are held at once. 1
            (default) multiplies column by column: on CPUs the batched passes were measured
            no faster than the column loop (``benchmarks/bench_ggn.py --block``,
            ``docs/benchmarks_ggn.md``).
        progress: Show a progress bar over the batches of the statistic passes (the first
            product, which builds the cache, and the diagonal); later products show none
            (a solve shows one bar for all of them).
        distributed: Data parallelism on :mod:`torch.distributed`: each process's ``data``
            is its own shard, and every product (and the diagonal, and the count of
            ``num_data``) is summed over the processes once, at its end, so that every
            process gets the product of all the shards' GGN and a CG solve runs in lockstep
            on all of them. ``None`` (default): when a process group is initialised;
            ``False``: the shard's own GGN (see
            :class:`~curvmerge.statistics.base.CurvatureComputer`). A given ``num_data`` is
            that of all the shards; ``mc`` labels are drawn with another seed on each
            process but the main one.
        dtype: The products' compute dtype, ``torch.float32`` or ``torch.float64``
            (default: the model's, at least float32). The forward and backward passes run
            on copies of the parameters and buffers in it where it differs from the
            model's (a float64 operator of a float32 or bf16 model, for a reference).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        >>> data = [(torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,)))]
        >>> G = GGNOperator(model, nn.CrossEntropyLoss(), data, params=r"^0\\.")
        >>> G.shape
        (16, 16)
        >>> v = torch.randn(16, dtype=torch.float64)
        >>> bool((v @ (G @ v)) >= 0)
        True
    """

    SELF_ADJOINT = True

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module | str | LossSpec,
        data: Iterable,
        *,
        params: str | Sequence[str] | ParamSpace | None = None,
        kind: str = "exact",
        mc_samples: int = 1,
        seed: int = 0,
        num_data: int | None = None,
        cache: bool | int | str = "auto",
        block_columns: int = 1,
        progress: bool = False,
        distributed: bool | None = None,
        dtype: torch.dtype | None = None,
    ):
        check_kind(kind, mc_samples)
        CurvatureComputer.__init__(
            self, model, loss_fn, data, params=params, num_data=num_data, distributed=distributed
        )
        # products run in at least float32 (a bf16 model's products are formed with float32
        # copies of its parameters and buffers): statistics never accumulate in half precision
        if dtype is None:
            dtype = torch.promote_types(self.model_dtype, torch.float32)
        if not isinstance(dtype, torch.dtype) or dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"dtype (the products' compute dtype) must be torch.float32 or torch.float64, "
                f"got {dtype!r}: products never accumulate in half precision"
            )
        self.dtype = dtype
        LinearOperator.__init__(self, self.space, self.dtype, self.device)
        self.kind = kind
        self.mc_samples = int(mc_samples) if kind == "mc" else 1
        self.seed = int(seed)
        self.progress = bool(progress)
        if isinstance(block_columns, bool) or int(block_columns) != block_columns:
            raise ValueError(f"block_columns must be a positive integer, got {block_columns!r}")
        if block_columns < 1:
            raise ValueError(f"block_columns must be a positive integer, got {block_columns!r}")
        self.block_columns = int(block_columns)
        if cache == "auto":
            self.cache_budget = _default_cache_budget(self.device)
        elif cache is True:
            self.cache_budget = math.inf
        elif cache is False or cache is None:
            self.cache_budget = 0
        elif isinstance(cache, int) and not isinstance(cache, bool) and cache >= 0:
            self.cache_budget = cache
        else:
            raise ValueError(f"cache must be 'auto', True, False or a byte budget, got {cache!r}")
        _ = self.num_data  # counted now (one pass) when not given: errors surface early
        self._batches: list[_Batch] | None = None
        self._no_forward_ad = False
        self._key: tuple | None = None  # state_key() the cached batches were built at
        self._diagonal: tuple[tuple, Tensor] | None = None  # (state_key(), diagonal)
        self.cached_bytes = 0
        self.diagonal_passes = 0
        self.products = 0  # columns multiplied so far (what a solve's progress bar counts)
        # passes over the batches' graphs or data spent on products: a block of columns
        # multiplied together in one (batched) pass counts once, column by column K times
        self.product_passes = 0
        self._no_batched_grads = False
        self._fresh = True

    # ------------------------------------------------------------------ setup helpers
    def _leaves(self) -> tuple[dict[str, Tensor], list[Tensor]]:
        """Detached parameters (and floating buffers) in the operator's dtype (copies only
        where it differs from the model's); the selected parameters require grad."""
        selected = set(self.space.names)
        full, leaves = {}, []
        for name, b in self.model.named_buffers():
            if b.is_floating_point() and b.dtype != self.dtype:
                full[name] = b.detach().to(self.dtype)
        for name, p in self.model.named_parameters():
            t = p.detach().to(self.dtype)
            if name in selected:
                t = t.requires_grad_(True)
            full[name] = t
        for name in self.space.names:
            leaves.append(full[name])
        return full, leaves

    def _forward(self, full: dict[str, Tensor], inputs) -> Tensor:
        # one functional call; the model's own parameters are not touched
        if isinstance(inputs, dict):
            out = torch.func.functional_call(self.model, full, (), inputs)
        else:
            out = torch.func.functional_call(self.model, full, (inputs,))
        if isinstance(out, Tensor):
            return out
        return model_outputs(lambda _: out, None)

    def _seed_for(self, index: int) -> int:
        return self.rank_seed((self.seed * 1_000_003 + index) % (2**63))

    def _prepare_batch(self, index: int, inputs, targets, f: Tensor) -> _Batch:
        """Output-space data of one batch: kept rows, and the scores for mc/empirical."""
        spec = self.loss
        target_dtype = None if spec.name == "cross_entropy" else f.dtype
        targets = move_batch(targets, self.device, target_dtype)
        f = f.detach()
        rows, y, example = flatten_rows(spec, f, targets)  # validates shapes
        batch = _Batch(inputs, targets, num_examples=f.shape[0])
        if spec.name == "cross_entropy":
            batch.keep = targets.reshape(-1) != spec.ignore_index
        batch.example = example
        if self.kind == "empirical":
            batch.scores = output_grad(spec, rows, y).unsqueeze(0)
        elif self.kind == "mc":
            gen = torch.Generator().manual_seed(self._seed_for(index))
            samples = sample_targets(spec, rows, self.mc_samples, gen)
            batch.scores = torch.stack([output_grad(spec, rows, ys) for ys in samples])
        return batch

    # ------------------------------------------------------------------ output space
    def _rows(self, batch: _Batch, T: Tensor) -> Tensor:
        """Output-shaped ``[K, B, ...]`` to kept rows ``[K, M, C]``."""
        K = T.shape[0]
        if self.loss.name == "cross_entropy":
            return T.reshape(K, -1, T.shape[-1])[:, batch.keep, :]
        return T.reshape(K, batch.num_examples, -1)

    def _unrows(self, batch: _Batch, R: Tensor, like: Tensor) -> Tensor:
        """Inverse of :meth:`_rows` (dropped rows are zero)."""
        if self.loss.name == "cross_entropy":
            out = R.new_zeros(R.shape[0], batch.keep.numel(), R.shape[-1])
            out[:, batch.keep, :] = R
            return out.reshape(like.shape)
        return R.reshape(like.shape)

    def _cotangent(self, batch: _Batch, f: Tensor, JV: Tensor) -> Tensor:
        """:math:`c \\Lambda J V` for ``JV`` of shape ``[K, *f.shape]``."""
        rows_f = self._rows(batch, f.detach().unsqueeze(0))[0]
        R = self._rows(batch, JV)  # [K, M, C]
        if self.kind == "exact":
            U = output_hessian_matmul(self.loss, rows_f, R.permute(1, 2, 0)).permute(2, 0, 1)
        else:
            S = batch.scores  # [S, M, C]
            B = batch.num_examples
            dots = torch.einsum("smc,kmc->skm", S, R)  # per row
            per_ex = dots.new_zeros(*dots.shape[:2], B).index_add_(2, batch.example, dots)
            coef = per_ex[..., batch.example]  # [S, K, M]
            U = torch.einsum("skm,smc->kmc", coef, S) / S.shape[0]
        return self._unrows(batch, self.scale * U, JV)

    # ------------------------------------------------------------------ products
    def _matmat(self, X: Tensor) -> Tensor:
        with _eager_attention(self.model):
            return self._matmat_eager(X)

    def _keeps_parameter_state(self) -> bool:
        """Whether the stored batches hold anything computed from the parameters (graphs,
        mc label samples, empirical gradients), which the state key must then guard; an
        exact streamed product recomputes everything from the current parameters."""
        if self._batches is None or self.kind != "exact":
            return True
        return any(b.graphs is not None for b in self._batches)

    def _matmat_eager(self, X: Tensor) -> Tensor:
        key = self.state_key() if self._keeps_parameter_state() else self._key
        if self._key is not None and self._key != key:
            self.clear_cache()  # a parameter or buffer changed: the graphs are stale
        K = X.shape[1]
        self.products += K
        V = [
            v.reshape(*s, K).movedim(-1, 0)
            for v, s in zip(X.split(self.space.numels), self.space.shapes, strict=True)
        ]
        out = torch.empty(K, self.space.size, dtype=self.dtype, device=self.device)
        self._fresh = True  # the first batch writes ``out``, later ones add to it
        with self.shard_pass():
            if self._batches is None:
                batches = []
                # the first product is the one long pass (it builds the cache): it may show a bar
                first = self.batches("GGN product (first)", self.progress, same_batches=True)
                for index, inputs, targets in first:
                    batch, graphs = self._first_visit(index, inputs, targets)
                    batches.append(batch)
                    if graphs is not None:
                        self._product_cached(graphs, batch, V, out)
                    else:
                        self._product_streaming(batch, batch.inputs, V, out)
                        batch.inputs = batch.targets = None
                    self._fresh = False
                self._batches, self._key = batches, key
            elif all(b.graphs is not None for b in self._batches):
                for batch in self._batches:
                    self._product_cached(batch.graphs, batch, V, out)
                    self._fresh = False
            else:
                # the data-order check of ``batches`` makes the first pass's rows and label
                # samples belong to the batch at the same index; no bar: a solve shows one bar
                # for all its products
                again = self.batches("GGN product", False, same_batches=True)
                for index, inputs, _targets in again:
                    batch = self._batches[index]
                    if batch.graphs is not None:
                        self._product_cached(batch.graphs, batch, V, out)
                    else:
                        self._product_streaming(batch, inputs, V, out)
                    self._fresh = False
            if self._fresh:  # no batch
                out.zero_()
        self.sum_over_ranks([out])  # one sum per product (with ``distributed``)
        return out.T.contiguous()

    def _accumulate(self, out: Tensor, grads: Sequence[Tensor | None]) -> None:
        """``out[K, P] += grads`` flattened, parameter by parameter (no concatenated copy);
        the first batch of a product writes instead of adding (no zeroed result first)."""
        K, start = out.shape[0], 0
        for g, n in zip(grads, self.space.numels, strict=True):
            dst = out[:, start : start + n]
            if g is None:
                if self._fresh:
                    dst.zero_()
            elif self._fresh:
                dst.copy_(g.reshape(K, n))
            else:
                dst += g.reshape(K, n)
            start += n

    def _first_visit(self, index: int, inputs, targets) -> tuple[_Batch, _Graphs | None]:
        """Build a batch's graphs (kept if the budget allows), prepare its rows."""
        graphs = None
        if self.cached_bytes < self.cache_budget or self._no_forward_ad:
            graphs = self._graphs(inputs)
            f = graphs.f.detach()
        else:
            with torch.no_grad():
                f = self._forward(self._leaves()[0], inputs)
        batch = self._prepare_batch(index, inputs, targets, f)
        if graphs is not None and self.cached_bytes + graphs.nbytes <= self.cache_budget:
            batch.graphs = graphs
            self.cached_bytes += graphs.nbytes
        return batch, graphs

    def _graphs(self, inputs) -> _Graphs:
        """Forward graph and the graph of :math:`u \\mapsto J^\\top u` of one batch."""
        full, leaves = self._leaves()
        param_ptrs = {t.untyped_storage().data_ptr() for t in full.values()}
        storages: dict[int, int] = {}

        def pack(t: Tensor):
            try:
                s = t.untyped_storage()
                if s.data_ptr() not in param_ptrs:
                    storages[s.data_ptr()] = s.nbytes()
            except (RuntimeError, NotImplementedError):  # pragma: no cover - exotic tensors
                pass
            return t

        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        with hooks, torch.enable_grad(), CheapDoubleBackward():
            f = self._forward(full, inputs)
            u0 = torch.zeros_like(f, requires_grad=True)
            vjp_u = torch.autograd.grad(f, leaves, u0, create_graph=True, allow_unused=True)
        used = [i for i, g in enumerate(vjp_u) if g is not None and g.requires_grad]
        return _Graphs(f, u0, leaves, vjp_u, used, sum(storages.values()))

    def _product_cached(self, graphs: _Graphs, batch: _Batch, V: list[Tensor], out: Tensor) -> None:
        """``out += G_batch V`` from the stored graphs, ``block_columns`` columns per pass."""
        K = V[0].shape[0]
        step = 1 if self._no_batched_grads else self.block_columns
        for start in range(0, K, step):
            stop = min(start + step, K)
            cols = [v[start:stop] for v in V]
            if stop - start > 1:
                try:
                    self._columns_cached(graphs, batch, cols, out[start:stop], batched=True)
                    continue
                except RuntimeError as err:  # an op without a batching rule
                    if "batch" not in str(err).lower() and "vmap" not in str(err).lower():
                        raise
                    self._no_batched_grads = True
            for k in range(start, stop):
                self._columns_cached(graphs, batch, [v[k : k + 1] for v in V], out[k : k + 1])

    def _columns_cached(
        self, graphs: _Graphs, batch: _Batch, V: list[Tensor], out: Tensor, batched=False
    ) -> None:
        """``out[K, P] += G_batch V`` in one pass through each graph: :math:`J V` by double
        backward, then :math:`J^\\top U`, batched over the columns (or ``K == 1``)."""
        K = V[0].shape[0]
        outs = [graphs.vjp_u[i] for i in graphs.used]
        if outs:
            (jv,) = torch.autograd.grad(
                outs,
                graphs.u0,
                [V[i] if batched else V[i][0] for i in graphs.used],
                retain_graph=True,
                allow_unused=True,
                materialize_grads=True,
                is_grads_batched=batched,
            )
            JV = jv if batched else jv.unsqueeze(0)
        else:
            JV = torch.zeros(K, *graphs.f.shape, dtype=self.dtype, device=self.device)
        U = self._cotangent(batch, graphs.f, JV)
        g = torch.autograd.grad(
            graphs.f,
            graphs.leaves,
            U if batched else U[0],
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=batched,
        )
        self.product_passes += 1
        self._accumulate(out, g)

    def _product_streaming(self, batch: _Batch, inputs, V: list[Tensor], out: Tensor) -> None:
        if self._no_forward_ad:
            return self._product_cached(self._graphs(inputs), batch, V, out)
        K = V[0].shape[0]
        full, _ = self._leaves()
        primals = {n: full[n].detach() for n in self.space.names}
        rest = {n: t for n, t in full.items() if n not in primals}

        def fn(p):
            return self._forward({**rest, **p}, inputs)

        tangents = dict(zip(self.space.names, V, strict=True))
        try:
            if K == 1:
                # one forward pass for both: dual numbers carry J v forward while autograd
                # records the graph that J^T u runs back through
                with torch.enable_grad(), fwAD.dual_level(), CheapForwardAD():
                    duals = dict(rest)
                    for n, t in tangents.items():
                        # a tangent with its own storage is taken as it is; a view into the
                        # flat vector would be copied into zeros laid out like the parameter
                        duals[n] = fwAD.make_dual(full[n], t[0].clone())
                    f, jv = fwAD.unpack_dual(self._forward(duals, inputs))
                if jv is None:  # the output does not depend on the parameters
                    jv = torch.zeros_like(f)
                U = self._cotangent(batch, f.detach(), jv.unsqueeze(0))
                leaves = [full[n] for n in self.space.names]
                grads = torch.autograd.grad(f, leaves, U[0], allow_unused=True)
                self.product_passes += 1
                self._accumulate(out, [None if g is None else g.unsqueeze(0) for g in grads])
                return None

            def jvp_one(t):
                return torch.func.jvp(fn, (primals,), (t,))

            f, JV = torch.vmap(jvp_one, randomness="same", out_dims=(None, 0))(tangents)
        except (NotImplementedError, RuntimeError) as err:
            msg = str(err).lower()
            if "forward ad" not in msg and "forward-mode" not in msg and "jvp" not in msg:
                raise
            # an op without forward-mode AD (e.g. fused attention): use the graphs instead
            self._no_forward_ad = True
            return self._product_cached(self._graphs(inputs), batch, V, out)
        U = self._cotangent(batch, f, JV)
        _, vjp_fn = torch.func.vjp(fn, primals)
        (g,) = torch.vmap(vjp_fn, randomness="same")(U)
        self.product_passes += 1
        self._accumulate(out, [g[n] for n in self.space.names])

    # ------------------------------------------------------------------ extras
    def clear_cache(self) -> None:
        """Drop the stored graphs and label samples (the next product rebuilds them)."""
        self._batches, self._key, self.cached_bytes = None, None, 0

    def diagonal(self) -> Tensor:
        """The diagonal of the operator, from one pass of the per-example engine
        (:func:`curvmerge.statistics.diagonal.diagonal_squares`), exact for every kind (for
        ``"mc"`` with the operator's own label samples). Cached under the model's
        :meth:`state_key` (any change of a parameter or buffer recomputes it);
        ``diagonal_passes`` counts the passes run.

        Raises:
            DiagonalTooCostlyError: ``kind="exact"`` over a vocabulary-sized output (a
                ``NotImplementedError``: merges then take their damping scale from
                products).
        """
        key = self.state_key()
        if self._diagonal is not None and self._diagonal[0] == key:
            return self._diagonal[1]
        # a low-precision model's diagonal is formed by a copy in the operator's dtype
        model = self.model if self.model_dtype == self.dtype else copy.deepcopy(self.model)
        with _eager_attention(self.model):
            stats = diagonal_squares(
                self,
                model=model.to(self.dtype),
                kind=self.kind,
                mc_samples=self.mc_samples,
                seed=self._seed_for,  # the operator's own label samples, batch by batch
                progress=self.progress,
            )
        self.diagonal_passes += 1
        diag = (stats.sums * self.scale).to(self.device, self.dtype)
        self._diagonal = (key, diag)
        return diag

    def __repr__(self) -> str:
        return (
            f"GGNOperator(kind={self.kind!r}, loss={self.loss.name!r}, P={self.space.size}, "
            f"dtype={self.dtype}, device={self.device})"
        )
