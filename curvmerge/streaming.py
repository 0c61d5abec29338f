"""Streaming merges of (sharded) safetensors checkpoints, one tensor at a time.

Models too large to hold several copies in memory are merged tensor by tensor: for each
tensor name, the tensor of every model (and of the base, and the diagonal Fisher of every
model) is read lazily with :func:`safetensors.safe_open`, merged with the method's per-tensor
rule, and appended to the output shard being filled; a full shard is written and released.
Peak memory is therefore about :math:`(T + 2)` times the largest tensor (its :math:`T` model
copies, the base and the merged tensor, each with the method's float32 working copies) plus
one output shard, instead of the size of all models.

Inputs are a ``model.safetensors.index.json`` (Hugging Face's sharded layout: a
``weight_map`` from tensor names to shard files beside it), a single ``.safetensors`` file,
or a folder holding either. The output is a folder: ``model.safetensors`` when everything
fits in one shard of ``max_shard_size``, else ``model-00001-of-0000N.safetensors`` shards and
their ``model.safetensors.index.json``; the other files of the first model's folder
(``config.json``, tokenizer files) are copied, so a Hugging Face folder in gives a Hugging
Face folder out. The folder is written under a temporary name and renamed at the end
(:func:`curvmerge.io.atomic_folder`): an error leaves no output.

Each method is the in-memory implementation applied to one tensor, so the two give the same
merged tensors (the methods are called on single-tensor dicts):

- ``average``: the weighted average (:func:`~curvmerge.merge` without curvatures);
- ``task_arithmetic``: :math:`\\theta_0 + \\lambda\\sum_t w_t\\tau_t`
  (:func:`~curvmerge.merging.methods.task_arithmetic`);
- ``ties``: global top-k trim (below), elect, disjoint merge
  (:func:`~curvmerge.merging.methods.ties`);
- ``dare``: drop and rescale, masks seeded per tensor (below)
  (:func:`~curvmerge.merging.methods.dare`);
- ``slerp``, ``slerp_sequential``, ``spherical_barycenter``: per tensor
  (:func:`~curvmerge.merging.methods.slerp`, :mod:`curvmerge.merging.spherical`);
- ``fisher_diagonal``: the diagonal-Fisher closed form per entry, from Fisher files
  (:func:`~curvmerge.merge` with :class:`~curvmerge.operators.DiagonalOperator` curvatures);
- ``tsv_merge``, ``iso_c``, ``iso_cts``: per matrix (:mod:`curvmerge.merging.spectral`).

Three methods need a global quantity, computed by a cheap first streaming pass:

- ``ties`` trims each task vector to its top ``density`` fraction over all merged
  parameters, as in the paper (not per tensor). The threshold, the :math:`k`-th largest
  magnitude of each task vector, is found exactly by radix selection on the bit patterns of
  the (non-negative) magnitudes, 16 bits per pass: two passes for float32 task vectors, four
  for float64, each keeping one 65,536-bin histogram per model.
- ``fisher_diagonal`` with relative damping needs the mean diagonal entry :math:`s_t` of each Fisher
  over all merged parameters (:math:`\\lambda = \\text{damping} \\sum_t w_t s_t`): one pass
  over the Fisher files.
- ``dare`` needs none, but is a per-tensor variant: the in-memory :func:`dare` draws all
  masks from one generator in model order over the flattened parameters, which a stream
  cannot reproduce without generating every earlier mask. Here each tensor's masks come from
  a generator seeded by :func:`tensor_seed` (the seed and the tensor's name), so the result
  does not depend on sharding or tensor order, and equals the in-memory :func:`dare` applied
  to that tensor alone with that seed. DARE-TIES (``combine="ties"``) is not streamed (its
  trimming would be per tensor).

Half precision: every method computes in at least float32 (the in-memory methods promote)
and writes each merged tensor in the first model's dtype, so bf16/fp16 checkpoints give
bf16/fp16 output merged with float32 accumulation. Tensors outside ``params`` and
non-floating tensors (integer buffers) are copied from the first model.

Example:
    >>> import tempfile
    >>> from safetensors.torch import save_file
    >>> d = Path(tempfile.mkdtemp())
    >>> save_file({"w": torch.tensor([1.0, 2.0])}, d / "a.safetensors")
    >>> save_file({"w": torch.tensor([3.0, 6.0])}, d / "b.safetensors")
    >>> report = stream_merge([d / "a.safetensors", d / "b.safetensors"], d / "out")
    >>> open_checkpoint(d / "out").get("w")
    tensor([2., 4.])
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from curvmerge.io import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    atomic_folder,
)
from curvmerge.merging.equation import merge
from curvmerge.merging.methods import (
    check_finite_scalar,
    dare,
    slerp,
    task_arithmetic,
    ties_disjoint_merge,
    trim_below,
    trim_count,
)
from curvmerge.merging.report import DampingWarning
from curvmerge.merging.spectral import iso_c, iso_cts, tsv_merge
from curvmerge.merging.spherical import slerp_sequential, spherical_barycenter
from curvmerge.merging.system import DEFAULT_DAMPING, check_weights
from curvmerge.operators import DiagonalOperator
from curvmerge.space import ParamSpace

__all__ = [
    "STREAM_METHODS",
    "ShardedCheckpoint",
    "StreamReport",
    "open_checkpoint",
    "parse_size",
    "stream_merge",
    "tensor_seed",
]

PathLike = str | os.PathLike[str]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

#: Methods :func:`stream_merge` knows, and whether each needs the base model.
STREAM_METHODS: dict[str, bool] = {
    "average": False,
    "task_arithmetic": True,
    "ties": True,
    "dare": True,
    "slerp": False,
    "slerp_sequential": False,
    "spherical_barycenter": False,
    "fisher_diagonal": False,
    "tsv_merge": True,
    "iso_c": True,
    "iso_cts": True,
}

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


# --------------------------------------------------------------------------- reading
class ShardedCheckpoint:
    """Lazy, read-only view of a (sharded) safetensors checkpoint.

    Only headers are read when it is opened; :meth:`get` opens the tensor's shard, copies
    the tensor out and closes the shard again. safetensors memory-maps a shard, and every
    page read through a map stays in the process's resident set until the map is closed:
    shards kept open for the whole merge would make it hold every input it has read.

    Attributes:
        source: The path as given.
        names: Tensor names, in the order of the index (or of the file).
    """

    def __init__(self, path: PathLike):
        self.source = Path(path)
        self._files, self._index = _resolve(self.source)
        self._handles: dict[Path, Any] = {}
        self._info: dict[str, tuple[tuple[int, ...], str]] = {}
        self.names: list[str] = []
        self._where: dict[str, Path] = {}
        if self._index is not None:
            for name, file in self._index.items():
                self._where[name] = file
        for file in self._files:
            handle = self._handle(file)
            for name in handle.keys():
                if self._index is None:
                    self._where[name] = file
                elif self._where.get(name) != file:
                    continue  # a tensor the index places elsewhere (or not at all)
                sl = handle.get_slice(name)
                self._info[name] = (tuple(sl.get_shape()), sl.get_dtype())
        missing = [n for n in self._where if n not in self._info]
        if missing:
            raise CorruptCheckpointError(
                f"{self.source}: the index places tensor {missing[0]!r} in "
                f"{self._where[missing[0]].name}, which does not hold it"
            )
        self.names = list(self._where)
        self.close()

    def __contains__(self, name: str) -> bool:
        return name in self._info

    def __len__(self) -> int:
        return len(self.names)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor ``name`` (from the header)."""
        return self._info[name][0]

    def dtype(self, name: str) -> torch.dtype | None:
        """The torch dtype of tensor ``name`` (``None`` for dtypes torch does not have)."""
        return _DTYPES.get(self._info[name][1])

    def nbytes(self, name: str) -> int:
        """Bytes of tensor ``name``."""
        dtype = self.dtype(name)
        size = torch.tensor([], dtype=dtype).element_size() if dtype is not None else 1
        numel = 1
        for s in self.shape(name):
            numel *= s
        return numel * size

    def get(self, name: str) -> Tensor:
        """Read tensor ``name`` from its shard."""
        if name not in self._info:
            raise CheckpointMismatchError(f"{self.source} has no tensor {name!r}")
        try:
            return self._handle(self._where[name]).get_tensor(name)
        finally:
            self.close()

    def close(self) -> None:
        """Close the shards left open (none after :meth:`get`)."""
        self._handles.clear()

    @property
    def folder(self) -> Path:
        """The folder holding the checkpoint's files."""
        return self._files[0].parent

    @property
    def files(self) -> list[Path]:
        """The safetensors files (shards) of the checkpoint."""
        return list(self._files)

    def _handle(self, file: Path):
        from safetensors import SafetensorError, safe_open

        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError, RuntimeError, ValueError) as err:
                raise CorruptCheckpointError(
                    f"{file} is not a valid safetensors file (truncated or corrupt?): {err}"
                ) from err
        return self._handles[file]


def _resolve(path: Path) -> tuple[list[Path], dict[str, Path] | None]:
    """The shard files of ``path`` and, for an index, its weight map."""
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        if (path / INDEX_NAME).is_file():
            path = path / INDEX_NAME
        elif (path / SINGLE_NAME).is_file():
            path = path / SINGLE_NAME
        else:
            indexes = sorted(path.glob("*.safetensors.index.json"))
            files = sorted(path.glob("*.safetensors"))
            if len(indexes) == 1:
                path = indexes[0]
            elif not indexes and len(files) == 1:
                path = files[0]
            else:
                raise CheckpointNotFoundError(
                    f"{path} holds no {INDEX_NAME} and no {SINGLE_NAME}"
                    + (f" (but {len(files)} other .safetensors files)" if files else "")
                    + ": not a safetensors checkpoint folder"
                )
    if path.name.endswith(".json"):
        try:
            index = json.loads(path.read_text())
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
            raise CorruptCheckpointError(
                f"{path} is not a safetensors index (no weight_map of tensor names to "
                f"shard files): {err}"
            ) from err
        where = {str(n): path.parent / str(f) for n, f in weight_map.items()}
        files = list(dict.fromkeys(where.values()))
        for f in files:
            if not f.is_file():
                raise CheckpointNotFoundError(f"shard {f.name} listed in {path} does not exist")
        return files, where
    return [path], None


def open_checkpoint(path: PathLike) -> ShardedCheckpoint:
    """Open a safetensors checkpoint lazily: an index, a file, or a folder holding either.

    Raises:
        CheckpointNotFoundError: The path, its index or one of its shards does not exist.
        CorruptCheckpointError: An index or shard cannot be read.
    """
    return ShardedCheckpoint(path)


# --------------------------------------------------------------------------- writing
def parse_size(size: int | str) -> int:
    """Bytes of ``size``: an int, or a string such as ``"5GB"``, ``"500MB"``, ``"2GiB"``
    (``KB``, ``MB``, ``GB`` are powers of 1000, ``KiB``, ``MiB``, ``GiB`` of 1024).

    Example:
        >>> parse_size("2MB"), parse_size("1KiB"), parse_size(10)
        (2000000, 1024, 10)
    """
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
        units.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
        match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(size))
        if not match or match.group(2).upper() not in units:
            raise ValueError(f"max_shard_size must be bytes or like '5GB', got {size!r}")
        value = int(float(match.group(1)) * units[match.group(2).upper()])
    if value < 1:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


class _ShardWriter:
    """Fills shards of at most ``max_bytes`` (a larger tensor gets a shard of its own)."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.current: dict[str, Tensor] = {}
        self.current_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        self.largest_shard = 0

    def add(self, name: str, tensor: Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.current and self.current_bytes + size > self.max_bytes:
            self.flush()
        self.current[name] = tensor.detach().to("cpu").contiguous()
        self.current_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.current:
            return
        path = self.folder / f".shard-{len(self.shards):05d}.safetensors"
        save_file(self.current, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.current)))
        self.largest_shard = max(self.largest_shard, self.current_bytes)
        self.current, self.current_bytes = {}, 0

    def finish(self) -> list[Path]:
        """Name the shards (``model.safetensors`` alone, else numbered with an index)."""
        self.flush()
        n = len(self.shards)
        if n == 0:
            raise ValueError("nothing to write: the checkpoints hold no tensors")
        if n == 1:
            final = self.folder / SINGLE_NAME
            os.replace(self.shards[0][0], final)
            return [final]
        weight_map, files = {}, []
        for i, (path, names) in enumerate(self.shards):
            final = self.folder / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(path, final)
            files.append(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return files


# --------------------------------------------------------------------------- report
@dataclass
class StreamReport:
    """What a streaming merge did.

    Attributes:
        method: The method name.
        num_models: :math:`T`.
        options: The method's options as used (weights, scaling, damping, ...).
        merged: Names of the merged tensors.
        copied: Names of tensors copied from the first model (outside ``params`` or not
            floating point).
        files: The output safetensors files (in the final folder).
        output: The output folder.
        largest_tensor_bytes: Bytes of the largest merged tensor in the models' dtype.
        largest_shard_bytes: Bytes of the largest output shard.
        reads: Tensor reads from the inputs (models, base, Fishers), all passes included.
        passes: Streaming passes over the inputs (1, plus the global passes of ``ties``
            and ``fisher_diagonal``).
        seconds: Wall time.
        details: Method-specific results: ``ties`` thresholds per model, ``fisher_diagonal``
            damping scale and :math:`\\lambda`, ``spherical_barycenter`` linear fallbacks,
            tensors whose damping dominated.
    """

    method: str
    num_models: int
    options: dict[str, Any]
    merged: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    output: Path | None = None
    largest_tensor_bytes: int = 0
    largest_shard_bytes: int = 0
    reads: int = 0
    passes: int = 1
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return (
            f"streaming {self.method} merge of {self.num_models} models: "
            f"{len(self.merged)} tensors merged, {len(self.copied)} copied, "
            f"{len(self.files)} shard(s) in {self.output}, {self.passes} pass(es), "
            f"{self.seconds:.1f} s"
        )


def tensor_seed(seed: int, name: str) -> int:
    """The seed of tensor ``name``'s DARE masks in a streaming merge with ``seed``.

    The first 63 bits of SHA-256 of ``"{seed}:{name}"``: independent of sharding, tensor
    order and platform.

    Example:
        >>> tensor_seed(0, "w") == tensor_seed(0, "w") != tensor_seed(1, "w")
        True
    """
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


# --------------------------------------------------------------------------- merging
def _select(ckpt: ShardedCheckpoint, names: list[str], params) -> list[str]:
    """``names`` selected by ``params`` as the in-memory methods select them
    (:meth:`curvmerge.space.ParamSpace.select`: a regex searched, or a list)."""
    if params is None:
        return list(names)
    space = ParamSpace(tuple(names), tuple(ckpt.shape(n) for n in names))
    return list(space.select(params).names)


def _check_sources(
    models: list[ShardedCheckpoint],
    base: ShardedCheckpoint | None,
    fishers: list[ShardedCheckpoint] | None,
    merged: list[str],
) -> None:
    """Every merged tensor is in every input with the first model's shape (headers only)."""
    ref = models[0]
    others = [(f"model {i} ({m.source})", m) for i, m in enumerate(models)][1:]
    if base is not None:
        others.append((f"base ({base.source})", base))
    for i, f in enumerate(fishers or []):
        others.append((f"Fisher {i} ({f.source})", f))
    for name in merged:
        dtype = ref.dtype(name)
        if dtype is None or not dtype.is_floating_point:
            raise CheckpointMismatchError(
                f"tensor {name!r} of {ref.source} is not floating point and cannot be merged"
            )
        for label, ckpt in others:
            if name not in ckpt:
                raise CheckpointMismatchError(f"{label} has no tensor {name!r}")
            if ckpt.shape(name) != ref.shape(name):
                raise CheckpointMismatchError(
                    f"tensor {name!r} has shape {ckpt.shape(name)} in {label} but "
                    f"{ref.shape(name)} in model 0 ({ref.source})"
                )


def _check_finite(tensor: Tensor, what: str, name: str) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"tensor {name!r} of {what} contains NaN or Inf")


class _Stream:
    """Reads one tensor name at a time from every input, counting reads."""

    def __init__(self, models, base, fishers):
        self.models, self.base, self.fishers = models, base, fishers
        self.reads = 0

    def thetas(self, name: str) -> list[Tensor]:
        self.reads += len(self.models)
        return [m.get(name) for m in self.models]

    def base_of(self, name: str) -> Tensor | None:
        if self.base is None:
            return None
        self.reads += 1
        return self.base.get(name)

    def fishers_of(self, name: str) -> list[Tensor]:
        self.reads += len(self.fishers)
        return [f.get(name) for f in self.fishers]


def _ties_thresholds(
    stream: _Stream, names: list[str], density: float, dtype: torch.dtype
) -> tuple[list[Tensor], int]:
    """The :math:`k`-th largest magnitude of each task vector over ``names``, exactly, by
    radix selection on the magnitudes' bit patterns (16 bits per pass). Returns the
    thresholds (0-d tensors of ``dtype``; ``None`` where nothing is trimmed) and the passes."""
    T = len(stream.models)
    bits = torch.finfo(dtype).bits
    int_dtype = {32: torch.int32, 64: torch.int64}.get(bits)
    if int_dtype is None:
        raise ValueError(f"ties streams float32 or float64 task vectors, not {dtype}")
    n = 0
    for name in names:
        numel = 1
        for s in stream.models[0].shape(name):
            numel *= s
        n += numel
    k = trim_count(n, density)
    if k == n:
        return [None] * T, 0
    remaining = [k] * T  # rank of the threshold among the entries that share the prefix
    prefix = [0] * T
    levels = bits // 16
    for level in range(levels):
        shift = bits - 16 * (level + 1)
        hist = torch.zeros(T, 1 << 16, dtype=torch.int64)
        for name in names:
            base = stream.base_of(name).to(dtype)
            for t, theta in enumerate(stream.thetas(name)):
                if level == 0:
                    _check_finite(theta, f"model {t} ({stream.models[t].source})", name)
                code = (theta.to(dtype) - base).abs().reshape(-1).view(int_dtype)
                if level > 0:
                    code = code[(code >> (shift + 16)) == prefix[t]]
                digit = ((code >> shift) & 0xFFFF).to(torch.int64)
                hist[t] += torch.bincount(digit, minlength=1 << 16)
            if level == 0:
                _check_finite(base, f"base ({stream.base.source})", name)
        for t in range(T):
            above = hist[t].flip(0).cumsum(0)  # entries with digit >= d, from d = 65535 down
            d = int(torch.searchsorted(above, remaining[t]))  # first count reaching the rank
            remaining[t] -= int(above[d - 1]) if d > 0 else 0
            prefix[t] = (prefix[t] << 16) | (0xFFFF - d)
    thresholds = [torch.tensor(p, dtype=int_dtype).view(dtype) for p in prefix]
    return thresholds, levels


def _single(name: str, tensors: Sequence[Tensor]) -> list[dict[str, Tensor]]:
    return [{name: t} for t in tensors]


def stream_merge(
    checkpoints: Sequence[PathLike],
    out: PathLike,
    *,
    method: str = "average",
    base: PathLike | None = None,
    fishers: Sequence[PathLike] | None = None,
    weights: Sequence[float] | None = None,
    params: str | Sequence[str] | None = None,
    max_shard_size: int | str = "5GB",
    force: bool = False,
    copy_files: bool = True,
    progress: bool = False,
    **options: Any,
) -> StreamReport:
    """Merge (sharded) safetensors checkpoints tensor by tensor into a sharded output folder.

    For each merged tensor :math:`n`, the method's rule (see the module docstring) is applied
    to :math:`(\\theta_{1,n}, \\dots, \\theta_{T,n})` (and :math:`\\theta_{0,n}`, and the
    Fisher diagonals :math:`d_{t,n}`), which holds at most :math:`T + 2` tensors of that size
    (with their float32 working copies) besides the output shard being filled.

    Args:
        checkpoints: One checkpoint per model: an index file, a ``.safetensors`` file, or a
            folder holding ``model.safetensors.index.json`` or ``model.safetensors``.
        out: The output folder (written atomically; its parent must exist).
        method: One of :data:`STREAM_METHODS`.
        base: The base checkpoint :math:`\\theta_0` (needed by task-vector methods; the
            optional base of ``slerp``, ``slerp_sequential`` and ``spherical_barycenter``;
            ``prior="base"`` of ``fisher_diagonal``).
        fishers: ``fisher_diagonal`` only: one diagonal Fisher per model, as a Fisher file
            (:func:`curvmerge.fisher.save_fisher`) or a (sharded) safetensors checkpoint of
            diagonals named as the parameters. The merged tensors are the Fishers' names.
        weights: Per-model weights, as the in-memory method takes them.
        params: Names or a regex selecting the merged tensors (default: every floating
            tensor of the first model, or the Fishers' names); the others are copied from
            the first model.
        max_shard_size: Largest output shard, bytes or ``"5GB"``-style (a larger tensor gets
            a shard of its own).
        force: Replace an existing ``out``.
        copy_files: Copy the first model's other files (``config.json``, tokenizer files)
            when it is a folder.
        progress: One progress bar over the tensors of the merging pass.
        **options: The method's options: ``scaling``; ``density`` (ties); ``drop_rate``,
            ``seed`` (dare); ``t`` (slerp); ``tol``, ``maxiter`` (spherical_barycenter);
            ``rank_fraction``, ``common_fraction``, ``vector_merge`` (spectral);
            ``damping``, ``damping_scale``, ``prior`` (fisher_diagonal).

    Returns:
        A :class:`StreamReport`.

    Raises:
        CheckpointNotFoundError: An input, its index or a shard does not exist.
        CheckpointMismatchError: A merged tensor is missing from an input or has another
            shape (naming both), or is not floating point.
        CheckpointExistsError: ``out`` exists and ``force`` is false.
        ValueError: Unknown method, option or value; NaN or Inf in an input.
    """
    start = time.perf_counter()
    if method not in STREAM_METHODS:
        raise ValueError(
            f"method {method!r} cannot be streamed; choose one of {', '.join(STREAM_METHODS)}"
        )
    if isinstance(checkpoints, (str, os.PathLike)) or not len(checkpoints):
        raise ValueError("stream_merge needs a non-empty list of checkpoints")
    if STREAM_METHODS[method] and base is None:
        raise ValueError(f"{method} needs the base checkpoint theta_0: pass base=...")
    if method == "fisher_diagonal" and fishers is None:
        raise ValueError("fisher_diagonal needs one Fisher file per model: pass fishers=[...]")
    if method != "fisher_diagonal" and fishers is not None:
        raise ValueError(f"fishers are used by method='fisher_diagonal' only, not {method!r}")
    rule, per_options = _rule(method, len(checkpoints), weights, dict(options))
    shard_bytes = parse_size(max_shard_size)
    if method == "fisher_diagonal" and per_options["prior"] == "base" and base is None:
        raise ValueError(
            "fisher_diagonal with prior='base' needs the base checkpoint: pass base=..."
        )
    models = [open_checkpoint(c) for c in checkpoints]
    base_ckpt = open_checkpoint(base) if base is not None else None
    fisher_ckpts = [open_checkpoint(f) for f in fishers] if fishers is not None else None
    if fisher_ckpts is not None and len(fisher_ckpts) != len(models):
        raise ValueError(f"got {len(fisher_ckpts)} Fisher files for {len(models)} models")
    first = models[0]
    if fisher_ckpts is not None:
        candidates = [n for n in fisher_ckpts[0].names if n in first]
        absent = [n for n in fisher_ckpts[0].names if n not in first]
        if absent:
            raise CheckpointMismatchError(
                f"Fisher 0 ({fisher_ckpts[0].source}) holds tensor {absent[0]!r}, which "
                f"model 0 ({first.source}) does not"
            )
        for i, f in enumerate(fisher_ckpts[1:], start=1):
            if set(f.names) != set(candidates):
                odd = sorted(set(f.names) ^ set(candidates))[0]
                raise CheckpointMismatchError(
                    f"Fisher {i} ({f.source}) and Fisher 0 differ in tensor {odd!r}"
                )
        order = {n: i for i, n in enumerate(first.names)}
        candidates.sort(key=order.__getitem__)
    elif params is None:
        candidates = [n for n in first.names if (first.dtype(n) or torch.int8).is_floating_point]
    else:
        candidates = list(first.names)  # a non-floating tensor asked for is refused below
    merged_names = _select(first, candidates, params)
    _check_sources(models, base_ckpt, fisher_ckpts, merged_names)
    stream = _Stream(models, base_ckpt, fisher_ckpts)
    report = StreamReport(method=method, num_models=len(models), options=per_options)
    report.largest_tensor_bytes = max(first.nbytes(n) for n in merged_names)
    chosen = set(merged_names)

    target = Path(out)
    dominated: list[str] = []
    fallbacks = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(first.names), desc=f"stream {method}", unit="tensor")
    try:
        with atomic_folder(target, force) as tmp:  # refuses an existing output first
            context: dict[str, Any] = {}
            if method == "ties":
                dtype = torch.promote_types(first.dtype(merged_names[0]), torch.float32)
                thresholds, passes = _ties_thresholds(
                    stream, merged_names, per_options["density"], dtype
                )
                context["thresholds"], context["dtype"] = thresholds, dtype
                report.passes += passes
                report.details["thresholds"] = [None if x is None else float(x) for x in thresholds]
            if method == "fisher_diagonal":
                context["damping_scale"] = _fisher_scale(stream, merged_names, per_options)
                report.passes += 1 if per_options["damping_scale"] == "auto" else 0
                report.details["damping_scale"] = context["damping_scale"]
                report.details["lambda"] = per_options["damping"] * context["damping_scale"]
            writer = _ShardWriter(tmp, shard_bytes)
            for name in first.names:
                if name not in chosen:
                    stream.reads += 1
                    writer.add(name, first.get(name))
                    report.copied.append(name)
                else:
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        result = rule(stream, name, context)
                    for w in caught:
                        if issubclass(w.category, DampingWarning):
                            dominated.append(name)
                        else:
                            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
                    fallbacks += getattr(result, "fallbacks", 0)
                    writer.add(name, result.tensor)
                    report.merged.append(name)
                    del result
                if bar is not None:
                    bar.update(1)
            files = writer.finish()
            if copy_files and first.source.is_dir():
                _copy_other_files(first.folder, tmp)
            report.largest_shard_bytes = writer.largest_shard
    finally:
        if bar is not None:
            bar.close()
        for ckpt in [*models, base_ckpt, *(fisher_ckpts or [])]:
            if ckpt is not None:
                ckpt.close()
    if dominated:
        report.details["damping_dominates"] = dominated
        warnings.warn(
            f"the damping dominates the curvature in {len(dominated)} tensor(s) (first: "
            f"{dominated[0]!r}): they stay near the prior; lower the damping",
            DampingWarning,
            stacklevel=2,
        )
    if method == "spherical_barycenter":
        report.details["linear_fallbacks"] = fallbacks
    report.files = [target / f.name for f in files]
    report.output = target
    report.reads = stream.reads
    report.seconds = time.perf_counter() - start
    return report


def _copy_other_files(src: Path, dst: Path) -> None:
    for item in src.iterdir():
        if item.is_file() and not (
            item.name.endswith(".safetensors") or item.name.endswith(".safetensors.index.json")
        ):
            shutil.copy2(item, dst / item.name)


@dataclass
class _Merged:
    tensor: Tensor
    fallbacks: int = 0


_Rule = Callable[[_Stream, str, dict], _Merged]


def _take(options: dict, allowed: Mapping[str, Any], method: str) -> dict[str, Any]:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"{method} takes no option {unknown[0]!r} (its options: {', '.join(allowed) or 'none'})"
        )
    return {k: options.get(k, v) for k, v in allowed.items()}


def _rule(method: str, T: int, weights, options: dict) -> tuple[_Rule, dict[str, Any]]:
    """The per-tensor rule of ``method`` and its checked options."""
    if method == "average":
        opts = _take(options, {}, method)
        w = check_weights(weights, T, 1.0 / T)

        def rule(s, name, ctx):
            return _Merged(merge(_single(name, s.thetas(name)), weights=w).params[name])

        return rule, {"weights": w, **opts}

    if method in ("task_arithmetic", "tsv_merge", "iso_c", "iso_cts"):
        allowed: dict[str, Any] = {"scaling": 1.0}
        if method != "task_arithmetic":
            allowed["vector_merge"] = "mean"
        if method == "tsv_merge":
            allowed["rank_fraction"] = None
        if method == "iso_cts":
            allowed["common_fraction"] = 0.8
        opts = _take(options, allowed, method)
        w = check_weights(weights, T, 1.0)
        fn = {
            "task_arithmetic": task_arithmetic,
            "tsv_merge": tsv_merge,
            "iso_c": iso_c,
            "iso_cts": iso_cts,
        }[method]

        def rule(s, name, ctx):
            thetas = _single(name, s.thetas(name))
            base = {name: s.base_of(name)}
            return _Merged(fn(thetas, base, weights=w, **opts).params[name])

        return rule, {"weights": w, **opts}

    if method == "ties":
        opts = _take(options, {"density": 0.2, "scaling": 1.0}, method)
        density = check_finite_scalar(opts["density"], "density")
        if not 0 < density <= 1:
            raise ValueError(f"density must be in (0, 1], got {density}")
        scaling = check_finite_scalar(opts["scaling"], "scaling")
        w = check_weights(weights, T, 1.0)

        def rule(s, name, ctx):
            thetas = s.thetas(name)
            dtype = ctx["dtype"]  # as ties(): the first merged tensor's, at least float32
            base = s.base_of(name).to(dtype)
            trimmed = torch.stack(
                [
                    w[t] * (tau if thr is None else trim_below(tau, thr))
                    for t, thr in enumerate(ctx["thresholds"])
                    for tau in [thetas[t].to(dtype) - base]
                ]
            )
            merged = base + scaling * ties_disjoint_merge(trimmed)
            return _Merged(merged.to(thetas[0].dtype))

        return rule, {"weights": w, "density": density, "scaling": scaling}

    if method == "dare":
        opts = _take(options, {"drop_rate": 0.5, "scaling": 1.0, "seed": 0}, method)
        w = check_weights(weights, T, 1.0)

        def rule(s, name, ctx):
            thetas = _single(name, s.thetas(name))
            base = {name: s.base_of(name)}
            seed = tensor_seed(opts["seed"], name)
            out = dare(thetas, base, weights=w, drop_rate=opts["drop_rate"],
                       scaling=opts["scaling"], seed=seed)  # fmt: skip
            return _Merged(out.params[name])

        return rule, {"weights": w, **opts}

    if method in ("slerp", "slerp_sequential", "spherical_barycenter"):
        if method == "slerp":
            opts = _take(options, {"t": None}, method)
            if T != 2:
                raise ValueError(f"slerp merges exactly 2 models, got {T}")
            kwargs = {"t": opts["t"], "weights": weights}
        elif method == "slerp_sequential":
            opts = _take(options, {}, method)
            kwargs = {"weights": weights}
        else:
            opts = _take(options, {"tol": 1e-10, "maxiter": 100}, method)
            kwargs = {"weights": weights, **opts}
        fn = {
            "slerp": slerp,
            "slerp_sequential": slerp_sequential,
            "spherical_barycenter": spherical_barycenter,
        }[method]

        def rule(s, name, ctx):
            thetas = _single(name, s.thetas(name))
            b = s.base_of(name)
            base = None if b is None else {name: b}
            out = fn(thetas, base=base, per_tensor=True, **kwargs)
            return _Merged(out.params[name], out.report.options.get("linear_fallbacks", 0))

        return rule, {"weights": weights, **opts}

    # fisher
    opts = _take(
        options, {"damping": DEFAULT_DAMPING, "damping_scale": "auto", "prior": "mean"}, method
    )
    w = check_weights(weights, T, 1.0 / T)
    opts["damping"] = check_finite_scalar(opts["damping"], "damping")
    if opts["prior"] not in ("mean", "base", "zero", None):
        raise ValueError(f"prior must be 'mean', 'base', 'zero' or None, got {opts['prior']!r}")

    def rule(s, name, ctx):
        thetas = _single(name, s.thetas(name))
        diags = s.fishers_of(name)
        space = ParamSpace((name,), (tuple(diags[0].shape),))
        curvatures = [DiagonalOperator(space, d.reshape(-1)) for d in diags]
        base = None
        if opts["prior"] == "base":
            b = s.base_of(name)
            base = None if b is None else {name: b}
        out = merge(
            thetas,
            curvatures,
            weights=w,
            damping=opts["damping"],
            damping_scale=ctx["damping_scale"],
            prior=opts["prior"],
            base=base,
        )
        return _Merged(out.params[name])

    return rule, {"weights": w, **opts}


def _fisher_scale(stream: _Stream, names: list[str], opts: dict) -> float:
    """The damping scale of the whole merge: :math:`\\sum_t w_t s_t` with :math:`s_t` the
    mean diagonal entry of Fisher :math:`t` over every merged entry (one pass over the
    Fisher files), or the given scale."""
    given = opts["damping_scale"]
    if given != "auto":
        return check_finite_scalar(given, "damping_scale")
    T = len(stream.fishers)
    sums = [0.0] * T
    count = 0
    for name in names:
        for t, d in enumerate(stream.fishers_of(name)):
            _check_finite(d, f"Fisher {t} ({stream.fishers[t].source})", name)
            if bool((d < 0).any()):
                raise ValueError(
                    f"tensor {name!r} of Fisher {t} ({stream.fishers[t].source}) has "
                    "negative entries"
                )
            sums[t] += float(d.sum(dtype=torch.float64))
            if t == 0:
                count += d.numel()
    means = [x / max(count, 1) for x in sums]
    scale = sum(wt * m for wt, m in zip(opts["weights"], means, strict=True))
    if scale <= 0:
        raise ValueError("the Fishers are zero on every merged tensor: no damping scale")
    return scale
