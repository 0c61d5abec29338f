"""Gram files: per-layer input Gram matrices computed once, saved to safetensors, reused.

A file holds one tensor per layer (key ``gram:<module name>``) and the metadata ``format``,
``version``, ``layers`` (JSON: module, kind, weight and bias parameter names, ``d_in``,
``d_out`` and the row count of every layer), ``unsupported`` (JSON), ``num_examples`` and
any string metadata the caller adds. Writes are atomic (:mod:`curvmerge.atomic`), as for
Fisher files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from curvmerge.atomic import atomic_write_bytes
from curvmerge.space import SpaceMismatchError
from curvmerge.statistics.gram import LayerGrams
from curvmerge.statistics.layers import LayerInfo, weight_dims

__all__ = ["save_grams", "load_grams", "GRAMS_FORMAT", "read_safetensors"]

GRAMS_FORMAT = "curvmerge.input_grams"
_VERSION = "1"
_RESERVED = ("format", "version", "layers", "unsupported", "num_examples")


def read_safetensors(
    path: str | os.PathLike, fmt: str, what: str, keys: Callable[[dict[str, str]], list[str]]
) -> tuple[dict[str, str], dict[str, Tensor]]:
    """Metadata and tensors of a curvmerge statistics file (Fisher and Gram files).

    Args:
        path: The file.
        fmt: The ``format`` its metadata must hold.
        what: The kind of file, for messages (``"Fisher"``, ``"Gram"``).
        keys: The tensor keys the metadata lists, in order (raising ``KeyError`` or
            ``json.JSONDecodeError`` on metadata without them).

    Raises:
        FileNotFoundError: No such file.
        ValueError: Not a file of format ``fmt``, its tensors are not those its metadata
            lists, or the file is truncated or corrupt.
    """
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file {path!r} does not exist")
    try:
        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != fmt:
                raise ValueError(
                    f"{path!r} is not a curvmerge {what} file (metadata format is "
                    f"{meta.get('format')!r}, expected {fmt!r})"
                )
            listed = keys(meta)
            if set(listed) != set(fh.keys()) or len(set(listed)) != len(listed):
                raise ValueError(f"{path!r} is corrupt: its metadata does not list its tensors")
            tensors = {k: fh.get_tensor(k) for k in listed}
    except (SafetensorError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path!r} is truncated or corrupt: {err}") from err
    return meta, tensors


def save_grams(
    path: str | os.PathLike, grams: LayerGrams, metadata: Mapping[str, str] | None = None
) -> None:
    """Save :class:`~curvmerge.statistics.gram.LayerGrams` to a safetensors file.

    Args:
        path: Destination (conventionally ``*.safetensors``).
        grams: What :func:`~curvmerge.statistics.gram.input_grams` returned.
        metadata: Extra string metadata (the model, the task, the data), checked again by
            :func:`load_grams` when asked to.

    Raises:
        ValueError: ``metadata`` uses a key the file format reserves.
    """
    from safetensors.torch import save

    if not isinstance(grams, LayerGrams):
        raise TypeError(f"grams must be LayerGrams, got {type(grams).__name__}")
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    clash = [k for k in meta if k in _RESERVED]
    if clash:
        raise ValueError(f"metadata key {clash[0]!r} is reserved by the Gram file format")
    layers = [
        {
            "module": i.module,
            "kind": i.kind,
            "weight": i.weight,
            "bias": i.bias,
            "d_in": i.d_in,
            "d_out": i.d_out,
            "num_rows": int(grams.num_rows[k]),
        }
        for k, i in grams.layers.items()
    ]
    meta.update(
        format=GRAMS_FORMAT,
        version=_VERSION,
        layers=json.dumps(layers),
        unsupported=json.dumps(list(grams.unsupported)),
        num_examples=str(int(grams.num_examples)),
    )
    data = {f"gram:{k}": g.detach().to("cpu").contiguous() for k, g in grams.grams.items()}
    atomic_write_bytes(path, save(data, metadata=meta))


def _check_model(path: str, layers: dict[str, LayerInfo], model) -> None:
    named = dict(model.named_parameters()) if isinstance(model, nn.Module) else dict(model)
    for info in layers.values():
        for name in (info.weight, info.bias):
            if name is None:
                continue
            if name not in named:
                raise SpaceMismatchError(
                    f"Gram file {path!r}: layer {info.module!r} has parameter {name!r}, which "
                    "the model does not have"
                )
        w = named[info.weight]
        d_out, d_in = weight_dims(w.shape, info.kind == "hf_conv1d") or (None, None)
        if (d_in, d_out) != (info.d_in, info.d_out):
            raise SpaceMismatchError(
                f"Gram file {path!r}: layer {info.module!r} maps {info.d_in} -> {info.d_out} "
                f"features in the file but {d_in} -> {d_out} in the model "
                f"({info.weight!r} has shape {tuple(w.shape)})"
            )


def load_grams(
    path: str | os.PathLike,
    model: nn.Module | Mapping[str, Tensor] | None = None,
    *,
    metadata: Mapping[str, str] | None = None,
    device: torch.device | str | None = None,
) -> LayerGrams:
    """Load Gram matrices saved by :func:`save_grams`.

    Args:
        path: The file.
        model: Optional model (or parameter dict) the file must fit: every layer's weight
            and bias exist with the recorded sizes.
        metadata: Optional expected metadata: every key must be stored with this value.
        device: Device of the loaded Grams (default CPU).

    Raises:
        ValueError: Not a Gram file, corrupt, or a metadata value differs from ``metadata``.
        SpaceMismatchError: The file does not fit ``model``.
    """
    path = os.fspath(path)
    meta, stored = read_safetensors(
        path,
        GRAMS_FORMAT,
        "Gram",
        lambda m: [f"gram:{r['module']}" for r in json.loads(m["layers"])],
    )
    try:
        records = json.loads(meta["layers"])
        tensors = {r["module"]: stored[f"gram:{r['module']}"] for r in records}
        unsupported = json.loads(meta["unsupported"])
        num_examples = int(meta["num_examples"])
    except (json.JSONDecodeError, KeyError, ValueError) as err:
        raise ValueError(f"{path!r} is truncated or corrupt: {err}") from err
    for key, value in (metadata or {}).items():
        if meta.get(str(key)) != str(value):
            raise ValueError(
                f"Gram file {path!r} was saved with {key}={meta.get(str(key))!r}, "
                f"expected {key}={value!r}"
            )
    layers = {
        r["module"]: LayerInfo(
            r["module"], r["kind"], r["weight"], r["bias"], int(r["d_in"]), int(r["d_out"])
        )
        for r in records
    }
    for k, info in layers.items():
        if tuple(tensors[k].shape) != (info.size, info.size):
            raise ValueError(
                f"{path!r} is corrupt: layer {k!r} has a Gram of shape "
                f"{tuple(tensors[k].shape)}, expected {(info.size, info.size)}"
            )
    if model is not None:
        _check_model(path, layers, model)
    grams = {k: t.to(device or "cpu") for k, t in tensors.items()}
    num_rows = {r["module"]: int(r["num_rows"]) for r in records}
    return LayerGrams(grams, num_rows, layers, unsupported, num_examples)
