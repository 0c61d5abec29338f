"""torch.distributed helpers: who this process is, and sums over all processes.

curvmerge communicates only through :mod:`torch.distributed` (gloo on CPUs, NCCL on GPUs),
whose process group the user (or ``torchrun``) initialises. When it is not initialised every
helper is a no-op for a single process: rank 0 of a world of 1, sums left as they are.

Data-parallel curvature (see ``docs/distributed.md``): each rank reads its own shard of the
data, and the curvature computers (:class:`~curvmerge.statistics.base.CurvatureComputer`
and what is built on it) sum their statistics over the ranks with :func:`all_reduce_sum`,
once per statistic or per product, so every rank holds the statistic of all the data.

Example:
    >>> t = torch.tensor([1.0, 2.0])
    >>> all_reduce_sum(t) is t, rank(), world_size(), is_main_process()
    (True, 0, 1, True)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Dataset, Subset

__all__ = [
    "is_distributed",
    "rank",
    "world_size",
    "is_main_process",
    "barrier",
    "on_main_process",
    "agree_on_failure",
    "PeerProcessError",
    "MainProcessError",
    "all_reduce_sum",
    "use_distributed",
    "shard",
]

# dtypes sent as float32 (gloo has no bfloat16 sum on every build; summing in half precision
# would round every partial sum)
_WIDEN = {torch.bfloat16: torch.float32, torch.float16: torch.float32}


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without torch.distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes (1 without torch.distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0: the process that prints progress and writes files."""
    return rank() == 0


def barrier() -> None:
    """Wait until every process gets here (a no-op without torch.distributed): after rank 0
    writes files that the others read, or before a process returns from a run whose files
    rank 0 writes."""
    if is_distributed():
        dist.barrier()


R = TypeVar("R")


class PeerProcessError(RuntimeError):
    """Raised on a process when another one failed in work they do together."""


class MainProcessError(PeerProcessError):
    """Raised on the other processes when rank 0 failed in :func:`on_main_process`."""


def agree_on_failure(failed: bool) -> None:
    """One collective call in which every process says whether it failed (a no-op without
    torch.distributed). A process that did not fail raises :class:`PeerProcessError`
    naming the ranks that did, so that no process waits forever for a sum that a failed
    process will never join; a failed process calls it with ``failed=True`` and then
    raises its own error."""
    if not is_distributed():
        return
    flags = torch.zeros(world_size(), dtype=torch.int64)
    flags[rank()] = int(bool(failed))
    all_reduce_sum(flags)
    if not failed and bool(flags.any()):
        ranks = ", ".join(str(r) for r in flags.nonzero().flatten().tolist())
        raise PeerProcessError(
            f"process {ranks} failed (see its error) in a pass every process makes; "
            "this process stops too"
        )


def on_main_process(fn: Callable[[], R]) -> R | None:
    """Run ``fn`` on rank 0 only (writing files, printing) while the others wait; every
    process returns once it is done (``fn``'s value on rank 0, ``None`` elsewhere).

    If ``fn`` raises on rank 0 the error is re-raised there and every other process raises
    :class:`MainProcessError` naming it, so no process waits for a rank 0 that will never
    come and none reports a success that did not happen. Without torch.distributed it is
    ``fn()``.
    """
    if not is_distributed():
        return fn()
    out, err, message = None, None, [None]
    if is_main_process():
        try:
            out = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below, after telling the others
            err = e
            message = [f"{type(e).__name__}: {e}"]
    dist.broadcast_object_list(message, src=0)  # also the wait for rank 0
    if err is not None:
        raise err
    if message[0] is not None:
        raise MainProcessError(f"rank 0 failed, so this process stops too: {message[0]}")
    return out


def shard(items):
    """This process's share of ``items``: every ``world_size()``-th item from its rank on
    (``items[rank::world_size]`` of a list or tuple; a map-style
    :class:`~torch.utils.data.Dataset` becomes a :class:`~torch.utils.data.Subset`, any other
    sequence a list). ``items`` itself without torch.distributed (or with one process).

    Unlike :class:`~torch.utils.data.distributed.DistributedSampler`, which pads the shards
    to equal sizes by repeating items (or drops the tail with ``drop_last=True``), every
    item lands on exactly one process, so sums over the processes are sums over the data;
    the shares differ by at most one item (a process's share may be empty).

    Example:
        >>> shard([10, 11, 12, 13, 14])  # rank 1 of 2 would get [11, 13]
        [10, 11, 12, 13, 14]
    """
    r, w = rank(), world_size()
    if w == 1:
        return items  # one process: the data object itself, its type and attributes kept
    if isinstance(items, (list, tuple)):
        return items[r::w]
    if isinstance(items, Dataset):
        return Subset(items, range(r, len(items), w))
    if not (hasattr(items, "__len__") and hasattr(items, "__getitem__")):  # a DataLoader
        raise TypeError(
            f"shard needs a list, a tuple, a map-style Dataset or another indexable sequence "
            f"of batches, got {type(items).__name__}: pass a list of its batches (or shard "
            "a DataLoader's dataset and build the loader on the shard)"
        )
    return [items[i] for i in range(r, len(items), w)]  # any sequence (its slices may not be)


def use_distributed(distributed: bool | None) -> bool:
    """The rule of every ``distributed`` argument: ``None`` sums over the processes when
    torch.distributed is initialised, ``False`` never (each process keeps its own data's
    statistic), ``True`` always.

    Raises:
        ValueError: ``True`` while torch.distributed is not initialised.
    """
    if distributed is None:
        return is_distributed()
    if distributed and not is_distributed():
        raise ValueError(
            "distributed=True but torch.distributed is not initialised: call "
            "torch.distributed.init_process_group first (torchrun sets its environment), "
            "or leave distributed=None"
        )
    return bool(distributed)


def _comm_device(t: Tensor) -> torch.device:
    """Where the backend sums ``t``: NCCL needs the current CUDA device, gloo the CPU; a
    group with a backend per device (``"cpu:gloo,cuda:nccl"``) sums on the tensor's own."""
    backend = str(dist.get_backend())
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo":
        return torch.device("cpu")
    return t.device


def all_reduce_sum(tensors: Tensor | Sequence[Tensor]) -> Tensor | Sequence[Tensor]:
    """Sum tensors over all processes, in place, and return the argument.

    A no-op without torch.distributed (or in a world of one process). Tensors of one
    dtype are summed in one collective call (flattened into one buffer when there are
    several), on the device the backend needs (copied there and back when it is not the
    tensor's); bfloat16 and float16 tensors are summed in float32 and rounded back once.

    Args:
        tensors: A tensor or a sequence of tensors (any devices, dtypes and layouts).

    Returns:
        ``tensors`` itself, holding the sums.
    """
    items = [tensors] if isinstance(tensors, Tensor) else list(tensors)
    if not items or world_size() == 1:
        return tensors
    groups: dict[tuple, list[Tensor]] = {}
    for t in items:
        key = (_WIDEN.get(t.dtype, t.dtype), _comm_device(t))
        groups.setdefault(key, []).append(t)
    for (dtype, device), group in groups.items():
        t = group[0]
        if len(group) == 1 and t.is_contiguous() and t.dtype == dtype and t.device == device:
            dist.all_reduce(t)  # in place, no copy
            continue
        buf = torch.cat([g.reshape(-1).to(device=device, dtype=dtype) for g in group])
        dist.all_reduce(buf)
        for g, part in zip(group, buf.split([g.numel() for g in group]), strict=True):
            g.copy_(part.view(g.shape))
    return tensors
