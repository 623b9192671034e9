"""Sphinx configuration: MyST Markdown pages, the furo theme and API pages from docstrings.

Build with ``scripts/docs`` (warnings are errors).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

project = "Chancy"
author = "Chancy contributors"
copyright = "Chancy contributors"  # noqa: A001

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = "Chancy"

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
# Optional integrations are documented without installing them (Django 6 needs 3.12+).
autodoc_mock_imports = ["django", "asgiref", "opentelemetry", "fastapi", "pydantic"]
# Names such as ``Job`` exist in several modules (chancy.Job, the rule language's Job):
# an ambiguous cross-reference is not an error in the docs.
suppress_warnings = ["ref.python"]
