"""Where packfmt's time goes in one row of the peers table: run that row in a loop under `perf`.

    /tmp/peers-venv/bin/python benchmarks/peers/profile_packfmt.py DATASET_DIR ROW [--seconds 8] [--perf]

ROW: random | batched | sequential | loader.  With --perf the script re-runs itself under
``perf record -g`` and prints the top symbols (C core, CPython, libc, kernel); without, it prints a
cProfile of the Python-level calls.  Use the dataset run.py built (/tmp/packfmt-peers/<tree>/packfmt.none).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def workload(path, row, seconds, batch=256):
    import packfmt
    from packfmt_adapter import PackReader
    ds = packfmt.open(path)
    r = PackReader(path, len(ds))
    rng = np.random.default_rng(1)
    idx = rng.integers(0, len(ds), 20_000)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        if row == "random":
            for i in idx.tolist():
                r.get(i)
            done += len(idx)
        elif row == "batched":
            for a in range(0, len(idx), batch):
                r.get_batch(idx[a: a + batch])
            done += len(idx)
        elif row == "sequential":
            for _ in r.iter_all():
                done += 1
        elif row == "loader":
            for b in r.loader(batch, 2, 0):
                done += len(b)
    dt = time.perf_counter() - t0
    print(f"{row}: {done / dt:,.0f} samples/s over {dt:.1f} s", file=sys.stderr)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset")
    p.add_argument("row", choices=["random", "batched", "sequential", "loader"])
    p.add_argument("--seconds", type=float, default=8)
    p.add_argument("--perf", action="store_true")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--plain", action="store_true", help="no profiler (what --perf runs under perf)")
    a = p.parse_args()
    if a.plain:
        workload(a.dataset, a.row, a.seconds)
        return
    if a.perf:
        data = f"/tmp/perf-packfmt-{a.row}.data"
        subprocess.run(["perf", "record", "-q", "-g", "-o", data, "--", sys.executable, __file__, a.dataset, a.row,
                        "--seconds", str(a.seconds), "--plain"], check=False)
        rep = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "dso,symbol", "--stdio",
                              "-g", "none", "--percent-limit", "0.7"], capture_output=True, text=True)
        lines = [ln for ln in rep.stdout.splitlines() if ln.strip() and not ln.startswith("#")]
        print("\n".join(lines[: a.top]))
        return
    pr = cProfile.Profile()
    pr.enable()
    workload(a.dataset, a.row, a.seconds)
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(a.top)


if __name__ == "__main__":
    main()
