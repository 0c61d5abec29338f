"""Where an experiment's models and tasks come from: named, replaceable sources.

A model entry of a configuration is loaded by one of :data:`MODEL_SOURCES`:

- ``"checkpoint"``: a ``.safetensors`` file written by ``curvmerge finetune`` (its header
  describes the architecture and records the task);
- ``"builtin"``: ``{kind: cnn|mlp|minilm, ...}`` (:func:`build_model`), optionally filled
  from a ``checkpoint`` state dict;
- ``"hf"``: a Hugging Face folder or hub id, through ``curvmerge.hf.load_model``.

A task entry is loaded by one of :data:`TASK_SOURCES`: ``"bundled"`` (the offline tasks of
:mod:`curvmerge.data`, text encoded with the model's tokenizer) or ``"files"`` (the hook for
``curvmerge.data.files``). :func:`register_model_source` and :func:`register_task_source`
add or replace a source.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from curvmerge.experiment.pools import TaskData

__all__ = [
    "LoadedModel",
    "MODEL_SOURCES",
    "TASK_SOURCES",
    "build_model",
    "bundled_task",
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


def _files_source(name: str, entry: dict[str, Any], model: LoadedModel) -> TaskData:
    """Data files (CSV, JSON Lines, Parquet, ``datasets`` folders): the hook for
    ``curvmerge.data.files``; replace it with :func:`register_task_source`."""
    raise ValueError(
        f"{entry.get('_where', f'tasks.{name}')}: task source 'files' is not connected yet "
        "(curvmerge.data.files plugs in with register_task_source('files', loader))"
    )


#: Task sources by name: ``loader(name, entry, model) -> TaskData`` (``model`` is the task's
#: :class:`LoadedModel`: its tokenizer encodes text, its recorded task is the default data).
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
