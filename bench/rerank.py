"""Retrieve-and-rerank benchmark: cross-encoder passes and per-query time of BE, CE-only and Coop (K=20).

Usage: python bench/rerank.py [--quick] [--out FILE]   -> bench/results/rerank.json

A 1,000-item gallery: the emoji-scenes `full` test split (1,000 scenes, 49 x 1280 grid features) if it is in
the benchmark cache, else synthetic features of exactly that shape (the cost depends only on the shapes: the
weights are untrained, so no recall is reported here; recall of BE / CE-only / Coop is the reproduction's job).
Text queries (t2v), one query at a time as a search service sees them:
- BE: encode the query with the bi-encoder use of the model, exact top-10 over the gallery (`Gallery`);
- CE-only: the cross-encoder scores the query against all 1,000 items (batched pairs);
- Coop K=20: BE top-20, then the cross-encoder scores those 20 (`retrieve_and_rerank`).
Two backbones: the tiny preset's model (2 layers, 64 wide) and the packaged MiniLM (6 layers, 384 wide, the
emoji presets' backbone). The gallery's BE embeddings are computed once beforehand (not timed). The three
methods alternate query by query in one process; medians over the queries. The measurement is
`xmretrieval.repro.rerank.query_costs`, which the reproduction also runs on its test split; each run also
records `search_s_per_item`, exact search's seconds per item and query on 100,000 random vectors of the
model's width, the slope with which `extrapolate_costs` takes BE and Coop to 1M items. The machine is
shared with other jobs while this runs: timings vary by +-30%; compare the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
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


@torch.no_grad()
def bench_backbone(kind: str, feats, mask, captions, n_queries: int, n_ce_queries: int, k: int, batch_size: int) -> dict:
    from xmretrieval.repro.rerank import exact_search_seconds_per_item, query_costs
    m = model(kind, feats.shape[-1])
    queries = captions[:: max(1, len(captions) // n_queries)][:n_queries]
    costs = query_costs(m, m, feats, mask, queries, k=k, n_ce_queries=n_ce_queries, batch_size=batch_size)
    costs["search_s_per_item"] = exact_search_seconds_per_item(m.transformer.config.hidden_size)
    passes, med, coop = costs["ce_passes_per_query"], costs["median_s_per_query"], f"Coop K={k}"
    return {"backbone": kind, "hidden": m.transformer.config.hidden_size, "layers": m.transformer.config.num_hidden_layers,
            **costs,
            "ce_pass_ratio_ce_only_over_coop": passes["CE-only"] / passes[coop],
            "speedup_coop_over_ce_only": med["CE-only"] / med[coop],
            "slowdown_coop_over_be": med[coop] / med["BE"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny backbone only, few queries")
    ap.add_argument("--out", default=str(OUT), help=f"result file (default {OUT.relative_to(ROOT)})")
    args = ap.parse_args()
    out = Path(args.out)
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
    with atomic_path(out) as tmp: tmp.write_text(json.dumps(res, indent=2) + "\n")
    for r in runs:
        print(r["backbone"], {k: f"{v * 1000:.1f} ms" for k, v in r["median_s_per_query"].items()},
              "passes", r["ce_passes_per_query"], f"Coop/CE-only speed-up x{r['speedup_coop_over_ce_only']:.1f}")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
