"""Build the documentation website offline from the notebooks: `make docs` -> `_site/index.html`.

Quarto (nbdev's own renderer) cannot be installed offline, so the site is built in three steps:

1. nbdev's notebook processing, exactly what `nbdev_proc_nbs` does minus its side effects (it would try to
   install Quarto and run `pip install -e .[dev]`): `show_doc` cells are added after exported definitions
   and executed, `#| hide`/`#| export` cells are dropped, names in backticks become links. Processed
   notebooks go to `_proc/` (cached by modification time; `--force` rebuilds).
2. The processed notebooks become Sphinx sources in `_proc/_sphinx/`: Quarto-only syntax (`#| echo: false`,
   `output: asis`, `::: {.callout-note}`, `{#id}`, `{target=...}`) becomes MyST, every page is named as
   nbdev names it (`00_core.ipynb` -> `core.html`, so nbdev's doc links work), and the navigation is
   generated from the notebook file names (see `GROUPS`). Nothing in `nbs/` is modified.
3. Sphinx + myst-nb (no execution) renders them with the furo theme into `_site/`; MathJax 3 is vendored
   from the `sphinx-mathjax-offline` wheel. Finally every internal link, fragment and asset of the site is
   checked and any reference to an external script, stylesheet, image or font fails the build.

Usage: python tools/build_docs.py [--out _site] [--work _proc] [--nbs nbs] [--force] [--jobs N] [--check-only]
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import html.parser
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "docs"

for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "TOKENIZERS_PARALLELISM": "false", "XMR_MODE": os.environ.get("XMR_MODE", "quick")}.items():
    os.environ.setdefault(_k, _v)


class DocsError(Exception):
    "The docs could not be built or the built site has broken links."


# ---------------------------------------------------------------------------------------------------
# Navigation: sidebar groups from notebook file names (first match wins), so new notebooks need no config.
# ---------------------------------------------------------------------------------------------------
GROUPS: list[tuple[str, range | None]] = [
    ("Core library", range(0, 4)),        # 00 core, registry, API; 01 similarity, 02 metrics, 03 index
    ("Data", range(4, 5)),                # 04, 04a, 04b ... datasets and features
    ("Training and inference", range(5, 10)),  # 05 encoders, 06 losses, 07 models.base/checkpoint, 08 train, 09 cli
    ("Models", range(10, 30)),            # 10 bi-encoder, 11 DivE, 12... one notebook per method (xmretrieval.models.*)
    ("Experiments", range(30, 90)),       # 30... reproduction notebooks (xmretrieval.repro.*)
    ("Tooling", range(90, 100)),          # 90 make reproduce, 9x benchmarks
]
GUIDES = "Guides"  # notebooks without a number prefix (other than index)


def group_of(rel: Path) -> str:
    "Sidebar group of the notebook at `rel` (relative to nbs/)."
    if len(rel.parts) > 1:
        return rel.parts[0].replace("_", " ").strip().capitalize()
    m = re.match(r"^(\d+)", rel.name)
    if not m:
        return GUIDES
    n = int(m.group(1)[:2])
    for name, rng in GROUPS:
        if n in rng:
            return name
    return GROUPS[-1][0]


# ---------------------------------------------------------------------------------------------------
# Step 1: nbdev processing
# ---------------------------------------------------------------------------------------------------
def _cfg():
    from nbdev.config import get_config
    return get_config(path=ROOT)


def find_notebooks(nbs: Path) -> list[Path]:
    "Notebooks nbdev documents (files and folders starting with `_` or `.` are skipped), by file name."
    from nbdev.doclinks import nbglob
    return sorted((Path(p) for p in nbglob(nbs)), key=lambda p: p.relative_to(nbs).as_posix())


_MIXED: list[int] = []  # cells of the notebook being processed that mix imports with other code


def _docs_filter():
    "nbdev's processors (FilterDefaults), with `exec_show_docs` replaced by `exec_api_cells` (below)."
    import ast
    from fastcore.xtras import str2bool
    from nbdev.processors import FilterDefaults, _do_eval, _show_docs, exec_show_docs

    class exec_api_cells(exec_show_docs):
        """nbdev's `exec_show_docs`, except for cells that mix imports with other code (test cells): nbdev
        runs those whole, which fails or takes long when they need variables of skipped cells; only
        their import statements run here. Exported, show_doc and import-only cells run as in nbdev."""
        def __call__(self, cell):
            if not self.nb.has_docs_ or not hasattr(self, "k"):
                return
            fm = getattr(self.nb, "frontmatter_", {})
            if str2bool(fm.get("skip_showdoc", False)) or not _do_eval(cell):
                return
            trees = cell.parsed_()
            body = [n for t in trees for n in (t.body if isinstance(t, ast.Module) else [t])]
            api = (cell.directives_.keys() & {"export", "exports", "exporti", "exec_doc"}) or _show_docs(trees)
            imports = [n for n in body if isinstance(n, (ast.Import, ast.ImportFrom))]
            if api or len(imports) == len(body):
                self.k.cell(cell)
            else:
                self.k.run("\n".join(ast.unparse(n) for n in imports))
                _MIXED.append(cell.idx_)
            if self.k.exc:
                title = fm.get("title", "")
                raise Exception(f"Error{' in notebook: ' + title if title else ''} in cell {cell.idx_} :\n"
                                f"{cell.source}") from self.k.exc

    class DocsFilter(FilterDefaults):
        def base_procs(self):
            return [exec_api_cells if p is exec_show_docs else p for p in super().base_procs()]

    return DocsFilter()


def _proc_worker(src: Path, dst: Path) -> int:
    "Process one notebook for the docs, as `nbdev.serve_drv.main` does, writing `dst` atomically."
    import warnings
    from execnb.nbio import read_nb, write_nb
    os.environ["IN_TEST"] = "1"  # as nbdev.serve_drv does
    _MIXED.clear()
    nb = read_nb(src)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Found cells containing imports")  # counted in _MIXED
        _docs_filter()(nb)
    tmp = dst.with_name(f".{dst.name}.tmp")
    write_nb(nb, tmp)
    os.replace(tmp, dst)
    return len(_MIXED)


def process_notebooks(nbs: Path, work: Path, force: bool = False, jobs: int = 2) -> dict[Path, Path]:
    "Process the notebooks in `nbs` into `work` (nbdev's `_proc/`); returns {source: processed}."
    work.mkdir(parents=True, exist_ok=True)
    deps = [ROOT / "settings.ini", Path(__file__)]
    deps += [p for p in [_cfg().lib_path / "_modidx.py"] if p.exists()]
    dep_mtime = max(p.stat().st_mtime for p in deps)
    out, todo = {}, []
    for src in find_notebooks(nbs):
        dst = work / src.relative_to(nbs)
        dst.parent.mkdir(parents=True, exist_ok=True)
        out[src] = dst
        if force or not dst.exists() or dst.stat().st_mtime < max(src.stat().st_mtime, dep_mtime):
            todo.append((src, dst))
    if not todo:
        return out
    print(f"processing {len(todo)} notebook(s) with nbdev ({jobs} worker(s))", flush=True)
    # fresh interpreters (spawn), as nbdev_proc_nbs runs them; the worker is looked up as `build_docs._proc_worker`
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import build_docs
    errors = []
    with cf.ProcessPoolExecutor(max_workers=max(1, min(jobs, len(todo))),
                                mp_context=multiprocessing.get_context("spawn")) as ex:
        futs = {ex.submit(build_docs._proc_worker, src, dst): (src, dst) for src, dst in todo}
        for fut in cf.as_completed(futs):
            src, dst = futs[fut]
            try:
                if n_mixed := fut.result():
                    print(f"docs: nbs/{src.relative_to(nbs)}: {n_mixed} cell(s) mix imports with other code; only their "
                          "imports ran (nbdev_docs would run them whole: keep imports in cells of their own)",
                          flush=True)
            except Exception as e:  # noqa: BLE001 - reported with the notebook's name below
                dst.unlink(missing_ok=True)
                tb = str(e.__cause__ or "")  # the worker's traceback: keep its root cause only
                roots = [r for r in re.findall(r"^(\w+(?:Error|Exception|Exit|Interrupt)\b.*)$", tb, re.M)
                         if not r.startswith("Exception: Error")]
                errors.append(f"{src.relative_to(ROOT) if src.is_relative_to(ROOT) else src}: {str(e).strip()}"
                              + (f"\n  -> {roots[0]}" if roots else ""))
    if errors:
        raise DocsError("nbdev could not process these notebooks. For the API docs nbdev executes every cell that "
                        "exports code or calls show_doc, and the imports of the other cells (hidden cells too). "
                        "Fix the notebook, then run `make docs` again:\n"
                        + "\n\n".join(errors))
    return out


# ---------------------------------------------------------------------------------------------------
# Step 2: processed notebooks -> MyST notebooks for Sphinx
# ---------------------------------------------------------------------------------------------------
_re_dir = re.compile(r"^\s*#\|\s?(.*?)\s*$")
_re_link_attrs = re.compile(r"(\]\([^)\s]*(?:\s+\"[^\"]*\")?\))\{[^}\n]*\}")
_re_src_link = re.compile(r"^\[source\]\(([^)\s]+)\)(?:\{[^}\n]*\})?\s*$", re.M)
_re_head_attrs = re.compile(r"^(#{1,6}\s+.*?)\s*\{([^}\n]*)\}\s*$", re.M)
_re_div_open = re.compile(r"^(:{3,})\s*\{([^}\n]*)\}\s*$", re.M)
_re_sd_code = re.compile(r"```python\n(async )?def ([\w.]+)\(")
_re_md_link = re.compile(r"(\]\()([^)\s#?]+)((?:#[^)\s]*)?\))")
_CALLOUTS = {"note": "note", "tip": "tip", "warning": "warning", "important": "important", "caution": "caution"}


def _split_directives(src: str) -> tuple[dict[str, str], str]:
    "Leading `#| key: value` lines of a code cell -> ({key: value}, remaining source)."
    lines, dirs = src.splitlines(), {}
    i = 0
    while i < len(lines):
        m = _re_dir.match(lines[i])
        if not m:
            if lines[i].strip() == "":
                i += 1
                continue
            break
        k, _, v = m.group(1).partition(":")
        dirs[k.strip()] = v.strip().strip("\"'")
        i += 1
    return dirs, "\n".join(lines[i:]).strip("\n")


def _anchor(ident: str) -> str:
    return f'<span id="{ident}" class="xmr-anchor"></span>'


def _div(m: re.Match) -> str:
    "Quarto fenced div `::: {.callout-note title=\"T\"}` -> MyST colon fence."
    colons, attrs = m.group(1), m.group(2)
    classes = re.findall(r"(?:^|\s)\.([\w-]+)", attrs)
    title = re.search(r"title=\"([^\"]*)\"", attrs)
    callout = next((c[len("callout-"):] for c in classes if c.startswith("callout-")), None)
    if callout is not None:
        kind = _CALLOUTS.get(callout, "note")
        if title:
            return f"{colons}{{admonition}} {title.group(1)}\n:class: {kind}"
        return f"{colons}{{{kind}}}"
    ident = re.search(r"#([\w.:-]+)", attrs)
    opts = f"\n:name: {ident.group(1)}" if ident else ""
    return f"{colons}{{container}} {' '.join(classes) or 'xmr-div'}{opts}"


@dataclass
class Site:
    "What the MyST conversion needs to know about the whole site."
    host: str                                                    # doc_host + doc_baseurl, no trailing /
    pages: dict[str, str] = field(default_factory=dict)         # notebook file name / page name -> docname

    def fix_link(self, m: re.Match) -> str:
        "Relative links to notebooks/pages -> nbdev's absolute doc URL (made relative again in the HTML)."
        target = m.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("/"):
            return m.group(0)
        name = target.split("/")[-1]
        doc = self.pages.get(name)
        if doc is None:
            return m.group(0)
        return f"{m.group(1)}{self.host}/{doc}.html{m.group(3)}"


def quarto_to_myst(md: str, site: Site) -> str:
    "Quarto/pandoc-only markdown -> MyST markdown that renders the same."
    md = _re_link_attrs.sub(r"\1", md)                 # [x](url){target="_blank"} -> [x](url)
    out = []
    for line in md.split("\n"):
        m = _re_head_attrs.match(line)
        if m and re.search(r"(^|\s)[#.]", m.group(2)):  # ## Title {#sec-id .unnumbered}
            ident = re.search(r"#([\w.:-]+)", m.group(2))
            if ident:  # nbdev's id as an HTML anchor, and a MyST target so `[x](#id)` resolves
                out += [_anchor(ident.group(1)), "", f"({ident.group(1)})="]
            line = m.group(1)
        out.append(line)
    md = "\n".join(out)
    md = _re_div_open.sub(_div, md)
    md = _re_md_link.sub(site.fix_link, md)
    return md


def show_doc_to_myst(md: str, site: Site) -> str:
    "The markdown show_doc produced -> MyST: anchors with nbdev's ids, a source link, `class` for classes."
    # nbdev links names in backticks even inside the signature block, where the link shows as raw markdown
    md = re.sub(r"```python\n.*?```", lambda m: re.sub(r"\[(`[^`\n]+`)\]\([^)\s]+\)", r"\1", m.group(0)), md,
                flags=re.S)
    src = _re_src_link.search(md)
    md = _re_src_link.sub("", md)
    md = re.sub(r"^\s*---\s*\n", "", md, count=1)       # the rule above each entry is drawn by CSS
    head = re.search(r"^(#{1,6})\s+(.+?)\s*$", md, re.M)
    ident = head.group(2).strip().lower() if head else None
    parts = ['<div class="xmr-sd-head">']
    if ident:
        parts.append(_anchor(ident))
    if src:
        parts.append(f'<a class="xmr-source reference external" href="{src.group(1)}">[source]</a>')
    parts.append("</div>")
    md = "".join(parts) + "\n\n" + md.strip("\n")
    if head:  # fastcore shows a class signature as `def Name(...)->None:`; say `class`
        nm = head.group(2).strip()
        def _cls(m: re.Match) -> str:
            if m.group(1) or m.group(2) != nm.split(".")[-1] or not nm.split(".")[-1][:1].isupper():
                return m.group(0)
            return f"```python\nclass {m.group(2)}("
        new = _re_sd_code.sub(_cls, md, count=1)
        if new != md:
            new = re.sub(r"\)->None:\n```", "):\n```", new, count=1)
        md = new
    md = quarto_to_myst(md, site)
    return md


def _text(x) -> str:
    return "".join(x) if isinstance(x, list) else (x or "")


def _md_cell(src: str, i: int) -> dict:
    return {"cell_type": "markdown", "id": f"xmr-md-{i}", "metadata": {}, "source": src}


def _frontmatter(cell: dict) -> dict | None:
    import yaml
    src = _text(cell.get("source")).strip()
    if cell.get("cell_type") != "raw" or not src.startswith("---"):
        return None
    body = src.strip("-\n ")
    try:
        fm = yaml.safe_load(body) or {}
    except yaml.YAMLError:
        return None
    return fm if isinstance(fm, dict) else None


def _title_cell(fm: dict, i: int) -> dict:
    title = str(fm.get("title") or "Untitled")
    src = f"# {title}\n"
    if fm.get("description"):
        src += f"\n```{{container}} xmr-description\n{fm['description']}\n```\n"
    return _md_cell(src, i)


_DROP_MIME = ("application/vnd.jupyter.widget-view+json", "application/vnd.jupyter.widget-state+json")
_TAGS = {"echo": ("false", "remove-input"), "output": ("false", "remove-output"),
         "include": ("false", "remove-cell"), "code-fold": ("true", "hide-input")}


def _shift_headings(md: str) -> str:
    "`# x` -> `## x` (outside code fences): the page title stays the only level-1 heading."
    out, fence = [], None
    for line in md.split("\n"):
        m = re.match(r"^\s*(`{3,}|~{3,}|:{3,})", line)
        if m and (fence is None or m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence)):
            fence = None if fence else m.group(1)
        elif fence is None and re.match(r"^#{1,5} ", line):
            line = "#" + line
        out.append(line)
    return "\n".join(out)


def convert_notebook(nb: dict, site: Site, extra_md: str = "", default_title: str = "") -> tuple[dict, dict]:
    "A processed notebook -> (MyST-ready notebook, its frontmatter)."
    cells, fm = [], {}
    for i, cell in enumerate(nb.get("cells", [])):
        kind = cell.get("cell_type")
        if i == 0 and (f := _frontmatter(cell)) is not None:
            fm = f
            cells.append(_title_cell(fm, i))
            continue
        if kind == "markdown":
            src = _text(cell.get("source"))
            if src.strip().startswith("<!-- WARNING: THIS FILE WAS AUTOGENERATED"):
                continue
            cells.append(_md_cell(quarto_to_myst(src, site), i))
            continue
        if kind != "code":
            continue
        dirs, src = _split_directives(_text(cell.get("source")))
        outputs = []
        for o in cell.get("outputs", []):
            o = dict(o)
            if "data" in o:
                o["data"] = {k: v for k, v in o["data"].items() if k not in _DROP_MIME}
                if not o["data"]:
                    continue
                if "text/markdown" in o["data"]:
                    o["data"]["text/markdown"] = quarto_to_myst(_text(o["data"]["text/markdown"]), site)
            outputs.append(o)
        if dirs.get("output", "").lower() == "asis":
            # Quarto renders the output as page markdown (show_doc): make it a markdown cell, so its
            # headings are page sections (table of contents, anchors).
            texts = []
            for o in outputs:
                d = o.get("data", {})
                if "text/markdown" in d:
                    texts.append(_text(d["text/markdown"]))
                elif o.get("output_type") == "stream" and o.get("name") == "stdout":
                    texts.append(_text(o.get("text")))
                elif "text/plain" in d:
                    texts.append(_text(d["text/plain"]))
            md = "\n\n".join(texts)
            is_sd = re.match(r"^\s*show_doc\(", src) is not None
            md = show_doc_to_myst(md, site) if is_sd else quarto_to_myst(md, site)
            if src and dirs.get("echo", "true").lower() != "false":
                cells.append(_code_cell(src, [], {}, i))
            if md.strip():
                cells.append(_md_cell(md, i))
            continue
        if not src and not outputs:
            continue
        cells.append(_code_cell(src, outputs, dirs, i))
    if any(c["cell_type"] == "markdown" and re.search(r"^# ", c["source"], re.M) for c in cells[1 if fm else 0:]):
        for c in cells[1 if fm else 0:]:  # level-1 headings in the body would each become a page in the sidebar
            if c["cell_type"] == "markdown":
                c["source"] = _shift_headings(c["source"])
    if not fm:  # no `# title` + `> summary` cell: nbdev's Quarto site would have no title either
        fm = {"title": default_title or "Untitled"}
        cells.insert(0, _title_cell(fm, -1))
    if extra_md:
        cells.append(_md_cell(extra_md, len(cells) + 1000))
    md = dict(nb.get("metadata", {}))
    md.pop("widgets", None)
    md["language_info"] = {"name": "python", "pygments_lexer": "ipython3"}
    md.setdefault("kernelspec", {"display_name": "Python 3", "language": "python", "name": "python3"})
    return {"nbformat": 4, "nbformat_minor": 5, "metadata": md, "cells": cells}, fm


def _code_cell(src: str, outputs: list, dirs: dict, i: int) -> dict:
    tags = [tag for k, (val, tag) in _TAGS.items() if dirs.get(k, "").lower() == val]
    for o in outputs:
        if o.get("output_type") in ("execute_result", "display_data"):
            o.setdefault("metadata", {})
        if o.get("output_type") == "execute_result":
            o.setdefault("execution_count", None)
    return {"cell_type": "code", "id": f"xmr-code-{i}", "metadata": {"tags": tags} if tags else {},
            "source": src, "execution_count": None, "outputs": outputs}


def _toctree(pages: list[tuple[str, str, str]], home: bool = True) -> str:
    """The navigation, appended to the home page: per sidebar group a list of its pages with their one-line
    summaries, and a hidden toctree (Sphinx builds the sidebar from it). `pages`: (docname, group, summary)."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for docname, group, summary in pages:
        groups.setdefault(group, []).append((docname, summary))
    order = [GUIDES] + [g for g, _ in GROUPS]
    keys = sorted(groups, key=lambda g: (order.index(g) if g in order else len(order), g))
    out = []
    for g in keys:
        items = "\n".join(f"- [](<{d}.ipynb>)" + (f": {' '.join(s.split())}" if s else "") for d, s in groups[g])
        if home:
            out.append(f"::::{{container}} xmr-page-list\n**{g}**\n\n{items}\n::::\n")
        out.append(f"```{{toctree}}\n:caption: {g}\n:hidden:\n:maxdepth: 1\n\n"
                   + "\n".join(d for d, _ in groups[g]) + "\n```\n")
    return "\n".join(out)


def _write_if_changed(path: Path, text: str) -> None:
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _summary(proc: Path) -> str:
    "The notebook's one-line summary (`> summary` under its title)."
    try:
        nb = json.loads(proc.read_text(encoding="utf-8"))
        fm = _frontmatter(nb["cells"][0]) if nb.get("cells") else None
    except (OSError, ValueError):
        fm = None
    return str((fm or {}).get("description") or "")


def _docname(proc: Path, rel: Path) -> str:
    "nbdev's page name: the frontmatter's output-file (`00_core.ipynb` -> `core`)."
    try:
        nb = json.loads(proc.read_text(encoding="utf-8"))
        fm = _frontmatter(nb["cells"][0]) if nb.get("cells") else None
    except (OSError, ValueError):
        fm = None
    out = (fm or {}).get("output-file") or re.sub(r"^\d+[a-zA-Z0-9]*_", "", rel.stem) + ".html"
    return (rel.parent / Path(out).stem).as_posix()


def make_sources(procs: dict[Path, Path], nbs: Path, src_dir: Path) -> tuple[list[str], dict[str, list[str]]]:
    """Write the Sphinx source tree; returns the docnames in navigation order and the pages renamed because
    their nbdev name was taken ({nbdev name: [page names]})."""
    cfg = _cfg()
    site = Site(host=(cfg.doc_host.rstrip("/") + "/" + cfg.doc_baseurl.strip("/")).rstrip("/"))
    entries, taken, aliases = [], {}, {}  # entries: (rel, proc, docname)
    # nbs/index.ipynb claims the home page first; then by file name
    for src, proc in sorted(procs.items(), key=lambda kv: (kv[0].relative_to(nbs).as_posix() != "index.ipynb",
                                                           kv[0].relative_to(nbs).as_posix())):
        rel = src.relative_to(nbs)
        doc = _docname(proc, rel)
        if doc in taken:  # e.g. 03_index.ipynb -> index.html, the home page: nbdev's Quarto site would clash
            alt = (rel.parent / rel.stem).as_posix()
            print(f"docs: nbs/{rel} and nbs/{taken[doc]} both make the page '{doc}.html' (nbdev drops the number "
                  f"prefix); nbs/{rel} becomes '{alt}.html' here, but rename the notebook", flush=True)
            aliases.setdefault(doc, []).append(alt)
            doc = alt
        taken[doc] = rel
        entries.append((rel, proc, doc))
        site.pages[rel.name] = doc                          # [x](01_similarity.ipynb)
        site.pages.setdefault(Path(doc).name + ".html", doc)  # [x](similarity.html)
        site.pages.setdefault(Path(doc).name + ".ipynb", doc)
    entries.sort(key=lambda e: e[0].as_posix())
    docnames = [d for _, _, d in entries]
    nav = [(doc, group_of(rel), _summary(proc)) for rel, proc, doc in entries if doc != "index"]
    written = set()
    for rel, proc, doc in entries:
        nb = json.loads(proc.read_text(encoding="utf-8"))
        extra = _toctree(nav) if doc == "index" else ""
        conv, fm = convert_notebook(nb, site, extra, default_title=Path(doc).name)
        if "output-file" not in fm:
            print(f"docs: nbs/{rel} has no title cell ('# title' and '> summary' in its first markdown cell); "
                  f"its page is titled '{Path(doc).name}'", flush=True)
        out = src_dir / f"{doc}.ipynb"
        _write_if_changed(out, json.dumps(conv, indent=1, ensure_ascii=False))
        written.add(out.resolve())
    if "index" not in docnames:  # a home page is required: a bare one with the navigation
        cfg_title = cfg.get("title", cfg.lib_name)
        conv, _ = convert_notebook({"cells": [_md_cell(f"# {cfg_title}\n\n{cfg.get('description', '')}", 0)]},
                                   site, _toctree(nav))
        out = src_dir / "index.ipynb"
        _write_if_changed(out, json.dumps(conv, indent=1, ensure_ascii=False))
        written.add(out.resolve())
    # assets next to the notebooks (images referenced from markdown)
    for f in nbs.rglob("*"):
        rel = f.relative_to(nbs)
        if (f.is_file() and f.suffix.lower() in {".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp", ".csv"}
                and not any(p.startswith((".", "_")) for p in rel.parts)):
            dst = src_dir / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists() or dst.read_bytes() != f.read_bytes():
                shutil.copy2(f, dst)
            written.add(dst.resolve())
    for f in list(src_dir.rglob("*")):  # notebooks deleted from nbs/ leave the site
        if f.is_file() and f.resolve() not in written:
            f.unlink()
    return ["index"] + [d for d, _, _ in nav], aliases


# ---------------------------------------------------------------------------------------------------
# Step 3: Sphinx, then make nbdev's absolute doc links relative
# ---------------------------------------------------------------------------------------------------
def sphinx_build(src_dir: Path, out: Path, doctrees: Path, fresh: bool = False) -> None:
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-c", str(CONF_DIR), "-d", str(doctrees),
           "-q", "--keep-going", str(src_dir), str(out)]
    if fresh:
        cmd.insert(3, "-E")
    r = subprocess.run(cmd, cwd=ROOT)
    if r.returncode:
        raise DocsError(f"sphinx-build failed (exit {r.returncode}): {' '.join(cmd)}")


def relativize_links(out: Path, aliases: dict[str, list[str]] | None = None) -> tuple[int, int]:
    """nbdev writes links to the published site (`doc_host/doc_baseurl/core.html#x`): point them into this site.
    A link to a name that has no show_doc entry (a method, say) goes to its class's entry, else to the page,
    as a browser would do with nbdev's Quarto site; `aliases` ({nbdev page: [pages]}) are searched for the
    anchor first (pages renamed because two notebooks had the same nbdev name).
    Returns (links rewritten, links retargeted)."""
    aliases = aliases or {}
    cfg = _cfg()
    host = (cfg.doc_host.rstrip("/") + "/" + cfg.doc_baseurl.strip("/")).rstrip("/") + "/"
    pat = re.compile(r'(\shref=")' + re.escape(host) + r'([^"#]*)(#[^"]*)?"')
    pages = {f: f.read_text(encoding="utf-8") for f in out.rglob("*.html")}
    ids: dict[str, set[str]] = {}

    def ids_of(rel: str) -> set[str]:
        if rel not in ids:
            p = _Page()
            f = out / rel
            if f.exists():
                p.feed(f.read_text(encoding="utf-8", errors="replace"))
            ids[rel] = p.ids
        return ids[rel]

    n = moved = 0
    for page, text in pages.items():
        if host not in text:
            continue
        up = "../" * (len(page.relative_to(out).parts) - 1)

        def fix(m: re.Match) -> str:
            nonlocal n, moved
            rel, frag = m.group(2) or "index.html", unquote((m.group(3) or "")[1:])
            if frag and frag not in ids_of(rel):
                rel = next((a + ".html" for a in aliases.get(rel.removesuffix(".html"), [])
                            if frag in ids_of(a + ".html")), rel)
            if frag and frag not in ids_of(rel):
                parts = frag.split(".")
                while parts and ".".join(parts) not in ids_of(rel):
                    parts.pop()
                frag = ".".join(parts)
                moved += 1
            n += 1
            return f'{m.group(1)}{up}{rel}{"#" + frag if frag else ""}"'

        page.write_text(pat.sub(fix, text), encoding="utf-8")
    return n, moved


# ---------------------------------------------------------------------------------------------------
# Link checker
# ---------------------------------------------------------------------------------------------------
_RESOURCE_ATTRS = {("script", "src"), ("img", "src"), ("img", "srcset"), ("source", "src"), ("source", "srcset"),
                   ("iframe", "src"), ("video", "src"), ("video", "poster"), ("audio", "src"), ("embed", "src"),
                   ("object", "data"), ("input", "src"), ("track", "src")}


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.refs: list[tuple[str, str, bool]] = []  # (tag, url, is_resource)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for k in ("id", "name") if tag == "a" else ("id",):
            if a.get(k):
                self.ids.add(a[k])
        if tag == "a" and a.get("href") is not None:
            self.refs.append((tag, a["href"], False))
        if tag == "link" and a.get("href"):
            rel = (a.get("rel") or "").lower()
            self.refs.append((tag, a["href"], not ({"canonical", "alternate", "next", "prev", "index", "search",
                                                     "author", "license", "help"} & set(rel.split()))))
        for (t, k) in _RESOURCE_ATTRS:
            if tag == t and a.get(k):
                urls = [u.strip().split()[0] for u in a[k].split(",") if u.strip()] if k == "srcset" else [a[k]]
                self.refs += [(tag, u, True) for u in urls]

    handle_startendtag = handle_starttag


_re_css_url = re.compile(r"""url\(\s*['"]?([^'")]+)['"]?\s*\)|@import\s+['"]([^'"]+)['"]""")


def check_site(out: Path) -> tuple[list[str], dict]:
    "Every internal link, fragment and asset in `out` resolves; no external scripts/styles/images/fonts."
    out = out.resolve()
    pages: dict[Path, _Page] = {}
    for f in sorted(out.rglob("*.html")):
        p = _Page()
        p.feed(f.read_text(encoding="utf-8", errors="replace"))
        pages[f.resolve()] = p
    errors, n_int, n_ext = [], 0, 0

    def resolve(base: Path, url: str, what: str, need_ids: bool, resource: bool) -> None:
        nonlocal n_int, n_ext
        url = url.strip()
        if not url or url.startswith(("mailto:", "javascript:", "data:", "tel:")):
            return
        parts = urlsplit(url)
        if parts.scheme or url.startswith("//"):
            n_ext += 1
            if resource or parts.scheme not in ("http", "https"):
                errors.append(f"{what}: external resource {url} (the site must work offline)")
            return
        n_int += 1
        target = base if not parts.path else (base.parent / unquote(parts.path)).resolve()
        if not target.is_relative_to(out):
            errors.append(f"{what}: {url} points outside the site")
            return
        if target.is_dir():
            target = target / "index.html"
        if not target.exists():
            errors.append(f"{what}: broken link {url} ({target.relative_to(out)} does not exist)")
            return
        frag = unquote(parts.fragment)
        if need_ids and frag and target.suffix == ".html" and target in pages and frag not in pages[target].ids:
            errors.append(f"{what}: broken anchor {url} (no id '{frag}' in {target.relative_to(out)})")

    for f, p in pages.items():
        what = str(f.relative_to(out))
        for tag, url, res in p.refs:
            resolve(f, url, f"{what} <{tag}>", need_ids=(tag == "a"), resource=res)
    for css in sorted(out.rglob("*.css")):
        text = css.read_text(encoding="utf-8", errors="replace")
        for m in _re_css_url.finditer(text):
            url = m.group(1) or m.group(2)
            if url.startswith("#"):
                continue
            resolve(css.resolve(), url, str(css.relative_to(out)), need_ids=False, resource=True)
    return errors, {"pages": len(pages), "internal": n_int, "external_links": n_ext}


# ---------------------------------------------------------------------------------------------------
def check_requirements() -> None:
    "The docs requirements (settings.ini `docs_requirements`, the `docs` extra) are importable."
    import importlib.util
    missing = [m for m in ("sphinx", "myst_nb", "furo", "sphinx-mathjax-offline", "nbdev")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise DocsError(f"missing docs requirements {missing}: `make docs` installs them, or run "
                        f"`{Path(sys.executable).parent}/pip install -e '.[dev,docs]'`")


def build(out: Path, work: Path, force: bool = False, jobs: int = 2, check: bool = True,
          nbs: Path | None = None) -> dict:
    "The whole pipeline; returns a summary. Raises DocsError with what to fix."
    check_requirements()
    t0 = time.time()
    nbs = Path(nbs or _cfg().nbs_path).resolve()
    procs = process_notebooks(nbs, work, force=force, jobs=jobs)
    t1 = time.time()
    src_dir, doctrees, html = work / "_sphinx", work / "_doctrees", work / "_html"
    docs, aliases = make_sources(procs, nbs, src_dir)
    sphinx_build(src_dir, html, doctrees, fresh=force)  # incremental: only changed pages are written
    # the site is a fresh copy, post-processed as a whole
    tmp = work / "_site.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(html, tmp, ignore=shutil.ignore_patterns(".buildinfo", "_sources", ".doctrees"))
    n_rel, n_moved = relativize_links(tmp, aliases)
    shutil.rmtree(out, ignore_errors=True)
    shutil.move(tmp, out)
    t2 = time.time()
    summary = {"notebooks": len(procs), "pages": docs, "process_s": round(t1 - t0, 1),
               "render_s": round(t2 - t1, 1), "relinked": n_rel, "retargeted": n_moved}
    if check:
        errors, stats = check_site(out)
        summary.update(stats)
        if errors:
            raise DocsError(f"{len(errors)} broken link(s)/asset(s) in {out}:\n" + "\n".join(errors[:200]))
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "_site"), help="site folder (default _site/)")
    ap.add_argument("--work", default=str(ROOT / "_proc"), help="processed notebooks and Sphinx sources (default _proc/)")
    ap.add_argument("--force", action="store_true", help="ignore caches: process every notebook, full Sphinx build")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="nbdev processing workers")
    ap.add_argument("--nbs", default=None, help="notebooks folder (default: nbs_path of settings.ini)")
    ap.add_argument("--check-only", action="store_true", help="only check the links of an existing site")
    ap.add_argument("--no-check", action="store_true", help="skip the link check")
    a = ap.parse_args(argv)
    out, work = Path(a.out).resolve(), Path(a.work).resolve()
    try:
        if a.check_only:
            errors, stats = check_site(out)
            if errors:
                raise DocsError(f"{len(errors)} broken link(s)/asset(s) in {out}:\n" + "\n".join(errors[:200]))
            print(f"links ok: {stats}")
            return 0
        s = build(out, work, force=a.force, jobs=a.jobs, check=not a.no_check, nbs=a.nbs and Path(a.nbs))
    except DocsError as e:
        print(f"make docs: {e}", file=sys.stderr)
        return 1
    print(f"docs: {s['notebooks']} notebooks -> {out}/index.html  (nbdev processing {s['process_s']} s, "
          f"sphinx {s['render_s']} s)")
    if not a.no_check:
        print(f"links ok: {s['pages']} pages, {s['internal']} internal links/assets, "
              f"{s['external_links']} external links (not followed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
