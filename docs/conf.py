"""Sphinx configuration for the qsgd_optax documentation.

Build (from the repository root, with the ``docs`` extra installed):

    sphinx-build -W --keep-going -b html docs docs/_build/html
"""

import importlib.metadata
import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "qsgd_optax"
author = "The qsgd_optax authors"
copyright = "2026, The qsgd_optax authors"  # noqa: A001
try:
  release = importlib.metadata.version("qsgd_optax")
except importlib.metadata.PackageNotFoundError:
  release = "0.0.0+local"
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = f"qsgd_optax {release}"
