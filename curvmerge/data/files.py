"""User data files in, model batches out: CSV, TSV, JSON Lines, Parquet, ``datasets`` on disk.

Three steps, each usable on its own:

1. :func:`read_table` reads a file (``.csv``, ``.tsv``, ``.jsonl``/``.ndjson``, ``.json``,
   ``.parquet``; compressed with ``.gz``/``.bz2``/``.xz``/``.zst`` too) with :mod:`pandas`, a
   folder written by ``datasets``' ``save_to_disk`` with ``load_from_disk`` (``split=``
   picks a split of a ``DatasetDict``), or an image folder (``ROOT/<label>/<image>``) into a
   ``datasets.Dataset``.
2. :func:`split_table` splits a table into train, validation and test parts by a seeded
   shuffle.
3. :func:`encode_table` turns a table into ``(inputs, targets)`` batches for a model loaded
   with :func:`curvmerge.hf.load_model`, with the model's own tokenizer or image processor.
   The result, :class:`DataBatches`, is a sequence of batches that every curvmerge computer
   (``diagonal_fisher``, ``GGNOperator``, ...) takes as ``data``, together with the loss
   (:attr:`DataBatches.loss`) that fits the targets.

:func:`load_data` and :func:`load_splits` do all three.

Columns. One text column, or two for sentence pairs (RTE, MNLI: ``text_pair_column``), a
label column, or an image column. Left as ``None`` they are found by common names
(``text``/``sentence``/..., the pairs ``sentence1``/``sentence2``, ``premise``/``hypothesis``,
``question``/``sentence``, ``question1``/``question2``; ``label``/``labels``/...;
``image``/``img``/...). Labels may be strings or integers: strings are looked up in the
model config's ``label2id`` (an integer written as a string, ``"1"``, is read as a class
index when it is not a label name), integers must be class indices of the model; anything
else is refused with the offending label and the model's labels. Pass ``label2id=`` when the
file's names differ from the config's (e.g. a config with the default ``LABEL_0``, ...).

Targets by model kind (padding is marked in ``attention_mask`` and never a target):

- sequence and image classification: one class index per example, ``[B]`` (float ``[B, 1]``
  for a regression model with one output, loss MSE);
- token classification: the text column holds words (a list, or a string split on
  whitespace) and the label column one label per word; the first sub-token of each word
  carries its label, every other position ``-100`` (``[B, T]``);
- causal LM: next-token targets from :func:`curvmerge.losses.causal_lm_targets`, ``-100``
  at padding and at the last position (``[B, T]``); no label column.

Token-level targets come with ``LossSpec("cross_entropy", classes_last=True)``, which
tells the computers that logits are ``[B, T, C]`` (needed when ``T == C``).

Errors are :class:`DataFileError` (a ``ValueError``) with a one-line message: a missing file
(:class:`DataFileNotFoundError`, also a ``FileNotFoundError``), an unknown format, a
missing column (the available ones are named), an empty file, a label outside the model's
labels.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from curvmerge._optional import require
from curvmerge.losses import LossSpec, causal_lm_targets

if TYPE_CHECKING:  # pragma: no cover
    require("datasets", "reading data files (curvmerge.data.files)")
    import datasets

    from curvmerge.hf import HFModel

__all__ = [
    "FORMATS",
    "IMAGE_SUFFIXES",
    "DataBatches",
    "DataFileError",
    "DataFileNotFoundError",
    "SPLIT_NAMES",
    "encode_table",
    "load_data",
    "load_splits",
    "read_split_tables",
    "read_table",
    "saved_split_names",
    "split_table",
]

FORMATS = ("csv", "tsv", "jsonl", "json", "parquet", "disk", "imagefolder")
"""Values of ``format=``: files read with pandas, ``load_from_disk`` folders, image folders."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
"""Suffixes of the files an image folder's class subfolders are searched for."""

_SUFFIXES = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".zip")

_TEXT_COLUMNS = ("text", "sentence", "content", "review", "document", "tweet", "tokens", "words")
_PAIR_COLUMNS = (
    ("sentence1", "sentence2"),
    ("premise", "hypothesis"),
    ("question", "sentence"),
    ("question1", "question2"),
    ("text", "text_pair"),
)
_LABEL_COLUMNS = ("label", "labels", "target", "class", "ner_tags", "tags")
_IMAGE_COLUMNS = ("image", "img", "image_path", "path", "file")

DEFAULT_MAX_LENGTH = 128
"""Tokens per example when ``max_length`` is not given (capped at the model's positions)."""


class DataFileError(ValueError):
    """A data file or table cannot be turned into batches; the message says why, in one line."""


class DataFileNotFoundError(DataFileError, FileNotFoundError):
    """The data file or folder does not exist."""


# --------------------------------------------------------------------------- reading


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence ``datasets``' progress bars and logging (library code does not print)."""
    require("datasets", "reading data files (curvmerge.data.files)")
    import datasets

    bars_off = datasets.utils.are_progress_bars_disabled()
    level = datasets.utils.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets.utils.logging.set_verbosity(level)
        if not bars_off:
            datasets.enable_progress_bars()


def _detect_format(path: Path) -> str:
    if path.is_dir():
        if any((path / f).is_file() for f in ("dataset_dict.json", "dataset_info.json")):
            return "disk"
        if (path / "state.json").is_file():
            return "disk"
        if _image_files(path):
            return "imagefolder"
        raise DataFileError(
            f"{path} is a folder but neither a dataset saved with save_to_disk nor an image "
            "folder (ROOT/<label>/<image>)"
        )
    suffixes = [s.lower() for s in path.suffixes]
    while suffixes and suffixes[-1] in _COMPRESSION:
        suffixes.pop()
    ext = suffixes[-1] if suffixes else ""
    if ext not in _SUFFIXES:
        raise DataFileError(
            f"unknown data format of {path} (suffix {ext or 'none'!r}); use .csv, .tsv, .jsonl, "
            ".json, .parquet, a folder saved with save_to_disk or an image folder, or pass "
            f"format= one of {', '.join(FORMATS)}"
        )
    return _SUFFIXES[ext]


def _image_files(root: Path) -> list[tuple[str, str]]:
    """``(path, label)`` for every image in a class subfolder, sorted."""
    out = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for file in sorted(sub.rglob("*")):
            if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES:
                out.append((str(file), sub.name))
    return out


def _read_pandas(path: Path, fmt: str):
    require("pandas", "reading CSV/TSV/JSON Lines/Parquet files")
    import pandas as pd

    try:
        if fmt in ("csv", "tsv"):
            return pd.read_csv(
                path,
                sep="\t" if fmt == "tsv" else ",",
                keep_default_na=False,
                na_values=[""],
            )
        if fmt == "jsonl":
            return pd.read_json(path, lines=True, dtype=False)
        if fmt == "json":
            try:
                return pd.read_json(path, dtype=False)
            except ValueError:
                return pd.read_json(path, lines=True, dtype=False)
        return pd.read_parquet(path)
    except pd.errors.EmptyDataError as err:
        raise DataFileError(f"{path} is empty") from err
    except (ValueError, OSError, pd.errors.ParserError, UnicodeDecodeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataFileError(f"{path} could not be read as {fmt}: {first}") from err


def _from_pandas(frame, path: Path):
    require("datasets", "reading data files (curvmerge.data.files)")
    import datasets

    frame = frame.rename(columns=str)
    try:
        with _quiet_datasets():
            return datasets.Dataset.from_pandas(frame, preserve_index=False)
    except Exception as err:  # pyarrow raises several types for mixed columns
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataFileError(
            f"{path}: a column mixes value types (e.g. numbers and strings): {first}"
        ) from err


def read_table(
    source: str | os.PathLike[str],
    *,
    format: str | None = None,
    split: str | None = None,
) -> datasets.Dataset:
    """Read a data file, a saved ``datasets`` folder or an image folder into a ``Dataset``.

    Args:
        source: A ``.csv``, ``.tsv``, ``.jsonl``/``.ndjson``, ``.json`` (records) or
            ``.parquet`` file (optionally compressed), a folder written by
            ``Dataset.save_to_disk``/``DatasetDict.save_to_disk``, or an image folder with
            one subfolder per label (columns ``image``: the file paths, ``label``: the
            subfolder names).
        format: One of :data:`FORMATS`; detected from the suffix or folder when ``None``.
        split: The split of a saved ``DatasetDict`` (needed when it has several).

    Returns:
        A ``datasets.Dataset`` with at least one row.

    Raises:
        DataFileNotFoundError: ``source`` does not exist.
        DataFileError: Unknown format, unreadable or empty file, unknown split.
    """
    require("datasets", "curvmerge.data.files.read_table")
    import datasets

    path = Path(source).expanduser()
    if not path.exists():
        raise DataFileNotFoundError(f"data file {path} does not exist")
    if format is None:
        fmt = _detect_format(path)
    else:
        fmt = str(format).lower().lstrip(".")
        fmt = {"ndjson": "jsonl", "pq": "parquet", "arrow": "disk", "tab": "tsv"}.get(fmt, fmt)
        if fmt not in FORMATS:
            raise DataFileError(f"unknown data format {format!r}; choose one of {FORMATS}")
    if split is not None and fmt != "disk":
        raise DataFileError(
            f"split={split!r} selects a split of a dataset saved with save_to_disk; {path} is "
            f"a {fmt} {'folder' if path.is_dir() else 'file'} (split it with split_table)"
        )
    if fmt == "disk":
        try:
            with _quiet_datasets():
                loaded = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError, OSError) as err:
            raise DataFileError(
                f"{path} is not a dataset saved with save_to_disk: {err}".splitlines()[0]
            ) from err
        if isinstance(loaded, datasets.DatasetDict):
            names = list(loaded)
            if split is None:
                if len(names) != 1:
                    raise DataFileError(
                        f"{path} has the splits {', '.join(names)}; pass split= one of them"
                    )
                split = names[0]
            if split not in loaded:
                raise DataFileError(
                    f"{path} has no split {split!r}; its splits are {', '.join(names)}"
                )
            table = loaded[split]
        else:
            if split is not None:
                raise DataFileError(f"{path} holds one dataset without splits; leave split= unset")
            table = loaded
    elif fmt == "imagefolder":
        if not path.is_dir():
            raise DataFileError(f"{path} is not a folder; an image folder is ROOT/<label>/<image>")
        files = _image_files(path)
        table = datasets.Dataset.from_dict(
            {"image": [f for f, _ in files], "label": [lab for _, lab in files]}
        )
    else:
        if path.is_dir():
            raise DataFileError(f"{path} is a folder, not a {fmt} file")
        table = _from_pandas(_read_pandas(path, fmt), path)
    if len(table) == 0:
        raise DataFileError(f"{path} is empty: it has no rows")
    return table


def split_table(
    table: datasets.Dataset,
    *,
    validation: float | int = 0.1,
    test: float | int = 0.1,
    seed: int = 0,
) -> dict[str, datasets.Dataset]:
    """Split a table into ``train``, ``validation`` and ``test`` by a seeded shuffle.

    Args:
        table: The rows.
        validation: Share of the rows (a float in ``[0, 1)``) or number of rows (an int).
        test: Share or number of rows, as ``validation``.
        seed: Seed of the shuffle (numpy's ``default_rng``); the same seed gives the same
            parts.

    Returns:
        ``{"train": ..., "validation": ..., "test": ...}``, disjoint, each in shuffled order
        (so the first rows of a part are a random subset of it). A part of size 0 is left
        out.

    Raises:
        DataFileError: The sizes leave no training rows or are invalid.
    """
    import numpy as np

    n = len(table)

    def size(value: float | int, name: str) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise DataFileError(f"{name} must be a share in [0, 1) or a row count, got {value!r}")
        if isinstance(value, float):
            if value >= 1:
                raise DataFileError(f"{name} share must be below 1, got {value}")
            return int(round(value * n))
        return int(value)

    n_val, n_test = size(validation, "validation"), size(test, "test")
    n_train = n - n_val - n_test
    if n_train < 1:
        raise DataFileError(
            f"the table has {n} rows: {n_val} validation and {n_test} test rows leave none to "
            "train on"
        )
    order = np.random.default_rng(seed).permutation(n)
    parts = {
        "train": order[n_val + n_test :],
        "validation": order[n_test : n_test + n_val],
        "test": order[:n_test],
    }
    return {k: table.select(idx.tolist()) for k, idx in parts.items() if len(idx)}


SPLIT_NAMES = {
    "train": ("train", "training"),
    "val": ("validation", "val", "valid", "dev"),
    "test": ("test", "testing"),
}
"""The names a saved ``DatasetDict``'s splits may have, for each part of an experiment."""


def saved_split_names(path: str | os.PathLike) -> list[str] | None:
    """The split names of a ``DatasetDict`` saved with ``save_to_disk``, else ``None``."""
    f = Path(path) / "dataset_dict.json"
    if not f.is_file():
        return None
    try:
        names = json.loads(f.read_text()).get("splits")
    except (OSError, ValueError, AttributeError):
        return None
    return [str(n) for n in names] if isinstance(names, list) else None


def read_split_tables(
    path: str | os.PathLike,
    *,
    split: str | None = None,
    validation: float | int = 0.1,
    test: float | int = 0.1,
    seed: int = 0,
    sizes: tuple[str, str] = ("validation", "test"),
) -> tuple[dict[str, datasets.Dataset], bool]:
    """``({"train", "val", "test"} tables, whether they were split here)``: the splits of a
    saved ``DatasetDict`` that has all three (when no ``split`` is asked for), else a seeded
    :func:`split_table` of the file (or of its ``split``).

    Args:
        sizes: How the caller names ``validation`` and ``test`` in its messages (an option
            of a command, a key of a config).

    Raises:
        DataFileError: The split leaves no validation or no test rows.
    """
    names = saved_split_names(path)
    if split is None and names:
        found = {k: next((c for c in cs if c in names), None) for k, cs in SPLIT_NAMES.items()}
        if all(found.values()):
            return {k: read_table(path, split=v) for k, v in found.items()}, False
        if len(names) > 1:
            split = found["train"]
    parts = split_table(read_table(path, split=split), validation=validation, test=test, seed=seed)
    for part, size in zip(("validation", "test"), sizes, strict=True):
        if part not in parts:
            raise DataFileError(
                f"{path}: no {part} rows ({size} is 0); coefficients are chosen on "
                "validation rows and reported on test rows"
            )
    return {"train": parts["train"], "val": parts["validation"], "test": parts["test"]}, True


# --------------------------------------------------------------------------- batches


@dataclass(frozen=True, eq=False)
class DataBatches(Sequence):
    """Model batches made from a table: a sequence of ``(inputs, targets)`` pairs.

    Pass it as ``data`` to curvmerge's computers, with :attr:`loss` as ``loss_fn``.

    Attributes:
        batches: The ``(inputs, targets)`` pairs; ``inputs`` is a dict of tensors passed to
            the model as keyword arguments.
        kind: The model kind the batches were made for.
        num_examples: Number of rows (examples).
        loss: The loss that fits the targets (cross-entropy, token-level with
            ``classes_last=True``; MSE for regression).
        label_names: Class names in index order (empty for causal LMs).
        source: Where the rows came from (for messages).
    """

    batches: tuple[tuple[dict[str, Tensor], Tensor], ...]
    kind: str
    num_examples: int
    loss: LossSpec
    label_names: tuple[str, ...] = ()
    source: str = ""

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index):  # type: ignore[override]
        return self.batches[index]

    def __iter__(self) -> Iterator[tuple[dict[str, Tensor], Tensor]]:
        return iter(self.batches)

    def targets(self) -> Tensor:
        """All per-example targets in order (``[N]``; ``[N, 1]`` for regression).

        Raises:
            ValueError: The targets are per token (token classification, causal LM).
        """
        if self.kind in ("token_classification", "causal_lm"):
            raise ValueError(f"{self.kind} targets are per token; read them batch by batch")
        return torch.cat([t for _, t in self.batches])


def _resolve(
    columns: Sequence[str], name: str | None, candidates: Sequence[str], what: str, source
):
    if name is not None:
        if name not in columns:
            raise DataFileError(
                f"{source}: no {what} column {name!r}; available columns: {', '.join(columns)}"
            )
        return name
    for cand in candidates:
        if cand in columns:
            return cand
    argument = _COLUMN_ARGUMENTS.get(what, "the column name")
    raise DataFileError(
        f"{source}: no {what} column found (tried {', '.join(candidates)}); pass {argument} "
        f"its name; available columns: {', '.join(columns)}"
    )


#: The keyword argument of :func:`encode_table` that names each column (in messages).
_COLUMN_ARGUMENTS = {
    "text": "text_column=",
    "second text": "text_pair_column=",
    "label": "label_column=",
    "image": "image_column=",
}


def _values(table: datasets.Dataset, column: str) -> list:
    """A column as plain Python values, read through Arrow (images stay undecoded
    ``{"bytes", "path"}`` dicts or paths)."""
    return table.with_format("arrow")[column].to_pylist()


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _label_id(
    value: Any, label2id: Mapping[str, int], num_labels: int, row: int, column: str, source
) -> int:
    import numpy as np

    if isinstance(value, np.generic):
        value = value.item()
    if _is_missing(value):
        raise DataFileError(f"{source}: data row {row + 1} has no label in column {column!r}")
    index: int | None = None
    if isinstance(value, bool):
        index = int(value)
    elif isinstance(value, int):
        index = value
    elif isinstance(value, float) and value.is_integer():
        index = int(value)
    elif isinstance(value, str):
        key = value.strip()
        if key in label2id:
            return int(label2id[key])
        if re.fullmatch(r"[+-]?\d+", key):
            index = int(key)
    if index is not None and 0 <= index < num_labels:
        return index
    names = ", ".join(repr(k) for k in sorted(label2id, key=lambda k: label2id[k]))
    raise DataFileError(
        f"{source}: label {value!r} (data row {row + 1}, column {column!r}) is not one of the "
        f"model's labels: {names} (or their indices 0..{num_labels - 1}); pass label2id= to "
        "map the file's labels"
    )


def _text(value: Any, row: int, column: str, source) -> str:
    if _is_missing(value):
        raise DataFileError(f"{source}: data row {row + 1} has no text in column {column!r}")
    return value if isinstance(value, str) else str(value)


def _batch_tokenizer(tokenizer: Any) -> Any:
    """The tokenizer, or a copy padding on the right with a padding token (any token does:
    padding is marked in ``attention_mask`` and never a target)."""
    if tokenizer.pad_token is not None and tokenizer.padding_side == "right":
        return tokenizer
    tok = copy.deepcopy(tokenizer)
    tok.padding_side = "right"
    if tok.pad_token is None:
        fallback = tok.eos_token or tok.unk_token or tok.sep_token or tok.cls_token
        if fallback is None:
            raise DataFileError("the tokenizer has no padding, end, unknown or separator token")
        tok.pad_token = fallback
    return tok


def _max_positions(hf: HFModel, tokenizer: Any) -> int | None:
    limits = []
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(hf.config, attr, None)
        if isinstance(value, int) and value > 0:
            limits.append(value)
            break
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 1_000_000:
        limits.append(value)
    return min(limits) if limits else None


def _forward_keys(model: Any) -> set[str] | None:
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def _chunks(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(start + size, n))


def encode_table(
    table: datasets.Dataset,
    model: HFModel,
    *,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
    image_column: str | None = None,
    label2id: Mapping[str, int] | None = None,
    max_length: int | None = None,
    padding: str = "longest",
    batch_size: int = 16,
    source: str | os.PathLike[str] = "",
) -> DataBatches:
    """Turn a table into ``(inputs, targets)`` batches for ``model``.

    Args:
        table: The rows (a ``datasets.Dataset``, e.g. from :func:`read_table`).
        model: An :class:`~curvmerge.hf.HFModel` (from :func:`curvmerge.hf.load_model`);
            its tokenizer or image processor encodes the rows, its kind chooses the targets,
            its ``label2id`` maps the labels.
        text_column: The text column (words for token classification); found by name
            when ``None``.
        text_pair_column: The second text of sentence pairs (sequence classification).
        label_column: The label column (classification); found by name when ``None``.
        image_column: The image column (image classification): PIL images, file paths
            (relative to ``source``'s folder) or ``{"bytes", "path"}`` dicts.
        label2id: Label name to class index, instead of the model config's.
        max_length: Tokens per example: longer texts are truncated. Default
            :data:`DEFAULT_MAX_LENGTH` capped at the model's positions; a larger value than
            the model's positions is refused.
        padding: ``"longest"`` (pad each batch to its longest example) or ``"max_length"``.
        batch_size: Examples per batch (the last batch may be smaller).
        source: Name of the data in messages; the folder of relative image paths.

    Returns:
        :class:`DataBatches`.

    Raises:
        DataFileError: A missing column, a missing value, a label outside the model's
            labels, no tokenizer or image processor.
    """
    source = str(source) or "data"
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise DataFileError(f"batch_size must be a positive integer, got {batch_size!r}")
    if padding not in ("longest", "max_length"):
        raise DataFileError(f"padding must be 'longest' or 'max_length', got {padding!r}")
    if len(table) == 0:
        raise DataFileError(f"{source} is empty: it has no rows")
    columns = list(table.column_names)
    kind = model.kind
    if label2id is not None:
        label2id = {str(k): int(v) for k, v in label2id.items()}
        names = dict(sorted((v, k) for k, v in label2id.items()))
        if sorted(names) != list(range(model.num_labels or 0)):
            raise DataFileError(
                f"label2id must map onto the model's {model.num_labels} classes 0..."
                f"{(model.num_labels or 1) - 1}, got {label2id}"
            )
    else:
        label2id = dict(model.label2id)
        names = dict(model.id2label)
    label_names = tuple(names[i] for i in sorted(names))
    if kind == "image_classification":
        return _encode_images(
            table, model, columns, image_column, label_column, label2id, batch_size, source
        )
    if model.tokenizer is None:
        raise DataFileError(
            f"{model.describe()} has no tokenizer; load the model with tokenizer= a folder or id"
        )
    tokenizer = _batch_tokenizer(model.tokenizer)
    limit = _max_positions(model, tokenizer)
    if max_length is None:
        max_length = min(DEFAULT_MAX_LENGTH, limit) if limit else DEFAULT_MAX_LENGTH
    elif not isinstance(max_length, int) or max_length < 2:
        raise DataFileError(f"max_length must be an integer of at least 2, got {max_length!r}")
    elif limit is not None and max_length > limit:
        raise DataFileError(f"max_length {max_length} exceeds the model's {limit} positions")
    keys = _forward_keys(model.model)
    regression = kind == "sequence_classification" and (
        getattr(model.config, "problem_type", None) == "regression" or model.num_labels == 1
    )
    if getattr(model.config, "problem_type", None) == "multi_label_classification":
        raise DataFileError("multi-label classification data are not supported")

    if kind == "sequence_classification" and text_column is None and text_pair_column is None:
        for first, second in _PAIR_COLUMNS:
            if first in columns and second in columns:
                text_column, text_pair_column = first, second
                break
    text_col = _resolve(columns, text_column, _TEXT_COLUMNS, "text", source)
    pair_col = None
    if text_pair_column is not None:
        if kind != "sequence_classification":
            raise DataFileError(f"sentence pairs are for sequence classification, not {kind}")
        pair_col = _resolve(columns, text_pair_column, (), "second text", source)
    label_col = None
    if kind != "causal_lm":
        label_col = _resolve(columns, label_column, _LABEL_COLUMNS, "label", source)
    elif label_column is not None:
        raise DataFileError("a causal LM predicts its own next tokens: leave label_column unset")

    n = len(table)
    texts = _values(table, text_col)
    pairs = _values(table, pair_col) if pair_col else None
    labels = _values(table, label_col) if label_col else None
    pair_options = {}
    if (keys is None or "token_type_ids" in keys) and (
        getattr(model.config, "type_vocab_size", 0) or 0
    ) > 1:
        pair_options["return_token_type_ids"] = True  # segment ids mark the second text
    common = {
        "max_length": max_length,
        "truncation": True,
        "padding": padding,
        "return_tensors": "pt",
    }
    batches = []
    for rows in _chunks(n, batch_size):
        if kind == "token_classification":
            inputs, targets = _encode_words(
                tokenizer,
                texts,
                labels,
                rows,
                text_col,
                label_col,
                label2id,
                names,
                common,
                source,
            )
        else:
            first = [_text(texts[i], i, text_col, source) for i in rows]
            if pairs is not None:
                second = [_text(pairs[i], i, pair_col, source) for i in rows]
                encoded = tokenizer(first, second, **common, **pair_options)
            else:
                encoded = tokenizer(first, **common)
            inputs = {k: v.long() for k, v in encoded.items() if keys is None or k in keys}
            mask = inputs.get("attention_mask")
            if mask is None:
                mask = torch.ones_like(inputs["input_ids"])
                inputs["attention_mask"] = mask
            empty = (mask.sum(dim=1) == 0).nonzero()
            if len(empty):
                row = rows[int(empty[0])]
                raise DataFileError(f"{source}: data row {row + 1} has an empty text")
            if kind == "causal_lm":
                targets = causal_lm_targets(inputs["input_ids"], mask)
                targets[mask == 0] = -100  # left padding too: no target at a padded position
            elif regression:
                values = []
                for i in rows:
                    v = labels[i]
                    if _is_missing(v):
                        raise DataFileError(f"{source}: data row {i + 1} has no label")
                    try:
                        values.append(float(v))
                    except (TypeError, ValueError) as err:
                        raise DataFileError(
                            f"{source}: label {v!r} (data row {i + 1}) is not a number, as a "
                            "regression model needs"
                        ) from err
                targets = torch.tensor(values, dtype=torch.float32).unsqueeze(1)
            else:
                targets = torch.tensor(
                    [
                        _label_id(labels[i], label2id, len(names), i, label_col, source)
                        for i in rows
                    ],
                    dtype=torch.long,
                )
        batches.append((inputs, targets))
    if regression:
        loss = LossSpec("mse")
    elif kind in ("token_classification", "causal_lm"):
        loss = LossSpec("cross_entropy", classes_last=True)
    else:
        loss = LossSpec("cross_entropy")
    return DataBatches(
        tuple(batches),
        kind=kind,
        num_examples=n,
        loss=loss,
        label_names=() if kind == "causal_lm" or regression else label_names,
        source=source,
    )


def _encode_words(
    tokenizer, texts, labels, rows, text_col, label_col, label2id, names, common, source
):
    words, tags = [], []
    for i in rows:
        value = texts[i]
        if isinstance(value, str):
            value = value.split()
        if _is_missing(value) or not isinstance(value, (list, tuple)) or not value:
            raise DataFileError(f"{source}: data row {i + 1} has no words in column {text_col!r}")
        row_tags = labels[i]
        if isinstance(row_tags, str):
            row_tags = row_tags.split()
        if not isinstance(row_tags, (list, tuple)) or len(row_tags) != len(value):
            count = len(row_tags) if isinstance(row_tags, (list, tuple)) else "no"
            raise DataFileError(
                f"{source}: data row {i + 1} has {len(value)} words but {count} labels in "
                f"column {label_col!r}"
            )
        words.append([str(w) for w in value])
        tags.append([_label_id(t, label2id, len(names), i, label_col, source) for t in row_tags])
    if not getattr(tokenizer, "is_fast", False):
        raise DataFileError("token classification needs a fast tokenizer (for word_ids)")
    encoded = tokenizer(words, is_split_into_words=True, **common)
    targets = torch.full_like(encoded["input_ids"], -100, dtype=torch.long)
    for b in range(len(words)):
        previous = None
        for t, word in enumerate(encoded.word_ids(b)):
            if word is not None and word != previous:
                targets[b, t] = tags[b][word]
            previous = word
    inputs = {k: v.long() for k, v in encoded.items()}
    return inputs, targets


def _open_image(value: Any, row: int, column: str, root: Path, channels: int | None, source):
    require("PIL", "reading images from data files")
    from PIL import Image

    if _is_missing(value):
        raise DataFileError(f"{source}: data row {row + 1} has no image in column {column!r}")
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, Mapping) and value.get("bytes") is not None:
            import io

            image = Image.open(io.BytesIO(value["bytes"]))
        else:
            path = value.get("path") if isinstance(value, Mapping) else value
            path = Path(os.fspath(path)).expanduser()
            if not path.is_absolute():
                path = root / path
            if not path.is_file():
                raise DataFileError(f"{source}: image {path} (data row {row + 1}) does not exist")
            image = Image.open(path)
        image.load()
    except DataFileError:
        raise
    except (OSError, ValueError, TypeError) as err:
        raise DataFileError(
            f"{source}: data row {row + 1} of column {column!r} is not a readable image: {err}"
        ) from err
    if channels == 3 and image.mode != "RGB":
        image = image.convert("RGB")
    elif channels == 1 and image.mode != "L":
        image = image.convert("L")
    return image


def _encode_images(table, model, columns, image_column, label_column, label2id, batch_size, source):
    processor = model.image_processor
    if processor is None:
        raise DataFileError(
            f"{model.describe()} has no image processor (preprocessor_config.json); save one "
            "with the model"
        )
    image_col = _resolve(columns, image_column, _IMAGE_COLUMNS, "image", source)
    label_col = _resolve(columns, label_column, _LABEL_COLUMNS, "label", source)
    path = Path(source)
    root = path if path.is_dir() else path.parent
    channels = getattr(model.config, "num_channels", None)
    num_labels = model.num_labels or 0
    n = len(table)
    labels = _values(table, label_col)
    values = _values(table, image_col)
    batches = []
    for rows in _chunks(n, batch_size):
        images = [_open_image(values[i], i, image_col, root, channels, source) for i in rows]
        try:
            pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        except (ValueError, TypeError) as err:
            raise DataFileError(f"{source}: the image processor failed: {err}") from err
        targets = torch.tensor(
            [_label_id(labels[i], label2id, num_labels, i, label_col, source) for i in rows],
            dtype=torch.long,
        )
        batches.append(({"pixel_values": pixels.float()}, targets))
    names = {v: k for k, v in label2id.items()}
    return DataBatches(
        tuple(batches),
        kind="image_classification",
        num_examples=n,
        loss=LossSpec("cross_entropy"),
        label_names=tuple(names.get(i, str(i)) for i in range(num_labels)),
        source=source,
    )


def load_data(
    source: str | os.PathLike[str],
    model: HFModel,
    *,
    format: str | None = None,
    split: str | None = None,
    limit: int | None = None,
    **options: Any,
) -> DataBatches:
    """Read ``source`` and encode it for ``model``: :func:`read_table` then
    :func:`encode_table`.

    Args:
        source: A data file or folder (see :func:`read_table`).
        model: An :class:`~curvmerge.hf.HFModel`.
        format: See :func:`read_table`.
        split: See :func:`read_table`.
        limit: Use only the first ``limit`` rows.
        **options: Passed to :func:`encode_table` (columns, ``label2id``, ``max_length``,
            ``padding``, ``batch_size``).

    Returns:
        :class:`DataBatches`.
    """
    table = read_table(source, format=format, split=split)
    if limit is not None:
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise DataFileError(f"limit must be a positive integer, got {limit!r}")
        table = table.select(range(min(limit, len(table))))
    options.setdefault("source", os.fspath(source))
    return encode_table(table, model, **options)


def load_splits(
    source: str | os.PathLike[str],
    model: HFModel,
    *,
    validation: float | int = 0.1,
    test: float | int = 0.1,
    seed: int = 0,
    format: str | None = None,
    split: str | None = None,
    **options: Any,
) -> dict[str, DataBatches]:
    """Read ``source``, split it by seed (:func:`split_table`) and encode each part.

    Returns:
        ``{"train": ..., "validation": ..., "test": ...}`` :class:`DataBatches` (parts of
        size 0 left out).
    """
    table = read_table(source, format=format, split=split)
    parts = split_table(table, validation=validation, test=test, seed=seed)
    options.setdefault("source", os.fspath(source))
    return {name: encode_table(part, model, **options) for name, part in parts.items()}
