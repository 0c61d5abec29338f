"""The ``curvmerge`` command: fine-tune, compute Fishers, merge, evaluate, sweep, compare, run.

The subcommands mirror the workflow::

    curvmerge finetune --task digits --model mlp --steps 200 --output base.safetensors
    curvmerge finetune --task digits:0,1,2,3,4 --base base.safetensors --output a.safetensors
    curvmerge finetune --task digits:5,6,7,8,9 --base base.safetensors --output b.safetensors
    curvmerge fisher a.safetensors b.safetensors -o a.fisher.safetensors b.fisher.safetensors
    curvmerge merge a.safetensors b.safetensors --method fisher_diagonal \\
        --fisher a.fisher.safetensors b.fisher.safetensors --output merged.safetensors
    curvmerge eval a.safetensors b.safetensors --body merged.safetensors
    curvmerge sweep a.safetensors b.safetensors --fisher a.fisher.safetensors \\
        b.fisher.safetensors --output results/sweep
    curvmerge compare a.safetensors b.safetensors --base base.safetensors --output results/cmp
    curvmerge run experiment.yaml   # a whole experiment from one configuration
    curvmerge demo                  # MNIST-5k, every method, under 3 minutes on 2 cores
    curvmerge demo --text           # MiniLM on three text tasks

and take Hugging Face models with data files as well::

    curvmerge fisher models/a models/b --data a.csv b.csv -o fa.safetensors fb.safetensors
    curvmerge merge models/a models/b -m fisher_diagonal --fisher fa.safetensors \\
        fb.safetensors -o merged/         # one Hugging Face folder per task head

Checkpoints are safetensors files written by ``finetune``: the header records the model
architecture and the task, so later commands rebuild the model without pickles and know
which data to use. A model argument may also be a Hugging Face model folder or hub id
(:func:`curvmerge.hf.load_model`); its data come from ``--data`` files
(:mod:`curvmerge.data.files`), and the loss from the data (token-level cross-entropy for
causal LMs). Each subcommand is a module of :mod:`curvmerge.commands`.

Under ``torchrun`` (``WORLD_SIZE`` > 1), ``run``, ``compare``, ``fisher`` and ``merge``
initialise the process group themselves (NCCL with one GPU per process when CUDA is available, gloo
otherwise): each process computes its shard of the statistics, and only rank 0 prints and
writes files (``docs/distributed.md``); the other commands refuse to run there.

Errors a user can fix (missing or corrupt files, mismatched architectures, a missing
column, a label the model does not have, bad options) print one line
``curvmerge: error: <message>`` and exit with status 2; failures while running exit with
status 1. Every output is written atomically and an existing output is only replaced with
``--force``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator, Sequence

from curvmerge.commands import COMMANDS
from curvmerge.commands import verify as verify_command
from curvmerge.commands.common import PROG, CLIError, CLIRuntimeError

__all__ = ["main", "build_parser", "CLIError", "CLIRuntimeError"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``curvmerge`` command."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Merge neural networks with curvature. Models are checkpoints written "
        "by 'curvmerge finetune' or Hugging Face model folders and hub ids (with --data "
        "files); every output is written atomically and kept unless --force is given. "
        "Exit status: 0 ok, 2 bad input, 1 failure while running.",
        epilog="Run 'curvmerge <command> --help' for the options of a command.",
    )
    parser.add_argument(
        "--traceback",
        action="store_true",
        help="show the Python traceback of errors (for bug reports)",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _input_errors() -> tuple[type[BaseException], ...]:
    from curvmerge.io import CheckpointError
    from curvmerge.merging.registry import UnknownMethodError
    from curvmerge.space import SpaceMismatchError

    return (
        CLIError,
        CheckpointError,
        UnknownMethodError,
        SpaceMismatchError,
        ValueError,
        FileNotFoundError,
        FileExistsError,
    )


#: Commands that read data files: their error messages name flags (or, for ``run``, the
#: configuration's keys) instead of the data library's Python arguments.
_DATA_COMMANDS = ("fisher", "merge", "eval", "sweep", "compare", "run")


#: Commands that run on several processes under ``torchrun`` (statistics summed over the
#: processes, files written by rank 0).
DISTRIBUTED_COMMANDS = ("run", "compare", "fisher", "merge")


@contextlib.contextmanager
def _process_group(args: argparse.Namespace) -> Iterator[None]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1): a process group for the command (NCCL on this
    process's GPU when CUDA is available, gloo otherwise; one already initialised is used as
    it is), every process but rank 0 quiet, and the group destroyed when the command ends."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        yield
        return
    if args.command not in DISTRIBUTED_COMMANDS:
        raise CLIError(
            f"'{args.command}' runs in one process; under torchrun (WORLD_SIZE={world}) only "
            f"{', '.join(DISTRIBUTED_COMMANDS[:-1])} and {DISTRIBUTED_COMMANDS[-1]} run, "
            "their statistics summed over the processes"
        )
    import torch
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    elif owned:
        dist.init_process_group("gloo")
    try:
        if dist.get_rank() != 0:  # rank 0 prints progress and the results
            args.quiet = True
        yield
    finally:
        if owned:
            dist.destroy_process_group()


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.strip().splitlines() if part.strip())


def _verify_argv(argv: Sequence[str]) -> list[str] | None:
    """The arguments after ``verify`` (every one goes to the report's own parser, --help
    included), or ``None`` for any other command."""
    args = list(argv)
    i = 0
    while i < len(args) and args[i] == "--traceback":
        i += 1
    if i < len(args) and args[i] == "verify":
        return args[i + 1 :]
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``curvmerge`` command; returns the exit status."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    verify_args = _verify_argv(argv)
    if verify_args is not None:
        args = argparse.Namespace(
            command="verify",
            traceback="--traceback" in argv[: argv.index("verify")],
            verify_args=verify_args,
            func=verify_command.run,
        )
    else:
        args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        with _process_group(args):
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BaseException as err:  # noqa: BLE001 - turned into a message and an exit status
        if isinstance(err, SystemExit):
            raise
        if args.traceback:
            raise
        message = _one_line(str(err)) or type(err).__name__
        if args.command in _DATA_COMMANDS:  # the library's argument names as flags
            from curvmerge.commands.common import flag_message

            message = flag_message(message, args.command)
        if isinstance(err, _input_errors()):
            print(f"{PROG}: error: {message}", file=sys.stderr)
            return 2
        print(f"{PROG}: error: {type(err).__name__}: {message}", file=sys.stderr)
        print(f"{PROG}: (run with --traceback for details)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
