"""Training benchmark: throughput (positive pairs/s), evaluation time and peak memory of the bi-encoder baseline.

Usage: python bench/training.py [--quick] [--synthetic]   -> bench/results/training.json

Each variant runs in a fresh subprocess (so its peak resident memory is its own) and trains through
`xmretrieval.train.Trainer` for a few epochs with the batch size of the full presets; the throughput is the median
over epochs of the pairs/s measured by the trainer (training loop only), the evaluation time the median of
several `evaluate` calls on the test split. Data: the full embedded benchmarks when their feature cache exists,
otherwise synthetic features of exactly the same shapes (the bi-encoder's cost depends only on the shapes); the
JSON says which. The machine is shared with other jobs while this runs: timings vary by +-30%.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "training.json"

# name: (benchmark, loss, bf16, threads)
VARIANTS = {
    "scenes / VSE++ / fp32 / 2 threads": ("emoji-scenes", "triplet", False, 2),
    "scenes / InfoNCE / fp32 / 2 threads": ("emoji-scenes", "infonce", False, 2),
    "scenes / VSE++ / bf16 / 2 threads": ("emoji-scenes", "triplet", True, 2),
    "scenes / VSE++ / fp32 / 1 thread": ("emoji-scenes", "triplet", False, 1),
    "video / VSE++ / fp32 / 2 threads": ("emoji-video", "triplet", False, 2),
    "video / VSE++ / bf16 / 2 threads": ("emoji-video", "triplet", True, 2),
}
# split sizes of the full presets (items; 5 captions per item; token length of the MiniLM features)
SHAPES = {"emoji-scenes": dict(train=4000, test=1000, L=49, Lt=20), "emoji-video": dict(train=2000, test=500, L=16, Lt=32)}


def synthetic(benchmark: str, split: str, n: int, L: int, Lt: int, caps: int = 5):
    import torch
    from xmretrieval.data.core import RetrievalData
    g = torch.Generator().manual_seed(0)
    vl = torch.rand(n, L, 1280, generator=g)
    tl = torch.randn(n * caps, Lt, 384, generator=g)
    return RetrievalData(name=f"{benchmark}(synthetic)", split=split, visual_ids=[str(i) for i in range(n)],
                         visual_global=vl.mean(1), visual_local=vl, visual_mask=None,
                         captions=["x"] * (n * caps), text_to_visual=torch.arange(n).repeat_interleave(caps),
                         text_global=tl.mean(1), text_local=tl, text_mask=torch.ones(n * caps, Lt, dtype=torch.bool))


def load(benchmark: str, split: str, force_synthetic: bool, quick: bool):
    from xmretrieval.data.core import benchmark_path, load_benchmark
    s = SHAPES[benchmark]
    if not force_synthetic and not quick and benchmark_path(benchmark, "full", split).exists():
        return load_benchmark(benchmark, "full", split), "full benchmark (cached features)"
    n = s[split] if not quick else 256
    return synthetic(benchmark, split, n, s["L"], s["Lt"]), f"synthetic features with the full preset's shapes ({n} items)"


def one(name: str, quick: bool, force_synthetic: bool) -> dict:
    "Run one variant in this process (called in a fresh subprocess)."
    import torch
    from xmretrieval.repro.baseline import baseline_config
    from xmretrieval.train import Trainer, evaluate
    bench, loss, bf16, threads = VARIANTS[name]
    torch.set_num_threads(threads)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    train, source = load(bench, "train", force_synthetic, quick)
    test, _ = load(bench, "test", force_synthetic, quick)
    rss_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cfg = baseline_config(bench, loss, "full").replace(epochs=2 if quick else 4, bf16=bf16, progress=False,
                                                       num_threads=threads, device="cpu")
    tr = Trainer(cfg.replace(data=cfg.data.replace(val_split=None, test_split=None)), None, train_data=train)
    t0 = time.perf_counter()
    summary = tr.fit()
    wall = time.perf_counter() - t0
    rates = [r["pairs_per_s"] for r in tr.history]
    rss_train = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    evals = []
    for _ in range(2 if quick else 3):
        t1 = time.perf_counter(); m = evaluate(tr.model, test, cfg.eval_batch_size); evals.append(time.perf_counter() - t1)
    steps_per_epoch = summary["steps"] / cfg.epochs
    return {"variant": name, "benchmark": bench, "loss": loss, "bf16": bf16, "threads": threads, "data": source,
            "batch": f"{cfg.batch_size} items x {cfg.captions_per_item} captions", "steps_per_epoch": steps_per_epoch,
            "pairs_per_s_median": statistics.median(rates[1:] or rates), "pairs_per_s_epochs": rates,
            "epoch_time_s_median": statistics.median([r["train_time_s"] for r in tr.history][1:] or [wall]),
            "eval_time_s_median": statistics.median(evals), "eval_sizes": f"{test.n_text} captions x {test.n_visual} items",
            "peak_rss_mb": rss_train, "rss_after_import_mb": rss0, "rss_after_data_mb": rss_data,
            "train_peak_over_data_mb": rss_train - rss_data, "test_RSUM_after_bench_epochs": m["RSUM"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small synthetic data, 2 epochs (smoke test)")
    ap.add_argument("--synthetic", action="store_true", help="synthetic features even if the full cache exists")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print("RESULT " + json.dumps(one(a.one, a.quick, a.synthetic)))
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    rows = []
    for name in VARIANTS:
        cmd = [sys.executable, __file__, "--one", name] + (["--quick"] if a.quick else []) + (["--synthetic"] if a.synthetic else [])
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
        if r.returncode or not line: raise SystemExit(f"{name} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
        rows.append(json.loads(line[0][7:]))
        print(f"{name:40s} {rows[-1]['pairs_per_s_median']:9.0f} pairs/s  eval {rows[-1]['eval_time_s_median']:.2f}s  "
              f"peak {rows[-1]['peak_rss_mb']:.0f} MB", flush=True)
    base = next(r for r in rows if r["variant"] == "scenes / VSE++ / fp32 / 2 threads")["pairs_per_s_median"]
    for r in rows: r["speed_vs_scenes_vsepp_fp32_2t"] = r["pairs_per_s_median"] / base
    import torch
    doc = {"benchmark": "training", "quick": a.quick, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
           "note": "shared machine: other jobs ran at the same time; timings vary by +-30%. Throughput = positive "
                   "(caption, item) pairs per second in the training loop (forward, backward, AdamW), median over epochs "
                   "after the first; evaluation = embed every caption and item of the test split, score, metrics.",
           "command": "python bench/training.py" + (" --quick" if a.quick else "") + (" --synthetic" if a.synthetic else ""),
           "results": rows}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(".json.tmp"); tmp.write_text(json.dumps(doc, indent=2) + "\n"); os.replace(tmp, OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
