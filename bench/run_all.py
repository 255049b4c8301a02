"""Run every benchmark in bench/ (each writes bench/results/<name>.json; the docs pages read those files).

Usage: python bench/run_all.py [--quick] [--only retrieval_core,training,...]
Benchmarks time things side by side in one process and report medians: run them on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = {  # name -> extra arguments for --quick (a smoke test of the script in about a minute)
    "retrieval_core": ["--quick"],
    "data_build": ["--skip-full"],
    "training": ["--quick"],
    "dive": ["--quick"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="smoke-test sizes (results are not representative)")
    ap.add_argument("--only", default="", help=f"comma list from {','.join(BENCHES)}")
    args = ap.parse_args()
    only = [b for b in args.only.split(",") if b]
    unknown = sorted(set(only) - set(BENCHES))
    if unknown:
        sys.exit(f"unknown benchmarks {unknown}; choose from {list(BENCHES)}")
    failed = []
    for name, quick_args in BENCHES.items():
        if only and name not in only:
            continue
        cmd = [sys.executable, str(HERE / f"{name}.py"), *(quick_args if args.quick else [])]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        if subprocess.run(cmd).returncode:
            failed.append(name)
        print(f"== {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    if failed:
        sys.exit(f"benchmarks failed: {failed}")


if __name__ == "__main__":
    main()
