"""Curvature statistics: the diagonal Fisher engine and Fisher files.

Computers here return statistics wrapped in operators from :mod:`curvmerge.operators`.
"""

from curvmerge.fisher.diagonal import FISHER_KINDS, DiagonalFisher, diagonal_fisher
from curvmerge.fisher.files import load_fisher, save_fisher

__all__ = [
    "diagonal_fisher",
    "DiagonalFisher",
    "FISHER_KINDS",
    "save_fisher",
    "load_fisher",
]
