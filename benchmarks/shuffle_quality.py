"""Shuffle quality vs locality of every epoch-order mode, against a uniform permutation.

Usage::

    python benchmarks/shuffle_quality.py [--n 200000] [--shard-size 2000] [--batch 256] [--classes 1000] [--out docs/shuffle.md]

No dataset is read: the statistics are functions of the order alone.  The
simulated dataset has ``n`` samples stored in index order, ``shard-size``
samples per shard, and ``classes`` labels in contiguous runs (the order in
which an ImageFolder-style tree is usually packed -- the worst case for a
local shuffle).  For each mode it prints, per batch of ``batch`` samples:

* ranges/batch  -- distinct byte ranges a batch needs (runs of consecutive
                   indices after sorting: reads if only adjacent records merge);
* reads/batch   -- the same, merging records up to ``--gap`` indices apart
                   (the reader coalesces across gaps up to ``max_gap`` =
                   64 KiB, i.e. 16 records of 4 KiB: the default ``--gap 16``);
* shards/batch  -- distinct shards a batch touches;
* classes/batch -- distinct labels in a batch (uniform: ~ C(1-(1-1/C)^B));
* cls (mixed)   -- the same when the labels were shuffled at pack time
                   (storage order unrelated to the label), the remedy for
                   block mode's label skew;

and over the epoch:

* |displacement|/n -- mean |position - index| / n (uniform: 1/3);
* nbr pairs     -- fraction of consecutive outputs that are index neighbours
                   (uniform: ~2/n);
* epoch corr    -- Spearman correlation of the positions of a sample in two
                   consecutive epochs (uniform: ~0);
* ns/sample     -- time to compute the order, in batches, as a loader would;
* peak memory   -- tracemalloc peak while doing so.

Ratios are against ``global`` (a uniform permutation) measured in the same run.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

import os
import sys

from packfmt.shuffle import EpochOrder

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import describe_machine, log, machine_info, markdown_table, update_markdown_section  # noqa: E402


def runs_per_batch(seq, batch, gap=1):
    """Reads per batch: runs of sorted indices whose steps are <= ``gap``
    (``gap=1``: exactly adjacent records; larger: what coalescing with a
    gap allowance of ``gap - 1`` records merges into one read)."""
    out = []
    for a in range(0, seq.size, batch):
        b = np.sort(seq[a:a + batch])
        out.append(1 + int(np.count_nonzero(np.diff(b) > gap)))
    return np.array(out)


def distinct_per_batch(labels, batch):
    n = labels.size // batch * batch
    x = np.sort(labels[:n].reshape(-1, batch), axis=1)
    return 1 + np.count_nonzero(np.diff(x, axis=1), axis=1)


def spearman_positions(a, b):
    pa = np.empty(a.size, np.int64)
    pa[a] = np.arange(a.size)
    pb = np.empty(b.size, np.int64)
    pb[b] = np.arange(b.size)
    return float(np.corrcoef(pa, pb)[0, 1])


def timed_epoch(kw, batch):
    """Compute one epoch in batches, as a batch sampler would; time and peak memory."""
    tracemalloc.start()
    t = time.perf_counter()
    o = EpochOrder(**kw)
    count = 0
    for b in o.batches(batch):
        count += b.size
    dt = time.perf_counter() - t
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return dt / max(count, 1) * 1e9, peak


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--shard-size", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--gap", type=int, default=16)
    ap.add_argument("--big-n", type=int, default=100_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", action="append", default=[], metavar="MD",
                    help="also write the tables into this markdown file's 'shuffle_quality' section (repeatable)")
    args = ap.parse_args()
    info = machine_info()
    n, batch, classes = args.n, args.batch, args.classes
    bounds = np.arange(0, n, args.shard_size)
    shard_of = np.repeat(np.arange(bounds.size), np.diff(np.append(bounds, n)))
    label_of = (np.arange(n) * classes) // n
    mixed_label_of = np.random.default_rng(12345).permutation(label_of)

    configs = [("none", {}), ("global", {}), ("feistel", {})]
    for bs, win in [(16, 16), (64, 4), (64, 16), (64, 64), (256, 4), (256, 16)]:
        configs.append((f"block {bs}x{win}", {"block_size": bs, "window": win}))

    expect_classes = classes * (1 - (1 - 1 / classes) ** batch)
    intro = (f"n = {n:,} samples in {bounds.size} shards of {args.shard_size:,}, batches of {batch}, {classes} "
             f"classes stored contiguously; reads merge records up to {args.gap} apart. Uniform expectation: "
             f"classes/batch ~ {expect_classes:.1f}, abs displacement/n = 0.333, neighbour pairs ~ {2 / n:.1e}, "
             f"epoch correlation ~ 0. Machine: {describe_machine(info)}.")
    print(intro)
    rows, res = [], {}
    for name, extra in configs:
        mode = name.split()[0]
        kw = dict(n=n, seed=args.seed, mode=mode, shard_boundaries=bounds, **extra)
        e0 = EpochOrder(epoch=0, **kw).indices()
        e1 = EpochOrder(epoch=1, **kw).indices()
        r = {
            "ranges": runs_per_batch(e0, batch).mean(),
            "reads": runs_per_batch(e0, batch, args.gap).mean(),
            "shards": distinct_per_batch(shard_of[e0], batch).mean(),
            "classes": distinct_per_batch(label_of[e0], batch).mean(),
            "mixed": distinct_per_batch(mixed_label_of[e0], batch).mean(),
            "disp": float(np.abs(e0 - np.arange(n)).mean() / n),
            "nbr": float(np.mean(np.abs(np.diff(e0)) == 1)),
            "corr": spearman_positions(e0, e1),
        }
        r["ns"], r["peak"] = timed_epoch(kw, batch)
        res[name] = r
        log(f"{name}: done")
    for name, r in res.items():
        rows.append([name, f"{r['ranges']:.1f}", f"{r['reads']:.1f}", f"{r['reads'] / res['global']['reads']:.3f}",
                     f"{r['shards']:.1f}", f"{r['classes']:.1f}", f"{r['mixed']:.1f}", f"{r['disp']:.3f}",
                     f"{r['nbr']:.1e}", f"{r['corr']:.3f}", f"{r['ns']:.0f}", f"{r['peak'] / 2**20:.1f}"])
    table = markdown_table(["mode", "ranges/batch", "reads/batch", "reads vs global", "shards/batch",
                            "classes/batch", "cls (mixed)", "abs disp/n", "nbr pairs", "epoch corr",
                            "ns/sample", "peak MiB"], rows)
    print(table)

    big = args.big_n
    big_rows = []
    for mode in ("global", "feistel", "block", "none"):
        tracemalloc.start()
        t = time.perf_counter()
        first = next(EpochOrder(big, seed=1, epoch=0, rank=0, world_size=8, mode=mode).batches(batch))
        dt = time.perf_counter() - t
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert first.size == batch
        big_rows.append([mode, f"{dt * 1e3:,.1f}", f"{peak / 2**20:,.1f}"])
    big_table = markdown_table(["mode", "ms to first batch", "peak MiB"], big_rows)
    big_intro = (f"Starting an epoch at n = {big:,} (rank 0 of 8, block mode with 64x16): time to the first "
                 f"batch and peak memory (tracemalloc).")
    print("\n" + big_intro + "\n" + big_table)
    body = (intro + "\n\n" + table + "\n\n" + big_intro + "\n\n" + big_table +
            f"\n\nCommand: `python benchmarks/shuffle_quality.py --n {n} --shard-size {args.shard_size} "
            f"--batch {batch} --classes {classes} --gap {args.gap} --big-n {big}`\n")
    for path in args.out:
        update_markdown_section(path, "shuffle_quality", "Shuffle quality vs locality (benchmarks/shuffle_quality.py)",
                                body)


if __name__ == "__main__":
    main()
