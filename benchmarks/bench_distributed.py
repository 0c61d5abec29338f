"""Data-parallel curvature: 1 process against 2 (torch.distributed, gloo, CPU), side by side.

The same work in both runs, on sklearn's digits (8x8 images, 10 classes):

- the exact diagonal Fisher (:func:`~curvmerge.diagonal_fisher`) of a small CNN on
  ``--fisher-examples`` images (the 1,797 digits cycled);
- an exact-Fisher merge (:func:`~curvmerge.merge` of two CNNs with one
  :class:`~curvmerge.GGNOperator` each, on ``--merge-examples`` images of its own task:
  digits 0-4 and 5-9), damping 0.1 (relative), CG to ``--rtol`` (1e-5).

float64 throughout, so that both runs take the same CG steps (in float32 the sums' other
order changes the iterates enough to change the iteration count; in float64 it still may
by a few iterations, so the merge's seconds per CG iteration are printed too).

Each run is one job of ``torch.multiprocessing.spawn``: a gloo process group of 1 or 2
processes (the 1-process job goes through the same code; its sums are no-ops), each with
one torch thread and its share of the data (:func:`curvmerge.distributed.shard` of the
batches). Wall time is measured inside the job, from a barrier to the slowest process's
end (process start-up and imports are not counted); the jobs alternate, ``--repeats``
times, and the medians are compared as ``2 processes / 1 process`` (ideal 0.5). Also printed:
the seconds the processes spent in the all-reduce (including waiting for the slower one),
CG's iterations (the same in both: every process sees the same products) and the largest
relative difference between the two runs' results.

On a machine with 2 shared cores the 2-process run has no spare core: the other process,
the OS and other users' work compete with it, so the ratio shows what 2 cores give here,
not what 2 GPUs or 2 nodes would.

Run: ``python benchmarks/bench_distributed.py [--repeats 3] [--fisher-examples 8192]
[--merge-examples 512]
[--rtol 1e-5]``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

BATCH = 64
DT = torch.float64  # CG then takes the same steps in both runs (float32 rounding differs)


def _cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 3 * 3, 10),
    ).to(DT)


def _digits(lo: int, hi: int, n: int) -> list:
    """``n`` images of digits ``lo..hi`` (cycling through them when ``n`` exceeds their
    number) in batches of ``BATCH``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = torch.tensor((d.target >= lo) & (d.target <= hi)).nonzero().squeeze(1)
    idx = keep[torch.arange(n) % len(keep)]
    x = torch.tensor(d.images, dtype=DT)[idx].unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)[idx]
    return [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(x), BATCH)]


def _job(rank: int, world: int, tmp: str, fisher_n: int, merge_n: int, rtol: float) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp}/rendezvous",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )
    import curvmerge.statistics.base as base
    from curvmerge import GGNOperator, diagonal_fisher, merge
    from curvmerge.distributed import shard

    spent = [0.0]
    reduce = base.all_reduce_sum

    def timed_reduce(tensors):  # the seconds in the collective, waiting included
        t = time.perf_counter()
        reduce(tensors)
        spent[0] += time.perf_counter() - t
        return tensors

    base.all_reduce_sum = timed_reduce
    fisher_data = shard(_digits(0, 9, fisher_n))
    task_data = [shard(_digits(0, 4, merge_n)), shard(_digits(5, 9, merge_n))]
    models = [_cnn(0), _cnn(1)]
    loss = nn.CrossEntropyLoss()
    # warm-up on one batch of this process (no sums): first-call costs stay out of the timing
    for m, d in zip(models, task_data, strict=True):
        one = d[:1] or fisher_data[:1]
        diagonal_fisher(m, loss, one, progress=False, distributed=False)
        G = GGNOperator(m, loss, one, distributed=False)
        G @ torch.ones(G.shape[0], dtype=DT)
    out = {}
    dist.barrier()
    t0 = time.perf_counter()
    F = diagonal_fisher(models[0], loss, fisher_data, kind="exact", progress=False)
    out["fisher seconds"] = time.perf_counter() - t0
    out["fisher reduce seconds"] = spent[0]
    out["fisher"] = F.diagonal()
    dist.barrier()
    spent[0] = 0.0
    t0 = time.perf_counter()
    ops = [GGNOperator(m, loss, d) for m, d in zip(models, task_data, strict=True)]
    result = merge(models, ops, damping=1e-1, rtol=rtol, maxiter=2000)
    out["merge seconds"] = time.perf_counter() - t0
    out["merge reduce seconds"] = spent[0]
    out["merge iterations"] = result.report.iterations
    out["merge"] = torch.cat([p.reshape(-1) for p in result.params.values()])
    torch.save(out, os.path.join(tmp, f"rank{rank}.pt"))
    dist.destroy_process_group()


def run(world: int, fisher_n: int, merge_n: int, rtol: float) -> dict:
    """One job of ``world`` processes: the slowest process's seconds, rank 0's results."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_job, args=(world, tmp, fisher_n, merge_n, rtol), nprocs=world, join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]
    out = dict(ranks[0])
    for key in ("fisher seconds", "merge seconds"):
        out[key] = max(r[key] for r in ranks)
    for key in ("fisher reduce seconds", "merge reduce seconds"):
        out[key] = max(r[key] for r in ranks)
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fisher-examples", type=int, default=8192)
    parser.add_argument("--merge-examples", type=int, default=512)
    parser.add_argument("--rtol", type=float, default=1e-5, help="the merge's CG tolerance")
    args = parser.parse_args()
    print(
        f"cores: {os.cpu_count()}, load average before: {os.getloadavg()[0]:.2f}; "
        f"{args.repeats} repeats, 1 and 2 processes alternating, 1 torch thread per process"
    )
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for _ in range(args.repeats):
        for world in (1, 2):
            runs[world].append(run(world, args.fisher_examples, args.merge_examples, args.rtol))
    one, two = runs[1][0], runs[2][0]
    print(
        f"diagonal Fisher (exact, CNN, {args.fisher_examples} digits): results differ by "
        f"{_rel(two['fisher'], one['fisher']):.1e} (relative)"
    )
    print(
        f"exact-Fisher merge (2 CNNs, {args.merge_examples} digits each): CG iterations "
        f"{one['merge iterations']} (1 process) and {two['merge iterations']} (2), merged "
        f"parameters differ by {_rel(two['merge'], one['merge']):.1e}"
    )
    print(f"{'':22}{'1 process':>11}{'2 processes':>13}{'ratio':>7}{'all-reduce (2)':>16}")
    for what in ("fisher", "merge"):
        t1 = statistics.median(r[f"{what} seconds"] for r in runs[1])
        t2 = statistics.median(r[f"{what} seconds"] for r in runs[2])
        comm = statistics.median(r[f"{what} reduce seconds"] for r in runs[2])
        name = "diagonal Fisher" if what == "fisher" else "exact-Fisher merge"
        print(f"{name:22}{t1:10.2f}s{t2:12.2f}s{t2 / t1:7.2f}{comm:15.2f}s")
    per = [
        statistics.median(r["merge seconds"] / max(r["merge iterations"], 1) for r in runs[w])
        for w in (1, 2)
    ]
    print(f"{'merge per CG iteration':22}{per[0]:10.4f}s{per[1]:12.4f}s{per[1] / per[0]:7.2f}")
    print(f"load average after: {os.getloadavg()[0]:.2f} (ideal ratio 0.5; 2 shared cores)")


if __name__ == "__main__":
    main()
