"""``curvmerge verify``: the diagonal vs exact Fisher report of :mod:`curvmerge.verify`.

Every argument after ``verify`` (``--help`` included) goes to the report's own parser
(:func:`curvmerge.verify.__main__.main`, named ``curvmerge verify`` in its usage lines);
:func:`curvmerge.cli.main` hands them over before its own parser sees them.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from curvmerge.commands.common import CLIError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "verify",
        help="diagonal vs exact Fisher report (curvmerge.verify)",
        description="Run the verification report; arguments are passed to "
        "'python -m curvmerge.verify' (try 'curvmerge verify --help').",
        add_help=False,
    )
    p.add_argument("verify_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def main(argv: Sequence[str]) -> int:
    """Run the report with ``argv`` (its own options)."""
    import importlib.util

    if importlib.util.find_spec("curvmerge.verify.__main__") is None:
        raise CLIError("this installation has no verification report (curvmerge.verify)")
    from curvmerge.verify.__main__ import main as verify_main

    return int(verify_main(list(argv), prog="curvmerge verify") or 0)


def run(args) -> int:
    return main(args.verify_args)
