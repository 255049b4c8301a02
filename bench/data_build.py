"""Build times of the embedded emoji benchmarks (features included), written to bench/results/data_build.json.

tiny: every split built from an empty cache, then reloaded from the cache.
full: one split (default val) built from an empty cache; the time of the whole preset is extrapolated from
its per-item rate (items of a benchmark cost the same in every split). One run each: a full build takes
minutes. The machine is shared (other processes run at the same time): the load average is recorded.

Usage: python bench/data_build.py [--full-split val] [--skip-full]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from xmretrieval.core import atomic_path
from xmretrieval.data.core import load_benchmark
from xmretrieval.data.emoji import PRESETS, n_items

NAMES = ("emoji-objects", "emoji-scenes", "emoji-video")
SPLITS = ("train", "val", "test")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "data_build.json"))
    ap.add_argument("--full-split", default="val")
    ap.add_argument("--skip-full", action="store_true")
    ap.add_argument("--skip-tiny", action="store_true")
    args = ap.parse_args()
    res = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                       "bf16_cpu": bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())},
           "note": ("shared 2-core machine: other helpers' jobs ran at the same time (see load averages), so wall times are "
                    "several times those of an idle machine; cpu_seconds (this process, all threads) is the steadier "
                    "measure; one run per entry"),
           "tiny": {}, "full": {}}
    out = Path(args.out)
    if out.is_file():  # keep the sections not measured in this run
        old = json.loads(out.read_text())
        res["tiny"], res["full"] = old.get("tiny", {}), old.get("full", {})
    with tempfile.TemporaryDirectory() as cache:
        for name in (() if args.skip_tiny else NAMES):
            r = {"splits": {}, "load_avg_before": os.getloadavg()}
            for split in SPLITS:
                t, c = time.perf_counter(), time.process_time()
                d = load_benchmark(name, "tiny", split, cache_dir=cache)
                r["splits"][split] = {"n_visual": d.n_visual, "n_text": d.n_text, "seconds": round(time.perf_counter() - t, 2),
                                      "cpu_seconds": round(time.process_time() - c, 2)}
            t = time.perf_counter(); load_benchmark(name, "tiny", "test", cache_dir=cache)
            r["cached_reload_seconds"] = round(time.perf_counter() - t, 3)
            r["total_seconds"] = round(sum(s["seconds"] for s in r["splits"].values()), 1)
            r["total_cpu_seconds"] = round(sum(s["cpu_seconds"] for s in r["splits"].values()), 1)
            r["load_avg_after"] = os.getloadavg()
            res["tiny"][name] = r
            print(name, "tiny", r, flush=True)
        if not args.skip_full:
            for name in NAMES:
                sizes = {s: n_items(name, "full", s) for s in SPLITS}
                la = os.getloadavg()
                t, c = time.perf_counter(), time.process_time()
                d = load_benchmark(name, "full", args.full_split, cache_dir=cache)
                dt, dc = time.perf_counter() - t, time.process_time() - c
                total = sum(sizes.values())
                res["full"][name] = {"measured_split": args.full_split, "n_visual": d.n_visual, "n_text": d.n_text,
                                     "seconds": round(dt, 1), "cpu_seconds": round(dc, 1),
                                     "seconds_per_item": round(dt / d.n_visual, 4),
                                     "sizes": sizes, "extrapolated_total_seconds": round(dt / d.n_visual * total),
                                     "cache_mb_measured_split": round(
                                         Path(cache, name, f"full-{args.full_split}.safetensors").stat().st_size / 2**20, 1),
                                     "load_avg_before": la, "load_avg_after": os.getloadavg()}
                print(name, "full", res["full"][name], flush=True)
    with atomic_path(out) as tmp: tmp.write_text(json.dumps(res, indent=1) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
