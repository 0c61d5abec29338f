"""The experiment runner and the commands on torch.distributed: two gloo processes give the
one-process results, and only rank 0 writes files and prints.

Each spawned job runs both ranks (``torch.multiprocessing.spawn``, one torch thread each)
and saves what every rank saw under ``tmp_path``; the parent runs the same in one process
and compares.
"""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from curvmerge.merging.regmean import regmean_plus_plus

WORLD = 2


def _spawn(job, tmp: str, *args) -> list:
    """Run ``job(rank, tmp, *args)`` on ``WORLD`` processes; the rank files they saved."""
    mp.spawn(_entry, args=(job, tmp, *args), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def _entry(r: int, job, tmp: str, *args) -> None:
    torch.set_num_threads(1)
    torch.save(job(r, tmp, *args), os.path.join(tmp, f"rank{r}.pt"))


def _group(r: int, tmp: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp}/rendezvous",
        rank=r,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )


# ---------------------------------------------------------------------------- RegMean++
def _regmean_problem():
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)) for _ in range(2)]
    g = torch.Generator().manual_seed(1)
    data = [[(torch.randn(5, 3, generator=g), None) for _ in range(3)] for _ in nets]
    return nets, data


def _regmean_job(r: int, tmp: str) -> dict:
    """RegMean++ reads all of its data on every rank (it is never sharded): the one-process
    merge on each, and one process's empty data is refused as in one process."""
    _group(r, tmp)
    try:
        nets, data = _regmean_problem()
        out = {"params": regmean_plus_plus(nets, data).params}
        for t in range(2):  # task t's data empty on rank 1
            given = [d if r == 0 or k != t else [] for k, d in enumerate(data)]
            try:
                regmean_plus_plus(nets, given)
                out[f"empty {t}"] = None
            except Exception as err:  # noqa: BLE001 - the test checks what it is
                out[f"empty {t}"] = f"{type(err).__name__}: {err}"
        return out
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_regmean_plus_plus_reads_all_its_data_on_every_rank(tmp_path):
    ranks = _spawn(_regmean_job, str(tmp_path))
    nets, data = _regmean_problem()
    want = regmean_plus_plus(nets, data).params
    for r, got in enumerate(ranks):
        for name, p in want.items():
            assert torch.equal(got["params"][name], p), (r, name)
    for t in range(2):
        with pytest.raises(ValueError, match="data is empty") as one_process:
            regmean_plus_plus(nets, [[] if k == t else d for k, d in enumerate(data)])
        assert ranks[0][f"empty {t}"] is None
        assert ranks[1][f"empty {t}"] == f"ValueError: {one_process.value}"
