"""One shuffled epoch from a (loopback) S3 server with injected latency: packfmt vs loose objects.

Usage::

    python benchmarks/remote.py [--n 100000] [--latency 0.02] [--workers 2] [--batch 256]
                                [--repeat 5] [--cache /tmp/packfmt-bench] [--out docs/benchmarks.md]

Starts moto's standalone S3 server on 127.0.0.1 and, in front of it, the fault-injecting proxy of
``tests/conftest_servers.py`` adding ``--latency`` seconds to every request (a stand-in for a real
object store's first-byte latency; loopback has none). The proxy logs every request, so requests
and bytes are counted on the server side, across all DataLoader workers.

The dataset: ``--n`` samples of 256 B - 2 KiB (random bytes, so nothing compresses), stored raw in
4 MiB shards, built locally and uploaded. Every run is one epoch through
``DataLoader(PackDataset(url), batch_sampler=PackBatchSampler(mode), num_workers=W)``:

* per shuffle mode (``global``: a true permutation; ``block``: locality-aware, blocks of 64
  neighbouring samples mixed in windows of 16 blocks; ``none``: sequential),
* with the node-local page cache cold (emptied first) and warm (the same epoch again),
* and without a page cache (``cache=False``: coalesced ranged GETs straight from the store) —
  for the global order this means about one GET per sample, so only the first ``--uncached-n``
  samples of the epoch are run and the figures are per sample;
* against the same data as loose objects, one GET per sample (a map-style dataset whose
  ``__getitem__`` does ``get_object``), on ``--loose-n`` objects (uploading 100k objects to moto
  would take minutes; per-sample figures do not depend on the count);
* and the local-disk epochs of the same dataset (the warm page cache target: within 2x), alternating
  with the warm epochs, ``--repeat`` pairs; medians reported (an epoch lasts a tenth of a second).

Figures: requests per sample, bytes fetched / dataset bytes, samples/s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

import packfmt
from packfmt.torch import PackBatchSampler, PackDataset

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from common import describe_machine, log, machine_info, markdown_table, update_markdown_section  # noqa: E402
from conftest_servers import TEST_CREDENTIALS, FaultProxy, MotoServer  # noqa: E402

BUCKET = "bench"


def build(root: str, n: int) -> str:
    """The local dataset (built once, reused)."""
    ds_dir = os.path.join(root, f"remote-{n}")
    if os.path.exists(os.path.join(ds_dir, "manifest.json")):
        return ds_dir
    shutil.rmtree(ds_dir, ignore_errors=True)
    rng = np.random.default_rng(0)
    sizes = rng.integers(256, 2049, n)
    blob = rng.integers(0, 256, int(sizes.max()) + n, dtype=np.uint8).tobytes()
    t = time.perf_counter()
    with packfmt.Writer(ds_dir, shard_size="4MiB") as w:
        for i in range(n):
            w.add(f"s/{i:07d}.bin", blob[i:i + sizes[i]], label=i % 100)
    log(f"built {n} samples in {time.perf_counter() - t:.1f} s under {ds_dir}")
    return ds_dir


def sample_bytes(ds_dir: str) -> tuple:
    ds = packfmt.open(ds_dir)
    lens = np.asarray(ds.stored_lengths, dtype=np.int64)
    return int(lens.sum()), sum(s["size"] for s in ds.manifest["shards"]), ds


def count_collate(batch):
    """Only what crossed into the worker matters here: (samples, bytes)."""
    return len(batch), sum(len(x) for x in batch)


def run_epoch(loader) -> tuple:
    t = time.perf_counter()
    count = nbytes = 0
    for c, b in loader:
        count += c
        nbytes += b
    return count, nbytes, time.perf_counter() - t


class LimitedBatches:
    """The first ``limit`` samples of a batch sampler's epoch."""

    def __init__(self, sampler, limit):
        self.sampler, self.limit = sampler, limit

    def __iter__(self):
        seen = 0
        for b in self.sampler:
            if seen >= self.limit:
                return
            b = b[:self.limit - seen]
            seen += len(b)
            yield b

    def __len__(self):
        return -(-min(self.limit, len(self.sampler.order())) // self.sampler.batch_size)


class LooseObjects(Dataset):
    """One S3 object per sample, one GET per ``__getitem__`` (what a naive loader does)."""

    def __init__(self, endpoint, keys):
        self.endpoint, self.keys, self._client = endpoint, keys, None

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        if self._client is None:
            import boto3
            from botocore.config import Config
            self._client = boto3.client("s3", endpoint_url=self.endpoint, config=Config(
                s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}), **TEST_CREDENTIALS)
        return self._client.get_object(Bucket=BUCKET, Key=self.keys[i])["Body"].read()

    def __getstate__(self):
        return {"endpoint": self.endpoint, "keys": self.keys, "_client": None}


class LooseObjectsThreaded(LooseObjects):
    """The strongest simple loose-object loader: a batch's GETs run on 16 threads per worker."""

    def __getitems__(self, indices):
        from concurrent.futures import ThreadPoolExecutor
        if getattr(self, "_pool", None) is None:
            self[indices[0]]                       # create the client once, before the threads
            self._pool = ThreadPoolExecutor(16)
        return list(self._pool.map(self.__getitem__, indices))

    def __getstate__(self):
        return {"endpoint": self.endpoint, "keys": self.keys, "_client": None, "_pool": None}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--latency", type=float, default=0.02, help="seconds added to every request (default 0.02)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=1 << 20, help="page cache block size (default 1 MiB)")
    ap.add_argument("--uncached-n", type=int, default=4096, help="samples run without a page cache (global)")
    ap.add_argument("--loose-n", type=int, default=2000, help="loose objects uploaded and read")
    ap.add_argument("--repeat", type=int, default=5,
                    help="warm and local-disk epochs, alternating; the table gives medians (default 5)")
    ap.add_argument("--cache", default="/tmp/packfmt-bench")
    ap.add_argument("--out", action="append", default=[], metavar="MD",
                    help="also write the table into this markdown file's 'remote' section (repeatable)")
    args = ap.parse_args()
    info = machine_info()
    torch.set_num_threads(1)
    W, B = args.workers, args.batch
    os.makedirs(args.cache, exist_ok=True)
    ds_dir = build(args.cache, args.n)
    payload, stored, local_ds = sample_bytes(ds_dir)

    moto = MotoServer(os.path.join(args.cache, "moto.log"))
    proxy = FaultProxy(moto.endpoint)
    try:
        s3 = moto.client()
        s3.create_bucket(Bucket=BUCKET)
        t = time.perf_counter()
        names = ["manifest.json", "index.arrow"] + [s["name"] for s in local_ds.manifest["shards"]]
        for name in names:
            s3.upload_file(os.path.join(ds_dir, name), BUCKET, f"ds/{name}")
        log(f"uploaded {len(names)} objects in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        loose_idx = np.random.default_rng(1).choice(args.n, size=min(args.loose_n, args.n), replace=False)
        loose_keys = [f"loose/{i:07d}.bin" for i in loose_idx]
        for i, key in zip(loose_idx.tolist(), loose_keys):
            s3.put_object(Bucket=BUCKET, Key=key, Body=local_ds[i])
        log(f"uploaded {len(loose_keys)} loose objects in {time.perf_counter() - t:.1f} s")

        url = f"s3://{BUCKET}/ds"
        opts = dict(TEST_CREDENTIALS, endpoint_url=proxy.url)
        proxy.latency = args.latency
        rows = []

        def measure(name, epoch_fn, samples_expected, note="", latency=args.latency, record=True):
            proxy.reset()
            proxy.latency = latency
            count, nbytes, dt = epoch_fn()
            assert count == samples_expected, (name, count, samples_expected)
            gets = proxy.log("GET")
            opens = sum(1 for e in gets if e.path.endswith(("/manifest.json", "/index.arrow")))
            data_gets = [e for e in gets if not e.path.endswith(("/manifest.json", "/index.arrow"))]
            fetched = sum(e.sent for e in data_gets)
            row = dict(name=name, samples=count, rate=count / dt, req=len(data_gets) / count,
                       opens=opens, ratio=fetched / (payload * count / args.n), secs=dt, note=note)
            if record:
                rows.append(row)
            log(f"{name}: {count / dt:,.0f} samples/s, {len(data_gets)} GETs "
                f"(1 per {count / max(1, len(data_gets)):.0f} samples), fetched {fetched / 2**20:.1f} MiB "
                f"({row['ratio']:.2f}x), {dt:.1f} s")
            return row

        def median_row(name, runs, note=""):
            """One table row for repeated epochs: the median rate, request and byte figures summed."""
            rates = sorted(r["rate"] for r in runs)
            count = sum(r["samples"] for r in runs)
            row = dict(name=name, samples=runs[0]["samples"], rate=float(np.median(rates)),
                       req=sum(r["req"] * r["samples"] for r in runs) / count,
                       ratio=sum(r["ratio"] * r["samples"] for r in runs) / count, note=note,
                       spread=f"{rates[0]:,.0f}-{rates[-1]:,.0f}")
            rows.append(row)
            return row

        # Samples per page-cache block: the locality-aware shuffle reads blocks of that many neighbours.
        per_block = max(1, int(args.block_size // (payload / args.n)))

        def epochs(source, mode, limit=None, open_kwargs=None, block=per_block, window=16):
            """A persistent DataLoader, as in training: epoch 1 opens the dataset in each worker."""
            ds = PackDataset(source, open_kwargs=open_kwargs)
            sampler = PackBatchSampler(ds, B, seed=0, epoch=1, mode=mode, block_size=block, window=window)
            bs = sampler if limit is None else LimitedBatches(sampler, limit)
            loader = DataLoader(ds, batch_sampler=bs, num_workers=W, collate_fn=count_collate, prefetch_factor=4,
                                persistent_workers=True)
            state = {"epoch": 0}

            def one():
                state["epoch"] += 1
                sampler.set_epoch(state["epoch"])
                return run_epoch(loader)
            return one

        def batch_costs(url, opts, cdir, nbatches=200, reps=5):
            """CPU time per batch of B random samples in this process, one thread: the local copy against the
            warm page cache (the same blocks the workers just read), best of reps passes."""
            from packfmt.cache import PageCache
            rng = np.random.default_rng(7)
            batches = [rng.integers(0, args.n, B) for _ in range(nbatches)]
            dss = {"local disk": packfmt.open(ds_dir)}
            for verify in (True, False):
                dss[f"page cache, verify={verify}"] = packfmt.open(url, storage_options=opts, cache=PageCache(cdir),
                                                                   verify=verify)
            out = {}
            for name, ds in dss.items():
                for what in ("get_batch", "get_batch_packed"):
                    fn = getattr(ds, what)
                    best = float("inf")
                    for _ in range(reps):
                        t = time.process_time()
                        for b in batches:
                            fn(b)
                        best = min(best, (time.process_time() - t) / nbatches)
                    out[(name, what)] = best
                    log(f"{name}, {what}: {best * 1e6:.0f} us CPU per batch of {B}")
            return out

        def fresh_cache(tag, capacity):
            """An empty page cache (picklable: each worker re-opens the same directory)."""
            from packfmt.cache import PageCache
            cdir = os.path.join(args.cache, f"pagecache-{tag}")
            shutil.rmtree(cdir, ignore_errors=True)
            return PageCache(cdir, capacity=capacity, block_size=args.block_size)

        # S3 through a page cache larger than the dataset: epoch 1 cold, then warm epochs, alternating with
        # epochs of a persistent loader over the local copy (the target of the warm epoch: within 2x).  An
        # epoch takes a tenth of a second, so one pair is at the mercy of the machine's other jobs: the
        # table gives the medians of --repeat alternating pairs, and the spread.
        big = 2 * stored + (64 << 20)
        R = args.repeat
        for mode in ("global", "block", "none"):
            ep = epochs(url, mode, open_kwargs=dict(storage_options=opts, cache=fresh_cache(mode, big)))
            measure(f"S3 {mode}, page cache cold (epoch 1)", ep, args.n, note="includes opening in each worker")
            if mode == "none":
                warm = [measure(f"S3 {mode}, page cache warm", ep, args.n, record=False) for _ in range(R)]
                median_row(f"S3 {mode}, page cache warm (epochs 2-{R + 1}, median)", warm)
                continue
            lep = epochs(ds_dir, mode)
            lep()  # epoch 1: workers start and open the shards
            local, warm = [], []
            for _ in range(R):
                local.append(measure(f"local disk, {mode}", lep, args.n, latency=0, record=False))
                warm.append(measure(f"S3 {mode}, page cache warm", ep, args.n, record=False))
            if mode == "global":
                costs = batch_costs(url, opts, cdir=os.path.join(args.cache, "pagecache-global"))
            lrow = median_row(f"local disk, {mode} (epochs 2-{R + 1}, median)", local)
            wrow = median_row(f"S3 {mode}, page cache warm (epochs 2-{R + 1}, median)", warm)
            pair = sorted(w["rate"] / lo["rate"] for w, lo in zip(warm, local))
            wrow["note"] = (f"{wrow['rate'] / lrow['rate']:.2f}x the local-disk median "
                            f"(pairs: {pair[0]:.2f}-{pair[-1]:.2f}x)")
        # a page cache holding a quarter of the dataset: locality decides what is fetched again
        # (a shuffle-block window spans about window x 2 cache blocks per worker: that must fit)
        small = stored // 4
        for mode, window in (("global", 16), ("block", 16), ("block", 4)):
            limit = args.uncached_n if mode == "global" else None
            ep = epochs(url, mode, limit=limit, window=window,
                        open_kwargs=dict(storage_options=opts, cache=fresh_cache(f"small-{mode}-{window}", small)))
            what = "" if mode == "global" else f", window {window}"
            measure(f"S3 {mode}{what}, page cache of 1/4 the dataset (epoch 1)", ep, limit or args.n,
                    note=f"{small / 2**20:.0f} MiB cache" + (f"; first {limit:,} samples" if limit else ""))
        # no page cache: coalesced ranged GETs straight from the store
        for mode in ("global", "block", "none"):
            limit = args.uncached_n if mode == "global" else None
            # without a cache, blocks of 64 samples (the shuffle's default) suit coalescing better
            ep = epochs(url, mode, limit=limit, open_kwargs=dict(storage_options=opts, cache=False), block=64)
            measure(f"S3 {mode}, no page cache (epoch 1)", ep, limit or args.n,
                    note=(f"first {limit:,} samples of the epoch" if limit else
                          "blocks of 64 samples" if mode == "block" else ""))
        # loose objects, one GET per sample
        loose = DataLoader(LooseObjects(proxy.url, loose_keys), batch_size=B, shuffle=True, num_workers=W,
                           collate_fn=count_collate, prefetch_factor=4)
        base = measure("loose objects, 1 GET per sample", lambda: run_epoch(loose), len(loose_keys),
                       note=f"{len(loose_keys):,} objects; the baseline")
        loose = DataLoader(LooseObjectsThreaded(proxy.url, loose_keys), batch_size=B, shuffle=True,
                           num_workers=W, collate_fn=count_collate, prefetch_factor=4)
        measure("loose objects, 16 GETs in flight per worker", lambda: run_epoch(loose), len(loose_keys),
                note=f"{len(loose_keys):,} objects")
    finally:
        proxy.stop()
        moto.stop()

    for r in rows:
        r["vs"] = r["rate"] / base["rate"]
    table = markdown_table(
        ["run", "samples", "GETs / sample", "samples / GET", "bytes fetched / dataset bytes", "samples/s",
         "samples/s, min-max", "vs loose objects", "note"],
        [[r["name"], f"{r['samples']:,}", f"{r['req']:.4f}", f"{1 / r['req']:.0f}" if r["req"] else "-",
          f"{r['ratio']:.3f}", f"{r['rate']:,.0f}", r.get("spread", ""), f"{r['vs']:.1f}x", r["note"]]
         for r in rows],
        align="lrrrrrrrl")
    base_cost = {w: costs[("local disk", w)] for w in ("get_batch", "get_batch_packed")}
    cost_table = markdown_table(
        ["one process, one thread", "get_batch: µs CPU / batch", "vs local disk", "get_batch_packed: µs CPU / batch",
         "vs local disk"],
        [[name] + [x for w in ("get_batch", "get_batch_packed")
                   for x in (f"{costs[(name, w)] * 1e6:,.0f}", f"{base_cost[w] / costs[(name, w)]:.2f}x")]
         for name in ("local disk", "page cache, verify=True", "page cache, verify=False")],
        align="lrrrr")
    cost_intro = (f"Warm batches without the DataLoader: CPU time per `get_batch` of {B} random samples in the main "
                  f"process (best of 5 passes over 200 batches), the local copy against the warm page cache the "
                  f"`global` epochs used; `vs local disk` is local CPU time / this row's (higher is faster).")
    intro = (f"{args.n:,} samples of 256 B-2 KiB ({payload / 2**20:.0f} MiB of samples, {stored / 2**20:.0f} MiB "
             f"stored in {len(local_ds.shards)} shards of 4 MiB), read from moto's S3 server on 127.0.0.1 through a "
             f"proxy adding {args.latency * 1000:.0f} ms to every request; one epoch through "
             f"`DataLoader(num_workers={W}, persistent_workers=True)` with batches of {B}; page cache blocks of "
             f"{args.block_size >> 10} KiB; `block` mode shuffles blocks of {per_block} neighbouring samples "
             f"(about one cache block) in windows of 16 blocks unless noted. Warm and local-disk rows: the median of "
             f"{args.repeat} epochs, a local-disk epoch and a warm one alternating (\"pairs\": the range of the "
             f"{args.repeat} warm/local ratios). GETs and bytes are counted at the proxy (all workers), without "
             f"the 2 GETs (manifest, index) each process spends to open the dataset. "
             f"Machine: {describe_machine(info)}.")
    print(intro)
    print(table)
    print(cost_intro)
    print(cost_table)
    body = intro + "\n\n" + table + "\n\n" + cost_intro + "\n\n" + cost_table + (
        f"\n\nCommand: `python benchmarks/remote.py --n {args.n} --latency {args.latency} --workers {W} "
        f"--batch {B} --repeat {R}`\n")
    for path in args.out:
        update_markdown_section(path, "remote", "Remote reads from S3 (benchmarks/remote.py)", body)


if __name__ == "__main__":
    main()
