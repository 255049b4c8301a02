"""Run every benchmark in bench/ (each writes bench/results/<name>.json; the docs pages read those files).

Usage: python bench/run_all.py [--only retrieval_core,training,...]
(each script also has a --quick smoke test; run it by hand, it writes its JSON like a real run)
Benchmarks time things side by side in one process and report medians: run them on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ("retrieval_core", "data_build", "training", "dive", "search", "rerank")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", default="", help=f"comma list from {','.join(BENCHES)}")
    args = ap.parse_args()
    only = [b for b in args.only.split(",") if b]
    unknown = sorted(set(only) - set(BENCHES))
    if unknown:
        sys.exit(f"unknown benchmarks {unknown}; choose from {list(BENCHES)}")
    failed = []
    for name in BENCHES:
        if only and name not in only:
            continue
        cmd = [sys.executable, str(HERE / f"{name}.py")]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        if subprocess.run(cmd).returncode:
            failed.append(name)
        print(f"== {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    if failed:
        sys.exit(f"benchmarks failed: {failed}")


if __name__ == "__main__":
    main()
