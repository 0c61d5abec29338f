"""Checkpoints: parameter dicts as safetensors files and Hugging Face model folders.

Every write is atomic: the data go to a temporary file (or folder) beside the target, are
flushed to disk, and are then renamed over it with :func:`os.replace`, so a crash never leaves
a half-written checkpoint and an existing one stays intact until the new one is complete. An
existing target is only replaced with ``force=True``.

Nothing here unpickles: safetensors files are read with :mod:`safetensors`, and legacy
``.pt`` / ``.pth`` / ``.bin`` state dicts only with ``torch.load(weights_only=True)``.

Errors are :class:`CheckpointError` subclasses that also derive from the matching built-in
(``FileNotFoundError``, ``FileExistsError``, ``ValueError``), and their messages name the file
and, for mismatches, the parameter.

Example:
    >>> import tempfile, os
    >>> from curvmerge.io import save_params, load_params
    >>> folder = tempfile.mkdtemp()
    >>> path = save_params({"w": torch.ones(2, 3)}, os.path.join(folder, "m.safetensors"))
    >>> load_params(path)["w"].shape
    torch.Size([2, 3])
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from curvmerge._optional import require
from curvmerge.atomic import atomic_write_bytes

__all__ = [
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "atomic_folder",
    "check_compatible",
    "load_checkpoint",
    "load_hf_model",
    "load_params",
    "read_metadata",
    "save_checkpoint",
    "save_hf_model",
    "save_params",
]

PathLike = str | os.PathLike[str]

_TORCH_SUFFIXES = (".pt", ".pth", ".bin")


class CheckpointError(Exception):
    """Base class of checkpoint reading and writing errors."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file or folder does not exist."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """The output exists and ``force`` was not given."""


class CorruptCheckpointError(CheckpointError, ValueError):
    """The file is not a readable checkpoint (truncated, corrupt or of another format)."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """The checkpoint's parameter names or shapes differ from the model's."""


# --------------------------------------------------------------------------- atomic writes


def _check_target(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise CheckpointExistsError(
            f"{path} already exists; pass force=True (--force on the command line) to replace it"
        )
    if not path.parent.is_dir():
        raise CheckpointNotFoundError(f"output folder {path.parent} does not exist")


def _to_saveable(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"parameter names must be strings, got {name!r}")
        if not isinstance(value, Tensor):
            raise TypeError(f"parameter {name!r} is a {type(value).__name__}, not a tensor")
        # clone: safetensors refuses tensors that share memory (tied weights, views)
        out[name] = value.detach().to("cpu").contiguous().clone()
    return out


# --------------------------------------------------------------------------- parameter dicts


def save_params(
    params: Mapping[str, Tensor],
    path: PathLike,
    *,
    force: bool = False,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Save named tensors to a safetensors file, atomically.

    Args:
        params: Named tensors (moved to the CPU; names must be strings).
        path: Output file, usually ending in ``.safetensors``.
        force: Replace an existing file.
        metadata: Extra information stored in the header; strings are stored as they are,
            other values as JSON. :func:`read_metadata` decodes every value that parses as
            JSON, so a string such as ``"3"`` comes back as the number 3.

    Returns:
        The path written.

    Raises:
        CheckpointExistsError: ``path`` exists and ``force`` is false.
        CheckpointNotFoundError: The output folder does not exist.
    """
    from safetensors.torch import save

    target = Path(path)
    _check_target(target, force)
    meta = None
    if metadata:
        meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    atomic_write_bytes(target, save(_to_saveable(params), metadata=meta))
    return target


def _require_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointNotFoundError(
            f"{path} is a folder, not a checkpoint file (load Hugging Face folders with "
            "load_hf_model)"
        )


def load_params(path: PathLike, *, device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """Load named tensors from a safetensors file (or a ``.pt``/``.pth``/``.bin`` state dict).

    Safetensors files are read completely (not memory-mapped), so the file may be replaced or
    deleted afterwards. ``.pt``/``.pth``/``.bin`` files are read with
    ``torch.load(weights_only=True)``, which refuses pickled code.

    Args:
        path: The checkpoint file.
        device: Device of the returned tensors.

    Returns:
        A dict of tensors in file order.

    Raises:
        CheckpointNotFoundError: The file does not exist.
        CorruptCheckpointError: The file is truncated, corrupt, or not a state dict of tensors.
    """
    target = Path(path)
    _require_file(target)
    if target.suffix in _TORCH_SUFFIXES:
        return _load_torch(target, device)
    from safetensors import SafetensorError
    from safetensors.torch import load

    data = target.read_bytes()
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError, OSError) as err:
        raise CorruptCheckpointError(
            f"{target} is not a valid safetensors file (truncated or corrupt?): {err}"
        ) from err
    return {k: v.to(device) for k, v in tensors.items()}


def _load_torch(path: Path, device: torch.device | str) -> dict[str, Tensor]:
    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # torch raises many types (UnpicklingError, RuntimeError, EOF)
        raise CorruptCheckpointError(
            f"{path} could not be read as a weights-only torch checkpoint: {err}"
        ) from err
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    ):
        raise CorruptCheckpointError(f"{path} does not hold a dict of named tensors")
    return dict(obj)


def read_metadata(path: PathLike) -> dict[str, Any]:
    """Return the metadata stored in a safetensors header (JSON values decoded).

    Raises:
        CheckpointNotFoundError: The file does not exist.
        CorruptCheckpointError: The header cannot be read.
    """
    from safetensors import SafetensorError, safe_open

    target = Path(path)
    _require_file(target)
    try:
        with safe_open(str(target), framework="pt") as handle:
            raw = handle.metadata() or {}
    except (SafetensorError, ValueError, RuntimeError, OSError) as err:
        raise CorruptCheckpointError(
            f"{target} is not a valid safetensors file (truncated or corrupt?): {err}"
        ) from err
    out: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            out[key] = json.loads(value)
        except (json.JSONDecodeError, TypeError):
            out[key] = value
    return out


# --------------------------------------------------------------------------- modules


def check_compatible(
    expected: Mapping[str, Tensor | torch.Size | tuple[int, ...]],
    found: Mapping[str, Tensor | torch.Size | tuple[int, ...]],
    *,
    source: str = "checkpoint",
    allow_missing: bool = False,
    allow_unexpected: bool = False,
) -> None:
    """Check that ``found`` has the names and shapes of ``expected``.

    Args:
        expected: Names to tensors or shapes, e.g. a model's state dict.
        found: Names to tensors or shapes, e.g. a loaded checkpoint.
        source: How to call ``found`` in messages (e.g. its path).
        allow_missing: Accept names of ``expected`` absent from ``found``.
        allow_unexpected: Accept names of ``found`` absent from ``expected``.

    Raises:
        CheckpointMismatchError: Naming the first parameter whose shape differs, or listing
            missing / unexpected names.
    """

    def shape(x: Tensor | torch.Size | tuple[int, ...]) -> tuple[int, ...]:
        return tuple(x.shape) if isinstance(x, Tensor) else tuple(x)

    for name, value in expected.items():
        if name in found and shape(found[name]) != shape(value):
            raise CheckpointMismatchError(
                f"parameter {name!r} has shape {shape(found[name])} in {source} but "
                f"{shape(value)} in the model (different architecture or number of classes?)"
            )
    missing = [n for n in expected if n not in found]
    unexpected = [n for n in found if n not in expected]
    problems = []
    if missing and not allow_missing:
        problems.append(f"missing {len(missing)} parameter(s): {_preview(missing)}")
    if unexpected and not allow_unexpected:
        problems.append(f"{len(unexpected)} unexpected parameter(s): {_preview(unexpected)}")
    if problems:
        raise CheckpointMismatchError(
            f"{source} does not fit the model (different architecture?): " + "; ".join(problems)
        )


def _preview(names: list[str], k: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:k])
    return shown + (f", ... ({len(names) - k} more)" if len(names) > k else "")


def save_checkpoint(
    model: nn.Module,
    path: PathLike,
    *,
    force: bool = False,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Save a module's state dict (parameters and persistent buffers) as safetensors, atomically.

    Args:
        model: The module.
        path: Output file.
        force: Replace an existing file.
        metadata: Extra header information (see :func:`save_params`); a ``"format"`` entry
            ``"curvmerge-state-dict"`` is added.

    Returns:
        The path written.
    """
    meta = {"format": "curvmerge-state-dict", **(metadata or {})}
    return save_params(model.state_dict(), path, force=force, metadata=meta)


def load_checkpoint(
    model: nn.Module,
    path: PathLike,
    *,
    strict: bool = True,
) -> nn.Module:
    """Load a checkpoint file into ``model`` in place, after checking names and shapes.

    Args:
        model: The module to fill; its architecture must match the checkpoint.
        path: A file written by :func:`save_checkpoint` / :func:`save_params` (or a weights-only
            torch state dict).
        strict: Require exactly the model's state-dict names; with ``False``, names missing
            from the file keep the model's values and extra names are ignored (shapes must still
            match).

    Returns:
        ``model``, in eval mode.

    Raises:
        CheckpointNotFoundError, CorruptCheckpointError, CheckpointMismatchError.
    """
    tensors = load_params(path)
    own = model.state_dict()
    check_compatible(
        own, tensors, source=str(path), allow_missing=not strict, allow_unexpected=not strict
    )
    model.load_state_dict({k: v for k, v in tensors.items() if k in own}, strict=False)
    return model.eval()


# --------------------------------------------------------------------------- Hugging Face folders


@contextlib.contextmanager
def atomic_folder(target: PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target`` and move it into place on success.

    Write everything into the yielded folder; when the ``with`` block ends without an error
    the folder is renamed to ``target`` (replacing an existing one only with ``force``), so
    the whole output appears at once. On any error (or interrupt) the temporary folder is
    removed and ``target`` is left as it was. A killed process may leave the hidden
    temporary folder (``.NAME.*.tmp``) beside ``target``, never a half-written ``target``.

    Args:
        target: The output folder; its parent must exist.
        force: Replace an existing ``target``.

    Raises:
        CheckpointExistsError: ``target`` exists and ``force`` is false.
        CheckpointNotFoundError: The parent folder does not exist.

    Example:
        >>> import tempfile
        >>> parent = Path(tempfile.mkdtemp())
        >>> with atomic_folder(parent / "out") as tmp:
        ...     _ = (tmp / "a.txt").write_text("done")
        >>> (parent / "out" / "a.txt").read_text()
        'done'
    """
    target = Path(target)
    _check_target(target, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            backup = target.with_name(f".{target.name}.{uuid.uuid4().hex}.old")
            os.replace(target, backup)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(backup, target)
                raise
            if backup.is_dir():
                shutil.rmtree(backup, ignore_errors=True)
            else:
                backup.unlink(missing_ok=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_hf_model(
    model: Any,
    folder: PathLike,
    *,
    tokenizer: Any | None = None,
    force: bool = False,
) -> Path:
    """Save a Hugging Face model (and tokenizer) with ``save_pretrained``, atomically.

    The folder is written under a temporary name beside ``folder`` and renamed into place.

    Args:
        model: A ``transformers`` ``PreTrainedModel``.
        folder: Output folder.
        tokenizer: Saved into the same folder when given.
        force: Replace an existing folder (or file).

    Returns:
        The folder written.
    """
    target = Path(folder)
    with atomic_folder(target, force) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return target


def load_hf_model(
    folder: PathLike,
    *,
    auto_class: str = "AutoModelForSequenceClassification",
    eager: bool = True,
    **kwargs: Any,
) -> Any:
    """Load a Hugging Face model folder offline, from safetensors weights only.

    Args:
        folder: A folder written by :func:`save_hf_model` or ``save_pretrained``.
        auto_class: Name of the ``transformers`` auto class to load with.
        eager: Use ``attn_implementation="eager"`` (needed for GGN products).
        **kwargs: Passed to ``from_pretrained`` (e.g. ``num_labels``).

    Returns:
        The model in eval mode.

    Raises:
        CheckpointNotFoundError: The folder or its ``config.json`` does not exist.
        CorruptCheckpointError: The weights cannot be read.
    """
    target = Path(folder)
    if not target.is_dir():
        raise CheckpointNotFoundError(f"model folder {target} does not exist")
    if not (target / "config.json").is_file():
        raise CheckpointNotFoundError(f"{target} has no config.json: not a Hugging Face model")
    weights = sorted(target.glob("*.safetensors"))
    if not weights:
        raise CheckpointNotFoundError(
            f"{target} has no .safetensors weights (pickled weights are not loaded)"
        )
    for file in weights:
        read_metadata(file)  # raises CorruptCheckpointError for a truncated file
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    require("transformers", "curvmerge.io.load_hf_model")
    import transformers

    cls = getattr(transformers, auto_class)
    if eager:
        kwargs.setdefault("attn_implementation", "eager")
    try:
        model = cls.from_pretrained(str(target), use_safetensors=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as err:
        raise CorruptCheckpointError(f"could not load the model in {target}: {err}") from err
    return model.eval()
