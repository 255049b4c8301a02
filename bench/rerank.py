"""Retrieve-and-rerank benchmark: cross-encoder passes and per-query time of BE, CE-only and Coop (K=20).

Usage: python bench/rerank.py [--quick]   -> bench/results/rerank.json

A 1,000-item gallery: the emoji-scenes `full` test split (1,000 scenes, 49 x 1280 grid features) if it is in
the benchmark cache, else synthetic features of exactly that shape (the cost depends only on the shapes: the
weights are untrained, so no recall is reported here; recall of BE / CE-only / Coop is the reproduction's job).
Text queries (t2v), one query at a time as a search service sees them:
- BE: encode the query with the bi-encoder use of the model, exact top-10 over the gallery (`Gallery`);
- CE-only: the cross-encoder scores the query against all 1,000 items (batched pairs);
- Coop K=20: BE top-20, then the cross-encoder scores those 20 (`retrieve_and_rerank`).
Two backbones: the tiny preset's model (2 layers, 64 wide) and the packaged MiniLM (6 layers, 384 wide, the
emoji presets' backbone). The gallery's BE embeddings are computed once beforehand (not timed). The three
methods alternate query by query in one process; medians over the queries. The machine is shared with other
jobs while this runs: timings vary by +-30%; compare the ratios.
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

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "rerank.json"
WORDS = ["dog", "cat", "red car", "tree", "boat", "kite", "bench", "clock", "pizza", "horse", "flag", "family"]


def gallery_data(n: int):
    "The emoji-scenes full test split if cached, else synthetic features of its shape; (features, mask, captions, source)."
    from xmretrieval.data.core import benchmark_path, load_benchmark
    if benchmark_path("emoji-scenes", "full", "test").exists():
        d = load_benchmark("emoji-scenes", "full", "test")
        return d.visual_local[:n], d.visual_mask, list(d.captions), "emoji-scenes full test split (cached)"
    g = torch.Generator().manual_seed(0)
    caps = [f"a {WORDS[i % 12]} to the left of a {WORDS[(5 * i + 3) % 12]}" for i in range(5 * n)]
    return torch.rand(n, 49, 1280, generator=g), None, caps, "synthetic, shape of the emoji-scenes test split"


def model(kind: str, visual_dim: int):
    from xmretrieval.models.rerank import RerankConfig, RerankModel
    from xmretrieval.train import load_config
    torch.manual_seed(0)
    if kind == "tiny":
        mc = load_config("rerank_tiny").model_config
        cfg = RerankConfig.from_dict({**mc, "visual_dim": visual_dim})
    else:
        cfg = RerankConfig(path="minilm", pretrained=True, visual_dim=visual_dim)
    return RerankModel(cfg).eval()


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@torch.no_grad()
def bench_backbone(kind: str, feats, mask, captions, n_queries: int, n_ce_queries: int, k: int, batch_size: int) -> dict:
    from xmretrieval.index import Gallery
    from xmretrieval.models.rerank import CrossEncoderReranker, retrieve_and_rerank
    m = model(kind, feats.shape[-1])
    emb = torch.cat([m.encode_visual({"visual_local": feats[i:i + 128]}) for i in range(0, len(feats), 128)])
    gallery = Gallery(emb)
    rr = CrossEncoderReranker(m, feats, mask, batch_size=batch_size)
    queries = captions[:: max(1, len(captions) // n_queries)][:n_queries]
    times = {"BE": [], "CE-only": [], f"Coop K={k}": []}
    passes = {}

    def be(q): gallery.search(m.encode_text({"captions": [q]}), 10)
    def coop(q): retrieve_and_rerank(gallery, m.encode_text({"captions": [q]}), [q], rr, k=k)
    def ce(q): rr.rank([q], top_k=10)

    be(queries[0]); coop(queries[0])                     # warm-up
    for i, q in enumerate(queries):
        times["BE"].append(timed(lambda: be(q)))
        p0 = rr.passes
        times[f"Coop K={k}"].append(timed(lambda: coop(q)))
        passes[f"Coop K={k}"] = rr.passes - p0
        if i < n_ce_queries:
            p0 = rr.passes
            times["CE-only"].append(timed(lambda: ce(q)))
            passes["CE-only"] = rr.passes - p0
    passes["BE"] = 0
    med = {name: statistics.median(t) for name, t in times.items()}
    return {"backbone": kind, "hidden": m.transformer.config.hidden_size, "layers": m.transformer.config.num_hidden_layers,
            "gallery": len(feats), "ce_passes_per_query": passes,
            "median_s_per_query": med, "queries_timed": {n: len(t) for n, t in times.items()},
            "ce_pass_ratio_ce_only_over_coop": passes["CE-only"] / passes[f"Coop K={k}"],
            "speedup_coop_over_ce_only": med["CE-only"] / med[f"Coop K={k}"],
            "slowdown_coop_over_be": med[f"Coop K={k}"] / med["BE"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny backbone only, few queries")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("XMR_BENCH_THREADS", "2")))
    feats, mask, captions, source = gallery_data(1000)
    runs = [bench_backbone("tiny", feats, mask, captions, n_queries=4 if args.quick else 20,
                           n_ce_queries=2 if args.quick else 7, k=20, batch_size=250)]
    if not args.quick:
        runs.append(bench_backbone("minilm", feats, mask, captions, n_queries=7, n_ce_queries=3, k=20, batch_size=125))
    res = {"what": "per-query cost of BE, CE-only and Coop (K=20) for text queries over a 1,000-item gallery",
           "gallery": source, "k": 20, "quick": args.quick, "runs": runs,
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
                      f"torch {torch.__version__}; shared with other jobs while measured (timings +-30%)",
           "command": " ".join(["python", "bench/rerank.py", *sys.argv[1:]])}
    from xmretrieval.core import atomic_path
    with atomic_path(OUT) as tmp: tmp.write_text(json.dumps(res, indent=2) + "\n")
    for r in runs:
        print(r["backbone"], {k: f"{v * 1000:.1f} ms" for k, v in r["median_s_per_query"].items()},
              "passes", r["ce_passes_per_query"], f"Coop/CE-only speed-up x{r['speedup_coop_over_ce_only']:.1f}")
    print(f"-> {OUT}")


if __name__ == "__main__":
    main()
