"""Verification: how far the diagonal Fisher is from the exact one, and what that does to a
merge.

Building blocks work on any operator of the protocol and return plain dataclasses:

- stochastic estimators with error bars (:mod:`~curvmerge.verify.estimators`): diagonal by
  Hutchinson, Diag++ and XDiag; trace by Hutchinson and Hutch++; Frobenius norm;
- exact diagonals and diagonal comparisons (:mod:`~curvmerge.verify.diagonal`);
- the off-diagonal share :math:`\\|F - \\operatorname{diag}F\\|_F / \\|F\\|_F`, per layer
  (:mod:`~curvmerge.verify.share`);
- top eigenvalues, trace and effective ranks (:mod:`~curvmerge.verify.spectrum`);
- where task vectors lie in a Fisher's spectrum (:mod:`~curvmerge.verify.directions`);
- merge-level comparisons (:mod:`~curvmerge.verify.merges`).

:func:`run_verification` runs them all on task models, :func:`write_report` writes the
Markdown report with plots, and ``python -m curvmerge.verify --out DIR`` does both for the
MNIST CNN three-task problem.
"""

from curvmerge.verify.diagonal import (
    DiagonalComparison,
    compare_diagonals,
    exact_diagonal,
    mc_diagonal,
)
from curvmerge.verify.directions import DirectionShare, direction_share
from curvmerge.verify.estimators import (
    DIAGONAL_METHODS,
    TRACE_METHODS,
    Z_SCORE,
    DiagonalEstimate,
    Estimate,
    estimate_diagonal,
    estimate_frobenius_norm,
    estimate_trace,
)
from curvmerge.verify.merges import (
    MergeComparison,
    MethodOutcome,
    compare_merges,
    evaluate_classifier,
)
from curvmerge.verify.report import render_markdown, write_report
from curvmerge.verify.run import (
    TaskVerification,
    VerificationResult,
    ggn_operator,
    run_verification,
)
from curvmerge.verify.share import (
    DiagonalShare,
    diagonal_share,
    estimate_diagonal_share,
    exact_diagonal_share,
)
from curvmerge.verify.spectrum import Spectrum, effective_ranks, spectrum, top_eigenpairs

__all__ = [
    # estimators with error bars
    "Z_SCORE",
    "Estimate",
    "DiagonalEstimate",
    "estimate_diagonal",
    "estimate_trace",
    "estimate_frobenius_norm",
    "DIAGONAL_METHODS",
    "TRACE_METHODS",
    # diagonals
    "exact_diagonal",
    "compare_diagonals",
    "DiagonalComparison",
    "mc_diagonal",
    # off-diagonal share
    "DiagonalShare",
    "diagonal_share",
    "exact_diagonal_share",
    "estimate_diagonal_share",
    # spectra
    "Spectrum",
    "spectrum",
    "top_eigenpairs",
    "effective_ranks",
    # task vectors
    "DirectionShare",
    "direction_share",
    # merges
    "MergeComparison",
    "MethodOutcome",
    "compare_merges",
    "evaluate_classifier",
    # end to end
    "run_verification",
    "VerificationResult",
    "TaskVerification",
    "ggn_operator",
    "write_report",
    "render_markdown",
    "run_mnist_report",
    "main",
]


def run_mnist_report(out_dir, **kwargs):
    """Train the MNIST CNN three-task problem, verify it and write the report (see
    :mod:`curvmerge.verify.__main__`); returns ``(report_path, result)``."""
    from curvmerge.verify.__main__ import run_mnist_report as _run

    return _run(out_dir, **kwargs)


def main(argv=None) -> int:
    """Entry point of ``curvmerge verify`` / ``python -m curvmerge.verify``."""
    from curvmerge.verify.__main__ import main as _main

    return _main(argv)
