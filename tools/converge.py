"""Train a preset (any model: bi-encoder, CRET, region, ...) to convergence on a benchmark: a small sweep on validation, curves, test metrics.

Each sweep point is one `Trainer` run (one seed) written to OUT/lr{lr}_ep{epochs}/ (resumable: a finished run is
reused). Its test metrics (standard and plausible, `metrics.plausible_metrics`) are reported, and every
validation curve is drawn in OUT/val_curves.png.
The run with the highest validation RSUM among those whose curve plateaued is selected. Usage (the commands
behind results/biencoder_converge_*/; each preset's lr and epochs are the selected point):

    P="python tools/converge.py --threads 1"      # with OMP_NUM_THREADS=1
    $P --preset biencoder_vsepp_scenes --sweep 2e-4:200 4e-4:100 2e-4:100 1e-4:200 --out results/biencoder_converge_scenes
    $P --preset biencoder_infonce_scenes --sweep 1e-3:100 5e-4:150 2e-4:200 --out results/biencoder_converge_infonce_scenes
    $P --preset biencoder_vsepp_video --data-preset small --sweep 2e-4:300 2e-4:100 --out results/biencoder_converge_video_small
    $P --preset biencoder_infonce_video --data-preset small --sweep 2e-4:100 1e-3:100 --out results/biencoder_converge_infonce_video_small
    $P --preset biencoder_vsepp_objects --sweep 2e-4:100 2e-4:200 --out results/biencoder_converge_objects
    $P --preset biencoder_infonce_objects --sweep 2e-4:100 1e-3:100 --out results/biencoder_converge_infonce_objects
    $P --preset cret_emoji_video --data-preset small --batch-size 128 --sweep 1e-3:80 2e-3:80 --out results/cret_converge_video_small
    $P --preset region_emoji_scenes --sweep 2e-4:60 2e-4:120 --out results/region_converge_scenes
    $P --preset region_emoji_objects --sweep 2e-4:20 2e-4:60 --out results/region_converge_objects
    $P --preset region_emoji_video --data-preset small --sweep 2e-4:60 2e-4:200 2e-4:400 --out results/region_converge_video_small

Sweep points may run in separate processes on the same --out (each writes its own lr*_ep* folder); a last call
with every point reuses the finished runs and writes the summary (summary.json/.md, val_curves.png). On a
loaded CPU, one thread per process is much faster than two (OpenMP threads wait for each other).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from xmretrieval.core import atomic_path
from xmretrieval.metrics import chance_metrics, plausible_metrics
from xmretrieval.checkpoint import load_config, load_split
from xmretrieval.train import Trainer, config_changes, convergence


def run_point(cfg, out: Path, data: dict) -> dict:
    "One sweep point: train (or reuse a finished run) and return its summary with its validation history."
    if (out / "metrics.json").exists() and (out / "history.json").exists():
        s = json.loads((out / "metrics.json").read_text())
        if not config_changes(s["config"], cfg.to_dict()):   # same run (old key names mapped)
            return {**s, "history": json.loads((out / "history.json").read_text()), "reused": True}
    resume = (out / "last.safetensors").exists()
    tr = Trainer(cfg, out, resume=resume, **data)
    s = tr.fit()
    test = data["test_data"]
    t, v = tr.model.embed(test, batch_size=cfg.eval_batch_size)
    s["test_plausible"] = plausible_metrics(tr.model.score(t, v), test.text_to_visual, test.match_indptr, test.match_indices)
    with atomic_path(out / "metrics.json") as tmp: tmp.write_text(json.dumps(s, indent=1, default=str))
    return {**s, "history": tr.history, "reused": False}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="biencoder_vsepp_scenes", help="a TrainConfig preset")
    ap.add_argument("--data-preset", default=None, help="benchmark preset (default: the config's), e.g. full:unseen-concept")
    ap.add_argument("--sweep", nargs="+", default=["2e-4:100"], help="lr:epochs points")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=None, help="override the config's (smoke tests on tiny data)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    base = load_config(a.preset)
    if a.data_preset: base = base.replace(data=base.data.replace(preset=a.data_preset))
    base = base.replace(progress=False, num_threads=a.threads, seed=a.seed, batch_size=a.batch_size or base.batch_size)
    t0 = time.time()
    data = {f"{s}_data": load_split(base.data, s) for s in ("train", "val", "test")}
    print(f"data loaded in {time.time() - t0:.0f} s: {data['test_data']}", flush=True)
    if base.data.benchmark.startswith("emoji-"):  # what the protocol promises, measured on this build
        from xmretrieval.data.emoji import composition_stats
        protocol = data["test_data"].meta["config"]["protocol"]
        f = out / "composition_stats.json"
        cs = json.loads(f.read_text()) if f.is_file() else {}
        cs[f"{protocol}, test"] = composition_stats(data["test_data"], data["train_data"])
        cs[f"{protocol}, val"] = composition_stats(data["val_data"], data["train_data"])
        with atomic_path(f) as tmp: tmp.write_text(json.dumps(cs, indent=1))
        print(json.dumps(cs, indent=1), flush=True)
    results = []
    for point in a.sweep:
        lr, ep = point.split(":")
        cfg = base.replace(epochs=int(ep), optim=base.optim.replace(lr=float(lr)))
        t1 = time.time()
        r = run_point(cfg, out / f"lr{lr}_ep{ep}", data)
        r.update(lr=float(lr), epochs=int(ep), wall_s=round(time.time() - t1, 1))
        print(f"lr {lr} epochs {ep}: best epoch {r['best_epoch']}, val RSUM {r['val'].get('RSUM', float('nan')):.1f}, "
              f"test RSUM {r['test']['RSUM']:.1f} (" + ("reused" if r["reused"] else f"{r['wall_s']} s") + ")", flush=True)
        results.append(r)
    for r in results: r["convergence"] = convergence(r["history"], r["epochs"])
    plateaued = [r for r in results if r["convergence"]["plateau"]]
    best = max(plateaued or results, key=lambda r: r["val"]["RSUM"])   # the best plateaued run on validation
    rows = [{"lr": r["lr"], "epochs": r["epochs"], "best_epoch": r["best_epoch"],
             "gain_last_10pct": r["convergence"]["gain_last_10pct"], "plateau": r["convergence"]["plateau"],
             "val_RSUM": r["val"]["RSUM"], "test_RSUM": r["test"]["RSUM"], "train_time_s": r["train_time_s"]} for r in results]
    doc = {"preset": a.preset, "data": base.data.to_dict(), "seed": a.seed, "sweep": rows,
           "selected": {"lr": best["lr"], "epochs": best["epochs"], "best_epoch": best["best_epoch"],
                        "val": best["val"], "test": best["test"], "test_plausible": best["test_plausible"]},
           "chance_RSUM": round(chance_metrics(data["test_data"].text_to_visual, data["test_data"].n_visual)["RSUM"], 2), "machine": "shared 2-core CPU (other jobs running)"}
    with atomic_path(out / "summary.json") as tmp: tmp.write_text(json.dumps(doc, indent=1, default=str))
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for r in results:
        h = [x for x in r["history"] if "val/RSUM" in x]
        ax.plot([x["epoch"] for x in h], [x["val/RSUM"] for x in h],
                label=f"lr {r['lr']:g}, {r['epochs']} epochs" + (" (selected)" if r is best else ""), lw=2 if r is best else 1)
        ax.plot([r["best_epoch"]], [r["val"]["RSUM"]], "o", color=ax.lines[-1].get_color())
    ax.set_xlabel("epoch"); ax.set_ylabel("validation RSUM (of 600)")
    ax.set_title(f"{a.preset} on {base.data.benchmark} ({base.data.preset}), seed {a.seed}")
    ax.grid(alpha=0.3); ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out / "val_curves.png") as tmp: fig.savefig(tmp, format="png")
    sel = doc["selected"]
    md = [f"# {a.preset} trained to convergence on {base.data.benchmark} ({base.data.preset}), seed {a.seed}", "",
          "Sweep on validation (one run per point, cosine schedule over the given epochs; the best-validation "
          "checkpoint of each run is kept). Selected: the highest validation RSUM among the runs whose validation "
          "curve plateaued (the last 10 % of epochs gain at most 1 RSUM point over the best before them, "
          "`xmretrieval.train.convergence`); test numbers are never used to choose.", "",
          "| lr | epochs | best epoch | gain in last 10 % | plateau | val RSUM | test RSUM | train s |", "|---:|---:|---:|---:|---|---:|---:|---:|"]
    md += [f"| {r['lr']:g} | {r['epochs']} | {r['best_epoch']} | {r['gain_last_10pct']:+.1f} | {r['plateau']} | {r['val_RSUM']:.1f} | "
           f"{r['test_RSUM']:.1f} | {r['train_time_s']:.0f} |" for r in rows]
    md += ["", f"Selected: lr {sel['lr']:g}, {sel['epochs']} epochs (best epoch {sel['best_epoch']}). Test "
           f"(the selected run's best-validation checkpoint; chance RSUM {doc['chance_RSUM']}):", "",
           "| " + " | ".join(sel["test"]) + " |", "|" + "---:|" * len(sel["test"]),
           "| " + " | ".join(f"{v:.1f}" for v in sel["test"].values()) + " |", "",
           "Plausibility-aware (exact true matches):", "",
           "| " + " | ".join(sel["test_plausible"]) + " |", "|" + "---:|" * len(sel["test_plausible"]),
           "| " + " | ".join(f"{v:.1f}" for v in sel["test_plausible"].values()) + " |", "",
           "![validation curves](val_curves.png)", "", f"Machine: {doc['machine']}."]
    with atomic_path(out / "summary.md") as tmp: tmp.write_text("\n".join(md) + "\n")
    print(json.dumps(sel, indent=1), flush=True)


if __name__ == "__main__":
    main()
