"""Shuffle quality vs locality of every epoch-order mode, against a uniform permutation.

Usage::

    python benchmarks/shuffle_quality.py [--n 200000] [--shard-size 2000] [--batch 256] [--classes 100]

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

from packfmt.shuffle import EpochOrder, make_blocks


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
    args = ap.parse_args()
    n, batch, classes = args.n, args.batch, args.classes
    bounds = np.arange(0, n, args.shard_size)
    shard_of = np.repeat(np.arange(bounds.size), np.diff(np.append(bounds, n)))
    label_of = (np.arange(n) * classes) // n
    mixed_label_of = np.random.default_rng(12345).permutation(label_of)

    configs = [("none", {}), ("global", {}), ("feistel", {})]
    for bs, win in [(16, 16), (64, 4), (64, 16), (64, 64), (256, 4), (256, 16)]:
        configs.append((f"block {bs}x{win}", {"block_size": bs, "window": win}))

    print(f"n={n} samples, {bounds.size} shards of {args.shard_size}, batch={batch}, {classes} contiguous classes")
    expect_classes = classes * (1 - (1 - 1 / classes) ** batch)
    print(f"uniform expectation: classes/batch ~ {expect_classes:.1f}, |displacement|/n = 0.333, "
          f"nbr pairs ~ {2 / n:.2e}, epoch corr ~ 0\n")
    head = (f"{'mode':<16}{'ranges/batch':>13}{'reads/batch':>12}{'shards/batch':>13}{'classes/batch':>14}{'cls (mixed)':>12}"
            f"{'|disp|/n':>9}{'nbr pairs':>10}{'epoch corr':>11}{'ns/sample':>10}{'peak MiB':>9}"
            f"{'reads vs global':>16}")
    print(head)
    print("-" * len(head))
    rows = {}
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
        rows[name] = r
        ratio = r["reads"] / rows["global"]["reads"] if "global" in rows else float("nan")
        print(f"{name:<16}{r['ranges']:>13.1f}{r['reads']:>12.1f}{r['shards']:>13.1f}{r['classes']:>14.1f}{r['mixed']:>12.1f}"
              f"{r['disp']:>9.3f}{r['nbr']:>10.2e}{r['corr']:>11.3f}{r['ns']:>10.1f}{r['peak'] / 2**20:>9.2f}"
              f"{ratio:>16.3f}")
    blocks = make_blocks(n, 64, bounds).size - 1
    print(f"\n(block mode keeps {blocks} block starts for block_size=64: O(n/block_size) memory; "
          f"global keeps a 4-byte-per-sample permutation: {4 * n / 2**20:.2f} MiB; feistel and none: O(1).)")

    big = args.big_n
    print(f"\nstarting an epoch at n={big:,} (rank 0 of 8): time to the first batch, peak memory (tracemalloc)")
    for mode in ("global", "feistel", "block", "none"):
        tracemalloc.start()
        t = time.perf_counter()
        first = next(EpochOrder(big, seed=1, epoch=0, rank=0, world_size=8, mode=mode).batches(batch))
        dt = time.perf_counter() - t
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert first.size == batch
        print(f"  {mode:<8} {dt * 1e3:9.1f} ms {peak / 2**20:10.2f} MiB")


if __name__ == "__main__":
    main()
