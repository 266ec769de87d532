#!/usr/bin/env python3
"""Throughput of the record checksum: the C core's XXH3-64 (scalar and AVX2 loops) against its XXH64
(the baseline: the record checksum before) and the `xxhash` package's XXH3-64, at record-like and large
sizes.  The machine may be busy: every figure is the best of many interleaved repetitions.

    python benchmarks/checksum.py [--reps 30] [--sizes 64,4096,8388608]

Prints GB/s per (hash, size) and the ratio against _core.xxh64 at the same size.
"""

from __future__ import annotations

import argparse
import os
import time

import xxhash

from packfmt import _core


def best_rate(fn, data, reps: int, budget: float = 0.02) -> float:
    """Bytes/s of fn(data): the best of reps timed loops, each about `budget` seconds long."""
    n = max(1, int(budget * 2e9 / max(len(data), 64)))
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(n):
            fn(data)
        best = min(best, (time.perf_counter() - t) / n)
    return len(data) / best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--sizes", default="64,4096,8388608")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    start = _core.xxh3_impl()

    # name -> (function, XXH3 code path to select first); the same C function twice, on each path.
    hashes = {
        "_core.xxh64 (baseline)": (_core.xxh64, start),
        "_core.xxh3_64 scalar": (_core.xxh3_64, "scalar"),
        "_core.xxh3_64 avx2": (_core.xxh3_64, "avx2"),
        "xxhash.xxh3_64_intdigest": (xxhash.xxh3_64_intdigest, start),
    }
    if _core.xxh3_impl("avx2") != "avx2":
        del hashes["_core.xxh3_64 avx2"]
    rates = {(h, s): 0.0 for h in hashes for s in sizes}
    datas = {s: os.urandom(s) for s in sizes}
    # Interleave: each round times every (hash, size) once with a few repetitions; keep the best.
    rounds = max(1, args.reps // 3)
    for _ in range(rounds):
        for s in sizes:
            for h, (fn, impl) in hashes.items():
                _core.xxh3_impl(impl)
                rates[h, s] = max(rates[h, s], best_rate(fn, datas[s], 3))
    _core.xxh3_impl(start)
    print(f"XXH3 default path here: {start}; best of {rounds * 3} repetitions, interleaved")
    print(f"{'hash':28s}" + "".join(f"{s:>22,d} B" for s in sizes))
    for h in hashes:
        cells = []
        for s in sizes:
            r = rates[h, s]
            base = rates["_core.xxh64 (baseline)", s]
            cells.append(f"{r / 1e9:8.2f} GB/s ({r / base:4.2f}x)")
        print(f"{h:28s}" + "".join(f"{c:>24s}" for c in cells))


if __name__ == "__main__":
    main()
