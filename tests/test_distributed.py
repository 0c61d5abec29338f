"""Data-parallel curvature on torch.distributed: two gloo processes on the CPU, each with its
own (uneven) shard of the data, give the single-process results on all the data.

One spawned job computes everything (GGN products and diagonals, the diagonal Fisher, input
Grams, K-FAC factors, an exact-Fisher merge) on both ranks and saves it under ``tmp_path``;
the parent computes the same on all the data in one process and compares.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import TensorDataset

from curvmerge import PreparedMerge, diagonal_fisher, merge
from curvmerge.distributed import (
    all_reduce_sum,
    is_distributed,
    is_main_process,
    rank,
    shard,
    world_size,
)
from curvmerge.operators.ggn import GGNOperator
from curvmerge.statistics import input_grams, kfac_factors
from curvmerge.statistics.base import CurvatureComputer
from tests.fisher_cases import TokenModel, cnn_plain

DT = torch.float64
SHARDS = (7, 13)  # examples of rank 0 and rank 1: uneven, and uneven batch counts (2 and 4)
BATCH = 4  # batch size of a rank's shard; the single-process run uses batches of 5
TOL = 1e-6


# ---------------------------------------------------------------------------- problems
def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)


def _tokens() -> nn.Module:
    torch.manual_seed(3)
    return TokenModel().to(DT)


def _cnn() -> nn.Module:
    return cnn_plain().to(DT)


def _examples(name: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``sum(SHARDS)`` examples of a data set."""
    g = torch.Generator().manual_seed(100 + seed)
    N = sum(SHARDS)
    if name == "ce":
        return torch.randn(N, 4, generator=g, dtype=DT), torch.randint(0, 3, (N,), generator=g)
    if name == "cnn":
        return torch.randn(N, 1, 7, 7, generator=g, dtype=DT), torch.randint(
            0, 3, (N,), generator=g
        )
    x = torch.randn(N, 5, 3, generator=g, dtype=DT)
    y = torch.randint(0, 4, (N, 5), generator=g)
    lengths = torch.randint(1, 6, (N,), generator=g)
    y[torch.arange(5)[None, :] >= lengths[:, None]] = -100  # padding: terms != examples * 5
    return x, y


def _batches(name: str, part: int | None, seed: int = 0) -> list:
    """Rank ``part``'s shard in batches of ``BATCH``, or (``None``) all the data in batches
    of 5."""
    x, y = _examples(name, seed)
    if part is None:
        size, lo, hi = 5, 0, len(x)
    else:
        size, lo = BATCH, sum(SHARDS[:part])
        hi = lo + SHARDS[part]
    return [(x[i : min(i + size, hi)], y[i : min(i + size, hi)]) for i in range(lo, hi, size)]


def _probe(P: int) -> torch.Tensor:
    return torch.randn(P, 3, generator=torch.Generator().manual_seed(5), dtype=DT)


def _compute(part: int | None) -> dict[str, torch.Tensor]:
    """Every statistic of the test on rank ``part``'s shard (all-reduced when
    torch.distributed is initialised) or on all the data (``part=None``)."""
    out: dict[str, torch.Tensor] = {}
    ce = nn.CrossEntropyLoss()
    model, data = _mlp(0), _batches("ce", part)
    for kind in ("exact", "empirical"):
        G = GGNOperator(model, ce, data, kind=kind)
        out[f"ggn {kind} product"] = G @ _probe(G.shape[0])
        out[f"ggn {kind} diagonal"] = G.diagonal()
        out[f"ggn {kind} num_data"] = torch.tensor(G.num_data)
    G = GGNOperator(model, ce, data, cache=False)
    out["ggn streamed product"] = G @ _probe(G.shape[0])
    tok, tok_data = _tokens(), _batches("tokens", part)
    G = GGNOperator(tok, ce, tok_data)
    out["ggn tokens product"] = G @ _probe(G.shape[0])
    out["ggn tokens num_data"] = torch.tensor(G.num_data)
    cnn, cnn_data = _cnn(), _batches("cnn", part)
    for kind in ("exact", "empirical"):
        for name, m, d in (("mlp", model, data), ("cnn", cnn, cnn_data), ("tokens", tok, tok_data)):
            F = diagonal_fisher(m, ce, d, kind=kind, progress=False)
            out[f"diagonal fisher {kind} {name}"] = F.diagonal()
            out[f"diagonal fisher {kind} {name} examples"] = torch.tensor(F.num_examples)
        for name, m, d in (("cnn", cnn, cnn_data), ("tokens", tok, tok_data)):
            K = kfac_factors(m, ce, d, kind=kind)
            for layer in K.layers:
                out[f"kfac {kind} {name} A {layer}"] = K.A[layer]
                out[f"kfac {kind} {name} B {layer}"] = K.B[layer]
                out[f"kfac {kind} {name} rows {layer}"] = torch.tensor(K.num_rows[layer])
            out[f"kfac {kind} {name} terms"] = torch.tensor(K.num_terms)
    grams = input_grams(cnn, cnn_data)
    for layer, gram in grams.grams.items():
        out[f"gram {layer}"] = gram
        out[f"gram rows {layer}"] = torch.tensor(grams.num_rows[layer])
    out["gram examples"] = torch.tensor(grams.num_examples)
    thetas = [_mlp(0), _mlp(1)]
    ops = [GGNOperator(m, ce, _batches("ce", part, seed=s)) for s, m in enumerate(thetas)]
    result = merge(thetas, ops, damping=1e-2, rtol=1e-10, maxiter=500)
    assert result.report.converged
    for n, p in result.params.items():
        out[f"merge {n}"] = p
    prepared = PreparedMerge(thetas, ops, rtol=1e-10, maxiter=500)
    for w in (0.3, 0.8):
        result = prepared.merge(weights=[w, 1 - w], damping=1e-2)
        assert result.report.converged
        for n, p in result.params.items():
            out[f"prepared merge {w} {n}"] = p
    return out


def _join_group(r: int, tmp: str, timeout: float = 60) -> None:
    """Rank ``r`` of a gloo group of ``len(SHARDS)`` processes meeting in ``tmp``."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp}/rendezvous",
        rank=r,
        world_size=len(SHARDS),
        timeout=datetime.timedelta(seconds=timeout),
    )


def _worker(r: int, tmp: str) -> None:
    _join_group(r, tmp)
    try:
        out = _compute(r)
        # the helpers themselves
        out["rank"], out["world_size"] = torch.tensor(rank()), torch.tensor(world_size())
        out["is_distributed"] = torch.tensor(is_distributed())
        out["is_main_process"] = torch.tensor(is_main_process())
        mixed = [
            torch.full((3,), r + 1.5, dtype=torch.float32),
            torch.tensor([r + 1, 10 * r], dtype=torch.int64),
            torch.full((2, 2), r + 0.25, dtype=DT).T,  # not contiguous
            torch.tensor([r + 1.0], dtype=torch.bfloat16),
        ]
        all_reduce_sum(mixed)
        single = torch.tensor([float(r)], dtype=DT)
        all_reduce_sum(single)
        for i, t in enumerate([*mixed, single]):
            out[f"reduced {i}"] = t
        # one rank holds all the data, the other an empty shard
        whole = {k: _batches(k, None) if r == 0 else [] for k in ("ce", "cnn")}
        G = GGNOperator(_mlp(0), nn.CrossEntropyLoss(), whole["ce"])
        out["empty: ggn exact product"] = G @ _probe(G.shape[0])
        F = diagonal_fisher(_mlp(0), nn.CrossEntropyLoss(), whole["ce"], progress=False)
        out["empty: diagonal fisher exact mlp"] = F.diagonal()
        for layer, gram in input_grams(_cnn(), whole["cnn"]).grams.items():
            out[f"empty: gram {layer}"] = gram
        K = kfac_factors(_cnn(), nn.CrossEntropyLoss(), whole["cnn"])
        for layer in K.layers:
            out[f"empty: kfac exact cnn A {layer}"] = K.A[layer]
            out[f"empty: kfac exact cnn B {layer}"] = K.B[layer]
        out["shard list"] = torch.tensor(shard(list(range(5))))
        out["shard dataset"] = torch.tensor(
            [int(x) for (x,) in shard(TensorDataset(torch.arange(5)))]
        )
        # opting out: the shard's own statistic
        F = diagonal_fisher(
            _mlp(0), nn.CrossEntropyLoss(), _batches("ce", r), distributed=False, progress=False
        )
        out["local diagonal fisher"] = F.diagonal()
        torch.save(out, os.path.join(tmp, f"rank{r}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """The results of both ranks (one spawned job for the whole module)."""
    tmp = str(tmp_path_factory.mktemp("distributed"))
    mp.spawn(_worker, args=(tmp,), nprocs=len(SHARDS), join=True)
    return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(len(SHARDS))]


@pytest.fixture(scope="module")
def reference():
    """The statistics of all the data in one process."""
    return _compute(None)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.to(DT), b.to(DT)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.mark.timeout(120)
def test_two_ranks_equal_one_process_on_all_the_data(spawned, reference):
    worst = {}
    for r, results in enumerate(spawned):
        missing = set(reference) - set(results)
        assert not missing, f"rank {r} lacks {sorted(missing)}"
        for key, want in reference.items():
            got = results[key]
            assert got.shape == want.shape, key
            if not want.is_floating_point():
                assert torch.equal(got, want), f"rank {r}: {key} {got} != {want}"
                continue
            err = rel_err(got, want)
            assert err < TOL, f"rank {r}: {key} relative error {err:.2e}"
            worst[key] = max(worst.get(key, 0.0), err)
    # the shards are uneven and their statistics differ: a sum is what makes them equal
    assert int(reference["ggn exact num_data"]) == sum(SHARDS)
    assert int(reference["ggn tokens num_data"]) < 5 * sum(SHARDS)
    print("\nmax relative error over both ranks:")
    for key in sorted(worst):
        print(f"  {key}: {worst[key]:.1e}")


def test_an_empty_shard_adds_nothing(spawned, reference):
    for r, results in enumerate(spawned):
        keys = [k for k in results if k.startswith("empty: ")]
        assert len(keys) == 2 + 3 + 2 * 3  # GGN, Fisher, 3 Grams, 3 layers' K-FAC factors
        for key in keys:
            err = rel_err(results[key], reference[key.removeprefix("empty: ")])
            assert err < TOL, f"rank {r}: {key} relative error {err:.2e}"


def test_helpers_inside_the_job(spawned):
    for r, results in enumerate(spawned):
        assert int(results["rank"]) == r
        assert int(results["world_size"]) == 2
        assert bool(results["is_distributed"])
        assert bool(results["is_main_process"]) == (r == 0)
        f32, i64, f64, bf16, single = (results[f"reduced {i}"] for i in range(5))
        assert f32.dtype == torch.float32 and torch.equal(f32, torch.full((3,), 4.0))
        assert i64.dtype == torch.int64 and torch.equal(i64, torch.tensor([3, 10]))
        assert f64.dtype == DT and torch.equal(f64, torch.full((2, 2), 1.5, dtype=DT))
        assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, torch.tensor([3.0]).bfloat16())
        assert torch.equal(single, torch.tensor([1.0], dtype=DT))
        assert results["shard list"].tolist() == [[0, 2, 4], [1, 3]][r]
        assert results["shard dataset"].tolist() == [[0, 2, 4], [1, 3]][r]


def test_opting_out_keeps_the_shards_own_statistic(spawned):
    for r, results in enumerate(spawned):
        F = diagonal_fisher(_mlp(0), nn.CrossEntropyLoss(), _batches("ce", r), progress=False)
        assert rel_err(results["local diagonal fisher"], F.diagonal()) < 1e-12
        assert (
            rel_err(results["local diagonal fisher"], results["diagonal fisher exact mlp"]) > 0.01
        )


def test_helpers_without_torch_distributed():
    assert not is_distributed()
    assert (rank(), world_size(), is_main_process()) == (0, 1, True)
    t = torch.arange(3.0)
    assert all_reduce_sum(t) is t
    assert torch.equal(t, torch.arange(3.0))
    ts = [torch.ones(2), torch.zeros(1, dtype=torch.int64)]
    assert all_reduce_sum(ts) is ts and torch.equal(ts[0], torch.ones(2))
    assert shard([1, 2, 3]) == [1, 2, 3]
    with pytest.raises(ValueError, match="data is empty"):  # only a shard may be empty
        diagonal_fisher(_mlp(0), nn.CrossEntropyLoss(), [], progress=False)
    model, data = _mlp(0), _batches("ce", None)
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        CurvatureComputer(model, "cross_entropy", data, distributed=True)
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        diagonal_fisher(model, nn.CrossEntropyLoss(), data, distributed=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(180)
def test_the_docs_example_under_torchrun_equals_one_process(tmp_path):
    """docs/distributed.md's script: ``torchrun --nproc-per-node 2`` and a group of one
    process write the same Fisher and merge."""
    doc = (Path(__file__).parents[1] / "docs" / "distributed.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", doc, re.S)
    script = tmp_path / "fisher_merge.py"
    script.write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for name, cmd, extra in (
        (
            "two",
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                "2",
                str(script),
            ],
            {},
        ),
        (
            "one",
            [sys.executable, str(script)],
            {
                "RANK": "0",
                "WORLD_SIZE": "1",
                "LOCAL_RANK": "0",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(_free_port()),
            },
        ),
    ):
        done = subprocess.run(
            cmd, cwd=tmp_path, env={**env, **extra}, capture_output=True, text=True, timeout=150
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("merged in") == 1  # printed on rank 0 only
        runs[name] = torch.load(tmp_path / "merged.pt")
        (tmp_path / "merged.pt").unlink()
    assert set(runs["two"]) == {"fisher", "0.weight", "0.bias", "2.weight", "2.bias"}
    for key, want in runs["one"].items():
        assert rel_err(runs["two"][key], want) < TOL, key


def test_shard_without_a_process_group_is_the_items_themselves(monkeypatch):
    """One process keeps its data object as it is (a data file's batches keep their type
    and attributes); a sequence whose slices are not sequences of batches is not sliced."""
    from collections.abc import Sequence as SequenceABC

    class Batches(SequenceABC):  # like curvmerge.data.files.DataBatches
        def __init__(self, items):
            self.items = list(items)
            self.loss = "cross_entropy"

        def __len__(self):
            return len(self.items)

        def __getitem__(self, index):
            if isinstance(index, slice):
                raise TypeError("no slices")
            return self.items[index]

    batches = Batches([(torch.ones(2, 3), torch.zeros(2)) for _ in range(3)])
    assert shard(batches) is batches
    data = [1, 2, 3]
    assert shard(data) is data
    # on rank 1 of 2: every other item, whatever the sequence (fails on 4b5c17d: a slice)
    import curvmerge.distributed as distributed

    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    assert distributed.shard(batches) == [batches[1]]
    assert distributed.shard(data) == [2]
    assert distributed.shard((1, 2, 3, 4)) == (2, 4)


def test_data_empty_on_every_process_is_refused(tmp_path):
    # one shard may be empty, all of them may not: the Fisher and the GGN said "every target
    # is ignore_index", the Grams and K-FAC "no supported layer ... was called", and a
    # GGN of a sum loss was silently zero (fails on 4a546ce)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1
    )
    try:
        model = _mlp(0)
        ce, ce_sum = nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="sum")
        calls = {
            "diagonal Fisher": lambda: diagonal_fisher(model, ce, [], progress=False),
            "input Grams": lambda: input_grams(model, []),
            "K-FAC": lambda: kfac_factors(model, ce, []),
            "GGN": lambda: GGNOperator(model, ce, []),
            "GGN of a sum": lambda: GGNOperator(model, ce_sum, []),
        }
        for what, call in calls.items():
            with pytest.raises(ValueError, match="data is empty on every process"):
                call()
                pytest.fail(what)
    finally:
        dist.destroy_process_group()


def test_shard_refuses_what_it_cannot_index(monkeypatch):
    # a DataLoader or a generator failed with "'DataLoader' object is not subscriptable"
    # or "object of type 'generator' has no len()" (fails on 985d97b)
    from torch.utils.data import DataLoader

    import curvmerge.distributed as distributed

    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    loader = DataLoader(TensorDataset(torch.arange(6.0), torch.arange(6)), batch_size=2)
    for items in (loader, (b for b in [1, 2, 3])):
        with pytest.raises(TypeError, match="shard needs a list, a tuple, a map-style Dataset"):
            distributed.shard(items)


# ------------------------------------------------------------ rank 0 writes, the others wait
def _writer(r: int, tmp: str) -> None:
    from curvmerge.distributed import MainProcessError, on_main_process
    from curvmerge.experiment import StatisticsStore

    _join_group(r, tmp, timeout=20)
    seen = {}
    try:
        # success: rank 0's value, and no process returns before rank 0 is done
        def slow_write():
            import time

            time.sleep(0.5)
            Path(tmp, "written").write_text("done")
            return 7

        seen["value"] = on_main_process(slow_write)
        seen["file after return"] = Path(tmp, "written").exists()

        # failure on rank 0: raised there, named on every other process (no wait forever)
        def failing_write():
            raise OSError("No space left on device")

        try:
            on_main_process(failing_write)
        except MainProcessError as e:
            seen["failure"] = f"MainProcessError: {e}"
        except OSError as e:
            seen["failure"] = f"OSError: {e}"

        # a site: the experiment's Fisher file, whose folder rank 0 cannot create
        blocker = Path(tmp, "not_a_folder")
        blocker.write_text("a file where the Fisher folder should be")
        store = StatisticsStore(
            [_mlp(0)], [_batches("ce", r)], ["cross_entropy"], ["0.weight"],
            fisher_dir=blocker / "fishers",
        )  # fmt: skip
        try:
            store.diagonal_fishers()
            seen["store"] = "no error"
        except MainProcessError as e:
            seen["store"] = f"MainProcessError: {e}"
        except OSError as e:
            seen["store"] = f"{type(e).__name__}"
    except Exception as e:  # noqa: BLE001 - what a rank saw is the test's evidence
        seen["unexpected"] = f"{type(e).__name__}: {e}"
    finally:
        torch.save(seen, os.path.join(tmp, f"writer{r}.pt"))
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_rank_0_writes_while_the_others_wait_and_its_failure_stops_them_all(tmp_path):
    # rank 0 failing between its write and the barrier left the other ranks waiting at the
    # barrier until the backend's timeout (and then failing with a timeout that named
    # nothing); the experiment's Fisher files are one such site (fails on 149a1b4)
    mp.spawn(_writer, args=(str(tmp_path),), nprocs=len(SHARDS), join=True)
    seen = [torch.load(tmp_path / f"writer{r}.pt") for r in range(2)]
    assert "unexpected" not in seen[0] and "unexpected" not in seen[1], seen
    assert seen[0]["value"] == 7 and seen[1]["value"] is None
    assert seen[1]["file after return"]
    assert seen[0]["failure"] == "OSError: No space left on device"
    assert seen[1]["failure"].startswith("MainProcessError: rank 0 failed")
    assert "No space left on device" in seen[1]["failure"]
    assert seen[0]["store"] in ("FileExistsError", "NotADirectoryError")
    assert seen[1]["store"].startswith("MainProcessError: rank 0 failed"), seen[1]["store"]


# ---------------------------------------------- one process fails in a pass, all stop
def _failing_pass(r: int, tmp: str) -> None:
    from curvmerge.distributed import PeerProcessError

    _join_group(r, tmp, timeout=20)
    seen = {}
    try:
        data = _batches("ce", r)
        if r == 1:  # one bad batch in rank 1's shard only: its forward raises
            data = [*data[:1], (torch.randn(3, 5, dtype=DT), torch.zeros(3, dtype=torch.long))]
        ce = nn.CrossEntropyLoss()
        passes = {
            "diagonal Fisher": lambda: diagonal_fisher(_mlp(0), ce, data, progress=False),
            "input Grams": lambda: input_grams(_mlp(0), data),
            "K-FAC": lambda: kfac_factors(_mlp(0), ce, data),
            "GGN product": lambda: GGNOperator(_mlp(0), ce, data) @ _probe(51),
        }
        for name, call in passes.items():
            try:
                call()
                seen[name] = "no error"
            except PeerProcessError as e:
                seen[name] = f"PeerProcessError: {e}"
            except RuntimeError as e:
                seen[name] = f"own: {type(e).__name__}"
        # the group still works after the failures: a sum of every rank
        seen["after"] = float(all_reduce_sum(torch.tensor([1.0]))[0])
    except Exception as e:  # noqa: BLE001 - what a rank saw is the test's evidence
        seen["unexpected"] = f"{type(e).__name__}: {e}"
    finally:
        torch.save(seen, os.path.join(tmp, f"failing{r}.pt"))
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_a_pass_failing_on_one_process_stops_every_process(tmp_path):
    # a batch that raises in one shard only (bad data, or the exact Fisher's memory check,
    # which is decided batch by batch) left the other process waiting in the pass's sum
    # until the backend's timeout (fails on 149a1b4)
    mp.spawn(_failing_pass, args=(str(tmp_path),), nprocs=len(SHARDS), join=True)
    seen = [torch.load(tmp_path / f"failing{r}.pt") for r in range(2)]
    assert "unexpected" not in seen[0] and "unexpected" not in seen[1], seen
    for name in ("diagonal Fisher", "input Grams", "K-FAC", "GGN product"):
        assert seen[1][name] == "own: RuntimeError", (name, seen[1][name])
        assert seen[0][name].startswith("PeerProcessError: process 1 failed"), (name, seen[0])
    assert seen[0]["after"] == seen[1]["after"] == 2.0
