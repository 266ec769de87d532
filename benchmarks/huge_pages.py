#!/usr/bin/env python
"""Random get_batch from shards that a training epoch faulted into the page cache, with the shard maps
advised to use 2 MiB pages (``packfmt.open(..., huge_pages=True)``) against without (``False``).

A dataset that fits in memory usually gets there by being read: the first epoch's random reads fault
the shards in.  Without the advice, each fault reads ~128 KiB around it into 4 KiB pages, and every
later random read of a 6 KiB sample walks the page tables (in a VM, a two-level walk) for 2-3 pages.
With it, a fault reads 2-4 MiB into 2 MiB folios mapped by one TLB entry each.  This script measures
both in one process, alternating, from the same starting point:

1. evict the dataset's shards from the page cache (``posix_fadvise(DONTNEED)``; nothing maps them);
2. open the dataset with ``huge_pages=False`` or ``True`` and read one random epoch in batches of 256
   (untimed; the page faults fill the cache);
3. time ``--reps`` more random epochs (best of), counting ``pgpgin`` (must be ~0: a memory figure)
   and reading how much of the shards the process has mapped with 2 MiB pages (``FilePmdMapped``).

    python benchmarks/huge_pages.py [--files 200000] [--rounds 2] [--out docs/benchmarks.md]

Uses the cached tree and ``--compression none`` dataset of ``random_access.py`` (built if missing).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    DEFAULT_CACHE,
    REPO,
    TreeSpec,
    describe_machine,
    ensure_dataset,
    ensure_tree,
    evict_files,
    fmt_rate,
    log,
    machine_info,
    markdown_table,
    pgpgin_kib,
    pmd_mapped_kib,
    update_markdown_section,
)

import packfmt  # noqa: E402

SECTION, TITLE = "huge-pages", "Shard maps with 2 MiB pages: `benchmarks/huge_pages.py`"


def shard_paths(ds_dir: str) -> list:
    return sorted(os.path.join(ds_dir, n) for n in os.listdir(ds_dir) if n.endswith(".pack"))


def epoch(ds, perm, batch) -> None:
    for a in range(0, len(perm), batch):
        ds.get_batch(perm[a:a + batch])


def measure(ds_dir, huge: bool, perms, batch, reps) -> dict:
    paths = shard_paths(ds_dir)
    evict_files(paths)
    k0, t0 = pgpgin_kib(), time.perf_counter()
    ds = packfmt.open(ds_dir, huge_pages=huge)
    epoch(ds, perms[0], batch)  # the faults fill the page cache
    fill_s, fill_kib = time.perf_counter() - t0, pgpgin_kib() - k0
    best, paged = float("inf"), 0
    for r in range(reps):
        k0, t0 = pgpgin_kib(), time.perf_counter()
        epoch(ds, perms[1 + r], batch)
        best = min(best, time.perf_counter() - t0)
        paged += pgpgin_kib() - k0
    pmd = pmd_mapped_kib(paths)
    ds.close()
    n = len(perms[0])
    return dict(huge=huge, rate=n / best, fill_s=fill_s, fill_kib=fill_kib, paged=paged, pmd_kib=pmd,
                shard_kib=sum(os.path.getsize(p) for p in paths) // 1024)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=200_000)
    ap.add_argument("--cache", default=DEFAULT_CACHE)
    ap.add_argument("--rounds", type=int, default=2, help="alternating (False, True) pairs (default 2)")
    ap.add_argument("--reps", type=int, default=3, help="timed epochs per measurement, best of (default 3)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--out", nargs="?", const=os.path.join(REPO, "docs", "benchmarks.md"), default=None)
    args = ap.parse_args()

    info = machine_info()
    spec = TreeSpec(files=args.files)
    tree = ensure_tree(args.cache, spec, log=log)
    ds_dir = ensure_dataset(args.cache, spec, tree, "none", log=log)
    n = len(packfmt.open(ds_dir))
    rng = np.random.default_rng(1)
    perms = [rng.permutation(n) for _ in range(1 + args.reps)]
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    results = []
    for r in range(args.rounds):
        for huge in ((False, True) if r % 2 == 0 else (True, False)):
            log(f"round {r + 1}, huge_pages={huge} ...")
            res = measure(ds_dir, huge, perms, args.batch, args.reps)
            log(f"  {fmt_rate(res['rate'])} samples/s (fill {res['fill_s']:.1f} s, {res['fill_kib']:,} KiB from disk; "
                f"timed pgpgin {res['paged']:,} KiB; 2 MiB-mapped {res['pmd_kib']:,} of {res['shard_kib']:,} KiB)")
            results.append(res)

    off = [x["rate"] for x in results if not x["huge"]]
    on = [x["rate"] for x in results if x["huge"]]
    rows = [[str(x["huge"]), fmt_rate(x["rate"]), f"{x['fill_s']:.1f}", f"{x['fill_kib']:,}", f"{x['paged']:,}",
             f"{x['pmd_kib'] * 100 // max(x['shard_kib'], 1)}%"] for x in results]
    table = markdown_table(["huge_pages", "get_batch(256) samples/s (best)", "fill epoch s", "fill: read from disk KiB",
                            "timed pgpgin KiB", "shards mapped with 2 MiB pages"], rows)
    ratio = float(np.median(on)) / float(np.median(off))
    text = (f"Command: `python benchmarks/huge_pages.py {' '.join(sys.argv[1:])}`  \n"
            f"Date: {started}  \nMachine: {describe_machine(info)}.  \n"
            f"Data: the `none` dataset of {n:,} samples of `random_access.py`; random epochs in batches of "
            f"{args.batch}, verified reads; each row starts with the shards evicted, fills the cache with one "
            f"untimed random epoch, then times {args.reps} epochs.\n\n{table}\n\n"
            f"Median with huge pages / median without: **{ratio:.2f}x**.\n")
    print(text)
    if args.out:
        update_markdown_section(args.out, SECTION, TITLE, text)
        log(f"wrote section {SECTION!r} of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
