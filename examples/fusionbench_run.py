"""Make the model pool of ``fusionbench_config.yaml`` and run it with ``curvmerge run``.

FusionBench runs ``fusion_bench method=... modelpool=... taskpool=...`` from YAML files;
curvmerge keeps the whole experiment in one YAML file (``examples/fusionbench_config.yaml``)
and runs it with ``curvmerge run CONFIG.yaml``. This script does what the comment at the top
of that file says, printing each command as it runs it:

1. ``curvmerge finetune`` a base MLP on all ten digits, then one fine-tune per task of the
   configuration's task pool from that base, each with its own head, into the paths the
   configuration's model pool names;
2. ``curvmerge run fusionbench_config.yaml --force``: every registered method, coefficients
   chosen on validation, a table with one row per method (Markdown, CSV, PNG), the report,
   sweeps, merged models and a JSON record in the configuration's ``output_dir``.

Run::

    python examples/fusionbench_run.py                    # into examples/runs/fusionbench
    python examples/fusionbench_run.py --quick            # short fine-tunes (smoke test)
    python examples/fusionbench_run.py --workdir /tmp/fb  # a copy of the YAML, run there

With ``--workdir`` the configuration is copied there unchanged and its relative paths (the
models, ``output_dir``) resolve inside that folder.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "fusionbench_config.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=CONFIG, help="the experiment's YAML file")
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="copy the configuration into this folder and run it there (default: run it "
        "where it is)",
    )
    p.add_argument("--base-task", default="digits", help="task of the base model")
    p.add_argument("--hidden", type=int, default=32, help="width of the MLP's hidden layer")
    p.add_argument("--base-steps", type=int, default=100, help="steps of the base model")
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps per task")
    p.add_argument("--quick", action="store_true", help="short fine-tunes, one thread")
    args = p.parse_args(argv)
    if args.quick:
        args.base_steps, args.steps = min(args.base_steps, 30), min(args.steps, 60)
    return args


def curvmerge_command() -> list[str]:
    """The ``curvmerge`` console script beside this Python, else ``python -m curvmerge``."""
    script = Path(sys.executable).with_name("curvmerge")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "curvmerge"]


def show(argv) -> None:
    print("$ " + shlex.join(["curvmerge", *map(str, argv)]), flush=True)


def finetune(argv: list[str]) -> None:
    """``curvmerge finetune ...``, in this process (one import of torch for all of them)."""
    from curvmerge.cli import main

    argv = ["finetune", *map(str, argv)]
    show(argv)
    status = main(argv)
    if status:
        raise SystemExit(status)


def main(argv=None) -> Path:
    args = parse_args(argv)
    import yaml

    config = args.config.resolve()
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        copy = args.workdir.resolve() / config.name
        if copy != config:
            shutil.copyfile(config, copy)
        config = copy
    env = dict(os.environ)
    if args.quick:
        env["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)
    cfg = yaml.safe_load(config.read_text())
    folder = config.parent

    def path(p: str) -> Path:
        return Path(p) if Path(p).is_absolute() else folder / p

    # 1. the model pool: a base, then one fine-tune per task from it
    base = path(cfg["models"]["base"])
    common = ["--force", "-q"]
    finetune(
        ["--task", args.base_task, "--model", "mlp", "--hidden", args.hidden]
        + ["--steps", args.base_steps, "-o", base, *common]
    )
    for i, (name, model) in enumerate(cfg["models"]["finetuned"].items(), start=1):
        task = cfg["tasks"][name]
        spec = task["data"] if isinstance(task, dict) else task
        finetune(
            ["--task", spec, "--base", base, "--steps", args.steps, "--seed", i]
            + ["-o", path(model), *common]
        )

    # 2. the experiment, exactly as a user types it
    run = ["run", str(config), "--force"]
    show(run)
    status = subprocess.run([*curvmerge_command(), *run], env=env).returncode
    if status:
        raise SystemExit(status)
    out = path(cfg["output_dir"])
    print(f"results: {out / 'results.md'}, {out / 'results.csv'}, {out / 'results.png'}")
    return out


if __name__ == "__main__":
    main()
