"""A shuffled epoch through torch's DataLoader: packfmt vs loose files.

Usage::

    python benchmarks/dataloader.py [--n 100000] [--workers 2] [--batch 256] [--cache /tmp/packfmt-bench-cache]

Builds once (and reuses) a dataset of ``n`` KB-sized samples (random bytes,
2-6 KiB, 100 labels) twice: as a packfmt dataset and as loose files in an
ImageFolder-style tree (``class/NNNNNNN.bin``).  Then one epoch each, in the
same run:

* ``get_batch raw``   -- the baseline: this process calls ``ds.get_batch`` on
                         batches of the global order, no DataLoader;
* ``packfmt <mode>``  -- ``DataLoader(PackDataset, batch_sampler=PackBatchSampler(mode),
                         num_workers=W)``;
* ``packfmt iterable``-- ``DataLoader(PackIterableDataset, batch_size=B, num_workers=W)``;
* ``loose files``     -- an ImageFolder-like map-style dataset (the tree is
                         listed at construction, each sample is open/read/close)
                         with ``DataLoader(shuffle=True, num_workers=W)``.

Every item is ``(bytes, label)`` collated by the default collate function, so
the loaders move the same data.  Each run is done with a warm page cache
(files read just before) and a cold one (every file evicted with
``posix_fadvise(DONTNEED)`` first; on a VM the host may still cache).
Ratios: against loose files, and against the raw ``get_batch`` throughput.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

import packfmt
from packfmt.shuffle import EpochOrder
from packfmt.torch import PackBatchSampler, PackDataset, PackIterableDataset

CLASSES = 100


def build(root, n):
    """Build (once) the packfmt dataset and the loose-file tree under ``root``."""
    pack, loose = os.path.join(root, "pack"), os.path.join(root, "loose")
    done = os.path.join(root, "DONE")
    if os.path.exists(done):
        return pack, loose
    import shutil
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(loose)
    rng = np.random.default_rng(0)
    sizes = rng.integers(2048, 6145, n)
    blob = rng.integers(0, 256, int(sizes.max()) + n, dtype=np.uint8).tobytes()
    t = time.perf_counter()
    with packfmt.Writer(pack, shard_size="64MiB") as w:
        for i in range(n):
            label = i * CLASSES // n  # contiguous classes, as a tree is usually packed
            data = blob[i:i + sizes[i]]
            cdir = os.path.join(loose, f"c{label:03d}")
            if i == 0 or (i - 1) * CLASSES // n != label:
                os.makedirs(cdir, exist_ok=True)
            with open(os.path.join(cdir, f"{i:07d}.bin"), "wb") as f:
                f.write(data)
            w.add(f"c{label:03d}/{i:07d}.bin", data, label=label)
    print(f"built {n} samples in {time.perf_counter() - t:.1f} s under {root}")
    open(done, "w").close()
    return pack, loose


class LooseFiles(Dataset):
    """What torchvision's ImageFolder does, minus decoding: list the tree, open/read per sample."""

    def __init__(self, root):
        self.items = []
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        for label, c in enumerate(classes):
            d = os.path.join(root, c)
            self.items.extend((os.path.join(d, f), label) for f in sorted(os.listdir(d)))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        with open(path, "rb") as f:
            return f.read(), label


def all_files(pack, loose):
    out = [os.path.join(pack, f) for f in os.listdir(pack)]
    for d in os.scandir(loose):
        out.extend(os.path.join(d.path, f) for f in os.listdir(d.path))
    return out


def evict(files):
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(files):
    for p in files:
        with open(p, "rb") as f:
            while f.read(1 << 20):
                pass


def run_loader(loader):
    t = time.perf_counter()
    count = nbytes = 0
    for samples, labels in loader:
        count += len(samples)
        nbytes += sum(map(len, samples))
    return count, nbytes, time.perf_counter() - t


def run_raw(pack, batch):
    ds = packfmt.open(pack)
    t = time.perf_counter()
    count = nbytes = 0
    for b in EpochOrder(len(ds), seed=0, mode="global").batches(batch):
        samples = ds.get_batch(b)
        count += len(samples)
        nbytes += sum(map(len, samples))
    return count, nbytes, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--cache", default="/tmp/packfmt-bench-cache")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold-cache runs")
    args = ap.parse_args()
    pack, loose = build(os.path.join(args.cache, f"dataloader-{args.n}"), args.n)
    files = all_files(pack, loose)
    W, B = args.workers, args.batch
    torch.set_num_threads(1)

    def pack_loader(mode, **kw):
        ds = PackDataset(pack, label="label")
        return DataLoader(ds, batch_sampler=PackBatchSampler(ds, B, seed=0, mode=mode, **kw), num_workers=W)

    t = time.perf_counter()
    loose_ds = LooseFiles(loose)
    list_time = time.perf_counter() - t

    runs = [
        ("get_batch raw (1 process)", lambda: run_raw(pack, B)),
        ("packfmt global", lambda: run_loader(pack_loader("global"))),
        ("packfmt feistel", lambda: run_loader(pack_loader("feistel"))),
        ("packfmt block 64x16", lambda: run_loader(pack_loader("block", block_size=64, window=16))),
        ("packfmt none", lambda: run_loader(pack_loader("none"))),
        ("packfmt iterable global", lambda: run_loader(DataLoader(
            PackIterableDataset(pack, batch_size=B, seed=0, label="label"), batch_size=B, num_workers=W))),
        ("loose files (ImageFolder-like)", lambda: run_loader(DataLoader(
            loose_ds, batch_size=B, shuffle=True, num_workers=W))),
    ]
    print(f"{args.n} samples, {sum(os.path.getsize(os.path.join(pack, f)) for f in os.listdir(pack)) / 2**20:.0f} MiB "
          f"packed; DataLoader(num_workers={W}, batch_size={B}); loose tree listed in {list_time:.2f} s "
          f"(not included below)")
    for cache in ("warm", "cold"):
        if cache == "cold" and args.no_cold:
            break
        print(f"\n{cache} page cache")
        head = f"{'reader':<32}{'samples/s':>12}{'MiB/s':>9}{'vs loose':>10}{'vs raw':>8}"
        print(head)
        print("-" * len(head))
        res = {}
        for name, fn in runs:
            if cache == "warm":
                warm(files)
            else:
                evict(files)
            count, nbytes, dt = fn()
            assert count == args.n, (name, count)
            res[name] = (count / dt, nbytes / dt / 2**20)
        loose_rate = res["loose files (ImageFolder-like)"][0]
        raw_rate = res["get_batch raw (1 process)"][0]
        for name, (rate, mib) in res.items():
            print(f"{name:<32}{rate:>12,.0f}{mib:>9.0f}{rate / loose_rate:>9.1f}x{rate / raw_rate:>7.0%}")


if __name__ == "__main__":
    main()
