"""`train.train_many` with a pool of workers (a spawned pool cannot run under nbdev_test's notebook runner, so here)."""
from __future__ import annotations

import json

from xmretrieval.checkpoint import load_config
from xmretrieval.train import train_many, train_seeds


def test_workers_train_every_run_once_with_the_numbers_of_one_process(tmp_path):
    cfg = load_config("biencoder_vsepp_scenes", "quick").replace(epochs=2)
    jobs = [(cfg, [0, 1], tmp_path / "a"), (cfg.replace(epochs=1), [0], tmp_path / "b")]
    par = train_many(jobs, workers=2)
    assert [len(r["runs"]) for r in par] == [2, 1]
    alone = train_seeds(cfg, [0, 1], tmp_path / "alone")                  # the same config in this process, default threads
    assert par[0]["runs"] == alone["runs"]
    for d in ("a/seed0", "a/seed1", "b/seed0"):
        assert json.loads((tmp_path / d / "metrics.json").read_text())["config"]["num_threads"] == 1
    stamp = (tmp_path / "a/seed0/last.safetensors").stat().st_mtime_ns
    assert train_many(jobs, workers=2) == par                             # finished: collected, not retrained
    assert (tmp_path / "a/seed0/last.safetensors").stat().st_mtime_ns == stamp
