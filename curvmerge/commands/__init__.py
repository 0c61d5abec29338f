"""The ``curvmerge`` command's subcommands, one module each.

Each module has ``add_parser(subparsers)`` (its options and help) and ``run(args) -> int``;
:mod:`curvmerge.commands.common` holds what they share (errors, data and model options,
loading checkpoints and Hugging Face models with their data files). The entry point is
:func:`curvmerge.cli.main`.
"""

from curvmerge.commands import (
    compare,
    demo,
    eval,
    finetune,
    fisher,
    merge,
    methods,
    run,
    sweep,
    verify,
)

#: The subcommands in the order ``curvmerge --help`` lists them.
COMMANDS = (finetune, fisher, merge, eval, sweep, compare, run, demo, methods, verify)

__all__ = ["COMMANDS"]
