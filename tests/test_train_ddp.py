"""DDP: 2 processes under torchrun (gloo, CPU) take the same first steps as one process with the same global batch."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from xmretrieval.data.core import RetrievalData, save_data
from xmretrieval.train import OptimConfig, Trainer, TrainConfig, DataConfig, read_checkpoint


def synthetic(split, n, caps=2, dv=24, dt=16, L=4, Lt=3):
    g = torch.Generator().manual_seed(1234)
    A, B = torch.randn(8, dv, generator=g), torch.randn(8, dt, generator=g)
    g.manual_seed({"train": 0, "val": 1, "test": 2}[split])
    z = torch.randn(n, 8, generator=g)
    vl = (z @ A)[:, None] + 0.5 * torch.randn(n, L, dv, generator=g)
    tl = (z @ B).repeat_interleave(caps, 0)[:, None] + 0.5 * torch.randn(n * caps, Lt, dt, generator=g)
    return RetrievalData(name="synthetic", split=split, visual_ids=[f"{split}{i}" for i in range(n)],
                         visual_global=vl.mean(1), visual_local=vl, visual_mask=None,
                         captions=[f"c{j} {split}{i}" for i in range(n) for j in range(caps)],
                         text_to_visual=torch.arange(n).repeat_interleave(caps), text_global=tl.mean(1),
                         text_local=tl, text_mask=torch.ones(n * caps, Lt, dtype=torch.bool))


@pytest.mark.parametrize("loss", ["triplet", "infonce"])
def test_ddp_two_processes_match_single_process(tmp_path, loss):
    data = tmp_path / "data"
    for split, n in (("train", 64), ("val", 16), ("test", 16)): save_data(synthetic(split, n), data / f"{split}.safetensors")
    cfg = TrainConfig(model_config={"embed_dim": 16, "dropout": 0.0, "loss": loss}, data=DataConfig(path=str(data), test_split=None),
                      optim=OptimConfig(lr=3e-3, warmup_steps=1), epochs=2, max_steps=6, batch_size=16,
                      captions_per_item=2, progress=False, num_threads=1, device="cpu")
    cfg_path = cfg.save(tmp_path / "cfg.json")
    # DDP: 2 processes, 8 items each per step, embeddings gathered for in-batch negatives
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "XMR_DEVICE": "cpu"}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "xmretrieval.cli", "train", str(cfg_path), "--out", str(tmp_path / "ddp")],
                       env=env, capture_output=True, text=True, timeout=300)
    ddp_time = time.perf_counter() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # one process, the same global batch of 16 items
    single = Trainer(cfg, tmp_path / "single").fit()
    a = read_checkpoint(tmp_path / "ddp" / "last.safetensors")[0]
    b = read_checkpoint(tmp_path / "single" / "last.safetensors")[0]
    keys = [k for k in b if k.startswith("model.")]
    assert keys and sorted(k for k in a if k.startswith("model.")) == sorted(keys)
    for k in keys: torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4, msg=k)
    ha = json.loads((tmp_path / "ddp" / "history.json").read_text())
    hb = json.loads((tmp_path / "single" / "history.json").read_text())
    assert [h["step"] for h in ha] == [h["step"] for h in hb] == [4, 6]
    for x, y in zip(ha, hb): assert abs(x["train_loss"] - y["train_loss"]) < 1e-4 * max(1, abs(y["train_loss"]))
    print(f"torchrun 2 processes: {ddp_time:.1f}s")
