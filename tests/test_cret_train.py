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
from xmretrieval.checkpoint import load_checkpoint, load_config
from xmretrieval.train import Trainer


def test_tiny_preset_trains_from_the_cli_and_reloads(tmp_path, one_thread):
    out = tmp_path / "run"
    summary = xmr_train("cret_tiny", out=str(out), epochs=2)
    assert summary["model"] == "cret" and summary["steps"] == 2 * (32 // 16)
    assert (out / "config.json").exists() and (out / "best.safetensors").exists()
    model, cfg, _ = load_checkpoint(out / "best.safetensors", model_name="cret")
    assert isinstance(model, Cret) and model.config.visual_dim == 1280 and model.config.text_dim == 384
    assert cfg.model_config_obj().global_loss == "gees" and model.config.gees_variant == "strict"
    res = xmr_eval(str(out / "best.safetensors"), split="test")
    for k in ("RSUM", "t2v/R@1", "v2t/R@10", "t2v/MnR"):     # the reloaded checkpoint reproduces the trainer's metrics
        assert res["metrics"][k] == pytest.approx(summary["test"][k], abs=1e-6)
    # xmr index / xmr search: the generic gallery ranks the test clips exactly by S (index_embeddings)
    from xmretrieval.checkpoint import load_split
    from xmretrieval.cli import xmr_index, xmr_search
    from xmretrieval.models.cret import cret_similarity
    index = xmr_index(str(out / "best.safetensors"), split="test", out=str(tmp_path / "test.index"))
    test = load_split(cfg.data, "test")
    query = test.captions[7]
    hits = xmr_search(str(index), query, k=5)
    t, v = model.encode_text([query]), model.embed(test)[1]
    s = cret_similarity(t, v, model.config.beta)[0]
    top = s.topk(5)
    assert [h[0] for h in hits] == [test.visual_ids[i] for i in top.indices.tolist()]
    assert [h[1] * (1 + model.config.beta) for h in hits] == pytest.approx(top.values.tolist(), abs=1e-4)
    # the console entry point, as a user types it
    assert main(["train", "cret_tiny", "--out", str(tmp_path / "cli"), "--epochs", "1"]) == 0
    assert (tmp_path / "cli" / "metrics.json").exists()
    assert main(["train", "cret_tiny", "--out", str(tmp_path / "cli"), "--epochs", "1"]) == 2   # refuses to overwrite


def test_emoji_video_preset_validates():
    cfg = load_config("cret_emoji_video")
    mc = cfg.model_config_obj()
    assert (cfg.data.benchmark, cfg.data.preset) == ("emoji-video", "small")
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
    assert cfg.data.path == f"data/{name}" and cfg.model_config_obj().train_frames == 4
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


def test_ddp_two_processes_match_single_process(tmp_path):
    "CRET's forward packs frames and their mask for the DDP gather: 2 gloo processes take the same steps as one."
    import os
    import subprocess
    import sys
    from xmretrieval.data.core import RetrievalData, save_data
    from xmretrieval.checkpoint import DataConfig, OptimConfig, TrainConfig, read_checkpoint

    def synthetic(split, n, caps=2, dv=12, dt=8, T=6, Lt=3):
        g = torch.Generator().manual_seed({"train": 0, "val": 1, "test": 2}[split])
        vl = torch.randn(n, T, dv, generator=g)
        vm = torch.ones(n, T, dtype=torch.bool)
        vm[::3, 4:] = False; vm[1::4, 2:] = False                      # clips of 6, 4 and 2 valid frames
        tl = torch.randn(n * caps, Lt, dt, generator=g)
        return RetrievalData(name="synthetic", split=split, visual_ids=[f"{split}{i}" for i in range(n)],
                             visual_global=vl.mean(1), visual_local=vl, visual_mask=vm,
                             captions=[f"c{j} {split}{i}" for i in range(n) for j in range(caps)],
                             text_to_visual=torch.arange(n).repeat_interleave(caps), text_global=tl.mean(1),
                             text_local=tl, text_mask=torch.ones(n * caps, Lt, dtype=torch.bool))

    data = tmp_path / "data"
    for split, n in (("train", 32), ("val", 8)): save_data(synthetic(split, n), data / f"{split}.safetensors")
    mc = {"dim": 16, "heads": 2, "temporal_layers": 1, "max_frames": 8, "num_centers": 2, "decoder_depth": 1,
          "decoder_heads": 2, "dropout": 0.0, "train_frames": 0}        # every valid frame: no sampling randomness
    cfg = TrainConfig(model="cret", model_config=mc, data=DataConfig(path=str(data), test_split=None),
                      optim=OptimConfig(lr=3e-3, warmup_steps=1), epochs=2, max_steps=4, batch_size=8,
                      captions_per_item=2, progress=False, num_threads=1, device="cpu")
    cfg_path = cfg.save(tmp_path / "cfg.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "XMR_DEVICE": "cpu"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "xmretrieval.cli", "train", str(cfg_path), "--out", str(tmp_path / "ddp")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    Trainer(cfg, tmp_path / "single").fit()
    a = read_checkpoint(tmp_path / "ddp" / "last.safetensors")[0]
    b = read_checkpoint(tmp_path / "single" / "last.safetensors")[0]
    keys = [k for k in b if k.startswith("model.")]
    assert keys and sorted(k for k in a if k.startswith("model.")) == sorted(keys)

    def comparable(k, x):
        # the key bias of an attention layer gets an exactly-zero gradient (softmax is shift-invariant); Adam turns its
        # rounding noise into updates that differ between 1 and 2 processes: compare the query and value biases only
        if k.endswith("in_proj_bias"):
            d = x.shape[0] // 3
            return torch.cat([x[:d], x[2 * d:]])
        return x
    bad = {k: float((comparable(k, a[k]) - comparable(k, b[k])).abs().max()) for k in keys
           if not torch.allclose(comparable(k, a[k]), comparable(k, b[k]), atol=2e-5, rtol=1e-4)}
    assert not bad, bad


def test_raw_clips_and_captions_match_the_feature_path(one_thread):
    "A clip's frames (PIL images) and a caption through encode_visual / encode_text give the stored-feature embeddings."
    from xmretrieval.data.core import load_benchmark
    from xmretrieval.data.emoji import benchmark_item
    from xmretrieval.models.base import text_batch, visual_batch
    test = load_benchmark("emoji-video", "tiny", "test")
    cfg = load_config("cret_tiny").model_config_obj(test)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Cret(cfg).eval()
    items = [0, 3]
    clips = [benchmark_item("emoji-video", "tiny", "test", i).visual for i in items]
    assert len(clips[0]) == 16
    with torch.no_grad():
        ref_v = model.encode_visual(visual_batch(test, items))
        ref_t = model.encode_text(text_batch(test, [0, 5, 6]))
    torch.testing.assert_close(model.encode_visual(clips), ref_v, atol=2e-4, rtol=0)
    torch.testing.assert_close(model.encode_text([test.captions[j] for j in (0, 5, 6)]), ref_t, atol=2e-4, rtol=0)
