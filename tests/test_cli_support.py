"""Helpers of the command-line tests: the console script, and tiny Hugging Face models
saved with ``save_pretrained`` (with a tokenizer) and the CSV files of their tasks."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import torch

from curvmerge import models
from curvmerge.cli import main

WORDS = (
    "the a movie film good bad great awful plot was is not very fun boring acting it and story "
    "cast rain sun cold warm"
).split()
POSITIVE = ("good", "great", "fun", "warm", "sun")


def command() -> list[str]:
    """The installed console script (``python -m curvmerge`` when it is missing)."""
    script = Path(sys.executable).parent / "curvmerge"
    return [str(script)] if script.exists() else [sys.executable, "-m", "curvmerge"]


def run_script(*args, cwd, env=None, timeout=300) -> subprocess.CompletedProcess:
    """Run the console script in a fresh process, as a shell user would."""
    full = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [*command(), *map(str, args)],
        cwd=cwd,
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_main(*args) -> tuple[int, str, str]:
    """Run :func:`curvmerge.cli.main` in this process (fast); (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main([str(a) for a in args])
    return status, out.getvalue(), err.getvalue()


def word_tokenizer(words=WORDS, *, bert: bool = True):
    """The tests' tiny offline tokenizer (:func:`curvmerge.models.word_tokenizer`)."""
    return models.word_tokenizer(words, bert=bert)


def _perturb(model, seed: int, scale: float = 0.05):
    """A "fine-tuned" copy: every parameter moved by seeded noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def save_bert(folder, labels, *, seed: int, vocab_size: int | None = None, tokenizer=None):
    """A tiny BERT classifier (``curvmerge.models.tiny_bert``, the same base for every
    seed, moved by seeded noise) with named labels and the word tokenizer."""
    from curvmerge.models import tiny_bert

    tok = tokenizer or word_tokenizer()
    model = tiny_bert(
        len(labels),
        vocab_size=vocab_size or len(tok),
        hidden_size=8,
        num_layers=1,
        max_length=64,
        seed=0,
    )
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {name: i for i, name in enumerate(labels)}
    model.config.architectures = ["BertForSequenceClassification"]
    _perturb(model, seed)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return Path(folder)


def save_gpt2(folder, *, seed: int, tokenizer=None):
    """A tiny GPT-2 causal LM with tied embeddings and the GPT-style word tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tokenizer or word_tokenizer(bert=False)
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=32,
        n_embd=8,
        n_layer=1,
        n_head=2,
        bos_token_id=1,
        eos_token_id=1,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    model = _perturb(GPT2LMHeadModel(config).eval(), seed)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return Path(folder)


def sentences(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(3, 8, (1,), generator=g))
        idx = torch.randint(0, len(WORDS), (k,), generator=g).tolist()
        out.append(" ".join(WORDS[i] for i in idx))
    return out


def write_text_csv(path, labels, n: int = 48, seed: int = 0):
    """``text,label`` rows with string labels (a label is a function of the words)."""
    import csv

    rows = []
    for i, text in enumerate(sentences(n, seed)):
        hits = sum(w in POSITIVE for w in text.split())
        label = labels[min(hits, len(labels) - 1)] if len(labels) > 2 else labels[hits > 0]
        rows.append((text, label if i % 7 else labels[i % len(labels)]))
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return Path(path)


def write_pair_csv(path, n: int = 48, seed: int = 0):
    """``premise,hypothesis,label`` rows (entailment when the texts share a word)."""
    import csv

    first, second = sentences(n, seed), sentences(n, seed + 100)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["premise", "hypothesis", "label"])
        for a, b in zip(first, second, strict=True):
            shared = bool(set(a.split()) & set(b.split()))
            w.writerow([a, b, "entailment" if shared else "not_entailment"])
    return Path(path)


def write_lm_csv(path, n: int = 32, seed: int = 0):
    import csv

    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text"])
        for text in sentences(n, seed):
            w.writerow([text])
    return Path(path)
