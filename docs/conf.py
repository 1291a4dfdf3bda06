"""Sphinx configuration: MyST Markdown, as Jupyter projects do."""
from chspawner import __version__

project = "chspawner"
author = "chspawner developers"
release = version = __version__
extensions = ["myst_parser", "sphinx.ext.autodoc"]
source_suffix = {".md": "markdown"}
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3
exclude_patterns = ["_build"]
autodoc_member_order = "bysource"
html_theme = "alabaster"
