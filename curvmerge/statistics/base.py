"""The base every curvature computer shares: model, loss, data, selected parameters.

A curvature computer reads a data set once or many times (a matrix-free GGN reads it at
every product). What it owns, once, for every computer:

- the selected parameter space, the model's device and the dtype of the computation;
- the data loop: ``(inputs, targets)`` pairs, moved to the device, with a **data-order
  check** on the passes that reuse what an earlier pass kept per batch (sampled labels, kept
  rows): every batch's fingerprint (shapes, dtypes and per-example checksums) is recorded on
  the first such pass and compared on the later ones, so a shuffled ``DataLoader`` or random
  augmentation is refused there instead of silently mixing one pass's output-space data
  with another pass's batches (curvlinops guards the same way); passes that only sum over
  examples take any order;
- ``num_data``: the normaliser of a ``"mean"`` loss (see :mod:`curvmerge.losses`);
- data parallelism on :mod:`torch.distributed`: when a process group is initialised (and
  ``distributed`` is not ``False``), each process's ``data`` is its own shard and
  :meth:`CurvatureComputer.sum_over_ranks` sums statistics and counts over the processes,
  once per statistic or per product (never per batch), so that every process holds the
  statistic of all the shards together (:mod:`curvmerge.distributed`);
- :meth:`CurvatureComputer.state_key`: what every cache is keyed on, i.e. every parameter
  and buffer the forward pass may read (identity, storage, in-place version and a checksum
  of the values) and every module's training flag.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from curvmerge.batches import check_deterministic, iterate_batches, move_batch
from curvmerge.distributed import (
    agree_on_failure,
    all_reduce_sum,
    is_main_process,
    rank,
    use_distributed,
)
from curvmerge.losses import LossSpec, count_terms, resolve_loss
from curvmerge.space import ParamSpace

__all__ = ["CurvatureComputer", "DataOrderError", "batch_fingerprint"]


class DataOrderError(ValueError):
    """The data yielded different batches on a later pass than on the first."""


def _tensors(obj, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
    if isinstance(obj, Tensor):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from _tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (tuple, list)):
        for i, value in enumerate(obj):
            yield from _tensors(value, f"{prefix}[{i}]")


def batch_fingerprint(inputs, targets) -> tuple:
    """Shapes, dtypes and per-example checksums of every tensor of a batch.

    The checksums are, per example (row along the first axis), :math:`\\sum_i x_i` and
    :math:`\\sum_i x_i^2` in float64: equal batches give equal fingerprints, and a batch
    whose examples are permuted, replaced or perturbed gives another. One pass over the
    batch's tensors, no larger temporary than a float64 copy.
    """
    parts = []
    for key, t in _tensors({"inputs": inputs, "targets": targets}):
        rows = t.detach().reshape(t.shape[0] if t.ndim else 1, -1).to(torch.float64)
        sums = torch.stack([rows.sum(1), rows.square().sum(1)]).cpu()
        parts.append((key, tuple(t.shape), str(t.dtype), sums))
    return tuple(parts)


def _same_fingerprint(a: tuple, b: tuple) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if x[:3] != y[:3] or not torch.allclose(x[3], y[3], rtol=1e-9, atol=1e-12):
            return False
    return True


def _describe(fp: tuple) -> str:
    return ", ".join(f"{k} {list(shape)}" for k, shape, *_ in fp)


class CurvatureComputer:
    """Model, loss, data and selected parameters of a curvature computation.

    Args:
        model: A ``torch.nn.Module`` (Hugging Face models included), in eval mode or free of
            dropout and batch norm.
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss``, ``nn.BCEWithLogitsLoss``, a name or
            a :class:`~curvmerge.losses.LossSpec`.
        data: Iterable of ``(inputs, targets)`` batches, the batch dimension first; it must
            yield the same batches in the same order on every pass (checked).
        params: Names or a regex of the selected parameters (default: all), or a
            :class:`~curvmerge.space.ParamSpace`.
        num_data: The normaliser of a ``"mean"`` loss over the whole data set (loss terms:
            examples for classification, non-padding tokens for token-level cross-entropy,
            entries for MSE/BCE); ``None`` counts it in one pass when first needed (over
            all the processes' shards with ``distributed``). A given ``num_data`` is that of
            all the shards together.
        distributed: Sum statistics over the processes of :mod:`torch.distributed`, each
            holding its own shard of the data: ``None`` (default) when a process group is
            initialised, ``False`` never (each process keeps its shard's statistic), ``True``
            always (refused without a process group). Every process must then run the same
            computations in the same order (the sums are collective calls).

    Raises:
        ValueError: ``distributed=True`` while torch.distributed is not initialised.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module | str | LossSpec,
        data: Iterable,
        *,
        params: str | Sequence[str] | ParamSpace | None = None,
        num_data: int | None = None,
        distributed: bool | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(data, (Tensor, tuple)) or data is None:
            raise TypeError(
                "data must be an iterable of (inputs, targets) batches (a list or a "
                "DataLoader), not a single tensor or pair; wrap one batch as [(inputs, targets)]"
            )
        self.loss = resolve_loss(loss_fn)
        check_deterministic(model)
        space = params if isinstance(params, ParamSpace) else ParamSpace.from_module(model, params)
        named = dict(model.named_parameters())
        space.check(named, what="model")
        if not len(space):
            raise ValueError("params selects no parameter")
        self.model = model
        self.data = data
        self.space = space
        first = named[space.names[0]]
        self.device = first.device
        self.model_dtype = first.dtype  # the dtype the model runs in
        self.dtype = first.dtype  # the dtype of the computation (a subclass may promote it)
        if num_data is not None and not (
            isinstance(num_data, int) and not isinstance(num_data, bool) and num_data > 0
        ):
            raise ValueError(f"num_data must be a positive integer, got {num_data!r}")
        self._num_data = num_data
        self._fingerprints: list[tuple] | None = None
        self.distributed = use_distributed(distributed)

    # ------------------------------------------------------------------ data
    def batches(
        self,
        desc: str | None = None,
        progress: bool = False,
        *,
        same_batches: bool = False,
        dtype: torch.dtype | None = None,
    ):
        """Iterate ``(index, inputs, targets)`` over the data, moved to the device (floating
        inputs cast to ``dtype``, default the computer's).

        Args:
            desc, progress: A progress bar over the batches (``progress=True``; with
                ``distributed``, on the main process only).
            same_batches: This pass reuses what an earlier pass kept per batch index (label
                samples, kept rows): the first such pass records every batch's fingerprint,
                later ones are checked against it. Passes that only sum over examples (a
                count, a diagonal) need no check and take any order.
            dtype: Floating inputs are cast to it (default :attr:`dtype`).

        Raises:
            DataOrderError: with ``same_batches``, a batch differs from the recorded batch at
                its index, or the pass yields more or fewer batches.
        """
        check = same_batches and self._fingerprints is not None
        record = same_batches and self._fingerprints is None
        dtype = self.dtype if dtype is None else dtype
        seen: list[tuple] = []
        index = -1
        # one process's shard may be empty; the sums over the processes are what must not
        items = iterate_batches(self.data, allow_empty=self.distributed)
        if progress and (not self.distributed or is_main_process()):
            from tqdm.auto import tqdm

            total = len(self.data) if hasattr(self.data, "__len__") else None
            items = tqdm(items, total=total, desc=desc, leave=False)
        for index, (inputs, targets) in enumerate(items):
            if record:
                seen.append(batch_fingerprint(inputs, targets))
            elif check:
                self._check_batch(index, batch_fingerprint(inputs, targets))
            yield index, move_batch(inputs, self.device, dtype), targets
        if record:
            self._fingerprints = seen
        elif check and index + 1 != len(self._fingerprints):
            raise DataOrderError(
                f"data yielded {index + 1} batches on this pass but "
                f"{len(self._fingerprints)} on the first; {self._how_to_fix()}"
            )

    def _check_batch(self, index: int, fp: tuple) -> None:
        known = self._fingerprints
        if index >= len(known):
            raise DataOrderError(
                f"data yielded more batches on this pass than the {len(known)} of the first; "
                + self._how_to_fix()
            )
        if not _same_fingerprint(known[index], fp):
            raise DataOrderError(
                f"batch {index} differs from batch {index} of the first pass over the data "
                f"({_describe(fp)}): the data is shuffled, augmented at random or changed. "
                + self._how_to_fix()
            )

    def _how_to_fix(self) -> str:
        return (
            f"{type(self).__name__} reads the data several times and needs the same batches "
            "in the same order on every pass: use DataLoader(..., shuffle=False) (or a "
            "sampler with a fixed seed), no random augmentation, or pass a list of batches"
        )

    # ------------------------------------------------------------------ processes
    @contextlib.contextmanager
    def shard_pass(self):
        """Around the part of a pass each process makes on its own shard, before the pass's
        :meth:`sum_over_ranks`: if it raises on one process (a batch too costly, bad data
        in one shard), that process says so in the others' sum, which then raises
        :class:`~curvmerge.distributed.PeerProcessError` instead of waiting for it."""
        try:
            yield
        except BaseException:
            if self.distributed:
                agree_on_failure(True)
            raise

    def sum_over_ranks(self, tensors: Sequence[Tensor] = (), counts: Sequence[int] = ()):
        """Sum ``tensors`` (in place) and ``counts`` over the processes when the computer
        is ``distributed``; return the summed counts (a list). First one small collective
        in which every process says whether its :meth:`shard_pass` failed; then one call
        per dtype of the tensors (the counts travel as one int64 tensor). Without
        ``distributed``, nothing happens and the counts come back as they are."""
        if not self.distributed:
            return list(counts)
        agree_on_failure(False)
        summed = torch.tensor(list(counts), dtype=torch.int64)
        all_reduce_sum([*tensors, summed])
        return summed.tolist()

    def check_examples(self, num_examples: int) -> None:
        """Refuse a pass that read no example (summed over the processes with
        ``distributed``: one process's shard may be empty, all of them may not)."""
        if num_examples == 0:
            where = " on every process" if self.distributed else ""
            raise ValueError(f"data is empty{where}: it yielded no examples")

    def rank_seed(self, seed: int) -> int:
        """``seed`` on the main process (or without ``distributed``); another seed on each
        other process, so that the processes' label samples are independent draws."""
        if not self.distributed:
            return seed
        return (seed + rank() * 2**40) % 2**63

    @property
    def num_data(self) -> int:
        """The ``"mean"`` normaliser (counted in one pass over the data if not given; over
        all the processes' shards with ``distributed``)."""
        if self._num_data is None:
            total = batches = 0
            with self.shard_pass():
                for _, _, targets in self.batches():
                    total += count_terms(self.loss, targets)
                    batches += 1  # a batch of no example is skipped
            total, batches = self.sum_over_ranks(counts=[total, batches])
            self.check_examples(batches)
            if total == 0 and self.loss.reduction == "mean":
                raise ValueError("data has no loss terms (every target is ignore_index)")
            self._num_data = max(total, 1)
        return self._num_data

    @property
    def scale(self) -> float:
        """:math:`c`: ``1 / num_data`` for a ``"mean"`` loss, 1 for ``"sum"``."""
        return 1.0 / self.num_data if self.loss.reduction == "mean" else 1.0

    # ------------------------------------------------------------------ caches
    def state_key(self) -> tuple:
        """What a cache of this computer's results depends on in the model: every parameter
        and buffer (object, storage, in-place version and a checksum of its values, which
        also sees updates through ``.data`` that bypass the version counter) and every
        module's training flag.

        The checksum of a tensor is the exact integer sum of its bit patterns (modulo
        :math:`2^{32}` for 4-byte dtypes: any change of one entry changes it, whatever the
        summation order) and its sum in its own dtype
        (which changes sign with the tensor: a sign flip with as many negative as positive
        entries leaves the bit sum unchanged). One cheap pass over the parameters."""
        key = []
        named = [
            *self.model.named_parameters(remove_duplicate=False),
            *self.model.named_buffers(remove_duplicate=False),
        ]
        bit_sums, value_sums = [], []
        for name, t in named:
            key.append((name, id(t), t.data_ptr(), t._version, t.dtype, t.device))
            bits, value = _checksum(t.detach())
            bit_sums.append(bits)
            value_sums.append(value)
        if named:
            key.append(tuple(torch.stack([s.cpu() for s in bit_sums]).tolist()))
            key.append(tuple(torch.stack([s.double().cpu() for s in value_sums]).tolist()))
        key.append(tuple(m.training for m in self.model.modules()))
        return tuple(key)


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _checksum(t: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum of the bit patterns as int64, sum of the values)`` of a tensor (0-d tensors on
    its device): the first exact and order-free (modulo :math:`2^{32}` for 4-byte dtypes,
    where one changed entry still changes it), the second in the tensor's own dtype
    (float64 for integer and boolean tensors), summed in rows of ``_ROW`` entries so that
    the result does not depend on the number of threads."""
    if not t.numel():
        zero = torch.zeros((), dtype=torch.int64, device=t.device)
        return zero, zero.double()
    flat = torch.view_as_real(t).reshape(-1) if t.is_complex() else t.reshape(-1)
    if not flat.is_floating_point():
        return flat.sum(dtype=torch.int64), flat.sum(dtype=torch.float64)
    patterns = flat.view(_BITS[flat.element_size()])
    # 4-byte patterns are summed in int32, which wraps: exact modulo 2**32 in any order, and
    # without the int64 copy of the tensor that a widening sum makes (30x faster on CPU)
    wide = torch.int32 if flat.element_size() == 4 else torch.int64
    return patterns.sum(dtype=wide).long(), _ordered_sum(flat)


def _ordered_sum(x: Tensor) -> Tensor:
    """The sum of a 1-d tensor in an order that does not depend on the number of threads:
    rows of ``_ROW`` entries (a row's sum is one thread's work), then their sums the same
    way; ``_ROW`` entries or fewer are below the size torch splits between threads."""
    if x.numel() <= _ROW:
        return x.sum()
    whole = x.numel() // _ROW * _ROW
    return x[whole:].sum() + _ordered_sum(x[:whole].view(-1, _ROW).sum(1))


_ROW = 8192
