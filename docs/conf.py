"""Sphinx configuration of the offline documentation site.

`make docs` (tools/build_docs.py) runs nbdev's notebook processing (show_doc API docs, hidden cells
removed), turns the processed notebooks into Sphinx sources in `_proc/_sphinx/` and renders them with
myst-nb (no execution: the outputs come from the notebooks) into `_site/`. This folder is only the
configuration (`sphinx-build -c docs`); the pages themselves come from `nbs/`.
Everything the site loads is local: the furo theme and MathJax 3 from the `sphinx-mathjax-offline` wheel.
"""
from __future__ import annotations

import configparser
from pathlib import Path

import sphinx

_root = Path(__file__).resolve().parent.parent
_ini = configparser.ConfigParser()
_ini.read(_root / "settings.ini")
_cfg = _ini["DEFAULT"]

project = _cfg.get("title", _cfg.get("lib_name", "xmretrieval"))
author = _cfg.get("author", "")
copyright = _cfg.get("copyright", author)
release = version = _cfg.get("version", "")

extensions = [
    "myst_nb",
    "sphinx-mathjax-offline",  # vendored MathJax 3 (module name has hyphens; copies it into _static/mathjax)
]

# Notebooks only: the markdown pages come from notebooks too.
source_suffix = {".ipynb": "myst-nb"}
root_doc = "index"
exclude_patterns = ["_build", "**.ipynb_checkpoints"]

# ---- MyST / myst-nb ---------------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist", "substitution"]
myst_dmath_double_inline = True          # `$$...$$` inside a paragraph is display math, as in Jupyter
myst_heading_anchors = 4                 # `[text](page.ipynb#a-heading)` links resolve
nb_execution_mode = "off"                # outputs come from the notebooks and nbdev's show_doc processing
nb_output_stderr = "remove"              # warnings and progress bars are noise on a web page
nb_merge_streams = True
nb_ipywidgets_js = {}                    # never load widget JS from a CDN
nb_render_markdown_format = "myst"       # markdown outputs may contain math
suppress_warnings = ["myst.header", "mystnb.unknown_mime_type", "misc.highlighting_failure"]

# MathJax 3 (vendored): `textmacros` so that `\text{text\_to\_visual}` shows underscores as in Jupyter/Quarto.
# Sphinx >= 9 writes `mathjax4_config`, older ones `mathjax3_config`; the object is the same for MathJax 3.
_mathjax = {"loader": {"load": ["[tex]/textmacros"]}, "tex": {"packages": {"[+]": ["textmacros"]}}}
if int(sphinx.__version__.split(".")[0]) >= 9:
    mathjax4_config = _mathjax
else:
    mathjax3_config = _mathjax

# ---- HTML -------------------------------------------------------------------------------------------
html_theme = "furo"
html_title = project
html_static_path = ["_static"]
html_css_files = ["xmr.css"]
html_copy_source = False
html_show_sourcelink = False
html_last_updated_fmt = None
html_theme_options = {
    "navigation_with_keys": True,
    "top_of_page_buttons": [],
}
# pages are opened from disk too (file://): link to page.html, not to folders
html_file_suffix = ".html"
