"""CRET through the shared trainer and the CLI: `xmr train cret_tiny`, checkpoints, and the MSRVTT / MSVD / LSMDC /
DiDeMo presets on small folders written in the published layouts."""
import json
import pickle

import numpy as np
import pytest
import torch

from xmretrieval.cli import main, xmr_eval, xmr_train
from xmretrieval.core import DataError
from xmretrieval.models.cret import Cret
from xmretrieval.train import Trainer, load_checkpoint, load_config


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_tiny_preset_trains_from_the_cli_and_reloads(tmp_path, one_thread):
    out = tmp_path / "run"
    summary = xmr_train("cret_tiny", out=str(out), epochs=2)
    assert summary["model"] == "cret" and summary["steps"] == 2 * (32 // 16)
    assert (out / "config.json").exists() and (out / "best.safetensors").exists()
    model, cfg, _ = load_checkpoint(out / "best.safetensors", model_name="cret")
    assert isinstance(model, Cret) and model.config.visual_dim == 1280 and model.config.text_dim == 384
    assert cfg.model_config["global_loss"] == "gees" and model.config.gees_variant == "strict"
    res = xmr_eval(str(out / "best.safetensors"), split="test")
    for k in ("RSUM", "t2v/R@1", "v2t/R@10", "t2v/MnR"):     # the reloaded checkpoint reproduces the trainer's metrics
        assert res["metrics"][k] == pytest.approx(summary["test"][k], abs=1e-6)
    # the console entry point, as a user types it
    assert main(["train", "cret_tiny", "--out", str(tmp_path / "cli"), "--epochs", "1"]) == 0
    assert (tmp_path / "cli" / "metrics.json").exists()
    assert main(["train", "cret_tiny", "--out", str(tmp_path / "cli"), "--epochs", "1"]) == 2   # refuses to overwrite


def test_emoji_video_preset_validates():
    cfg = load_config("cret_emoji_video")
    mc = cfg.model_config_obj()
    assert (cfg.data.benchmark, cfg.data.preset) == ("emoji-video", "full")
    assert mc.train_frames == 4 and mc.test_frames == 0 and mc.temporal_layers == 3 and mc.max_frames >= 16


# ---------------------------------------------------------------- published layouts
VIDEOS = [f"video{i}" for i in range(12)]
WORDS = ["dog", "car", "man", "cat", "boat", "bird"]


def _frames(root):
    "Per-video frame features {id}.npy (T, 24) with 3..6 frames; a few dimensions carry the video's word."
    rng = np.random.default_rng(0)
    d = root / "features"; d.mkdir()
    for i, v in enumerate(VIDEOS):
        f = rng.normal(size=(3 + i % 4, 24)).astype(np.float32)
        f[:, i % len(WORDS)] += 3.0
        np.save(d / f"{v}.npy", f)
    return d


def _caption(i, k=0): return f"a {WORDS[i % len(WORDS)]} {['runs', 'waits', 'turns'][k % 3]}"


def _msrvtt(root):
    m = root / "msrvtt"; m.mkdir()
    split = ["train"] * 8 + ["validate"] * 2 + ["test"] * 2
    (m / "MSRVTT_data.json").write_text(json.dumps({
        "videos": [{"video_id": v, "split": s, "id": i} for i, (v, s) in enumerate(zip(VIDEOS, split))],
        "sentences": [{"caption": _caption(i, k), "video_id": v, "sen_id": 3 * i + k} for i, v in enumerate(VIDEOS) for k in range(3)]}))
    (m / "MSRVTT_train.9k.csv").write_text("video_id\n" + "\n".join(VIDEOS[:8]) + "\n")
    (m / "MSRVTT_JSFUSION_test.csv").write_text("key,vid_key,video_id,sentence\n" +
                                                "".join(f"ret{i},msr{i},{v},{_caption(i + 10)}\n" for i, v in enumerate(VIDEOS[10:])))
    return m


def _msvd(root):
    s = root / "msvd"; s.mkdir()
    for name, ids in (("train", VIDEOS[:8]), ("val", VIDEOS[8:10]), ("test", VIDEOS[10:])):
        (s / f"{name}_list.txt").write_text("\n".join(ids) + "\n")
    with open(s / "raw-captions.pkl", "wb") as f:
        pickle.dump({v: [_caption(i, k).split() for k in range(2)] for i, v in enumerate(VIDEOS)}, f)
    return s


def _lsmdc(root):
    from xmretrieval.data.published import LSMDC_FILES
    l = root / "lsmdc"; l.mkdir()
    for name, rng_ in (("train", range(8)), ("val", range(8, 10)), ("test", range(10, 12))):
        (l / LSMDC_FILES[name]).write_text("".join(f"{VIDEOS[i]}\t0\t1\t0\t1\t{_caption(i)}.\n" for i in rng_))
    return l


def _didemo(root):
    dd = root / "didemo"; dd.mkdir()
    for name, rng_ in (("train", range(8)), ("val", range(8, 10)), ("test", range(10, 12))):
        (dd / f"{name}_list.txt").write_text("\n".join(f"{VIDEOS[i]}" for i in rng_) + "\n")
        (dd / f"{name}_data.json").write_text(json.dumps(
            [{"video": VIDEOS[i], "description": _caption(i, k), "times": [[k, k]]} for i in rng_ for k in range(2)]))
    return dd


READERS = {"msrvtt": _msrvtt, "msvd": _msvd, "lsmdc": _lsmdc, "didemo": _didemo}


@pytest.mark.parametrize("name", list(READERS))
def test_published_presets_on_small_folders(tmp_path, name, one_thread):
    from xmretrieval.data import published
    from xmretrieval.data.core import save_data
    feats = _frames(tmp_path)
    folder = READERS[name](tmp_path)
    reader = getattr(published, f"read_{name}")
    conv = tmp_path / "converted"; conv.mkdir()
    cfg = load_config(f"cret_{name}")
    assert cfg.data.path == f"data/{name}" and cfg.model_config["train_frames"] == 4
    assert (cfg.data.train_split, cfg.data.val_split, cfg.data.test_split) == ("train", "val", "test")
    for split in ("train", "val", "test"):
        save_data(reader(folder, feats, split, text_features=True), conv / f"{split}.safetensors")
    small = {**cfg.model_config, "dim": 16, "heads": 2, "decoder_heads": 2, "num_centers": 2, "temporal_layers": 1}
    cfg = cfg.replace(data=cfg.data.replace(path=str(conv)), model_config=small, epochs=2, batch_size=4,
                      progress=False, eval_batch_size=64)
    tr = Trainer(cfg)
    s = tr.fit()
    assert tr.model.config.visual_dim == 24 and tr.model.config.text_dim == 384       # from the data
    assert s["steps"] == 4 and set(s["test"]) >= {"t2v/R@1", "v2t/R@1", "t2v/MdR", "RSUM"}
    assert tr.data["train"].visual_mask is not None                                   # clips of 3..6 frames: padded
    assert 0 <= s["test"]["RSUM"] <= 600


def test_a_video_without_features_is_named(tmp_path):
    from xmretrieval.data.published import read_msrvtt
    feats = _frames(tmp_path)
    folder = _msrvtt(tmp_path)
    (feats / "video3.npy").unlink()
    with pytest.raises(DataError, match="no features for id 'video3'"):
        read_msrvtt(folder, feats, "train")
