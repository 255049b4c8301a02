"""CI gate, part 1: the notebooks are clean and the library is in sync with them.

Runs `nbdev_clean` and `nbdev_export` and fails, naming the files and the command to run, if either
changed anything. Works with or without git (compares file hashes before and after).
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def snapshot(*globs: str) -> dict[str, str]:
    return {str(p.relative_to(ROOT)): hashlib.sha256(p.read_bytes()).hexdigest()
            for g in globs for p in sorted(ROOT.glob(g)) if p.is_file()}


def changed(before: dict, after: dict) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def run(cmd: str) -> None:
    r = subprocess.run([str(BIN / cmd)], cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{cmd} failed:\n{r.stdout}\n{r.stderr}")


def main() -> None:
    nbs = ("nbs/**/*.ipynb",)
    before = snapshot(*nbs)
    run("nbdev_clean")
    dirty = changed(before, snapshot(*nbs))
    if dirty:
        sys.exit("These notebooks were not clean (execution counts or metadata saved):\n  " + "\n  ".join(dirty)
                 + "\nnbdev_clean has now cleaned them: review and commit (`make clean-nbs` does the same).")
    lib = ("xmretrieval/**/*.py", "pyproject.toml")
    before = snapshot(*lib)
    run("nbdev_export")
    stale = changed(before, snapshot(*lib))
    if stale:
        sys.exit("The library is out of sync with the notebooks (a notebook was edited without re-export):\n  "
                 + "\n  ".join(stale) + "\nnbdev_export has now re-exported it: review and commit "
                 "(`make export` does the same). Never edit xmretrieval/ by hand.")
    print("sync-check: notebooks clean, library in sync with nbs/")


if __name__ == "__main__":
    main()
