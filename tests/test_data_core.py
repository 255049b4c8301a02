"""xmretrieval.data.core: RetrievalData validation, subset, the cache (manifest, staleness, interrupted writes), load_benchmark."""
import os
from pathlib import Path

import pytest
import torch

from xmretrieval.core import DataError, ShapeError, XMRError, atomic_path
from xmretrieval.data.core import (BENCHMARKS, Benchmark, RetrievalData, load_benchmark, load_data,
                                   read_manifest, register_benchmark, save_data)


def make(n=4, per=2, L=5, d=8, dt=6, Lt=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = n * per
    return RetrievalData(name="toy", split="test", visual_ids=[f"v{i}" for i in range(n)],
                         visual_global=torch.randn(n, d, generator=g), visual_local=torch.randn(n, L, d, generator=g),
                         visual_mask=(torch.rand(n, L, generator=g) > 0.3) | (torch.arange(L) == 0),
                         captions=[f"c{j}" for j in range(m)], text_to_visual=torch.arange(m) // per,
                         text_global=torch.randn(m, dt, generator=g), text_local=torch.randn(m, Lt, dt, generator=g),
                         text_mask=torch.ones(m, Lt, dtype=torch.bool), meta={"k": 1})


def test_subset_matches_reference():
    d = make()
    idx = [3, 1]
    s = d.subset(idx)
    ref_caps = [j for i in idx for j in range(d.n_text) if int(d.text_to_visual[j]) == i]
    assert s.captions == [d.captions[j] for j in ref_caps]
    assert torch.equal(s.text_local, d.text_local[ref_caps]) and torch.equal(s.visual_mask, d.visual_mask[idx])
    assert [s.visual_ids[i] for i in s.text_to_visual.tolist()] == [d.visual_ids[int(d.text_to_visual[j])] for j in ref_caps]
    assert d.visual_to_text()[3] == [6, 7]


@pytest.mark.parametrize("change,msg", [
    (dict(visual_local=torch.zeros(4, 5, 7)), "visual_local"),
    (dict(text_to_visual=torch.arange(8) % 5), "must index the 4 visual items"),
    (dict(captions=["x"] * 7), "text_to_visual"),
    (dict(text_mask=None), "given together"),
    (dict(visual_ids=["a", "a", "b", "c"]), "unique"),
])
def test_validation(change, msg):
    d = make()
    kw = {k: getattr(d, k) for k in d.__dataclass_fields__}
    with pytest.raises(XMRError, match=msg):
        RetrievalData(**{**kw, **change})


def test_save_load_roundtrip_and_staleness(tmp_path):
    d = make()
    p = save_data(d, tmp_path / "a.safetensors", manifest={"seed": 0})
    back = load_data(p, manifest={"seed": 0})
    assert back.captions == d.captions and back.meta == d.meta
    assert torch.allclose(back.visual_local, d.visual_local, atol=2e-3, rtol=1e-3)
    assert torch.equal(back.visual_mask, d.visual_mask) and back.visual_global.dtype == torch.float32
    assert load_data(p, manifest={"seed": 1}) is None
    assert read_manifest(p) == {"seed": 0}


def test_interrupted_write_is_never_read(tmp_path):
    p = tmp_path / "b.safetensors"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(p) as tmp:
            tmp.write_bytes(b"\x00" * 100)
            raise KeyboardInterrupt
    assert load_data(p) is None and not list(tmp_path.iterdir())
    # a truncated file (e.g. copied during a write) is treated as missing, and rebuilt by load_benchmark
    good = save_data(make(), tmp_path / "c.safetensors", manifest={})
    good.write_bytes(good.read_bytes()[:-50])
    assert load_data(good, manifest={}) is None


def test_load_benchmark_rebuilds_stale_and_broken(tmp_path):
    built = []
    cfg = {"seed": 0}
    def build(preset, split):
        built.append(split)
        return make(seed=cfg["seed"])
    register_benchmark(Benchmark("t-bench", ("tiny",), lambda p, s: dict(cfg), build))
    try:
        a = load_benchmark("t-bench", "tiny", "val", cache_dir=tmp_path)
        load_benchmark("t-bench", "tiny", "val", cache_dir=tmp_path)
        assert built == ["val"]
        f = tmp_path / "t-bench" / "tiny-val.safetensors"
        f.write_bytes(f.read_bytes()[:1000])  # corrupted cache
        load_benchmark("t-bench", "tiny", "val", cache_dir=tmp_path)
        assert len(built) == 2
        cfg["seed"] = 1  # stale
        b = load_benchmark("t-bench", "tiny", "val", cache_dir=tmp_path)
        assert len(built) == 3 and not torch.allclose(a.visual_global, b.visual_global)
    finally:
        BENCHMARKS.pop("t-bench")


def test_load_benchmark_errors():
    with pytest.raises(DataError, match="unknown benchmark"):
        load_benchmark("coco-emoji")
    with pytest.raises(DataError, match="no preset"):
        load_benchmark("emoji-objects", "huge")
    with pytest.raises(DataError, match="no split"):
        load_benchmark("emoji-objects", "tiny", "dev")


def test_emoji_objects_tiny_end_to_end():
    d = load_benchmark("emoji-objects", "tiny", "test")
    assert d.visual_local.shape == (48, 49, 1280) and d.text_local.shape[2] == 384
    assert d.n_text == 5 * 48 and d.visual_to_text()[0] == [0, 1, 2, 3, 4]
    assert d.meta["manifest"]["features"]["image_model"] == "efficientnet-lite0"
    # global = mean of the grid; text_global = masked mean of the tokens
    assert torch.allclose(d.visual_global, d.visual_local.mean(1), atol=1e-2)
    m = d.text_mask.float()
    assert torch.allclose(d.text_global, (d.text_local * m[..., None]).sum(1) / m.sum(1, keepdim=True), atol=1e-2)
