"""Curvature computers: run a model over data and return statistics as tensors.

Nothing here imports :mod:`curvmerge.operators`: operators (the GGN operator, the diagonal
Fisher) wrap what these computers return, so the arrows point one way.
"""

from curvmerge.statistics.files import GRAMS_FORMAT, load_grams, save_grams
from curvmerge.statistics.gram import LayerGrams, input_grams
from curvmerge.statistics.kfac import KFACFactors, kfac_factors
from curvmerge.statistics.layers import LayerInfo, find_layers

__all__ = [
    # per-layer statistics (RegMean, K-FAC)
    "LayerInfo",
    "find_layers",
    "LayerGrams",
    "input_grams",
    "save_grams",
    "load_grams",
    "GRAMS_FORMAT",
    "KFACFactors",
    "kfac_factors",
]
