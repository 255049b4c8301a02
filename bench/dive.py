"""DivE benchmark: training throughput and evaluation time against the bi-encoder baseline.

Usage: python bench/dive.py [--quick] [--coco5k]   -> bench/results/dive.json

- Training: one optimiser step (forward, backward, AdamW, clip) on a batch of 64 scenes x 5 captions with the
  shapes of the full emoji-scenes preset (49 x 1280 grid features, 20 x 384 token features), for DivE (preset
  `dive_emoji_scenes`: D=256, K=4, 4 heads x 64, depth 4) and the VSE++ bi-encoder (preset
  `biencoder_vsepp_scenes`: D=256). The two models alternate step by step in one process (ratios are measured
  side by side); median over the timed steps; throughput in positive pairs (captions) per second.
- Evaluation: (a) embedding the full test split (1,000 scenes, 5,000 captions); (b) scoring every caption
  against every image: DivE's chunked Smooth-Chamfer over sets (K=4) vs the bi-encoder's cosine, at the
  emoji-scenes width (D=256) and at the paper's width (D=1024) for a COCO 1K fold (1,000 x 5,000) and, with
  --coco5k, the COCO 5K test set (5,000 x 25,000). Medians of several runs.
Synthetic features of the exact shapes are used: the cost depends only on the shapes. The machine is shared
with other jobs while this runs: timings vary by +-30%; compare the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "dive.json"


def batch(n_items: int, caps: int = 5, L: int = 49, Lt: int = 20, dv: int = 1280, dt: int = 384, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    vl = torch.rand(n_items, L, dv, generator=g)
    tl = torch.randn(n_items * caps, Lt, dt, generator=g)
    lengths = torch.randint(6, Lt + 1, (n_items * caps,), generator=g)
    tm = torch.arange(Lt)[None] < lengths[:, None]
    return dict(visual_global=vl.mean(1), visual_local=vl, visual_mask=torch.ones(n_items, L, dtype=torch.bool),
                text_global=(tl * tm[..., None]).sum(1) / lengths[:, None], text_local=tl, text_mask=tm,
                text_to_visual=torch.arange(n_items).repeat_interleave(caps), captions=["x"] * (n_items * caps))


def models():
    from xmretrieval.models.base import build_model
    from xmretrieval.train import load_config, param_groups
    out = {}
    for name, preset, dims in [("DivE", "dive_emoji_scenes", dict(visual_dim=1280, text_dim=384)),
                               ("bi-encoder (VSE++)", "biencoder_vsepp_scenes", dict(visual_dim=1280, text_dim=384))]:
        cfg = load_config(preset)
        torch.manual_seed(0)
        m = build_model(cfg.model, {**cfg.model_config, **dims})
        opt = torch.optim.AdamW(param_groups(m, cfg.optim), lr=cfg.optim.lr)
        out[name] = (m, opt, cfg)
    return out


def time_training(ms: dict, b: dict, steps: int, warmup: int = 2) -> dict:
    times = {k: [] for k in ms}
    for i in range(warmup + steps):
        for name, (m, opt, cfg) in ms.items():          # alternate the models step by step
            m.train()
            t = time.perf_counter()
            loss = m(b)["loss"]
            opt.zero_grad(set_to_none=True); loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), cfg.optim.grad_clip); opt.step()
            if i >= warmup: times[name].append(time.perf_counter() - t)
    n_pairs = len(b["text_to_visual"])
    return {k: {"step_s": statistics.median(v), "pairs_per_s": n_pairs / statistics.median(v), "steps": len(v)}
            for k, v in times.items()}


def time_encoding(ms: dict, n_items: int, repeats: int) -> dict:
    from xmretrieval.models.base import text_batch, visual_batch  # noqa: F401 (documented batch format)
    b = batch(n_items, seed=1)
    out = {}
    for name, (m, _, _) in ms.items():
        m.eval(); ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            with torch.no_grad():
                for s in range(0, n_items * 5, 512):
                    m.encode_text({k: b[k][s:s + 512] for k in ("text_global", "text_local", "text_mask")})
                for s in range(0, n_items, 512):
                    m.encode_visual({k: b[k][s:s + 512] for k in ("visual_global", "visual_local", "visual_mask")})
            ts.append(time.perf_counter() - t)
        out[name] = statistics.median(ts)
    return out


def time_scoring(n_v: int, n_t: int, d: int, k: int, repeats: int) -> dict:
    from xmretrieval.similarity import smooth_chamfer
    g = torch.Generator().manual_seed(2)
    vs = F.normalize(torch.randn(n_v, k, d, generator=g), dim=-1); ts = F.normalize(torch.randn(n_t, k, d, generator=g), dim=-1)
    v1, t1 = vs[:, 0].contiguous(), ts[:, 0].contiguous()
    res = {"DivE (Smooth-Chamfer, K=%d)" % k: [], "bi-encoder (cosine)": []}
    for _ in range(repeats):
        t = time.perf_counter(); s = smooth_chamfer(ts, vs, 16.0); res["DivE (Smooth-Chamfer, K=%d)" % k].append(time.perf_counter() - t)
        t = time.perf_counter(); c = t1 @ v1.T; res["bi-encoder (cosine)"].append(time.perf_counter() - t)
    assert s.shape == c.shape == (n_t, n_v)
    return {name: statistics.median(v) for name, v in res.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="few steps and small galleries (smoke test)")
    ap.add_argument("--coco5k", action="store_true", help="also score the COCO 5K test set at D=1024 (slow)")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads0 = torch.get_num_threads()
    steps, reps = (3, 1) if a.quick else (8, 3)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; shared with other "
                         "jobs while measured (+-30%): compare ratios measured side by side",
              "quick": a.quick, "training": {}, "encoding_s": {}, "scoring_s": {}}
    try:
        ms = models()
        b = batch(16 if a.quick else 64)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            tr = time_training(ms, b, steps)
            tr["ratio_bi_encoder_over_dive"] = tr["bi-encoder (VSE++)"]["pairs_per_s"] / tr["DivE"]["pairs_per_s"]
            result["training"][f"{threads} thread{'s' if threads > 1 else ''}"] = tr
            print(threads, "threads", json.dumps(tr), flush=True)
        torch.set_num_threads(2)
        n_test = 100 if a.quick else 1000
        result["encoding_s"][f"emoji-scenes test ({n_test} scenes, {5 * n_test} captions)"] = time_encoding(ms, n_test, reps)
        sizes = [("emoji-scenes test, D=256", 1000, 5000, 256), ("COCO 1K fold, D=1024", 1000, 5000, 1024)]
        if a.quick: sizes = [("small, D=256", 100, 500, 256)]
        if a.coco5k: sizes.append(("COCO 5K, D=1024", 5000, 25000, 1024))
        for label, n_v, n_t, d in sizes:
            r = time_scoring(n_v, n_t, d, 4, 1 if "5K" in label else reps)
            r["ratio"] = r["DivE (Smooth-Chamfer, K=4)"] / r["bi-encoder (cosine)"]
            result["scoring_s"][f"{label} ({n_t} captions x {n_v} images)"] = r
            print(label, json.dumps(r), flush=True)
    finally:
        torch.set_num_threads(threads0)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n"); os.replace(tmp, OUT)
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    sys.exit(main())
