"""Bad inputs and faults at the public entry points (issue 11), grouped by entry point.

Every case is registered with `@case(entry, what, error, names)`:
- `error` set: the call must raise that `XMRError` subclass and its message must match `names` (the argument,
  field or file it is about);
- `error=None`: the call must give the right result (the case function asserts it).
Cases about data loss assert that nothing was overwritten. `tools/reliability_table.py` reads `CASES` and writes
the docs page nbs/95_reliability.ipynb (counts by entry point and outcome, and the list of cases).

Dedicated tests at the end: the cold-cache test (the same seed gives the same numbers whether or not the
feature cache existed).
"""
from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xmretrieval.core import ConfigError, DataError, WriteError, XMRError, atomic_path, check_writable


@dataclass(frozen=True)
class Case:
    entry: str                         # the entry point: CLI, config, checkpoint, index, readers, trainer, ...
    what: str                          # the bad input or fault, in words (the docs table)
    run: Callable[[Path], object]      # performs the call in a scratch folder
    error: type | None = None          # the XMRError subclass expected; None: the right result (asserted by `run`)
    names: str = ""                    # regex the message must match: the argument, field or file named
    data_loss: bool = False            # a case that used to lose data: `run` also asserts that nothing was overwritten

    @property
    def outcome(self) -> str:
        "What the docs table counts: clear error / clear error, nothing overwritten / right result."
        if self.error is None: return "right result"
        return "clear error, nothing overwritten" if self.data_loss else "clear error"

    @property
    def detail(self) -> str:
        "The outcome with the error class (the command line's: exit code 2 and the message)."
        if self.error is None: return "right result"
        err = "exit code 2 + message" if self.error.__name__ == "CLIExit2" else self.error.__name__
        return f"{self.outcome} ({err})"


CASES: list[Case] = []


def case(entry: str, what: str, error: type | None = None, names: str = "", data_loss: bool = False):
    "Register the decorated function `f(tmp: Path)` as a case."
    def deco(fn):
        CASES.append(Case(entry, what, fn, error, names, data_loss))
        return fn
    return deco


def test_cases_are_distinct():
    keys = [(c.entry, c.what) for c in CASES]
    assert len(keys) == len(set(keys)), [k for k in keys if keys.count(k) > 1]


# ---------------------------------------------------------------------------------------------------- config
from xmretrieval.data.features import FeatureConfig  # noqa: E402
from xmretrieval.index import IndexConfig  # noqa: E402
from xmretrieval.train import OptimConfig, TrainConfig  # noqa: E402


def _yaml(tmp: Path, text: str) -> Path:
    p = tmp / "run.yaml"
    p.write_text(text)
    return p


@case("config", "YAML `lr: 1e-3` (a string to PyYAML) is read as the number 0.001")
def _(tmp):
    cfg = TrainConfig.load(_yaml(tmp, "optim:\n  lr: 1e-3\nepochs: 2\n"))
    assert cfg.optim.lr == 0.001 and isinstance(cfg.optim.lr, float)


@case("config", '`"seed": "0"` (a numeric string) is read as the int 0')
def _(tmp):
    assert TrainConfig.from_dict({"seed": "0"}).seed == 0


@case("config", '`"seed": "zero"`', ConfigError, r"TrainConfig\.seed must be int")
def _(tmp):
    TrainConfig.from_dict({"seed": "zero"})


@case("config", '`"seed": 0.5`', ConfigError, r"TrainConfig\.seed must be int, got 0\.5")
def _(tmp):
    TrainConfig.from_dict({"seed": 0.5})


@case("config", '`"epochs": true` (a bool where an int belongs)', ConfigError, r"TrainConfig\.epochs must be int")
def _(tmp):
    TrainConfig.from_dict({"epochs": True})


@case("config", '`"normalized": "false"` is read as False, not as a true string')
def _(tmp):
    assert IndexConfig.from_dict({"normalized": "false"}).normalized is False


@case("config", '`"normalized": "no"` (not strictly true/false)', ConfigError, r"IndexConfig\.normalized must be bool")
def _(tmp):
    IndexConfig.from_dict({"normalized": "no"})


@case("config", '`"bf16": 1` (an int where a bool belongs)', ConfigError, r"TrainConfig\.bf16 must be bool")
def _(tmp):
    TrainConfig.from_dict({"bf16": 1})


@case("config", '`"lr": "fast"`', ConfigError, r"OptimConfig\.lr must be float, got 'fast'")
def _(tmp):
    TrainConfig.from_dict({"optim": {"lr": "fast"}})


@case("config", "`lr: .nan` in YAML", ConfigError, r"OptimConfig\.lr must be float")
def _(tmp):
    TrainConfig.load(_yaml(tmp, "optim:\n  lr: .nan\n"))


@case("config", '`"betas": [0.9]` (one value for a pair)', ConfigError, r"OptimConfig\.betas must be tuple\[float, float\]")
def _(tmp):
    OptimConfig.from_dict({"betas": [0.9]})


@case("config", '`"data": "emoji-scenes"` (a string where a nested config belongs)', ConfigError,
      r"TrainConfig\.data must be DataConfig")
def _(tmp):
    TrainConfig.from_dict({"data": "emoji-scenes"})


@case("config", '`"device": 0` (an int where a string belongs)', ConfigError, r"TrainConfig\.device must be str")
def _(tmp):
    TrainConfig.from_dict({"device": 0})


@case("config", "a config file with invalid UTF-8", ConfigError, r"run\.yaml")
def _(tmp):
    (tmp / "run.yaml").write_bytes(b"epochs: \xff\xfe\n")
    TrainConfig.load(tmp / "run.yaml")


@case("config", "`FeatureConfig(image_batch_size=0)`", ConfigError, r"FeatureConfig\.image_batch_size must be >= 1")
def _(tmp):
    FeatureConfig(image_batch_size=0)


# ------------------------------------------------------------------------------------ similarity and metrics
from xmretrieval.metrics import chunked_retrieval_metrics, protocol_metrics, retrieval_metrics  # noqa: E402
from xmretrieval.similarity import candidate_set_similarity, smooth_chamfer  # noqa: E402


def _sets(n: int, k: int = 4, d: int = 8, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, k, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


@case("similarity & metrics", "`smooth_chamfer` on fp16 sets (e^16 overflows fp16) is finite and matches fp32")
def _(tmp):
    x = _sets(3)
    s = smooth_chamfer(x.half(), x.half())
    assert s.dtype == torch.float16 and bool(torch.isfinite(s).all())
    assert torch.allclose(s.float(), smooth_chamfer(x.half().float(), x.half().float()), atol=2e-3)


@case("similarity & metrics", "`candidate_set_similarity` on fp16 sets is finite")
def _(tmp):
    x = _sets(3).half()
    assert bool(torch.isfinite(candidate_set_similarity(x, x[None].expand(3, 3, 4, 8))).all())


for _bad in ("inf", "nan", "0", "-1"):
    @case("similarity & metrics", f"`smooth_chamfer(alpha={_bad})`", ConfigError, r"`alpha` must be a finite number > 0")
    def _(tmp, _bad=_bad):
        smooth_chamfer(_sets(2), _sets(3), alpha=float(_bad))


@case("similarity & metrics", "`retrieval_metrics(chunk_size=0)`", ConfigError, r"`chunk_size` must be a positive int")
def _(tmp):
    retrieval_metrics(torch.eye(3), torch.arange(3), chunk_size=0)


@case("similarity & metrics", "`chunked_retrieval_metrics(chunk_size=-1)`", ConfigError, r"`chunk_size`")
def _(tmp):
    chunked_retrieval_metrics(lambda a, b: torch.eye(3)[a:b], torch.arange(3), 3, chunk_size=-1)


@case("similarity & metrics", "`protocol_metrics(chunk_size=0)`", ConfigError, r"`chunk_size`")
def _(tmp):
    protocol_metrics(torch.eye(3), torch.arange(3), "msvd", chunk_size=0)


# --------------------------------------------------------------------------------------------------- readers
from xmretrieval.data.published import (load_features, read_didemo, read_karpathy, read_msrvtt, read_msvd,  # noqa: E402
                                        read_precomp)


def _frames(tmp: Path, vids=("video0", "video1")) -> Path:
    d = tmp / "frames"
    d.mkdir(exist_ok=True)
    for i, v in enumerate(vids):
        np.save(d / f"{v}.npy", np.full((3, 8), i, np.float32))
    return d


def _karpathy(tmp: Path) -> tuple[Path, Path]:
    imgs = [{"filename": f"{i}.jpg", "split": "test", "sentences": [{"raw": f"image {i} caption {k}"} for k in range(5)]}
            for i in range(2)]
    (tmp / "dataset_coco.json").write_text(json.dumps({"images": imgs, "dataset": "coco"}))
    np.savez(tmp / "f.npz", **{str(i): np.ones((4, 8), np.float32) for i in range(2)})
    return tmp / "dataset_coco.json", tmp / "f.npz"


for _bad in (-1, 0):
    @case("readers", f"`read_karpathy(captions_per_image={_bad})`", ConfigError, r"`captions_per_image` must be an int >= 1")
    def _(tmp, _bad=_bad):
        read_karpathy(*_karpathy(tmp), captions_per_image=_bad)


@case("readers", "`load_features(max_len=0)`", ConfigError, r"`max_len`")
def _(tmp):
    load_features(_frames(tmp), ["video0"], max_len=0)


def _msvd(tmp: Path, obj) -> Path:
    m = tmp / "msvd"
    m.mkdir()
    (m / "test_list.txt").write_text("video0\n")
    with open(m / "raw-captions.pkl", "wb") as fh:
        pickle.dump(obj, fh)
    return m


class _RunsCode:
    def __init__(self, target: Path): self.target = target
    def __reduce__(self): return (os.mkdir, (str(self.target),))


@case("readers", "`read_msvd` on a pickle that would run code: refused, and the code does not run", DataError,
      r"raw-captions\.pkl.*trust_pickle=True")
def _(tmp):
    m = _msvd(tmp, {"video0": [["a", "dog"]], "payload": _RunsCode(tmp / "pwned")})
    try:
        read_msvd(m, _frames(tmp), "test")
    finally:
        assert not (tmp / "pwned").exists(), "the pickle's code ran"


@case("readers", "`read_msvd` captions that are not token lists", DataError, r"raw-captions\.pkl.*video0")
def _(tmp):
    read_msvd(_msvd(tmp, {"video0": [["a", 3]]}), _frames(tmp), "test")


@case("readers", "`read_msvd` on the published layout (a dict of token lists) still reads")
def _(tmp):
    d = read_msvd(_msvd(tmp, {"video0": [["a", "dog"], ["a", "cat"]]}), _frames(tmp), "test")
    assert d.captions == ["a dog", "a cat"]


def _msrvtt_test_csv(tmp: Path, text: str, bom: bool = False) -> Path:
    m = tmp / "msrvtt"
    m.mkdir(exist_ok=True)
    (m / "MSRVTT_JSFUSION_test.csv").write_bytes(text.encode("utf-8-sig" if bom else "utf-8"))
    return m


@case("readers", "MSRVTT test CSV with a UTF-8 byte-order mark (saved by Excel)")
def _(tmp):
    m = _msrvtt_test_csv(tmp, "key,vid_key,video_id,sentence\nret0,msr0,video0,a dog\nret1,msr1,video1,a cat\n", bom=True)
    d = read_msrvtt(m, _frames(tmp), "test")
    assert d.visual_ids == ["video0", "video1"] and d.captions == ["a dog", "a cat"]


@case("readers", "MSRVTT test CSV with only a header", DataError, r"MSRVTT_JSFUSION_test\.csv has no data rows")
def _(tmp):
    read_msrvtt(_msrvtt_test_csv(tmp, "key,vid_key,video_id,sentence\n"), _frames(tmp), "test")


@case("readers", "MSRVTT test CSV with a short row", DataError, r"MSRVTT_JSFUSION_test\.csv line 2")
def _(tmp):
    read_msrvtt(_msrvtt_test_csv(tmp, "key,vid_key,video_id,sentence\nret0,msr0,video0\n"), _frames(tmp), "test")


def _msrvtt_json(tmp: Path, drop: tuple[str, str]) -> Path:
    m = tmp / "msrvtt"
    m.mkdir(exist_ok=True)
    videos = [{"video_id": "video0", "split": "train"}, {"video_id": "video1", "split": "validate"}]
    sents = [{"video_id": v, "caption": f"{v} caption"} for v in ("video0", "video1")]
    d = {"videos": videos, "sentences": sents}
    del d[drop[0]][1][drop[1]]
    (m / "MSRVTT_data.json").write_text(json.dumps(d))
    (m / "MSRVTT_train.9k.csv").write_text("video_id\nvideo0\n")
    return m


@case("readers", "MSRVTT JSON sentence without `caption`", DataError, r"MSRVTT_data\.json: sentences\[1\].*'caption'")
def _(tmp):
    read_msrvtt(_msrvtt_json(tmp, ("sentences", "caption")), _frames(tmp), "train")


@case("readers", "MSRVTT JSON sentence without `video_id`", DataError, r"MSRVTT_data\.json: sentences\[1\].*'video_id'")
def _(tmp):
    read_msrvtt(_msrvtt_json(tmp, ("sentences", "video_id")), _frames(tmp), "train")


@case("readers", "MSRVTT JSON video without `video_id`", DataError, r"MSRVTT_data\.json: videos\[1\].*'video_id'")
def _(tmp):
    read_msrvtt(_msrvtt_json(tmp, ("videos", "video_id")), _frames(tmp), "val")


def _didemo(tmp: Path, description) -> Path:
    m = tmp / "didemo"
    m.mkdir()
    (m / "test_list.txt").write_text("video0.mp4\n")
    (m / "test_data.json").write_text(json.dumps([{"video": "video0.mp4", "description": description}]))
    return m


@case("readers", "DiDeMo `description: null`", DataError, r"test_data\.json: moment 0.*'description'")
def _(tmp):
    read_didemo(_didemo(tmp, None), _frames(tmp), "test")


@case("readers", "DiDeMo `description` given as a list of sentences (joined)")
def _(tmp):
    assert read_didemo(_didemo(tmp, ["a dog", "runs"]), _frames(tmp), "test").captions == ["a dog runs"]


def _precomp(tmp: Path, n: int, caps: str) -> Path:
    p = tmp / "coco_precomp"
    p.mkdir()
    np.save(p / "test_ims.npy", np.zeros((n, 2, 8), np.float32))
    (p / "test_caps.txt").write_text(caps)
    return p


@case("readers", "precomp folder with 0 images", DataError, r"test_ims\.npy holds no images")
def _(tmp):
    read_precomp(_precomp(tmp, 0, "a\n"), "test")


for _bad in (0, -3):
    @case("readers", f"`read_precomp(max_images={_bad})`", ConfigError, r"`max_images` must be an int >= 1")
    def _(tmp, _bad=_bad):
        read_precomp(_precomp(tmp, 2, "a\nb\n"), "test", max_images=_bad)


# ------------------------------------------------------------------------------------------ feature cache
from xmretrieval.data.core import (BENCHMARKS, Benchmark, RetrievalData, benchmark_path, load_benchmark,  # noqa: E402
                                   load_data, register_benchmark, save_data)


def _toy_data(seed: int = 0) -> RetrievalData:
    g = torch.Generator().manual_seed(seed)
    return RetrievalData(name="toy", split="test", visual_ids=["a", "b"], visual_global=torch.rand(2, 4, generator=g),
                         visual_local=torch.rand(2, 3, 4, generator=g), visual_mask=None, captions=["x", "y"],
                         text_to_visual=torch.tensor([0, 1]), text_global=torch.rand(2, 4, generator=g))


@pytest.fixture(autouse=True)
def _toy_benchmark():
    register_benchmark(Benchmark("toy-reliab", ("tiny",), manifest=lambda p, s: {"v": 1},
                                 build=lambda p, s: (torch.rand(7), _toy_data())[1]))   # draws from the global RNG
    yield
    BENCHMARKS.pop("toy-reliab", None)


def _flip_bit(path: Path, offset_from_end: int = 3) -> None:
    raw = bytearray(path.read_bytes())
    raw[-offset_from_end] ^= 0x04
    path.write_bytes(bytes(raw))


@case("files & cache", "a bit flipped in a cached tensor: warned about and rebuilt, the rebuilt data is correct")
def _(tmp):
    good = load_benchmark("toy-reliab", "tiny", "test", cache_dir=tmp)
    f = benchmark_path("toy-reliab", "tiny", "test", tmp)
    _flip_bit(f)
    with pytest.warns(UserWarning, match=r"toy-reliab/tiny-test\.safetensors' is corrupt"):
        again = load_benchmark("toy-reliab", "tiny", "test", cache_dir=tmp)
    assert torch.equal(again.visual_local, good.visual_local) and torch.equal(again.text_global, good.text_global)


@case("files & cache", "`load_data` on a saved split with a flipped bit returns None (treated as missing)")
def _(tmp):
    save_data(_toy_data(), tmp / "s.safetensors")
    _flip_bit(tmp / "s.safetensors")
    with pytest.warns(UserWarning, match="is corrupt"):
        assert load_data(tmp / "s.safetensors") is None


@case("files & cache", "building into a cache folder that is a file", WriteError, r"feature cache folder .*not-a-folder")
def _(tmp):
    (tmp / "not-a-folder").write_text("")
    load_benchmark("toy-reliab", "tiny", "test", cache_dir=tmp / "not-a-folder")


@case("files & cache", "a fresh build draws no numbers from the caller's global RNG and equals a cached load")
def _(tmp):
    torch.manual_seed(0)
    fresh = load_benchmark("toy-reliab", "tiny", "test", cache_dir=tmp)
    after_fresh = torch.rand(4)
    torch.manual_seed(0)
    cached = load_benchmark("toy-reliab", "tiny", "test", cache_dir=tmp)
    assert torch.equal(torch.rand(4), after_fresh)
    for k in ("visual_global", "visual_local", "text_global"):
        assert torch.equal(getattr(fresh, k), getattr(cached, k)), k


@case("files & cache", "a full disk while writing a file (simulated with a file-size limit)", WriteError, r"keep\.txt")
def _(tmp):
    import resource
    import signal
    (tmp / "keep.txt").write_text("old")
    old_sig, old_lim = signal.signal(signal.SIGXFSZ, signal.SIG_IGN), resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, old_lim[1]))
    try:
        with atomic_path(tmp / "keep.txt") as p:
            p.write_text("x" * 100_000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_lim)
        signal.signal(signal.SIGXFSZ, old_sig)
        assert (tmp / "keep.txt").read_text() == "old" and not list(tmp.glob(".keep.txt*"))


@case("files & cache", "`check_writable` on a path below a file", WriteError, r"output folder .*a-file")
def _(tmp):
    (tmp / "a-file").write_text("")
    check_writable(tmp / "a-file" / "run")


# ------------------------------------------------------------------------------------------- run the cases
@pytest.mark.parametrize("c", CASES, ids=lambda c: f"{c.entry}: {c.what}")
def test_bad_input(c: Case, tmp_path):
    if c.error is None:
        c.run(tmp_path)
        return
    assert issubclass(c.error, XMRError)
    with pytest.raises(c.error) as e:
        c.run(tmp_path)
    assert re.search(c.names, str(e.value)), f"message {str(e.value)!r} does not name {c.names!r}"


# ------------------------------------------------------------------------------- dedicated tests (not CASES)
def test_cold_cache_same_numbers(tmp_path, monkeypatch):
    "Two fits of biencoder_tiny with the same seed, the first on an empty cache, give identical metrics and weights."
    from xmretrieval.train import Trainer, load_config
    monkeypatch.setenv("XMR_CACHE", str(tmp_path / "cache"))
    cfg = load_config("biencoder_tiny", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cold = Trainer(cfg)
        s_cold = cold.fit()
        assert any((tmp_path / "cache").rglob("*.safetensors")), "the first fit did not build the cache"
        warm = Trainer(cfg)
        s_warm = warm.fit()
    assert s_cold["test"] == s_warm["test"] and s_cold["val"] == s_warm["val"]
    a, b = cold.model.state_dict(), warm.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


DEDICATED = [
    ("trainer", "the first fit on an empty feature cache: the same metrics and weights as a second fit (same seed)",
     "right result",
     "test_cold_cache_same_numbers"),
]


# ======================================================================== trained run, checkpoint and index (shared)
import contextlib  # noqa: E402
import functools  # noqa: E402
import io  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

from xmretrieval.checkpoint import DataConfig, evaluate, load_checkpoint  # noqa: E402
from xmretrieval.core import CheckpointError, LockError, ShapeError, file_digest  # noqa: E402
from xmretrieval.index import Gallery, SetIndexConfig  # noqa: E402
from xmretrieval.train import Trainer, TrainingError, train_seeds  # noqa: E402
from xmretrieval.cli import main as xmr  # noqa: E402


def _splits(folder: Path, seed: int = 0) -> Path:
    "train/val/test splits of random features (visual 16-d, text 384-d like MiniLM), saved as a data folder."
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 32), ("val", 16), ("test", 16)):
        m = 2 * n
        tl = torch.randn(m, 5, 384, generator=g)
        save_data(RetrievalData(name="toy", split=split, visual_ids=[f"{split}{i}" for i in range(n)],
                                visual_global=torch.randn(n, 16, generator=g), visual_local=torch.randn(n, 3, 16, generator=g),
                                visual_mask=None, captions=[f"caption {j}" for j in range(m)],
                                text_to_visual=torch.arange(n).repeat_interleave(2), text_global=tl.mean(1), text_local=tl,
                                text_mask=torch.ones(m, 5, dtype=torch.bool)), folder / f"{split}.safetensors")
    return folder


def _config(data: Path, **changes) -> TrainConfig:
    base = dict(model="biencoder", model_config={"embed_dim": 16, "head": "linear"}, data=DataConfig(path=str(data)),
                epochs=2, batch_size=8, eval_batch_size=64, progress=False, device="cpu")
    return TrainConfig(**{**base, **changes})


@functools.lru_cache(maxsize=None)
def _trained() -> Path:
    "A finished run (seed 0) with an index of its test split, built once per session: copy before damaging."
    root = Path(tempfile.mkdtemp(prefix="xmr-reliab-"))
    data = _splits(root / "data")
    cfg = _config(data)
    _config(data).save(root / "config.json")
    Trainer(cfg, root / "run").fit()
    Trainer(cfg.replace(seed=1), root / "other").fit()
    assert _xmr(["index", str(root / "run" / "best.safetensors"), "--out", str(root / "run" / "test.index")])[0] == 0
    return root


def _copy(tmp: Path) -> Path:
    "A private copy of the trained run folder (checkpoints + index) in `tmp`."
    shutil.copytree(_trained() / "run", tmp / "run")
    for f in (tmp / "run").glob("*.xmr.json"):   # the copy's index is bound to the copy's checkpoint
        meta = json.loads(f.read_text()); meta["checkpoint"] = str(tmp / "run" / "best.safetensors")
        f.write_text(json.dumps(meta))
    return tmp / "run"


def _xmr(argv: list[str]) -> tuple[int, str, str]:
    "Run the `xmr` command line in-process: (exit code, stdout, stderr)."
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = xmr([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


class CLIExit2(XMRError):
    "The command line printed an error and exited with code 2 (the message is its stderr)."


def _xmr_fails(argv: list[str]) -> None:
    rc, out, err = _xmr(argv)
    assert rc == 2 and err.startswith(f"xmr {argv[0]}: error:"), (rc, out, err)
    raise CLIExit2(err)


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: file_digest(p) for p in sorted(folder.iterdir()) if p.is_file()}


# -------------------------------------------------------------------------------------------------- CLI
@case("CLI", "`xmr train --seeds 0,0` (a repeated seed)", CLIExit2, r"--seeds repeats \[0\]")
def _(tmp):
    _xmr_fails(["train", _trained() / "config.json", "--out", tmp / "runs", "--seeds", "0,0"])


@case("CLI", "`xmr train --out` naming a file", CLIExit2, r"run folder .*a-file.* not writable")
def _(tmp):
    (tmp / "a-file").write_text("")
    _xmr_fails(["train", _trained() / "config.json", "--out", tmp / "a-file"])


@case("CLI", "`xmr train --out` a folder holding best + metrics but no last: refused, nothing overwritten", CLIExit2,
      r"already holds a run \(best\.safetensors, metrics\.json.*nothing was overwritten", data_loss=True)
def _(tmp):
    run = _copy(tmp)
    (run / "last.safetensors").unlink()
    before = _digests(run)
    try:
        _xmr_fails(["train", _trained() / "config.json", "--out", run])
    finally:
        assert _digests(run) == before


@case("CLI", "`xmr train` when the disk fills up while writing a checkpoint (a file-size limit)", CLIExit2,
      r"cannot write .*\.safetensors' \(nothing was written\)")
def _(tmp):
    # the child limits its own files to 20 kB (the checkpoints are larger) before it runs the CLI: a preexec_fn would
    # fork this process, and the gRPC threads the Milvus tests leave here abort a forked child now and then
    small_disk = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                  "resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000)); "
                  "from xmretrieval.cli import main; sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, "-c", small_disk, "train", str(_trained() / "config.json"), "--out", str(tmp / "run")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert not list((tmp / "run").glob("*.tmp")) and not list((tmp / "run").glob(".*.tmp")), "a temporary file was left"
    assert not (tmp / "run" / "last.safetensors").exists() and not (tmp / "run" / "best.safetensors").exists()
    assert r.returncode == 2 and r.stderr.startswith("xmr train: error:"), (r.returncode, r.stderr[-2000:])
    raise CLIExit2(r.stderr)


@case("CLI", "`xmr eval --out` naming a path below a file", CLIExit2, r"a-file")
def _(tmp):
    (tmp / "a-file").write_text("")
    _xmr_fails(["eval", _trained() / "run" / "best.safetensors", "--out", tmp / "a-file" / "m.json"])


for _q in ("", "   "):
    @case("CLI", f"`xmr search` with the query {_q!r}", CLIExit2, r"`query` is empty")
    def _(tmp, _q=_q):
        _xmr_fails(["search", _copy(tmp) / "test.index", _q])


@case("CLI", "`xmr search` after the checkpoint was replaced by another run's", CLIExit2,
      r"checkpoint .*best\.safetensors' changed since index .*rebuild", data_loss=True)
def _(tmp):
    run = _copy(tmp)
    shutil.copy(_trained() / "other" / "best.safetensors", run / "best.safetensors")
    _xmr_fails(["search", run / "test.index", "caption 1"])


@case("CLI", "`xmr search` with a corrupt .xmr.json", CLIExit2, r"test\.index\.xmr\.json' is unreadable")
def _(tmp):
    run = _copy(tmp)
    (run / "test.index.xmr.json").write_text("{not json")
    _xmr_fails(["search", run / "test.index", "caption 1"])


@case("CLI", "`xmr search` with an .xmr.json from before indexes were bound to their checkpoint", CLIExit2,
      r"test\.index\.xmr\.json' lacks .*rebuild it with `xmr index`")
def _(tmp):
    run = _copy(tmp)
    meta = json.loads((run / "test.index.xmr.json").read_text())
    (run / "test.index.xmr.json").write_text(json.dumps({k: meta[k] for k in ("xmr_version", "checkpoint", "data", "split")}))
    _xmr_fails(["search", run / "test.index", "caption 1"])


@case("CLI", "`xmr search` with an edited ids.json", CLIExit2, r"ids file .*test\.index\.ids\.json' changed since index")
def _(tmp):
    run = _copy(tmp)
    ids = json.loads((run / "test.index.ids.json").read_text())
    (run / "test.index.ids.json").write_text(json.dumps(ids[::-1]))
    _xmr_fails(["search", run / "test.index", "caption 1"])


@case("CLI", "`xmr search` with a query longer than the text encoder reads: a warning, then the results")
def _(tmp):
    run = _copy(tmp)
    with pytest.warns(UserWarning, match=r"the query has \d+ tokens; only the first 32 are used"):
        rc, out, err = _xmr(["search", run / "test.index", " ".join(["dog"] * 60), "--k", "3"])
    assert rc == 0 and len(out.strip().splitlines()) == 3


# ----------------------------------------------------------------------------------------- config (trainer's)
@case("config", '`"embed_dim": 0` in the model config', ConfigError, r"BiEncoderConfig\.embed_dim must be >= 1, got 0")
def _(tmp):
    TrainConfig.from_dict({"model_config": {"embed_dim": 0}}).model_config_obj()


@case("config", '`"max_steps": -5`', ConfigError, r"TrainConfig\.max_steps must be >= 0, got -5")
def _(tmp):
    TrainConfig.from_dict({"max_steps": -5})


@case("config", "`SetIndexConfig(alpha=-1)`", ConfigError, r"SetIndexConfig\.alpha must be finite and > 0, got -1\.0")
def _(tmp):
    SetIndexConfig(alpha=-1)


@case("config", '`"lr": 0`', ConfigError, r"OptimConfig\.lr must be finite and > 0")
def _(tmp):
    TrainConfig.from_dict({"optim": {"lr": 0}})


@case("config", '`"dropout": 1.5` in the model config', ConfigError, r"BiEncoderConfig\.dropout")
def _(tmp):
    TrainConfig.from_dict({"model_config": {"dropout": 1.5}}).model_config_obj()


# ------------------------------------------------------------------------------------------------ checkpoint
@case("checkpoint", "a bit flipped in a weight tensor of best.safetensors", CheckpointError,
      r"best\.safetensors' is corrupt: tensors .* fail their checksum")
def _(tmp):
    run = _copy(tmp)
    _flip_bit(run / "best.safetensors", 9)
    load_checkpoint(run / "best.safetensors")


@case("checkpoint", "resuming from a last.safetensors with a flipped bit", CheckpointError, r"last\.safetensors' is corrupt")
def _(tmp):
    run = _copy(tmp)
    _flip_bit(run / "last.safetensors", 9)
    Trainer(_config(_trained() / "data"), run, resume=True).fit()


@case("checkpoint", "a truncated checkpoint", CheckpointError, r"best\.safetensors' is not a readable safetensors file")
def _(tmp):
    run = _copy(tmp)
    raw = (run / "best.safetensors").read_bytes()
    (run / "best.safetensors").write_bytes(raw[: len(raw) // 2])
    load_checkpoint(run / "best.safetensors")


# ----------------------------------------------------------------------------------------------------- index
@case("index", "a set gallery of K=0 sets", ShapeError, r"`embeddings` holds sets of K=0")
def _(tmp):
    Gallery(torch.zeros(4, 0, 8))


@case("index", "`Gallery.search` with int64 query embeddings", ShapeError, r"torch\.Tensor of dtype torch\.int64")
def _(tmp):
    Gallery(F.normalize(torch.randn(5, 8), dim=-1)).search(torch.ones(2, 8, dtype=torch.int64))


@case("index", "`Gallery.search` with a numpy int64 array", ShapeError, r"numpy\.ndarray of dtype torch\.int64")
def _(tmp):
    Gallery(F.normalize(torch.randn(5, 8), dim=-1)).search(np.ones((2, 8), dtype=np.int64))


@case("index", "`Gallery.search` with a Python list", ShapeError, r"got builtins\.list")
def _(tmp):
    Gallery(F.normalize(torch.randn(5, 8), dim=-1)).search([[0.0] * 8])


@case("index", "`Gallery.load` with a corrupt ids.json", CheckpointError, r"g\.index\.ids\.json' are unreadable")
def _(tmp):
    Gallery(F.normalize(torch.randn(5, 8), dim=-1)).save(tmp / "g.index")
    (tmp / "g.index.ids.json").write_text("[1, 2")
    Gallery.load(tmp / "g.index")


@case("index", "`Gallery.load` with ids.json that is not a list of strings", CheckpointError, r"must be a JSON list of strings")
def _(tmp):
    Gallery(F.normalize(torch.randn(5, 8), dim=-1)).save(tmp / "g.index")
    (tmp / "g.index.ids.json").write_text('{"a": 1}')
    Gallery.load(tmp / "g.index")


# --------------------------------------------------------------------------------------------------- trainer
@case("trainer", "`evaluate(batch_size=0)`", ConfigError, r"`batch_size` must be an int >= 1, got 0")
def _(tmp):
    model, _, _ = load_checkpoint(_trained() / "run" / "best.safetensors")
    evaluate(model, load_data(_trained() / "data" / "test.safetensors"), batch_size=0)


@case("trainer", "a run whose weights become NaN (lr=1e37): once a ShapeError 'sims contains NaN'", TrainingError, r"training diverged: .* NaN or inf after step 1")
def _(tmp):
    Trainer(_config(_trained() / "data", epochs=1, batch_size=32, optim={"lr": 1e37})).fit()


@case("trainer", "`Trainer` into a folder holding best + metrics but no last: refused, nothing overwritten",
      CheckpointError, r"already holds a run \(best\.safetensors, metrics\.json.*cannot be resumed", data_loss=True)
def _(tmp):
    run = _copy(tmp)
    (run / "last.safetensors").unlink()
    before = _digests(run)
    try:
        Trainer(_config(_trained() / "data"), run).fit()
    finally:
        assert _digests(run) == before


@case("trainer", "`Trainer` into a folder that another Trainer holds", LockError, r"run folder .* is in use by process", data_loss=True)
def _(tmp):
    from xmretrieval.core import folder_lock
    with folder_lock(tmp / "run"):
        Trainer(_config(_trained() / "data"), tmp / "run").fit()


@case("trainer", "best.safetensors replaced by another run between an interruption and the resume", CheckpointError,
      r"best\.safetensors' is not the file this run wrote", data_loss=True)
def _(tmp):
    cfg = _config(_trained() / "data", epochs=3)
    Trainer(cfg, tmp / "run").fit(stop_after_epochs=1)
    shutil.copy(_trained() / "other" / "best.safetensors", tmp / "run" / "best.safetensors")
    Trainer(cfg, tmp / "run", resume=True).fit()


@case("trainer", "`train_seeds(seeds=[1, 1])`", ConfigError, r"`seeds` repeats \[1\]")
def _(tmp):
    train_seeds(_config(_trained() / "data"), [1, 1], tmp / "runs")


@case("trainer", "`Trainer` with out_dir below a file", WriteError, r"run folder .*a-file")
def _(tmp):
    (tmp / "a-file").write_text("")
    Trainer(_config(_trained() / "data"), tmp / "a-file" / "run").fit()


def test_two_trainings_into_one_folder(tmp_path):
    "Two `xmr train --out DIR` started together: exactly one is refused (exit 2), the other finishes, no file is mixed."
    data = _splits(tmp_path / "data")
    _config(data, epochs=6).save(tmp_path / "config.json")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                      os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "xmretrieval.cli", "train", str(tmp_path / "config.json"), "--out", str(tmp_path / "run")]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.returncode, *out) for p in procs for out in [p.communicate(timeout=300)]]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], results
    refused = next(r for r in results if r[0] == 2)
    # the holder is named once it has written its pid; in the instant between its lock and that write: "another process"
    assert re.search(r"in use by (process \d+|another process)|already holds a run", refused[2]), refused[2]
    done = next(r for r in results if r[0] == 0)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert f"{metrics['test']['RSUM']:.1f}" in done[1]   # the run that finished reports its own metrics


DEDICATED.append(("trainer", "two `xmr train --out DIR` at once into one folder: exactly one refused (exit 2)",
                  "clear error, nothing overwritten",
                  "test_two_trainings_into_one_folder"))


def test_reliability_page_is_up_to_date():
    "nbs/95_reliability.ipynb is what tools/reliability_table.py writes from this module (rerun the script after adding a case)."
    r = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "tools" / "reliability_table.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
