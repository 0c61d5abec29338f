"""Curvature computers: run a model over data and return statistics as tensors.

Nothing here imports :mod:`curvmerge.operators`: operators (the GGN operator, the diagonal
Fisher) wrap what these computers return, so the arrows point one way.
"""
