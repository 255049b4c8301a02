"""The CI gate itself: a notebook saved with execution counts, or edited without re-export, fails `make test`."""
import json
import shutil
import subprocess
import sys
from configparser import ConfigParser
from pathlib import Path

import pytest

import xmretrieval

ROOT = Path(__file__).resolve().parent.parent


def test_version_matches_settings():
    cfg = ConfigParser(delimiters=["="])
    cfg.read(ROOT / "settings.ini")
    assert xmretrieval.__version__ == cfg["DEFAULT"]["version"]


@pytest.fixture
def project(tmp_path):
    for name in ("nbs", "xmretrieval", "tools"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("settings.ini", "pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def check(root):
    return subprocess.run([sys.executable, str(root / "tools" / "check_sync.py")], capture_output=True, text=True)


def test_clean_tree_passes(project):
    r = check(project)
    assert r.returncode == 0, r.stderr


def test_execution_counts_fail_with_instructions(project):
    nb_path = project / "nbs" / "00_core.ipynb"
    nb = json.loads(nb_path.read_text())
    code = next(c for c in nb["cells"] if c["cell_type"] == "code")
    code["execution_count"] = 7
    nb_path.write_text(json.dumps(nb, indent=1))
    r = check(project)
    assert r.returncode != 0
    assert "nbs/00_core.ipynb" in r.stderr and "nbdev_clean" in r.stderr


def test_edit_without_export_fails_with_instructions(project):
    nb_path = project / "nbs" / "00_core.ipynb"
    nb = json.loads(nb_path.read_text())
    cell = next(c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).startswith("#| export"))
    cell["source"] = "".join(cell["source"]) + "\nNEW_CONSTANT = 1\n"
    nb_path.write_text(json.dumps(nb, indent=1) + "\n")
    subprocess.run([str(Path(sys.executable).parent / "nbdev_clean")], cwd=project, check=True)
    r = check(project)
    assert r.returncode != 0
    assert "xmretrieval/core.py" in r.stderr and "nbdev_export" in r.stderr
