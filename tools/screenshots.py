"""Screenshots of the built docs site in headless Chromium: `make docs-screenshots` -> screenshots/*.png.

Usage: python tools/screenshots.py [PAGE ...] [--site _site] [--out screenshots] [--width 1280] [--height 1600]
PAGE is a page name of the site (`index`, `core`, `similarity`, `models.dive`, ...; default: index core
similarity, the front page, an API page and a page with formulas). The site is served by a local
http.server on 127.0.0.1 (MathJax loads its fonts with requests that file:// URLs would block) and Chromium
runs with no network access beyond it. Needs Debian's `chromium` (apt-get install chromium).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PAGES = ["index", "core", "similarity"]


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    sys.exit("screenshots: Chromium not found. Install Debian's package: `apt-get install -y chromium` "
             "(as root), then run `make docs-screenshots` again.")


@contextlib.contextmanager
def serve(site: Path):
    "Serve `site` on 127.0.0.1 (a free port) in a thread; yields the base URL."
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    handler = functools.partial(Quiet, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def _chromium(chromium: str, url: str, *args: str, width: int = 1280, height: int = 1600,
              budget_ms: int = 15000) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="xmr-chromium-") as profile:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-extensions", "--disable-default-apps", "--hide-scrollbars", "--mute-audio",
               f"--user-data-dir={profile}", f"--window-size={width},{height}",
               f"--virtual-time-budget={budget_ms}",  # let MathJax typeset before the picture is taken
               *args, url]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def screenshot(chromium: str, url: str, png: Path, width: int, height: int) -> None:
    r = _chromium(chromium, url, f"--screenshot={png}", width=width, height=height)
    if r.returncode or not png.exists() or png.stat().st_size == 0:
        raise RuntimeError(f"chromium failed for {url} (exit {r.returncode}):\n{r.stderr[-2000:]}")


def typeset_math(chromium: str, url: str) -> tuple[int, int]:
    "(formulas in the page, formulas MathJax typeset without a TeX error) after the page's scripts ran."
    r = _chromium(chromium, url, "--dump-dom")
    if r.returncode:
        raise RuntimeError(f"chromium failed for {url} (exit {r.returncode}):\n{r.stderr[-2000:]}")
    dom = r.stdout
    return dom.count('class="math notranslate'), dom.count("<mjx-container") - dom.count("<mjx-merror")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("pages", nargs="*", default=DEFAULT_PAGES, help="page names (default: %(default)s)")
    ap.add_argument("--site", default=str(ROOT / "_site"))
    ap.add_argument("--out", default=str(ROOT / "screenshots"))
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=1600)
    a = ap.parse_args(argv)
    site, out = Path(a.site).resolve(), Path(a.out).resolve()
    if not (site / "index.html").exists():
        sys.exit(f"screenshots: no site in {site}: run `make docs` first.")
    chromium = find_chromium()
    out.mkdir(parents=True, exist_ok=True)
    missing = [p for p in a.pages if not (site / f"{p.removesuffix('.html')}.html").exists()]
    if missing:
        have = sorted(f.stem for f in site.glob("*.html") if f.stem not in ("genindex", "search"))
        sys.exit(f"screenshots: no page {missing} in {site}; pages: {', '.join(have)}")
    bad = []
    with serve(site) as base:
        for page in a.pages:
            page = page.removesuffix(".html")
            png = out / f"{page}.png"
            png.unlink(missing_ok=True)
            url = f"{base}/{page}.html"
            screenshot(chromium, url, png, a.width, a.height)
            n_math, n_done = typeset_math(chromium, url)
            print(f"{png.relative_to(ROOT) if png.is_relative_to(ROOT) else png}"
                  + (f"  ({n_done} of {n_math} formulas typeset by MathJax, no TeX errors)" if n_math and n_done >= n_math
                     else f"  ({n_done} of {n_math} formulas typeset without a TeX error)" if n_math else ""))
            if n_math and n_done < n_math:
                bad.append(page)
    if bad:
        print(f"screenshots: MathJax did not typeset every formula on {bad} (look at the pictures: TeX errors "
              f"show in red)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
