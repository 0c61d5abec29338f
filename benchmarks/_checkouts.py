"""Modules of another checkout (e.g. a ``git worktree`` of an earlier commit), timed side by
side with this checkout's in one run."""

from __future__ import annotations

import importlib.util
import os
import sys


def load_old_module(path: str, name: str, *parts: str):
    """The module at ``path/parts...`` under the name ``name`` (its imports of ``curvmerge``
    resolve to this checkout)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(path, *parts))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module
