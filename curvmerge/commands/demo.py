"""``curvmerge demo``: the embedded demos (MNIST-5k digit subsets; ``--text``: MiniLM),
run through the experiment runner (:func:`curvmerge.demo.compare_methods`)."""

from __future__ import annotations

import time
from pathlib import Path

from curvmerge.commands.common import add_common, check_outputs, log, quick


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="run the embedded demo (MNIST-5k; --text: MiniLM)",
        description="Fine-tune task models from one base, merge them with every "
        "method through the experiment runner, print the tables of test accuracy and "
        "macro-F1 and write Markdown, CSV, PNG and JSON. Default: MNIST-5k digit subsets "
        "with a small CNN (under 3 minutes on 2 cores). --text: all-MiniLM-L6-v2 on Rotten "
        "Tomatoes, airline and deflategate (about 10 minutes).",
    )
    p.add_argument("--text", action="store_true", help="run the MiniLM three-task demo")
    p.add_argument("--quick", action="store_true", help="a reduced vision run (smoke test)")
    p.add_argument(
        "--exact",
        action="store_true",
        help="with --text: include the exact-Fisher merge (slow on a CPU)",
    )
    p.add_argument("--no-exact", action="store_true", help="vision: leave out the exact Fisher")
    p.add_argument("--steps", type=int, help="with --text: fine-tuning steps per task (150)")
    p.add_argument(
        "--threads", type=int, help="torch CPU threads (vision default 1: fastest on shared cores)"
    )
    p.add_argument(
        "--output-dir", default="demo_out", help="folder for the outputs (default demo_out)"
    )
    add_common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from curvmerge.demo import format_report, run_text_demo, run_vision_demo

    is_quick = args.quick or (quick() and not args.text)
    stem = "minilm" if args.text else ("digits_quick" if is_quick else "mnist")
    out = Path(args.output_dir)
    check_outputs([out / f"{stem}{s}" for s in (".md", ".csv", ".png")], args.force)
    say = None if args.quiet else (lambda m: log(args, m))
    start = time.perf_counter()
    if args.text:
        kwargs = {"steps": args.steps} if args.steps else {}
        res = run_text_demo(
            out, exact=args.exact, progress=not args.quiet, log=say, threads=args.threads, **kwargs
        )
        title = "MiniLM, three text tasks"
    else:
        methods = None
        if args.no_exact:
            from curvmerge.demo import ALL_METHODS

            methods = [m for m in ALL_METHODS if m != "fisher_exact"]
        res = run_vision_demo(
            out,
            quick=is_quick,
            progress=not args.quiet,
            log=say,
            threads=args.threads or 1,
            **({"methods": methods} if methods else {}),
        )
        title = "MNIST-5k, three digit-subset tasks, small CNN"
    print(format_report(res, title), end="")
    print(
        f"wall time {time.perf_counter() - start:.1f} s; wrote "
        + ", ".join(str(p) for p in res.paths.values())
    )
    return 0
