"""Where an experiment's models and tasks come from: named, replaceable sources.

A model entry of a configuration is loaded by one of :data:`MODEL_SOURCES`:

- ``"checkpoint"``: a ``.safetensors`` file written by ``curvmerge finetune`` (its header
  describes the architecture and records the task);
- ``"builtin"``: ``{kind: cnn|mlp|minilm, ...}`` (:func:`build_model`), optionally filled
  from a ``checkpoint`` state dict;
- ``"hf"``: a Hugging Face folder or hub id, through ``curvmerge.hf.load_model``.

A task entry is loaded by one of :data:`TASK_SOURCES`: ``"bundled"`` (the offline tasks of
:mod:`curvmerge.data`, text encoded with the model's tokenizer) or ``"files"`` (data files
for Hugging Face models, :func:`files_task`). :func:`register_model_source` and
:func:`register_task_source` add or replace a source.

A data-file task (paths relative to the configuration's folder)::

    tasks:
      sentiment:
        files: data/sentiment.csv         # split by split_seed into train/validation/test
        split_seed: 0
        max_length: 64
        options: {text_column: review, label_column: stars, validation: 0.1, test: 0.1}
      weather:                            # or one file per split
        files: {train: w/train.csv, validation: w/dev.csv, test: w/test.csv}

Its splits are :class:`~curvmerge.data.files.DataBatches` made with the model's own
tokenizer or image processor: training rows in batches of ``fisher.batch_size``, validation
and test rows in batches of ``evaluation.batch_size``, each padded to its longest example;
the task's loss is the data's :attr:`~curvmerge.data.files.DataBatches.loss` (token-level
cross-entropy with ``classes_last=True`` for token classification and causal LMs).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from curvmerge.experiment.pools import TaskData

__all__ = [
    "FILES_OPTIONS",
    "FILE_SPLITS",
    "LoadedModel",
    "MODEL_SOURCES",
    "TASK_SOURCES",
    "build_model",
    "bundled_task",
    "files_task",
    "load_base_entry",
    "load_model_entry",
    "register_model_source",
    "register_task_source",
]


@dataclass
class LoadedModel:
    """What a model source returns.

    Attributes:
        module: The ``torch.nn.Module``.
        tokenizer: Its tokenizer (text tasks are encoded with it), if any.
        task: The bundled task recorded with the model (a ``curvmerge finetune``
            checkpoint's header), if any: the default of the task's ``data``.
        params: A regex of the shared body, when the source knows it (Hugging Face heads).
        handle: What the source returned, when more than the module (``HFModel``).
        info: A description for the JSON record.
    """

    module: nn.Module
    tokenizer: Any = None
    task: str | None = None
    params: str | None = None
    handle: Any = None
    info: dict[str, Any] = field(default_factory=dict)


ModelSource = Callable[[dict[str, Any]], LoadedModel]
TaskSource = Callable[[str, dict[str, Any], LoadedModel], TaskData]

_BUILTIN = {
    "cnn": ({"num_classes", "image_size"}, {"in_channels", "channels", "hidden", "seed"}),
    "mlp": ({"num_classes", "in_features"}, {"hidden", "seed"}),
    "minilm": ({"num_classes"}, {"seed"}),
}


def build_model(spec: Mapping[str, Any], where: str = "model") -> tuple[nn.Module, Any]:
    """A built-in model (``kind`` cnn, mlp or minilm) and its tokenizer (MiniLM only)."""
    from curvmerge import models

    kind = spec.get("kind")
    if kind not in _BUILTIN:
        raise ValueError(f"{where}.kind: must be one of {', '.join(_BUILTIN)}, got {kind!r}")
    required, optional = _BUILTIN[kind]
    given = {
        k
        for k in spec
        if k not in ("kind", "source", "path", "checkpoint", "options") and not k.startswith("_")
    }
    missing = sorted(required - given)
    if missing:
        raise ValueError(f"{where}: a {kind} model needs {missing[0]!r}")
    unknown = sorted(given - required - optional)
    if unknown:
        raise ValueError(f"{where}: a {kind} model has no setting {unknown[0]!r}")
    seed = int(spec.get("seed", 0))
    if kind == "cnn":
        kwargs = {k: spec[k] for k in ("in_channels", "hidden") if k in spec}
        if "channels" in spec:
            kwargs["channels"] = tuple(spec["channels"])
        return models.make_cnn(
            spec["num_classes"], image_size=spec["image_size"], seed=seed, **kwargs
        ), None
    if kind == "mlp":
        hidden = spec.get("hidden", (64,))
        hidden = (hidden,) if isinstance(hidden, int) else tuple(hidden)
        return models.make_mlp(
            spec["in_features"], spec["num_classes"], hidden=hidden, seed=seed
        ), None
    return models.load_minilm(spec["num_classes"], seed=seed), models.load_minilm_tokenizer()


def _builtin_source(entry: dict[str, Any]) -> LoadedModel:
    from curvmerge.io import load_checkpoint

    module, tokenizer = build_model(entry, entry.get("_where", "model"))
    if entry.get("checkpoint"):
        load_checkpoint(module, entry["checkpoint"])
    info = {k: v for k, v in entry.items() if not k.startswith("_")}
    return LoadedModel(module.eval(), tokenizer=tokenizer, info=info)


def _checkpoint_source(entry: dict[str, Any]) -> LoadedModel:
    from curvmerge.io import load_checkpoint, read_metadata

    path = entry["path"]
    where = entry.get("_where", "model")
    meta = read_metadata(path)
    spec = meta.get("model")
    if not isinstance(spec, Mapping) or "kind" not in spec:
        raise ValueError(
            f"{where}: {path} does not describe its model (not written by 'curvmerge "
            "finetune'); give {kind: ..., checkpoint: path} instead"
        )
    module, tokenizer = build_model(spec, where)
    load_checkpoint(module, path)
    task = meta.get("task")
    return LoadedModel(
        module.eval(),
        tokenizer=tokenizer,
        task=task if isinstance(task, str) else None,
        info={"source": "checkpoint", "path": path, "model": spec},
    )


def _hf_source(entry: dict[str, Any]) -> LoadedModel:
    """Hugging Face folders and hub ids, through ``curvmerge.hf.load_model``."""
    try:
        from curvmerge.hf import load_model
    except ImportError as err:
        raise ImportError(f"Hugging Face models need curvmerge.hf: {err}") from err
    hf = load_model(entry["path"], **dict(entry.get("options") or {}))
    return LoadedModel(
        hf.model,
        tokenizer=getattr(hf, "tokenizer", None),
        params=getattr(hf, "body_regex", None),
        handle=hf,
        info={"source": "hf", "path": entry["path"], "kind": getattr(hf, "kind", None)},
    )


#: Model sources by name: ``loader(entry) -> LoadedModel`` (``entry`` is the validated
#: mapping, paths resolved; ``entry["_where"]`` names it in messages).
MODEL_SOURCES: dict[str, ModelSource] = {
    "checkpoint": _checkpoint_source,
    "builtin": _builtin_source,
    "hf": _hf_source,
}


def register_model_source(name: str, loader: ModelSource) -> None:
    """Make ``loader`` the model source ``name`` (replacing any)."""
    if not callable(loader):
        raise TypeError("loader must be callable")
    MODEL_SOURCES[str(name)] = loader


def bundled_task(spec: str, *, seed: int = 0):
    """A bundled task (:mod:`curvmerge.data`) by name: ``digits``, ``mnist``, a digit subset
    ``digits:0,1,2``, ``rotten_tomatoes`` or a tweet domain (``airline``, ...)."""
    from curvmerge.data import TWEET_DOMAINS, digit_subset_tasks, text_tasks, vision_task

    name, _, subset = spec.partition(":")
    if name in ("digits", "mnist"):
        if not subset:
            return vision_task(name, seed=seed)
        try:
            digits = [int(d) for d in subset.split(",") if d.strip()]
        except ValueError:
            raise ValueError(f"task {spec!r}: digits must be integers like {name}:0,1,2") from None
        return digit_subset_tasks(name, [digits], seed=seed)[0]
    if name == "rotten_tomatoes" or name in TWEET_DOMAINS:
        if subset:
            raise ValueError(f"task {spec!r}: text tasks take no ':' suffix")
        return text_tasks([name], seed=seed)[0]
    valid = ", ".join(["digits", "mnist", "rotten_tomatoes", *TWEET_DOMAINS])
    raise ValueError(f"unknown bundled task {spec!r}; use one of {valid}, or digits:0,1,2")


def _bundled_source(name: str, entry: dict[str, Any], model: LoadedModel) -> TaskData:
    from curvmerge.data import MAX_LENGTH, TextSplit, tokenize

    where = entry.get("_where", f"tasks.{name}")
    spec = entry.get("data") or model.task
    if not spec:
        raise ValueError(f"{where}: give 'data' (the model records no task)")
    try:
        task = bundled_task(spec, seed=entry.get("split_seed", 0))
    except ValueError as err:
        raise ValueError(f"{where}.data: {err}") from None
    splits = [task.train, task.val, task.test]
    if isinstance(task.train, TextSplit):
        if model.tokenizer is None:
            raise ValueError(f"{where}: text task {spec!r} needs a model with a tokenizer")
        length = entry.get("max_length", MAX_LENGTH)
        splits = [tokenize(s, model.tokenizer, max_length=length) for s in splits]
    loss = entry.get("loss", "cross_entropy")
    train, val, test = splits
    return TaskData(name, train=train, val=val, test=test, loss=loss, metric=entry.get("metric"))


#: The ``options`` of a ``files`` task: the columns and labels of
#: :func:`curvmerge.data.files.encode_table`, the ``split`` of a saved ``DatasetDict``, and the
#: ``validation`` and ``test`` parts of a single file (shares or row counts, default 0.1).
FILES_OPTIONS = (
    "text_column",
    "text_pair_column",
    "label_column",
    "image_column",
    "label2id",
    "split",
    "validation",
    "test",
)
_ENCODE_OPTIONS = ("text_column", "text_pair_column", "label_column", "image_column", "label2id")

#: The split names of a ``files`` mapping, and the :class:`TaskData` split each one fills.
FILE_SPLITS = {"train": "train", "validation": "val", "val": "val", "test": "test"}


def _local(path: Any, base_dir: str | os.PathLike | None, where: str) -> str:
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path).strip():
        raise ValueError(f"{where}: expected a path, got {path!r}")
    p = Path(os.fspath(path)).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = Path(base_dir) / p
    return str(p)


def files_task(
    name: str,
    model: Any,
    files: str | os.PathLike | Mapping[str, str | os.PathLike],
    *,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
    image_column: str | None = None,
    label2id: Mapping[str, int] | None = None,
    split: str | None = None,
    validation: float | int = 0.1,
    test: float | int = 0.1,
    split_seed: int = 0,
    max_length: int | None = None,
    batch_size: int = 64,
    eval_batch_size: int = 256,
    loss: str | None = None,
    metric: str | None = None,
    where: str | None = None,
) -> TaskData:
    """A task from data files for a Hugging Face model (:mod:`curvmerge.data.files`).

    Args:
        name: The task's name.
        model: A :class:`curvmerge.hf.HFModel`: its tokenizer or image processor encodes the
            rows, its kind chooses the targets and the loss.
        files: One data file or saved ``datasets`` folder, split by ``split_seed`` into
            train, validation and test parts (a saved ``DatasetDict`` with those three
            splits is used as it is), or ``{"train": ..., "validation": ..., "test": ...}``.
        text_column, text_pair_column, label_column, image_column, label2id: See
            :func:`curvmerge.data.files.encode_table`.
        split: The split of a saved ``DatasetDict`` to split in three (single ``files``).
        validation: Validation part of a single file: a share in ``[0, 1)`` or a row count.
        test: Test part, as ``validation``.
        split_seed: Seed of the split; the training rows are in a seeded random order too
            (the statistics take the first ones).
        max_length: Tokens per example (see :func:`~curvmerge.data.files.encode_table`).
        batch_size: Training rows per batch (the statistics batches).
        eval_batch_size: Validation and test rows per batch.
        loss: The loss name, if given: it must be the one the data's targets fit.
        metric: The metric that chooses coefficients (see :class:`TaskData`).
        where: Prefix of error messages, e.g. ``tasks.<name>`` (``None``: messages name the
            data files only).

    Returns:
        A :class:`TaskData` whose splits are :class:`~curvmerge.data.files.DataBatches` and
        whose loss is theirs (``classes_last=True`` for token-level targets).

    Raises:
        ValueError: A missing file or column, an empty file, a label outside the model's
            labels, no validation or test rows.
    """
    from curvmerge.data.files import encode_table, read_split_tables, read_table

    def named(message: str, key: str = "") -> str:
        if where is None:
            return f"{key}: {message}" if key else message
        return message if message.startswith(where) else f"{where}{key and '.' + key}: {message}"

    try:
        if isinstance(files, Mapping):
            unknown = sorted(set(files) - set(FILE_SPLITS), key=str)
            if unknown:
                raise ValueError(
                    named(f"unknown split {unknown[0]!r} (train, validation, test)", "files")
                )
            paths = {FILE_SPLITS[k]: os.fspath(v) for k, v in files.items()}
            missing = [k for k in ("train", "val", "test") if k not in paths]
            if missing:
                raise ValueError(
                    named(f"needs train, validation and test ({missing[0]} is missing)", "files")
                )
            parts = {k: read_table(p) for k, p in paths.items()}
            source, shuffled = paths["train"], False
        else:
            source = os.fspath(files)
            parts, shuffled = read_split_tables(
                source, split=split, validation=validation, test=test, seed=split_seed
            )
        if not shuffled:
            parts["train"] = parts["train"].shuffle(seed=split_seed)
        columns = {
            "text_column": text_column,
            "text_pair_column": text_pair_column,
            "label_column": label_column,
            "image_column": image_column,
            "label2id": label2id,
            "max_length": max_length,
        }
        data = {
            k: encode_table(
                table,
                model,
                batch_size=batch_size if k == "train" else eval_batch_size,
                source=paths[k] if isinstance(files, Mapping) else source,
                **columns,
            )
            for k, table in parts.items()
        }
    except ValueError as err:
        raise ValueError(named(str(err))) from err
    spec = data["train"].loss
    if loss is not None and loss != spec.name:
        raise ValueError(
            named(f"the targets of a {model.kind} model's data fit {spec.name}, not {loss}", "loss")
        )
    return TaskData(
        name, train=data["train"], val=data["val"], test=data["test"], loss=spec, metric=metric
    )


def _files_source(name: str, entry: dict[str, Any], model: LoadedModel) -> TaskData:
    """Data files (CSV, TSV, JSON Lines, Parquet, ``datasets`` folders) for a Hugging Face
    model: :func:`files_task` with the entry's ``files`` (or ``data``) and ``options``."""
    from curvmerge.hf import HFModel

    where = entry.get("_where", f"tasks.{name}")
    if not isinstance(model.handle, HFModel):
        raise ValueError(
            f"{where}: data files are encoded with a Hugging Face model's tokenizer or image "
            f"processor; the model of task {name!r} is not a Hugging Face model"
        )
    opts = dict(entry.get("options") or {})
    unknown = sorted(set(opts) - set(FILES_OPTIONS))
    if unknown:
        raise ValueError(
            f"{where}.options: unknown key {unknown[0]!r} (valid: {', '.join(FILES_OPTIONS)})"
        )
    files = entry.get("files", entry.get("data"))
    if files is None:
        raise ValueError(f"{where}: give 'files' (a data file, or one per split)")
    base = entry.get("_base_dir")
    if isinstance(files, Mapping):
        files = {k: _local(v, base, f"{where}.files.{k}") for k, v in files.items()}
    else:
        files = _local(files, base, f"{where}.files")
    return files_task(
        name,
        model.handle,
        files,
        **{k: opts[k] for k in _ENCODE_OPTIONS if k in opts},
        split=opts.get("split"),
        validation=opts.get("validation", 0.1),
        test=opts.get("test", 0.1),
        split_seed=int(entry.get("split_seed", 0)),
        max_length=entry.get("max_length"),
        batch_size=int(entry.get("_batch_size", 64)),
        eval_batch_size=int(entry.get("_eval_batch_size", 256)),
        loss=entry.get("loss"),
        metric=entry.get("metric"),
        where=where,
    )


#: Task sources by name: ``loader(name, entry, model) -> TaskData``. ``model`` is the task's
#: :class:`LoadedModel` (its tokenizer encodes text, its recorded task is the default data);
#: ``entry`` is the validated mapping (the paths of ``files`` resolved) with ``_where`` (its
#: name in messages), ``_base_dir`` (the configuration's folder, or ``None``: paths of a
#: source's own keys are relative to it), ``_batch_size`` (``fisher.batch_size``) and
#: ``_eval_batch_size`` (``evaluation.batch_size``).
TASK_SOURCES: dict[str, TaskSource] = {
    "bundled": _bundled_source,
    "files": _files_source,
}


def register_task_source(name: str, loader: TaskSource) -> None:
    """Make ``loader`` the task source ``name`` (replacing any)."""
    if not callable(loader):
        raise TypeError("loader must be callable")
    TASK_SOURCES[str(name)] = loader


def load_model_entry(entry: dict[str, Any], where: str) -> LoadedModel:
    """Load a validated model entry with its source; ``where`` names it in messages."""
    loaded = MODEL_SOURCES[entry["source"]]({**entry, "_where": where})
    if not isinstance(loaded, LoadedModel):
        raise TypeError(f"{where}: the model source {entry['source']!r} returned no LoadedModel")
    return loaded


def load_base_entry(
    entry: dict[str, Any], where: str, like: LoadedModel, params: str | None = None
) -> LoadedModel:
    """Load the validated base model entry. A Hugging Face base of Hugging Face task models
    provides body parameters only: it is loaded by :func:`curvmerge.hf.load_base` like
    ``like`` (no task kind needed: a headless ``BertModel`` folder serves), as ``curvmerge
    merge --base`` loads it, and must have every parameter ``params`` (a regex) selects
    (default: the body). Other bases load through their source, like any model."""
    from curvmerge.hf import HFModel

    if entry["source"] != "hf" or not isinstance(like.handle, HFModel):
        return load_model_entry(entry, where)
    from curvmerge.hf import load_base

    try:
        hf = load_base(
            entry["path"], like.handle, params=params, **dict(entry.get("options") or {})
        )
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    return LoadedModel(
        hf.model,
        tokenizer=hf.tokenizer,
        params=hf.body_regex,
        handle=hf,
        info={"source": "hf", "path": entry["path"], "kind": hf.kind},
    )
