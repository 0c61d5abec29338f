"""The README's Python quick start runs as written, on tiny task models with a shared body
and their own ``classifier`` heads (the names the quick start's regex expects)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"


class Classifier(nn.Module):
    def __init__(self, classes: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.classifier = nn.Linear(8, classes)

    def forward(self, x):
        return self.classifier(self.body(x))


def _quick_start() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python block"
    return blocks[0]


def test_readme_quick_start_runs_as_written():
    torch.manual_seed(0)
    base = Classifier(3)
    models, loaders = [], []
    g = torch.Generator().manual_seed(1)
    for classes in (3, 2):
        model = Classifier(classes)
        model.body.load_state_dict(base.body.state_dict())
        with torch.no_grad():  # a "fine-tune": each task moves the body its own way
            for p in model.body.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        models.append(model.eval())
        loaders.append(
            [(torch.randn(8, 6, generator=g), torch.randint(0, classes, (8,), generator=g))
             for _ in range(2)]
        )  # fmt: skip
    scope = {"models": models, "loaders": loaders}
    exec(compile(_quick_start(), str(README), "exec"), scope)
    averaged, fisher_avg, result = scope["averaged"], scope["fisher_avg"], scope["result"]
    assert result.report.converged
    assert not any(n.startswith("classifier") for n in result.params)
    differs = [not torch.allclose(averaged.params[n], fisher_avg.params[n]) for n in result.params]
    assert any(differs)  # the Fisher merge is not the average (relative damping)
    task_model = scope["task_model"]
    assert task_model(torch.randn(1, 6)).shape == (1, 3)
