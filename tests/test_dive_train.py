"""DivE through the shared trainer and CLI: the tiny preset, checkpoints, and the precomp COCO preset on a small folder
written in the published format."""
import numpy as np
import pytest
import torch

from xmretrieval.cli import xmr_eval, xmr_train
from xmretrieval.models.dive import DivE
from xmretrieval.repro.dive import chance_metrics, dive_config
from xmretrieval.train import Trainer, evaluate, load_checkpoint, load_config


def test_tiny_preset_trains_from_the_cli_and_reloads(tmp_path, one_thread):
    out = tmp_path / "run"
    summary = xmr_train("dive_tiny", out=str(out), epochs=2)
    assert summary["model"] == "dive" and summary["steps"] == 2 * (48 // 16)
    assert (out / "config.json").exists() and (out / "best.safetensors").exists()
    model, cfg, _ = load_checkpoint(out / "best.safetensors", model_name="dive")
    assert isinstance(model, DivE) and cfg.model_config_obj().similarity == "smooth_chamfer"
    res = xmr_eval(str(out / "best.safetensors"), split="test")
    # the reloaded checkpoint reproduces the trainer's test metrics exactly
    for k in ("RSUM", "t2v/R@1", "v2t/R@10"):
        assert res["metrics"][k] == pytest.approx(summary["test"][k], abs=1e-6)


def test_quick_config_variants_validate():
    assert dive_config("quick", similarity="mp").model_config_obj().similarity == "mp"
    with pytest.raises(Exception, match="DiveConfig.arch"):
        dive_config("quick", arch="perceiver")
    with pytest.raises(Exception, match="`mode`"):
        dive_config("medium")


def _write_precomp(folder, n_images, seed, regions=36, dim=48):
    "A SCAN-style precomp split: {split}_ims.npy (n, 36, d) + {split}_caps.txt (5 lines per image)."
    rng = np.random.default_rng(seed)
    words = ["dog", "cat", "red car", "tree", "boat", "kite", "bench", "clock", "pizza", "horse"]
    for split, n in n_images.items():
        ims = rng.normal(size=(n, regions, dim)).astype(np.float32)
        caps = []
        for i in range(n):
            a, b = words[i % len(words)], words[(3 * i + 1) % len(words)]
            ims[i, :4] += 3 * (words.index(a) + 1) / len(words)
            caps += [f"a {a} next to a {b}", f"the {a}", f"a {b} and a {a}", f"photo of a {a}", f"a {b}"]
        np.save(folder / f"{split}_ims.npy", ims)
        (folder / f"{split}_caps.txt").write_text("\n".join(caps) + "\n")


def test_precomp_coco_preset_on_a_small_precomp_folder(tmp_path, one_thread):
    from xmretrieval.data.core import save_data
    from xmretrieval.data.published import read_precomp
    raw, conv = tmp_path / "coco_precomp", tmp_path / "converted"
    raw.mkdir(); conv.mkdir()
    _write_precomp(raw, {"train": 16, "dev": 8, "testall": 8}, seed=0)
    for split in ("train", "dev", "testall"):
        save_data(read_precomp(raw, split, text_features=True), conv / f"{split}.safetensors")
    cfg = load_config("dive_precomp_coco")
    assert (cfg.data.train_split, cfg.data.val_split, cfg.data.test_split) == ("train", "dev", "testall")
    mc = cfg.model_config_obj()
    assert mc.embed_dim == 1024 and mc.head_dim == 512   # the paper's widths
    small = {**cfg.model_config, "embed_dim": 32, "head_dim": 8}
    cfg = cfg.replace(data=cfg.data.replace(path=str(conv)), model_config=small, epochs=2, batch_size=8,
                      progress=False, eval_batch_size=64)
    tr = Trainer(cfg)
    s = tr.fit()
    assert tr.model.config.visual_dim == 48 and tr.model.config.text_dim == 384      # from the data
    assert s["steps"] == 4 and set(s["test"]) >= {"t2v/R@1", "v2t/R@1", "RSUM"}
    assert 0 <= s["test"]["RSUM"] <= 600


def test_chance_metrics_match_random_scores():
    from xmretrieval.metrics import retrieval_metrics
    t2v = torch.tensor([0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 4, 5])
    ch = chance_metrics(t2v)
    g = torch.Generator().manual_seed(0)
    runs = [retrieval_metrics(torch.rand(12, 6, generator=g), t2v) for _ in range(3000)]
    for k in ("t2v/R@1", "t2v/R@5", "v2t/R@1", "v2t/R@5", "RSUM"):
        assert sum(r[k] for r in runs) / len(runs) == pytest.approx(ch[k], abs=1.5), k
