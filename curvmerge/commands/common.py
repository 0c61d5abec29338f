"""What the commands share: errors, options, outputs, and loading models and data.

A *model* argument is either a checkpoint written by ``curvmerge finetune`` (a
``.safetensors`` file whose header records the architecture and the bundled task) or a
Hugging Face model folder or hub id (loaded with :func:`curvmerge.hf.load_model`). Both are
wrapped as a :class:`TaskModel`: the module, a task name, the shared body, and its data.
A checkpoint's data is its bundled task; a Hugging Face model's data come from a data file
(``--data``, read with :mod:`curvmerge.data.files` and encoded with the model's own
tokenizer or image processor), and its loss from the encoded batches
(:attr:`curvmerge.data.files.DataBatches.loss`: token-level cross-entropy for causal LMs and
token classification, MSE for a regression head).

Errors a user can fix are :class:`CLIError` (or the library's ``ValueError`` subclasses:
unreadable data, mismatched models, ...); :func:`curvmerge.cli.main` prints them as one line
``curvmerge: error: <message>`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from curvmerge.merging.system import DEFAULT_DAMPING

__all__ = [
    "PROG",
    "CHECKPOINT_FORMAT",
    "MERGED_FORMAT",
    "CLIError",
    "CLIRuntimeError",
    "TaskModel",
    "Checkpoint",
    "HFTaskModel",
    "add_common",
    "add_data_options",
    "add_split_options",
    "data_options",
    "flag_message",
    "check_outputs",
    "count_rows",
    "ensure_parent",
    "load_base",
    "load_fishers",
    "load_models",
    "log",
    "shared_names",
    "warnings_as_messages",
]

PROG = "curvmerge"
CHECKPOINT_FORMAT = "curvmerge-state-dict"
MERGED_FORMAT = "curvmerge-merged-params"
VISION = ("mnist", "digits")
QUICK_ENV = "CURVMERGE_QUICK"
"""Environment variable: when set to 1, long commands run at smoke-test sizes (``demo``
runs ``--quick``, ``finetune`` caps its steps); the README test uses it."""


class CLIError(Exception):
    """An error in the user's input: printed without a traceback, exit status 2."""


class CLIRuntimeError(Exception):
    """A failure while running: printed without a traceback, exit status 1."""


def quick() -> bool:
    """Whether :data:`QUICK_ENV` asks for smoke-test sizes."""
    return os.environ.get(QUICK_ENV, "").strip() not in ("", "0")


# ---------------------------------------------------------------------------------- output
def log(args, msg: str) -> None:
    """A progress line on stderr, unless ``--quiet``."""
    if not getattr(args, "quiet", False):
        print(f"[curvmerge] {msg}", file=sys.stderr, flush=True)


def check_outputs(paths: Sequence[str | os.PathLike], force: bool) -> None:
    """Refuse existing outputs before any work is done (unless ``--force``)."""
    for p in paths:
        path = Path(p)
        if path.exists() and not force:
            raise CLIError(f"{path} already exists; pass --force to replace it")
        if path.parent.exists() and not path.parent.is_dir():
            raise CLIError(f"cannot write {path}: {path.parent} is not a folder")


def ensure_parent(path: str | os.PathLike) -> Path:
    """Create the parent folder of an output (just before it is written)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def stem_outputs(stem: str | os.PathLike) -> list[Path]:
    s = Path(stem)
    return [s.with_suffix(x) for x in (".md", ".csv", ".png")]


@contextlib.contextmanager
def warnings_as_messages() -> Iterator[None]:
    """Print the library's warnings (damping dominates, CG not converged, one class) as
    ``curvmerge: warning: ...`` lines instead of Python warning records (on rank 0 only
    under torch.distributed)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    from curvmerge.distributed import is_main_process

    if not is_main_process():  # under torchrun every process sees them: rank 0 says them
        return
    seen = set()
    for w in caught:
        if issubclass(w.category, UserWarning):
            text = str(w.message)
            if text not in seen:
                seen.add(text)
                print(f"{PROG}: warning: {text}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


# ---------------------------------------------------------------------------------- options
DAMPING_HELP = (
    "damping >= 0 of curvature merges, relative: lambda = damping x the mean diagonal of "
    f"sum_t w_t F_t (default {DEFAULT_DAMPING:g}; the same for every Fisher scale)"
)
DAMPING_SCALE_HELP = (
    "what the damping multiplies: auto (the mean diagonal of the weighted curvature, "
    "default) or a number; 1 makes the damping an absolute lambda"
)
MODEL_HELP = (
    "a checkpoint written by 'curvmerge finetune' (.safetensors), or a Hugging Face model "
    "folder or hub id (its data come from --data)"
)
BASE_HELP = (
    "the model the task models were fine-tuned from (task arithmetic, TIES, DARE, prior "
    "base): a checkpoint, or a Hugging Face model folder or hub id"
)
PARAMS_HELP = "regex selecting the merged parameters (default: the body)"
OUTPUT_STEM_HELP = "output stem (writes .md/.csv/.png)"
FINE_TUNED_FROM = "(the model the task models were fine-tuned from)"


def needs_base_error(method: str) -> CLIError:
    """The error of a method that needs the base model when no ``--base`` is given."""
    return CLIError(f"method {method!r} needs the base model: pass --base {FINE_TUNED_FROM}")


def add_common(p: argparse.ArgumentParser, *, force: bool = True) -> None:
    """``--force`` (optional) and ``--quiet``."""
    if force:
        p.add_argument(
            "--force",
            action="store_true",
            help="replace existing outputs (without it, existing files are kept "
            "and the command stops)",
        )
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress bars or log lines (results are still printed)",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _share_or_count(text: str) -> float | int:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a share in [0, 1) or a row count, got {text!r}"
        ) from None
    if value < 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a share in [0, 1) or a row count, got {text}")
    if value >= 1:
        if not value.is_integer():
            raise argparse.ArgumentTypeError(f"a row count must be an integer, got {text}")
        return int(value)
    return value


COLUMN_OPTIONS = {
    "--text-column": "the text column (words for token classification)",
    "--text-pair-column": "the second text of sentence pairs (e.g. hypothesis)",
    "--label-column": "the label column (not for causal LMs)",
    "--image-column": "the image column (paths, relative to the file)",
}
"""The column flags of :func:`add_data_options`: each takes one value per data file."""


def add_data_options(
    p: argparse.ArgumentParser,
    *,
    batch_size: int,
    examples: int | None = None,
    examples_help: str | None = None,
    split_default: str = "train",
) -> None:
    """The data options of commands that read Hugging Face models' data files."""
    g = p.add_argument_group(
        "data files (Hugging Face models)",
        "CSV, TSV, JSON Lines, Parquet, a folder written by datasets' save_to_disk, or an "
        "image folder (ROOT/<label>/<image>); text is encoded with each model's own "
        "tokenizer, labels (names or indices) are mapped through the model config's label2id. "
        "Columns are found by common names (text, sentence1/sentence2, label, image, ...) "
        "unless given.",
    )
    g.add_argument(
        "--data",
        nargs="+",
        metavar="FILE",
        help="one data file per model, or one for all models",
    )
    per_file = "; one per data file (in --data order) or one for all, '-' to find it by name"
    for flag, what in COLUMN_OPTIONS.items():
        g.add_argument(flag, nargs="+", metavar="COLUMN", help=what + per_file)
    g.add_argument(
        "--label2id",
        nargs="+",
        metavar="MAP",
        help="the file's label names as the model's class indices, instead of the config's "
        "label2id: NAME=INDEX,... (e.g. negative=0,positive=1) or a JSON file "
        "({\"negative\": 0, ...}); one per data file or one for all, '-' for the config's",
    )
    g.add_argument(
        "--split",
        help="the split of a dataset saved with save_to_disk (default: "
        f"{split_default} when it has one); for a checkpoint's bundled task: train, val or test",
    )
    g.add_argument(
        "--max-length",
        type=_positive_int,
        help="tokens per text; longer texts are truncated (default 128, at most the "
        "model's positions)",
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=batch_size,
        help=f"examples per batch (default {batch_size})",
    )
    if examples is not None or examples_help is not None:
        p.add_argument(
            "--examples",
            type=_positive_int,
            default=examples,
            help=examples_help
            or f"training examples per model, a seeded random draw (default {examples})",
        )


def add_split_options(p: argparse.ArgumentParser) -> None:
    """How a data file is split into train, validation and test parts (``compare``,
    ``sweep``); a saved ``DatasetDict`` with those splits is used as it is."""
    g = p.add_argument_group("splitting a data file")
    g.add_argument(
        "--val-size",
        type=_share_or_count,
        default=0.1,
        help="validation part of each data file: a share in [0, 1) or a row count "
        "(default 0.1); coefficients are chosen there",
    )
    g.add_argument(
        "--test-size",
        type=_share_or_count,
        default=0.1,
        help="test part: a share or a row count (default 0.1); reported once",
    )
    g.add_argument("--split-seed", type=int, default=0, help="seed of the split (default 0)")


# ---------------------------------------------------------------------------------- tasks
def require_safetensors(path: str | os.PathLike, what: str = "checkpoint") -> Path:
    p = Path(path)
    if not p.exists():
        raise CLIError(f"{what} {p} does not exist")
    if p.is_dir():
        raise CLIError(f"{what} {p} is a folder; give a .safetensors file")
    if p.suffix != ".safetensors":
        raise CLIError(
            f"{what} {p} is not a .safetensors file; curvmerge only reads safetensors "
            "(it never unpickles). Convert it with safetensors.torch.save_file."
        )
    return p


def parse_task(spec: str):
    """``digits``, ``mnist``, ``digits:0,1,2`` (a digit subset) or a text task name."""
    from curvmerge.data import TWEET_DOMAINS, digit_subset_tasks, text_tasks, vision_task

    name, _, subset = spec.partition(":")
    if name in VISION:
        if not subset:
            return vision_task(name)
        try:
            digits = [int(d) for d in subset.split(",") if d.strip()]
        except ValueError:
            raise CLIError(f"task {spec!r}: digits must be integers like {name}:0,1,2") from None
        try:
            return digit_subset_tasks(name, [digits])[0]
        except ValueError as err:
            raise CLIError(f"task {spec!r}: {err}") from None
    if name == "rotten_tomatoes" or name in TWEET_DOMAINS:
        if subset:
            raise CLIError(f"task {spec!r}: text tasks take no ':' suffix")
        return text_tasks([name])[0]
    valid = ", ".join([*VISION, "rotten_tomatoes", *TWEET_DOMAINS])
    raise CLIError(
        f"unknown task {spec!r}; use one of {valid}, or a digit subset such as digits:0,1,2"
    )


def is_text(task_spec: str) -> bool:
    return task_spec.partition(":")[0] not in VISION


def model_spec(kind: str, task, task_spec: str, args) -> dict[str, Any]:
    if is_text(task_spec):
        if kind not in ("minilm", "auto"):
            raise CLIError(f"text task {task_spec!r} needs --model minilm, not {kind!r}")
        return {"kind": "minilm", "num_classes": task.num_classes}
    size = int(task.train.inputs.shape[-1])
    if kind in ("auto", "cnn"):
        channels = [8, 16] if size >= 16 else [8]
        return {
            "kind": "cnn",
            "num_classes": task.num_classes,
            "image_size": size,
            "channels": channels,
            "hidden": args.hidden,
        }
    if kind == "mlp":
        return {
            "kind": "mlp",
            "num_classes": task.num_classes,
            "in_features": size * size,
            "hidden": [args.hidden],
        }
    raise CLIError(f"model {kind!r} cannot run image task {task_spec!r}; use cnn or mlp")


def build_model(spec: dict[str, Any], seed: int = 0):
    from curvmerge import models

    kind = spec.get("kind")
    try:
        if kind == "cnn":
            return models.make_cnn(
                spec["num_classes"],
                image_size=spec["image_size"],
                channels=tuple(spec["channels"]),
                hidden=spec["hidden"],
                seed=seed,
            )
        if kind == "mlp":
            return models.make_mlp(
                spec["in_features"], spec["num_classes"], hidden=tuple(spec["hidden"]), seed=seed
            )
        if kind == "minilm":
            return models.load_minilm(spec["num_classes"], seed=seed)
    except KeyError as err:
        raise CLIError(f"the checkpoint's model description lacks {err}") from None
    raise CLIError(f"unknown model kind {kind!r} in the checkpoint header")


def _select(names: list[str], regex: str | None, where: str) -> list[str]:
    if not regex:
        return names
    try:
        pattern = re.compile(regex)
    except re.error as err:
        raise CLIError(f"--params {regex!r} is not a valid regular expression: {err}") from None
    out = [n for n in names if pattern.search(n)]
    if not out:
        raise CLIError(f"--params {regex!r} selects no shared parameter of {where}")
    return out


# ---------------------------------------------------------------------------------- models
class TaskModel:
    """A model of a command with its task: a checkpoint or a Hugging Face model.

    Attributes:
        path: What the user named (a file, a folder or a hub id).
        model: The ``torch.nn.Module``.
        is_hf: Whether it is a Hugging Face model (its data come from a data file).
    """

    path: Any
    model: Any
    is_hf: bool = False
    loss_name: str = "cross_entropy"
    data_options: dict[str, Any] = {}
    """The data file's column options (:func:`data_options`; set by :func:`load_models`)."""

    @property
    def name(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    def body_names(self, regex: str | None = None) -> list[str]:  # pragma: no cover
        raise NotImplementedError

    def split(self, which: str, args=None):  # pragma: no cover
        """Examples of one split (``train``, ``val``, ``test``) as model data."""
        raise NotImplementedError

    def statistics_batches(
        self, args, examples: int | None, seed: int, purpose: str = "Fisher"
    ):  # pragma: no cover
        """``(batches, loss)``: ``examples`` seeded training examples as batches (a data
        file's: logs how many rows, for ``purpose``)."""
        raise NotImplementedError

    def splits(self, args, fisher: str = "") -> dict[str, Any]:  # pragma: no cover
        """``{"train", "val", "test"}`` model data (compare, sweep)."""
        raise NotImplementedError


class Checkpoint(TaskModel):
    """A checkpoint written by ``curvmerge finetune``: the model, its task and the header."""

    def __init__(self, path: str | os.PathLike):
        from curvmerge.io import load_checkpoint, read_metadata

        self.path = require_safetensors(path)
        meta = read_metadata(self.path)
        if meta.get("format") != CHECKPOINT_FORMAT or "model" not in meta:
            raise CLIError(
                f"{self.path} was not written by 'curvmerge finetune' (its header has no model "
                "description); merged bodies are read with 'eval --body'"
            )
        self.meta = meta
        self.spec = meta["model"]
        self.task_spec = meta.get("task")
        self.model = load_checkpoint(build_model(self.spec), self.path)
        self._task = None

    @classmethod
    def from_parts(cls, spec, task_spec, task, model) -> Checkpoint:
        """A checkpoint that is not on disk yet (``finetune``)."""
        ck = cls.__new__(cls)
        ck.spec, ck.task_spec, ck._task, ck.model = spec, task_spec, task, model
        ck.path, ck.meta = Path(""), {}
        return ck

    @property
    def task(self):
        if self._task is None:
            if not self.task_spec:
                raise CLIError(f"{self.path} does not record its task")
            self._task = parse_task(self.task_spec)
        return self._task

    @property
    def name(self) -> str:
        return self.task_spec or self.path.stem

    def split(self, which: str, args=None):
        """The task's split as model data (text is tokenised)."""
        which = {"validation": "val"}.get(which, which)
        if which not in ("train", "val", "test"):
            raise CLIError(f"--split {which!r}: a bundled task has the splits train, val, test")
        data = getattr(self.task, which)
        if self.spec["kind"] == "minilm":
            from curvmerge.data import tokenize
            from curvmerge.models import load_minilm_tokenizer

            return tokenize(data, load_minilm_tokenizer())
        return data

    def statistics_batches(self, args, examples: int | None, seed: int, purpose: str = "Fisher"):
        from curvmerge.experiment import fisher_batches

        return fisher_batches(self.split("train"), examples, args.batch_size, seed), "cross_entropy"

    def splits(self, args, fisher: str = "") -> dict[str, Any]:
        return {k: self.split(k) for k in ("train", "val", "test")}

    def body_names(self, regex: str | None = None) -> list[str]:
        from curvmerge.models import body_names

        return _select(body_names(self.model), regex, str(self.path))


class HFTaskModel(TaskModel):
    """A Hugging Face model (folder or hub id) with its data file."""

    is_hf = True

    def __init__(self, source: str, data_file: str | None, *, kind: str | None = None, hf=None):
        from curvmerge.hf import load_model

        self.path = str(source)
        self.data_file = data_file
        self.hf = hf if hf is not None else load_model(self.path, kind=kind)
        self.model = self.hf.model
        self.kind = self.hf.kind
        self._name: str | None = None

    @property
    def name(self) -> str:
        if self._name is None:
            self._name = Path(self.path.rstrip("/\\")).name or self.path
        return self._name

    @name.setter
    def name(self, value: str) -> None:
        self._name = value

    def body_names(self, regex: str | None = None) -> list[str]:
        return _select(self.hf.body_names, regex, self.path)

    # -------------------------------------------------------------------------- data
    def _need_data(self) -> str:
        if not self.data_file:
            raise CLIError(
                f"{self.path} is a Hugging Face model: give its data with --data FILE "
                "(one file per model, or one for all)"
            )
        return self.data_file

    def _read(self, args, default: str):
        from curvmerge.data.files import SPLIT_NAMES, read_table, saved_split_names

        path = self._need_data()
        split = getattr(args, "split", None)
        if split is None:
            names = saved_split_names(path)
            if names and len(names) > 1:
                split = next((c for c in SPLIT_NAMES[default] if c in names), None)
        return read_table(path, split=split)

    def encode(self, table, args, *, batch_size: int | None = None):
        """Encode rows with the model's tokenizer or image processor (``DataBatches``)."""
        from curvmerge.data.files import encode_table

        return encode_table(
            table,
            self.hf,
            **self.data_options,
            max_length=getattr(args, "max_length", None),
            batch_size=batch_size or args.batch_size,
            source=self.data_file,
        )

    def as_data(self, table, args):
        """All rows as one ``(inputs, targets)`` pair (:data:`curvmerge.train.Data`); the
        evaluation and the experiment runner batch it (padding trimmed per batch)."""
        batches = self.encode(table, args, batch_size=max(len(table), 1))
        self.loss_name = batches.loss.name
        inputs, targets = batches.batches[0]
        return inputs, targets

    def describe_data(self, args=None) -> str:
        """The data file in log lines (with ``--split`` when one is given)."""
        split = getattr(args, "split", None)
        return f"{self.data_file} (split {split})" if split else str(self.data_file)

    def split(self, which: str, args=None):
        which = {"validation": "val"}.get(which, which)
        table = self._read(args, which)
        return self.as_data(table, args)

    def statistics_batches(self, args, examples: int | None, seed: int, purpose: str = "Fisher"):
        import torch

        table = self._read(args, "train")
        n = len(table)
        if examples is not None and examples < n:
            idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:examples]
            table = table.select(idx.tolist())
        batches = self.encode(table, args)
        log(
            args,
            f"{self.describe_data(args)}: {batches.num_examples} of {n} rows for the {purpose} "
            f"({'a seeded draw of --examples' if batches.num_examples < n else 'all of them'}; the "
            "file is taken as training rows: keep validation and test rows out of it)",
        )
        self.loss_name = batches.loss.name
        return batches, batches.loss

    def splits(self, args, fisher: str = "") -> dict[str, Any]:
        """The train, validation and test parts; logs their sizes (``fisher``: what the
        training rows give, for the line)."""
        parts = read_parts(
            self._need_data(),
            split=getattr(args, "split", None),
            validation=args.val_size,
            test=args.test_size,
            seed=args.split_seed,
            options=("--val-size", "--test-size"),
        )
        data = {k: self.as_data(v, args) for k, v in parts.items()}  # errors before the line
        log(
            args,
            rows_line(
                self.describe_data(args),
                {k: len(v) for k, v in parts.items()},
                fisher=fisher,
                how=split_description(self.data_file, args),
            ),
        )
        return data


def count_rows(data) -> int:
    """Examples in model data: :class:`~curvmerge.data.files.DataBatches`, batches or
    :data:`curvmerge.train.Data`."""
    n = getattr(data, "num_examples", None)
    if n is not None:
        return int(n)
    from curvmerge.batches import batch_size
    from curvmerge.train import as_examples, is_batches

    if is_batches(data):
        return sum(batch_size(x) for x, _ in data)
    return int(as_examples(data)[1].shape[0])


def split_description(path: str | None, args) -> str:
    """How ``compare`` and ``sweep`` split a data file, for the log line."""
    from curvmerge.data.files import SPLIT_NAMES, saved_split_names

    names = saved_split_names(path) if path else None
    if getattr(args, "split", None) is None and names:
        found = [next((c for c in cands if c in names), None) for cands in SPLIT_NAMES.values()]
        if all(found):
            return "the saved dataset's " + ", ".join(str(f) for f in found) + " splits"
    return (
        f"split by --split-seed {args.split_seed}, --val-size {args.val_size:g}, "
        f"--test-size {args.test_size:g}"
    )


def rows_line(where: str, counts: dict[str, int], *, fisher: str = "", how: str = "") -> str:
    """One log line: the training, validation and test rows of a data file and their use
    (``fisher``: what the training rows give, e.g. ``Fisher: 512 of them``)."""
    train = f"{counts['train']} training" + (f" ({fisher})" if fisher else "")
    return (
        f"{where}: {train}, {counts['val']} validation (choose coefficients), "
        f"{counts['test']} test (reported) rows" + (f"; {how}" if how else "")
    )


def read_parts(
    path: str,
    *,
    split: str | None = None,
    validation: float | int = 0.1,
    test: float | int = 0.1,
    seed: int = 0,
    options: tuple[str, str] = ("validation", "test"),
) -> dict[str, Any]:
    """``{"train", "val", "test"}`` tables of a data file
    (:func:`curvmerge.data.files.read_split_tables`; ``options`` name the sizes in errors)."""
    from curvmerge.data.files import read_split_tables

    parts, _ = read_split_tables(
        path, split=split, validation=validation, test=test, seed=seed, sizes=options
    )
    return parts


def _looks_like_model_file(path: Path) -> bool:
    return path.is_file() and path.suffix == ".safetensors"


def load_model(
    source: str | os.PathLike, data_file: str | None = None, *, kind: str | None = None
) -> TaskModel:
    """A checkpoint (``.safetensors``) or a Hugging Face folder or hub id."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if text.endswith(".safetensors") or _looks_like_model_file(path):
        if data_file:
            raise CLIError(
                f"{text} is a curvmerge checkpoint: it uses the bundled task recorded in its "
                "header; --data is for Hugging Face models"
            )
        return Checkpoint(text)
    if path.is_file():
        pickled = path.suffix in (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
        raise CLIError(
            f"{text} is not a model: give a checkpoint written by 'curvmerge finetune' "
            "(.safetensors) or a Hugging Face model folder (config.json and weights)"
            + (
                "; curvmerge only reads safetensors (it never unpickles): convert it with "
                "safetensors.torch.save_file"
                if pickled
                else ""
            )
        )
    return HFTaskModel(text, data_file, kind=kind)


def _data_files(args, n: int) -> list[str | None]:
    files = list(getattr(args, "data", None) or [])
    if not files:
        return [None] * n
    if len(files) == 1:
        return files * n
    if len(files) != n:
        raise CLIError(f"got {len(files)} --data files for {n} models: give one per model or one")
    return files


def data_options(args, n: int) -> list[dict[str, Any]]:
    """The column options of each of ``n`` data files (the keyword arguments of
    :func:`curvmerge.data.files.encode_table`): every column flag takes one value per data
    file or one for all; ``-`` (or no flag) leaves the column to be found by name."""
    out: list[dict[str, Any]] = [{} for _ in range(n)]
    for flag in COLUMN_OPTIONS:
        key = flag[2:].replace("-", "_")
        values = getattr(args, key, None)
        if values is None:
            values = [None]
        elif isinstance(values, str):
            values = [values]
        values = list(values)
        if len(values) not in (1, n):
            raise CLIError(
                f"got {len(values)} {flag} values for {n} data files: give one per data file "
                "(in --data order) or one for all"
            )
        if len(values) == 1:
            values = values * n
        for options, value in zip(out, values, strict=True):
            options[key] = None if value in (None, "-") else value
    maps = getattr(args, "label2id", None)
    if maps:
        if len(maps) not in (1, n):
            raise CLIError(
                f"got {len(maps)} --label2id values for {n} data files: give one per data "
                "file (in --data order) or one for all"
            )
        parsed = [None if m == "-" else parse_label2id(m) for m in maps]
        for options, value in zip(out, parsed * n if len(parsed) == 1 else parsed, strict=True):
            if value is not None:
                options["label2id"] = value
    return out


def parse_label2id(text: str) -> dict[str, int]:
    """``--label2id``: ``NAME=INDEX,...`` or a JSON file holding ``{NAME: INDEX}``."""
    path = Path(text).expanduser()
    if path.is_file():
        try:
            value = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise CLIError(f"--label2id {text}: not a readable JSON file: {err}") from None
        if not isinstance(value, dict) or not value:
            raise CLIError(f'--label2id {text}: expected a JSON object {{"name": index, ...}}')
        items = list(value.items())
    else:
        items = [part.rpartition("=")[::2] for part in text.split(",") if part.strip()]
        if not items or any(not k.strip() or not v.strip() for k, v in items):
            raise CLIError(
                f"--label2id {text!r}: use NAME=INDEX,... (e.g. negative=0,positive=1) or a "
                "JSON file"
            )
    out: dict[str, int] = {}
    for key, index in items:
        try:
            number = int(str(index).strip())
        except ValueError:
            raise CLIError(
                f"--label2id {text!r}: the index of {str(key).strip()!r} is not an integer: "
                f"{index!r}"
            ) from None
        out[str(key).strip()] = number
    return out


#: The arguments of the data library (:mod:`curvmerge.data.files`) that the commands take as
#: flags, and ``run``'s configuration keys; see :func:`flag_message`.
_DATA_FLAGS = {
    "text_column": "--text-column",
    "text_pair_column": "--text-pair-column",
    "label_column": "--label-column",
    "image_column": "--image-column",
    "label2id": "--label2id",
    "split": "--split",
    "max_length": "--max-length",
    "batch_size": "--batch-size",
}
_CONFIG_KEYS = {
    **{k: f"options.{k}" for k in ("text_column", "text_pair_column", "label_column")},
    **{k: f"options.{k}" for k in ("image_column", "label2id", "split")},
    "max_length": "max_length",
    "batch_size": "fisher.batch_size",
}


def flag_message(text: str, command: str | None) -> str:
    """A library message with the Python arguments it names (``pass label2id= ...``,
    ``leave label_column unset``) written as the flags of ``command`` (``--label2id``), or
    for ``run`` as the configuration's keys (``options.label2id``). A bare name (without
    ``=``) is replaced only when it cannot be a plain word (it has an underscore or a
    digit), and never for ``run`` (its messages list its keys)."""
    names = _CONFIG_KEYS if command == "run" else _DATA_FLAGS
    pattern = re.compile(r"(?<![\w'\"./-])(" + "|".join(names) + r")(?:(=)|(?![\w'\"]))")

    def replace(m: re.Match) -> str:
        name, equals = m.group(1), m.group(2)
        if not equals and (command == "run" or not re.search(r"[_\d]", name)):
            return m.group(0)
        out = names[name]
        if equals and m.end() < len(text) and not text[m.end()].isspace():
            out += " " if command != "run" else ": "
        return out

    return pattern.sub(replace, text)


def load_models(paths: Sequence[str], args, *, need_data: bool = False) -> list[TaskModel]:
    """Load the models named on the command line, each with its data file and its data
    file's column options (:func:`data_options`)."""
    files = _data_files(args, len(paths))
    options = data_options(args, len(paths))
    models = [load_model(p, f) for p, f in zip(paths, files, strict=True)]
    for m, opts in zip(models, options, strict=True):
        m.data_options = opts
    kinds = {m.is_hf for m in models}
    if len(kinds) > 1:
        raise CLIError(
            "checkpoints written by 'curvmerge finetune' and Hugging Face models cannot be "
            "mixed: convert one kind to the other"
        )
    if need_data:
        for m in models:
            if m.is_hf:
                m._need_data()
    names = [m.name for m in models]
    if models and models[0].is_hf and len(set(names)) != len(names):
        for i, m in enumerate(models):
            m.name = f"{m.name}-{i}"
    return models


def load_base(
    path: str | None, models: Sequence[TaskModel], params: str | None = None
) -> TaskModel | None:
    """The ``--base`` model, of the same kind as the task models. A Hugging Face base
    provides body parameters only: it is loaded by :func:`curvmerge.hf.load_base` (no task
    kind needed: a headless ``BertModel`` folder serves), which checks that it has every
    parameter ``params`` selects (default: the body)."""
    if not path:
        return None
    if models and models[0].is_hf:
        from curvmerge.hf import ModelLoadError
        from curvmerge.hf import load_base as load_hf_base

        text = os.fspath(path)
        if text.endswith(".safetensors") or Path(text).is_file():
            raise CLIError(
                f"--base {text}: the task models are Hugging Face models; give the base as a "
                "model folder or hub id"
            )
        try:
            hf = load_hf_base(text, models[0].hf, params=params)
        except ModelLoadError as err:
            raise CLIError(f"--base {text}: {err}") from None
        return HFTaskModel(text, None, hf=hf)
    if not str(path).endswith(".safetensors") and not Path(path).is_file():
        raise CLIError(
            f"--base {path}: the task models are curvmerge checkpoints; give the base as a "
            "checkpoint written by 'curvmerge finetune'"
        )
    return Checkpoint(path)


def _vocab_mismatch(a, b) -> str | None:
    """How two tokenizers' vocabularies differ, or ``None``."""
    try:
        va, vb = a.get_vocab(), b.get_vocab()
    except Exception:  # noqa: BLE001 - a tokenizer without a vocabulary: nothing to compare
        return None
    if va == vb:
        return None
    if len(va) != len(vb):
        return f"{len(va)} vs {len(vb)} tokens"
    for token, i in sorted(va.items(), key=lambda kv: kv[1]):
        if vb.get(token) != i:
            other = vb.get(token)
            where = f"id {other}" if other is not None else "absent"
            return f"token {token!r} is id {i} vs {where}"
    return "the vocabularies differ"


def shared_names(
    models: Sequence[TaskModel], regex: str | None, base: TaskModel | None = None
) -> list[str]:
    """The merged (body) parameter names, after checking that every model, and the base,
    have them with one shape (Hugging Face models: the same architecture and vocabulary)."""
    from curvmerge.io import CheckpointMismatchError

    everyone = [*models, *([base] if base is not None else [])]
    if models[0].is_hf:
        from curvmerge.hf import check_same_architecture

        check_same_architecture([m.hf for m in everyone])
        ref = models[0].hf.tokenizer
        for m in everyone[1:]:
            tok = m.hf.tokenizer
            if ref is not None and tok is not None:
                diff = _vocab_mismatch(ref, tok)
                if diff:
                    raise CLIError(
                        f"different vocabularies: the tokenizers of {models[0].path} and "
                        f"{m.path} differ ({diff}); merged models must share one vocabulary"
                    )
        return models[0].body_names(regex)
    names = models[0].body_names(regex)
    ref = dict(models[0].model.named_parameters())
    for c in everyone[1:]:
        own = dict(c.model.named_parameters())
        missing = [n for n in names if n not in own]
        if missing:
            raise CheckpointMismatchError(
                f"{c.path} and {models[0].path} have different architectures: {c.path} has no "
                f"parameter {missing[0]!r}"
            )
        for n in names:
            if own[n].shape != ref[n].shape:
                raise CheckpointMismatchError(
                    f"{c.path} and {models[0].path} have different architectures: parameter "
                    f"{n!r} has shape {tuple(own[n].shape)} vs {tuple(ref[n].shape)}"
                )
    return names


def _model_key(text: str) -> str:
    """A model named in a Fisher file's header or on the command line, comparable: the
    resolved path of a local file or folder, else the text (a hub id)."""
    p = Path(text).expanduser()
    return str(p.resolve()) if p.exists() else text


def _check_fisher_model(path: Path, meta: dict, i: int, models: Sequence[TaskModel]) -> None:
    """Refuse a Fisher file whose header records another model than the one at its
    position (``model_path``: the resolved path written by ``curvmerge fisher``; else
    ``checkpoint``, the path as it was given). Files without either are not checked."""
    recorded = meta.get("model_path") or meta.get("checkpoint")
    if not isinstance(recorded, str) or not recorded:
        return
    given = [_model_key(str(m.path)) for m in models]
    key = _model_key(recorded)
    if key == given[i]:
        return
    if "model_path" not in meta and not Path(recorded).expanduser().exists():
        # written before model_path was recorded, from another folder: compare names
        if key not in given and Path(recorded).name == Path(str(models[i].path)).name:
            return
    where = f"model {i + 1} of {len(models)}"
    hint = (
        f" (it is model {given.index(key) + 1}'s: give the --fisher files in the models' order)"
        if key in given
        else " (compute it with 'curvmerge fisher' for this model)"
    )
    raise CLIError(
        f"Fisher file {path} was computed for {recorded}, but {where} is {models[i].path}{hint}"
    )


def load_fishers(paths: Sequence[str], models: Sequence[TaskModel], names: list[str]):
    """One diagonal Fisher per model from Fisher files, restricted to ``names``; returns
    ``(fishers, seconds recorded in the files)``."""
    from curvmerge.fisher import load_fisher
    from curvmerge.io import read_metadata
    from curvmerge.operators import DiagonalOperator
    from curvmerge.space import ParamSpace, SpaceMismatchError

    if len(paths) != len(models):
        raise CLIError(f"got {len(paths)} Fisher files for {len(models)} models")
    out, seconds = [], 0.0
    for i, (p, c) in enumerate(zip(paths, models, strict=True)):
        path = require_safetensors(p, "Fisher file")
        meta = read_metadata(path)  # raises a clear error for a truncated file
        _check_fisher_model(path, meta, i, models)
        try:
            F = load_fisher(path, c.model)
        except SpaceMismatchError as err:
            raise CLIError(f"{err} ({c.path}): not a Fisher file of this model") from None
        missing = [n for n in names if n not in F.space.names]
        if missing:
            raise CLIError(
                f"Fisher file {path} has no entry for parameter {missing[0]!r} of {c.path} "
                "(computed with other --params?)"
            )
        if list(F.space.names) != names:
            d = F.as_dict()
            space = ParamSpace.from_tensors(d, names)
            F = DiagonalOperator(space, space.flatten(d))
        out.append(F)
        seconds += float(meta.get("seconds", 0.0) or 0.0)
    return out, seconds


# ---------------------------------------------------------------------------------- values
def parse_options(items: Sequence[str] | None) -> dict[str, Any]:
    """``--option key=value`` pairs; values are read as YAML (numbers, lists, ...)."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CLIError(f"--option {item!r}: use key=value, e.g. --option density=0.2")
        try:
            import yaml

            out[key.strip()] = yaml.safe_load(value)
        except Exception:
            out[key.strip()] = value
    return out


def check_weights(weights, n: int, where: str) -> list[float] | None:
    from curvmerge.merging.system import check_weights as _check

    if weights is None:
        return None
    if not isinstance(weights, (list, tuple)):
        raise CLIError(f"{where}: weights must be a list of numbers, got {weights!r}")
    try:
        return _check([float(x) for x in weights], n, 1.0)
    except (TypeError, ValueError) as err:
        raise CLIError(f"{where}: {err}") from None


def damping_scale(value, where: str) -> str | float:
    """``auto`` or a positive number (the scale that multiplies the damping)."""
    from curvmerge.merging.system import check_damping_scale

    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        return check_damping_scale(float(value))
    except (TypeError, ValueError):
        raise CLIError(
            f"{where}: damping_scale must be 'auto' or a positive number, got {value!r}"
        ) from None


def evaluate_body(models: Sequence[TaskModel], body, data: Sequence, batch_size: int) -> dict:
    """Metrics per task of each model with ``body`` (merged shared parameters) copied in."""
    import torch

    from curvmerge.train import evaluate

    out = {}
    for m, d in zip(models, data, strict=True):
        if body is not None:
            own = dict(m.model.named_parameters())
            with torch.no_grad():
                for n, v in body.items():
                    own[n].copy_(v)
        out[m.name] = evaluate(m.model, d, batch_size=batch_size, loss=m.loss_name)
    return out


def draw(data, n: int | None, seed: int = 0):
    """``n`` examples of ``data`` drawn without replacement (seeded), as ``(inputs,
    labels)``; all of them when ``n`` is ``None`` or not smaller."""
    from collections.abc import Mapping

    import torch

    from curvmerge.train import as_examples

    if n is None:
        return data
    inputs, labels = as_examples(data)
    total = int(labels.shape[0])
    if n >= total:
        return data
    idx = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]
    if isinstance(inputs, Mapping):
        return {k: v[idx] for k, v in inputs.items()}, labels[idx]
    return inputs[idx], labels[idx]
