"""DivE benchmark: training throughput and evaluation time against the bi-encoder baseline.

Usage: python bench/dive.py [--quick] [--coco5k] [--out FILE]   -> bench/results/dive.json

- Training: one optimiser step (forward, backward, AdamW, clip) on a batch of 64 scenes x 5 captions with the
  shapes of the full emoji-scenes preset (49 x 1280 grid features, 20 x 384 token features), for DivE (preset
  `dive_emoji_scenes`: D=256, K=4, 4 heads x 64, depth 4) and the VSE++ bi-encoder (preset
  `biencoder_vsepp_scenes`: D=256). The two models alternate step by step in one process (ratios are measured
  side by side); median over the timed steps; throughput in positive pairs (captions) per second.
- FLOPs per training step (torch's FlopCounterMode over forward + backward) and the fraction of this machine's
  matmul rate it reaches, the rate measured in the same run (2048 x 2048 matmul, fp32 and bf16, medians). DivE's
  step is also timed under bf16 autocast (TrainConfig.bf16), interleaved with the fp32 step; fp32 stays the default.
- Encoding: embedding the full test split (1,000 scenes, 5,000 captions) in batches of 1,024 as
  `RetrievalModel.embed` does, for both models in fp32 and under bf16 autocast (`precision="bf16"`), interleaved run
  by run in one process; medians. Agreement of DivE's bf16 embeddings with fp32 on the same inputs: max abs
  difference of the unit embeddings, and the share of caption queries whose top-10 images (Smooth-Chamfer) are
  identical (same order) or the same set. The model is randomly initialised (untrained), so its scores are
  nearly tied and the ranking agreement is a pessimistic figure.
- Scoring: every caption against every image: DivE's chunked Smooth-Chamfer over sets (K=4) vs the bi-encoder's
  cosine, at the emoji-scenes width (D=256) and at the paper's width (D=1024) for a COCO 1K fold (1,000 x 5,000)
  and, with --coco5k, the COCO 5K test set (5,000 x 25,000). Medians of several runs.
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


def matmul_rate(repeats: int = 5) -> dict:
    "Measured GFLOP/s of a 2048 x 2048 matmul in fp32 and bf16 (median)."
    out = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(2048, 2048).to(dt), torch.randn(2048, 2048).to(dt)
        a @ b; ts = []
        for _ in range(repeats):
            t = time.perf_counter(); a @ b; ts.append(time.perf_counter() - t)
        out[name] = 2 * 2048 ** 3 / statistics.median(ts) / 1e9
    return out


def step_flops(m, b) -> float:
    "FLOPs of one training step's forward + backward (the optimiser's elementwise work is not counted)."
    from torch.utils.flop_counter import FlopCounterMode
    m.train()
    with FlopCounterMode(display=False) as fc:
        m(b)["loss"].backward()
    m.zero_grad(set_to_none=True)
    return float(fc.get_total_flops())


def time_training(ms: dict, b: dict, steps: int, warmup: int = 2) -> dict:
    runs = [(name, False) for name in ms] + [("DivE", True)]   # DivE also under bf16 autocast
    label = lambda name, bf16: name + (" bf16 autocast" if bf16 else "")
    times = {label(*r): [] for r in runs}
    for i in range(warmup + steps):
        for name, bf16 in runs:                           # alternate the models step by step
            m, opt, cfg = ms[name]
            m.train()
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16): loss = m(b)["loss"]
            opt.zero_grad(set_to_none=True); loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), cfg.optim.grad_clip); opt.step()
            if i >= warmup: times[label(name, bf16)].append(time.perf_counter() - t)
    n_pairs = len(b["text_to_visual"])
    return {k: {"step_s": statistics.median(v), "pairs_per_s": n_pairs / statistics.median(v), "steps": len(v)}
            for k, v in times.items()}


def encode_gflops(ms: dict, n_items: int) -> dict:
    "GFLOPs of embedding n_items scenes and 5 n_items captions (FlopCounterMode on 100 scenes, scaled: linear in n)."
    from torch.utils.flop_counter import FlopCounterMode
    b = batch(100, seed=1)
    out = {}
    for name, (m, _, _) in ms.items():
        m.eval()
        with FlopCounterMode(display=False) as fc:   # (FlopCounterMode's module tracker needs grad mode on)
            m.encode_text({k: b[k] for k in ("text_global", "text_local", "text_mask")})
            m.encode_visual({k: b[k] for k in ("visual_global", "visual_local", "visual_mask")})
        out[name] = fc.get_total_flops() * n_items / 100 / 1e9
    return out


def time_encoding(ms: dict, n_items: int, repeats: int, bs: int = 1024) -> dict:
    "Embed n_items scenes and 5 n_items captions with both models in fp32 and bf16, interleaved; medians; agreement."
    from xmretrieval.similarity import smooth_chamfer
    b = batch(n_items, seed=1)
    tb = {k: b[k] for k in ("text_global", "text_local", "text_mask")}
    vb = {k: b[k] for k in ("visual_global", "visual_local", "visual_mask")}

    def embed(m, bf16):   # what RetrievalModel.embed does, on the synthetic batch
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            t = torch.cat([m.encode_text({k: x[s:s + bs] for k, x in tb.items()}).float() for s in range(0, 5 * n_items, bs)])
            v = torch.cat([m.encode_visual({k: x[s:s + bs] for k, x in vb.items()}).float() for s in range(0, n_items, bs)])
        return t, v

    for m, _, _ in ms.values(): m.eval()
    ts = {(name, p): [] for name in ms for p in ("fp32", "bf16")}
    for _ in range(repeats):
        for name, p in ts:
            t = time.perf_counter(); embed(ms[name][0], p == "bf16"); ts[(name, p)].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in ts.items()}
    low = {k: min(v) for k, v in ts.items()}   # the least-disturbed run: on a shared machine, closest to the intrinsic cost
    bi = "bi-encoder (VSE++)"
    out = {"seconds": {p: {name: med[(name, p)] for name in ms} for p in ("fp32", "bf16")},
           "runs": {f"{name} {p}": v for (name, p), v in ts.items()}, "batch_size": bs,
           "ratio_dive_over_bi_encoder": {"both fp32": med[("DivE", "fp32")] / med[(bi, "fp32")],
                                          "both bf16": med[("DivE", "bf16")] / med[(bi, "bf16")],
                                          "DivE bf16 / bi-encoder fp32": med[("DivE", "bf16")] / med[(bi, "fp32")],
                                          "DivE bf16 / bi-encoder's faster precision":
                                              med[("DivE", "bf16")] / min(med[(bi, "fp32")], med[(bi, "bf16")])},
           "dive_bf16_speedup_over_fp32": med[("DivE", "fp32")] / med[("DivE", "bf16")],
           "min_seconds": {p: {name: low[(name, p)] for name in ms} for p in ("fp32", "bf16")},
           "min_ratio_dive_bf16_over_bi_encoder_faster": low[("DivE", "bf16")] / min(low[(bi, "fp32")], low[(bi, "bf16")]),
           "min_dive_bf16_speedup_over_fp32": low[("DivE", "fp32")] / low[("DivE", "bf16")]}
    out["gflops"] = encode_gflops(ms, n_items)
    out["gflops_ratio_dive_over_bi_encoder"] = out["gflops"]["DivE"] / out["gflops"]["bi-encoder (VSE++)"]
    out["target"] = "DivE encoding (bf16) within 5x of the bi-encoder (its faster precision)"
    out["met"] = bool(out["ratio_dive_over_bi_encoder"]["DivE bf16 / bi-encoder's faster precision"] <= 5)
    t32, v32 = embed(ms["DivE"][0], False); t16, v16 = embed(ms["DivE"][0], True)
    s32, s16 = smooth_chamfer(t32, v32), smooth_chamfer(t16, v16)
    i32, i16 = s32.topk(10).indices, s16.topk(10).indices
    out["agreement_bf16_vs_fp32"] = {
        "max_abs_diff_unit_embeddings": max((t32 - t16).abs().max().item(), (v32 - v16).abs().max().item()),
        "max_abs_diff_smooth_chamfer_scores": (s32 - s16).abs().max().item(),
        "share_identical_top10_order": (i32 == i16).all(1).float().mean().item(),
        "share_identical_top10_set": (i32.sort(1).values == i16.sort(1).values).all(1).float().mean().item(),
        "top10_overlap": (i16[:, :, None] == i32[:, None, :]).any(2).float().mean().item(),
        "model": "randomly initialised DivE (dive_emoji_scenes preset), synthetic features: nearly tied scores"}
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


class _Encoding(Exception):
    "Skips to / past the encoding part (--only-encoding)."


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="few steps and small galleries (smoke test)")
    ap.add_argument("--coco5k", action="store_true", help="also score the COCO 5K test set at D=1024 (slow)")
    ap.add_argument("--out", default=str(OUT), help="result file")
    ap.add_argument("--only-encoding", action="store_true", help="rerun only the encoding part, merged into --out")
    a = ap.parse_args()
    out = Path(a.out)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads0 = torch.get_num_threads()
    steps, reps = (3, 1) if a.quick else (6, 5)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; shared with other "
                         "jobs while measured (+-30%): compare ratios measured side by side",
              "quick": a.quick, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "load_before": list(os.getloadavg()), "training": {}, "encoding": {}, "scoring_s": {}}
    if a.only_encoding and out.exists():
        result = {**json.loads(out.read_text()), "encoding_rerun_date": result["date"], "load_before_encoding": result["load_before"]}
    try:
        ms = models()
        b = batch(16 if a.quick else 64)
        if a.only_encoding: raise _Encoding
        torch.set_num_threads(2)
        result["matmul_gflops_2048"] = {"2 threads": matmul_rate()}
        result["flops_per_step"] = {name: step_flops(m, b) for name, (m, _, _) in ms.items()}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            rate = matmul_rate() if threads == 1 else result["matmul_gflops_2048"]["2 threads"]
            result["matmul_gflops_2048"][f"{threads} thread{'s' if threads > 1 else ''}"] = rate
            tr = time_training(ms, b, steps)
            for name, r in tr.items():
                fl = result["flops_per_step"][name.replace(" bf16 autocast", "")]
                r["gflops_per_s"] = fl / r["step_s"] / 1e9
                prec = "bf16" if "bf16" in name else "fp32"
                r[f"fraction_of_{prec}_matmul_rate"] = r["gflops_per_s"] / rate[prec]
            tr["ratio_bi_encoder_over_dive"] = tr["bi-encoder (VSE++)"]["pairs_per_s"] / tr["DivE"]["pairs_per_s"]
            tr["dive_bf16_speedup"] = tr["DivE"]["step_s"] / tr["DivE bf16 autocast"]["step_s"]
            result["training"][f"{threads} thread{'s' if threads > 1 else ''}"] = tr
            print(threads, "threads", json.dumps(tr), flush=True)
    except _Encoding:
        pass
    try:
        torch.set_num_threads(2)
        n_test = 100 if a.quick else 1000
        enc = time_encoding(ms, n_test, reps)
        key = f"emoji-scenes test ({n_test} scenes, {5 * n_test} captions)"
        result["encoding"] = {key: enc}
        result["encoding_s"] = {key: enc["seconds"]["fp32"], key + ", bf16 autocast": enc["seconds"]["bf16"]}
        print(json.dumps(enc), flush=True)
        if a.only_encoding: raise _Encoding
        sizes = [("emoji-scenes test, D=256", 1000, 5000, 256), ("COCO 1K fold, D=1024", 1000, 5000, 1024)]
        if a.quick: sizes = [("small, D=256", 100, 500, 256)]
        if a.coco5k: sizes.append(("COCO 5K, D=1024", 5000, 25000, 1024))
        for label, n_v, n_t, d in sizes:
            r = time_scoring(n_v, n_t, d, 4, 1 if "5K" in label else reps)
            r["ratio"] = r["DivE (Smooth-Chamfer, K=4)"] / r["bi-encoder (cosine)"]
            result["scoring_s"][f"{label} ({n_t} captions x {n_v} images)"] = r
            print(label, json.dumps(r), flush=True)
    except _Encoding:
        pass
    finally:
        torch.set_num_threads(threads0)
    result["load_after"] = list(os.getloadavg())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n"); os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
