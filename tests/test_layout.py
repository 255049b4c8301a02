"""Library layout: models never import the trainer, the experiments or the CLI; the top-level API; the registries."""
import ast
from pathlib import Path

import pytest

import xmretrieval

PKG = Path(xmretrieval.__file__).resolve().parent
FORBIDDEN = ("xmretrieval.train", "xmretrieval.repro", "xmretrieval.reproduce", "xmretrieval.cli")


def imported_modules(path: Path) -> set[str]:
    "Absolute names of every module imported anywhere in `path` (module level and inside functions)."
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    package = parts[:-1] if parts[-1] != "__init__" else parts
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import): out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}     # `from xmretrieval import train`
    return out


def test_imported_modules_resolves_relative_imports(tmp_path):
    mods = imported_modules(PKG / "models" / "dive.py")
    assert "xmretrieval.models.base" in mods and "xmretrieval.core" in mods


@pytest.mark.parametrize("path", sorted((PKG / "models").glob("*.py")), ids=lambda p: p.name)
def test_models_never_import_train_repro_or_cli(path):
    bad = sorted(m for m in imported_modules(path) if m.startswith(FORBIDDEN))
    assert not bad, f"{path.name} imports {bad}: model modules hold models only"


def test_model_modules_import_without_the_trainer():
    import subprocess, sys
    code = ("import sys, xmretrieval.models.biencoder, xmretrieval.models.dive, xmretrieval.checkpoint; "
            "bad = [m for m in sys.modules if m.startswith(('xmretrieval.train', 'xmretrieval.repro', 'xmretrieval.cli'))]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_top_level_api():
    import xmretrieval as xmr
    from xmretrieval.checkpoint import load_checkpoint
    from xmretrieval.index import Gallery
    assert xmr.load_checkpoint is load_checkpoint and xmr.Gallery is Gallery
    assert set(xmr.__all__) <= set(dir(xmr)) and xmr.__version__
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        xmr.nope


def test_train_reexports_the_inference_surface():
    import xmretrieval.checkpoint as ck
    import xmretrieval.train as tr
    for name in ("load_checkpoint", "load_config", "read_checkpoint", "save_checkpoint", "evaluate", "TrainConfig",
                 "DataConfig", "OptimConfig", "load_split"):
        assert getattr(tr, name) is getattr(ck, name)


def test_registries_find_models_and_reproductions():
    from xmretrieval.models.base import MODELS, get_model_class
    from xmretrieval.reproduce import REPRODUCTIONS
    assert {"biencoder", "dive"} <= set(MODELS.names())
    assert get_model_class("dive").__module__ == "xmretrieval.models.dive"
    names = REPRODUCTIONS.names()
    assert names.index("biencoder") < names.index("dive")
    assert REPRODUCTIONS["dive"].__module__ == "xmretrieval.repro.dive"
