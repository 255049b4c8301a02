"""The offline docs build (tools/build_docs.py, `make docs`).

- A small site (00_core + a sample notebook with math, a plot, tables, a hidden cell, show_doc entries and
  links) is built end to end into a temporary folder: every page, internal link, anchor and asset resolves,
  nothing is loaded from the network, hidden cells do not show, math is typeset by the vendored MathJax.
- The link checker and the Quarto -> MyST conversions are checked on small inputs.
- `--runslow`: the whole site, from every notebook in nbs/.
"""
from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "build_docs.py"
HIDDEN = "this-hidden-cell-must-not-show"
# a 4x4 red PNG, as a notebook stores a matplotlib figure
PNG = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000004000000040802000000269309290000001449444154789c633c2127c700034c"
    "0c48003707003476010caf6ab9b50000000049454e44ae426082")).decode()


@pytest.fixture(scope="module")
def bd():
    spec = importlib.util.spec_from_file_location("build_docs_under_test", TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _cell(kind: str, src: str, outputs: list | None = None) -> dict:
    c = {"cell_type": kind, "metadata": {}, "source": src}
    if kind == "code":
        c.update(execution_count=None, outputs=outputs or [])
    return c


def sample_notebook() -> dict:
    cells = [
        _cell("markdown", "# Docs sample\n\n> A page with every kind of content the docs render."),
        _cell("code", "#| default_exp docs_sample"),
        _cell("code", "#| export\nfrom __future__ import annotations\nimport math"),
        _cell("code", f"#| hide\nMARK = '{HIDDEN}'"),
        _cell("markdown", "## Formulas {#sec-formulas}\n\nInline $s_{ab} = \\langle x_a, y_b\\rangle$ and\n\n"
                          "$$\n\\mathrm{SC}(X,Y) = \\frac{1}{2\\alpha|X|}\\sum_{x\\in X}\\log\\sum_{y\\in Y}"
                          "e^{\\alpha\\langle x,y\\rangle}\n$$\n\n"
                          "::: {.callout-note}\nA Quarto callout.\n:::\n\n"
                          "Links: [core](00_core.ipynb), [check_tensor](core.html#check_tensor), "
                          "[back up](#sec-formulas), [web](https://example.org){target=\"_blank\"}."),
        _cell("code", "#| export\ndef scale(x: float, # the input\n          factor: float = 2.0, # multiplier\n"
                      "         ) -> float: # x times factor\n    \"Multiply `x` by `factor`.\"\n"
                      "    return x * factor"),
        _cell("code", "scale(3.0)", [{"output_type": "execute_result", "execution_count": None, "metadata": {},
                                      "data": {"text/plain": "6.0"}}]),
        _cell("code", "plot()", [{"output_type": "display_data", "metadata": {},
                                  "data": {"image/png": PNG, "text/plain": "<Figure>"}}]),
        _cell("code", "table()", [{"output_type": "execute_result", "execution_count": None, "metadata": {},
                                   "data": {"text/html": "<table class='dataframe'><tr><th>model</th><th>R@1</th></tr>"
                                                         "<tr><td>DivE</td><td>40.5</td></tr></table>",
                                            "text/plain": "table"}}]),
        _cell("markdown", "| method | R@1 |\n|---|---:|\n| bi-encoder | 31.2 |"),
    ]
    return {"nbformat": 4, "nbformat_minor": 5, "cells": cells,
            "metadata": {"kernelspec": {"display_name": "python3", "language": "python", "name": "python3"}}}


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.ipynb"))}


def _build(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def small_site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("docs")
    nbs = tmp / "nbs"
    nbs.mkdir()
    shutil.copy(ROOT / "nbs" / "00_core.ipynb", nbs / "00_core.ipynb")
    (nbs / "99_docs_sample.ipynb").write_text(json.dumps(sample_notebook()))
    (nbs / "_skipped.ipynb").write_text(json.dumps(sample_notebook()))  # `_` files are not pages
    before = _digest(nbs)
    r = _build(["--nbs", str(nbs), "--work", str(tmp / "proc"), "--out", str(tmp / "site"), "--jobs", "1"])
    assert r.returncode == 0, f"build failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    assert _digest(nbs) == before, "the docs build modified the notebooks"
    return tmp / "site", r


def test_small_site_pages_and_navigation(small_site):
    site, r = small_site
    assert "links ok" in r.stdout
    pages = {p.name for p in site.glob("*.html")}
    assert {"index.html", "core.html", "docs_sample.html"} <= pages, pages   # nbdev's page names
    assert "_skipped.html" not in pages and "skipped.html" not in pages
    index = (site / "index.html").read_text()
    nav = index[index.index("sidebar-tree"):]
    assert "Core library" in nav and 'href="core.html"' in nav
    assert "Tooling" in nav and 'href="docs_sample.html"' in nav


def test_small_site_content(small_site):
    site, _ = small_site
    core = (site / "core.html").read_text()
    sample = (site / "docs_sample.html").read_text()
    # show_doc: nbdev's anchors, signatures with their docments comments, no exported source
    assert 'id="check_tensor"' in core and "argument name used in the error message" in core
    assert 'id="scale"' in sample and "multiplier" in sample and "class=\"xmr-source" in core
    assert "import dataclasses" not in core
    # hidden cells do not show
    assert all(HIDDEN not in p.read_text() for p in site.rglob("*.html"))
    # math: typeset by the vendored MathJax, referenced relatively
    assert 'class="math' in sample and "\\langle x_a, y_b\\rangle" in sample
    assert re.search(r'<script[^>]+src="_static/mathjax/tex-chtml\.js', sample)
    assert (site / "_static/mathjax/tex-chtml.js").exists()
    assert list((site / "_static/mathjax/output/chtml/fonts/woff-v2").glob("*.woff"))
    # plot and tables
    img = re.search(r'<img[^>]+src="(_images/[^"]+\.png)"', sample)
    assert img and (site / img.group(1)).exists()
    assert "<td>DivE</td>" in sample and "bi-encoder" in sample
    # Quarto syntax converted: callout, link attributes, heading id
    assert "admonition note" in sample and "{target=" not in sample and 'id="sec-formulas"' in sample
    assert 'href="core.html#check_tensor"' in sample


def test_small_site_links_resolve(small_site, bd):
    site, _ = small_site
    errors, stats = bd.check_site(site)
    assert errors == []
    assert stats["pages"] >= 5 and stats["internal"] > 50


def test_link_checker_finds_problems(tmp_path, bd):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.html").write_text(
        '<html><head><link rel="stylesheet" href="s.css"><script src="https://cdn.example/x.js"></script></head>'
        '<body><h2 id="here">x</h2><a href="#here">ok</a><a href="b.html">missing page</a>'
        '<a href="sub/c.html#nope">bad anchor</a><a href="https://example.org">fine</a>'
        '<img src="img/missing.png"><a href="mailto:x@y">mail</a></body></html>')
    (tmp_path / "sub" / "c.html").write_text('<p id="there"><a href="../a.html#here">back</a></p>')
    (tmp_path / "s.css").write_text("@font-face{src:url(fonts/f.woff2)} a{background:url('https://x.org/i.png')}")
    errors, stats = bd.check_site(tmp_path)
    text = "\n".join(errors)
    assert "b.html does not exist" in text
    assert "no id 'nope'" in text
    assert "img/missing.png" in text
    assert "https://cdn.example/x.js" in text and "https://x.org/i.png" in text
    assert "fonts/f.woff2" in text
    assert "example.org" not in text and "mailto" not in text and "../a.html#here" not in text
    assert len(errors) == 6, errors


def test_quarto_to_myst(bd):
    site = bd.Site(host="https://h.io/x", pages={"01_similarity.ipynb": "similarity", "similarity.html": "similarity"})
    md = bd.quarto_to_myst(
        "## Title {#sec-a .unnumbered}\n\n::: {.callout-tip title=\"Hint\"}\nx\n:::\n\n"
        "[a](01_similarity.ipynb#cosine) [b](similarity.html) [c](https://e.org){target=\"_blank\"} "
        "[d](other.md)", site)
    assert '<span id="sec-a"' in md and "(sec-a)=\n## Title\n" in md
    assert ":::{admonition} Hint\n:class: tip\nx\n:::" in md
    assert "[a](https://h.io/x/similarity.html#cosine)" in md and "[b](https://h.io/x/similarity.html)" in md
    assert "[c](https://e.org) " in md and "[d](other.md)" in md


def test_show_doc_to_myst(bd):
    site = bd.Site(host="https://h.io/x")
    md = ('---\n\n[source](https://github.com/o/r/blob/main/m.py#L1){target="_blank" style="float:right"}\n\n'
          "### Config.save\n\n```python\ndef save(\n    path:str, # see [`load`](https://h.io/x/core.html#load)\n)->Path:\n```\n\n"
          "*Save it.*\n\n---\n\n### Config\n\n```python\ndef Config(\n    a:int=1\n)->None:\n```")
    out = bd.show_doc_to_myst(md, site)
    assert out.startswith('<div class="xmr-sd-head"><span id="config.save"')
    assert 'href="https://github.com/o/r/blob/main/m.py#L1">[source]</a>' in out
    assert "# see `load`\n" in out and "{target" not in out
    assert "def save(" in out                                # a method stays `def`
    cls = bd.show_doc_to_myst("---\n\n### Config\n\n```python\ndef Config(\n    a:int=1\n)->None:\n```", site)
    assert "```python\nclass Config(\n    a:int=1\n):\n```" in cls   # fastcore shows classes as `def`


def test_sidebar_groups(bd):
    g = lambda name: bd.group_of(Path(name))  # noqa: E731
    assert g("00_core.ipynb") == g("00b_api.ipynb") == g("03a_index.ipynb") == "Core library"
    assert g("04c_data.published.ipynb") == "Data"
    assert g("05_encoders.ipynb") == g("07a_checkpoint.ipynb") == g("09_cli.ipynb") == "Training and inference"
    assert g("10_models.biencoder.ipynb") == g("13_models.cret.ipynb") == "Models"
    assert g("31_repro.dive.ipynb") == g("33_repro.x.ipynb") == "Experiments"
    assert g("90_reproduce.ipynb") == g("92_bench_training.ipynb") == "Tooling"
    assert g("tutorial.ipynb") == "Guides"


@pytest.mark.slow
def test_full_site(tmp_path):
    "Every notebook in nbs/ builds into a site whose links all resolve (what `make docs` does)."
    r = _build(["--work", str(tmp_path / "proc"), "--out", str(tmp_path / "site"), "--force"])
    assert r.returncode == 0, f"build failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    site = tmp_path / "site"
    for nb in (ROOT / "nbs").glob("[!_.]*.ipynb"):
        name = "index" if nb.stem == "index" else re.sub(r"^\d+[a-zA-Z0-9]*_", "", nb.stem)
        assert (site / f"{name}.html").exists(), f"no page for {nb.name}"


@pytest.mark.slow
def test_small_site_in_chromium(small_site, tmp_path):
    "Headless Chromium (Debian's `chromium`) typesets every formula with the vendored MathJax, offline."
    site, _ = small_site
    shot = ROOT / "tools" / "screenshots.py"
    r = subprocess.run([sys.executable, str(shot), "docs_sample", "core", "--site", str(site), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 of 2 formulas typeset by MathJax" in r.stdout
    assert (tmp_path / "docs_sample.png").stat().st_size > 10_000 and (tmp_path / "core.png").exists()
