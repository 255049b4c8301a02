"""Execute notebooks in place (outputs kept for the docs), then clean them with nbdev_clean.

Usage: python tools/run_nb.py nbs/00_core.ipynb [more.ipynb ...]
Runs each notebook in-process with execnb (the engine nbdev_test uses), from the notebook's folder.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from execnb.nbio import read_nb, write_nb
from execnb.shell import CaptureShell


def run_nb(path: Path) -> None:
    nb = read_nb(path)
    cwd = os.getcwd()
    os.chdir(path.parent)
    try:
        CaptureShell().run_all(nb, exc_stop=True)
    finally:
        os.chdir(cwd)
    write_nb(nb, path)


if __name__ == "__main__":
    paths = [Path(p).resolve() for p in sys.argv[1:]]
    if not paths:
        sys.exit(__doc__)
    for p in paths:
        print(f"running {p.name}", flush=True)
        run_nb(p)
    subprocess.run([str(Path(sys.executable).parent / "nbdev_clean")], check=True)
