"""Sphinx configuration for curvmerge (built with ``make docs``, warnings as errors)."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")

project = "curvmerge"
author = "curvmerge developers"
copyright = "2026, curvmerge developers"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.intersphinx",
    "sphinx_gallery.gen_gallery",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}

autosummary_generate = True
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
nitpicky = False

intersphinx_mapping = {}

sphinx_gallery_conf = {
    "examples_dirs": "../gallery",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "download_all_examples": False,
    "remove_config_comments": True,
}

exclude_patterns = ["_build", "**.ipynb_checkpoints"]
html_theme = "alabaster"
suppress_warnings = ["config.cache"]
