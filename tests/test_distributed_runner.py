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


# ---------------------------------------------------------------------------- the commands
SUBSETS = ((0, 1, 2), (3, 4, 5))
HIDDEN = (16,)
METHODS = [
    {"method": "task_arithmetic", "grid": {"scaling": [0.5, 1.0]}},
    {"method": "fisher_diagonal", "grid": {"damping": [1e-4, 1e-2]}},
    {"method": "fisher_exact", "grid": {"damping": [1e-1, 1e-2]}, "options": {"maxiter": 8}},
    "fisher_kfac",
    "regmean",
    {"method": "regmean_plus_plus", "grid": [{"alpha": 0.9}]},
]
COMPARE_METHODS = "task_arithmetic,fisher_diagonal,regmean"
#: CG stopped at 8 iterations far from convergence: in float32 the merge moves by a few
#: percent when the sums' order changes, even in one process; these rows' losses and F1 are
#: compared loosely, and in float64 (below) to 1e-6
FRAGILE = ("fisher_exact",)


def _checkpoints(folder) -> list[str]:
    """A base and two fine-tuned digits MLPs (3 classes each), saved as checkpoints."""
    from curvmerge.data import digit_subset_tasks, pooled_digits
    from curvmerge.io import save_checkpoint
    from curvmerge.models import make_mlp
    from curvmerge.train import finetune

    folder.mkdir(parents=True, exist_ok=True)
    tasks = digit_subset_tasks("digits", SUBSETS)
    spec = {"kind": "mlp", "in_features": 64, "hidden": list(HIDDEN)}
    base = make_mlp(64, 10, hidden=HIDDEN, seed=0)
    finetune(base, pooled_digits(tasks), steps=20, lr=1e-2, progress=False)
    meta = {"model": {**spec, "num_classes": 10}, "task": "digits"}
    paths = [save_checkpoint(base, folder / "base.safetensors", metadata=meta)]
    body = {k: v for k, v in base.state_dict().items() if not k.startswith("head.")}
    for i, (subset, task) in enumerate(zip(SUBSETS, tasks, strict=True)):
        model = make_mlp(64, 3, hidden=HIDDEN, seed=i + 1)
        model.load_state_dict(body, strict=False)
        finetune(model, task.train, steps=15, lr=1e-2, seed=i, progress=False)
        paths.append(
            save_checkpoint(
                model,
                folder / f"{task.name}.safetensors",
                metadata={
                    "model": {**spec, "num_classes": 3},
                    "task": "digits:" + ",".join(map(str, subset)),
                },
            )  # fmt: skip
        )
    return [str(p) for p in paths]


def _commands(tmp, checkpoints: list[str], where: str) -> list[list[str]]:
    """``curvmerge run`` of a configuration, ``curvmerge compare``, and the run again (its
    Fisher files reused), writing into ``tmp/where``."""
    import yaml

    base, *models = checkpoints
    config = {
        "title": "digits on several processes",
        "output_dir": f"{where}/run",
        "models": {"base": base, "finetuned": {f"t{i}": m for i, m in enumerate(models)}},
        "tasks": {
            f"t{i}": {"data": "digits:" + ",".join(map(str, s))} for i, s in enumerate(SUBSETS)
        },  # fmt: skip
        "methods": METHODS,
        "fisher": {"examples": 72, "batch_size": 16},  # 5 batches: uneven shards (3 and 2)
        "exact": {"examples": 48},
    }
    path = tmp / f"{where}.yaml"
    path.write_text(yaml.safe_dump(config))
    compare = [*models, "--base", base, "--methods", COMPARE_METHODS, "--examples", "72",
               "--batch-size", "16", "--output", str(tmp / where / "cmp" / "cmp")]  # fmt: skip
    return [["run", str(path)], ["compare", *compare], ["run", str(path), "--force"]]


def _is_write(event: str, args: tuple) -> list[str]:
    """The paths an audit event writes, creates, renames or removes."""
    if event == "open":
        path, mode, flags = args
        if not isinstance(path, (str, bytes, os.PathLike)):
            return []
        if mode is not None:
            return [os.fspath(path)] if any(c in str(mode) for c in "wax+") else []
        return [os.fspath(path)] if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) else []
    if event == "os.rename":
        return [os.fspath(args[0]), os.fspath(args[1])]
    if event in ("os.mkdir", "os.remove", "os.rmdir"):
        return [os.fspath(args[0])]
    return []


def _float64_experiment(config: str):
    """The configuration's statistics methods in float64, through ``run_experiment``."""
    from curvmerge.data import TensorSplit
    from curvmerge.experiment import ModelPool, Settings, TaskData, load_config, run_experiment

    exp = load_config(config)

    def wide(split):
        return TensorSplit(split.inputs.double(), split.labels)

    tasks = [TaskData(t.name, wide(t.train), wide(t.val), wide(t.test)) for t in exp.tasks]
    pool = ModelPool(
        [m.double() for m in exp.pool.models], base=exp.pool.base.double(), params=exp.pool.params
    )
    settings = Settings(**{**vars(exp.settings), "fisher_dir": None})
    methods = [m for m in METHODS if isinstance(m, str) or m["method"] != "task_arithmetic"]
    return run_experiment(pool, tasks, methods, settings=settings)


def _count_batches() -> dict[str, list[int]]:
    """Record the number of batches each statistic of the store is computed on."""
    import curvmerge.experiment.statistics as store
    import curvmerge.operators.ggn as ggn

    seen: dict[str, list[int]] = {}

    def counting(name, fn):
        def wrapped(model, *args, **kwargs):
            data = args[1] if name != "input_grams" else args[0]
            seen.setdefault(name, []).append(len(data))
            return fn(model, *args, **kwargs)

        return wrapped

    for name in ("diagonal_fisher", "kfac_factors", "input_grams"):
        setattr(store, name, counting(name, getattr(store, name)))

    class Counting(ggn.GGNOperator):
        def __init__(self, model, loss, data, **kwargs):
            seen.setdefault("ggn", []).append(len(data))
            super().__init__(model, loss, data, **kwargs)

    ggn.GGNOperator = Counting
    return seen


def _command_job(r: int, tmp: str, commands: list[list[str]], ports: list[int]) -> dict:
    """Each command through ``curvmerge.cli.main`` as under ``torchrun`` (its environment:
    the command makes the process group), recording what this rank printed and wrote."""
    import contextlib
    import io
    import sys

    from curvmerge.cli import main

    out_dir = os.path.join(tmp, "two")
    writes: list[str] = []

    def hook(event, args):
        for path in _is_write(event, args):
            path = str(path)
            if os.path.abspath(path).startswith(out_dir):
                writes.append(f"{event} {path}")

    sys.addaudithook(hook)
    seen = _count_batches()
    runs = []
    for argv, port in zip(commands, ports, strict=True):
        env = {"RANK": r, "LOCAL_RANK": r, "WORLD_SIZE": WORLD, "MASTER_PORT": port}
        os.environ.update({k: str(v) for k, v in env.items()}, MASTER_ADDR="127.0.0.1")
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            status = main(argv)
        runs.append({"status": status, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()})
        runs[-1]["group after"] = dist.is_initialized()
    out = {"runs": runs, "writes": writes, "batches": {k: list(v) for k, v in seen.items()}}
    _group(r, tmp)
    try:
        res = _float64_experiment(commands[0][1])
        out.update(float64_metrics=res.metrics, float64_choices=res.choices,
                   float64_merged=res.merged)  # fmt: skip
    finally:
        dist.destroy_process_group()
    return out


def _free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _files(folder) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.timeout(240)
def test_run_and_compare_on_two_processes_equal_one_process(tmp_path):
    import json
    import time

    from curvmerge.cli import main
    from curvmerge.io import load_params

    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        checkpoints = _checkpoints(tmp_path / "ckpt")
        one = _commands(tmp_path, checkpoints, "one")
        for argv in one[:2]:
            assert main(["--traceback", *argv, "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    two = _commands(tmp_path, checkpoints, "two")
    ranks = _spawn(_command_job, str(tmp_path), two, _free_ports(len(two)))

    main_runs, other = ranks[0]["runs"], ranks[1]["runs"]
    for r, runs in enumerate((main_runs, other)):
        for run in runs:
            assert run["status"] == 0, (r, run["stderr"][-2000:])
            assert not run["group after"]  # the command destroyed the group it made
    # rank 0 prints the tables and writes every file; rank 1 prints and writes nothing
    assert "| task_arithmetic" in main_runs[0]["stdout"]
    assert "wrote" in main_runs[1]["stdout"]
    assert "[curvmerge]" in main_runs[0]["stderr"]  # progress lines
    assert all(run["stdout"] == "" for run in other)
    assert all("[curvmerge]" not in run["stderr"] for run in other)
    assert ranks[1]["writes"] == []
    # each rank computed its shard: 5 statistics batches (3 of them for the GGN) per model
    # in each run (2 models), 5 per model's Fisher and Grams in compare; the rerun reused
    # the Fisher files on both ranks (and computed the rest again)
    shards = {"diagonal_fisher": [3, 2], "kfac_factors": [3, 2], "input_grams": [3, 2],
              "ggn": [2, 1]}  # fmt: skip
    calls = {"diagonal_fisher": 4, "kfac_factors": 4, "input_grams": 6, "ggn": 4}
    for name, sizes in shards.items():
        for r in range(WORLD):
            assert ranks[r]["batches"][name] == [sizes[r]] * calls[name], (name, r)
    assert main_runs[2]["stderr"].count("reused") == 2
    assert any("/fishers/" in w for w in ranks[0]["writes"])
    assert any("/merged/" in w for w in ranks[0]["writes"])
    for what in ("run", "cmp"):
        assert _files(tmp_path / "two" / what) == _files(tmp_path / "one" / what)

    # the same tables and choices as one process
    for what, record in (("run", "run/results.json"), ("cmp", "cmp/cmp.json")):
        got = json.loads((tmp_path / "two" / record).read_text())
        want = json.loads((tmp_path / "one" / record).read_text())
        assert got["choices"] == want["choices"], what
        _same_metrics(got["metrics"], want["metrics"], fragile=1e-2)
    # the merged parameters (float32 statistics summed in another order)
    errors = {}
    for path in sorted((tmp_path / "one" / "run" / "merged").iterdir()):
        want = load_params(path)
        got = load_params(tmp_path / "two" / "run" / "merged" / path.name)
        errors[path.stem] = max(_rel_err(got[n], p) for n, p in want.items())
        assert errors[path.stem] < (0.1 if path.stem in FRAGILE else 1e-4), errors
    # in float64 the same merges (the unconverged CG included) to 1e-6, on both ranks
    torch.set_num_threads(1)
    try:
        want = _float64_experiment(two[0][1])
    finally:
        torch.set_num_threads(threads)
    float64 = {}
    for got in ranks:
        assert got["float64_choices"] == want.choices
        _same_metrics(got["float64_metrics"], want.metrics, fragile=1e-6)
        for label, params in want.merged.items():
            err = max(_rel_err(got["float64_merged"][label][n], p) for n, p in params.items())
            float64[label] = max(err, float64.get(label, 0.0))
    assert max(float64.values()) < 1e-6, float64
    print(f"\nfloat32 merges, relative difference: {errors}")
    print(f"float64 merges, relative difference: {float64}")
    print(f"one and two processes: {time.perf_counter() - start:.1f} s")


def _same_metrics(got: dict, want: dict, fragile: float) -> None:
    """Accuracies, counts and predicted classes equal; other numbers to 1e-6 (``fragile``
    for the rows of :data:`FRAGILE`)."""
    assert set(got) == set(want)
    for row, tasks in want.items():
        for task, metrics in tasks.items():
            rel = fragile if row in FRAGILE else 1e-6
            for key, value in metrics.items():
                if key in ("accuracy", "n", "predicted_class"):
                    assert got[row][task][key] == value, (row, task, key)
                elif isinstance(value, float) and value == value:
                    assert got[row][task][key] == pytest.approx(value, rel=rel, abs=1e-9), (
                        row, task, key,
                    )  # fmt: skip


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def test_other_commands_refuse_to_run_under_torchrun(monkeypatch, capsys):
    from curvmerge.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["methods"]) == 2
    err = capsys.readouterr().err
    assert (
        "'methods' runs in one process; under torchrun (WORLD_SIZE=2) only run, compare, "
        "fisher and merge run" in err
    )
    assert not dist.is_initialized()


def _cli_job(r: int, tmp: str, commands: list[list[str]], ports: list[int]) -> list[dict]:
    """Each command through ``curvmerge.cli.main`` as under ``torchrun``."""
    import contextlib
    import io

    from curvmerge.cli import main

    runs = []
    for argv, port in zip(commands, ports, strict=True):
        env = {"RANK": r, "LOCAL_RANK": r, "WORLD_SIZE": WORLD, "MASTER_PORT": port}
        os.environ.update({k: str(v) for k, v in env.items()}, MASTER_ADDR="127.0.0.1")
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            status = main(argv)
        runs.append({"status": status, "stdout": stdout.getvalue()})
    return runs


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_fisher_and_merge_commands_on_two_processes_equal_one_process(tmp_path, kind):
    """``fisher``: each process computes the Fisher of its share of the batches (3 and 2 of
    5), the sums are the one-process Fisher; ``merge`` with statistics from data (K-FAC,
    RegMean, exact Fisher): the one-process merge; rank 0 alone writes and prints."""
    from curvmerge.cli import main
    from curvmerge.fisher import load_fisher
    from curvmerge.io import load_params

    base, *models = _checkpoints(tmp_path / "ckpt")
    data = ["--examples", "72", "--batch-size", "16", "--quiet", "--force"]
    # float32 checkpoints: the sums' order differs between one and two processes, and the
    # CG merges amplify that rounding (at damping 0.1; at 1e-3 float32 CG itself is fragile)
    merges = {"fisher_kfac": 1e-3, "regmean": 1e-5, "fisher_exact": 1e-3}

    def commands(where):
        fishers = [str(tmp_path / where / f"f{i}.safetensors") for i in range(len(models))]
        out = [["fisher", *models, "-o", *fishers, "--kind", kind, *data]]
        for method in merges if kind == "exact" else ():
            path = str(tmp_path / where / f"{method}.safetensors")
            damping = ["--damping", "0.1"] if method != "regmean" else []
            out.append(
                ["merge", *models, "-m", method, "--base", base, "-o", path, *damping, *data]
            )
        return out

    one = commands("one")
    for argv in one:
        assert main(argv) == 0
    two = commands("two")
    ranks = _spawn(_cli_job, str(tmp_path), two, _free_ports(len(two)))
    for r, runs in enumerate(ranks):
        assert [run["status"] for run in runs] == [0] * len(two)
        for run in runs:
            assert (run["stdout"] != "") == (r == 0)  # rank 0 alone prints
    for a, b in zip(one[0][one[0].index("-o") + 1 :], two[0][two[0].index("-o") + 1 :]):
        if a.startswith("--"):
            break
        Fa, Fb = load_fisher(a), load_fisher(b)
        assert Fa.num_examples == Fb.num_examples == 72
        assert float(Fa.diagonal().abs().max()) > 0
        assert _rel_err(Fb.diagonal(), Fa.diagonal()) < 1e-6
    for k, method in enumerate(merges if kind == "exact" else (), start=1):
        pa, pb = (
            load_params(one[k][one[k].index("-o") + 1]),
            load_params(two[k][two[k].index("-o") + 1]),
        )
        for name in pa:
            assert _rel_err(pb[name], pa[name]) < merges[method], (method, name)
