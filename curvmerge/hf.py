"""Hugging Face models in and out: load folders and hub ids, check them, write merged folders.

:func:`load_model` loads a Hugging Face model folder (``config.json`` with safetensors
weights, or ``pytorch_model.bin`` when that is all there is) or a hub id through
``transformers`` ``from_pretrained`` (hub ids honour ``HF_HUB_OFFLINE``), always with
``attn_implementation="eager"`` (forward-mode autodiff, which GGN products need, has no rule
for fused attention kernels). It returns an :class:`HFModel`: the model in eval mode, its
tokenizer or image processor when the folder has one, the task kind, and which parameters
are the task *head* and which the shared *body*.

Body and head. A ``transformers`` task model wraps a base model (``model.base_model_prefix``:
``bert``, ``transformer``, ``vit``, ...) and adds task layers. The body is every parameter
under the base model; the head is everything else: ``classifier.*`` (BERT, ViT, ResNet),
``pre_classifier.*`` and ``classifier.*`` (DistilBERT), ``score.*`` (GPT-2 and Llama
sequence classifiers), ``lm_head.*`` (causal LMs with untied output embeddings). Merge the
body (:attr:`HFModel.body_regex` selects it, e.g. as ``params=`` of a computer) and keep
each task's head.

Causal language models with tied embeddings (GPT-2's default, ``tie_word_embeddings=True``)
have no head of their own: the output projection ``lm_head.weight`` *is* the input
embedding, so it is merged with the body, appears in ``named_parameters`` only under the
embedding's name (``transformer.wte.weight``), and :func:`save_merged` writes the merged
embedding under both names. With untied embeddings ``lm_head.*`` is a head like any other
and each task keeps its own unless it is merged too (pass it in ``merged_params``).

:func:`save_merged` writes the merged body with each task's own head as one Hugging Face
folder per task (or one folder when the heads are identical), atomically.

Example:
    >>> import tempfile
    >>> from curvmerge.models import tiny_bert
    >>> folder = tempfile.mkdtemp() + "/bert"
    >>> tiny_bert(3).save_pretrained(folder)
    >>> loaded = load_model(folder)
    >>> loaded.kind, loaded.head_names, loaded.body_regex
    ('sequence_classification', ('classifier.weight', 'classifier.bias'), '^bert\\\\.')
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from curvmerge._optional import require
from curvmerge.io import atomic_folder
from curvmerge.models import body_regex as _named_head_body_regex
from curvmerge.models import quiet_transformers

__all__ = [
    "KINDS",
    "ArchitectureMismatchError",
    "HFModel",
    "ModelLoadError",
    "RandomInitWarning",
    "TokenizerMismatchError",
    "check_same_architecture",
    "check_tokenizer",
    "detect_kind",
    "load_base",
    "load_model",
    "save_merged",
    "wrap_model",
]

KINDS = (
    "sequence_classification",
    "token_classification",
    "causal_lm",
    "image_classification",
)
"""The task kinds :func:`load_model` knows, with their ``transformers`` auto classes."""

_AUTO_CLASSES = {
    "sequence_classification": "AutoModelForSequenceClassification",
    "token_classification": "AutoModelForTokenClassification",
    "causal_lm": "AutoModelForCausalLM",
    "image_classification": "AutoModelForImageClassification",
}

# suffixes of config.architectures entries, in the order they are tried
_ARCH_SUFFIXES = (
    ("ForSequenceClassification", "sequence_classification"),
    ("ForTokenClassification", "token_classification"),
    ("ForCausalLM", "causal_lm"),
    ("LMHeadModel", "causal_lm"),
    ("ForImageClassification", "image_classification"),
)

_KIND_ALIASES = {
    "sequence_classification": "sequence_classification",
    "seq_cls": "sequence_classification",
    "text_classification": "sequence_classification",
    "classification": "sequence_classification",
    "token_classification": "token_classification",
    "tok_cls": "token_classification",
    "ner": "token_classification",
    "causal_lm": "causal_lm",
    "clm": "causal_lm",
    "lm": "causal_lm",
    "text_generation": "causal_lm",
    "image_classification": "image_classification",
    "img_cls": "image_classification",
}

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
_IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "image_processor_config.json")


class RandomInitWarning(UserWarning):
    """A loaded model has parameters that were not in its checkpoint (initialised at
    random): usually a task head missing from the folder."""


class ModelLoadError(ValueError):
    """A model folder or id cannot be loaded (missing, not a model, unknown kind)."""


class ArchitectureMismatchError(ValueError):
    """Models to be merged differ in architecture (a config field or a body parameter)."""


class TokenizerMismatchError(ValueError):
    """A tokenizer produces token ids that the model's input embedding does not have."""


# --------------------------------------------------------------------------- the loaded model


@dataclass
class HFModel:
    """A loaded Hugging Face model with what merging and data loading need to know.

    Attributes:
        model: The ``transformers`` model, in eval mode, with eager attention.
        kind: One of :data:`KINDS`.
        config: The model's ``PretrainedConfig``.
        source: The folder or hub id it was loaded from (``""`` for an in-memory model).
        tokenizer: The tokenizer saved with the model, or ``None``.
        image_processor: The image processor saved with the model, or ``None``.
        head_names: The task head's parameter names, in ``named_parameters`` order (empty
            for a causal LM with tied embeddings; see the module docstring).
        body_regex: A regular expression (for :func:`re.search`) that selects the body's
            parameters, e.g. ``^bert\\.``.
        label2id: Label name to class index (empty for causal LMs).
        id2label: Class index to label name (empty for causal LMs).
        tied: Aliases of shared parameters: a name that ``named_parameters`` leaves out
            mapped to the name it lists (``{"lm_head.weight": "transformer.wte.weight"}``).
        newly_initialized: Parameters that ``from_pretrained`` did not find in the
            checkpoint (or found with another shape) and initialised at random, e.g. a new
            classification head on a base model or for another ``num_labels``.
    """

    model: nn.Module
    kind: str
    config: Any
    source: str = ""
    tokenizer: Any | None = None
    image_processor: Any | None = None
    head_names: tuple[str, ...] = ()
    body_regex: str = "^"
    label2id: dict[str, int] = field(default_factory=dict)
    id2label: dict[int, str] = field(default_factory=dict)
    tied: dict[str, str] = field(default_factory=dict)
    newly_initialized: tuple[str, ...] = ()

    @property
    def num_labels(self) -> int | None:
        """Number of classes of a classifier; ``None`` for a causal LM."""
        return None if self.kind == "causal_lm" else len(self.id2label)

    @property
    def body_names(self) -> list[str]:
        """The body's parameter names, in ``named_parameters`` order."""
        pattern = re.compile(self.body_regex)
        return [n for n, _ in self.model.named_parameters() if pattern.search(n)]

    def body_params(self) -> dict[str, Tensor]:
        """The body's parameters (detached, not copied)."""
        pattern = re.compile(self.body_regex)
        return {n: p.detach() for n, p in self.model.named_parameters() if pattern.search(n)}

    def head_params(self) -> dict[str, Tensor]:
        """The head's parameters (detached, not copied)."""
        params = dict(self.model.named_parameters())
        return {n: params[n].detach() for n in self.head_names}

    def describe(self) -> str:
        """A short name for messages: the source, or the model class."""
        return self.source or type(self.model).__name__


def _normalise_kind(kind: str) -> str:
    key = str(kind).lower().replace("-", "_").replace(" ", "_")
    if key not in _KIND_ALIASES:
        raise ModelLoadError(f"unknown model kind {kind!r}; choose one of {', '.join(KINDS)}")
    return _KIND_ALIASES[key]


def detect_kind(config: Any) -> str:
    """The task kind named by ``config.architectures`` (e.g. ``BertForSequenceClassification``).

    Raises:
        ModelLoadError: The architectures name no known task head; pass ``kind=``.
    """
    architectures = list(getattr(config, "architectures", None) or [])
    kind = _kind_of_classes(architectures)
    if kind is not None:
        return kind
    found = ", ".join(architectures) if architectures else "none"
    raise ModelLoadError(
        f"cannot tell the task kind from config.architectures ({found}); pass kind= one of "
        f"{', '.join(KINDS)}"
    )


def _kind_of_classes(class_names: Sequence[str]) -> str | None:
    for name in class_names:
        for suffix, kind in _ARCH_SUFFIXES:
            if name.endswith(suffix):
                return kind
    return None


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        key = id(p)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def _body_regex(model: nn.Module) -> str:
    prefix = getattr(model, "base_model_prefix", "") or ""
    base = getattr(model, prefix, None) if prefix else None
    if isinstance(base, nn.Module) and base is not model:
        return rf"^{re.escape(prefix)}\."
    try:  # a model without a base-model attribute: a head child named classifier/score/...
        return _named_head_body_regex(model)
    except ValueError:
        return "^"  # a bare base model: everything is body


def _label_maps(config: Any, kind: str) -> tuple[dict[str, int], dict[int, str]]:
    """``(label2id, id2label)`` of a config. ``id2label`` is what the model's outputs mean
    (``transformers`` reads predictions with it); a ``label2id`` that disagrees with it (left
    stale when only ``id2label`` was set) is replaced by its inverse."""
    if kind == "causal_lm":
        return {}, {}
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    label2id = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
    inverse = {v: k for k, v in id2label.items()}
    if id2label and len(inverse) == len(id2label) and label2id != inverse:
        label2id = inverse
    elif not label2id:
        label2id = inverse
    return label2id, id2label


def wrap_model(
    model: nn.Module,
    *,
    kind: str | None = None,
    tokenizer: Any | None = None,
    image_processor: Any | None = None,
    source: str = "",
) -> HFModel:
    """Describe an in-memory ``transformers`` model as an :class:`HFModel` (no loading).

    The model is switched to eval mode and eager attention.

    Args:
        model: A ``transformers`` ``PreTrainedModel``.
        kind: One of :data:`KINDS`; detected from ``config.architectures`` or, for a model
            that was never saved, from its class name.
        tokenizer: Its tokenizer, if any (checked with :func:`check_tokenizer`).
        image_processor: Its image processor, if any.
        source: A name for messages (a folder or hub id).

    Raises:
        ModelLoadError: The kind cannot be told.
        TokenizerMismatchError: The tokenizer does not fit the model.
    """
    config = getattr(model, "config", None)
    if config is None:
        raise ModelLoadError(f"{type(model).__name__} has no .config: not a transformers model")
    if kind is None:
        kind = _kind_of_classes([type(model).__name__]) or detect_kind(config)
    else:
        kind = _normalise_kind(kind)
    _set_eager(model)
    regex = _body_regex(model)
    pattern = re.compile(regex)
    heads = tuple(n for n, _ in model.named_parameters() if not pattern.search(n))
    label2id, id2label = _label_maps(config, kind)
    hf = HFModel(
        model=model.eval(),
        kind=kind,
        config=config,
        source=str(source),
        tokenizer=tokenizer,
        image_processor=image_processor,
        head_names=heads,
        body_regex=regex,
        label2id=label2id,
        id2label=id2label,
        tied=_tied_aliases(model),
    )
    if tokenizer is not None:
        check_tokenizer(hf, tokenizer)
    return hf


def _set_eager(model: nn.Module) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if callable(setter):
        with contextlib.suppress(Exception):  # models without attention refuse; nothing to do
            setter("eager")
            return
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "_attn_implementation"):
        with contextlib.suppress(Exception):
            config._attn_implementation = "eager"


def _looks_like_path(source: str) -> bool:
    return (
        source.startswith((".", "/", "~", os.sep))
        or source.endswith(("/", os.sep))
        or source.count("/") > 1
        or (os.altsep is not None and os.altsep in source)
        or (os.sep != "/" and os.sep in source)
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _check_folder(path: Path) -> None:
    if not path.is_dir():
        raise ModelLoadError(
            f"{path} is a file, not a Hugging Face model folder (config.json and weights)"
        )
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model folder")
    has_weights = (
        any(path.glob("*.safetensors"))
        or any(path.glob("pytorch_model*.bin"))
        or (path / "model.safetensors.index.json").is_file()
    )
    if not has_weights:
        raise ModelLoadError(
            f"{path} has no weights (model.safetensors or pytorch_model.bin): not a model folder"
        )


def load_model(
    path_or_id: str | os.PathLike[str],
    *,
    kind: str | None = None,
    num_labels: int | None = None,
    tokenizer: Any | None = None,
    warn_random: bool = True,
    **kwargs: Any,
) -> HFModel:
    """Load a Hugging Face model folder or hub id with ``from_pretrained``.

    Folders hold ``config.json`` and safetensors weights (``model.safetensors`` or shards
    with an index) or, when that is all there is, ``pytorch_model.bin`` (read by
    ``transformers``). A string that is not an existing folder and looks like a hub id
    (``name`` or ``org/name``) is resolved by ``transformers`` as usual: from the local
    cache, and from the hub unless ``HF_HUB_OFFLINE=1``. The model is loaded with
    ``attn_implementation="eager"`` and put in eval mode; ``transformers``' logging and
    progress bars are silenced while it loads (what it initialised at random is in
    :attr:`HFModel.newly_initialized`).

    Args:
        path_or_id: A model folder or a hub id.
        kind: One of :data:`KINDS` (aliases such as ``"text-classification"`` are
            accepted); detected from ``config.architectures`` when ``None``.
        num_labels: Number of classes of a classifier. When it differs from the
            checkpoint's, the head is initialised at random (and ``id2label`` becomes
            ``LABEL_0``, ...).
        tokenizer: A tokenizer, or a folder / hub id to load one from, instead of the one
            saved with the model.
        warn_random: Warn (:class:`RandomInitWarning`) when parameters were not in the
            checkpoint and were initialised at random (a task head missing from the folder),
            unless ``num_labels`` asked for a new head.
        **kwargs: Passed on to ``from_pretrained`` (e.g. ``dtype``, ``revision``).

    Returns:
        An :class:`HFModel`.

    Raises:
        ModelLoadError: The folder is missing or is not a model, the id cannot be resolved,
            or the kind cannot be told.
        TokenizerMismatchError: The tokenizer produces ids beyond the model's embedding.
    """
    require("transformers", "curvmerge.hf.load_model")
    import transformers

    source = os.fspath(path_or_id)
    path = Path(source).expanduser()
    if path.exists():
        _check_folder(path)
        source = str(path)
    elif _looks_like_path(source):
        raise ModelLoadError(f"model folder {source} does not exist")
    where = f"model folder {source}" if path.exists() else f"model id {source!r}"
    try:
        with quiet_transformers("curvmerge.hf"):
            config = transformers.AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError) as err:
        if path.exists():
            raise ModelLoadError(f"{where}: unreadable config.json: {_first_line(err)}") from err
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise ModelLoadError(
            f"{source!r} is neither a model folder nor a model id that can be resolved"
            f"{offline}: {_first_line(err)}"
        ) from err
    kind = detect_kind(config) if kind is None else _normalise_kind(kind)
    options: dict[str, Any] = {"attn_implementation": "eager", **kwargs}
    if num_labels is not None:
        if kind == "causal_lm":
            raise ModelLoadError("num_labels applies to classifiers, not to a causal LM")
        if not isinstance(num_labels, int) or num_labels < 1:
            raise ModelLoadError(f"num_labels must be a positive integer, got {num_labels!r}")
        options["num_labels"] = num_labels
        if num_labels != getattr(config, "num_labels", None):
            options["ignore_mismatched_sizes"] = True
    auto = getattr(transformers, _AUTO_CLASSES[kind])
    try:
        with quiet_transformers("curvmerge.hf"):
            model, info = auto.from_pretrained(source, output_loading_info=True, **options)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise ModelLoadError(f"could not load {where} as {kind}: {_first_line(err)}") from err
    fresh = {str(k) for k in info.get("missing_keys", ())}
    fresh |= {
        str(m[0]) if isinstance(m, tuple) else str(m) for m in info.get("mismatched_keys", ())
    }
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = _load_tokenizer(os.fspath(tokenizer), required=True)
    elif tokenizer is None and kind != "image_classification":
        tokenizer = _load_tokenizer(source, required=False)
    processor = _load_image_processor(source) if kind == "image_classification" else None
    hf = wrap_model(model, kind=kind, tokenizer=tokenizer, image_processor=processor, source=source)
    hf.newly_initialized = tuple(sorted(fresh))
    asked = num_labels is not None and num_labels != getattr(config, "num_labels", None)
    if fresh and warn_random and not asked:
        names = ", ".join(hf.newly_initialized[:4]) + (", ..." if len(fresh) > 4 else "")
        warnings.warn(
            f"{where}: {len(fresh)} parameter(s) are not in the checkpoint and were "
            f"initialised at random ({names}); statistics, merges and evaluations use them "
            "as they are",
            RandomInitWarning,
            stacklevel=2,
        )
    return hf


def load_base(
    path_or_id: str | os.PathLike[str],
    like: HFModel | nn.Module,
    *,
    params: str | Sequence[str] | None = None,
    kind: str | None = None,
    **kwargs: Any,
) -> HFModel:
    """Load the base model that task models were fine-tuned from: only its body is used.

    A base needs no task head and no task kind: a headless model (a ``BertModel`` folder
    as sentence-transformers saves it, ``architectures: [BertModel]``), a pre-trained
    masked LM or another task's model all serve. It is loaded as a model of ``like``'s
    kind (``from_pretrained`` of that auto class maps a headless checkpoint's names onto
    the task model's body, e.g. ``embeddings.*`` to ``bert.embeddings.*``; any head it
    gets is never used), so its body parameters have the task models' names.

    Args:
        path_or_id: A model folder or hub id.
        like: A task model (:class:`HFModel` or ``transformers`` model) whose body the
            base must provide.
        params: The parameters the base must provide: names, or a regex (for
            :func:`re.search`) of ``like``'s parameters; default ``like``'s body. A base
            saved without some body part (a masked LM has no pooler) serves a merge of
            the parameters it has.
        kind: Load as this kind instead of ``like``'s (rarely needed).
        **kwargs: Passed on to :func:`load_model` (``tokenizer``, ``dtype``, ...).

    Returns:
        An :class:`HFModel` whose :attr:`~HFModel.body_names` are ``like``'s.

    Raises:
        ModelLoadError: The base cannot be loaded, or it lacks a body parameter of the task
            models (``from_pretrained`` would have initialised it at random).
        ArchitectureMismatchError: The body differs from ``like``'s (names or shapes).
    """
    task = _as_hf(like)
    if params is None:
        needed = set(task.body_names)
    elif isinstance(params, str):
        pattern = re.compile(params)
        needed = {n for n, _ in task.model.named_parameters() if pattern.search(n)}
    else:
        needed = set(params)
    base = load_model(path_or_id, kind=kind or task.kind, warn_random=False, **kwargs)
    fresh = [n for n in base.newly_initialized if n in needed]
    if fresh:
        raise ModelLoadError(
            f"base model {base.describe()} has no value for the parameter {fresh[0]!r} of the "
            f"task models ({len(fresh)} missing): it is not the model they were fine-tuned "
            "from, or it was saved without that part (select the merged parameters without "
            "it: params=, --params on the command line)"
        )
    check_same_architecture([task, base])
    return base


def _load_tokenizer(source: str, *, required: bool) -> Any | None:
    require("transformers", "loading a Hugging Face tokenizer")
    from transformers import AutoTokenizer

    path = Path(source)
    if path.is_dir() and not any((path / f).is_file() for f in _TOKENIZER_FILES):
        if required:
            raise ModelLoadError(f"{source} has no tokenizer files ({', '.join(_TOKENIZER_FILES)})")
        return None
    try:
        with quiet_transformers("curvmerge.hf"):
            return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError, TypeError) as err:
        if required or path.is_dir():
            raise ModelLoadError(
                f"could not load the tokenizer of {source}: {_first_line(err)}"
            ) from err
        return None  # a hub model without a tokenizer


def _load_image_processor(source: str) -> Any | None:
    require("transformers", "loading a Hugging Face image processor")
    from transformers import AutoImageProcessor

    path = Path(source)
    if path.is_dir() and not any((path / f).is_file() for f in _IMAGE_PROCESSOR_FILES):
        return None
    try:
        with quiet_transformers("curvmerge.hf"):
            return AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError, KeyError, ImportError) as err:
        if path.is_dir():
            raise ModelLoadError(
                f"could not load the image processor of {source}: {_first_line(err)}"
            ) from err
        return None


# --------------------------------------------------------------------------- checks


def _as_hf(model: HFModel | nn.Module) -> HFModel:
    return model if isinstance(model, HFModel) else wrap_model(model)


def check_tokenizer(model: HFModel | nn.Module, tokenizer: Any | None = None) -> None:
    """Refuse a tokenizer that produces token ids the model's input embedding lacks.

    The tokenizer's size (``len(tokenizer)``, added tokens included) must not exceed the
    embedding's rows. A smaller tokenizer is accepted: many models pad their embedding
    (e.g. to a multiple of 64).

    Args:
        model: An :class:`HFModel` or a ``transformers`` model.
        tokenizer: The tokenizer; default the :class:`HFModel`'s own (nothing to check
            when it has none).

    Raises:
        TokenizerMismatchError: Naming both sizes.
    """
    if tokenizer is None:
        tokenizer = model.tokenizer if isinstance(model, HFModel) else None
        if tokenizer is None:
            return
    module = model.model if isinstance(model, HFModel) else model
    getter = getattr(module, "get_input_embeddings", None)
    embedding = getter() if callable(getter) else None
    weight = getattr(embedding, "weight", None)
    if not isinstance(weight, Tensor):
        return  # no token embedding (vision models): nothing to compare
    rows = int(weight.shape[0])
    size = len(tokenizer)
    name = model.describe() if isinstance(model, HFModel) else type(module).__name__
    if size > rows:
        raise TokenizerMismatchError(
            f"the tokenizer has {size} tokens but the input embedding of {name} has {rows} "
            "rows: the tokenizer does not belong to this model"
        )
    for attr in ("pad_token_id", "unk_token_id", "cls_token_id", "sep_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int) and value >= rows:
            raise TokenizerMismatchError(
                f"the tokenizer's {attr} is {value} but the input embedding of {name} has "
                f"{rows} rows: the tokenizer does not belong to this model"
            )


# config fields compared before the parameters (they explain most shape differences) and
# after them (those that change the function without changing any shape)
_SHAPE_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
    "embedding_size",
    "hidden_sizes",
    "depths",
    "num_channels",
    "image_size",
    "patch_size",
)
_BEHAVIOUR_FIELDS = (
    "hidden_act",
    "activation_function",
    "layer_norm_eps",
    "layer_norm_epsilon",
    "rms_norm_eps",
    "position_embedding_type",
    "rope_theta",
    "rope_scaling",
    "tie_word_embeddings",
    "is_decoder",
)

_MISSING = object()


def _config_value(config: Any, name: str) -> Any:
    try:
        value = getattr(config, name, _MISSING)
    except Exception:  # some configs compute attributes and may raise
        value = _MISSING
    if isinstance(value, tuple):
        value = list(value)
    return value


def _show(value: Any) -> str:
    return "absent" if value is _MISSING else repr(value)


def check_same_architecture(models: Sequence[HFModel | nn.Module]) -> None:
    """Refuse models whose bodies cannot be merged: different config or body parameters.

    Compared against the first model, in this order: the config fields that set shapes
    (``model_type``, ``vocab_size``, ``hidden_size``, ``num_hidden_layers``, ...), the body
    parameters (names, then shapes, in ``named_parameters`` order), and the config fields
    that change the function without changing a shape (``hidden_act``, ``layer_norm_eps``,
    ``tie_word_embeddings``, ...). Heads may differ (another number of labels).

    Args:
        models: :class:`HFModel` objects or ``transformers`` models.

    Raises:
        ArchitectureMismatchError: Naming the first differing config field or body
            parameter, and the two models.
    """
    hfs = [_as_hf(m) for m in models]
    if len(hfs) < 2:
        return
    ref = hfs[0]

    def who(i: int) -> str:
        return f"model {i} ({hfs[i].describe()})"

    def compare_fields(fields: Sequence[str], i: int) -> None:
        for name in fields:
            a, b = _config_value(ref.config, name), _config_value(hfs[i].config, name)
            if a != b:
                raise ArchitectureMismatchError(
                    f"different architectures: config field {name!r} is {_show(a)} in "
                    f"{who(0)} but {_show(b)} in {who(i)}"
                )

    ref_body = {n: tuple(p.shape) for n, p in ref.body_params().items()}
    for i in range(1, len(hfs)):
        compare_fields(_SHAPE_FIELDS, i)
        body = {n: tuple(p.shape) for n, p in hfs[i].body_params().items()}
        for name, shape in ref_body.items():
            if name not in body:
                raise ArchitectureMismatchError(
                    f"different architectures: body parameter {name!r} of {who(0)} is "
                    f"missing in {who(i)}"
                )
            if body[name] != shape:
                raise ArchitectureMismatchError(
                    f"different architectures: body parameter {name!r} has shape {shape} in "
                    f"{who(0)} but {body[name]} in {who(i)}"
                )
        extra = [n for n in body if n not in ref_body]
        if extra:
            raise ArchitectureMismatchError(
                f"different architectures: body parameter {extra[0]!r} of {who(i)} is "
                f"missing in {who(0)}"
            )
        compare_fields(_BEHAVIOUR_FIELDS, i)


# --------------------------------------------------------------------------- models out


def _task_names(hfs: Sequence[HFModel]) -> list[str]:
    names = []
    for hf in hfs:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(hf.source.rstrip("/\\")).name).strip("._")
        names.append(base)
    if all(names) and len(set(names)) == len(names):
        return names
    return [f"task_{i}" for i in range(len(hfs))]


def _merged_state(hf: HFModel, merged: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The model's state dict with the merged tensors in place (tied aliases included)."""
    params = dict(hf.model.named_parameters())
    state = dict(hf.model.state_dict())
    for name, value in merged.items():
        if name not in params:
            raise ArchitectureMismatchError(
                f"merged parameter {name!r} is not a parameter of {hf.describe()}"
            )
        own = params[name]
        if tuple(value.shape) != tuple(own.shape):
            raise ArchitectureMismatchError(
                f"merged parameter {name!r} has shape {tuple(value.shape)} but "
                f"{tuple(own.shape)} in {hf.describe()}"
            )
        tensor = value.detach().to(device="cpu", dtype=own.dtype).contiguous()
        state[name] = tensor
        for alias, target in hf.tied.items():
            if target == name and alias in state:
                state[alias] = tensor  # the same tensor: save_pretrained sees the tie
    return {k: v.detach().cpu() for k, v in state.items()}


def _same_states(hfs: Sequence[HFModel], states: Sequence[Mapping[str, Tensor]]) -> bool:
    """Whether every model's written state (merged tensors, head, buffers) and labels equal
    the first model's, so that one folder serves all."""
    ref, ref_state = hfs[0], states[0]
    for hf, state in zip(hfs[1:], states[1:], strict=True):
        if hf.kind != ref.kind or hf.id2label != ref.id2label:
            return False
        if state.keys() != ref_state.keys():
            return False
        for name, value in state.items():
            other = ref_state[name]
            if value.shape != other.shape or value.dtype != other.dtype:
                return False
            if not torch.equal(value, other):
                return False
    return True


def _write(hf: HFModel, state: Mapping[str, Tensor], folder: Path) -> None:
    with quiet_transformers("curvmerge.hf"):
        hf.model.save_pretrained(folder, state_dict=dict(state), safe_serialization=True)
        if hf.tokenizer is not None:
            hf.tokenizer.save_pretrained(folder)
        if hf.image_processor is not None:
            hf.image_processor.save_pretrained(folder)


def save_merged(
    models: Sequence[HFModel | nn.Module],
    merged_params: Mapping[str, Tensor] | Any,
    out_dir: str | os.PathLike[str],
    *,
    force: bool = False,
    names: Sequence[str] | None = None,
) -> list[Path]:
    """Write merged models as Hugging Face folders, atomically.

    Each task's folder holds its config (labels included), ``model.safetensors`` with the
    merged tensors and the task's own other parameters (its head), and its tokenizer or
    image processor. When every model's unmerged parameters, buffers and labels are
    identical (the heads were merged too, or a causal LM with tied embeddings) ``out_dir``
    itself is the one model folder; otherwise ``out_dir`` holds one subfolder per task, named by
    ``names`` or by the last component of each model's source (``task_0``, ``task_1``, ...
    when those are missing or not unique). Merged tensors are stored in the dtype of the
    model's parameter; a tied alias (``lm_head.weight``) gets its parameter's merged value.
    ``from_pretrained`` on a written folder gives exactly the merged tensors.

    The whole output is written into a temporary folder beside ``out_dir`` and renamed into
    place (see :func:`curvmerge.io.atomic_folder`): it appears complete or not at all.

    Args:
        models: The task models (:class:`HFModel` or ``transformers`` models), same body.
        merged_params: Merged tensors by parameter name (e.g. ``merge(...).params``, or the
            merge result itself: an object with ``.params``).
        out_dir: The output folder; missing parent folders are created.
        force: Replace an existing ``out_dir``.
        names: Subfolder names, one per model.

    Returns:
        The folders written: ``[out_dir]``, or one per task.

    Raises:
        ArchitectureMismatchError: The models differ, or a merged tensor does not fit.
        curvmerge.io.CheckpointExistsError: ``out_dir`` exists and ``force`` is false.
    """
    hfs = [_as_hf(m) for m in models]
    if not hfs:
        raise ValueError("save_merged needs at least one model")
    merged = getattr(merged_params, "params", merged_params)
    if not isinstance(merged, Mapping):
        raise TypeError(f"merged_params must be a dict of tensors, got {type(merged).__name__}")
    check_same_architecture(hfs)
    states = [_merged_state(hf, merged) for hf in hfs]  # validates before anything is written
    shared = _same_states(hfs, states)
    if names is not None:
        names = [str(n) for n in names]
        if len(names) != len(hfs) or len(set(names)) != len(names):
            raise ValueError(f"names must be {len(hfs)} distinct folder names, got {names}")
        bad = [n for n in names if not n or n in (".", "..") or re.search(r"[/\\]", n)]
        if bad:
            raise ValueError(f"invalid folder name {bad[0]!r}")
    else:
        names = _task_names(hfs)
    target = Path(out_dir).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(target, force) as tmp:
        if shared:
            _write(hfs[0], states[0], tmp)
        else:
            for hf, state, name in zip(hfs, states, names, strict=True):
                _write(hf, state, tmp / name)
    return [target] if shared else [target / n for n in names]
