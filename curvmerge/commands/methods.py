"""``curvmerge methods``: the method registry as a Markdown table."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "methods",
        help="list the merging methods",
        description="Print the method registry as a Markdown table: each method, what it "
        "needs (statistics, a base model), its coefficient grid and its reference.",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from curvmerge.merging.registry import methods_table

    print(methods_table())
    return 0
